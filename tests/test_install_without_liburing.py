"""The README's compiler-free install (no liburing): ``auto`` writes with threads, ``io_uring`` says why not.

liburing 2024.5.3 builds from its sdist and so needs a C compiler; the README's set-up section
offers ``pip install --no-deps -e .`` after the other dependencies for machines without one.
This runs the package in a process where ``import liburing`` fails as it does there.
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
    writer = DataStatesWriter(f"{root}/auto", DataStatesConfig(io_engine="auto", chunk_bytes=8192, host_pool_bytes=32768))
    dcp.save(state, storage_writer=writer, no_dist=True)
    print("ENGINE", writer.last_stats.engine, flush=True)
    out = {"w": torch.zeros(10_000), "step": 0}
    dcp.load(out, storage_reader=DataStatesReader(f"{root}/auto"), no_dist=True)
    print("EXACT", torch.equal(out["w"], state["w"]) and out["step"] == 3, flush=True)
    try:
        dcp.save(state, storage_writer=DataStatesWriter(f"{root}/uring", DataStatesConfig(io_engine="io_uring")), no_dist=True)
        print("IO_URING SAVED", flush=True)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        print("IO_URING REFUSED", str(exc).replace(chr(10), " "), flush=True)
''')


def test_without_liburing_auto_falls_back_to_threads_and_io_uring_says_why():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "ENGINE threads" in out and "EXACT True" in out, out
    assert "io_uring unavailable (the liburing binding cannot be imported" in out, out
    refused = next(line for line in out.splitlines() if line.startswith("IO_URING"))
    assert refused.startswith("IO_URING REFUSED") and "liburing" in refused and "io_engine='auto' or 'threads'" in refused, refused
