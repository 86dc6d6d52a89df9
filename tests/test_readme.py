"""The README and the docs/ pages it links to say what the code does: their examples run as printed (the
worked example of a new solver is second order against the exact ODE and the heun-weighted DPM-Solver++(2M) of
the library to round-off), their tables are the registries, their commands parse and their links resolve."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import steerdiff as sd

from ._docs import PAGES, README, ROOT, anchors, block, first_cells, name, page_of
from .reference import slope

DOCS = ROOT / "docs"


def test_the_custom_solver_example_runs_and_is_second_order():
    scope: dict[str, object] = {}
    heading = "# Your own solver, schedule, process or guidance"
    exec(compile(block(heading), name(page_of(heading)), "exec"), scope)
    solver, gmm, proc, x_T, exact = (scope[k] for k in ("ExpAB2", "gmm", "proc", "x_T", "exact"))
    den = gmm.denoiser(proc)
    steps = [10, 20, 40]
    errors = [sd.metrics.relative_rmse(sd.sample(den, x_T, n, solver()), exact) for n in steps]
    assert 1.7 < slope(steps, errors) < 2.4, errors  # measured 2.1
    library = sd.solvers.DPMSolverSDEMultistep(
        order=2, eta=0.0, solver_type="heun", max_h=math.inf, max_h_ratio=0.0
    )
    torch.testing.assert_close(
        sd.sample(den, x_T, 20, solver()), sd.sample(den, x_T, 20, library), rtol=0, atol=1e-12
    )


def test_the_custom_process_example_is_vp_linear_to_round_off():
    scope: dict[str, Any] = {}
    heading = "## Your own process"
    exec(compile(block(heading), name(page_of(heading)), "exec"), scope)
    mine, lib, gmm, x_T = (scope[k] for k in ("mine", "lib", "gmm", "x_T"))
    assert isinstance(mine, sd.processes.Process) and type(mine) is not type(lib)
    t = torch.linspace(lib.t_min, lib.t_max, 1001, dtype=torch.float64)
    for f in ("alpha", "sigma", "lam", "coefficients", "sigma_ratio", "d_alpha", "d_sigma"):
        torch.testing.assert_close(getattr(mine, f)(t), getattr(lib, f)(t), rtol=1e-10, atol=0, msg=f)
    for lam in (lib.lam(t), torch.linspace(-12.0, 12.0, 97, dtype=torch.float64)):
        torch.testing.assert_close(mine.t_of_lam(lam), lib.t_of_lam(lam), rtol=1e-10, atol=0)
    # samples by a first- and a second-order ODE step, Heun in time and an SDE (its noise drawn alike)
    for solver, schedule in [
        ("ddim", "time_uniform"),
        ("dpmpp_2m", "karras"),
        ("heun", "logsnr_uniform"),
        ("ddpm", "time_uniform"),
    ]:
        a, b = (
            sd.sample(gmm.denoiser(p), x_T, 10, solver, schedule, generator=torch.Generator().manual_seed(1))
            for p in (mine, lib)
        )
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=solver)
    assert sd.processes.difference(mine, lib) == "another kind (LinearVP against VPLinear)"


def _resolve(root: object, dotted: str) -> object:
    """``sd.solvers.DDIM(eta=…)`` or ``VP.discrete(betas=…)``: the object the name before ``(`` is."""
    obj = root
    for part in dotted.split("(")[0].removeprefix("sd.").split("."):
        obj = getattr(obj, part)
    return obj


def test_the_solver_and_schedule_tables_are_the_registries():
    # the README's compact tables and the docs pages' full ones: each lists every registered name
    for header, registry, module, pages in [
        ("| solver (`solver=`)", sd.solvers.available(), sd.solvers, (README, DOCS / "solvers.md")),
        ("| schedule (`schedule=`)", sd.schedules.available(), sd.schedules, (README, DOCS / "schedules.md")),
    ]:
        for page in pages:
            names = first_cells(page, header)
            registered = [n for n in names if re.fullmatch(r"[a-z0-9_]+", n)]
            assert set(registered) <= set(registry), (name(page), set(registered) - set(registry))
            assert set(registry) <= set(registered), (name(page), set(registry) - set(registered))
            for other in set(names) - set(registered):  # sd.solvers.DDIM(eta=…), sd.schedules.Custom(times)
                assert _resolve(sd, other) is not None
                assert other.startswith(f"sd.{module.__name__.split('.')[-1]}."), other


def test_the_process_tables_name_every_process():
    classes = {sd.VP, sd.VE, sd.EDM, sd.RectifiedFlow, sd.SubVP, sd.MeanReverting}
    for page in (README, DOCS / "processes.md"):
        names = first_cells(page, "| process | α(t)")  # VP.discrete(...), VP.linear, VE, ...: each resolves
        assert {_resolve(sd, n.split(".")[0]) for n in names} == classes, name(page)


# the base class and helpers for writing guidance ("Your own solver, schedule, process or guidance"), not
# methods; CADS is CFG's `cads=`
GUIDANCE_HELPERS = {
    "Guided", "add_score", "denoise_with_grad", "grad_leaf", "grad_on", "hold", "with_estimate",
    "repaint_nfe", "CADS",
}  # fmt: skip


def test_the_guidance_tables_are_the_guidance_module():
    for page in (README, DOCS / "guidance.md"):
        cells = first_cells(page, "| guidance (`sd.guidance.`)")
        names = [n.split("(")[0] for n in cells]
        assert set(names) <= set(sd.guidance.__all__), (name(page), set(names) - set(sd.guidance.__all__))
        assert set(sd.guidance.__all__) - GUIDANCE_HELPERS <= set(names), (
            name(page),
            set(sd.guidance.__all__) - GUIDANCE_HELPERS - set(names),
        )
        assert "cads=" in " ".join(cells), name(page)


def _particle_methods() -> set[str]:
    """The functions of ``sd.smc`` that run a particle system or a search: they return its samples."""
    returns = {"Particles", "TreeSamples", "RolloverSamples"}
    return {
        n
        for n in sd.smc.__all__
        if inspect.isfunction(getattr(sd.smc, n))
        and str(inspect.signature(getattr(sd.smc, n)).return_annotation).rsplit(".", 1)[-1].strip("'>")
        in returns
    }


def test_the_particle_table_and_page_name_every_particle_method():
    methods = _particle_methods()
    assert {"fk_steering", "tds", "run_smc", "dts", "rbf"} <= methods
    assert set(first_cells(README, "| particle method (`sd.smc.`)")) == methods
    page = page_of("# Particle steering and tree search: `sd.smc`").read_text()
    missing = [n for n in methods if f"`{n}`" not in page and f"sd.smc.{n}" not in page]
    assert not missing, missing


def test_the_mcmc_and_discrete_tables_name_every_kernel_and_sampler():
    names = [n.split(" ")[0] for n in first_cells(README, "| MCMC (`sd.mcmc.`)")]
    assert all(n in sd.mcmc.__all__ for n in names), set(names) - set(sd.mcmc.__all__)
    assert {type(sd.mcmc.get(k)).__name__ for k in sd.mcmc.available()} <= set(names)  # ula, ..., lanpaint
    assert set(first_cells(README, "| discrete sampler (`sampler=`)")) == set(sd.discrete.available())


def test_the_paradigms_page_names_every_solver_it_accepts_and_refuses():
    # flow_sde and cps (accepted, equal to sd.sample) were missing from the section's list
    paradigms = importlib.import_module("steerdiff.paradigms")  # sd.paradigms is the function
    section = page_of("# Parallel sampling: `sd.paradigms`").read_text()
    missing = [n for n in sd.solvers.available() if f"`{n}`" not in section]
    assert not missing, missing
    assert set(paradigms.ACCEPTED) == set(sd.solvers.available()) - {"pndm", "plms"}  # the two it refuses


def test_the_ten_lines_run_as_printed(capsys):
    # 16 samples instead of 256: the exact ODE solution (scipy's DOP853 per sample) takes 45 s for 256
    code = block("## Ten lines")
    assert code.count("torch.randn(256, 64,") == 1
    torch.manual_seed(0)  # the block's x_T
    exec(compile(code.replace("torch.randn(256, 64,", "torch.randn(16, 64,"), "README.md", "exec"), {})
    error = float(capsys.readouterr().out)  # the relative RMSE of 20 steps of dpmpp_3m
    assert 0 < error < 0.05, error


def test_every_command_the_readme_docs_and_makefile_show_parses(tmp_path, monkeypatch):
    from steerdiff.cli import build_parser

    text = "".join(page.read_text() for page in PAGES) + (ROOT / "Makefile").read_text()
    commands = set(re.findall(r"`steerdiff ([^`]+)`", text))
    commands |= set(re.findall(r"/bin/steerdiff ([^\n]+)", text))
    commands -= {"bench"}  # the noun: "every `steerdiff bench` command"
    commands = {c for c in commands if not re.search(r"\b[A-Z]{3,}\b|\.\.\.", c)}  # DEV, ...: placeholders
    assert {"demo --out out", "bench solvers --out out", "sample --model digits --guidance cfg --label 7 "
            "--out out/sevens.png", "bench discrete --out out"} <= commands  # fmt: skip
    monkeypatch.chdir(tmp_path)  # --out out is checked where it is parsed
    parser = build_parser()
    for command in sorted(commands):
        args = parser.parse_args(command.split())
        assert callable(args.func), command


def _links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or (fragment and file.suffix == ".md" and fragment not in anchors(file)):
            broken.append(target)
    return broken


def test_every_relative_link_of_the_readme_and_docs_resolves():
    assert len(PAGES) > 10 and all(_links(page) for page in PAGES)  # each page links back at least
    broken = {name(page): b for page in PAGES if (b := _broken_links(page))}
    assert not broken, broken


@pytest.mark.parametrize(
    "link", ["docs/nope.md", "docs/guidance.md#no-such-heading", "#guidance", "docs/bench/nope.png"]
)
def test_a_broken_link_is_found(tmp_path, link):
    page = tmp_path / "README.md"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guidance.md").write_text("# Guidance\n\n## The `CFG(…)` table, 2 ways\n")
    good = "[a](docs/guidance.md) [b](docs/guidance.md#the-cfg-table-2-ways) [c](#readme) `[d](nope.md)`"
    page.write_text(f"# README\n\n{good}\n")
    assert _broken_links(page) == []
    page.write_text(f"# README\n\n{good} [e]({link})\n")
    assert _broken_links(page) == [link]


def test_the_guidance_snippet_runs_with_what_it_is_given():
    from steerdiff.bench.digits import load_models

    # "given a net taking a class label (label=None: unconditional), labels, a 0/1 mask, observed y and a
    # generator g"
    models = load_models(None)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = sd.inverse.Inpaint(mask).forward(torch.zeros(4, 1, 8, 8))
    labels = torch.full((4,), 3)
    scope: dict[str, Any] = {"sd": sd, "den": models.den, "mask": mask, "y": y, "x_T": x_T, "labels": labels}
    scope["g"] = torch.Generator().manual_seed(1)
    code = block("# Guidance")
    exec(compile(code, "docs/guidance.md", "exec"), scope)
    assert scope["x0"].shape == x_T.shape and scope["x0"].isfinite().all()
    # the comment's "then sd.sample(cfg, ...)" with the names the snippet is given: it said label=y, the
    # observed image, which the digits net refuses as a label
    then = re.search(r"# then (sd\.sample\(cfg, .*\))", code)
    assert then is not None, code
    x = eval(then.group(1), scope)
    assert models.classifier(x).argmax(1).tolist() == [3, 3, 3, 3]  # CFG at scale 4 toward 3


def test_the_particle_snippet_runs_with_what_it_is_given():
    # "given a reward mapping samples (n, dim) to (n,), an operator matrix A, observed y and a generator g"
    batch, dim = 2, 8
    gmm, proc = sd.toy.default_benchmark_mixture(dim=dim, components=4), sd.VP.scaled_linear()
    g = torch.Generator().manual_seed(0)
    scope: dict[str, Any] = {
        "sd": sd,
        "den": gmm.denoiser(proc),
        "batch": batch,
        "dim": dim,
        "g": g,
        "s": 0.1,
    }
    scope["reward"] = lambda x: -x.pow(2).sum(-1)
    scope["A"], scope["y"] = torch.randn(2, dim, generator=g), torch.randn(batch, 2, generator=g)
    heading = "# Particle steering and tree search: `sd.smc`"
    exec(compile(block(heading), name(page_of(heading)), "exec"), scope)
    assert scope["out"].x.shape == (batch, 16, dim) and scope["x"].shape == (batch, dim)


def test_the_many_gpus_example_runs_under_torchrun(tmp_path):
    # 6 samples instead of 50,000: one rank per GPU under NCCL where there are GPUs (each sample's noise from
    # a CUDA generator, so the reference is drawn there too), else 4 CPU ranks (gloo; shards 2, 2, 1, 1).
    # samples.pt is one process's batch. (4 ranks on an H200's one GPU failed: the example takes one per GPU)
    code = block("# Many GPUs")
    assert code.count("shape=(50_000, 64)") == 1
    (tmp_path / "samples.py").write_text(code.replace("shape=(50_000, 64)", "shape=(6, 64)"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    gpus = torch.cuda.device_count()
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(gpus or 4),
        "samples.py",
    ]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    den = sd.toy.default_benchmark_mixture().denoiser(sd.VP.scaled_linear())
    x_T, g = sd.distributed.seeded((6, 64), 0, device="cuda" if gpus else None)
    want = sd.sample(den, x_T, 20, "ddpm", generator=g).cpu()
    torch.testing.assert_close(torch.load(tmp_path / "samples.pt"), want, rtol=0, atol=1e-5 if gpus else 1e-6)


def test_the_sampling_page_says_what_the_callbacks_sigma_is():
    """The callback's ``sigma`` is the process's sigma(t) (sample's docstring), not k-diffusion's sigma /
    alpha = exp(-lam(t)): the page says so (it said nothing), and it is so on VP, where the two differ."""
    text = " ".join((DOCS / "sampling.md").read_text().split())
    assert "`sigma`: the process's σ(t) there" in text
    assert "not k-diffusion's σ/α = exp(−λ(t))" in text and "`proc.sigma(t) / proc.alpha(t)`" in text
    proc = sd.VP.cosine()
    one = torch.ones(1, 2, dtype=torch.float64)
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), one, one[0, :1])
    seen: list[dict[str, Any]] = []
    x_T = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sd.sample(gmm.denoiser(proc), x_T, 4, "ddim", callback=seen.append)
    for d in seen[:-1]:
        t = torch.tensor(d["t"], dtype=torch.float64)
        assert d["sigma"] == pytest.approx(float(proc.sigma(t)), rel=1e-12)
        assert float(torch.exp(-proc.lam(t))) > 1.05 * d["sigma"]  # k-diffusion's would be this
    assert seen[-1]["sigma"] == 0.0
