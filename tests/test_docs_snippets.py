"""Every command and code block in the user docs runs (README.md and docs/*.md).

Each fenced ```python block is run as a script in a fresh temporary directory; each ```bash /
```sh block is run there command by command (one per line; a trailing backslash continues a
line), with this interpreter's ``bin`` first on ``PATH``. A block that cannot run in CI says so
in an HTML comment right above its fence (see CONTRIBUTING.md, "Docs snippets"):

* ``<!-- test: CMD -->`` -- run ``CMD`` instead (a cheaper form of the same command);
* ``<!-- test: covered by tests/FILE.py::TEST -->`` -- that test runs it (the test must exist);
* ``<!-- test: skip: REASON -->`` -- not run (installs system packages, is the test suite
  itself); reported as skipped with its reason.

A README command block without such a comment fails: every command a user is told to type is
either run here or names the test that runs it.
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
    return block.annotation


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
        pytest.fail(f"{block.id}: a README command block without a test comment (<!-- test: CMD | covered by FILE::TEST | skip: WHY -->)")
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


def test_the_parser_sees_fences_annotations_and_continued_lines(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- test: echo cheap -->\n\n```bash\nexpensive --all \\\n  --flags\n# comment\n```\n"
                   "```python\nprint(1)\n```\n```text\nnot code\n```\n")
    found = blocks_of(doc)
    assert [(b.language, b.annotation) for b in found] == [("bash", "echo cheap"), ("python", None), ("text", None)]
    assert commands(found[0].code) == ["expensive --all    --flags"]
