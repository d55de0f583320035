"""The training benchmark fits a GPU machine: old checkpoints go, staging avoids /dev/shm, no run starts without room."""

from __future__ import annotations

import argparse

import pytest
import torch

from dcp_datastates import bench_training


def tiny_args(**overrides: object) -> argparse.Namespace:
    fields = dict(device="cpu", dim=32, layers=1, heads=4, vocab=64, seq=8, batch=2, accum=1, dtype="fp32",
                  steps=8, every=2, pool="auto", chunk="1MiB", keep=2)
    return argparse.Namespace(**(fields | overrides))


@pytest.mark.parametrize("method", bench_training.METHODS[1:])
def test_each_method_keeps_only_its_last_two_checkpoints(tmp_path, method):
    result = bench_training.RunResult(method)
    bench_training.train(method, tiny_args(), tmp_path, result)
    prefix = method.split()[0]
    # saves at steps 2, 4, 6 and 8: the two older ones were deleted while training went on
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}-6", f"{prefix}-8"]
    assert len(result.seconds) == 1 and len(result.stalls) == 4


def test_stock_staging_is_pinned_on_cuda_and_never_uses_shared_memory():
    for device in ["cpu", "cuda"]:
        options = bench_training.staging_options(device)
        assert options.use_shared_memory is False
        assert options.use_pinned_memory is (device == "cuda") and options.use_async_staging is (device == "cuda")


def test_a_run_without_room_for_two_checkpoints_refuses_to_start(tmp_path):
    with pytest.raises(SystemExit, match=r"GiB free; this benchmark keeps up to two .* pass --dir"):
        bench_training.check_room(tmp_path, 2**60, bench_training.METHODS)
    bench_training.check_room(tmp_path, 1024, bench_training.METHODS)  # a small state fits


def test_methods_option_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        bench_training.main(["--methods", "datastates,fastest"])
    assert "unknown ['fastest']" in capsys.readouterr().err


def test_methods_subset_runs_the_baseline_and_the_chosen_method(tmp_path, capsys):
    bench_training.main(["--dim", "32", "--layers", "1", "--heads", "4", "--vocab", "64", "--seq", "8", "--steps", "4",
                         "--every", "2", "--chunk", "1MiB", "--methods", "datastates", "--dir", str(tmp_path)])
    rows = [line.split("  ")[0].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["none", "DataStatesWriter async"]
    assert list(tmp_path.iterdir()) == []


def test_parameters_are_counted_without_building_the_model():
    for args in (tiny_args(), tiny_args(dim=64, layers=3, vocab=100, heads=2)):
        built = bench_training.Transformer(args.vocab, args.dim, args.layers, args.heads)
        assert bench_training.count_parameters(args) == sum(p.numel() for p in built.parameters())
    assert bench_training.count_parameters(tiny_args(dim=2048, layers=18, heads=16, vocab=32000)) >= 10**9


def test_mixed_precision_state_is_read_lazily_not_copied_aside(tmp_path):
    """Once it stepped, every tensor of the bf16 run's state is owned by a known optimizer: nothing is captured.

    (Its 2 GB of bf16 parameters at 1B parameters would exceed what a save may copy aside and make
    every async save stage synchronously.)
    """
    from dcp_datastates.capture import capture_mutable

    args = tiny_args(dtype="bf16")
    model, optimizer = bench_training.build(args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    bench_training.forward_backward(model, tokens)
    optimizer.step()
    captured = capture_mutable(bench_training._state_of(model, optimizer, 1), budget_bytes=2**40)
    assert captured.tensors_captured == 0 and captured.bytes_captured == 0, captured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.zero_grad(set_to_none=True)
    bench_training.forward_backward(model, tokens)
    optimizer.step()  # the bf16 parameters follow the fp32 masters
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(v.dtype == torch.bfloat16 for v in model.state_dict().values())
