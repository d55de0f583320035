"""Training-loop benchmark: what checkpointing every K steps costs a training run.

    python -m dcp_datastates.bench_training --dim 2048 --layers 16 --steps 60 --every 10   # ~1B params, GPU
    python -m dcp_datastates.bench_training --dim 512 --layers 4 --steps 30 --every 10     # CPU-sized

One process trains a Llama-style transformer (bf16 parameters on CUDA, fp32 on CPU; fp32 Adam
states) for --steps steps, once per method, in the same run:

* ``none`` -- no checkpoints (the baseline);
* ``DataStatesWriter async`` -- ``dcp.async_save(storage_writer=DataStatesWriter(...))`` with the
  optimizer guard: the loop only waits before an optimizer step whose parameters are still being
  copied;
* ``stock async_save + DefaultStager`` -- pinned, asynchronous staging on CUDA (blocking on CPU,
  where DCP allows no other), waiting for staging before the next optimizer step, as torchtitan does;
* ``stock FileSystemWriter`` -- synchronous ``dcp.save``.

For each it reports total time, overhead vs ``none``, and the per-checkpoint training stall: the
time the loop spent inside the save call plus every wait the save imposed on it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
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


@dataclass
class RunResult:
    method: str
    seconds: float = 0.0
    stalls: list[float] = field(default_factory=list)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(method: str, args: argparse.Namespace, directory: Path) -> RunResult:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = Transformer(args.vocab, args.dim, args.layers, args.heads).to(args.device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for group in optimizer.param_groups:  # fp32 Adam states for bf16 parameters: materialise them now
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                  "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
    result = RunResult(method)
    config = DataStatesConfig(host_pool_bytes=args.pool, chunk_bytes=args.chunk)
    stager = DefaultStager(StagingOptions(*([args.device == "cuda"] * 4))) if method.startswith("stock async") else None
    pending, staging = None, None
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

    if method != "none":  # one-time costs (kernel loading, pool allocation) happen once per job, not per save
        warm, _ = _save(method, {"w": torch.zeros(8, device=args.device)}, directory / "warm-up", config, stager)
        warm.result()

    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    synchronize(args.device)
    begin = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0 and method != "none":
            if stall is not None:
                result.stalls.append(stall)
            start = time.perf_counter()
            if pending is not None:
                pending.result()  # at most one checkpoint in flight, for every method
            state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
            path = directory / f"{method.split()[0]}-{step}"
            pending, staging = _save(method, state, path, config, stager)
            stall = time.perf_counter() - start
    if pending is not None:
        pending.result()
    synchronize(args.device)
    result.seconds = time.perf_counter() - begin
    if stall is not None:
        result.stalls.append(stall)
    if stager is not None:
        stager.close()
    return result


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


METHODS = ["none", "DataStatesWriter async", "stock async_save + DefaultStager", "stock FileSystemWriter"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcp_datastates.bench_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--pool", default="2GiB", help="DataStates host pool (size it to the per-rank state for full overlap)")
    parser.add_argument("--chunk", default="32MiB", help="DataStates staging buffer / write size")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    DataStatesConfig(host_pool_bytes=args.pool, chunk_bytes=args.chunk)  # fail before training on a bad size
    directory = Path(tempfile.mkdtemp(prefix="dcp_datastates_train_bench_", dir=args.dir))
    try:
        probe = Transformer(args.vocab, args.dim, args.layers, args.heads)
        params = sum(p.numel() for p in probe.parameters())
        del probe
        results = []
        for method in METHODS:
            results.append(train(method, args, directory))
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        base = results[0].seconds
        param_bytes = 2 if args.device == "cuda" else 4
        print(f"{params / 1e6:.0f}M parameters on {args.device}; state {params * (param_bytes + 8) / 2**30:.2f} GiB; "
              f"{args.steps} steps, checkpoint every {args.every}")
        print(f"{'method':<36}{'total s':>9}{'overhead':>10}{'stall ms (mean)':>17}{'(max)':>9}")
        for r in results:
            mean = statistics.mean(r.stalls) * 1000 if r.stalls else 0.0
            worst = max(r.stalls) * 1000 if r.stalls else 0.0
            print(f"{r.method:<36}{r.seconds:>9.2f}{(r.seconds - base) / base:>10.1%}{mean:>17.0f}{worst:>9.0f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
