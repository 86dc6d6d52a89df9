"""``steerdiff demo``, ``steerdiff sample --model digits`` and ``steerdiff bench solvers --model digits``
on the committed digits weights (issue 6, parts 2 and 4).

Oracles: the clean classifier's labels (a steered sample must be recognized as its target digit; the
unsteered rate is the class frequency, about 10%), exact NFE accounting, the observation (an inpainted
image must agree with the observed half to the likelihood's tolerance), the 1,000-step ODE solution
(solver error falls with NFE, faster for higher order), and the Frechet distance of real images of
other classes. The full-size claims (Frechet ratio at NFE 10 against 1,000-step DDPM, 90% accuracy
at n = 512) are marked slow.
"""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch

from steerdiff import demo
from steerdiff.bench import digits as bench
from steerdiff.cli import main
from steerdiff.inverse import Inpaint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models():
    return bench.load_models()


@pytest.fixture(scope="module")
def small(models, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(out, n=64, digit=3, seed=0, progress=False, models=models), out


def test_demo_rows_nfe_and_files(small):
    result, out = small
    nfe = {r.method: r.nfe for r in result.rows}
    assert nfe == {
        "unipc": 10,
        "ddim": 10,
        "ddpm": 1000,
        "real": None,
        "cfg": 20,  # two network evaluations per step
        "classifier": demo.CLASSIFIER_STEPS,
        "fk_steering": demo.PARTICLES * demo.SMC_STEPS,
        "tds": demo.PARTICLES * demo.SMC_STEPS,
        "real 3": None,
        "dps inpaint": demo.DPS_STEPS,
        "tds inpaint": demo.PARTICLES * demo.SMC_STEPS,
        "nearest upper half": None,
    }
    refs = {r.method: r.fd_ref for r in result.rows}
    assert {k for k, v in refs.items() if v == "all"} == {"unipc", "ddim", "ddpm", "real"}
    assert all(r.samples.shape == (16, 1, 8, 8) and r.seconds >= 0 for r in result.rows)
    assert result.png == out / "demo.png" and result.png.read_bytes()[:8] == PNG_MAGIC
    with open(out / "demo.csv") as f:
        lines = list(csv.DictReader(f))
    assert [x["method"] for x in lines] == [r.method for r in result.rows]
    assert float(lines[4]["accuracy"]) == pytest.approx(result.rows[4].accuracy, abs=1e-4)
    table = demo.format_table(result)
    assert table.count("\n| ") == 1 + len(result.rows)  # header + one line per row
    assert "FD ratio unipc NFE 10 / DDPM 1000" in table and "unsteered (unipc)" in table


def test_demo_steering_hits_the_digit(small, models):
    result, _ = small
    acc = {r.method: r.accuracy for r in result.rows}
    # unsteered: about the class frequency (10%); steered: recognized (measured 0.94-1.0 at n = 64)
    for k in ("unipc", "ddim", "ddpm", "real"):
        assert acc[k] <= 0.3, (k, acc[k])
    for k in ("cfg", "classifier", "fk_steering"):
        assert acc[k] >= 0.9, (k, acc[k])
    assert acc["tds"] >= 0.85 and acc["real 3"] >= 0.95
    # inpainting: an upper half of a 3 is ambiguous (the training images with the nearest upper halves
    # are 3s for 69%); the completions do at least as well (measured 0.78-0.89)
    assert 0.6 <= acc["nearest upper half"] <= 0.8
    for k in ("dps inpaint", "tds inpaint"):
        assert acc[k] >= acc["nearest upper half"] - 0.05, (k, acc[k])
    # in feature space the targeted rows sit with the held-out 3s, far from real digits of all classes
    other = models.frechet(models.real(64, seed=1), digit=3)
    for r in result.rows:
        assert math.isfinite(r.fd) and r.fd > 0
        if r.fd_ref == "3" and r.method != "nearest upper half":
            assert r.fd < 0.2 * other, (r.method, r.fd, other)


def test_demo_inpainting_agrees_with_the_observation(small):
    result, _ = small
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    op = Inpaint(mask)
    y = op.forward(result.observation.nan_to_num(0.0))
    assert torch.equal(result.observation[:, :, 4:].isnan(), torch.ones(16, 1, 4, 8, dtype=torch.bool))
    rms = {r.method: float((op.forward(r.samples) - y).pow(2).mean().sqrt()) for r in result.rows}
    assert rms["tds inpaint"] < 3 * demo.INPAINT_NOISE  # the likelihood's tolerance (measured 0.07)
    assert rms["dps inpaint"] < 3 * demo.INPAINT_NOISE
    assert rms["unipc"] > 0.5  # unconstrained samples do not


def test_demo_bad_input(models, tmp_path):
    for digit in (10, -1, 3.0):
        with pytest.raises(ValueError, match=r"digit must be an integer in \[0, 9\]"):
            demo.run_demo(None, n=8, digit=digit, models=models)
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        demo.run_demo(None, n=1, models=models)
    # before: torch's "RuntimeError: manual_seed expected a long, but got float"
    with pytest.raises(ValueError, match=r"^run_demo: seed must be an integer >= 0, got 1\.5$"):
        demo.run_demo(None, n=8, seed=1.5, models=models)
    with pytest.raises(ValueError, match=r"^run_demo: unknown methods \['best'\]; accepted: "):
        demo.run_demo(None, n=8, methods=["cfg", "best"], models=models)
    # before: its letters, "unknown methods ['c', 'f', 'g']"
    with pytest.raises(
        ValueError, match=r"^run_demo: methods must be a list of names, got the string 'cfg'$"
    ):
        demo.run_demo(None, n=8, methods="cfg", models=models)
    with pytest.raises(FileNotFoundError, match="steerdiff train digits"):
        demo.run_demo(None, n=8, weights=tmp_path)
    # an image size the model cannot take
    with pytest.raises(ValueError, match=r"\(batch, 1, 8, 8\)"):
        models.accuracy(torch.zeros(2, 1, 16, 16), 3)
    with pytest.raises(ValueError, match=r"\(k, 1, 8, 8\)"):
        bench.save_grid([("big", torch.zeros(2, 1, 16, 16))], tmp_path / "x.png")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--digit", "11"],
        ["demo", "--digit", "three"],
        ["sample", "--model", "digits", "--guidance", "cfg", "--label", "11", "--out", "x.png"],
        ["sample", "--model", "digits", "--label", "-1", "--out", "x.png"],
    ],
)
def test_cli_rejects_bad_labels(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert "must be a digit 0-9" in capsys.readouterr().err


# the commands that load the digits weights (``--weights``)
WEIGHTS_COMMANDS = [
    ["demo", "--out", "{tmp}/out"],
    ["sample", "--model", "digits", "--out", "{tmp}/x.png"],
    ["bench", "solvers", "--model", "digits", "--out", "{tmp}/out"],
]


@pytest.mark.parametrize("argv", WEIGHTS_COMMANDS)
def test_cli_missing_weights_say_how_to_train(argv, tmp_path):
    with pytest.raises(SystemExit) as err:
        main([a.format(tmp=tmp_path) for a in argv] + ["--weights", str(tmp_path)])
    assert "not found" in str(err.value.code) and "steerdiff train digits" in str(err.value.code)


@pytest.mark.parametrize("argv", WEIGHTS_COMMANDS)
def test_cli_weights_that_are_not_safetensors_exit_naming_the_file(argv, tmp_path):
    """Before: safetensors' SafetensorError traceback ("Error while deserializing header: header too
    large"), naming no file."""
    bad = tmp_path / "digits_denoiser.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as err:
        main([a.format(tmp=tmp_path) for a in argv] + ["--weights", str(tmp_path)])
    assert str(err.value.code).startswith(f"steerdiff: load_digits_denoiser: {bad} is not a safetensors file")


def test_load_models_refuses_a_file_for_its_folder():
    """Before: "digits denoiser weights not found at FILE/digits_denoiser.safetensors; run `steerdiff train
    digits` to create it", for the committed weights file itself."""
    file = bench.D.weights_path("denoiser")
    message = f"load_models: weights must be a folder of digits_*.safetensors, got the file {file}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        bench.load_models(file)


def test_cli_sample_gmm_rejects_digits_options(tmp_path, capsys):
    """argparse errors: exit status 2, the usage and the reason on stderr."""
    cases = [
        (["--out", str(tmp_path / "x.png")], "need --model digits"),
        (["--out", str(tmp_path / "x.pt"), "--label", "3"], "need --model digits"),
        (["--model", "digits", "--guidance", "classifier", "--out", str(tmp_path / "x.pt")], "needs --label"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as err:
            main(["sample", *extra])
        assert err.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("guidance", ["cfg", "classifier"])
def test_cli_sample_digits(guidance, models, tmp_path, capsys):
    pt, png = tmp_path / "x.pt", tmp_path / "x.png"
    args = ["sample", "--model", "digits", "--guidance", guidance, "--label", "7", "--n", "32"]
    args.append("--no-progress")
    assert main([*args, "--out", str(pt)]) == 0
    assert f"NFE {20 if guidance == 'cfg' else 10}" in capsys.readouterr().out
    x = torch.load(pt)
    assert x.shape == (32, 1, 8, 8)
    assert models.accuracy(x, 7) >= 0.9  # measured 1.0 (cfg), 0.97 (classifier)
    assert main([*args, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_digits_solvers(models, tmp_path):
    torch.set_num_threads(1)
    result = bench.run(
        n=32,
        nfes=(5, 10, 20),
        solver_names=("unipc", "ddim", "heun"),
        models=models,
        guided_scales=(7.5,),
        guided_steps=(10,),
    )
    assert result.reference_gap < 1e-2  # two 1,000-step ODE solutions agree (measured 1.8e-3)
    err = {(r.solver, r.nfe): r.rmse for r in result.rows}
    theirs = bench.DIFFUSERS_ROW
    assert sorted(err) == sorted(
        [(s, k) for s in ("unipc", "ddim", theirs) for k in (5, 10, 20)]
        + [("heun", 5), ("heun", 9), ("heun", 19)]
    )
    for s in ("unipc", "ddim"):
        assert err[(s, 20)] < err[(s, 10)] < err[(s, 5)]
    assert err[("unipc", 20)] < 0.5 * err[("ddim", 20)]  # third order against first (measured 0.27x)
    # issue 2 (a) on the learned model: diffusers' default (2M, linspace, this model's betas) against
    # sd.sample's (measured on these 32 samples: ratios 0.56 at NFE 10, 0.12 at 20; on the bench's 512:
    # 0.59 and 0.12)
    ratios = result.default_vs_diffusers()
    assert sorted(ratios) == [5, 10, 20] and ratios[20] < 0.2 and ratios[10] < 1.0
    assert ratios[20] == pytest.approx(err[("unipc", 20)] / err[(theirs, 20)])
    assert result.baseline("ddpm").nfe == 1000 and result.baseline("reference").rmse == 0.0
    assert result.fd_ratio() == pytest.approx(result.row("unipc", 10).fd / result.baseline("ddpm").fd)
    csv_path, png_path = bench.write_results(result, tmp_path)
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(result.rows) + 3
    assert png_path is not None and png_path.read_bytes()[:8] == PNG_MAGIC
    report = bench.format_report(result)
    assert "| heun | " in report and "(9)" in report and "FD ratio unipc NFE 10 / DDPM 1000" in report
    # CFG toward 3 at scale 7.5, 10 steps, against 400 steps of DPM-Solver++(2M): the guided default
    # (2M, its long steps at first order) stays nearer the guided ODE than UniPC-3 and diffusers' default
    # (measured on these 32 samples: 0.145 against 0.269 and 0.223)
    g = result.guided
    assert g is not None and g.solver.startswith("dpmpp_2m, long steps first order;") and g.batch == 32
    assert max(g.reference_gap) < 1e-2
    (row,) = g.rows
    assert row.diffusers is not None and math.isfinite(row.diffusers)
    assert (row.scale, row.steps) == (7.5, 10)
    assert row.default < 0.75 * row.unipc and row.default < row.diffusers
    assert "classifier-free guidance toward digit 3" in report


@pytest.mark.slow
def test_issue6_claims_at_full_size(models, tmp_path):
    """Issue 6: unconditional digits at NFE 10 with the default solver within 1.5x of 1,000-step DDPM's
    Frechet distance; the target digit recognized in >= 90% of CFG and FK-steered samples."""
    torch.set_num_threads(1)
    result = demo.run_demo(tmp_path, progress=False, models=models)  # n = 512, digit 3, seed 0
    assert result.row("cfg").accuracy >= 0.9 and result.row("fk_steering").accuracy >= 0.9
    assert result.row("unipc").accuracy <= 0.2
    # measured 1.02 (1.15 before the default schedule's floor); at n = 512 the ratio moved between
    # 1.08 and 1.56 over seeds 0-4, so the claim itself is checked at n = 4096 below (measured 1.02,
    # as in `steerdiff bench solvers --model digits`; 1.21 before the floor)
    assert result.fd_ratio() <= 1.5
    solvers = bench.run(n=4096, n_ref=64, nfes=(10,), solver_names=("unipc",), models=models)
    assert solvers.fd_ratio() <= 1.5


def test_bench_digits_no_diffusers_runs_no_diffusers_row(models, monkeypatch):
    """``bench solvers --model digits --no-diffusers`` skips diffusers (before: the flag was ignored and
    diffusers' row ran wherever diffusers was installed)."""

    def no_diffusers() -> None:
        raise AssertionError("diffusers was asked for")

    monkeypatch.setattr(bench, "_diffusers_scheduler", no_diffusers)
    result = bench.run(
        n=4, n_ref=2, nfes=(5,), solver_names=("ddim",), guided_scales=(), guided_steps=(), models=models,
        with_diffusers=False,
    )  # fmt: skip
    assert [(r.solver, r.nfe) for r in result.rows] == [("ddim", 5)]
    seen: dict[str, object] = {}

    class Stop(Exception):
        """Raised by the stand-in run: the CLI's wiring is what is checked."""

    def run(**kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(bench, "run", run)
    for flag, expected in (([], True), (["--no-diffusers"], False)):
        with pytest.raises(Stop):
            main(["bench", "solvers", "--model", "digits", "--quick", "--no-progress", *flag])
        assert seen["with_diffusers"] is expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 1}, "n must be an integer >= 2, got 1"),
        ({"n_ref": 0}, "n_ref must be an integer >= 1, got 0"),
        ({"seed": 0.5}, "seed must be an integer >= 0, got 0.5"),
    ],
)
def test_bench_digits_refuses_bad_counts_before_running(models, monkeypatch, kwargs, message):
    """Before: the two 1,000-step references ran first (minutes at the default n), then frechet_distance's
    or relative_rmse's message ("relative_rmse: x and ref have no entries") or torch's manual_seed error."""

    def no_sampling(*args: object, **kw: object) -> None:
        raise AssertionError("sampled before checking the arguments")

    monkeypatch.setattr(bench, "_timed_sample", no_sampling)
    with pytest.raises(ValueError, match=f"^{re.escape(f'bench.digits.run: {message}')}$"):
        bench.run(**{"n": 8, "n_ref": 4, **kwargs}, nfes=(5,), solver_names=("ddim",), models=models)


def test_rows_and_baselines_by_name(models):
    """``baseline("real")``, documented, raised StopIteration (its row reads "real (4 training images)"), and
    so did an unknown name, for ``DemoResult.row`` too (whose table names "real d"'s row "real 3")."""
    result = bench.run(
        n=4, n_ref=2, nfes=(5,), solver_names=("ddim",), guided_scales=(), guided_steps=(), models=models,
        with_diffusers=False,
    )  # fmt: skip
    real = result.baseline("real")
    assert real.solver == "real (4 training images)"
    assert real.fd == pytest.approx(models.frechet(models.real(4, seed=0)), rel=1e-12)
    message = "DigitsSolverBench.baseline: solver must be one of ['ddpm', 'reference', 'real'], got 'floor'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        result.baseline("floor")
    shown = demo.run_demo(None, n=8, digit=3, progress=False, methods=["real", "real d"], models=models)
    assert shown.row("real 3") is shown.rows[1]
    message = "DemoResult.row: method must be one of ['real', 'real 3'], got 'real d'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        shown.row("real d")


def test_digits_models_score_non_finite_samples_as_failures(models):
    """A sample with a NaN or inf pixel is not a recognized digit and puts the Frechet distance at inf (as
    the other benches' distances). Before: the NaN logits' argmax read 0, so 2 NaN images among 8 zeros
    scored 1.0 on digit 0 and all-NaN images 1.0 too; the Frechet distance raised torch's
    "linalg.eigh: ... ill-conditioned" error, stopping a bench run."""
    x = models.real(8, 0, seed=0).clone()
    assert models.accuracy(x, 0) == 1.0
    x[:2] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    assert models.accuracy(x, 0) == 5 / 8
    assert models.accuracy(torch.full((4, 1, 8, 8), float("nan")), 0) == 0.0
    assert models.frechet(x) == math.inf and models.frechet(x, 0) == math.inf


def test_demo_real_rows_say_when_they_hold_fewer_than_n(models):
    """The digit's training images are fewer than ``n`` at the demo's 512 (146 3s): the row says so, since
    a Frechet distance falls with the count (subsets of 2,048 samples of label 3, default solver, 20 steps:
    63.5 at 146, 57.6 at 512, means over 10 subsets). Before:
    'training images', read as the floor at n = 512 ("the floor at this n")."""
    result = demo.run_demo(None, n=200, digit=3, progress=False, methods=["real", "real d"], models=models)
    assert [r.task for r in result.rows] == ["training images", "training images (all 146)"]
    assert "| real 3 | training images (all 146) |" in demo.format_table(result)
    small = demo.run_demo(None, n=64, digit=3, progress=False, methods=["real d"], models=models)
    assert small.rows[0].task == "training images"
