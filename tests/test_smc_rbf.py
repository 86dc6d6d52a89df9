"""Rollover Budget Forcing (``sd.smc.rbf``) against a per-row transcription of its rule, the base sampler,
best-of-N and SVDD at the same NFE, and exact NFE accounting.

The oracle: the 8-d test mixture (tests/reference.smooth_mixture) under VP-linear with the linear reward
``r(x) = b . x``, ``b = 1 / sqrt(8)`` (its data reward has mean -0.77, std 1.40), on the authors' grid: 10
time-uniform nodes 1.0, 0.9, ..., 0.1, then the jump to the clean end (their ``max_steps = 10``), so the last
node searched, t = 0.1, still has noise (sigma 0.36): on ``time_uniform`` the last noisy node is t_min, where
the last node's candidates, which get most of the budget, hardly differ.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerdiff as sd
from steerdiff.solvers import Model, Transition, make_grid

from .reference import assert_nan_named_alike_on_an_accelerator, smooth_mixture
from .test_guidance_cfg import counting

F64 = torch.float64
GMM = smooth_mixture()
B_VEC = torch.ones(GMM.dim, dtype=F64) / math.sqrt(GMM.dim)
VP = sd.VP.linear()
DEN = GMM.denoiser(VP)
NODES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
GRID = sd.schedules.Custom(NODES)
STEPS = len(NODES)


def reward(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1) @ B_VEC


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(n)]


def transcription(den, budget, initial, steps, schedule, final, seed):
    """One row of RBF, written out from the rule with scalar control (the module docstring): the sample, the
    network evaluations, the candidates per node, how many nodes ended on their quota and how many candidates
    beat the kept state's score but not the path's best (where a best lowered to the kept state's would have
    moved on)."""
    grid = make_grid(den.process, sd.schedules.get(schedule), steps, final)
    slv, g = sd.solvers.get("ddpm"), torch.Generator().manual_seed(seed)
    model = Model(den, {}, sd.noise.GeneratorNoise(g))
    last, nfe, drawn = steps - 1, 0, [0] * steps

    def candidate(mean, std, k):
        nonlocal nfe
        x = mean + std * torch.randn(GMM.dim, generator=g, dtype=F64)[None]
        before = model.nfe
        out = slv.step(model, x, k, grid, {})
        first = model.last  # ddpm evaluates once, at x
        nfe += model.nfe - before
        drawn[k] += 1
        tr = out if isinstance(out, Transition) else Transition(out, 0.0)
        return float(reward(first.x0)), tr, first.x0

    mean, std = torch.zeros(1, GMM.dim, dtype=F64), math.hypot(grid.alpha[0], grid.sigma[0])
    kept = max((candidate(mean, std, 0) for _ in range(initial)), key=lambda c: c[0])
    best, quota = kept[0], (budget - initial) // last
    carry = spent_out = held = 0
    for k in range(1, last):
        left, node_best = quota + carry, (-math.inf, None, None)
        carry = 0
        while left >= 1:
            c = candidate(kept[1].mean, kept[1].std, k)
            left -= 1
            node_best = max(node_best, c, key=lambda c: c[0])
            held += kept[0] < c[0] <= best
            if c[0] > best:
                carry = left
                break
        else:
            spent_out += 1
        kept, best = node_best, max(best, node_best[0])
    node_best = (-math.inf, None, None)
    while nfe < budget:
        node_best = max(node_best, candidate(kept[1].mean, kept[1].std, last), key=lambda c: c[0])
    if final == "none":  # the last step from the kept x_L: a draw of its transition
        tr = node_best[1]
        return tr.mean[0] + tr.std * torch.randn(GMM.dim, generator=g, dtype=F64), nfe, drawn, spent_out, held
    return node_best[2][0], nfe, drawn, spent_out, held


def test_the_rows_are_the_transcribed_rule():
    """Batched over rows at different nodes, each row is the scalar transcription's run, draw for draw. 16
    rows: with 4, the running best lowered to the kept state's score where a node ends on its quota (the rule
    says never) passed; here it changes 5 rows."""
    rows = 16
    out = sd.smc.rbf(DEN, reward, 22, shape=(rows, GMM.dim), initial=3, steps=STEPS, schedule=GRID, dtype=F64,
                     generator=gens(rows, 10))  # fmt: skip
    ended = held = 0
    for b in range(rows):
        x, nfe, drawn, spent_out, between = transcription(DEN, 22, 3, STEPS, GRID, "zero", 10 + b)
        assert torch.allclose(out.x[b, 0], x, rtol=0, atol=1e-12)
        assert int(out.row_nfe[b]) == nfe == 22 and out.candidates[b].tolist() == drawn
        ended, held = ended + spent_out, held + between
    assert ended > 0 and bool((out.candidates[:, 1:-1] > 2).any())  # both ends of a node (quota 2) were met
    assert held > 0  # candidates between the kept state's score and the path's best were met


def test_final_none_returns_a_draw_of_the_kept_states_transition():
    """``final="none"``: the sample is a draw of the last node's kept state's transition, not its mean, and
    ``reward`` is that draw's (neither was tested: the mean returned, or the search's score reported as the
    reward, passed)."""
    rows = 4
    out = sd.smc.rbf(DEN, reward, 30, shape=(rows, GMM.dim), initial=3, steps=STEPS - 1, schedule=GRID,
                     final="none", dtype=F64, generator=gens(rows, 10))  # fmt: skip
    for b in range(rows):
        x, nfe, drawn, _, _ = transcription(DEN, 30, 3, STEPS - 1, GRID, "none", 10 + b)
        assert torch.allclose(out.x[b, 0], x, rtol=0, atol=1e-12)
        assert int(out.row_nfe[b]) == nfe and out.candidates[b].tolist() == drawn
    torch.testing.assert_close(out.reward[:, 0], reward(out.x[:, 0]), rtol=0, atol=1e-12)


def test_the_smallest_budget_is_the_base_sampler_draw_for_draw():
    """One candidate per node (budget = steps, initial = 1): the DDPM run from the row's first draw (to 1e-13:
    the candidate is ``mean + std z``, the sampler's draw a fused add)."""
    out = sd.smc.rbf(DEN, reward, STEPS, shape=(3, GMM.dim), steps=STEPS, schedule=GRID, dtype=F64,
                     generator=gens(3))  # fmt: skip
    g = gens(3)
    x_T = torch.stack([torch.randn(GMM.dim, generator=gi, dtype=F64) for gi in g])
    base = sd.sample(DEN, x_T, STEPS, "ddpm", GRID, generator=g)
    assert torch.allclose(out.x[:, 0], base, rtol=0, atol=1e-13)  # mean + std z vs a fused add: rounding
    assert out.candidates.eq(1).all() and out.nfe == STEPS
    assert torch.allclose(out.reward[:, 0], reward(base), rtol=0, atol=1e-13)


def test_the_initial_candidates_are_the_noise_of_the_process():
    """Node 0's candidates are ``N(0, (alpha_0^2 + sigma_0^2) I)``, the initial noise of the process (EDM:
    ``sqrt(80^2 + 1)``): one candidate per node is the base sampler (``euler_ancestral``, Karras) from that
    noise. Only VP runs were tested, where the scale is 1 (a standard normal passed)."""
    den, steps = GMM.denoiser(sd.EDM()), 8
    kw = dict(steps=steps, schedule="karras", solver="euler_ancestral", dtype=F64)
    out = sd.smc.rbf(den, reward, steps, shape=(3, GMM.dim), generator=gens(3), **kw)
    g = gens(3)
    x_T = math.hypot(1.0, 80.0) * torch.stack([torch.randn(GMM.dim, generator=gi, dtype=F64) for gi in g])
    base = sd.sample(den, x_T, steps, "euler_ancestral", "karras", generator=g)
    assert torch.allclose(out.x[:, 0], base, rtol=0, atol=1e-12)


def test_reward_at_matched_nfe_against_best_of_n_and_svdd():
    """NFE 160 per row (16 candidates or particles per step; SVDD 145, its node 0 evaluating a row's one
    ``x_T`` once), 128 rows. Measured: rbf 1.933 +- 0.040, best-of-N 1.316 +- 0.046, SVDD (greedy, alpha =
    0) 3.024 +- 0.027 (2.996 +- 0.024 at 160, the 15 copies of x_T evaluated). RBF's intermediate nodes each
    end after about 2 candidates (a candidate beats the path's best about half the time: the denoised
    estimate's reward is near a martingale), so about 142 of the 160 evaluations roll over to the last node,
    whose candidates differ by their last step's noise alone."""
    rows, nfe = 128, 160
    kw = dict(shape=(rows, GMM.dim), steps=STEPS, schedule=GRID, dtype=F64)
    out = sd.smc.rbf(DEN, reward, nfe, generator=gens(rows, 1000), **kw)
    bon = sd.smc.best_of_n(DEN, reward, particles=nfe // STEPS, generator=gens(rows, 2000), **kw)
    sv = sd.smc.svdd(DEN, reward, 0.0, particles=nfe // STEPS, generator=gens(rows, 3000), **kw)
    assert out.nfe == bon.nfe == nfe and bool(out.row_nfe.eq(nfe).all())
    assert sv.nfe == nfe - (nfe // STEPS - 1)  # its node 0 evaluates a row's one x_T once: 15 fewer
    r_rbf = float(out.reward.mean())
    r_bon = float(bon.reward.max(1).values.mean())
    r_svdd = float(sv.reward.gather(1, sv.log_w.argmax(1, keepdim=True)).mean())
    assert r_rbf > r_bon + 0.3 and r_svdd > r_rbf + 0.6, (r_rbf, r_bon, r_svdd)
    assert (
        float(out.candidates[:, 1:-1].to(F64).mean()) < 3
        and float(out.candidates[:, -1].to(F64).mean()) > 120
    )


@pytest.mark.parametrize(
    ("solver", "final"), [("ddpm", "zero"), ("dpm_2_ancestral", "zero"), ("ddpm", "none")]
)
def test_nfe_is_exact_and_within_budget(solver, final):
    """row_nfe sums to the rows the net saw; a staged solver's candidates cost 2 (1 at the clean jump), so a
    budget it cannot spend whole is left short, never exceeded."""
    den, seen = counting(VP)
    out = sd.smc.rbf(den, lambda x: x.sum(-1), 29, shape=(3, 2), initial=2, steps=6, solver=solver,
                     final=final, schedule="time_uniform", dtype=F64, generator=gens(3))  # fmt: skip
    assert int(out.row_nfe.sum()) == sum(seen) and out.nfe == int(out.row_nfe.max())
    assert bool((out.row_nfe <= 29).all()) and bool((out.row_nfe >= 29 - 1).all())
    assert bool((out.candidates >= 1).all()) and bool(out.candidates[:, 0].eq(2).all())


def test_a_cost_that_varies_by_node_stays_within_budget():
    """A CFG guided only at low noise (sigma / alpha <= 1: nodes 0.4..0.1 here) costs 1 at node 0 and 2 at the
    nodes inside its interval: the search is planned at 2 per evaluation (CFG's cost before a call), so no
    row passes the budget (before: planned at the first call's 1, rows spent up to 21 / 41 / 42 / 78 of
    20 / 40 / 41 / 77)."""
    den, seen = counting(VP)
    cfg = sd.guidance.CFG(den, den, 3.0, uncond_kwargs={"y": 1}, interval=(0.0, 1.0))
    grid = make_grid(VP, GRID, STEPS, "zero")
    assert grid.sigma[0] / grid.alpha[0] > 1 and grid.sigma[9] / grid.alpha[9] <= 1
    for budget in (20, 40, 41, 77):
        seen.clear()
        out = sd.smc.rbf(cfg, lambda x: x.sum(-1), budget, shape=(6, 2), steps=STEPS, schedule=GRID,
                         dtype=F64, generator=gens(6))  # fmt: skip
        assert int(out.row_nfe.sum()) == sum(seen)
        assert bool((out.row_nfe <= budget).all()) and bool((out.row_nfe >= budget - 1).all())


def test_a_cost_that_grows_past_the_budget_is_refused():
    """A denoiser whose calls cost more than its first, so that a row would pass the budget: a ValueError,
    not a silent overspend."""

    class Growing(sd.Denoiser):
        calls = 0

        def __call__(self, x, t, /, **cond):
            self.calls += 1
            self.cost = 1 if self.calls == 1 else 3
            return super().__call__(x, t, **cond)

    den = Growing(DEN.net, VP, "x0")
    grew = r"rbf: den's cost per evaluation grew to 3 at node \d+, past the 1 the search was planned at"
    with pytest.raises(ValueError, match=grew):
        sd.smc.rbf(den, reward, 20, shape=(2, GMM.dim), steps=STEPS, schedule=GRID, dtype=F64,
                   generator=gens(2))  # fmt: skip


def test_a_row_is_its_own_search_whatever_the_batch():
    kw = dict(steps=STEPS, schedule=GRID, dtype=F64, initial=2)
    whole = sd.smc.rbf(DEN, reward, 50, shape=(4, GMM.dim), generator=gens(4, 7), **kw)
    for b in range(4):
        alone = sd.smc.rbf(DEN, reward, 50, shape=(1, GMM.dim), generator=gens(4, 7)[b : b + 1], **kw)
        assert torch.allclose(whole.x[b], alone.x[0], rtol=0, atol=1e-12)
        assert torch.equal(whole.candidates[b], alone.candidates[0])


def test_per_row_conditions_follow_the_rows_of_each_call():
    """A label per batch row reaches the net at that row's calls, whose rows change as rows move on at
    different times: each row of a batch is that row run alone with its label."""

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.8 * x) + 0.3 * y[:, None]

    den = sd.Denoiser(net, VP, "eps", shape=(2,))
    labels = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    kw = dict(steps=6, schedule="time_uniform", dtype=F64)
    whole = sd.smc.rbf(den, lambda x: x.sum(-1), 30, shape=(3, 2), generator=gens(3), y=labels, **kw)
    assert len(set(map(tuple, whole.candidates.tolist()))) == 3  # the rows' searches differ
    for b in range(3):
        alone = sd.smc.rbf(den, lambda x: x.sum(-1), 30, shape=(1, 2), generator=gens(3)[b : b + 1],
                           y=labels[b : b + 1], **kw)  # fmt: skip
        assert torch.allclose(whole.x[b], alone.x[0], rtol=0, atol=1e-12)
        assert torch.equal(whole.candidates[b], alone.candidates[0])


def test_the_vp_converted_flow_oracle_searches_as_the_vp_oracle():
    """The paper's setting: a rectified-flow model searched through its VP interpolant with ddpm. With the
    exact mixture the converted RF oracle is VP's exact denoiser (tests/test_reprocessed.py), so the search is
    the same run."""
    conv = sd.Reprocessed(GMM.denoiser(sd.RectifiedFlow()), VP)
    kw = dict(shape=(6, GMM.dim), steps=STEPS, schedule=GRID, dtype=F64)
    a = sd.smc.rbf(conv, reward, 60, generator=gens(6, 5), **kw)
    b = sd.smc.rbf(DEN, reward, 60, generator=gens(6, 5), **kw)
    assert torch.allclose(a.x, b.x, rtol=0, atol=1e-10) and torch.equal(a.candidates, b.candidates)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 9}, r"rbf: budget must be at least 10 network evaluations per row \(1 initial candidate"),
        ({"budget": 12, "initial": 4}, r"rbf: budget must be at least 13 network evaluations"),
        ({"budget": 0}, r"rbf: budget must be an integer >= 1"),
        ({"initial": 0}, r"rbf: initial must be an integer >= 1"),
        ({"solver": "ddim"}, r"rbf needs a stochastic solver"),
        (
            {"steps": 1},
            r"rbf: steps=1 with final='zero' is the jump into the clean end alone, .* take steps >= 2",
        ),
        (
            {"solver": "er_sde"},
            r"rbf: solver 'er_sde' keeps a per-trajectory history in its state, which a candidate",
        ),
        ({"solver": "dpmpp_sde"}, r"rbf draws candidates from the step's Gaussian transition, but solver"),
        ({"shape": (2, 3)}, r"rbf: shape has sample shape \(3,\)"),
        ({"reward": 3}, r"rbf: reward must be a callable"),
        ({"reward": lambda x: x}, r"rbf: reward must map a batch"),
        ({"reward": lambda x: x[:, 0] / 0}, r"rbf: reward returned NaN or inf"),
        ({"generator": gens(3)}, r"generator"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"reward": reward, "budget": 20, "shape": (2, GMM.dim), "steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=match):
        sd.smc.rbf(DEN, args.pop("reward"), args.pop("budget"), **args)


def main() -> None:
    """docs/particles.md's numbers: ``PYTHONPATH=src python -m tests.test_smc_rbf`` (128 rows, 10 steps on the
    authors' grid; a rectified-flow oracle searched with ``flow_sde`` on its own grid, from t_max = 0.999,
    and through its VP interpolant with ``ddpm`` at the same log-SNR nodes)."""
    torch.set_num_threads(1)
    rows = 128
    rf = sd.RectifiedFlow()
    flow = GMM.denoiser(rf)
    conv = sd.Reprocessed(flow, VP)
    rf_nodes = torch.tensor([0.99, *NODES[1:]], dtype=F64)
    cases = [
        ("VP oracle, ddpm", DEN, "ddpm", GRID),
        ("RF oracle, flow_sde", flow, "flow_sde", sd.schedules.Custom([rf.t_max, *NODES[1:]])),
        ("RF oracle as VP, ddpm", conv, "ddpm", sd.schedules.Custom(VP.t_of_lam(rf.lam(rf_nodes)))),
    ]

    def mean_se(r: torch.Tensor) -> str:
        return f"{float(r.mean()):.3f} +- {float(r.std()) / rows**0.5:.3f}"

    for name, den, solver, schedule in cases:
        for nfe in (40, 160, 640):
            kw = dict(shape=(rows, GMM.dim), steps=STEPS, solver=solver, schedule=schedule, dtype=F64)
            out = sd.smc.rbf(den, reward, nfe, generator=gens(rows, 1000), **kw)
            bon = sd.smc.best_of_n(den, reward, particles=nfe // STEPS, generator=gens(rows, 2000), **kw)
            sv = sd.smc.svdd(den, reward, 0.0, particles=nfe // STEPS, generator=gens(rows, 3000), **kw)
            r_bon = bon.reward.max(1).values
            r_svdd = sv.reward.gather(1, sv.log_w.argmax(1, keepdim=True))[:, 0]
            print(
                f"{name}, NFE {nfe}: rbf {mean_se(out.reward[:, 0])}, best_of_n {mean_se(r_bon)}, "
                f"svdd {mean_se(r_svdd)} (NFE {sv.nfe}: node 0 evaluates a row's one x_T once)"
            )


if __name__ == "__main__":
    main()


def _nan_at_call(k: int) -> sd.Denoiser:
    """A linear eps net whose ``k``-th call returns NaN."""
    calls = 0

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return 0.1 * x * (math.nan if calls == k else 1.0)

    return sd.Denoiser(net, VP, "eps")


def test_a_nan_from_the_net_is_the_nets_on_an_accelerator_too(monkeypatch):
    """The net's NaN at its 4th call names that evaluation's step on the CPU at once; on an accelerator
    (faked: tensors that are not CPU ones) the net's check is deferred, the reward sees the NaN first, and
    that raised "reward returned NaN" instead (found on an H200)."""
    run = lambda: sd.smc.rbf(_nan_at_call(4), reward, 16, shape=(2, 8), steps=8, dtype=F64)  # noqa: E731
    assert_nan_named_alike_on_an_accelerator(run, monkeypatch)
