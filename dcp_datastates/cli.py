"""``dcp-datastates`` / ``python -m dcp_datastates``: look inside, verify, convert, benchmark.

    dcp-datastates inspect PATH [--json]
    dcp-datastates verify PATH [--json] [--no-progress]
    dcp-datastates convert PATH --to torch|safetensors OUT [--trust]
    dcp-datastates bench [--size-gib N --repeats N --dir DIR --device cpu|cuda]

Exit codes: 0 success, 1 the checkpoint is corrupt (verify), 2 bad usage or a
checkpoint that cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from dcp_datastates.errors import DataStatesError
from dcp_datastates.reader import DataStatesReader

_RANK_RE = re.compile(r"^__(\d+)_")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# -- inspect -----------------------------------------------------------------------------------
def describe(metadata: Metadata) -> dict[str, Any]:
    """Keys, shapes, dtypes, sizes and which ranks' files hold each key's shards."""
    ranks_of: dict[str, set[int]] = {}
    files: set[str] = set()
    for index, info in metadata.storage_data.items():
        files.add(info.relative_path)
        match = _RANK_RE.match(info.relative_path)
        ranks_of.setdefault(index.fqn, set()).add(int(match.group(1)) if match else -1)
    entries = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            nbytes = math.prod(md.size) * torch._utils._element_size(md.properties.dtype)
            entries.append({"key": key, "kind": "tensor", "dtype": str(md.properties.dtype).removeprefix("torch."),
                            "shape": list(md.size), "bytes": nbytes, "shards": len(md.chunks),
                            "ranks": sorted(ranks_of.get(key, ()))})
        else:
            assert isinstance(md, BytesStorageMetadata)
            lengths = [info.length for idx, info in metadata.storage_data.items() if idx.fqn == key]
            entries.append({"key": key, "kind": "object", "dtype": "", "shape": [], "bytes": sum(lengths),
                            "shards": 1, "ranks": sorted(ranks_of.get(key, ()))})
    tensors = [e for e in entries if e["kind"] == "tensor"]
    return {
        "entries": entries,
        "totals": {"keys": len(entries), "tensors": len(tensors), "objects": len(entries) - len(tensors),
                   "tensor_bytes": sum(e["bytes"] for e in tensors), "files": len(files),
                   "ranks": len({r for e in entries for r in e["ranks"]})},
    }


def _print_inspect(path: str, info: dict[str, Any]) -> None:
    rows = [(e["key"], e["kind"], e["dtype"], "x".join(map(str, e["shape"])) or "()" if e["kind"] == "tensor" else "-",
             _human(e["bytes"]), str(e["shards"]), ",".join(map(str, e["ranks"]))) for e in info["entries"]]
    header = ("key", "kind", "dtype", "shape", "size", "shards", "ranks")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"checkpoint {path}")
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    t = info["totals"]
    print(f"total: {t['keys']} keys ({t['tensors']} tensors, {t['objects']} objects), "
          f"{_human(t['tensor_bytes'])} of tensors, {t['files']} data files, {t['ranks']} ranks")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(DataStatesReader(args.path).read_metadata())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(args.path, info)
    return 0


# -- verify ------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dcp_datastates.checksums import load_checksums
    from dcp_datastates.verify import verify_checkpoint

    total = sum(fc.size for fc in load_checksums(Path(args.path)).values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=args.no_progress or args.json, file=sys.stderr) as bar:
        report = verify_checkpoint(args.path, progress=bar.update)
    rate = report.bytes_verified / report.seconds if report.seconds else 0.0
    if args.json:
        print(json.dumps({"path": report.path, "ok": report.ok, "files_verified": report.files_verified,
                          "files_unverified": report.files_unverified, "bytes_verified": report.bytes_verified,
                          "seconds": report.seconds, "problems": [vars(p) for p in report.problems]}, indent=2))
    else:
        for p in report.problems:
            keys = ", ".join(repr(k) for k in p.keys) or "no recorded key"
            print(f"CORRUPT {p.file} at offset {p.offset} ({p.length} bytes): {p.reason}; affects {keys}")
        for name in report.files_unverified:
            print(f"unverified {name}: no checksums recorded (written by stock DCP?); sizes checked only")
        verdict = "OK" if report.ok else f"CORRUPT ({len(report.problems)} problem(s))"
        print(f"{verdict}: {report.files_verified} files, {_human(report.bytes_verified)} verified "
              f"in {report.seconds:.2f} s ({_human(rate)}/s)")
    return 0 if report.ok else 1


# -- convert -----------------------------------------------------------------------------------
def load_full_state(path: str, trust: bool) -> dict[str, Any]:
    """The whole checkpoint as one nested state dict on CPU (all shards assembled)."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=DataStatesReader(path, trust_checkpoint=trust),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def cmd_convert(args: argparse.Namespace) -> int:
    state = load_full_state(args.path, args.trust)
    out = Path(args.out)
    if args.to == "torch":
        torch.save(state, out)
    else:
        try:
            from safetensors.torch import save_file
        except ImportError:
            print("convert --to safetensors needs the safetensors package: pip install 'dcp-datastates[safetensors]'",
                  file=sys.stderr)
            return 2
        flat = _flatten(state)
        tensors = {k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
        objects = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
        # safetensors holds only tensors; other state travels as JSON in its string metadata.
        save_file(tensors, str(out), metadata={"dcp_datastates.objects": json.dumps(objects, default=repr)})
    print(f"wrote {out} ({_human(out.stat().st_size)})")
    return 0


def cmd_bench(rest: list[str]) -> int:
    from dcp_datastates.bench import main as bench_main

    bench_main(rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcp-datastates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="table of keys, shapes, dtypes, sizes, shards per rank")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("verify", help="check every byte against the checksums recorded at save time")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("convert", help="consolidated single-file export")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--to", choices=["torch", "safetensors"], required=True)
    p.add_argument("--trust", action="store_true", help="allow arbitrary pickled objects (only for checkpoints you trust)")
    sub.add_parser("bench", help="save throughput: ours vs stock DCP (see python -m dcp_datastates.bench -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"inspect": cmd_inspect, "verify": cmd_verify, "convert": cmd_convert}[args.command](args)
    except (DataStatesError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
