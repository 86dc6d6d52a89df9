"""The ``steerdiff`` command line: the numbers it writes are the numbers the library gives.

``bench solvers`` runs with tiny settings (``--quick --batch 8``: NFE 5 and 10); every checked
entry is recomputed here from the public API and the test oracles (``exact_sample``,
``rel_rmse``, ``diffusers_sample``), not from the benchmark module.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import steerdiff as sd
from steerdiff.bench.solvers import (
    Problem,
    Row,
    decided_at,
    default_model,
    diffusers_configs,
    fifth_at,
    generator_for,
    ill_conditioned,
    initial_noise,
    make_problem,
    plot,
    switched,
)
from steerdiff.cli import main

from .reference import diffusers_sample, eps_net, exact_sample, rel_rmse, sd_betas_config

F64 = torch.float64
BATCH, SEED, DRAWS = 8, 3, 8


@pytest.fixture(scope="module")
def problem():
    """The benchmark's model and noise as documented: default mixture, SD betas, randn(B, 64)."""
    gmm, proc = sd.toy.default_benchmark_mixture(), sd.VP.scaled_linear()
    x_T = initial_noise(BATCH, 64, SEED)
    return gmm, proc, x_T, exact_sample(gmm, proc, x_T)


def _read(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(r["source"], r["method"], r["schedule"]): r for r in csv.DictReader(f)}


def _ours(problem, solver: str, schedule: str, steps: int) -> float:
    gmm, proc, x_T, ref = problem
    return rel_rmse(sd.sample(gmm.denoiser(proc), x_T, steps=steps, solver=solver, schedule=schedule), ref)


def _bench(tmp_path: Path, capsys, *extra: str) -> tuple[dict, str]:
    argv = ["bench", "solvers", "--quick", "--batch", str(BATCH), "--seed", str(SEED), "--draws", str(DRAWS)]
    argv.append("--no-progress")
    assert main([*argv, "--out", str(tmp_path), *extra]) == 0
    return _read(tmp_path / "solvers.csv"), capsys.readouterr().out


def _mean_log(row: dict[str, str]) -> float:
    return sum(math.log(float(row[k])) for k in ("nfe_5", "nfe_10") if row[k]) / sum(
        1 for k in ("nfe_5", "nfe_10") if row[k]
    )


def test_bench_solvers_table_is_sd_sample(tmp_path, capsys, problem):
    rows, out = _bench(tmp_path, capsys, "--no-diffusers")
    deterministic = [n for n in sd.solvers.available() if not sd.solvers.get(n).stochastic]
    assert set(rows) == {
        ("steerdiff", s, k) for s, k in itertools.product(deterministic, sd.schedules.available())
    }
    # NFE, not steps: 10 steps of dpmpp_2m, 3 of Heun (2 * 3 - 1 = 5 NFE); Heun never costs 10
    for solver, schedule, nfe, steps in [
        ("dpmpp_2m", "karras", 10, 10),
        ("ddim", "time_uniform", 5, 5),
        ("heun", "logsnr_uniform", 5, 3),
    ]:
        assert float(rows["steerdiff", solver, schedule][f"nfe_{nfe}"]) == pytest.approx(
            _ours(problem, solver, schedule, steps), rel=1e-12
        )
    assert rows["steerdiff", "heun", "karras"]["nfe_10"] == ""
    # a schedule with the same grid as another repeats its numbers and says so
    expo, lsnr = rows["steerdiff", "euler", "exponential"], rows["steerdiff", "euler", "logsnr_uniform"]
    assert (expo["same_as"], lsnr["same_as"]) in {("logsnr_uniform", ""), ("", "exponential")}
    assert expo["nfe_10"] == lsnr["nfe_10"]
    # the printed line of a solver shows its best schedule (mean log error) and its errors
    # (a schedule that refuses the process, vp on SD's betas, has no number: no candidate)
    cands = [
        r
        for r in rows.values()
        if r["method"] == "dpmpp_2m" and not r["same_as"] and (r["nfe_5"] or r["nfe_10"])
    ]
    best = min(cands, key=_mean_log)
    line = next(ln for ln in out.splitlines() if ln.startswith("dpmpp_2m "))
    assert line.split() == [
        "dpmpp_2m",
        best["schedule"],
        *(f"{float(best[k]):.2e}" for k in ("nfe_5", "nfe_10")),
    ]
    assert "(a)" not in out
    # the printed report is kept beside the CSV (the numbers docs/benchmarks.md quotes)
    report = (tmp_path / "solvers.txt").read_text()
    assert report.startswith("Relative RMSE vs the exact sample") and report in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "solvers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_switched_flags_samples_in_another_component(problem):
    gmm, proc, x_T, ref = problem
    comp = gmm.log_responsibilities(ref).argmax(-1)
    x = ref.clone()
    x[2] = gmm.means[(comp[2] + 1) % gmm.weights.numel()]  # moved to the next component's mean
    x[5] = ref[5] + 1e-3  # a small error in the same component
    flags = switched(Problem(gmm, proc, x_T, ref), x)
    assert flags.tolist() == [i == 2 for i in range(BATCH)]


def test_ill_conditioned_flags_x_T_near_a_basin_boundary():
    """Two isotropic components at (+-2, 0): by symmetry the exact flow keeps the sign of x_1, so
    x_T = (1e-3, 1) changes component under 1% perturbations and (1, 0.5), (-1, -0.3) do not."""
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64), torch.full((2, 2), 0.1, dtype=F64), torch.ones(2)
    )
    proc = sd.VP.scaled_linear()
    x_T = torch.tensor([[1e-3, 1.0], [1.0, 0.5], [-1.0, -0.3]], dtype=F64)
    problem = Problem(gmm, proc, x_T, exact_sample(gmm, proc, x_T))
    assert gmm.log_responsibilities(problem.ref).argmax(-1).tolist() == [1, 1, 0]
    assert ill_conditioned(problem).tolist() == [True, False, False]
    assert ill_conditioned(problem, eps=1e-4).tolist() == [False, False, False]


def test_ill_conditioned_directions_are_not_the_default_mixtures_means():
    """``bench solvers`` (a)'s perturbations of ``x_T`` come from a stream of their own: from
    ``Generator().manual_seed(0)`` the first 10 rows were the default mixture's means, and sample 0 of
    the benchmark's draw (seed 0) was flagged ill-conditioned only by its move toward component 8's
    mean (9th of its 16 directions); under 64 unrelated 1% moves its exact answer keeps its component."""
    problem = make_problem(1, 0)
    g = torch.Generator().manual_seed(0)
    means_first = torch.randn(16, 64, generator=g, dtype=F64)[:10]
    assert torch.equal(means_first, problem.gmm.means)  # the stream the directions used to come from
    assert ill_conditioned(problem).tolist() == [False]


def test_decided_at_finds_the_step_after_which_the_exact_flow_ends_in_the_wrong_component():
    """The two-component mixture above keeps the sign of x_1 along the exact flow, so the exact ODE
    from a state ends in the component its sign names: a sample is sent away by the first step after
    which every state has the final (wrong) sign."""
    gmm = sd.toy.GaussianMixture(
        torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64), torch.full((2, 2), 0.1, dtype=F64), torch.ones(2)
    )
    proc = sd.VP.scaled_linear()
    # signs of x_1 after steps 1, 2, 3; the final sample; the exact answer
    signs = torch.tensor(
        [
            [1, -1, -1, -1, 1],  # wrong from step 2 on
            [-1, 1, -1, -1, 1],  # wrong after step 1, right after step 2: sent away by step 3
            [-1, -1, -1, -1, -1],  # right all along: not switched
            [1, 1, 1, -1, 1],  # only the last step
            [-1, -1, -1, -1, 1],  # from step 1 on
            [-1, -1, -1, -1, -1],  # not switched
        ],
        dtype=F64,
    )
    point = lambda s: torch.stack([s * 0.7, torch.full_like(s, 0.4)], -1)  # noqa: E731
    states = [(t, point(signs[:, k])) for k, t in enumerate((800.0, 500.0, 200.0))]
    ref, x = 2 * point(signs[:, 4]), 2 * point(signs[:, 3])
    problem = Problem(gmm, proc, torch.zeros_like(ref), ref)
    assert decided_at(problem, states, x) == [2, 3, 4, 1]
    assert decided_at(problem, states, ref) == []


def test_fifth_at_walks_the_ladder_to_the_first_nfe_with_a_fifth_of_the_error(problem):
    """Against sd.sample's own squared error at 10 steps (ratio 1 there), the defaults need several
    rungs to cut the pooled error five-fold; each rung's ratio is recomputed from sd.sample."""
    gmm, proc, x_T, ref = problem
    draws = [Problem(gmm, proc, x_T, ref), Problem(gmm, proc, x_T[:4], ref[:4])]

    def squared(steps: int) -> float:
        den = gmm.denoiser(proc)
        return sum(float(((sd.sample(den, d.x_T, steps=steps) - d.ref) ** 2).sum()) for d in draws)

    base = squared(10)
    out = fifth_at(draws, base, 10)
    assert len(out) >= 2 and [n for n, _ in out] == [12, 15, 20, 25, 30, 40, 50, 60, 80][: len(out)]
    for n, r in out:
        assert r == pytest.approx(math.sqrt(squared(n) / base), rel=1e-9)
    assert out[-1][1] <= 0.2 < min(r for _, r in out[:-1])
    # a target already met two rungs up stops there; one never met runs the whole ladder
    assert [n for n, _ in fifth_at(draws, squared(15) * 25.1, 10)] == [12, 15]
    assert [n for n, _ in fifth_at(draws, base * 1e-6, 10, (12, 15))] == [12, 15]


@pytest.mark.slow  # 10-17 s: in make test-slow, out of make test's default run
def test_bench_solvers_against_diffusers(tmp_path, capsys, problem):
    diffusers = pytest.importorskip("diffusers")
    gmm, proc, x_T, ref = problem
    rows, out = _bench(tmp_path, capsys)

    def theirs_sample(cls: str, steps: int, **cfg: object) -> torch.Tensor:
        return diffusers_sample(getattr(diffusers, cls)(**sd_betas_config(**cfg)), gmm, proc, x_T, steps)[0]

    def theirs(cls: str, steps: int, **cfg: object) -> float:
        return rel_rmse(theirs_sample(cls, steps, **cfg), ref)

    x_dpm = theirs_sample("DPMSolverMultistepScheduler", 10)
    dpm = rel_rmse(x_dpm, ref)
    assert float(rows["diffusers", "DPMSolverMultistep(order=2)", "linspace"]["nfe_10"]) == pytest.approx(
        dpm, rel=1e-12
    )
    # Heun: 3 steps are 5 network calls
    heun = rows["diffusers", "HeunDiscrete", "karras"]
    assert float(heun["nfe_5"]) == pytest.approx(
        theirs("HeunDiscreteScheduler", 3, use_karras_sigmas=True), rel=1e-12
    )
    assert heun["nfe_10"] == ""

    # (a): sd.sample with its defaults over diffusers' default DPM-Solver++ at NFE 10, then the
    # samples each sent to another mixture component and the errors over the rest
    x_ours = sd.sample(gmm.denoiser(proc), x_T, steps=10)
    ours = rel_rmse(x_ours, ref)
    part_a = out.split("(a)")[1].split("(b)")[0]
    # pooled with DRAWS - 1 more independent draws of x_T (seeds SEED + 1, ...)
    draws = [(x_T, ref)]
    for seed in range(SEED + 1, SEED + DRAWS):
        xs = initial_noise(BATCH, 64, seed)
        draws.append((xs, exact_sample(gmm, proc, xs)))

    def pooled_and_spread(ours_of, theirs_of) -> tuple[float, float, float]:
        """Pooled ratio of relative RMSEs over the draws, and its smallest and largest per draw."""
        sums = [
            (float(((ours_of(xs) - exact) ** 2).sum()), float(((theirs_of(xs) - exact) ** 2).sum()))
            for xs, exact in draws
        ]
        per_draw = [math.sqrt(a / b) for a, b in sums]
        return math.sqrt(sum(a for a, _ in sums) / sum(b for _, b in sums)), min(per_draw), max(per_draw)

    pooled, lo, hi = pooled_and_spread(
        lambda xs: sd.sample(gmm.denoiser(proc), xs, steps=10),
        lambda xs: diffusers_sample(
            diffusers.DPMSolverMultistepScheduler(**sd_betas_config()), gmm, proc, xs, 10
        )[0],
    )
    m = re.search(
        rf"NFE 10: (\S+) vs (\S+)  ratio (\S+); over {DRAWS} draws of (\d+): "
        r"pooled ratio (\S+), per draw (\S+) to (\S+)",
        part_a,
    )
    assert m is not None
    assert m.groups() == (
        f"{ours:.2e}",
        f"{dpm:.2e}",
        f"{ours / dpm:.3g}",
        str(BATCH),
        f"{pooled:.3g}",
        f"{lo:.3g}",
        f"{hi:.3g}",
    )

    def component(x: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(gmm.means, gmm.variances.sqrt())
        return (normal.log_prob(x[:, None, :]).sum(-1) + gmm.weights.log()).argmax(-1)

    sw_ours, sw_dpm = component(x_ours) != component(ref), component(x_dpm) != component(ref)
    keep = ~ill_conditioned(Problem(gmm, proc, x_T, ref))
    rest = rel_rmse(x_ours[keep], ref[keep]), rel_rmse(x_dpm[keep], ref[keep])
    m = re.search(
        r"component: (\d+) vs (\d+) of (\d+) \((\d+) vs (\d+) of them among the (\d+) ill-conditioned\)\s+"
        r"on the (\d+) others: (\S+) vs (\S+)  ratio (\S+)",
        part_a,
    )
    assert m is not None
    assert m.groups() == (
        str(int(sw_ours.sum())),
        str(int(sw_dpm.sum())),
        str(BATCH),
        str(int((sw_ours & ~keep).sum())),
        str(int((sw_dpm & ~keep).sum())),
        str(int((~keep).sum())),
        str(int(keep.sum())),
        f"{rest[0]:.2e}",
        f"{rest[1]:.2e}",
        f"{rest[0] / rest[1]:.3g}",
    )
    # where the switched samples of all the draws were sent away: totals, and sigma/alpha after steps
    # 1-3 of each grid (the per-step attribution is decided_at's, tested on its own)
    totals, dpm_squared = [0, 0], 0.0
    for xs, exact in draws:
        dpm_xs = diffusers_sample(
            diffusers.DPMSolverMultistepScheduler(**sd_betas_config()), gmm, proc, xs, 10
        )[0]
        dpm_squared += float(((dpm_xs - exact) ** 2).sum())
        for side, z in enumerate((sd.sample(gmm.denoiser(proc), xs, steps=10), dpm_xs)):
            totals[side] += int((component(z) != component(exact)).sum())
    ours_t = sd.schedules.get(sd.sampling.DEFAULT_SCHEDULE).nodes(proc, 10)[1:4].tolist()
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config())
    sched.set_timesteps(10)
    theirs_t = sched.timesteps[1:4].tolist()
    m = re.search(rf"over the {DRAWS} draws (\d+) vs (\d+) switched;.*\n\s+(.*)", part_a)
    assert m is not None and m.groups()[:2] == (str(totals[0]), str(totals[1]))
    steps = re.findall(r"step (\d) \(sigma/alpha (\S+) \| (\S+)\): (\d+) vs (\d+)", m.group(3))
    ratio = lambda t: f"{math.exp(-float(proc.lam(torch.tensor(float(t), dtype=F64)))):.3g}"  # noqa: E731
    assert [g[:3] for g in steps] == [
        (str(k), ratio(a), ratio(b)) for k, a, b in zip((1, 2, 3), ours_t, theirs_t, strict=True)
    ]
    later = re.search(r"later: (\d+) vs (\d+)$", m.group(3))
    assert later is not None
    for side in (0, 1):
        assert sum(int(g[3 + side]) for g in steps) + int(later.group(1 + side)) == totals[side]
    # the NFE at which sd.sample's defaults reach 1/5 of diffusers' error at NFE 10 over the draws:
    # pooled ratios on the ladder 12, 15, ..., 80 up to the first at most 0.2
    ladder: list[tuple[int, float]] = []
    for n in (12, 15, 20, 25, 30, 40, 50, 60, 80):
        ours_squared = sum(
            float(((sd.sample(gmm.denoiser(proc), xs, steps=n) - exact) ** 2).sum()) for xs, exact in draws
        )
        ladder.append((n, math.sqrt(ours_squared / dpm_squared)))
        if ladder[-1][1] <= 0.2:
            break
    head = f"takes sd.sample NFE {ladder[-1][0]}" if ladder[-1][1] <= 0.2 else "not reached by NFE 80"
    listed = ", ".join(f"{n}: {r:.3g}" for n, r in ladder)
    assert f"1/5 of diffusers' pooled error {head} (pooled ratio at NFE {listed})" in part_a

    # (b): best of all our rows over best of all diffusers rows, at each NFE, then both
    # configurations pooled over the same draws
    configs = {(c.method, c.schedule()): c for c in diffusers_configs()}
    for nfe in (5, 10):
        key = {
            src: min(
                (k for k, r in rows.items() if k[0] == src and r[f"nfe_{nfe}"] not in ("", "nan")),
                key=lambda k: float(rows[k][f"nfe_{nfe}"]),
            )
            for src in ("steerdiff", "diffusers")
        }
        best = {src: float(rows[k][f"nfe_{nfe}"]) for src, k in key.items()}
        m = re.search(
            rf"NFE +{nfe}: .* (\S+) vs .* (\S+)  ratio (\S+)\s+over {DRAWS} draws of {BATCH}: "
            r"pooled ratio (\S+), per draw (\S+) to (\S+)",
            out.split("(b)")[1],
        )
        assert m is not None
        _, solver, schedule = key["steerdiff"]
        steps = next(n for n in range(1, nfe + 1) if sd.solvers.get(solver).nfe(n) == nfe)
        config = configs[key["diffusers"][1:]]
        steps_theirs = next(
            n for n in range(1, nfe + 1) if diffusers_sample(config.make(), gmm, proc, x_T[:1], n)[1] == nfe
        )
        pooled, lo, hi = pooled_and_spread(
            lambda xs, solver=solver, schedule=schedule, steps=steps: sd.sample(
                gmm.denoiser(proc), xs, steps=steps, solver=solver, schedule=schedule
            ),
            lambda xs, config=config, steps=steps_theirs: diffusers_sample(
                config.make(), gmm, proc, xs, steps
            )[0],
        )
        assert m.groups() == (
            f"{best['steerdiff']:.2e}",
            f"{best['diffusers']:.2e}",
            f"{best['steerdiff'] / best['diffusers']:.3g}",
            f"{pooled:.3g}",
            f"{lo:.3g}",
            f"{hi:.3g}",
        )

    # (c): one timing line per pair whose solver is registered
    pairs = [
        ("dpmpp_2m", "DPMSolverMultistep"),
        ("unipc(order=2)", "UniPCMultistep"),  # diffusers' default UniPC is UniPC-2
        ("ddim", "DDIM"),
        ("euler", "EulerDiscrete"),
    ]
    timed = re.findall(r"^    (\S+) vs (\w+)Scheduler: (\d+) us vs (\d+) us", out.split("(c)")[1], re.M)
    registered = [p for p in pairs if p[0].split("(")[0] in sd.solvers.available()]
    assert [(a, b) for a, b, _, _ in timed] == registered
    assert all(int(a) > 0 and int(b) > 0 for _, _, a, b in timed)

    # (d), --quick: classifier-free guidance at scale 7.5 toward the mixture's first two components,
    # 10 steps; each sampler against the guided ODE solved in 800 DPM-Solver++(2M) steps; diffusers'
    # default DPM-Solver++ driven by a pipeline's guidance loop on the same exact nets
    part = sd.toy.GaussianMixture(gmm.means[:2], gmm.variances[:2], gmm.weights[:2])
    cond, uncond = part.denoiser(proc), gmm.denoiser(proc)
    cfg = sd.guidance.CFG(cond, uncond, 7.5)
    exact = sd.sample(cfg, x_T, 800, "dpmpp_2m", "logsnr_uniform")
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config())
    sched.set_timesteps(10)
    y = x_T.clone()
    for t in sched.timesteps:
        e_u, e_c = uncond(y, float(t)).eps, cond(y, float(t)).eps
        y = sched.step(e_u + 7.5 * (e_c - e_u), t, y).prev_sample
    row = re.search(r"^\s+7\.5\s+10\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out.split("(d)")[1], re.M)
    assert row is not None
    assert row.groups() == tuple(
        f"{rel_rmse(z, exact):.2e}"
        for z in (
            sd.sample(
                cfg, x_T, 10, sd.solvers.DPMSolverPPMultistep(max_h=0.8, max_h_ratio=0.0), "karras_capped"
            ),
            sd.sample(cfg, x_T, 10, "unipc", "karras_capped"),
            sd.sample(cfg, x_T, 10, "ddim", "karras_capped"),
            y,
        )
    )
    head = "sd.sample (dpmpp_2m, long steps first order; UniPC-2 on short steps and from 15)"
    assert head in out.split("(d)")[1]

    # (e), --quick: one draw at 10 steps under rectified flow; diffusers' FlowMatchEuler loop written
    # here (shift 1 and 3) with the exact velocity (x - E[x0 | x]) / s, each against the exact flow
    # from its own start
    flow = sd.RectifiedFlow()
    ours_flow = rel_rmse(sd.sample(gmm.denoiser(flow), x_T, 10), exact_sample(gmm, flow, x_T))
    from_1 = sd.RectifiedFlow(flow.t_min, 1 - 1e-12)  # the same flow, on a range that reaches s = 1
    exact_1 = gmm.reference_ode(x_T, from_1, from_1.t_max, flow.t_min, denoise=True)
    theirs_flow = []
    for shift in (1.0, 3.0):
        y = _flow_match_euler(lambda y, s: gmm.denoise(y, 1 - s, s), x_T, 10, shift)
        theirs_flow.append(rel_rmse(y, exact_1))
    m = re.search(
        r"pooled over 1 draws:\n    NFE 10: (\S+) vs (\S+) \(shift 1\), (\S+) \(shift 3\)"
        r"  ratios (\S+), (\S+)$",
        out.split("(e)")[1],
        re.M,
    )
    assert m is not None
    assert m.groups() == (
        f"{ours_flow:.2e}",
        *(f"{d:.2e}" for d in theirs_flow),
        *(f"{ours_flow / d:.3g}" for d in theirs_flow),
    )

    # (f), --quick: (d) under rectified flow against diffusers' FlowMatchEuler with shift 3, whose
    # reference starts from its x_T = x(s = 1) carried to t_max = 0.999 (100 Heun steps in s)
    cfg = sd.guidance.CFG(part.denoiser(flow), gmm.denoiser(flow), 7.5)
    exact = sd.sample(cfg, x_T, 800, "dpmpp_2m", "logsnr_uniform")
    lifted, ds = x_T.clone(), (flow.t_max - 1.0) / 100
    for k in range(100):
        s = 1.0 + k * ds
        v = (lifted - cfg(lifted, s).x0) / s
        y = lifted + ds * v
        lifted = lifted + 0.5 * ds * (v + (y - cfg(y, s + ds).x0) / (s + ds))
    exact_lifted = sd.sample(cfg, lifted, 800, "dpmpp_2m", "logsnr_uniform")
    y = _flow_match_euler(lambda y, s: cfg(y, s).x0, x_T, 10, 3.0)
    row = re.search(r"^\s+7\.5\s+10\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out.split("(f)")[1], re.M)
    assert row is not None
    assert row.groups() == (
        *(
            f"{rel_rmse(sd.sample(cfg, x_T, 10, s, 'karras_capped'), exact):.2e}"
            for s in (sd.solvers.DPMSolverPPMultistep(max_h=0.8, max_h_ratio=0.0), "unipc", "ddim")
        ),
        f"{rel_rmse(y, exact_lifted):.2e}",
    )
    assert "diffusers FlowMatchEuler (shift 3)" in out.split("(f)")[1]


def _flow_match_euler(
    x0: Callable[[torch.Tensor, float], torch.Tensor], x_T: torch.Tensor, steps: int, shift: float
) -> torch.Tensor:
    """diffusers' FlowMatchEuler loop, as a flow-matching pipeline runs it, with velocity (x - x0) / s."""
    import diffusers

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    y = x_T.clone()
    for t in sched.timesteps:
        s = float(t) / 1000
        y = sched.step((y - x0(y, s)) / s, t, y).prev_sample
    return y


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_sample_writes_what_sd_sample_gives(tmp_path, capsys, suffix):
    path = tmp_path / "sub" / f"x{suffix}"
    argv = ["sample", "--out", str(path), "--n", "4", "--steps", "6", "--solver", "heun"]
    assert main([*argv, "--schedule", "karras", "--seed", "2", "--no-progress"]) == 0
    x = torch.from_numpy(np.load(path)) if suffix == ".npy" else torch.load(path)
    gmm, proc = sd.toy.default_benchmark_mixture(), sd.VP.scaled_linear()
    x_T = initial_noise(4, 64, 2)
    expected = sd.sample(gmm.denoiser(proc), x_T, steps=6, solver="heun", schedule="karras")
    assert torch.equal(x, expected)
    out = capsys.readouterr().out
    assert str(path) in out and "NFE 11" in out  # Heun: 2 * 6 - 1 network calls


@pytest.mark.parametrize(
    ("model", "n", "steps", "wrote", "took"),
    [
        ("gmm", 1, 1, "wrote 1 sample of shape (64,)", ", 1 step, NFE 1)"),
        ("gmm", 2, 2, "wrote 2 samples of shape (64,)", ", 2 steps, NFE 2)"),
        ("digits", 1, 1, "wrote 1 digit to", ", 1 step, NFE 1)"),
    ],
)
def test_sample_says_one_step_and_one_sample_in_the_singular(tmp_path, capsys, model, n, steps, wrote, took):
    """Before: "wrote 1 samples ... 1 steps"."""
    path = tmp_path / "x.npy"
    argv = ["sample", "--model", model, "--out", str(path), "--n", str(n), "--steps", str(steps)]
    assert main([*argv, "--solver", "ddim", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert wrote in out and took in out
    assert np.load(path).shape[0] == n


@pytest.mark.parametrize(
    ("argv", "stochastic"),
    [
        ([], False),  # the default solver, UniPC
        (["--solver", "heun"], False),
        (["--model", "digits", "--guidance", "cfg", "--label", "3"], False),  # the guided default
        (["--solver", "ddpm"], True),
        (["--model", "digits", "--solver", "euler_ancestral"], True),
    ],
)
def test_sample_makes_generators_only_for_a_stochastic_solver(tmp_path, monkeypatch, argv, stochastic):
    """A deterministic solver draws no noise: it gets no generators (before: one per sample, ~2.7 KB each,
    5.4 GB of the peak at --n 2e6) and writes what it wrote with them, bit for bit; a stochastic one gets
    one per sample, seeded from seed + 1's stream."""
    given, real = [], sd.sampling.sample

    def sample(*args, **kwargs):
        given.append(kwargs["generator"])
        return real(*args, **kwargs)

    path = tmp_path / "x.pt"
    run = ["sample", "--n", "3", "--steps", "4", "--seed", "7", *argv, "--out", str(path), "--no-progress"]
    monkeypatch.setattr(sd.sampling, "sample", sample)
    assert main(run) == 0
    x = torch.load(path)
    if not stochastic:
        assert given == [None]
        seeds = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(8))
        given[0] = [torch.Generator().manual_seed(int(s)) for s in seeds]  # as before
        monkeypatch.setattr(sd.sampling, "sample", lambda *a, **kw: real(*a, **{**kw, "generator": given[0]}))
        assert main(run) == 0
        assert torch.equal(torch.load(path), x)
    else:
        assert len(given[0]) == 3
        seeds = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(8))
        assert [g.initial_seed() for g in given[0]] == [int(s) for s in seeds]


@pytest.mark.parametrize(
    ("model", "solver"), [("gmm", "ddpm"), ("gmm", "dpmpp_sde"), ("digits", "euler_ancestral")]
)
def test_sample_i_is_the_same_whatever_n(tmp_path, model, solver):
    # before: one generator for the batch, so a stochastic sampler's sample 0 moved with --n (by 1.07 in
    # the 64-d mixture with ddpm at n = 4 vs 20); x_T's rows already did not
    def run(n: int) -> torch.Tensor:
        path = tmp_path / f"x{n}.pt"
        argv = ["sample", "--model", model, "--n", str(n), "--steps", "4", "--solver", solver, "--seed", "5"]
        assert main([*argv, "--out", str(path), "--no-progress"]) == 0
        return torch.load(path)

    a, b = run(2), run(5)
    assert (a - b[:2]).abs().max() < 1e-5  # the net's batched arithmetic rounds with the batch size
    assert (b[0] - b[1]).abs().max() > 0.1  # the samples differ


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--out", "x.txt"], ".pt, .npy"),
        (["sample", "--out", "x.pt", "--solver", "nope"], "dpmpp_2m"),
        (["sample", "--out", "x.pt", "--n", "0"], ">= 1"),
        (["bench"], "BENCHMARK"),
        # before: "invalid _positive value: '1.5'"
        (
            ["sample", "--out", "x.pt", "--steps", "1.5"],
            "argument --steps: must be an integer >= 1, got '1.5'",
        ),
        (["sample", "--out", "x.pt", "--n", "x"], "argument --n: must be an integer >= 1, got 'x'"),
        (["bench", "solvers", "--batch", "2.0"], "argument --batch: must be an integer >= 1, got '2.0'"),
        # before: a traceback from torch.Generator.manual_seed ("Overflow when unpacking long long")
        *(
            (argv, f"argument --seed: must be an integer from 0 to 4294967295, got '{seed}'")
            for argv, seed in (
                (["sample", "--out", "x.pt", "--seed", "-1"], -1),
                (["bench", "solvers", "--seed", str(2**64)], 2**64),
                (["demo", "--seed", str(2**32)], 2**32),
                (["train", "digits", "--seed", "1.5"], 1.5),
            )
        ),
        # before: a Python traceback from CFG's check
        *(
            (
                [
                    "sample",
                    "--model",
                    "digits",
                    "--guidance",
                    "cfg",
                    "--label",
                    "3",
                    "--scale",
                    w,
                    "--out",
                    "x.pt",
                ],
                f"argument --scale: must be a number from 0 to 3.403e+38 (float32), got '{w}'",
            )
            # before 1e39: "RuntimeError: value cannot be converted to type float without overflow" (lerp)
            for w in ("nan", "-1", "inf", "x", "1e39")
        ),
        # before: --scale without --guidance was ignored
        (
            ["sample", "--model", "digits", "--scale", "5", "--out", "x.pt"],
            "--scale needs --guidance cfg or --guidance classifier",
        ),
        (
            ["sample", "--scale", "5", "--out", "x.pt"],
            ".png output, --guidance, --label, --scale and --weights need --model digits",
        ),
        # before: --weights without --model digits was ignored (the gmm sampled and written)
        (
            ["sample", "--weights", "w", "--out", "x.pt"],
            ".png output, --guidance, --label, --scale and --weights need --model digits",
        ),
        # before: a traceback from the schedule's check
        (
            ["sample", "--out", "x.pt", "--steps", "1001", "--schedule", "linspace"],
            "schedule Linspace(steps_offset=0) takes at most steps=1000 with final='zero' on "
            "VP.discrete(N=1000) (1000 distinct trained steps are the most nodes this spacing gives it); "
            "got steps=1001 "
            "(--solver: the default solver, --schedule: linspace, --steps: 1001)",
        ),
        # before: "got 12", unquoted where the other options' messages quote the value
        (
            ["sample", "--model", "digits", "--label", "12", "--out", "x.pt"],
            "argument --label: must be a digit 0-9 (a class of the digits model), got '12'\n",
        ),
        (
            ["demo", "--digit", "three"],
            "argument --digit: must be a digit 0-9 (a class of the digits model), got 'three'\n",
        ),
        # before: passed argparse's >= 1, then "--n must be >= 2"
        (["demo", "--n", "1"], "argument --n: must be an integer >= 2, got '1'"),
        # before: a traceback from torch.set_num_threads ("Overflow when unpacking long"); counts above the
        # CPUs ran, oversubscribed
        *(
            (argv, f"argument --threads: must be an integer from 1 to {os.cpu_count()}, got '{n}'")
            for argv, n in (
                (["bench", "overhead", "--threads", str(2**40)], 2**40),
                (["demo", "--threads", str(os.cpu_count() + 1)], os.cpu_count() + 1),
                (["train", "digits", "--threads", "0"], 0),
                (["bench", "solvers", "--threads", "-1"], -1),
            )
        ),
        # before: a traceback from the sliced W2's floor (sde, posterior) or the distance itself (steer)
        *(
            (["bench", bench, "--n", "1"], "argument --n: must be an integer >= 2, got '1'")
            for bench in ("sde", "posterior", "steer", "epsilon")
        ),
        *(
            (["bench", "epsilon", "--b", b], f"argument --b: must be a finite number > 0, got '{b}'")
            for b in ("0", "-1", "nan", "inf", "x")
        ),
        (["bench", "solvers", "--model", "digits", "--batch", "1"], "--model digits needs --batch >= 2"),
        # before: ignored (--weights: the gmm benchmark ran; --draws: digits ran one x_T)
        (["bench", "solvers", "--weights", "w"], "--weights needs --model digits"),
        (
            ["bench", "solvers", "--model", "digits", "--draws", "4"],
            "--draws pools draws of the gmm model; --model digits runs one x_T (--batch)",
        ),
        # before: --quick ran its one 16-d case whatever --all or --inpaint said, --inpaint over --all
        *(
            (["bench", "posterior", *both], f"{' and '.join(both)}: each chooses the cases, give one of them")
            for both in (["--quick", "--all"], ["--quick", "--inpaint"], ["--all", "--inpaint"])
        ),
        (["bench", "overhead", "--shape", "0x3"], "argument --shape: must be a batch size and a sample"),
        # before: a traceback from sd.sample ("x_T must be batched")
        (["bench", "overhead", "--shape", "256"], "joined by x, like 256x64 or 4x4x64x64; got '256'"),
        (["bench", "overhead", "--shape", "4x"], "like 256x64 or 4x4x64x64; got '4x'"),
        (["bench", "overhead", "--device", "tpu"], "argument --device: not a torch device"),
        (["bench", "overhead", "--device", "meta"], "argument --device: must be cpu or cuda[:N], got 'meta'"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_version_is_the_packages(capsys):
    # `steerdiff --version` was refused ("the following arguments are required: COMMAND")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version is not None
    assert capsys.readouterr().out == f"steerdiff {version.group(1)}\n" == f"steerdiff {sd.__version__}\n"


IS_A_FILE = "argument --out: '{file}' is a file, not a folder"
WEIGHTS_FILE = "argument --weights: '{file}' is a file, not a folder of digits_*.safetensors"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--out", "{file}/x.pt"], IS_A_FILE),
        (["sample", "--out", "{file}/sub/x.npy"], IS_A_FILE),
        (["sample", "--out", "{folder}.pt"], "argument --out: '{folder}.pt' is a folder, not a file"),
        (["bench", "solvers", "--quick", "--out", "{file}"], IS_A_FILE),
        (["bench", "overhead", "--out", "{file}/sub"], IS_A_FILE),
        (["demo", "--out", "{file}"], IS_A_FILE),
        (["train", "digits", "--quick", "--out", "{file}"], IS_A_FILE),
        # before: "digits denoiser weights not found at FILE/digits_denoiser.safetensors"
        (["sample", "--model", "digits", "--weights", "{file}", "--out", "{folder}/x.pt"], WEIGHTS_FILE),
        (["demo", "--weights", "{file}"], WEIGHTS_FILE),
        (["bench", "solvers", "--model", "digits", "--weights", "{file}"], WEIGHTS_FILE),
    ],
)
def test_a_path_that_cannot_serve_is_refused_before_the_run(tmp_path, capsys, argv, message):
    # before: a FileExistsError / NotADirectoryError / RuntimeError traceback, for the benchmarks, the demo
    # and training only after the whole run
    file, folder = tmp_path / "file", tmp_path / "folder"
    file.write_text("")
    (tmp_path / "folder.pt").mkdir()
    fill = {"file": str(file), "folder": str(folder)}
    with pytest.raises(SystemExit) as exc:
        main([a.format(**fill) for a in argv])
    assert exc.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err


def test_the_default_out_is_checked_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "sde", "--quick"])
    assert exc.value.code == 2
    assert "argument --out: 'out' is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_an_unwritable_out_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "steer", "--quick", "--out", str(locked / "run")])
    assert exc.value.code == 2
    assert f"argument --out: the folder '{locked}' is not writable" in capsys.readouterr().err


def test_a_run_that_turns_nan_exits_with_the_step(tmp_path):
    # before: a traceback from sd.NonFiniteError
    argv = ["sample", "--model", "digits", "--guidance", "cfg", "--label", "1", "--scale", "1e30", "--n", "2"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x.pt"), "--no-progress"])
    # the divergence guard names the guided step that took the state out of bounds (before it: the model's
    # NaN on that state, at step 1)
    message = str(exc.value.code)
    assert message.startswith("steerdiff sample: the solver 'dpmpp_2m' made the state diverge at step 0"), (
        message
    )
    assert "the guidance scale" in message
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("missing", "argv", "message"),
    [
        (
            ["diffusers"],
            ["bench", "overhead", "--steps", "1", "--repeats", "1", "--shape", "2x2"],
            "steerdiff bench overhead: import of diffusers halted; None in sys.modules; pip install -e",
        ),
        (
            ["sklearn", "sklearn.datasets"],
            ["demo", "--n", "2"],
            "steerdiff demo: digits_data needs scikit-learn (pip install 'scikit-learn>=1.3'); pip",
        ),
    ],
)
def test_a_missing_optional_dependency_exits_with_its_name(tmp_path, monkeypatch, missing, argv, message):
    # before: an ImportError traceback after `pip install -e .` (the README's line for the library alone)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path), "--no-progress"])
    assert str(exc.value.code).startswith(message)


def test_a_failed_write_exits_with_its_reason(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--out", str(tmp_path / "x.pt"), "--n", "2", "--steps", "2", "--no-progress"])
    assert exc.value.code == "steerdiff sample: [Errno 28] No space left on device"


CPU_ALLOC = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 5120000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    ("error", "argv", "message"),
    [
        (
            RuntimeError(CPU_ALLOC),
            ["--n", "500"],
            f"steerdiff sample: ran out of memory with --n 500, --steps 10: give smaller sizes ({CPU_ALLOC})",
        ),
        (
            RuntimeError("std::bad_alloc"),
            ["--steps", "1000000000", "--model", "digits"],
            "steerdiff sample: ran out of memory with --n 2, --steps 1000000000: give smaller sizes "
            "(std::bad_alloc)",
        ),
        (
            MemoryError(),
            ["--n", "3"],
            "steerdiff sample: ran out of memory with --n 3, --steps 10: give smaller sizes",
        ),
        (
            torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB.\nSee the documentation."
            ),
            ["--n", "4"],
            "steerdiff sample: ran out of memory with --n 4, --steps 10: give smaller sizes (CUDA out of "
            "memory. Tried to allocate 20.00 GiB.)",
        ),
    ],
)
def test_running_out_of_memory_exits_with_the_sizes(tmp_path, monkeypatch, error, argv, message):
    # before: the allocator's traceback (steerdiff sample --n 10000000000: RuntimeError from torch.randn in
    # initial_noise; --n 2000000 under a 4 GB limit: std::bad_alloc from the per-sample generators). The
    # sampler raises the error here; --n stays small, as it sizes x_T and the generators made before it.
    raised = [error]

    def sample(*args, **kwargs):
        raise raised[0]

    monkeypatch.setattr(sd.sampling, "sample", sample)
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--n", "2", *argv, "--out", str(tmp_path / "x.pt"), "--no-progress"])
    assert exc.value.code == message
    # any other RuntimeError is not taken for one
    raised[0] = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["sample", "--n", "2", "--out", str(tmp_path / "x.pt"), "--no-progress"])


def test_running_out_of_memory_names_the_shapes(tmp_path, monkeypatch):
    from steerdiff.bench import overhead

    def run(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")

    monkeypatch.setattr(overhead, "run", run)
    argv = ["bench", "overhead", "--shape", "4x64", "--shape", "2x3x8x8", "--steps", "2", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == (
        "steerdiff bench overhead: ran out of memory with --steps 2, --shape 4x64, --shape 2x3x8x8: give "
        "smaller sizes (CUDA out of memory. Tried to allocate 64.00 GiB.)"
    )


def test_overhead_device_index_must_exist(monkeypatch, capsys):
    # before: cuda:1 on a machine with one GPU passed and failed in the run with torch's traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "overhead", "--device", "cuda:1"])
    assert exc.value.code == 2
    assert "argument --device: 'cuda:1': the CUDA devices here are cuda:0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["bench", "sample", "--verbose"]),
        (["bench"], ["solvers"]),
        (
            ["bench", "solvers"],
            ["--out", "--batch", "--seed", "--quick", "--no-diffusers", "--no-progress", "--draws"],
        ),
        (["sample"], ["--out", "--n", "--steps", "--solver", "--schedule", "--seed"]),
    ],
)
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in expected)


@pytest.mark.parametrize(
    ("argv", "written"),
    [
        (["bench", "solvers"], ["OUT/solvers.csv", "OUT/solvers.png", "OUT/solvers.txt"]),
        (["bench", "solvers"], ["OUT/digits_solvers.{csv,png,txt}"]),
        (["bench", "sde"], ["OUT/sde.csv", "OUT/sde.png", "OUT/sde.txt"]),
        (["bench", "invert"], ["OUT/invert.csv", "OUT/invert.png", "OUT/invert.txt"]),
        (["bench", "posterior"], ["OUT/posterior.csv", "OUT/posterior.png", "OUT/posterior.txt"]),
        (["bench", "posterior"], ["OUT/posterior_inpaint.{csv,png,txt}"]),
        (["bench", "steer"], ["OUT/steer.csv", "OUT/steer.png", "OUT/steer.txt"]),
        (["bench", "overhead"], ["OUT/overhead.csv", "OUT/overhead.png", "OUT/overhead.txt"]),
        (["bench", "longstep"], ["OUT/longstep.csv", "OUT/longstep.png", "OUT/longstep.txt"]),
        (["bench", "guided"], ["OUT/guided.csv", "OUT/guided.png", "OUT/guided.txt"]),
        (["bench", "guided"], ["OUT/guided_validation.{csv,png,txt}"]),
        (["bench", "discrete"], ["OUT/discrete.csv", "OUT/discrete.png", "OUT/discrete.txt"]),
        (["bench", "parallel"], ["OUT/parallel.csv", "OUT/parallel.png", "OUT/parallel.txt"]),
        (["bench", "distributed"], ["OUT/distributed.csv", "OUT/distributed.png", "OUT/distributed.txt"]),
        (["bench", "epsilon"], ["OUT/epsilon.csv", "OUT/epsilon.png", "OUT/epsilon.txt"]),
        (["demo"], ["OUT/demo.png", "OUT/demo.csv"]),
        (["sample"], ["--model digits", ".png grid", "the demo's, cfg 2, classifier 2"]),
    ],
)
def test_help_names_the_files_written(capsys, argv, written):
    # before: bench solvers, sde, posterior and steer left out the OUT/<name>.txt each writes, and sample's
    # description said the default model and .pt or .npy only, its --scale "the demo's" without a number
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in written), written


def test_python_m_steerdiff_is_the_command_line():
    # before: "No module named steerdiff.__main__; 'steerdiff' is a package and cannot be directly executed"
    res = subprocess.run(
        [sys.executable, "-m", "steerdiff", "sample", "--n", "0", "--out", "x.pt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "argument --n: must be an integer >= 1, got '0'" in res.stderr


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("steerdiff")
    if not exe.exists():
        pytest.skip("the steerdiff console script is not installed in this environment")
    res = subprocess.run([str(exe), "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--schedule" in res.stdout


def test_bench_sde_table_is_the_sliced_w2_of_sd_sample(tmp_path, capsys):
    from steerdiff.bench.sde import PROJECTIONS, REFERENCE_FACTOR

    n, seed = 256, 0
    assert (
        main(
            [
                "bench",
                "sde",
                "--quick",
                "--n",
                str(n),
                "--no-diffusers",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    with open(tmp_path / "sde.csv") as f:
        rows = {(r["method"], r["schedule"]): r for r in csv.DictReader(f)}
    assert (tmp_path / "sde.png").exists() and "floor (256 exact samples)" in capsys.readouterr().out
    gmm, proc = default_model()
    x = sd.sample(
        gmm.denoiser(proc),
        initial_noise(n, gmm.dim, seed),
        steps=20,
        solver="ddpm",
        schedule="time_uniform",
        generator=torch.Generator().manual_seed(seed + 1),
    )
    exact = gmm.sample(REFERENCE_FACTOR * n, torch.Generator().manual_seed(seed + 3))
    want = sd.metrics.sliced_wasserstein(x, exact, PROJECTIONS, torch.Generator().manual_seed(seed + 4))
    assert float(rows["ddpm", "time_uniform"]["nfe_20"]) == pytest.approx(want, rel=1e-12)
    stochastic = {name for name in sd.solvers.available() if sd.solvers.get(name).stochastic}
    assert {m for m, _ in rows} == stochastic  # every stochastic sampler, nothing else


def test_bench_invert_table_is_sd_invert_against_the_exact_inversion(tmp_path, capsys):
    """Every entry is the relative RMSE against the ODE over the run's own grid: recomputed here for
    ``dpmpp_2m`` on ``karras_capped`` (whose grid ends at t_N = 4.7, not t_min) and for diffusers'
    DDIMInverseScheduler (from alpha = 1 to its last timestep); the printed lines are the CSV's numbers."""
    diffusers = pytest.importorskip("diffusers")
    n, seed = 32, 0
    argv = ["bench", "invert", "--quick", "--n", str(n), "--seed", str(seed), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _read(tmp_path / "invert.csv")
    assert {(m, k) for src, m, k in rows if src == "steerdiff"} == set(
        itertools.product(sd.inversion.deterministic_solvers(), sd.schedules.available())
    )
    gmm, proc = default_model()
    den = gmm.denoiser(proc)
    x_0 = gmm.sample(n, generator_for(seed, "x_0"))  # exact draws of the mixture, as documented
    x_T, info = sd.invert(den, x_0, 10, "dpmpp_2m", "karras_capped", return_info=True)
    assert info.grid.t[0] > 4  # the grid's own last node, where x_0 is taken
    exact = gmm.reference_ode(x_0, proc, info.grid.t[0], info.grid.t[-1])
    ours = float(rows["steerdiff", "dpmpp_2m", "karras_capped"]["nfe_10"])
    assert ours == pytest.approx(rel_rmse(x_T, exact), rel=1e-6)
    sched = diffusers.DDIMInverseScheduler(**sd_betas_config(clip_sample=False))
    sched.set_timesteps(10)
    x, net = x_0, eps_net(gmm, proc)
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x).prev_sample
    exact = gmm.reference_ode(x_0, proc, None, float(sched.timesteps[-1]))
    theirs = float(rows["diffusers", "DDIMInverse", "leading"]["nfe_10"])
    assert theirs == pytest.approx(rel_rmse(x, exact), rel=1e-6)
    # the printed tables and lines are the CSV's
    line = next(ln for ln in out.splitlines() if ln.startswith("DDIMInverse "))
    assert line.split() == [
        "DDIMInverse",
        "leading",
        *(f"{float(rows['diffusers', 'DDIMInverse', 'leading'][k]):.2e}" for k in ("nfe_5", "nfe_10")),
    ]
    for nfe in (5, 10):
        best = {
            src: min(
                (r for key, r in rows.items() if key[0] == src and r[f"nfe_{nfe}"]),
                key=lambda r: float(r[f"nfe_{nfe}"]),
            )
            for src in ("steerdiff", "diffusers")
        }
        a, b = (float(best[src][f"nfe_{nfe}"]) for src in ("steerdiff", "diffusers"))
        line = next(ln for ln in out.splitlines() if ln.startswith(f"    NFE {nfe:>2}:"))
        label = f"{best['diffusers']['method']} ({best['diffusers']['schedule']})"
        assert line.endswith(f"{a:.2e} vs {label} {b:.2e}  ratio {a / b:.3g}")
    # the second comparison keeps the runs that take x_0 at t_min (the whole inversion)
    data_end = [ln for ln in out.splitlines() if ln.startswith("    NFE 10:")][1]
    method, schedule, error = re.match(r"    NFE 10: (\w+) \((\w+)\) (\S+) vs ", data_end).groups()
    assert error == f"{float(rows['steerdiff', method, schedule]['nfe_10']):.2e}"
    steps = next(k for k in range(1, 11) if sd.solvers.get(method).nfe(k, clean_end=False) == 10)
    assert sd.invert(den, x_0[:1], steps, method, schedule, return_info=True)[1].grid.t[0] == proc.t_min
    default = sd.invert(den, x_0, 10, return_info=True)
    exact = gmm.reference_ode(x_0, proc, default[1].grid.t[0], default[1].grid.t[-1])
    trip = rel_rmse(sd.sample(den, default[0], 10, final="none"), x_0)
    line = next(ln for ln in out.splitlines() if ln.startswith("    steps 10:"))
    assert line.startswith(f"    steps 10: {rel_rmse(default[0], exact):.2e} vs {theirs:.2e}")
    assert f"round trip {trip:.2e} vs " in line
    report = (tmp_path / "invert.txt").read_text()
    assert report.startswith("Relative RMSE of the inversion") and report in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "invert.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_deterministic_leaves_out_step_counts_a_schedule_does_not_make():
    """lcm has 50 distillation timesteps (SD betas): 50 steps up to the last node take 51 nodes, which it
    refuses. bench invert scored them all the same and reported a failed run (nan at NFE 50 in the lcm rows
    of 10 solvers), which Row.score ranks below any row without one; now they are not reached ('-')."""
    from steerdiff.bench.solvers import makes_grid, sweep_deterministic

    proc = sd.VP.scaled_linear()
    # with the clean end 50 steps take 50 nodes, which it makes
    for clean_end, reached in ((False, {49: 1.0}), (True, {49: 1.0, 50: 1.0})):
        rows = sweep_deterministic(lambda *_: 1.0, proc, (49, 50), clean_end=clean_end)
        table = {(r.method, r.schedule): r.errors for r in rows}
        assert table["ddim", "lcm"] == reached and table["ddim", "karras"] == {49: 1.0, 50: 1.0}
        assert makes_grid(proc, "lcm", 50, clean_end) is (50 in reached)


def test_sweep_deterministic_takes_polyexponential_for_exponential():
    """polyexponential at its default rho = 1 makes exponential's nodes to rounding, not bit for bit (SD
    betas: 6.8e-16 relative apart at 10 steps); the sweep gave it rows of its own, 1e-11 from exponential's,
    which won bench invert's best-of lines by that much and renamed them. Grids equal to ALIAS_RTOL are one
    grid (same_as the first), and distinct ones stay apart."""
    from steerdiff.bench.solvers import ALIAS_RTOL, sweep_deterministic

    proc = sd.VP.scaled_linear()
    expo, poly = (sd.schedules.get(s)(proc, 10) for s in ("exponential", "polyexponential"))
    assert not torch.equal(expo, poly) and torch.allclose(expo, poly, ALIAS_RTOL, 0)
    rows = sweep_deterministic(lambda _, sched, n, nfe: float(len(sched) + nfe), proc, (5, 10))
    table = {(r.method, r.schedule): r for r in rows}
    poly_row, expo_row = table["ddim", "polyexponential"], table["ddim", "exponential"]
    assert poly_row.same_as == "exponential" and expo_row.same_as is None
    assert poly_row.errors == expo_row.errors == {5: 16.0, 10: 21.0}
    assert {table["ddim", s].same_as for s in ("karras", "karras_capped", "laplace", "kl_optimal")} == {None}


def test_bench_invert_says_when_diffusers_returns_non_finite_samples(caplog):
    """DPMSolverMultistepInverseScheduler of order 3 on trailing timesteps from 15 steps on ends with a step
    of h = 0 (its last sigma repeated) and divides 0 by 0: nan samples, whose nan error the table shows;
    bench solvers logs such runs, bench invert said nothing."""
    pytest.importorskip("diffusers")
    from steerdiff.bench import invert

    gmm, proc = default_model()
    x_0 = invert.clean_samples(gmm, 4, 0)
    config = next(
        c for c in invert.diffusers_configs() if c.method.endswith("(order=3)") and c.schedule() == "trailing"
    )
    with caplog.at_level("WARNING", logger="steerdiff.bench.invert"):
        run = invert._theirs(config, gmm, proc, x_0, 15)
    assert run is not None and not bool(run[0].isfinite().any())
    assert (
        "DPMSolverMultistepInverse(order=3) (trailing) at 15 steps returned non-finite samples" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="steerdiff.bench.invert"):
        run = invert._theirs(config, gmm, proc, x_0, 12)  # below 15 steps its last steps are of lower order
    assert run is not None and bool(run[0].isfinite().all()) and not caplog.text


def test_bench_overhead_times_the_same_samples_on_both_sides():
    """The timed pairs compute the same thing: ours equals diffusers' loop on its own timesteps (Euler
    to 2e-3: with its default ``linspace`` spacing diffusers' Euler starts from ``x_T sigma_max``, not
    ``x_T sqrt(sigma_max^2 + 1)``; see the next test), and a first run (new denoiser) equals a warm one bit
    for bit."""
    from steerdiff.bench.overhead import OVERHEAD_PAIRS, pairs

    runs = pairs(steps=6, shape=(8, 2, 2))
    assert [(p.solver, p.scheduler) for p in runs] == [(s, c) for s, _, c, _ in OVERHEAD_PAIRS]
    for p in runs:
        ours, theirs = p.ours(False), p.theirs()
        assert ours.shape == (8, 2, 2) and ours.dtype == torch.float32
        assert rel_rmse(ours.double(), theirs.double()) < (2e-3 if p.solver == "euler" else 1e-6), p.solver
        assert torch.equal(p.ours(True), ours)


def _moving_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A net whose output depends on ``x`` and ``t``: unlike the benchmark's free net (a fixed eps, for
    which every consistent solver lands on the same exact answer), solvers of different orders or on
    different grids give different samples."""
    return 0.5 * torch.tanh(x) + 3e-4 * float(t.reshape(-1)[0]) * x


@pytest.mark.parametrize("steps", [6, 20])
def test_bench_overhead_pairs_run_the_same_algorithm(steps):
    """Each timed pair is one algorithm on both sides: with a net that moves the samples (the free net
    cannot tell a first-order solver from a third-order one) ours equals diffusers' loop within 1e-6, Euler
    once diffusers' start ``x_T sigma_max`` is taken to ``x_T sqrt(sigma_max^2 + 1)`` (before: ``unipc``,
    UniPC-3, against diffusers' default UniPC-2, 7.7e-3 apart at 6 steps)."""
    import diffusers

    from steerdiff.bench.overhead import pairs
    from steerdiff.integrations.diffusers_ref import run_scheduler, sd_betas_config

    for p in pairs(steps=steps, shape=(8, 2, 2), net=_moving_net):
        ours, theirs = p.ours(False).double(), p.theirs().double()
        if p.solver == "euler":
            assert 1e-3 < rel_rmse(ours, theirs) < 1e-2
            sched = diffusers.EulerDiscreteScheduler(**sd_betas_config())
            sched.set_timesteps(steps)
            s_max = float(sched.sigmas.max())
            start = torch.randn(8, 2, 2, generator=torch.Generator().manual_seed(0))  # the pairs' x_T
            theirs = run_scheduler(sched, _moving_net, start * math.sqrt(1 + s_max**2) / s_max, steps)[0]
        assert rel_rmse(ours, theirs.double()) < 1e-6, p.solver


def test_bench_overhead_builds_ours_grid_in_the_timed_call(monkeypatch):
    """diffusers' side sets its timesteps inside the timed loop (``set_timesteps``); ours makes (and checks)
    its grid there too, as a call with these times does (before: the ``Custom`` schedule was made once,
    outside the timed call)."""
    from steerdiff import schedules
    from steerdiff.bench.overhead import pairs

    made: list[int] = []
    init = schedules.Custom.__init__

    def counted(self, times):
        made.append(1)
        init(self, times)

    runs = pairs(steps=3, shape=(2, 2))
    monkeypatch.setattr(schedules.Custom, "__init__", counted)
    for p in runs:
        made.clear()
        p.ours(False)
        assert made == [1], p.solver


def test_bench_overhead_synchronizes_the_device_it_times(monkeypatch):
    """On ``cuda:1`` the clock waits for cuda:1's queue (before: ``torch.cuda.synchronize()``, the current
    device's, cuda:0's: a run's queued kernels on cuda:1 went untimed)."""
    from steerdiff.bench.overhead import _timer

    synced: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    _timer(torch.device("cuda", 1))(lambda: None)
    assert [torch.device(d) if d is not None else torch.device("cuda", 0) for d in synced] == [
        torch.device("cuda", 1)
    ] * 2


def test_bench_overhead_writes_its_table(tmp_path, capsys):
    argv = ["bench", "overhead", "--shape", "8x4", "--shape", "2x3x4", "--steps", "3", "--repeats", "1"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "overhead.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    solvers = ("dpmpp_2m", "unipc(order=2)", "ddim", "euler")
    assert [(r["shape"], r["solver"]) for r in rows] == [
        (shape, solver) for shape in ("8x4", "2x3x4") for solver in solvers
    ]
    for r in rows:
        assert float(r["ratio"]) == pytest.approx(float(r["ours_s"]) / float(r["diffusers_s"]), rel=1e-4)
    out = capsys.readouterr().out
    assert (tmp_path / "overhead.txt").read_text() in out
    assert "| 2x3x4 | unipc(order=2) | UniPCMultistepScheduler |" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_no_diffusers_runs_without_diffusers(tmp_path, capsys, monkeypatch):
    """``--no-diffusers`` needs no diffusers (before: (d) imported ``diffusers.utils`` to silence it)."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    argv = ["bench", "solvers", "--quick", "--batch", "4", "--draws", "1", "--no-diffusers", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "solvers")]) == 0
    rows = _read(tmp_path / "solvers" / "solvers.csv")
    assert rows and {source for source, _, _ in rows} == {"steerdiff"}
    argv = ["bench", "sde", "--quick", "--n", "16", "--no-diffusers", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "sde")]) == 0
    with open(tmp_path / "sde" / "sde.csv") as f:
        assert {r["source"] for r in csv.DictReader(f)} == {"steerdiff"}
    assert "diffusers (columns: NFE)" not in capsys.readouterr().out


def test_bench_distributed_quick_rows_equal_one_rank(tmp_path, capsys):
    """``bench distributed --quick``: a row per case and world size (1, 2), the 2-rank result equal to the
    1-rank one (float32 rounding of the net's batch sizes apart), and fk_steering's resampling events and
    paradigms' iterations those of the same run on one process without a group. No timing is asserted."""
    from steerdiff.bench.distributed import DIGIT, ESS_THRESHOLD, LAM, QUICK

    argv = ["bench", "distributed", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    with open(tmp_path / "distributed.csv", newline="") as f:
        rows = {(r["case"], int(r["world"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(c, w) for c in ("sample", "fk_steering", "paradigms") for w in (1, 2)}
    assert all(float(r["seconds"]) > 0 and float(r["free_seconds"]) > 0 for r in rows.values())
    assert all(
        float(rows[c, 1]["max_diff"]) == 0 and float(rows[c, 2]["max_diff"]) < 1e-5
        for c in ("sample", "fk_steering", "paradigms")
    )
    assert rows["sample", 2]["events"] == "-"
    assert (tmp_path / "distributed.txt").read_text() in capsys.readouterr().out
    den, clf = sd.toy.digits.load_digits_denoiser(), sd.toy.digits.load_classifier()
    with torch.no_grad():
        out = sd.smc.fk_steering(
            den,
            lambda x: clf.log_prob(x, DIGIT),
            LAM,
            shape=(QUICK.batch, 1, 8, 8),
            particles=QUICK.particles,
            steps=QUICK.smc_steps,
            ess_threshold=ESS_THRESHOLD,
            generator=torch.Generator().manual_seed(0),
        )
        x_T = torch.randn((QUICK.paradigms_samples, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        _, info = sd.paradigms(
            den,
            x_T,
            QUICK.paradigms_steps,
            "ddpm",
            window=QUICK.window,
            generator=torch.Generator().manual_seed(1),
            return_info=True,
        )
    events = int(out.trace.resampled.sum())
    assert 0 < events < QUICK.batch * (QUICK.smc_steps + 1)  # resampling at some nodes, not all
    assert [int(rows["fk_steering", w]["events"]) for w in (1, 2)] == [events, events]
    assert [int(rows["paradigms", w]["events"]) for w in (1, 2)] == [info.iterations] * 2
    assert info.iterations < QUICK.paradigms_steps
    assert rows["fk_steering", 1]["free_events"] == rows["fk_steering", 2]["free_events"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "distributed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_parallel_rows_are_paradigms_against_sample(tmp_path, capsys):
    """``bench parallel --quick``: one row per solver, steps, window and tolerance; each is sd.paradigms with
    those arguments, its iterations fewer than the steps, its sequential calls (a staged solver's, one per
    stage) fewer than sd.sample's NFE, and its distance to sd.sample's result."""
    argv = ["bench", "parallel", "--quick", "--n", "8", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    with open(tmp_path / "parallel.csv", newline="") as f:
        rows = {
            (r["solver"], int(r["steps"]), int(r["window"]), float(r["tol"])): r for r in csv.DictReader(f)
        }
    assert set(rows) == {
        (s, k, w, t)
        for s in ("ddim", "unipc", "dpmpp_2m", "ddpm", "heun", "dpmpp_sde")
        for k in (50, 200)
        for w in (4, 16)
        for t in (0.1, 0.01)
    }
    assert (tmp_path / "parallel.txt").read_text() in capsys.readouterr().out
    gmm, proc = sd.toy.default_benchmark_mixture(), sd.VP.scaled_linear()
    den, x_T = gmm.denoiser(proc), initial_noise(8, 64, 0)
    for solver, tol in (("ddpm", 0.1), ("unipc", 0.01), ("heun", 0.01), ("dpmpp_sde", 0.1)):
        gen = torch.Generator().manual_seed(1)
        ref, ref_info = sd.sample(den, x_T, 200, solver, "time_uniform", generator=gen, return_info=True)
        x, info = sd.paradigms(
            den,
            x_T,
            200,
            solver,
            "time_uniform",
            window=16,
            tol=tol,
            generator=torch.Generator().manual_seed(1),
            return_info=True,
        )
        row = rows[solver, 200, 16, tol]
        assert (int(row["iterations"]), int(row["nfe"])) == (info.iterations, info.nfe)
        assert (int(row["calls"]), int(row["sequential_nfe"])) == (info.calls, ref_info.nfe)
        assert info.iterations < 200
        assert info.calls < ref_info.nfe == (399 if solver in ("heun", "dpmpp_sde") else 200)
        assert (info.calls > info.iterations) == (solver in ("heun", "dpmpp_sde"))
        assert float(row["to_sequential"]) == pytest.approx(sd.metrics.relative_rmse(x, ref), rel=1e-5)
        moved = int(((x - ref).square().mean(1).sqrt() > 0.1).sum())
        assert int(row["moved"]) == moved


def test_bench_epsilon_rows_are_the_fd_of_epsilon_scaling(tmp_path, capsys):
    """``bench epsilon --quick`` (before: a standalone script without the command, CSV or figure): DDIM at 10
    steps with no scaling, the calibrated uniform b and line, and b = 1.01, one row per draw; each FD is the
    digits model's FD of sd.sample of EpsilonScaling with the row's k and b, the calibrated ones those of
    epsilon_norms on the draw's x_T."""
    from steerdiff.bench.digits import load_models
    from steerdiff.guidance import EpsilonScaling, epsilon_norms
    from steerdiff.toy import digits as D

    argv = ["bench", "epsilon", "--quick", "--n", "48", "--seed", "3", "--draws", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "epsilon.csv", newline="") as f:
        rows = {(r["setting"], int(r["seed"])): r for r in csv.DictReader(f)}
    settings = ("b = 1 (none)", "uniform b (calibrated)", "k t + b (calibrated)", "b = 1.01")
    assert set(rows) == {(s, seed) for s in settings for seed in (3, 4)}
    assert {(r["solver"], r["steps"], r["schedule"]) for r in rows.values()} == {
        ("ddim", "10", "karras_capped")
    }
    assert (tmp_path / "epsilon.txt").read_text() in capsys.readouterr().out
    assert (tmp_path / "epsilon.png").exists()
    m = load_models()
    x_T = torch.randn(48, *D.DIGITS_SHAPE, generator=torch.Generator().manual_seed(4))
    pick = torch.randperm(len(m.train[0]), generator=torch.Generator().manual_seed(4))[:48]
    norms = epsilon_norms(
        m.den,
        m.train[0][pick],
        x_T,
        10,
        "ddim",
        generator=torch.Generator().manual_seed(104),
        label=D.NULL_LABEL,
    )
    k, b = norms.linear()
    assert float(rows["uniform b (calibrated)", 4]["b"]) == pytest.approx(norms.uniform(), rel=1e-5)
    assert float(rows["k t + b (calibrated)", 4]["k"]) == pytest.approx(k, rel=1e-5)
    for setting, (kk, bb) in (
        ("b = 1 (none)", (0.0, 1.0)),
        ("b = 1.01", (0.0, 1.01)),
        ("k t + b (calibrated)", (k, b)),
    ):
        with torch.no_grad():
            x = sd.sample(EpsilonScaling(m.den, k=kk, b=bb), x_T, 10, "ddim", label=D.NULL_LABEL)
        assert float(rows[setting, 4]["fd"]) == pytest.approx(m.frechet(x), abs=1e-3)
    assert float(rows["b = 1.01", 4]["fd"]) != float(rows["b = 1 (none)", 4]["fd"])


def test_bench_longstep_rows_are_the_solvers_with_and_without_the_rule(tmp_path, capsys):
    """``bench longstep``: on EDM only ``time_uniform`` (its last noisy step is 8-12 times the one before in
    log-SNR), ``kl_optimal`` (uniform in arctan s, so nearly uniform in s at low noise) and ``laplace`` (whose
    last node jumps from s = 0.47 to 0.0032 at 10 steps) have a long step after short ones, so the rule
    changes exactly their cases; each row is
    ``sd.sample`` with the named solver and with ``max_h=inf`` against the exact ODE and denoiser from
    the same x_T, and there the rule takes UniPC-3 at 20 steps from more than 5 (relative) below 1."""
    argv = ["bench", "longstep", "--process", "edm", "--quick", "--n", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "longstep.csv", newline="") as f:
        rows = {(r["schedule"], int(r["steps"]), r["solver"]): r for r in csv.DictReader(f)}
    solvers = ("dpmpp_2m", "dpmpp_3m", "unipc", "mrs")
    long_steps = ("time_uniform", "kl_optimal", "laplace")
    assert set(rows) == {(g, k, s) for g in long_steps for k in (10, 20) for s in solvers}
    # VP.discrete only, and vp's sigma/alpha up to 152 beyond EDM's 80
    refused = ("leading", "linspace", "trailing", "lcm", "vp")
    applicable = len([s for s in sd.schedules.available() if s not in refused])
    out = capsys.readouterr().out
    assert f"the rule changes 24 of {applicable * 2 * 4} cases" in out
    assert (tmp_path / "longstep.txt").read_text() in out

    gmm, edm = sd.toy.default_benchmark_mixture(dim=16), sd.EDM()
    x_T = initial_noise(8, 16, 0)
    x_T = x_T * math.hypot(1.0, edm.t_max)
    ref = gmm.reference_ode(x_T, edm, edm.t_max, edm.t_min, denoise=True)
    den = gmm.denoiser(edm)
    for (schedule, k, solver), r in rows.items():
        plain = sd.solvers.get(solver)
        plain.max_h = math.inf
        with_rule = rel_rmse(sd.sample(den, x_T, k, solver, schedule), ref)
        without = rel_rmse(sd.sample(den, x_T, k, plain, schedule), ref)
        assert float(r["with_rule"]) == pytest.approx(with_rule, rel=1e-5)
        assert float(r["without"]) == pytest.approx(without, rel=1e-5)
    assert float(rows["time_uniform", 20, "unipc"]["without"]) > 5
    assert float(rows["time_uniform", 20, "unipc"]["with_rule"]) < 1


def test_plot_takes_any_result_with_nfes_and_rows(tmp_path):
    """``bench.solvers.plot`` reads what its ``Results`` protocol declares, ``nfes`` and ``rows``: a
    result without the benches' ``of`` helper plots too (it raised AttributeError)."""
    pytest.importorskip("matplotlib")

    @dataclass
    class Bare:
        nfes: tuple[int, ...]
        rows: list[Row]

    rows = [Row("steerdiff", "ddim", "karras", {5: 0.1, 10: 0.01}), Row("diffusers", "DDIM", "", {5: 0.2})]
    assert plot(Bare((5, 10), rows), tmp_path / "bare.png")
    assert (tmp_path / "bare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_x_T_is_not_the_mixtures_means(monkeypatch):
    """``bench solvers``, ``guided``, ``sde`` and ``longstep`` (and ``steerdiff sample``: ``initial_noise``)
    draw ``x_T`` apart from the stream that made the default
    mixture's means (``default_benchmark_mixture`` seeds 0): from ``Generator().manual_seed(0)`` its first 10
    rows were the means, which set plain 2M's error in the 64-d mixture under SD betas at scale 7.5 and 5
    steps (2.18 with those rows, 0.87 with 10 fresh ones; those 10 rows alone at 14)."""
    from steerdiff.bench import guided, longstep, sde

    def apart(x_T: torch.Tensor, means: torch.Tensor) -> bool:
        return bool(torch.cdist(x_T, means).min() > 0.5)

    assert apart(initial_noise(1024, 64, 0), default_model()[0].means)  # bench solvers' make_problem
    for name in ("16d-sd", "64d-sd"):
        _, x_T = guided.problem_setup(name, 64, 0, 2)
        assert apart(x_T, sd.toy.default_benchmark_mixture(dim=x_T.shape[1]).means), name

    seen: list[torch.Tensor] = []  # every x_T the benches sample from
    real = sd.sample

    def spy(den, x_T, *args, **kwargs):
        seen.append(x_T)
        return real(den, x_T, *args, **kwargs)

    monkeypatch.setattr(sde.sampling, "sample", spy)
    sde.run(16, quick=True, with_diffusers=False)
    monkeypatch.setattr(longstep, "sample", spy)
    longstep.run(16, quick=True, progress=False, only=["sd"])
    dims = {x.shape[1] for x in seen}
    assert dims == {16, 64}
    for x in seen:
        assert apart(x, sd.toy.default_benchmark_mixture(dim=x.shape[1]).means)


def test_bench_guided_rows_are_the_candidates_against_the_guided_ode(tmp_path, capsys):
    """``bench guided``: each row is ``sd.sample`` with the candidate solver (the guided default, plain,
    flat-guarded and scale-guarded DPM-Solver++(2M), UniPC-2, UniPC-3, DDIM) under CFG toward the first
    two components of the 16-d mixture against the guided ODE solved in 800 steps of 2M, from the same
    x_T (here 8 samples under rectified flow, scales 2 and 7.5 at 5 and 15 steps); at 7.5 and 5 steps
    every step is longer than 0.8 in log-SNR, so the guided default is DDIM there, and from 15 steps it
    is UniPC-2 (at 7.5 with its steps longer than 0.8 predicted at first order)."""
    argv = [
        "bench",
        "guided",
        "--problem",
        "16d-flow",
        "--quick",
        "--n",
        "8",
        "--draws",
        "1",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "guided.csv", newline="") as f:
        rows = {(float(r["scale"]), int(r["steps"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(w, k) for w in (2.0, 7.5) for k in (5, 15)}
    out = capsys.readouterr().out
    assert (tmp_path / "guided.txt").read_text() in out

    full = sd.toy.default_benchmark_mixture(dim=16)
    part = sd.toy.GaussianMixture(full.means[:2], full.variances[:2], full.weights[:2])
    flow = sd.RectifiedFlow()
    x_T = initial_noise(8, 16, 0)
    solvers = {
        "2m": sd.solvers.DPMSolverPPMultistep(order=2, max_h=math.inf),
        "2m_flat": sd.solvers.DPMSolverPPMultistep(order=2, max_h=0.8, max_h_ratio=0.0),
        "unipc_2": sd.solvers.UniPC(order=2, max_h=math.inf),
        "unipc_3": "unipc",
        "ddim": "ddim",
    }
    for (w, k), r in rows.items():
        cfg = sd.guidance.CFG(part.denoiser(flow), full.denoiser(flow), w)
        ref = sd.sample(cfg, x_T, 800, "dpmpp_2m", "logsnr_uniform")
        for name, solver in solvers.items():
            assert float(r[name]) == pytest.approx(rel_rmse(sd.sample(cfg, x_T, k, solver), ref), rel=1e-5)
        assert float(r["default"]) == pytest.approx(rel_rmse(sd.sample(cfg, x_T, k), ref), rel=1e-5)
    assert rows[7.5, 5]["default"] == rows[7.5, 5]["ddim"] == rows[7.5, 5]["2m_flat"]
    # from 15 steps UniPC-2; at 7.5 its steps above 0.8 (here the last three, up to 1.51) at first order
    assert rows[2.0, 15]["default"] == rows[2.0, 15]["unipc_2"]
    limited = sd.solvers.UniPC(order=2, max_h=0.8, max_h_ratio=0.0)
    cfg = sd.guidance.CFG(part.denoiser(flow), full.denoiser(flow), 7.5)
    ref = sd.sample(cfg, x_T, 800, "dpmpp_2m", "logsnr_uniform")
    assert float(rows[7.5, 15]["default"]) == pytest.approx(
        rel_rmse(sd.sample(cfg, x_T, 15, limited), ref), rel=1e-5
    )
    assert rows[7.5, 15]["default"] != rows[7.5, 15]["unipc_2"]


@pytest.mark.slow  # 10-17 s: in make test-slow, out of make test's default run
def test_bench_guided_validate_is_the_default_against_the_old_one(tmp_path, capsys):
    """``bench guided --validate``: per set, ``sd.sample``'s guided default and the old default (2M with
    ``guided_max_h(scale)`` below 15 steps, UniPC-2 without a limit from there) against the guided ODE (800
    steps of 2M, log-SNR-uniform from the grid's first node: below ``t_max`` under ``leading``); here SD
    betas on the 16-d mixture, 8 samples, scales 2 and 7.5 at 5 and 15 steps, and the digits model at
    scale 2 and 5 steps. The pooled row's count and geometric mean of default / old default are the
    CSV's."""
    argv = ["bench", "guided", "--validate", "--quick", "--problem", "16d-sd", "--n", "8", "--draws", "1"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "guided_validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = capsys.readouterr().out
    assert (tmp_path / "guided_validation.txt").read_text() in out
    assert [r["set"] for r in rows] == ["(a) seeds +100"] * 4 + ["(b) digits"] + [
        f"(c) {s}" for s in ("logsnr_uniform", "karras", "linspace", "trailing", "leading") for _ in range(4)
    ] + ["(d) karras +200"] * 4 + ["(d) logsnr +200"] * 4

    full = sd.toy.default_benchmark_mixture(dim=16)
    part = sd.toy.GaussianMixture(full.means[:2], full.variances[:2], full.weights[:2])
    proc = sd.VP.scaled_linear()
    for name, seed in (("(a) seeds +100", 100), ("(c) leading", 0), ("(d) karras +200", 200)):
        x_T = initial_noise(8, 16, seed)
        for r in (r for r in rows if r["set"] == name):
            w, k, schedule = float(r["scale"]), int(r["steps"]), r["schedule"]
            t0 = float(sd.schedules.get(schedule)(proc, k)[0])
            assert (t0 < proc.t_max) == (schedule == "leading")
            lam = torch.linspace(float(proc.lam(t0)), float(proc.lam(proc.t_min)), 800, dtype=torch.float64)
            nodes = proc.t_of_lam(lam)
            nodes[0], nodes[-1] = t0, proc.t_min
            cfg = sd.guidance.CFG(part.denoiser(proc), full.denoiser(proc), w)
            ref = sd.sample(cfg, x_T, 800, "dpmpp_2m", sd.schedules.Custom(nodes))
            old = (
                sd.solvers.DPMSolverPPMultistep(order=2, max_h=sd.sampling.guided_max_h(w), max_h_ratio=0.0)
                if k < 15
                else sd.solvers.UniPC(order=2, max_h=math.inf)
            )
            new = rel_rmse(sd.sample(cfg, x_T, k, schedule=schedule), ref)
            assert float(r["default"]) == pytest.approx(new, rel=1e-4)
            assert float(r["old_default"]) == pytest.approx(
                rel_rmse(sd.sample(cfg, x_T, k, old, schedule), ref), rel=1e-4
            )
    pooled = re.search(r"^pooled +(\d+) +([\d.]+) ", out, re.M)
    assert pooled is not None and int(pooled[1]) == len(rows)
    ratios = [math.log(float(r["default"]) / float(r["old_default"])) for r in rows]
    assert float(pooled[2]) == pytest.approx(math.exp(sum(ratios) / len(ratios)), abs=6e-4)


def test_bench_guided_validate_pools_the_draws_of_the_digits_set_too(tmp_path, capsys, monkeypatch):
    """``--draws D``: the digits set (b) runs the first ``N`` samples of each of ``D`` draws of its ``x_T``
    (``randn(4096, 1, 8, 8)`` of seeds ``SEED, SEED + 1, ...``), pooled, and the report says which seeds
    each set drew. The guided ODE and the runs are replaced by stand-ins: what is checked is the x_T."""
    from steerdiff.bench import guided

    seen: list[torch.Tensor] = []

    def case(problem, den, x_T, ref, w, grid, schedule, candidates, **cond):
        seen.append(x_T)
        return guided.GuidedCase(problem, w, grid.steps, dict.fromkeys(candidates, 0.5), schedule)

    def gmm_sets(n, seed, draws, *, schedule, **_):
        return guided.GuidedBench(
            [guided.GuidedCase("16d-sd", 2.0, 5, {"default": 0.5, "old_default": 1.0}, schedule)],
            {("16d-sd", 2.0): 1e-3},
            n,
            draws,
            0.0,
        )

    monkeypatch.setattr(guided, "_case", case)
    monkeypatch.setattr(guided, "guided_reference", lambda den, x_T, steps, **cond: (x_T, 1e-3))
    monkeypatch.setattr(guided, "run", gmm_sets)
    argv = ["bench", "guided", "--validate", "--quick", "--problem", "16d-sd", "--n", "3", "--draws", "3"]
    assert main([*argv, "--seed", "5", "--no-progress", "--out", str(tmp_path)]) == 0
    # before: one draw, the first 3 samples of seed 5's, whatever --draws said
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    draws = [torch.randn(4096, 1, 8, 8, generator=g, dtype=F64)[:3] for g in gens]
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat(draws))
    out = capsys.readouterr().out
    # before: "(b) ... the first 3 samples of its x_T (seed 5)"; (a) and (d) said two seeds whatever --draws
    assert "(a) bench guided's problems from x_T seeds 105-107, karras_capped" in out
    assert "digit 3 on the first 3 samples of each of 3 draws of x_T (seeds 5-7), karras_capped" in out
    assert "(d) bench guided's problems from x_T seeds 205-207, karras" in out
    with pytest.raises(SystemExit):
        main(["bench", "guided", "--help"])
    assert "with --validate in every set, the digits model's too" in " ".join(capsys.readouterr().out.split())


def test_bench_guided_validation_quotes_each_reference_check_with_its_own_set():
    """The line on (a), (c), (d) quotes the check of their 800-step references alone; the digits set's
    400-step reference, checked on time_uniform, has its own. Before, the first quoted the largest gap of
    every set: the committed report read "(a), (c), (d): ... checked against unipc (within 3.1e-03)",
    the digits reference's gap, where the bench guided references of seed 0 agree within 4.2e-05."""
    from steerdiff.bench import guided

    def bench(gap: float) -> guided.GuidedBench:
        case = guided.GuidedCase("16d-sd", 2.0, 5, {"default": 0.5, "old_default": 1.0})
        return guided.GuidedBench([case], {("16d-sd", 2.0): gap}, 256, 2, 0.0)

    sets = {"(a) seeds +100": bench(4.2e-5), "(b) digits": bench(3.1e-3), "(d) karras +200": bench(2.0e-5)}
    out = guided.format_validation(guided.GuidedValidation(sets, 0, 2, 0.0))
    assert "logsnr_uniform, checked against unipc (within 4.2e-05)" in out
    digits = "400-step guided ODE (dpmpp_2m, logsnr_uniform; checked against unipc on time_uniform, within"
    assert digits + " 3.1e-03)" in out


def test_diffusers_candidates_include_our_default_algorithm_and_sigma_spacings():
    """(b)'s "best diffusers configuration" is searched over a set that offers diffusers the algorithm
    of sd.sample's default (UniPC of its order and variant: our best at NFE 10 and 20) and each sigma
    spacing diffusers has for a schedule we search (karras, exponential), for every scheduler class
    that takes it; each configuration under its own (method, schedule), the key (b) looks it up by."""
    pytest.importorskip("diffusers")
    import inspect

    configs = diffusers_configs()
    made = [(c, c.make()) for c in configs]
    ours = sd.solvers.get(sd.sampling.DEFAULT_SOLVER)
    assert any(
        type(s).__name__ == "UniPCMultistepScheduler"
        and s.config.solver_order == ours.order
        and s.config.solver_type == ours.variant
        for _, s in made
    )
    for cls in {type(s) for _, s in made}:
        takes = inspect.signature(cls.__init__).parameters
        for flag in ("use_karras_sigmas", "use_exponential_sigmas"):
            if flag in takes:
                assert any(type(s) is cls and s.config[flag] for _, s in made), (cls.__name__, flag)
    keys = [(c.method, c.schedule()) for c in configs]
    assert len(set(keys)) == len(keys)


def test_bench_discrete_rows_are_the_samplers_against_the_exact_law(tmp_path, capsys):
    """``bench discrete``: each row is ``sd.discrete.sample`` (noise of ``seed + 1``) on the documented
    mixture (K = 4, L = 6, V = 4 from ``seed``; linear schedule, exact denoiser), its TV the oracle's to the
    target's exact table, beside the floor of as many exact samples (8 sets, ``seed + 2`` for the data,
    ``seed + 3`` for ``p(x | y = 0)``). Remasking needs tokens to remask: at 2 steps ReMDM is the ancestral
    sampler draw for draw (nothing is unmasked at t = 1, sigma_max = 0 at the last step).

    Particle rows: ``sd.discrete.fk_steering`` (potential ``difference``) and ``best_of_n`` at 4 and 16
    particles on the same rows, generator ``seed + 1`` for the run and then ``out.sample``, toward ``p(x)
    exp(2 r(x)) / Z``, ``r(x) = sum_i f[i, x^i]``, ``f`` uniform ``(6, 4)`` from ``seed + 5``: the TV and
    ``Z`` from the enumerated table of ``p`` (not ``tilt``), the floor from ``seed + 4``."""
    n, seed = 300, 5
    argv = ["bench", "discrete", "--quick", "--n", str(n), "--seed", str(seed), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "discrete.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = {(r["guidance"], r["sampler"], int(r["steps"])): r for r in table if not r["particles"]}
    steered = {
        (r["guidance"], r["sampler"], int(r["steps"]), int(r["particles"])): r
        for r in table
        if r["particles"]
    }
    unguided = [(s, k) for s in ("ancestral", "remdm eta=0.02", "remdm eta=0.1") for k in (2, 8)]
    guided = [
        (g, s, k)
        for g in ("classifier", "cfg w=1", "cfg w=3")
        for s, k in (("first_hitting", 6), ("ancestral", 4))
    ]
    assert set(rows) == {("none", s, k) for s, k in unguided} | {("none", "first_hitting", 6)} | set(guided)
    particle_runs = [
        ("fk lam=2", "first_hitting", 6),
        ("fk lam=2", "ancestral", 4),
        ("best_of_n", "first_hitting", 6),
    ]
    assert set(steered) == {(*c, m) for c in particle_runs for m in (4, 16)}
    assert len(table) == len(rows) + len(steered)
    out = capsys.readouterr().out
    assert (tmp_path / "discrete.txt").read_text() in out

    g = torch.Generator().manual_seed(seed)
    mix = sd.toy.CategoricalMixture(
        torch.rand(4, generator=g, dtype=F64) + 0.5, torch.rand(4, 6, 4, generator=g, dtype=F64) ** 4 + 0.02
    )
    comp = mix.component(0)
    proc = sd.discrete.MaskedProcess(vocab_size=4, schedule="linear")
    den = mix.denoiser(proc)

    def tv(law, model, steps, sampler, **cond) -> float:
        x = sd.discrete.sample(
            model, (n, 6), steps, sampler, generator=torch.Generator().manual_seed(seed + 1), **cond
        )
        return law.total_variation(x)

    def floor(law, s: int) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(s)
        d = torch.tensor([law.total_variation(law.sample(n, gen)) for _ in range(8)])
        return float(d.mean()), float(d.std())

    cfg3 = sd.discrete.CFG(den, den, 3.0, uncond_kwargs={"y": -1})
    cg = sd.discrete.ClassifierGuidance(den, mix.classifier(0, proc.mask_id))
    for key, want in [
        (("none", "ancestral", 8), tv(mix, den, 8, "ancestral")),
        (("none", "remdm eta=0.1", 8), tv(mix, den, 8, sd.discrete.ReMDM(0.1))),
        (("none", "first_hitting", 6), tv(mix, den, None, "first_hitting")),
        (("classifier", "ancestral", 4), tv(comp, cg, 4, "ancestral")),
        (("cfg w=3", "first_hitting", 6), tv(comp, cfg3, None, "first_hitting", y=0)),
    ]:
        assert float(rows[key]["tv"]) == pytest.approx(want, rel=1e-5), key
    assert rows["none", "remdm eta=0.02", 2]["tv"] == rows["none", "ancestral", 2]["tv"]
    assert rows["none", "remdm eta=0.1", 8]["tv"] != rows["none", "ancestral", 8]["tv"]
    for key, target, s in [
        (("none", "ancestral", 2), mix, seed + 2),
        (("cfg w=1", "ancestral", 4), comp, seed + 3),
    ]:
        mean, std = floor(target, s)
        assert (float(rows[key]["floor_mean"]), float(rows[key]["floor_std"])) == pytest.approx(
            (mean, std), rel=1e-5
        )
    # NFE: one a step, one a token for first_hitting, two a step for CFG at w = 3 (one at w = 1)
    assert [
        int(rows[k]["nfe"])
        for k in [("none", "first_hitting", 6), ("cfg w=1", "ancestral", 4), ("cfg w=3", "ancestral", 4)]
    ] == [6, 4, 8]
    # at floor: TV within 3 std above the floor's mean; CFG at w > 1 has no closed-form target
    for r in rows.values():
        excess = (float(r["tv"]) - float(r["floor_mean"])) / float(r["floor_std"])
        assert r["at_floor"] == ("n/a" if r["guidance"] == "cfg w=3" else "yes" if excess <= 3 else "no")
    assert rows["none", "ancestral", 2]["at_floor"] == "no"  # two steps: tokens drawn 3 at a time
    assert rows["classifier", "first_hitting", 6]["at_floor"] == "yes"  # exact with exact parts

    # particle steering toward p exp(2 r) / Z, from the enumerated table of p
    f = torch.rand(6, 4, generator=torch.Generator().manual_seed(seed + 5), dtype=F64)
    codes = torch.arange(4**6)
    seqs = torch.stack([codes // 4 ** (5 - i) % 4 for i in range(6)], dim=1)  # table order

    def reward(x):
        return f[torch.arange(6), x].sum(-1)

    weighted = mix.table() * torch.exp(2.0 * reward(seqs))
    log_z = math.log(float(weighted.sum()))
    tilted = weighted / weighted.sum()
    assert torch.allclose(mix.tilt(f, 2.0).table(), tilted, rtol=1e-12, atol=0)

    def tv_tilted(x) -> float:
        counts = torch.bincount(mix.index(x), minlength=4**6).to(F64)
        return 0.5 * float((counts / len(x) - tilted).abs().sum())

    for key in [("fk lam=2", "first_hitting", 6, 16), ("fk lam=2", "ancestral", 4, 4)]:
        g = torch.Generator().manual_seed(seed + 1)
        sampler, steps = key[1], None if key[1] == "first_hitting" else key[2]
        out = sd.discrete.fk_steering(
            den,
            reward,
            2.0,
            "difference",
            shape=(n, 6),
            particles=key[3],
            steps=steps,
            sampler=sampler,
            generator=g,
        )
        z = torch.exp(out.log_z - log_z)
        r = steered[key]
        assert float(r["tv"]) == pytest.approx(tv_tilted(out.sample(g)), rel=1e-5), key
        assert (float(r["z_ratio"]), float(r["z_se"])) == pytest.approx(
            (float(z.mean()), float(z.std()) / math.sqrt(n)), rel=1e-5
        ), key
    g = torch.Generator().manual_seed(seed + 1)
    out = sd.discrete.best_of_n(den, reward, shape=(n, 6), particles=16, sampler="first_hitting", generator=g)
    bon = steered["best_of_n", "first_hitting", 6, 16]
    assert float(bon["tv"]) == pytest.approx(tv_tilted(out.sample(g)), rel=1e-5)
    assert bon["z_ratio"] == bon["z_se"] == ""  # best-of-N estimates no Z
    gen = torch.Generator().manual_seed(seed + 4)
    law = mix.tilt(f, 2.0)
    d = torch.tensor([law.total_variation(law.sample(n, gen)) for _ in range(8)])
    assert (float(bon["floor_mean"]), float(bon["floor_std"])) == pytest.approx(
        (float(d.mean()), float(d.std())), rel=1e-5
    )
    # NFE = particles x steps; fk's first_hitting target is the tilted law itself: Z_hat unbiased for Z
    assert [int(r["nfe"]) for r in steered.values()] == [m * k for _, _, k, m in steered]
    fh = steered["fk lam=2", "first_hitting", 6, 16]
    assert abs(float(fh["z_ratio"]) - 1) < 3 * float(fh["z_se"])
    for (guidance, _, _, _), r in steered.items():
        excess = (float(r["tv"]) - float(r["floor_mean"])) / float(r["floor_std"])
        assert r["at_floor"] == ("n/a" if guidance == "best_of_n" else "yes" if excess <= 3 else "no")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "discrete.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
