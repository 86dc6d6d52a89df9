"""What DESIGN promises of an accelerator, checked on the ``meta`` device standing in for one: no
host-to-device copy and no host read per step (each is a sync on CUDA), and nothing cached under
``torch.inference_mode`` that a later autograd run cannot use."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steerdiff as sd

_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal"}


class _Syncs(TorchDispatchMode):
    """Counts copies from the host to ``meta`` and reads of ``meta`` tensors on the host (faked: a
    read returns a value that passes every check, a copy to the host zeros / ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_meta = any(t.is_meta for t in tensors)
        if on_meta and name in _READS:
            self.count["read"] += 1
            src = tensors[0]
            if name == "nonzero":
                return torch.zeros((0, src.ndim), dtype=torch.long, device="meta")
            return True if src.dtype == torch.bool or name != "_local_scalar_dense" else 0.5
        device = kwargs.get("device")
        if name == "_to_copy" and device is not None:
            if on_meta and torch.device(device).type == "cpu":
                self.count["read"] += 1
                dtype = kwargs.get("dtype") or tensors[0].dtype
                return (torch.ones if dtype == torch.bool else torch.zeros)(tensors[0].shape, dtype=dtype)
            if not on_meta and torch.device(device).type == "meta":
                self.count["copy"] += 1
        return func(*args, **kwargs)


def _syncs(solver: str, steps: int, generator: list[torch.Generator] | None = None) -> collections.Counter:
    net = torch.nn.Linear(8, 8, device="meta")
    den = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")
    with _Syncs() as mode:
        out = sd.sample(den, torch.randn(4, 8, device="meta"), steps, solver=solver, generator=generator)
    assert out.is_meta
    return mode.count


@pytest.mark.parametrize("solver", sd.solvers.available())
def test_no_sync_per_step(solver):
    """The same number of copies and reads at 6 and 12 steps: none in the loop (the x_T and NaN checks
    are the run's)."""
    few, many = _syncs(solver, 6), _syncs(solver, 12)
    assert few == many, (few, many)
    assert few["copy"] <= 2 and few["read"] <= 2, few


def test_per_row_cpu_generators_copy_once_per_draw():
    """A CPU generator per row (diffusers' convention: the same numbers on any device): the rows are
    stacked on the host and copied once per draw, not once per row."""
    gens = lambda: [torch.Generator().manual_seed(b) for b in range(4)]  # noqa: E731
    few, many = _syncs("ddpm", 6, gens()), _syncs("ddpm", 12, gens())
    assert many["copy"] - few["copy"] == 6, (few, many)


class _TimeNet(torch.nn.Module):
    """An eps net whose time features are learned: ``t`` is saved for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.freq = torch.nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.sin(t[:, None] * self.freq / 1000)


def test_training_after_an_inference_mode_run():
    """A validation pass under ``inference_mode``, then a DRaFT-style backward through the sampler with
    the same denoiser: the gradients equal those of a fresh denoiser's run (cached net times used to be
    inference tensors that autograd refused)."""
    torch.manual_seed(0)
    net, x = _TimeNet(), torch.randn(4, 8)
    den = sd.Denoiser(net, sd.VP.scaled_linear(), "eps")

    def grads(d: sd.Denoiser) -> torch.Tensor:
        net.zero_grad()
        sd.sample(d, x, steps=5, solver="ddim").square().sum().backward()
        return net.freq.grad.clone()

    with torch.inference_mode():
        sd.sample(den, x, steps=5, solver="ddim")
    fresh = grads(sd.Denoiser(net, sd.VP.scaled_linear(), "eps"))
    assert fresh.abs().max() > 0
    torch.testing.assert_close(grads(den), fresh, rtol=0, atol=0)


def test_dps_after_an_inference_mode_use_of_its_operator(sd_process):
    """An operator first applied under ``inference_mode`` (its float32 copies cached), then DPS, which
    differentiates through it: the same samples as with a fresh operator."""
    blur = torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64)  # a float64 kernel, float32 samples
    x_T, y = torch.randn(3, 1, 2, 4), torch.randn(1, 2, 4)
    den = sd.Denoiser(lambda x, t: 0.1 * x, sd_process, "eps", shape=(1, 2, 4))

    def run(op: sd.inverse.LinearOperator) -> torch.Tensor:
        guided = sd.guidance.DPS(den, op, y, noise_std=0.1, scale=0.5)
        return sd.sample(guided, x_T, steps=4, solver="ddim")

    used = sd.inverse.Blur(blur, (1, 2, 4))
    with torch.inference_mode():
        used.forward(x_T)
    torch.testing.assert_close(run(used), run(sd.inverse.Blur(blur, (1, 2, 4))), rtol=0, atol=0)


def test_vp_discrete_takes_per_sample_times_on_the_samples_device():
    """``VP.discrete``'s lam table follows the time tensor (it indexed a CPU table with device indices)."""
    p = sd.VP.scaled_linear()
    t_cpu = torch.tensor([0.0, 10.5, 998.25], dtype=torch.float64)
    t = t_cpu.to("meta")
    for f in (p.alpha, p.sigma, p.lam, p._dlog_alpha):
        assert f(t).is_meta and f(t).shape == t.shape
    assert p.t_of_lam(p.lam(t_cpu).to("meta")).is_meta
