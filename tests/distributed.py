"""Run a function on several ranks in fresh processes (what ``torchrun`` does): gloo on CPUs, or NCCL.

``spawn(fn, world, *args)`` starts ``world`` processes, initializes a gloo process group in each and
calls ``fn(group, *args)`` there with ``group = torch.distributed.group.WORLD``; it returns each rank's
result in rank order (anything :func:`torch.save` takes). ``backend="nccl"`` initializes NCCL instead,
rank ``r`` on CUDA device ``r % torch.cuda.device_count()`` (its current device): one GPU takes a world of
1, whose collectives already apply NCCL's rules (CUDA tensors only). ``fn`` must be a module-level
function of an importable module (the processes are spawned, not forked). A process costs a Python start
and the imports (a few seconds): put several checks in one ``fn``.
"""

from __future__ import annotations

import datetime
import gc
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _main(
    rank: int, world: int, init: str, out: str, backend: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        result = fn(dist.group.WORLD, *args)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        gc.collect()  # objects in reference cycles (an exception's frames) holding the group, freed now
        dist.destroy_process_group()
    # no interpreter teardown: a gloo group's threads destroyed there abort the process at random ("terminate
    # called without an active exception", SIGABRT; 1 in ~8 runs of the distributed tests)
    os._exit(0)


def spawn(
    fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo", timeout: float | None = None
) -> list[Any]:
    """``fn(group, *args)`` on each of ``world`` ranks of ``backend`` (``"gloo"`` or ``"nccl"``); the
    results in rank order. ``timeout``: seconds after which the ranks still running are killed and a
    ``TimeoutError`` raised (a rank left waiting at a collective fails the test then, rather than at the
    group's timeout or never); ``None``: no limit."""
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "init")
        ranks = mp.start_processes(
            _main, args=(world, init, tmp, backend, fn, args), nprocs=world, start_method="spawn", join=False
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ranks.join(None if deadline is None else max(deadline - time.monotonic(), 0.0)):
            if deadline is not None and time.monotonic() >= deadline:
                for process in ranks.processes:  # the ranks this call started, by their process
                    if process.is_alive():
                        process.kill()
                    process.join()
                raise TimeoutError(f"spawn: the {world} ranks of {fn.__name__} ran past {timeout} s")
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]


def outcomes(group: Any, runs: tuple[Callable[[], Any], ...]) -> tuple[list[list[str]], list[float]]:
    """Each of ``runs`` on this rank, then every rank's outcome of it (``"went through"`` or the error's
    type and message), gathered on ``group`` (a later collective, which a rank left waiting at the run's
    own would mismatch: the failed rank stays in the group), and this rank's seconds for each."""
    import steerdiff as sd  # the harness itself runs without it

    said, seconds = [], []
    for run in runs:
        start = time.monotonic()
        try:
            run()
            outcome = "went through"
        except (ValueError, KeyError, RuntimeError, sd.NonFiniteError, KeyboardInterrupt) as e:
            outcome = f"{type(e).__name__}: {e}"
        seconds.append(time.monotonic() - start)
        said.append(sd.distributed.ranks("test", group).gather_objects(outcome))
    return said, seconds
