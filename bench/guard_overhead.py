"""What the divergence guard costs a step: ``python bench/guard_overhead.py [--device cpu] [--repeats 200]``.

The guard (:meth:`steerdiff.solvers.base.Model.note_state`) adds to each step one reduction (``max |x|``), a
compare and, on the CPU, the read of that flag. Timed here against a whole ``sd.sample`` step with a free
network (the precomputed ``x0`` of the sample's shape, as ``steerdiff bench overhead``) on the same tensors,
in the same run, with the guard and without it (``Model.note_state`` stubbed): ``sample`` with DDIM, 20
steps, on ``steerdiff bench overhead``'s shapes (256x64 and 4x4x64x64, float32). Each timing is the minimum
over ``repeats`` (the machine may be shared: the minimum is the cost without preemption); the step's time is
``sample``'s per step (20 steps, set-up included), the guard's per call. On CUDA the clock is read after a
synchronize (the guard queues kernels; nothing is read)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

import steerdiff as sd
from steerdiff.solvers.base import Model, diverged_error


def best(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """The least wall time of ``fn()`` over ``repeats`` calls, seconds."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(1)
    proc, steps = sd.VP.scaled_linear(), 20
    print(f"divergence guard per step on {device} (1 torch thread), min of {args.repeats} runs\n")
    print("| shape | sample ddim, us / step | without the guard | guard, us / call | guard / step |")
    print("|---|---:|---:|---:|---:|")
    for shape in ((256, 64), (4, 4, 64, 64)):
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        out = torch.zeros_like(x_T)
        den = sd.Denoiser(lambda x, t, out=out: out, proc, "x0", shape=shape[1:])
        run = partial(sd.sample, den, x_T, steps, "ddim", "karras")
        run()
        step = best(run, args.repeats, sync) / steps
        kept, Model.note_state = Model.note_state, lambda *_, **__: None  # type: ignore[method-assign]
        try:  # the same step without the guard
            bare = best(run, args.repeats, sync) / steps
        finally:
            Model.note_state = kept  # type: ignore[method-assign]
        model = Model(den, scale=float(x_T.abs().max()))
        error = partial(diverged_error, who="bench", fix="")

        guard = partial(model.note_state, x_T, 0, 0.5, 0.7, 0.7, error)
        guard()
        per = best(guard, args.repeats, sync)
        name = "x".join(map(str, shape))
        print(f"| {name} | {step * 1e6:.1f} | {bare * 1e6:.1f} | {per * 1e6:.1f} | {per / step:.2f} |")


if __name__ == "__main__":
    main()
