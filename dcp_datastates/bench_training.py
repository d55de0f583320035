"""Training-loop benchmark: what checkpointing every K steps costs a training run.

    python -m dcp_datastates.bench_training --dim 2048 --layers 18 --batch 8 --seq 1024 --accum 8 --steps 30 --every 10   # 1.04B params, GPU
    python -m dcp_datastates.bench_training --preset cpu     # CPU-sized: 2 repeats of 4 methods, a few minutes on 2 cores

One process trains a Llama-style transformer for --steps steps, once per method, in the same
run. With ``--dtype bf16`` (the default on CUDA) it keeps what mixed-precision LLM training keeps:
bf16 parameters, fp32 master weights and fp32 Adam states (14 bytes per parameter); with
``--dtype fp32`` (the default on CPU) fp32 parameters and Adam states (12 bytes per parameter).
``--accum`` micro-batches per optimizer step set the step time, as gradient accumulation does. Methods:

* ``none`` -- no checkpoints (the baseline);
* ``DataStatesWriter async`` -- ``dcp.async_save(storage_writer=DataStatesWriter(...))`` with the
  optimizer guard: the loop only waits before an optimizer step whose parameters are still being
  copied;
* ``stock async_save + DefaultStager`` -- pinned, asynchronous staging on CUDA (blocking on CPU,
  where DCP allows no other), waiting for staging before the next optimizer step, as torchtitan does;
  staged into private pinned memory, not ``/dev/shm`` (shared memory only serves DCP's checkpoint
  *process*, and a GPU machine's ``/dev/shm`` is far smaller than a 1B-parameter state);
* ``stock FileSystemWriter`` -- synchronous ``dcp.save``.

For each it reports total time, overhead vs ``none``, and the per-checkpoint training stall: the
time the loop spent inside the save call plus every wait the save imposed on it.

Disk: a method keeps at most the checkpoint in flight and the one before it (``--keep 1``: the one
in flight alone; older ones are deleted on a background thread as the next starts, for every
method alike), and everything is deleted before the next method starts; the run refuses to start
without room for those checkpoints in ``--dir``. ``--methods`` runs a subset (``none`` is always run: it is the baseline).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from dcp_datastates.config import DataStatesConfig
from dcp_datastates.guard import wait_staged
from dcp_datastates.writer import DataStatesWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 4 * dim, bias=False)
        self.down = torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW over fp32 master copies of bf16 parameters: bf16 compute, fp32 optimizer state.

    torch's AdamW keeps its states in the parameters' dtype; LLM training keeps fp32 master
    weights and fp32 moments instead (Megatron, FSDP mixed precision), and that is the state a
    checkpoint of such a run holds. A ``torch.optim.Optimizer`` over the bf16 parameters (its
    ``step`` goes through torch's optimizer hooks), because that is what makes them known to a
    lazy snapshot: their only writes are in ``step``, which waits for the snapshot's copies. A
    wrapper torch does not know as an optimizer leaves the 2 GB of bf16 parameters of a 1B model
    unguarded -- more than a save may copy aside -- and every async save staging synchronously.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.params = params
        self.master = [p.detach().float() for p in params]
        self.inner = materialise_moments(torch.optim.AdamW(self.master, lr=lr))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for master, param in zip(self.master, self.params):
            master.grad = param.grad.float()
        self.inner.step()
        for master, param in zip(self.master, self.params):
            param.copy_(master)
            master.grad = None

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"adamw": self.inner.state_dict(), "master": {str(i): m for i, m in enumerate(self.master)}}


def make_optimizer(model: torch.nn.Module, dtype: torch.dtype) -> "torch.optim.AdamW | MixedPrecisionAdamW":
    params = list(model.parameters())
    if dtype != torch.float32:
        return MixedPrecisionAdamW(params, lr=1e-4)
    return materialise_moments(torch.optim.AdamW(params, lr=1e-4))


def materialise_moments(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """Create the Adam moments now, as after a first step, so every checkpoint has its full size."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    return optimizer


def state_bytes_per_parameter(dtype: torch.dtype) -> int:
    """Parameter + (fp32 master, if mixed precision) + two fp32 Adam moments."""
    return 12 if dtype == torch.float32 else torch.finfo(dtype).bits // 8 + 12


@dataclass
class RunResult:
    method: str
    seconds: list[float] = field(default_factory=list)  # one total per repeat
    stalls: list[float] = field(default_factory=list)  # every checkpoint of every repeat
    #: per repeat: the loop until its last step returned (the last checkpoint may still be writing) --
    #: what a long run pays per step; ``seconds`` adds the wait for that last checkpoint (``drain_seconds``)
    steps_seconds: list[float] = field(default_factory=list)
    drain_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace) -> "tuple[Transformer, torch.optim.AdamW | MixedPrecisionAdamW]":
    """The model and its optimizer, made on ``args.device`` directly.

    Initialising a 1B-parameter model on the host and moving it takes longer than a checkpoint
    of it; on the GPU it takes a second.
    """
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    with torch.device(args.device):
        model = Transformer(args.vocab, args.dim, args.layers, args.heads).to(dtype)
    return model, make_optimizer(model, dtype)


def forward_backward(model: Transformer, tokens: torch.Tensor) -> None:
    """One micro-batch: forward, loss, backward (gradients accumulate)."""
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()


def count_parameters(args: argparse.Namespace) -> int:
    """Parameters of the ``Transformer`` that ``args`` describe, without building it.

    Building a 1B-parameter model costs seconds on the host, and on the meta device its
    initialisers import torch's compiler (seconds too); the sum is plain (checked against a
    built model in ``tests/test_train_bench_room.py``).
    """
    dim = args.dim
    block = 2 * dim + 12 * dim * dim  # two RMSNorm weights; qkv 3d^2, out d^2, up 4d^2, down 4d^2
    return 2 * args.vocab * dim + args.layers * block  # embedding and head, untied


def train(method: str, args: argparse.Namespace, directory: Path, result: RunResult) -> None:
    """One timed training run of ``method``; appends its times and stalls to ``result``.

    ``args.keep`` checkpoints stay on disk (the one in flight and, with 2, the complete one before it).
    """
    model, optimizer = build(args)
    config = DataStatesConfig(host_pool_bytes=args.pool, chunk_bytes=args.chunk)
    stager = make_stager(args.device) if method.startswith("stock async") else None
    pending, staging = None, None
    on_disk: list[Path] = []  # checkpoints of this run still on disk, oldest first
    deletions: list[threading.Thread] = []
    stall: float | None = None  # stall of the latest checkpoint so far (save call + waits it caused)

    def before_step() -> None:
        nonlocal stall, staging
        start = time.perf_counter()
        if method.startswith("DataStates"):
            wait_staged()
        elif staging is not None:
            staging.result()
            staging = None
        if stall is not None:
            stall += time.perf_counter() - start

    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)

    def training_step(accum: int) -> None:
        for _ in range(accum):  # forward and backward never wait for a snapshot
            forward_backward(model, tokens)
        before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Untimed warm-up: one-time costs happen once per job, not per checkpoint -- kernel selection
    # and the allocator for every method (one micro-batch per step launches every kernel a step
    # does), and each checkpointing method's own (``_warm_up``).
    for _ in range(2):
        training_step(1)
    _warm_up(method, _state_of(model, optimizer, 0), directory / "warm-up", config, stager)
    synchronize(args.device)
    begin = time.perf_counter()
    for step in range(1, args.steps + 1):
        training_step(args.accum)
        if step % args.every == 0 and method != "none":
            if stall is not None:
                result.stalls.append(stall)
            start = time.perf_counter()
            if pending is not None:
                pending.result()  # at most one checkpoint in flight, for every method
            path = directory / f"{method.split()[0]}-{step}"
            pending, staging = _save(method, _state_of(model, optimizer, step), path, config, stager)
            stall = time.perf_counter() - start
            # Keep the new checkpoint (and, with keep=2, the complete one before it); delete older ones off the loop.
            on_disk.append(path)
            while len(on_disk) > args.keep:
                deletions.append(_delete_in_background(on_disk.pop(0)))
    synchronize(args.device)
    stepped = time.perf_counter()
    result.steps_seconds.append(stepped - begin)
    if pending is not None:
        pending.result()
    result.drain_seconds.append(time.perf_counter() - stepped)
    result.seconds.append(time.perf_counter() - begin)
    if stall is not None:
        result.stalls.append(stall)
    if stager is not None:
        stager.close()
    for thread in deletions:
        thread.join()


def _warm_up(method: str, state: dict, path: Path, config: DataStatesConfig, stager: DefaultStager | None) -> None:
    """A method's one-time costs, paid before the timed loop as a job pays them once.

    Ours: one whole checkpoint (the pool's allocation and pinning, numba's kernels, the engine).
    Stock async: one staging, which allocates and pins the host copy that ``DefaultStager`` keeps
    for the same tensors (its writes have no one-time cost). Stock sync has none: it allocates
    its host copy anew at every save.
    """
    if method == "DataStatesWriter async":
        done, _ = _save(method, state, path, config, stager)
        done.result()
        shutil.rmtree(path)
    elif method == "stock async_save + DefaultStager":
        assert stager is not None
        staged = stager.stage(state)
        if isinstance(staged, Future):
            staged.result()


def make_stager(device: str) -> DefaultStager:
    return DefaultStager(staging_options(device))


def staging_options(device: str) -> StagingOptions:
    """Stock staging as torchtitan's async mode uses it on CUDA: pinned, asynchronous, non-blocking
    copies -- into private pinned memory, not ``/dev/shm`` (that only serves the checkpoint process)."""
    cuda = device == "cuda"
    return StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=cuda,
                          use_non_blocking_copy=cuda)


def _delete_in_background(path: Path) -> threading.Thread:
    thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                              name="train-bench-delete", daemon=True)
    thread.start()
    return thread


def _state_of(model: torch.nn.Module, optimizer: "torch.optim.AdamW | MixedPrecisionAdamW", step: int) -> dict:
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}


def _save(method: str, state: dict, path: Path, config: DataStatesConfig, stager: DefaultStager | None) -> tuple:
    """Start one checkpoint; return (future of its completion, future of its staging or None)."""
    if method == "DataStatesWriter async":
        response = dcp.async_save(state, storage_writer=DataStatesWriter(path, config), no_dist=True)
        return response.upload_completion, None
    if method == "stock async_save + DefaultStager":
        response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8),
                                  async_stager=stager, no_dist=True)
        if hasattr(response, "upload_completion"):
            return response.upload_completion, response.staging_completion
        return response, None
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=8), no_dist=True)
    done: Future[None] = Future()
    done.set_result(None)
    return done, None


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
METHODS = ["none", "DataStatesWriter async", "stock async_save + DefaultStager", "stock FileSystemWriter"]
METHOD_KEYS = dict(zip(["none", "datastates", "stock-async", "stock-sync"], METHODS))


def disk_needed(state_bytes: int, keep: int = 2) -> int:
    """Disk a run needs: ``keep`` checkpoints (the one in flight and the ones kept before it), and slack."""
    return keep * state_bytes + 2**30


def check_room(directory: Path, state_bytes: int, methods: list[str], keep: int = 2) -> None:
    """Refuse to start a run that cannot fit: ``keep`` checkpoints on disk, pinned staging in host memory."""
    need_disk = disk_needed(state_bytes, keep)
    free_disk = shutil.disk_usage(directory).free
    if free_disk < need_disk:
        raise SystemExit(
            f"{directory} has {free_disk / 2**30:.1f} GiB free; this benchmark keeps up to {('one', 'two')[keep - 1]} "
            f"{state_bytes / 2**30:.1f} GiB checkpoints ({need_disk / 2**30:.1f} GiB): pass --dir on a larger file "
            "system, a smaller model, or --keep 1"
        )
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return
    pinned = state_bytes * sum(m in methods for m in METHODS[1:3])  # our pool and the stock stager's copy
    if available < pinned + 4 * 2**30:
        print(f"warning: {available / 2**30:.1f} GiB of host memory available; staging pins about "
              f"{pinned / 2**30:.1f} GiB", file=sys.stderr)


#: Named sizes; flags given after ``--preset`` on the command line override its values.
PRESETS: dict[str, dict[str, object]] = {
    # 21M fp32 parameters (0.23 GiB of state), 2 checkpoints per run, 2 runs per method: 8 runs in all.
    "cpu": {"device": "cpu", "dim": 512, "layers": 4, "vocab": 8000, "seq": 128, "batch": 4, "steps": 20, "every": 10,
            "repeats": 2},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.bench_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named size (cpu: the README's CPU-sized run); other flags override its values")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches (forward + backward) per optimizer step")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: bf16 on cuda, with fp32 master weights; fp32 on cpu)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--pool", default="auto",
                        help="DataStates host pool (host_pool_bytes); 'auto', the default, sizes it to the state")
    parser.add_argument("--chunk", default="32MiB", help="DataStates staging buffer / write size")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per method, round-robin (the order rotating); totals are medians")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", type=int, choices=[1, 2], default=2,
                        help="checkpoints kept on disk: the one in flight and (2) the complete one before it")
    parser.add_argument("--methods", default=",".join(METHOD_KEYS),
                        help=f"comma-separated subset of {', '.join(METHOD_KEYS)} (none always runs: the baseline)")
    preset, _ = parser.parse_known_args(argv)
    if preset.preset is not None:
        parser.set_defaults(**PRESETS[preset.preset])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHOD_KEYS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHOD_KEYS)}")
    methods = [m for k, m in METHOD_KEYS.items() if k == "none" or k in keys]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    params = count_parameters(args)
    state = params * state_bytes_per_parameter(DTYPES[args.dtype])
    DataStatesConfig(host_pool_bytes=args.pool, chunk_bytes=args.chunk)  # fail before training on a bad size
    directory = Path(tempfile.mkdtemp(prefix="dcp_datastates_train_bench_", dir=args.dir))
    try:
        if len(methods) > 1:
            check_room(directory, state, methods, args.keep)
        results = {method: RunResult(method) for method in methods}
        for repeat in range(args.repeats):
            for method in methods[repeat % len(methods) :] + methods[: repeat % len(methods)]:
                began = time.perf_counter()
                train(method, args, directory, results[method])
                print(f"[{method}: run {repeat + 1} trained in {results[method].seconds[-1]:.2f} s, "
                      f"{time.perf_counter() - began:.0f} s with set-up]", file=sys.stderr, flush=True)
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir()
                if args.device == "cuda":
                    torch.cuda.empty_cache()  # the next method starts from the same free GPU memory
        base = results["none"].median
        print(f"{params / 1e6:.0f}M {args.dtype} parameters on {args.device}; state {state / 2**30:.2f} GiB; "
              f"{args.steps} steps of {args.accum}x{args.batch}x{args.seq} tokens, checkpoint every {args.every}; "
              f"median of {args.repeats} run(s) each")
        print(f"{'method':<36}{'total s':>9}{'overhead':>10}{'stall ms (mean)':>17}{'(max)':>9}")
        for r in results.values():
            mean = statistics.mean(r.stalls) * 1000 if r.stalls else 0.0
            worst = max(r.stalls) * 1000 if r.stalls else 0.0
            print(f"{r.method:<36}{r.median:>9.2f}{(r.median - base) / base:>10.1%}{mean:>17.0f}{worst:>9.0f}")
        print(f"[benchmark wall time {time.perf_counter() - started:.0f} s: set-up, warm-ups and every run]", file=sys.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
