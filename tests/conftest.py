"""Distributed test harness: persistent pools of gloo ranks.

Spawning p processes and importing torch + Lightning in each costs ~10 s on this 2-core
machine, so every world size gets one pool for the whole session. A test sends a
module-level function to all ranks with ``run_ranks(p, fn, *args)`` and gets back the
list of per-rank return values. The workers look like torchrun children (RANK,
LOCAL_RANK, TORCHELASTIC_RUN_ID, ...), so a Lightning ``Trainer`` created inside one uses
the already initialised process group instead of launching new processes.

A failure on any rank is re-raised in the test with that rank's traceback; a rank that
does not answer in time gets the whole pool killed (and rebuilt on next use), so a bug
that deadlocks a collective fails one test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from pathlib import Path

import pytest

# The tests test this checkout, in this process and in every process they start (the app, the
# examples, the rank pools), whatever lightning_phantom is installed: an installed wheel or an
# editable install of another checkout would otherwise be what a subprocess imports.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

_POOLS: dict[int, "RankPool"] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "NODE_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "TORCHELASTIC_RUN_ID": f"tests-{port}",
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = tasks.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            value = fn(*args, **kwargs)
            # A dispatch mode (CommCounter, a FLOP counter) left entered would change every later
            # test run in this pool (torch.compile refuses to trace under one): fail the test that leaked it.
            leaked = torch._C._len_torch_dispatch_stack()
            if leaked:
                while torch._C._len_torch_dispatch_stack():
                    torch._C._pop_torch_dispatch_stack(None)
                raise RuntimeError(f"{fn.__name__} returned with {leaked} TorchDispatchMode(s) still entered")
            results.put((rank, True, value))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        port = _free_port()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 180.0, **kwargs) -> list:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, object] = {}
        errors: list[str] = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(self.world_size)) - set(out))} gave no answer in "
                    f"{timeout:.0f} s (deadlock?); the pool was killed"
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                # The other ranks may be stuck in a collective with the failed one.
                self.kill()
                raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        _POOLS.pop(self.world_size, None)

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self.kill()


def run_ranks(world_size: int, fn, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on every rank of a gloo group of ``world_size``; return per-rank results."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool.run(fn, *args, timeout=timeout, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def _close_pools():
    yield
    for pool in list(_POOLS.values()):
        pool.close()
