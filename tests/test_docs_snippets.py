"""Every command and code block in the user docs runs (README.md and docs/*.md).

Each fenced ```python block is run as a script in a fresh temporary directory; each ```bash /
```sh block is run there command by command (one per line; a trailing backslash continues a
line), with this interpreter's ``bin`` first on ``PATH``. A block that cannot run in CI says so
in an HTML comment right above its fence (see CONTRIBUTING.md, "Docs snippets"):

* ``<!-- test: CMD -->`` -- run ``CMD`` instead (a cheaper form of the same command);
* ``<!-- test: covered by tests/FILE.py::TEST -->`` -- that test runs it (the test must exist);
* ``<!-- test: skip: REASON -->`` -- not run (installs system packages, is the test suite
  itself); reported as skipped with its reason.

README.md's blocks carry no such comments yet (it is rewritten separately): ``README_PENDING``
gives each of them its escape, keyed by the block's first line, until the comments move into
the README. An entry that no longer matches an unannotated block fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
ANNOTATION = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
RUNNABLE = {"python", "bash", "sh"}
PYTHON_TIMEOUT_S, COMMAND_TIMEOUT_S = 300, 120

README_PENDING = {
    "sudo apt-get install build-essential python3-dev   # gcc, make, libc headers; Python.h for the system python":
        "skip: installs system packages (needs root and the network)",
    "pip install torch==2.13.0 -e . && python examples/train_and_resume.py":
        "covered by tests/test_example_and_resume.py::test_main_example_trains_saves_and_resumes",
    'pip install torch==2.13.0 -e ".[test]" && python -m pytest':
        "skip: the test suite itself (CI runs it)",
    'pip install torch==2.13.0 "pydantic>=2.6,<3" "numba>=0.59" "tqdm>=4.60"':
        "covered by tests/test_install_without_liburing.py::test_without_liburing_auto_falls_back_to_threads_and_io_uring_says_why",
    "import tempfile":
        "covered by tests/test_readme_use.py::test_readme_use_snippet_runs_as_written_and_restores_the_optimizer_exactly",
    "python -m dcp_datastates.bench --size-gib 2 --repeats 5 [--dir /disk/to/test] [--device cuda]":
        "covered by tests/test_integrity.py::test_cli_bench_json_runs_every_method_side_by_side",
    "# 1.04B parameters on a GPU: bf16 weights + fp32 master weights and Adam moments (13.5 GiB of state)":
        "covered by tests/test_bench_training.py::test_training_benchmark_reports_every_method",
    "torchrun --nproc_per_node=2 examples/train_fsdp.py --dir /tmp/fsdp_run --steps 12 --every 3 --keep 2":
        "covered by tests/test_example_fsdp.py::test_killed_mid_save_then_resumed_continues_the_loss_curve_exactly",
    "dcp-datastates inspect /ckpt/step-200          # keys, kinds, dtypes, shapes, sizes, shards, ranks, totals":
        "covered by tests/test_integrity.py::test_cli_inspect_table_and_json",
}


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    language: str
    code: str
    annotation: str | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        note = ANNOTATION.match(before.strip())
        found.append(Block(doc, i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n", note.group(1) if note else None))
        i = end + 1
    return found


def escape_of(block: Block) -> str | None:
    if block.annotation is not None:
        return block.annotation
    if block.doc.name == "README.md":
        return README_PENDING.get(block.code.splitlines()[0] if block.code.strip() else "")
    return None


ALL = [b for doc in DOCS for b in blocks_of(doc) if b.language in RUNNABLE]


def commands(code: str) -> list[str]:
    joined, out = "", []
    for line in code.splitlines():
        joined += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        if joined.strip() and not joined.strip().startswith("#"):
            out.append(joined)
        joined = ""
    return out


def environment(tmp_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", TMPDIR=str(tmp_path))


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    escape = escape_of(block)
    if escape is None and block.doc.name == "README.md" and block.language != "python":
        pytest.fail(f"{block.id}: a README command block without a test comment or README_PENDING entry")
    if escape is not None and escape.startswith("skip:"):
        reason = escape.removeprefix("skip:").strip()
        assert reason, f"{block.id}: a skip needs its reason"
        pytest.skip(f"{block.id}: {reason}")
    if escape is not None and escape.startswith("covered by "):
        target = escape.removeprefix("covered by ").strip()
        file, _, name = target.partition("::")
        assert name and re.search(rf"^def {re.escape(name)}\(", (ROOT / file).read_text(), re.M), (
            f"{block.id}: {target} does not exist")
        return
    env = environment(tmp_path)
    if block.language == "python" and escape is None:
        script = tmp_path / "snippet.py"
        script.write_text(block.code)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=PYTHON_TIMEOUT_S)
        assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return
    for command in [escape] if escape is not None else commands(block.code):
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, f"{block.id}: `{command}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_every_readme_pending_entry_still_matches_an_unannotated_block() -> None:
    unannotated = {b.code.splitlines()[0] for b in blocks_of(ROOT / "README.md") if b.annotation is None and b.code.strip()}
    stale = sorted(set(README_PENDING) - unannotated)
    assert not stale, f"README_PENDING entries without a matching README block (remove them): {stale}"


def test_the_parser_sees_fences_annotations_and_continued_lines(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- test: echo cheap -->\n\n```bash\nexpensive --all \\\n  --flags\n# comment\n```\n"
                   "```python\nprint(1)\n```\n```text\nnot code\n```\n")
    found = blocks_of(doc)
    assert [(b.language, b.annotation) for b in found] == [("bash", "echo cheap"), ("python", None), ("text", None)]
    assert commands(found[0].code) == ["expensive --all    --flags"]
