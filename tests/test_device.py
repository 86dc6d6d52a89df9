"""What DESIGN promises of an accelerator, checked on the ``meta`` device standing in for one: no
host-to-device copy and no host read per step (each is a sync on CUDA), and nothing cached under
``torch.inference_mode`` that a later autograd run cannot use."""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import steerdiff as sd
from steerdiff.distributed.group import Ranks

_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal"}


class _HostValues(TorchFunctionMode):
    """Counts tensors made on ``meta`` from host values (``torch.tensor(v, device=...)``: a copy on an
    accelerator, which never reaches ``meta``'s dispatch)."""

    def __init__(self, count: collections.Counter[str]) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        device = kwargs.get("device")
        made = func in (torch.tensor, torch.as_tensor, torch.asarray) and device is not None
        if made and torch.device(device).type == "meta" and not isinstance(args[0], torch.Tensor):
            self.count["copy"] += 1
        return func(*args, **kwargs)


class _Syncs(TorchDispatchMode):
    """Counts copies from the host to ``meta`` and reads of ``meta`` tensors on the host (faked: a
    read returns a value that passes every check, a copy to the host zeros, or ``flags`` for booleans:
    default ones)."""

    def __init__(self, flags: bool = True) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()
        self._host = _HostValues(self.count)
        self.flags = flags

    def __enter__(self) -> _Syncs:
        self._host.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._host.__exit__(*exc)

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
                ones = dtype == torch.bool and self.flags
                return (torch.ones if ones else torch.zeros)(tensors[0].shape, dtype=dtype)
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


def _steered_runs() -> dict[str, Callable[[sd.Denoiser, torch.Tensor, int], object]]:
    """Guided, corrected and particle runs ``run(den, x_T, steps)`` on ``meta``; operators and
    observations on the CPU (moved once per run), rewards and classifiers computing on the samples."""
    A, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    mask = (torch.arange(8) % 2).double()
    reward = lambda x: x.sum(-1)  # noqa: E731
    classifier = lambda x, t: x.sum(-1)  # noqa: E731
    gaussian = lambda x: -0.5 * x.pow(2).sum(-1)  # noqa: E731  (MonteCarloDenoiser's target)
    smc = {"shape": (2, 8), "particles": 4, "device": "meta"}
    g = sd.guidance
    return {
        "cfg": lambda den, x, n: sd.sample(g.CFG(den, den, 3.0), x, n, "dpmpp_2m"),
        "classifier": lambda den, x, n: sd.sample(g.ClassifierGuidance(den, classifier), x, n, "ddpm"),
        "dps": lambda den, x, n: sd.sample(g.DPS(den, sd.inverse.Matrix(A), y, noise_std=0.1), x, n, "ddpm"),
        "pigdm": lambda den, x, n: sd.sample(
            g.PiGDM(den, sd.inverse.Matrix(A), y, noise_std=0.1), x, n, "ddim"
        ),
        "repaint": lambda den, x, n: g.repaint_sample(den, sd.inverse.Inpaint(mask), y[:1].repeat(4), x, n),
        "pcg": lambda den, x, n: g.pcg(den, den, x, n, 2.0),
        "ula": lambda den, x, n: sd.sample(den, x, n, "ddpm", corrector="ula"),
        "time_shift": lambda den, x, n: sd.sample(g.TimeShift(den, window=10), x, n, "dpmpp_2m"),
        "fk_steering": lambda den, x, n: sd.smc.fk_steering(den, reward, lam=2.0, steps=n, **smc),
        "tds": lambda den, x, n: sd.smc.tds(den, sd.inverse.Matrix(A), y, noise_std=0.3, steps=n, **smc),
        "tds_classifier": lambda den, x, n: sd.smc.tds(den, classifier=classifier, steps=n, **smc),
        "svdd": lambda den, x, n: sd.smc.svdd(den, reward, 0.5, steps=n, **smc),
        "fkc_cfg": lambda den, x, n: sd.smc.fkc_cfg(den, den, 2.0, steps=n, **smc),
        "psi_sampler": lambda den, x, n: sd.smc.psi_sampler(den, reward, 2.0, steps=n, mcmc_steps=2, **smc),
        "ddpm_invert": lambda den, x, n: sd.ddpm_invert(den, x, n),
        "eta_invert": lambda den, x, n: sd.eta_invert(den, x, n, eta=(0.2, 0.4)),
        "monte_carlo": lambda den, x, n: sd.sample(
            sd.mcmc.MonteCarloDenoiser(gaussian, den.process, (8,), samples=4), x, n, "ddpm"
        ),
        "monte_carlo_langevin": lambda den, x, n: sd.sample(
            sd.mcmc.MonteCarloDenoiser(gaussian, den.process, (8,), 4, "langevin", inner=2, step_size=0.1),
            x,
            n,
            "ddpm",
        ),
    }


@pytest.mark.parametrize("name", list(_steered_runs()))
def test_steered_runs_no_sync_per_step(name):
    """Guidance, correctors and particle methods: the same copies and reads at 6 and 12 steps (TDS put a
    host value on the device twice per step, ``torch.tensor(std, device=...)``: found on an H100 by
    ``tests/test_cuda.py``; MonteCarloDenoiser read its log_prob's NaN check at every call; TimeShift made its
    window's times and noise levels on the host and copied them over at every shifted call: 9 copies at 6
    steps, 18 at 12)."""
    net = torch.nn.Linear(8, 8, device="meta").requires_grad_(False)
    den = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")
    run, x_T = _steered_runs()[name], torch.randn(4, 8, device="meta")
    with _Syncs():  # the copies made once per device (VP.discrete's table for per-row times: TimeShift's)
        run(den, x_T, 3)
    counts = []
    for steps in (6, 12):
        with _Syncs() as mode:
            run(den, x_T, steps)
        counts.append(mode.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("label", [3, None])
def test_digits_model_no_sync_per_step(label):
    """The embedded digits model on an accelerator: an int label is checked on the host and filled on the
    device (it was copied over and read back at every call: two syncs per step)."""
    den = sd.toy.digits.load_digits_denoiser()
    den.net.to("meta")
    x_T = torch.randn(4, 1, 8, 8, device="meta")
    counts = []
    for steps in (6, 12):
        with _Syncs() as mode:
            sd.sample(den, x_T, steps, label=label)
        counts.append(mode.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("name", ["fk_steering", "svdd"])
def test_spread_particle_runs_no_sync_per_step(name, monkeypatch):
    """``group=`` off the CPU (NCCL's case) adds no copy or read per step: one rank stands in for the group
    (``meta`` has no collectives: its all_gather is a no-op there). ``_Run.gather`` put its net flags
    ``[inf, 0, 0]`` on the device at every gather: 16 copies at 6 steps, 28 at 12 (now 3 at both)."""
    sentinel = object()  # the group: only its presence is read off the CPU
    monkeypatch.setattr(sd.smc.particles, "particle_ranks", lambda who, group, n: Ranks(0, 1, sentinel))
    # the set-up's all_reduce (the flags, the generators' digest; meta has no RNG state): once, not per step
    monkeypatch.setattr(Ranks, "start", lambda self, who, generator, device: None)
    monkeypatch.setattr(torch.distributed, "all_gather", lambda parts, x, group=None: None)
    net = torch.nn.Linear(8, 8, device="meta").requires_grad_(False)
    den = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")
    smc = {"shape": (2, 8), "particles": 4, "device": "meta", "group": sentinel}
    reward = lambda x: x.sum(-1)  # noqa: E731
    runs = {
        "fk_steering": lambda n: sd.smc.fk_steering(den, reward, 2.0, steps=n, ess_threshold=0.5, **smc),
        "svdd": lambda n: sd.smc.svdd(den, reward, 0.5, steps=n, **smc),
    }
    counts = []
    for steps in (6, 12):
        # the final gather reads the flags, which meta fakes as 0.5 (a non-finite output at "step 0.5")
        with _Syncs() as mode, pytest.raises(sd.NonFiniteError, match=r"at step 0 "):
            runs[name](steps)
        counts.append(mode.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_one_read_and_one_copy_per_attempt(order):
    """The adaptive DPM-Solver reads the rows' errors once per attempt, its decision (the calls' finiteness
    flags in the same read), and copies over once the attempt's rows, times and update weights, made on the
    host from that decision (while the device has no work queued). ``meta`` reads zeros: every ``E = 0``, so
    ``h_init`` past the end takes 1 attempt, ``h_init = 0.05`` 2 (then ``h = inf``). Was 2 reads and 14
    (order 2) / 20 (order 3) copies per attempt."""
    net = torch.nn.Linear(8, 8, device="meta")
    counts = []
    for h_init in (100.0, 0.05):
        den = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")  # no times cached
        with _Syncs() as mode:
            out, info = sd.solvers.dpm_adaptive(
                den, torch.randn(4, 8, device="meta"), order=order, h_init=h_init, return_info=True
            )
        assert out.is_meta and info.accepted == [1 if h_init > 1 else 2] * 4 and info.rejected == [0] * 4
        counts.append(mode.count)
    one, two = counts
    assert (two["read"] - one["read"], two["copy"] - one["copy"]) == (1, 1), counts


@pytest.mark.parametrize("order", [2, 3])
def test_time_shift_under_dpm_adaptive_adds_no_sync_per_call(order):
    """``TimeShift`` at the adaptive DPM-Solver's per-row times (a float64 tensor on the device): its
    window's times and noise levels made there, so an attempt costs what it costs without it, one read and
    one copy (as in the test above). It read the times back to the host and copied the candidates, their
    noise levels and the times over at every call: 3 reads and 7 copies per attempt at order 2, 4 and 10
    at order 3."""
    net = torch.nn.Linear(8, 8, device="meta")
    counts = []
    for h_init in (100.0, 0.05):
        base = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")
        den = sd.guidance.TimeShift(base, window=10)
        with _Syncs() as mode:
            out, info = sd.solvers.dpm_adaptive(
                den, torch.randn(4, 8, device="meta"), order=order, h_init=h_init, return_info=True
            )
        assert out.is_meta and info.accepted == [1 if h_init > 1 else 2] * 4
        counts.append(mode.count)
    one, two = counts
    assert (two["read"] - one["read"], two["copy"] - one["copy"]) == (1, 1), counts


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "heun"])
def test_paradigms_one_read_per_iteration(solver):
    """ParaDiGMS's steady state: one read per Picard iteration (its convergence and NaN flags, which
    ``meta`` reads as all ``False``: every window converged, each iteration slides by the window) and no
    copy; the grid's times and tolerances go over once per run. Its rows' times were made on the host at
    every iteration (5 copies through the denoiser's net time and coefficients, 1 for the tolerances: 6
    per iteration; Heun's 2 calls and its first non-finite stage's indices, 15)."""
    net = torch.nn.Linear(8, 8, device="meta")
    counts, iterations = [], []
    for steps in (6, 12):
        den = sd.Denoiser(lambda x, t: net(x) * t[:, None], sd.VP.scaled_linear(), "eps")
        with _Syncs(flags=False) as mode:
            out, info = sd.paradigms(
                den, torch.randn(4, 8, device="meta"), steps, solver, window=2, return_info=True
            )
        assert out.is_meta and info.strides == [2] * (steps // 2)
        counts.append(mode.count)
        iterations.append(info.iterations)
    one, two = counts
    assert (two["read"] - one["read"], two["copy"] - one["copy"]) == (iterations[1] - iterations[0], 0), (
        counts
    )
    assert one["copy"] <= 2, one
