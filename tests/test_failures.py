"""Reliability: bad values, dead ranks, interrupted runs and several nodes, with nothing lost.

In-process tests run on conftest's gloo rank pool. The others run ``tests/scripts/train.py``
as real programs — through Lightning's own launcher (``--devices 2``) or ``torchrun`` — in
their own session, so a test can SIGKILL or SIGSTOP one rank, or the script can cut the
power to all of them; every wait has a deadline and every process is killed at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.checkpoint import FileSystemReader

import lightning_phantom as lp
from lightning_phantom.cost.counting import CommCounter
from lightning_phantom.strategy import PhantomLayout
from conftest import run_ranks
from scripts.train import Batches, Regression, inf_gradient_on_rank_1, job

SCRIPT = Path(__file__).parent / "scripts" / "train.py"
ROOT = Path(__file__).parent.parent
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# How long a whole program (start, train, exit) may take: a bound that turns a hang into a failure,
# generous because a busy machine starts 2-4 processes slowly. What these tests time are the
# strategy's collective timeouts, asserted apart.
DEADLINE = 600


# --------------------------------------------------------------------- processes
class Program:
    """A training program in its own session, its output (all ranks') going to one file."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output(), re.MULTILINE)
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output within {timeout} s:\n{self.output()[-3000:]}")

    def wait(self, timeout: float) -> int:
        """The main process's exit status (its output file stays open in ranks it leaves behind)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def programs():
    started: list[Program] = []

    def start(args: list[str], log: Path, launcher: Optional[list[str]] = None) -> Program:
        started.append(Program((launcher or [PYTHON]) + [str(SCRIPT), *args], log))
        return started[-1]

    yield start
    for program in started:  # a failed test leaves nothing running
        program.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(prefix: Path, ranks: int) -> list[dict]:
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(ranks)]


def assert_same_weights(got: list[dict], want: list[dict]) -> None:
    for a, b in zip(got, want):
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), key


def saved_step(checkpoint: Path) -> int:
    return torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"]


# --------------------------------------------------------------------- non-finite
class Poison(Callback):
    """Makes the loss NaN (a NaN input) or one rank's gradient of ``net.2.compress`` Inf at ``step``.

    The loss is poisoned on ``ranks`` (all by default), the gradient on rank 1.
    """

    def __init__(self, kind: str, step: int, ranks: Optional[list[int]] = None) -> None:
        self.kind, self.step, self.ranks = kind, step, ranks

    def on_train_start(self, trainer, pl_module):
        if self.kind == "gradient":
            inf_gradient_on_rank_1(trainer, pl_module, self.step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kind == "loss" and trainer.global_step == self.step and (
                self.ranks is None or trainer.global_rank in self.ranks):
            batch[0][0, 0] = float("nan")


class StepCollectives(Callback):
    """The collectives each training step sends (forward, backward, averages, the guard)."""

    def __init__(self) -> None:
        self.steps: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = CommCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.steps.append((dict(self.counter.calls), self.counter.payload_bytes))

    def on_exception(self, trainer, pl_module, exception):
        self.counter.__exit__(None, None, None)  # the stopped step never reaches on_train_batch_end


def train_with_poison(tmp_dir: str, kind: str, step: int, detect: bool, devices: int = 2,
                      data_parallel: str = "ddp", ranks: Optional[list[int]] = None):
    L.seed_everything(0)
    model = Regression(optimizer="sgd", lr=0.1)
    loader = Batches(rows=64, batch_size=8, phantom=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    collectives = StepCollectives()
    strategy = lp.PhantomStrategy(phantom_parallel_size=2, data_parallel=data_parallel, detect_non_finite=detect)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                        max_steps=6, callbacks=[Poison(kind, step, ranks), checkpoint, collectives], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader.trainer = trainer
    error = None
    try:
        trainer.fit(model, loader)
    except lp.NonFiniteError as e:
        error = {"message": str(e), "step": e.step, "ranks": e.ranks, "tensors": e.tensors}
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    guards = [type(c).__name__ for c in trainer.callbacks if isinstance(c, lp.NonFiniteGuard)]
    return error, finite, trainer.global_step, guards, collectives.steps


def test_nan_loss_stops_every_rank_before_the_step_and_its_checkpoint(tmp_path):
    for error, finite, step, guards, _ in run_ranks(2, train_with_poison, str(tmp_path / "on"), "loss", 3, True):
        assert guards == ["NonFiniteGuard"]  # added by PhantomStrategy by default
        assert error is not None and error["step"] == 3 and step == 3
        assert error["ranks"] == [0, 1]  # one phantom group, one batch: both ranks see the NaN loss
        assert all(t[0] == "loss" and "net.2.compress" in t for t in error["tensors"].values())
        message = error["message"]
        assert "Non-finite loss and gradient at global step 3 (epoch 0, batch 3) on rank(s) 0, 1 of 2" in message
        assert "rank 0: loss = nan; gradient of" in message and "detect_non_finite=False" in message
        assert finite  # the optimizer step with NaN gradients never ran
    written = sorted(p.name for p in (tmp_path / "on").iterdir())
    assert written == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]  # nothing for the bad step

    # Without the guard the same run goes on and checkpoints NaN weights.
    for error, finite, step, guards, _ in run_ranks(2, train_with_poison, str(tmp_path / "off"), "loss", 3, False):
        assert error is None and guards == [] and step == 6 and not finite
    assert "step=4.ckpt" in {p.name for p in (tmp_path / "off").iterdir()}


def test_inf_gradient_on_one_rank_stops_all_and_names_it(tmp_path):
    for error, finite, step, _, _ in run_ranks(2, train_with_poison, str(tmp_path), "gradient", 2, True):
        assert error["step"] == 2 and step == 2 and finite
        assert error["ranks"] == [1] and error["tensors"] == {1: ["net.2.compress"]}  # rank 0 stops too
        assert "Non-finite gradient at global step 2" in error["message"]
        assert "rank 1: gradient of net.2.compress (max |grad| = inf)" in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt", "step=2.ckpt"]


def test_the_guard_sends_no_collective_of_its_own(tmp_path):
    # Its verdict rides in the all-reduce of replicated gradients: the same calls, one float32 more.
    on = run_ranks(2, train_with_poison, str(tmp_path / "on"), "none", 0, True)
    off = run_ranks(2, train_with_poison, str(tmp_path / "off"), "none", 0, False)
    for (_, _, _, guards, with_guard), (_, _, _, _, without) in zip(on, off):
        assert guards == ["NonFiniteGuard"] and len(with_guard) == len(without) == 6
        for (calls, payload), (calls_off, payload_off) in zip(with_guard, without):
            assert calls == calls_off and calls["all_reduce"] >= 1
            assert payload - payload_off == 4


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nan_in_one_replica_stops_every_replica(tmp_path, mode):
    # data(2) x phantom(2): only the replica of ranks 2 and 3 gets a NaN input. Its verdict reaches
    # the other replica through one all-reduce over the data axis, and all four ranks stop.
    for error, finite, step, _, _ in run_ranks(4, train_with_poison, str(tmp_path), "loss", 2, True, 4, mode, [2, 3],
                                               timeout=300):
        assert error is not None and error["step"] == 2 and step == 2 and finite
        assert sorted(r for r, names in error["tensors"].items() if "loss" in names) == [2, 3]
        if mode == "ddp":  # judged before the data average spreads the NaN to the other replica
            assert error["ranks"] == [2, 3]
        else:  # FSDP reduce-scatters gradients during backward: the NaN is everywhere by the check
            assert error["ranks"] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt", "step=2.ckpt"]


# ------------------------------------------------------------------- dead ranks
@pytest.mark.parametrize("how, timeout", [("SIGKILL", 20), ("SIGSTOP", 10)])
def test_survivor_exits_with_a_clear_error_when_its_peer_dies_or_hangs(programs, tmp_path, how, timeout):
    run = programs(["--devices", "2", "--steps", "1000", "--slow", "0.2", "--timeout", str(timeout)],
                   tmp_path / "log")
    peer = int(run.wait_for(r"^rank 1 pid (\d+) step 3 ", timeout=DEADLINE).group(1))
    start = time.monotonic()
    os.kill(peer, getattr(signal, how))
    # A hung peer costs up to two timeouts: Lightning's per-step SIGTERM broadcast swallows the first.
    status = run.wait(timeout=2 * timeout + 20)
    elapsed = time.monotonic() - start
    out = run.output()
    assert status != 0
    assert re.search(r"PhantomStrategy: rank 0 of 2 stopped at global step \d+: a collective with the other "
                     rf"ranks failed .*collective timeout {timeout} s", out)
    if how == "SIGKILL":  # gloo sees the closed connection at once
        assert "Connection closed by peer" in out and elapsed < timeout
    else:  # nothing closes: only the timeout ends the wait
        assert "Timed out waiting" in out and 0.8 * timeout <= elapsed < 2 * timeout + 20
    assert "done at step" not in out


def test_a_rank_that_starts_late_is_waited_for_longer_than_a_collective(programs, tmp_path):
    """Setting up waits for every rank to start (setup_timeout, 30 min); only collectives are bounded by
    ``timeout``. With one bound for both, a rank that starts 8 s late on a busy machine ended the job."""
    run = programs(["--devices", "2", "--steps", "3", "--timeout", "3", "--late", "8"], tmp_path / "log")
    assert run.wait(timeout=DEADLINE) == 0, run.output()[-3000:]
    out = run.output()
    assert "rank 1 starts 8 s late" in out
    assert "rank 0 done at step 3" in out and "rank 1 done at step 3" in out


def late_mesh(setup: float):
    """Rank 1 comes 3 s late to the creation of the mesh's groups, then 3 s late to a collective."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3)
    try:
        mesh = PhantomLayout(1, 2, 2).build_mesh("cpu", timedelta(seconds=1), timedelta(seconds=setup))
    except Exception as e:  # noqa: BLE001 - the test reads what failed
        return f"setup failed: {type(e).__name__}"
    group = mesh["phantom_parallel"].get_group()
    if dist.get_rank() == 1:
        time.sleep(3)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except Exception:  # noqa: BLE001 - the test reads what failed
        return f"collective failed after {time.monotonic() - start:.1f} s"
    return "collective done"


def test_groups_wait_setup_timeout_for_a_late_rank_and_timeout_in_a_collective():
    rank0, _ = run_ranks(2, late_mesh, 60, timeout=60)
    assert rank0.startswith("collective failed after ") and float(rank0.split()[-2]) < 2.5, rank0


# -------------------------------------------------------------- interrupted runs
@pytest.fixture(scope="module")
def uninterrupted():
    """The run every resumed run must reproduce: 12 Adam steps with an LR schedule, p = 2, on the pool."""
    return run_ranks(2, job, steps=12)


def test_killed_run_resumes_to_the_same_weights(programs, tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    common = ["--devices", "2", "--steps", "12", "--ckpt-dir", str(ckpt), "--every", "3"]
    killed = programs(common + ["--kill-at", "7"], tmp_path / "killed.log")  # mid-epoch (8 steps per epoch)
    assert killed.wait(timeout=DEADLINE) == -signal.SIGKILL
    assert "rank 0 pid" in killed.output() and "done at step" not in killed.output()
    assert saved_step(ckpt / "last.ckpt") == 6  # the newest checkpoint, itself mid-epoch
    resumed = programs(common + ["--resume", "last", "--out", str(tmp_path / "final")], tmp_path / "resumed.log")
    assert resumed.wait(timeout=DEADLINE) == 0, resumed.output()[-3000:]
    final = results(tmp_path / "final", 2)
    for got, want in zip(final, uninterrupted):
        assert got["step"] == 12 and got["losses"] == want["losses"][6:]  # same batches, same Adam state
    assert_same_weights(final, uninterrupted)


def test_crash_while_saving_leaves_the_previous_checkpoint_whole(programs, tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    common = ["--devices", "2", "--steps", "12", "--ckpt-dir", str(ckpt), "--every", "3"]
    crashed = programs(common + ["--crash-in-save", "6"], tmp_path / "crashed.log")
    assert crashed.wait(timeout=DEADLINE) == -signal.SIGKILL
    assert "crashing in the save of step 6" in crashed.output()
    # last.ckpt of step 6 was cut after its tensors were written: last.ckpt is still step 3's,
    # whole, and the half-written one sits in a hidden directory that "last" never matches.
    assert saved_step(ckpt / "last.ckpt") == 3
    partial = ckpt / ".last.ckpt.partial"
    assert partial.is_dir() and not (partial / "meta.pt").exists()
    resumed = programs(common + ["--resume", "last", "--out", str(tmp_path / "final")], tmp_path / "resumed.log")
    assert resumed.wait(timeout=DEADLINE) == 0, resumed.output()[-3000:]
    final = results(tmp_path / "final", 2)
    for got, want in zip(final, uninterrupted):
        assert got["losses"] == want["losses"][3:]
    assert_same_weights(final, uninterrupted)
    assert not partial.exists() and saved_step(ckpt / "last.ckpt") == 12  # later saves cleaned up

    # A save cut between moving the old checkpoint aside and the new one in (see the test
    # below): the strategy loads the one set aside.
    from lightning_phantom.strategy.storage import previous_path

    os.rename(ckpt / "step=12.ckpt", previous_path(ckpt / "step=12.ckpt"))
    for got, want in zip(run_ranks(2, job, steps=12, resume=str(ckpt / "step=12.ckpt")), uninterrupted):
        assert got["step"] == 12 and got["losses"] == []
        assert all(torch.equal(got["state"][k], v) for k, v in want["state"].items())


def test_publish_replaces_whole_and_a_cut_between_renames_keeps_the_previous(tmp_path, monkeypatch):
    from lightning_phantom.strategy import storage

    path = tmp_path / "last.ckpt"

    def write(version: str) -> Path:
        staging = storage.staging_path(path)
        staging.mkdir()
        (staging / "meta.pt").write_text(version)
        return staging

    for version in ("v1", "v2"):  # RENAME_EXCHANGE here (Linux, ext4): one atomic swap
        storage.publish(write(version), path)
        assert (path / "meta.pt").read_text() == version
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    # Where the swap is not supported: old aside, new in. Power cut between the two renames.
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def cut(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("power cut")
        rename(a, b)

    monkeypatch.setattr(os, "rename", cut)
    staging = write("v3")
    with pytest.raises(OSError, match="power cut"):
        storage.publish(staging, path)
    monkeypatch.setattr(os, "rename", rename)
    previous = storage.previous_path(path)
    assert not path.exists() and (previous / "meta.pt").read_text() == "v2"  # the whole one, aside
    assert (staging / "meta.pt").read_text() == "v3"
    storage.publish(staging, path)  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (path / "meta.pt").read_text() == "v3"


# --------------------------------------------------------- several nodes, lost node
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """2 nodes × 2 processes (torchrun, static rendezvous on 127.0.0.1), SGD, default layout: data(2) × phantom(2)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    port = free_port()
    args = ["--devices", "2", "--num-nodes", "2", "--phantom", "auto", "--optimizer", "sgd", "--lr", "0.1",
            "--steps", "6", "--ckpt-dir", str(tmp / "ckpt"), "--every", "3", "--probe", "--out", str(tmp / "two")]
    nodes = [Program([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(n), "--master-addr",
                      "127.0.0.1", "--master-port", str(port), str(SCRIPT), *args], tmp / f"node{n}.log")
             for n in (0, 1)]
    try:
        for node in nodes:
            assert node.wait(timeout=DEADLINE) == 0, node.output()[-3000:]
    finally:
        for node in nodes:
            node.kill()
    return tmp


def test_two_nodes_keep_phantom_groups_inside_a_node_by_default(two_nodes):
    """Both sizes on 'auto': phantom = processes per node, data = nodes (Lightning's ModelParallelStrategy)."""
    for node in (0, 1):
        lines = re.findall(r"^rank (\d) node (\d) phantom group \[([\d, ]+)\] layout (.*)$",
                           (two_nodes / f"node{node}.log").read_text(), re.MULTILINE)
        assert sorted(int(rank) for rank, *_ in lines) == [2 * node, 2 * node + 1]
        for rank, node_rank, group, layout in lines:
            assert int(node_rank) == node and layout == "data(2) × phantom(2) = 4 ranks"
            assert [int(r) for r in group.split(",")] == [2 * node, 2 * node + 1]


def test_two_nodes_train_like_one_node_of_four(programs, tmp_path, two_nodes):
    one = programs(["--devices", "4", "--phantom", "2", "--optimizer", "sgd", "--lr", "0.1", "--steps", "6",
                    "--probe", "--out", str(tmp_path / "one")], tmp_path / "one.log",
                   launcher=[TORCHRUN, "--nproc-per-node", "4", "--master-port", str(free_port())])
    assert one.wait(timeout=DEADLINE) == 0, one.output()[-3000:]
    two, single = results(two_nodes / "two", 4), results(tmp_path / "one", 4)
    assert [r["rank"] for r in two] == [0, 1, 2, 3]
    assert_same_weights(two, single)
    for a, b in zip(two, single):
        assert a["losses"] == b["losses"] and len(a["losses"]) == 6
    assert two[0]["losses"] != two[2]["losses"]  # the two replicas (one per node) saw different data
    assert not torch.equal(two[0]["state"]["net.2.compress"], two[1]["state"]["net.2.compress"])  # shards


def resume_resharded(checkpoint: str):
    return job(devices=2, phantom=1, optimizer="sgd", lr=0.1, steps=6, resume=checkpoint, probe=True)


def test_lost_node_reshard_to_fewer_ranks_and_continue(tmp_path, two_nodes):
    """After losing a node: merge each phantom group's 2 shards into 1 and go on with data(2) × phantom(1)."""
    src, dst = two_nodes / "ckpt" / "step=3.ckpt", tmp_path / "step=3-p1.ckpt"
    with pytest.raises(ValueError, match="merge must be a positive divisor of 2"):
        lp.reshard_checkpoint(src, dst, 3)
    ghosts = lp.reshard_checkpoint(src, dst, 2)
    assert ghosts == {"net": [8]}  # 2 ranks × 4 ghosts: k' = m·k
    meta = torch.load(dst / "meta.pt", weights_only=True)
    assert meta["phantom"]["phantom_parallel"] == 1 and meta["global_step"] == 3
    keys = set(FileSystemReader(str(dst)).read_metadata().state_dict_metadata)
    assert "model::net.2.weight" in keys and not any("|phantom" in k or "optimizer" in k for k in keys)

    before = results(two_nodes / "two", 4)
    after = run_ranks(2, resume_resharded, str(dst))
    for rank, got in enumerate(after):
        was = before[2 * rank]  # new rank r is data replica r, as old ranks 2r and 2r+1 were
        assert got["step"] == 6 and len(got["losses"]) == 3
        # Right after resuming the merged model computes what the 2-rank shards did at step 3 ...
        assert torch.allclose(got["outputs"][3], was["outputs"][3], rtol=1e-5, atol=1e-6)
        # ... so the first step on the same batch has the same loss; then the merged dense
        # blocks (more free parameters than D·C) take their own path.
        assert got["losses"][0] == pytest.approx(was["losses"][3], rel=1e-5)
        assert all(torch.isfinite(torch.tensor(got["losses"])))

