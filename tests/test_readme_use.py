"""The README's "Use" snippet runs as written and really restores the optimizer state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

README = Path(__file__).resolve().parents[1] / "README.md"

CHECK = textwrap.dedent('''
    # --- appended by tests/test_readme_use.py ---
    import os
    latest = latest_complete_checkpoint(ckpt)
    assert latest is not None and latest.name == "step-200", latest
    assert sorted(os.listdir(ckpt)) == ["step-100", "step-200"], os.listdir(ckpt)
    saved, got = optimizer.state_dict(), new_optimizer.state_dict()
    assert len(saved["state"]) == 4 and sorted(got["state"]) == sorted(saved["state"]), (saved["state"].keys(), got["state"].keys())
    for pid, entry in saved["state"].items():
        assert set(got["state"][pid]) == {"step", "exp_avg", "exp_avg_sq"}, got["state"][pid].keys()
        for name, value in entry.items():
            assert torch.equal(got["state"][pid][name], value), (pid, name)
    assert float(saved["state"][0]["step"]) == 2.0  # two training steps before the last save
    assert got["param_groups"] == saved["param_groups"]
    for (name, p), (_, q) in zip(model.named_parameters(), restored_model.named_parameters()):
        assert torch.equal(p, q), name
    print("README snippet: model and optimizer state restored exactly")
''')


def use_snippet() -> str:
    """The first ```python block of the README's "## Use" section."""
    text = README.read_text()
    section = text[text.index("\n## Use\n"):]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's Use section"
    return match.group(1)


def test_readme_use_snippet_runs_as_written_and_restores_the_optimizer_exactly(tmp_path):
    snippet = use_snippet()
    assert "state_dict = {" in snippet and "get_state_dict" in snippet and "set_state_dict" in snippet
    script = tmp_path / "use_snippet.py"
    script.write_text(snippet + CHECK)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from " + str(tmp_path) in proc.stdout and "step-200" in proc.stdout
    assert "restored exactly" in proc.stdout
    assert "torch.distributed is disabled" in proc.stderr  # what the README says DCP prints without a process group


def test_the_plain_state_dict_pattern_the_readme_warns_about_restores_no_optimizer_state(tmp_path, make_writer):
    """The README's claim: ``{"optim": optimizer.state_dict()}`` with a fresh optimizer loads nothing, silently."""
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, storage_writer=make_writer(tmp_path / "c"),
             no_dist=True)
    from dcp_datastates import DataStatesReader

    fresh_model = torch.nn.Linear(8, 8)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    target = {"model": fresh_model.state_dict(), "optim": fresh.state_dict()}
    dcp.load(target, storage_reader=DataStatesReader(tmp_path / "c"), no_dist=True)  # no error ...
    assert torch.equal(fresh_model.weight, model.weight)  # ... the model is back (filled in place) ...
    assert target["optim"]["state"] == {} and fresh.state_dict()["state"] == {}  # ... the optimizer state is not
