"""Multi-level checkpoints: local tier, partner copies, background drain, restore from the nearest intact copy.

Two simulated nodes under torchrun (gloo, CPU; one rank per node, ``DCP_DATASTATES_NODE``
set per rank by ``tests/multirank/multilevel.py``) save, lose a node (its processes
SIGKILLed, its local directory deleted) and restore. Three launches serve every
multi-rank claim (module fixture); drain policies, a full local disk and a failed commit
run in one process, where the tier collectives are the identity.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import MULTIRANK
from dcp_datastates import (
    CheckpointIOError,
    DataStatesConfig,
    DataStatesWriter,
    MultiLevelConfig,
    TierConfigError,
    UnverifiedCheckpointError,
    restore,
    shutdown_tiers,
)
from dcp_datastates import drain, tier_save
from dcp_datastates.metadata_check import read_checkpoint_metadata
from dcp_datastates.tier_runtime import TierRuntime, flush_tiers
from dcp_datastates.tiers import NODE_ENV, node_identity

sys.path.insert(0, str(MULTIRANK))
from multilevel import full  # noqa: E402

pytestmark = pytest.mark.multirank


def launch(mode: str, *args: str, expect_ok: bool) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(MULTIRANK))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(MULTIRANK / "multilevel.py"), mode, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert (proc.returncode == 0) == expect_ok, f"{mode}: rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def ranks_say(out: str, what: str) -> dict[int, dict[str, int]]:
    """``rank R: WHAT: step S OK local=.. fetched=.. shared=..`` lines -> {rank: {"step": S, "local": .., ...}}."""
    found = {}
    for line in out.splitlines():
        if f": {what}: step " in line:
            head, tail = line.split(f": {what}: step ")
            fields = dict(part.split("=") for part in tail.split()[2:])
            found[int(head.split()[1])] = {"step": int(tail.split()[0])} | {k: int(v) for k, v in fields.items()}
    assert set(found) == {0, 1}, (what, out)
    return found


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name == ".metadata" or p.suffix in (".distcp", ".json")
            and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Experiment A: steps 1-4, n1 dies in step 4's drain. Experiment B: n1 dies in step 2's partner copy. Then restores."""
    a, b = tmp_path_factory.mktemp("ml_a"), tmp_path_factory.mktemp("ml_b")
    facts: dict = {"a": a, "b": b}
    facts["save_a"] = launch("save-a", str(a), expect_ok=False)
    facts["save_b"] = launch("save-b", str(b), expect_ok=False)
    # what the copies held before node n1 is lost
    facts["copies_step3"] = {name: files_of(path) for name, path in {
        "shared": a / "shared/step-3", "n0": a / "local/n0/step-3", "n0_partner": a / "local/n0/partner/step-3",
        "n1_partner": a / "local/n1/partner/step-3"}.items()}
    facts["shared_step4"] = sorted(p.name for p in (a / "shared/step-4").iterdir())
    facts["b_partner_step2"] = sorted(p.name for p in (b / "local/n0/partner/step-2").iterdir())
    for root in (a, b):  # node n1 is gone: its processes were killed, now its local disk
        shutil.rmtree(root / "local/n1")
    facts["restore"] = launch("restore", str(a), str(b), expect_ok=True)
    return facts


def test_saves_commit_local_and_partner_copies_and_drain_every_step(two_nodes):
    for rank in (0, 1):
        assert (f"rank {rank}: outcomes [('step-1', True, True, 'drained'), ('step-2', True, True, 'drained'), "
                f"('step-3', True, True, 'drained')]") in two_nodes["save_a"]


def test_restore_reads_nothing_from_the_shared_path_when_every_copy_is_local(two_nodes):
    intact = ranks_say(two_nodes["save_a"], "all local")
    assert all(r["step"] == 3 and r["shared"] == 0 and r["fetched"] == 0 and r["local"] > 0 for r in intact.values())
    torn = ranks_say(two_nodes["save_a"], "n1 file torn")  # n1's own file torn: its partner copy on n0 is fetched
    assert torn[1]["step"] == 3 and torn[1]["fetched"] > 0 and torn[1]["shared"] == 0
    assert torn[0]["fetched"] == 0 and torn[0]["shared"] == 0


def test_a_lost_node_restores_exactly_from_its_partner_copy(two_nodes):
    lost = ranks_say(two_nodes["restore"], "A after n1 lost")
    assert lost[0]["step"] == lost[1]["step"] == 4  # the newest step: its drain was killed, its partner copy was not
    assert lost[1]["local"] == 0 and lost[1]["fetched"] > 0 and lost[1]["shared"] == 0
    assert lost[0]["shared"] == 0 and lost[0]["fetched"] == 0


def test_a_step_without_a_whole_copy_of_every_file_is_never_mixed_in(two_nodes):
    # n0's own step-4 file torn, and its partner copy died with n1: the job restores step 3 as a whole
    torn = ranks_say(two_nodes["restore"], "A step 4 torn")
    assert torn[0]["step"] == torn[1]["step"] == 3 and torn[0]["shared"] == torn[1]["shared"] == 0


def test_without_local_copies_the_shared_path_serves(two_nodes):
    shared = ranks_say(two_nodes["restore"], "A no local")
    assert all(r["step"] == 3 and r["shared"] > 0 and r["local"] == 0 and r["fetched"] == 0 for r in shared.values())


def test_an_interrupted_drain_leaves_no_shared_metadata(two_nodes):
    assert "rank 1: the drain of step 4 was not killed" not in two_nodes["save_a"]
    assert ".metadata" not in two_nodes["shared_step4"]
    assert any(name.endswith(".distcp") or name.endswith(".part") for name in two_nodes["shared_step4"])  # it did start


def test_a_partner_killed_mid_copy_leaves_the_previous_step_restorable(two_nodes):
    assert "rank 1: the partner copy of step 2 was not killed" not in two_nodes["save_b"]
    # n0 was receiving n1's files when n1 died: nothing of that copy is left under any name on n0
    assert two_nodes["b_partner_step2"] == []
    back = ranks_say(two_nodes["restore"], "B after partner died")
    assert back[0]["step"] == back[1]["step"] == 1 and back[0]["shared"] == back[1]["shared"] == 0
    assert back[1]["fetched"] > 0


def test_the_shared_copy_is_byte_for_byte_the_local_one_and_a_plain_checkpoint(two_nodes):
    copies = two_nodes["copies_step3"]
    shared = copies["shared"]
    local = copies["n0"] | copies["n0_partner"]  # n0's own files + n1's, as n0 holds them
    assert set(shared) == set(local) and all(shared[n] == local[n] for n in shared)
    assert shared[".metadata"] == copies["n1_partner"][".metadata"]
    a = two_nodes["a"]
    want = full(3)
    out = {"shard": torch.zeros(64, 16), "rep": torch.zeros(300, dtype=torch.bfloat16), "step": 0}
    dcp.load(out, storage_reader=dcp.FileSystemReader(a / "shared/step-3"), no_dist=True)  # stock DCP reads it
    assert out["step"] == 3 and torch.equal(out["shard"], want["shard"]) and torch.equal(out["rep"], want["rep"])
    # every record's bytes equal a plain single-tier save's of the same state
    mine, plain = (read_checkpoint_metadata(a / d, trust=False) for d in ("shared/step-3", "plain-step-3"))
    assert mine.storage_data.keys() == plain.storage_data.keys()
    for index, where in mine.storage_data.items():
        other = plain.storage_data[index]
        with open(a / "shared/step-3" / where.relative_path, "rb") as f, open(a / "plain-step-3" / other.relative_path, "rb") as g:
            assert os.pread(f.fileno(), where.length, where.offset) == os.pread(g.fileno(), other.length, other.offset), index


def test_another_world_size_restores_from_the_shared_path(two_nodes, monkeypatch):
    monkeypatch.setenv(NODE_ENV, "solo")
    a = two_nodes["a"]
    out = {"shard": torch.zeros(64, 16), "rep": torch.zeros(300, dtype=torch.bfloat16), "step": 0}
    result = restore(out, a / "shared", ml_config(a))  # one process reads what two ranks wrote
    want = full(3)
    assert result is not None and result.step == 3 and result.bytes_shared > 0 and result.bytes_local == 0
    assert out["step"] == 3 and torch.equal(out["shard"], want["shard"]) and torch.equal(out["rep"], want["rep"])


# -- one process: drain policies, full disk, failures ----------------------------------------------------
def ml_config(root: Path, **fields: object) -> DataStatesConfig:
    return DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192,
                            multilevel=MultiLevelConfig(local_dir=f"{root}/local/{{node}}", **fields))


def values(step: int) -> dict:
    return {"w": torch.arange(3000, dtype=torch.float32) * step, "step": step}


def assert_loads(path: Path, step: int) -> None:
    out = {"w": torch.zeros(3000), "step": -1}
    dcp.load(out, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    assert out["step"] == step and torch.equal(out["w"], values(step)["w"])


@pytest.fixture
def solo(monkeypatch):
    monkeypatch.setenv(NODE_ENV, "solo")
    yield
    assert shutdown_tiers(60)


def async_save(root: Path, step: int, config: DataStatesConfig) -> None:
    dcp.async_save(values(step), storage_writer=DataStatesWriter(root / f"shared/step-{step}", config)).upload_completion.result()


class Gate:
    """Holds the first drain copy until released (an event, never a sleep)."""

    def __init__(self, monkeypatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real, held = drain.copy_one, []

        def copy(source, target, fsync):
            if not held:
                held.append(source)
                self.entered.set()
                assert self.release.wait(60), "the test never released the drain"
            return real(source, target, fsync)

        monkeypatch.setattr(drain, "copy_one", copy)


def outcomes() -> list[tuple[str, str]]:
    runtime = TierRuntime.current()
    return [(o.name, o.drain.result(timeout=60)) for o in runtime.outcomes]


def handled(count: int) -> None:
    runtime = TierRuntime.current()
    for outcome in runtime.outcomes[:count]:
        assert outcome.done.wait(60)


def test_drain_policy_skip_does_not_drain_a_checkpoint_due_while_a_drain_runs(tmp_path, solo, monkeypatch):
    gate, config = Gate(monkeypatch), ml_config(tmp_path, drain_policy="skip")
    async_save(tmp_path, 1, config)
    assert gate.entered.wait(60)
    async_save(tmp_path, 2, config)  # training went on: the save call did not wait for the drain
    handled(2)
    gate.release.set()
    assert flush_tiers(60)
    assert outcomes() == [("step-1", "drained"), ("step-2", "skipped")]
    assert_loads(tmp_path / "shared/step-1", 1)
    assert not (tmp_path / "shared/step-2/.metadata").exists()
    assert (tmp_path / "local/solo/step-2/.metadata").is_file()  # the local copy is there all the same


def test_drain_policy_queue_one_replaces_the_waiting_checkpoint_with_a_newer_one(tmp_path, solo, monkeypatch):
    gate, config = Gate(monkeypatch), ml_config(tmp_path, drain_policy="queue_one", keep_local=3)
    async_save(tmp_path, 1, config)
    assert gate.entered.wait(60)
    async_save(tmp_path, 2, config)
    async_save(tmp_path, 3, config)
    handled(3)
    gate.release.set()
    assert flush_tiers(60)
    assert outcomes() == [("step-1", "drained"), ("step-2", "superseded"), ("step-3", "drained")]
    assert_loads(tmp_path / "shared/step-1", 1)
    assert_loads(tmp_path / "shared/step-3", 3)
    assert not (tmp_path / "shared/step-2/.metadata").exists()


def test_drain_policy_wait_makes_the_next_save_call_wait_for_the_drain(tmp_path, solo, monkeypatch):
    gate, config = Gate(monkeypatch), ml_config(tmp_path, drain_policy="wait")
    async_save(tmp_path, 1, config)
    assert gate.entered.wait(60)
    waiting, returned = threading.Event(), threading.Event()
    real_wait = TierRuntime.wait_for_drains

    def observed(self):
        waiting.set()
        real_wait(self)

    monkeypatch.setattr(TierRuntime, "wait_for_drains", observed)
    saver = threading.Thread(target=lambda: (async_save(tmp_path, 2, config), returned.set()))
    saver.start()
    assert waiting.wait(60)
    assert not returned.wait(2), "the save call returned while the previous drain was held"
    gate.release.set()
    saver.join(60)
    assert returned.is_set()
    assert flush_tiers(60)
    assert outcomes() == [("step-1", "drained"), ("step-2", "drained")]
    assert_loads(tmp_path / "shared/step-2", 2)


def test_a_failed_commit_leaves_no_tier_copy_and_the_next_save_works(tmp_path, solo, monkeypatch):
    config = ml_config(tmp_path)
    async_save(tmp_path, 1, config)
    real = tier_save.commit_copy

    def broken(*args, **kwargs):
        raise CheckpointIOError("injected: the local disk failed at the commit")

    monkeypatch.setattr(tier_save, "commit_copy", broken)
    with pytest.raises(BaseException, match="injected: the local disk failed"):
        async_save(tmp_path, 2, config)
    monkeypatch.setattr(tier_save, "commit_copy", real)
    assert flush_tiers(60)
    assert [o.aborted for o in TierRuntime.current().outcomes] == [False, True]
    assert not (tmp_path / "local/solo/step-2/.metadata").exists()
    assert not any(p.suffix == ".distcp" for p in (tmp_path / "local/solo/step-2").iterdir())  # its files dropped
    assert not (tmp_path / "shared/step-2").exists()
    async_save(tmp_path, 3, config)
    assert flush_tiers(60)
    assert_loads(tmp_path / "shared/step-1", 1)
    assert_loads(tmp_path / "shared/step-3", 3)


def test_an_abandon_right_before_the_local_commit_abandons_the_whole_save(tmp_path, solo, monkeypatch):
    """Ctrl-C / SIGTERM / abandon_in_flight_saves() up to the local rename: no copy anywhere, as single-tier."""
    from dcp_datastates import SaveAbandonedError, abandon_in_flight_saves, unwrap

    config = ml_config(tmp_path)
    async_save(tmp_path, 1, config)
    real = tier_save.commit_copy
    monkeypatch.setattr(tier_save, "commit_copy", lambda *a, **k: (abandon_in_flight_saves("a test's Ctrl-C"), real(*a, **k))[1])
    with pytest.raises(BaseException) as caught:
        async_save(tmp_path, 2, config)
    assert isinstance(unwrap(caught.value), SaveAbandonedError), repr(caught.value)
    monkeypatch.setattr(tier_save, "commit_copy", real)
    assert flush_tiers(60)
    assert [o.aborted for o in TierRuntime.current().outcomes] == [False, True]
    step2 = tmp_path / "local/solo/step-2"
    assert not (step2 / ".metadata").exists() and not any(p.name.startswith("__") for p in step2.iterdir())
    assert not (tmp_path / "shared/step-2").exists()
    assert_loads(tmp_path / "shared/step-1", 1)


def test_a_flipped_bit_in_the_local_copy_is_caught_and_the_file_comes_from_the_next_copy(tmp_path, solo, caplog):
    config = ml_config(tmp_path)
    async_save(tmp_path, 1, config)
    assert flush_tiers(60)
    victim = sorted((tmp_path / "local/solo/step-1").glob("__0_*_0.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the block checksums can tell
    victim.write_bytes(bytes(data))
    out = {"w": torch.zeros(3000), "step": -1}
    with caplog.at_level(logging.WARNING, logger="dcp_datastates"):
        result = restore(out, tmp_path / "shared", config)
    assert "found damaged copies" in caplog.text
    assert result.step == 1 and result.attempts == 2 and result.bytes_shared > 0
    assert result.sources[victim.name] == "shared"
    assert out["step"] == 1 and torch.equal(out["w"], values(1)["w"])


def test_under_an_integrity_key_a_forged_copy_is_never_a_source_and_a_wrong_key_never_starts_fresh(
        tmp_path, solo, caplog, monkeypatch):
    from test_integrity_policy import forge

    monkeypatch.delenv("DCP_DATASTATES_INTEGRITY_KEY", raising=False)
    tiers = MultiLevelConfig(local_dir=f"{tmp_path}/local/{{node}}")
    sized = dict(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192, multilevel=tiers)
    keyed = DataStatesConfig(integrity_key="0123456789abcdef" * 2, **sized)
    async_save(tmp_path, 1, keyed)
    assert flush_tiers(60)
    forge(tmp_path / "local/solo/step-1", keep_mac=True)  # data edited; checksums, side file, digest recomputed
    out = {"w": torch.zeros(3000), "step": -1}
    with caplog.at_level(logging.WARNING, logger="dcp_datastates"):
        result = restore(out, tmp_path / "shared", keyed)
    assert "does not verify under your integrity key" in caplog.text
    assert result.step == 1 and result.bytes_local == 0 and result.bytes_shared > 0
    assert out["step"] == 1 and torch.equal(out["w"], values(1)["w"])
    # another key refuses every copy: a typed error, never a silent fresh start (None)
    with pytest.raises(UnverifiedCheckpointError, match="can be restored as an integrity key"):
        restore(out, tmp_path / "shared", DataStatesConfig(integrity_key="f" * 32, **sized))
    shutil.rmtree(tmp_path / "shared/step-1")  # only the forged copy is left
    with pytest.raises(UnverifiedCheckpointError, match="1 refused"):
        restore(out, tmp_path / "shared", keyed)
    # the path matters: without the key, the forged copy is what a restore reads (the documented limit)
    result = restore(out, tmp_path / "shared", DataStatesConfig(**sized))
    assert result.bytes_local > 0 and result.bytes_shared == 0 and not torch.equal(out["w"], values(1)["w"])


def test_a_save_that_does_not_fit_locally_goes_to_the_shared_path_with_a_warning(tmp_path, solo, monkeypatch, caplog):
    """Injected: the local disk reports no free space (the real tmpfs case is the next test)."""
    monkeypatch.setattr(tier_save, "_free_bytes", lambda directory: 0)
    with caplog.at_level(logging.WARNING, logger="dcp_datastates"):
        async_save(tmp_path, 1, ml_config(tmp_path))
    assert "goes to the shared path" in caplog.text and "this node's local disk lacks the room" in caplog.text
    assert_loads(tmp_path / "shared/step-1", 1)
    assert not (tmp_path / "local/solo/step-1").exists()


def test_a_full_local_tmpfs_falls_back_to_the_shared_path(tmp_path):
    from test_faults import namespace_for_a_private_mount

    prefix = namespace_for_a_private_mount()
    if prefix is None:
        pytest.skip("cannot create a mount namespace here (unshare refused); the injected test covers the fallback")
    script = textwrap.dedent(f"""
        import logging, os, subprocess, warnings, torch
        import torch.distributed.checkpoint as dcp
        from dcp_datastates import DataStatesConfig, DataStatesWriter, MultiLevelConfig, flush_tiers
        warnings.filterwarnings("ignore")
        os.environ["DCP_DATASTATES_NODE"] = "solo"
        root = {str(tmp_path)!r}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", root + "/tiny"], check=True)
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        config = DataStatesConfig(io_engine="threads", chunk_bytes=8192, host_pool_bytes=4 * 8192,
                                  multilevel=MultiLevelConfig(local_dir=root + "/tiny/{{node}}"))
        big = {{"w": torch.arange(2**20, dtype=torch.float32), "step": 1}}  # 4 MiB on a 1 MiB local disk
        dcp.async_save(big, storage_writer=DataStatesWriter(root + "/shared/step-1", config)).upload_completion.result()
        small = {{"w": torch.arange(1000, dtype=torch.float32), "step": 2}}
        dcp.async_save(small, storage_writer=DataStatesWriter(root + "/shared/step-2", config)).upload_completion.result()
        assert flush_tiers(60)
        out = {{"w": torch.zeros(2**20), "step": 0}}
        dcp.load(out, storage_reader=dcp.FileSystemReader(root + "/shared/step-1"), no_dist=True)
        assert out["step"] == 1 and torch.equal(out["w"], big["w"])
        assert not os.path.exists(root + "/tiny/solo/step-1")
        assert os.path.isfile(root + "/tiny/solo/step-2/.metadata")  # a save that fits uses the local tier
        out = {{"w": torch.zeros(1000), "step": 0}}
        dcp.load(out, storage_reader=dcp.FileSystemReader(root + "/shared/step-2"), no_dist=True)
        assert out["step"] == 2 and torch.equal(out["w"], small["w"])
        print("FALLBACK OK", flush=True)
    """)
    (tmp_path / "tiny").mkdir()
    proc = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "FALLBACK OK" in proc.stdout
    assert "step-1 goes to the shared path" in proc.stderr and "lacks the room" in proc.stderr


# -- configuration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("local_dir, message", [
    ("relative/{node}", "absolute path"),
    ("/nvme/{rank}/ckpt", "only '{node}'"),
    ("/nvme/{node", "not a valid template"),
])
def test_config_names_what_is_wrong_with_local_dir(local_dir, message):
    with pytest.raises(ValueError, match=message):
        MultiLevelConfig(local_dir=local_dir)


def test_config_rejects_unknown_policies_and_partner_counts():
    with pytest.raises(ValueError, match="drain_policy"):
        MultiLevelConfig(local_dir="/x/{node}", drain_policy="later")
    with pytest.raises(ValueError, match="partners"):
        MultiLevelConfig(local_dir="/x/{node}", partners=2)
    config = DataStatesConfig.model_validate({"multilevel": {"local_dir": "/x/{node}", "drain_every": 4}})
    assert config.multilevel.drain_every == 4 and config.multilevel.drain_policy == "queue_one"


def test_node_identity_is_the_env_var_then_group_rank(monkeypatch):
    monkeypatch.setenv(NODE_ENV, "rack3-n7")
    assert node_identity() == "rack3-n7"
    monkeypatch.setenv(NODE_ENV, "../etc")
    with pytest.raises(TierConfigError, match="not a usable node name"):
        node_identity()
    monkeypatch.delenv(NODE_ENV)
    monkeypatch.setenv("GROUP_RANK", "5")
    assert node_identity() == "node5"


def test_checkpoint_ids_must_be_step_names(tmp_path, solo):
    with pytest.raises(TierConfigError, match="step-named checkpoint ids"):
        dcp.async_save(values(1), storage_writer=DataStatesWriter(tmp_path / "shared/latest", ml_config(tmp_path)))
