"""The README's compiler-free install (no liburing): ``auto`` writes with threads, ``io_uring`` is refused up front.

liburing 2024.5.3 builds from its sdist and so needs a C compiler; the README's set-up section
offers ``pip install --no-deps -e .`` after the other dependencies for machines without one.
This runs the package in a process where ``import liburing`` fails as it does there: ``auto``
saves and loads with the threads engine and says so once per process (two saves and two loads
here); ``io_engine="io_uring"`` is refused when the config is built, naming the reason and the fix.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import logging, sys, tempfile, warnings
    warnings.filterwarnings("ignore")
    sys.modules["liburing"] = None  # `import liburing` raises ImportError, as where it is not installed
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s", stream=sys.stdout)
    import torch
    import torch.distributed.checkpoint as dcp
    from dcp_datastates import DataStatesConfig, DataStatesReader, DataStatesWriter

    root = tempfile.mkdtemp()
    state = {"w": torch.arange(10_000, dtype=torch.float32), "step": 3}
    for name in ("auto", "auto-again"):
        writer = DataStatesWriter(f"{root}/{name}", DataStatesConfig(io_engine="auto", chunk_bytes=8192, host_pool_bytes=32768))
        dcp.save(state, storage_writer=writer, no_dist=True)
        print("ENGINE", writer.last_stats.engine, flush=True)
        out = {"w": torch.zeros(10_000), "step": 0}
        dcp.load(out, storage_reader=DataStatesReader(f"{root}/{name}"), no_dist=True)
        print("EXACT", torch.equal(out["w"], state["w"]) and out["step"] == 3, flush=True)
    try:
        DataStatesConfig(io_engine="io_uring")
        print("IO_URING ACCEPTED", flush=True)
    except ValueError as exc:  # pydantic's ValidationError, raised when the config is built
        print("IO_URING REFUSED", type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
''')


def test_without_liburing_auto_falls_back_to_threads_and_io_uring_says_why():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("ENGINE threads") == 2 and out.count("EXACT True") == 2, out
    unavailable = [line for line in out.splitlines() if "io_uring unavailable (the liburing binding cannot be imported" in line]
    assert len(unavailable) == 2, out  # once for writing, once for reading -- not per save or load
    assert {("writing" in line, "reading" in line) for line in unavailable} == {(True, False), (False, True)}, unavailable
    refused = next(line for line in out.splitlines() if line.startswith("IO_URING"))
    assert refused.startswith("IO_URING REFUSED ValidationError"), refused
    assert "liburing" in refused and "io_engine='auto' or 'threads'" in refused and "pip install liburing==2024.5.3" in refused, refused
