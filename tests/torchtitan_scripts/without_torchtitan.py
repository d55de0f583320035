"""Run pytest as if torchtitan were not installed (run by tests/test_torchtitan_skips.py).

    python without_torchtitan.py PYTEST_ARGS...

Python 3.10 (where the test extra leaves torchtitan out) and a plain ``pip install -e .`` have no
torchtitan. To reproduce that here, the site-packages folder holding torchtitan is swapped on
``sys.path`` for a folder of links to everything else in it, and -- the trap of issue 17.3 -- a
stray empty folder named ``torchtitan`` is put on ``sys.path``, which Python imports as a
namespace package (that is what ``tests/torchtitan/`` used to do under pytest).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path


def hide_torchtitan(scratch: Path) -> None:
    for i, entry in enumerate(list(sys.path)):
        site = Path(entry or ".")
        if not (site / "torchtitan" / "__init__.py").exists():
            continue
        farm = scratch / f"site-{i}"
        farm.mkdir()
        for item in site.iterdir():
            if not item.name.startswith("torchtitan"):
                os.symlink(item, farm / item.name)
        sys.path[i] = str(farm)
    stray = scratch / "stray"
    (stray / "torchtitan").mkdir(parents=True)
    sys.path.append(str(stray))
    sys.path_importer_cache.clear()
    spec = importlib.util.find_spec("torchtitan")
    # Only the namespace trap is left: no torchtitan code can be imported.
    assert spec is not None and spec.origin is None, spec
    print("torchtitan hidden: only a namespace package is importable", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        hide_torchtitan(Path(scratch))
        import pytest

        return int(pytest.main(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
