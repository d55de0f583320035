"""``dcp-datastates`` / ``python -m dcp_datastates``: look inside, verify, convert, benchmark.

    dcp-datastates inspect PATH [--json] [--trust]
    dcp-datastates verify PATH [--json] [--no-progress] [--trust] [INTEGRITY]
    dcp-datastates convert PATH OUT --to torch|safetensors [--json] [--trust] [INTEGRITY]
    dcp-datastates bench [--size-gib N --repeats N --dir DIR --device cpu|cuda]
    dcp-datastates --version

INTEGRITY (see docs/integrity.md): --integrity if-present|required, and the key of a keyed
seal from --key-file FILE or --key-env NAME (default: DCP_DATASTATES_INTEGRITY_KEY, if set;
--no-key ignores it). A key implies --integrity required. Never pass a key on the command line.

Exit codes:
  0  success (verify: every data file verified against checksums its seal vouches for;
     with a key, a seal made with that key)
  1  the checkpoint is damaged (a data, checksum or .metadata file is missing, short,
     altered or malformed, or its keyed seal does not verify: forged or altered)
  2  usage error, or input that cannot be used: no such path, not a checkpoint,
     unreadable, or content refused as unsafe without --trust
  3  nothing wrong found, but unverified: no seal (stock DCP, or the seal was removed),
     saved with checksums=False, or not sealed with the key given, so only sizes could be
     checked (verify; convert too, when --integrity required or a key refuses it)

With --json, results and errors alike are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcp_datastates import __version__
from dcp_datastates.errors import (
    CheckpointIOError,
    CheckpointPathError,
    CorruptCheckpointError,
    DataStatesError,
    UnverifiedCheckpointError,
    unwrap,
)
from dcp_datastates.integrity import KEY_ENV, IntegrityPolicy


class _Lazy:
    """A module, or a name in one, imported on first use: ``--version`` and ``--help`` never load torch."""

    def __init__(self, module: str, name: str | None = None) -> None:
        self._where = (module, name)

    def _load(self) -> Any:
        module, name = self._where
        loaded = importlib.import_module(module)
        return loaded if name is None else getattr(loaded, name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._load(), attribute)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._load()(*args, **kwargs)

    def __instancecheck__(self, instance: Any) -> bool:  # isinstance(x, lazy_class)
        return isinstance(instance, self._load())


if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    from dcp_datastates.config import DataStatesConfig
    from dcp_datastates.metadata_check import read_checkpoint_metadata
    from dcp_datastates.reader import DataStatesReader
else:
    torch = _Lazy("torch")
    BytesStorageMetadata = _Lazy("torch.distributed.checkpoint.metadata", "BytesStorageMetadata")
    TensorStorageMetadata = _Lazy("torch.distributed.checkpoint.metadata", "TensorStorageMetadata")
    DataStatesConfig = _Lazy("dcp_datastates.config", "DataStatesConfig")
    read_checkpoint_metadata = _Lazy("dcp_datastates.metadata_check", "read_checkpoint_metadata")
    DataStatesReader = _Lazy("dcp_datastates.reader", "DataStatesReader")

EXIT_OK, EXIT_DAMAGED, EXIT_UNUSABLE, EXIT_UNVERIFIED = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE: the reader of our output closed it

_RANK_RE = re.compile(r"^__(\d{1,9})_")  # longer: not a rank (big ints can collide in a set)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# -- inspect -----------------------------------------------------------------------------------
def describe(metadata: Metadata) -> dict[str, Any]:
    """Keys, shapes, dtypes, sizes and which ranks' files hold each key's shards (one pass over the records)."""
    ranks_of: dict[str, set[int]] = {}
    object_bytes: dict[str, int] = {}
    files: set[str] = set()
    for index, info in metadata.storage_data.items():
        files.add(info.relative_path)
        match = _RANK_RE.match(info.relative_path)
        ranks_of.setdefault(index.fqn, set()).add(int(match.group(1)) if match else -1)
        object_bytes[index.fqn] = object_bytes.get(index.fqn, 0) + info.length
    entries = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            nbytes = math.prod(md.size) * torch._utils._element_size(md.properties.dtype)
            entries.append({"key": key, "kind": "tensor", "dtype": str(md.properties.dtype).removeprefix("torch."),
                            "shape": list(md.size), "bytes": nbytes, "shards": len(md.chunks),
                            "ranks": sorted(ranks_of.get(key, ()))})
        else:
            assert isinstance(md, BytesStorageMetadata)
            entries.append({"key": key, "kind": "object", "dtype": "", "shape": [], "bytes": object_bytes.get(key, 0),
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
    print(f"total: {_plural(t['keys'], 'key')} ({_plural(t['tensors'], 'tensor')}, {_plural(t['objects'], 'object')}), "
          f"{_human(t['tensor_bytes'])} of tensors, {_plural(t['files'], 'data file')}, {_plural(t['ranks'], 'rank')}")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(read_checkpoint_metadata(args.path, trust=args.trust))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(args.path, info)
    return 0


# -- verify ------------------------------------------------------------------------------------
def integrity_config(args: argparse.Namespace) -> DataStatesConfig:
    """The integrity policy the command line asks for (key from a file or a variable, never argv)."""
    fields: dict[str, Any] = {"integrity": args.integrity}
    if args.no_key:
        fields["integrity_key"] = None
    elif args.key_file:
        try:
            fields["integrity_key"] = Path(args.key_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise _UsageError(f"cannot read the key file {args.key_file!r}: {exc.strerror or exc}") from None
    elif args.key_env:
        if args.key_env not in os.environ:
            raise _UsageError(f"--key-env {args.key_env}: that environment variable is not set")
        fields["integrity_key"] = os.environ[args.key_env]
    try:
        return DataStatesConfig(**fields)
    except ValueError as exc:  # pydantic's message names the field and the fix
        raise _UsageError(str(exc)) from None


def _seal_words(report: Any, policy: IntegrityPolicy) -> str:
    if report.keyed:
        return f"seal keyed (key id {policy.key_id})"
    return "seal unkeyed (it detects damage and naive edits, not forgery; see docs/integrity.md)"


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dcp_datastates.verify import DAMAGED, VERIFIED, planned_bytes, verify_checkpoint

    policy = IntegrityPolicy.of(integrity_config(args))
    quiet = args.no_progress or args.json
    read_checkpoint_metadata(args.path, trust=args.trust)  # an unusable checkpoint fails before any progress bar
    total = 0 if quiet else planned_bytes(args.path, trust=args.trust, policy=policy)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=quiet, file=sys.stderr) as bar:
        report = verify_checkpoint(args.path, progress=bar.update, trust=args.trust, policy=policy)
    rate = report.bytes_verified / report.seconds if report.seconds else 0.0
    code = {VERIFIED: EXIT_OK, DAMAGED: EXIT_DAMAGED}.get(report.status, EXIT_UNVERIFIED)
    if args.json:
        print(json.dumps({"path": report.path, "status": report.status, "ok": report.ok, "exit_code": code,
                          "saved_with_checksums": report.saved_with_checksums, "sealed": report.sealed,
                          "keyed": report.keyed, "key_id": policy.key_id, "required": policy.enforced,
                          "unverified_reasons": report.unverified_reasons,
                          "files_verified": report.files_verified, "files_unverified": report.files_unverified,
                          "bytes_verified": report.bytes_verified, "seconds": report.seconds,
                          "problems": [vars(p) for p in report.problems]}, indent=2))
        return code
    for p in report.problems:
        keys = ", ".join(repr(k) for k in p.keys) or "no recorded key"
        print(f"CORRUPT {p.file} at offset {p.offset} ({p.length} bytes): {p.reason}; affects {keys}")
    for reason in report.unverified_reasons:
        print(f"unverified: {reason}")
    for name in report.files_unverified:
        print(f"unverified {name}: no checksums recorded; sizes checked only")
    summary = (f"{_plural(report.files_verified, 'file')}, {_human(report.bytes_verified)} verified "
               f"in {report.seconds:.2f} s ({_human(rate)}/s)")
    if report.status == DAMAGED:
        print(f"DAMAGED ({_plural(len(report.problems), 'problem')}): {summary}")
    elif report.status == VERIFIED:
        print(f"VERIFIED: {summary}; {_seal_words(report, policy)}")
    else:
        why = ("saved without checksums" if report.sealed and not report.saved_with_checksums
               else "no seal" if not report.sealed else "not sealed with your key" if policy.key is not None
               else "not verified end to end")
        print(f"UNVERIFIED ({why}): no problem found, but not verified end to end; {summary}, "
              f"{_plural(len(report.files_unverified), 'file')} size-checked only")
    return code


# -- convert -----------------------------------------------------------------------------------
def load_full_state(path: str, trust: bool, config: DataStatesConfig | None = None) -> dict[str, Any]:
    """The whole checkpoint as one nested state dict on CPU (all shards assembled)."""
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=DataStatesReader(path, trust_checkpoint=trust, config=config),
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


def check_convert_output(checkpoint: str | os.PathLike, out: Path) -> None:
    """Refuse an output that would destroy the input: the checkpoint itself, or anything inside it."""
    source = Path(checkpoint).resolve()
    target = out.resolve()  # symbolic links resolved: a link into the checkpoint is inside it too
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise CheckpointPathError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if not parent.is_dir():
        raise CheckpointPathError(f"cannot write {str(out)!r}: directory {str(parent)!r} does not exist; create it first")
    if target == source or source in target.parents:
        raise CheckpointPathError(
            f"cannot write {str(out)!r}: it is {'the input checkpoint' if target == source else 'inside the input checkpoint'} "
            f"{str(checkpoint)!r}, and writing there would destroy it; name an output outside the checkpoint directory"
        )
    if out.is_dir():
        raise CheckpointPathError(f"cannot write {str(out)!r}: it is a directory; name the output file")


def _new_file(path: Path) -> io.BufferedWriter:
    """A new file ``path`` (created exclusively, never through a link), open for writing."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644), "wb")


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_convert_output(args.path, out)
    config = integrity_config(args)
    if args.to == "safetensors":
        try:
            from safetensors.torch import save as save_safetensors
        except ImportError:
            raise _UsageError("convert --to safetensors needs the safetensors package: "
                              "pip install 'dcp-datastates[safetensors]'") from None
    state = load_full_state(args.path, args.trust, config)
    check_convert_output(args.path, out)  # again: the paths may have changed while it loaded
    # a failed convert never leaves a half-written OUT; the temporary name is new and unpredictable
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.partial")
    try:
        with _new_file(tmp) as f:
            if args.to == "torch":
                torch.save(state, f)
            else:
                flat = _flatten(state)
                tensors = {k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
                objects = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
                # safetensors holds only tensors; other state travels as JSON in its string metadata.
                f.write(save_safetensors(tensors, metadata={"dcp_datastates.objects": json.dumps(objects, default=repr)}))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    if args.json:
        print(json.dumps({"ok": True, "path": args.path, "out": str(out), "format": args.to, "bytes": size}, indent=2))
    else:
        print(f"wrote {out} ({_human(size)})")
    return EXIT_OK


def cmd_bench(rest: list[str]) -> int:
    from dcp_datastates.bench import main as bench_main

    bench_main(rest)
    return 0


class _UsageError(Exception):
    """Bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def _integrity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--integrity", choices=["if-present", "required"], default="if-present",
                   help="required: refuse a checkpoint not verified end to end (no seal, no checksums)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--key-file", metavar="FILE", help="file holding the integrity key (implies --integrity required)")
    key.add_argument("--key-env", metavar="NAME", help=f"environment variable holding the key (default {KEY_ENV})")
    key.add_argument("--no-key", action="store_true", help=f"ignore {KEY_ENV}: check no keyed seal")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dcp-datastates", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    trust_help = "allow arbitrary pickled content (only for checkpoints you trust: it can run code)"
    p = sub.add_parser("inspect", help="table of keys, shapes, dtypes, sizes, shards per rank")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p = sub.add_parser("verify", help="check every byte against the checksums recorded at save time")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust", action="store_true", help=trust_help)
    _integrity_arguments(p)
    p = sub.add_parser("convert", help="consolidated single-file export")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--to", choices=["torch", "safetensors"], required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--trust", action="store_true", help=trust_help)
    _integrity_arguments(p)
    sub.add_parser("bench", help="save throughput: ours vs stock DCP (see python -m dcp_datastates.bench -h)", add_help=False)
    return parser


def _unwrap(exc: BaseException) -> BaseException:
    """DCP wraps errors raised inside a load in ``CheckpointException``; report ours, else the first rank's own error."""
    ours = unwrap(exc)
    if ours is not exc:
        return ours
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


def exit_code_for(exc: BaseException) -> int:
    """1 for a damaged checkpoint, 3 for one the integrity policy refuses as unverified, 2 for the rest."""
    if isinstance(exc, UnverifiedCheckpointError):
        return EXIT_UNVERIFIED
    if isinstance(exc, (CorruptCheckpointError, CheckpointIOError)) and not isinstance(exc, CheckpointPathError):
        return EXIT_DAMAGED
    return EXIT_UNUSABLE


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``inspect ... | head -1``): stop quietly, as Unix tools do.

    Later flushes of stdout (at interpreter exit) would fail again and print a second error,
    so stdout is pointed at /dev/null first. 141 is what a shell reports for a tool killed by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (captured): nothing to flush later
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
        code = {"inspect": cmd_inspect, "verify": cmd_verify, "convert": cmd_convert}[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the BrokenPipeError handler, not at exit
        return code
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_UNUSABLE
    except BaseException as raised:  # noqa: BLE001 - the CLI answers with a message and an exit code, never a traceback
        if isinstance(raised, (KeyboardInterrupt, BrokenPipeError)):
            raise
        exc = _unwrap(raised)
        if isinstance(exc, _UsageError):
            kind, message, code = "usage", str(exc), EXIT_UNUSABLE
        elif isinstance(exc, (DataStatesError, OSError)):
            kind, message, code = type(exc).__name__, str(exc), exit_code_for(exc)
        else:
            kind, code = "internal", EXIT_UNUSABLE
            message = f"unexpected {type(exc).__name__}: {exc} (a bug in dcp-datastates; please report it)"
        if as_json:
            status = {EXIT_DAMAGED: "damaged", EXIT_UNVERIFIED: "unverified"}.get(code, "error")
            print(json.dumps({"ok": False, "status": status,
                              "error": kind, "message": message, "exit_code": code}, indent=2))
        else:
            print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
