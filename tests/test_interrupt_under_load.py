"""Ctrl-C (SIGINT) and SIGTERM abandon a save every time, also while the machine is fully loaded.

One driver process (``signal_scripts/interrupt_rounds.py``) forks a child per round while CPU
burners -- one per core, started here -- load the machine. Each child starts a save with slowed
writes (so it cannot finish before the signal: the slowest delay below is under a third of the
fastest possible save) and is signalled at a random moment of it:

* ``lazy``: ``dcp.async_save`` staging lazily; the signal lands while "training" sleeps, or while
  the program waits for ``upload_completion``;
* ``sync-staged``: ``async_save`` that must stage synchronously (no optimizer known, more than
  the capture budget): the signal lands inside ``stage()``'s wait, or just after it;
* ``sync``: ``dcp.save`` (inside ``unwrap_errors()``); the signal lands in the save itself;
* ``commit``: the upload thread is held right before the commit until the signal is handled:
  the commit must refuse the abandoned save.

Two more rounds run under the program's own SIGINT handler, which raises ``KeyboardInterrupt``
(``stage()`` must then stop its own snapshot) or first calls ``abandon_in_flight_saves()``.

Half the rounds overwrite a complete checkpoint (``overwrite=True``), half save into a new
directory. After every round: the process died of its signal (-2 / -15) within seconds; the
overwritten checkpoint is byte-for-byte what it was (same files, same ``.metadata``) and loads
exactly; a new directory is left empty; the child logged that it abandoned the save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from conftest import io_uring_blocked
from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter

DRIVER = Path(__file__).parent / "signal_scripts" / "interrupt_rounds.py"
N = 200_000  # floats per tensor: 4 tensors x 800 KB = 100 writes of 32 KiB
WRITE_DELAY = 0.06  # seconds per write: >= 100 x 0.06 / 4 writers = 1.5 s for the fastest save
SIGNALS = ["SIGINT", "SIGTERM"]
#: scenario -> rounds per signal: 3 x 3 x 2 + 1 x 2 = 20 rounds (the held commit is deterministic), plus 2 rounds
#: under the program's own SIGINT handler (ours is not installed then)
ROUNDS = {"lazy": 3, "sync-staged": 3, "sync": 3, "commit": 1}
EXIT = {"SIGINT": -2, "SIGTERM": -15}


def state(value: float) -> dict:
    return {f"w{i}": torch.full((N,), value + i) for i in range(4)} | {"step": int(value)}


def listing(path: Path) -> dict[str, bytes | int]:
    """Every file name with its size (and ``.metadata``'s bytes)."""
    return {p.name: p.read_bytes() if p.name == ".metadata" else p.stat().st_size for p in sorted(path.iterdir())}


def test_sigint_and_sigterm_abandon_every_save_on_a_loaded_machine(tmp_path):
    template = tmp_path / "template" / "step-1"
    dcp.save(state(1.0), storage_writer=DataStatesWriter(template, DataStatesConfig(io_engine="threads")), no_dist=True)
    before = listing(template)
    engines = ["threads"] if io_uring_blocked() else ["threads", "io_uring"]
    rng = random.Random(20261202)
    rounds = []
    cases = [(s, g) for s, n in ROUNDS.items() for g in SIGNALS for _ in range(n)]
    for i, (scenario, signame) in enumerate(cases):
        directory = tmp_path / f"round-{i:02d}"
        shutil.copytree(template.parent, directory)
        rounds.append({
            "dir": str(directory), "scenario": scenario, "signal": signame,
            "target": "overwrite" if i % 2 == 0 else "new", "engine": engines[i % len(engines)],
            "delay": 0.0 if scenario == "commit" else round(rng.uniform(0.0, 0.45), 3),
            "wait": "future" if i % 3 == 1 else "sleep",  # async: "training" on, or waiting for upload_completion
        })
    for handler, scenario in (("own-raise", "sync-staged"), ("own-abandon", "lazy")):  # the program's own SIGINT handler
        directory = tmp_path / f"round-{len(rounds):02d}"
        shutil.copytree(template.parent, directory)
        rounds.append({"dir": str(directory), "scenario": scenario, "signal": "SIGINT", "target": "overwrite",
                       "engine": "threads", "delay": round(rng.uniform(0.0, 0.45), 3), "wait": "sleep", "handler": handler})
    spec = tmp_path / "rounds.json"
    spec.write_text(json.dumps({"rounds": rounds, "floats": N, "write_delay": WRITE_DELAY, "timeout": 60, "parallel": 6}))

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec)], capture_output=True, text=True, timeout=400,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(rounds), proc.stdout

    for result in results:
        round_ = result["round"]
        directory = Path(round_["dir"])
        where = f"{round_} ({result['seconds']} s after the signal)\n{(directory / 'stderr.txt').read_text()[-3000:]}"
        assert result["exit"] == EXIT[round_["signal"]], where
        assert result["seconds"] is not None and result["seconds"] < 20, where
        err = (directory / "stderr.txt").read_text()
        assert "abandoning in-flight checkpoint saves" in err, where
        assert listing(directory / "step-1") == before, where  # untouched: no new file, no new .metadata, no lock
        if round_["target"] == "new":
            assert not (directory / "step-2").exists() or not list((directory / "step-2").iterdir()), where
        out = {f"w{i}": torch.zeros(N) for i in range(4)} | {"step": 0}
        dcp.load(out, storage_reader=DataStatesReader(directory / "step-1"), no_dist=True)
        assert out["step"] == 1 and all(torch.equal(out[f"w{i}"], torch.full((N,), 1.0 + i)) for i in range(4)), where
