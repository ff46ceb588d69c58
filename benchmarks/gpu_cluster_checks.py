"""NCCL and dead-peer checks for the first session with GPUs; ``benchmarks/gpu.py`` calls ``run_checks``.

What a CPU run never takes: NCCL's collectives and its watchdog. Each check runs the training
program of the failure tests (``tests/scripts/train.py``) as a real job under ``torchrun``:

* ``nccl_training``: a short training under NCCL with ``TORCH_DISTRIBUTED_DEBUG=DETAIL``
  (torch then checks that every rank calls the same collectives with the same shapes, and
  says which one differs), in 16-mixed with a fused Adam, the app's defaults. Passes when every
  rank finishes, its losses are finite, and the ranks of a phantom group, which compute the
  same loss, agree on it.
* ``dead_peer``: the kill / hang scenario of ``tests/test_failures.py``: rank 1 is SIGKILLed
  or SIGSTOPped mid-training; the survivor must stop with the strategy's "a collective with
  the other ranks failed" message within the allowed time, not hang. Under NCCL it is the
  watchdog that notices, not a closed socket as with gloo.

NCCL refuses two ranks on one GPU, so a check that needs 2 ranks is skipped (with the reason)
on a machine with one. ``--dry-run`` runs the same on CPU with gloo; the tests run it.

    python benchmarks/gpu_cluster_checks.py [--dry-run] [--workdir DIR] [--timeout 30]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "train.py"
PEER_FAILED = r"PhantomStrategy: rank 0 of \d+ stopped at global step \d+: a collective with the other ranks failed"


@dataclass
class CheckResult:
    check: str
    ok: Optional[bool]  # None: skipped, ``detail`` says why
    seconds: float
    detail: str
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """Where the checks run: GPUs under NCCL, or (dry run) CPU processes under gloo."""

    accelerator: str
    ranks: int
    precision: str
    optimizer: str

    @classmethod
    def detect(cls, dry_run: bool) -> "Target":
        if dry_run:  # 16-mixed needs CUDA (the strategy refuses it on CPU): bf16-mixed stands in
            return cls("cpu", 2, "bf16-mixed", "fused-adam")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible: run on a GPU machine, or pass --dry-run for the CPU path")
        # train.py's FFN is 8 wide: a phantom group of 1, 2, 4 or 8 ranks.
        ranks = 1 << (min(torch.cuda.device_count(), 8).bit_length() - 1)
        return cls("gpu", ranks, "16-mixed", "fused-adam")


class _Job:
    """train.py in its own session, all output to one log; killed whole at the end.

    Launched by ``torchrun``, or (``torchrun=False``) by Lightning's own launcher, which, unlike
    torchrun's agent, does not end the survivors when a rank dies: as on another node, the
    survivor has only its collectives' errors and timeouts to notice.
    """

    def __init__(self, target: Target, args: list[str], log: Path, debug: bool = False,
                 torchrun: bool = True) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if debug:
            env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(target.ranks), "--master-port",
                    str(_free_port())] if torchrun else []
        command = [sys.executable, *launcher, str(SCRIPT), "--devices", str(target.ranks),
                   "--accelerator", target.accelerator, *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> Optional[re.Match]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if match := re.search(pattern, self.output(), re.MULTILINE):
                return match
            time.sleep(0.1)
        return re.search(pattern, self.output(), re.MULTILINE)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_training(target: Target, workdir: Path, steps: int = 8, timeout: float = 300.0) -> CheckResult:
    """A short training under TORCH_DISTRIBUTED_DEBUG=DETAIL; every rank finishes with finite, agreeing losses."""
    start = time.monotonic()
    out = workdir / "train"
    job = _Job(target, ["--phantom", "auto", "--steps", str(steps), "--optimizer", target.optimizer,
                        "--precision", target.precision, "--out", str(out)], workdir / "train.log", debug=True)
    try:
        status = job.wait(timeout)
    finally:
        job.kill()
    seconds = time.monotonic() - start
    log = job.output()
    if status != 0:
        why = "did not finish in time" if status is None else f"exited with status {status}"
        return CheckResult("nccl_training", False, seconds, f"{why}; log tail:\n{log[-3000:]}")
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(target.ranks)]
    groups = re.findall(r"^rank (\d+) node \d+ phantom group \[([\d, ]+)\]", log, re.MULTILINE)
    problems = [f"rank {r['rank']} stopped at step {r['step']}" for r in results if r["step"] != steps]
    problems += [f"rank {r['rank']} has a non-finite loss" for r in results
                 if not all(math.isfinite(loss) for loss in r["losses"])]
    for rank, members in groups:  # a phantom group computes one loss: its ranks must agree
        first = int(members.split(",")[0])
        if results[int(rank)]["losses"] != results[first]["losses"]:
            problems.append(f"rank {rank}'s losses differ from rank {first}'s, in the same phantom group")
    facts = {"ranks": target.ranks, "precision": target.precision, "optimizer": target.optimizer,
             "final_loss": results[0]["losses"][-1] if results[0]["losses"] else None,
             "debug_detail": "TORCH_DISTRIBUTED_DEBUG=DETAIL"}
    return CheckResult("nccl_training", not problems, seconds, "; ".join(problems) or "all ranks agree", facts)


def dead_peer(target: Target, workdir: Path, how: str = "SIGKILL", timeout: float = 30.0) -> CheckResult:
    """Rank 1 killed (``SIGKILL``) or hung (``SIGSTOP``) mid-training: rank 0 must stop with the
    strategy's message within 2 × ``timeout`` + 30 s (a hang costs up to two timeouts)."""
    name = f"dead_peer_{how.lower()}"
    if target.ranks < 2:
        return CheckResult(name, None, 0.0, f"needs 2 ranks, this machine has {target.ranks} GPU: NCCL "
                                            "refuses two ranks on one GPU")
    start = time.monotonic()
    job = _Job(target, ["--phantom", "auto", "--steps", "100000", "--slow", "0.2", "--timeout", str(timeout),
                        "--optimizer", target.optimizer, "--precision", target.precision],
               workdir / f"{name}.log", torchrun=False)
    try:
        found = job.wait_for(r"^rank 1 pid (\d+) step 3 ", timeout=300)
        if found is None:
            return CheckResult(name, False, time.monotonic() - start,
                               f"rank 1 never reached step 3; log tail:\n{job.output()[-3000:]}")
        os.kill(int(found.group(1)), getattr(signal, how))
        hit = time.monotonic()
        status = job.wait(2 * timeout + 30)
        noticed = time.monotonic() - hit
    finally:
        job.kill()
    log = job.output()
    said = re.search(PEER_FAILED, log) is not None
    ok = status not in (None, 0) and said
    detail = (f"rank 0 stopped {noticed:.1f} s after rank 1 got {how}, with the strategy's message" if ok else
              f"status {status} after {noticed:.1f} s, strategy's message {'found' if said else 'missing'}; "
              f"log tail:\n{log[-3000:]}")
    return CheckResult(name, ok, time.monotonic() - start, detail,
                       {"noticed_after_s": round(noticed, 1), "timeout_s": timeout, "exit_status": status})


def run_checks(dry_run: bool = False, workdir: Optional[Path] = None, timeout: float = 30.0,
               hang: bool = True) -> list[CheckResult]:
    """Every check in turn (``hang=False`` leaves out the SIGSTOP one, the slowest)."""
    target = Target.detect(dry_run)
    with tempfile.TemporaryDirectory(prefix="gpu_cluster_checks_") as tmp:
        folder = Path(workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        checks = [nccl_training(target, folder), dead_peer(target, folder, "SIGKILL", timeout)]
        if hang:
            checks.append(dead_peer(target, folder, "SIGSTOP", timeout))
    return checks


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU processes under gloo instead of GPUs")
    parser.add_argument("--workdir", type=Path, help="keep logs and results here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=30.0, help="process-group timeout of the dead-peer runs")
    parser.add_argument("--no-hang", action="store_true", help="leave out the SIGSTOP (hung peer) check")
    args = parser.parse_args(argv)
    checks = run_checks(args.dry_run, args.workdir, args.timeout, hang=not args.no_hang)
    print(json.dumps([asdict(c) for c in checks], indent=2))
    return 0 if all(c.ok is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
