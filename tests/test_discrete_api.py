"""sd.discrete.sample's contract: exact NFE, the callback, per-row reproducibility, the network's time
and conditioning, NaN naming the step, and bad input refused with messages naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import steerdiff as sd

from .discrete_reference import mixture, tv_floor

MIX = mixture()
PROC = sd.discrete.MaskedProcess(MIX.V)
DEN = MIX.denoiser(PROC)


class Counting:
    """The exact net, counting its calls and recording its time inputs and conditioning."""

    def __init__(self, nan_at: int | None = None) -> None:
        self.calls, self.times, self.cond, self.nan_at = 0, [], [], nan_at

    def __call__(self, x, t, **cond):
        self.calls += 1
        self.times.append(t)
        self.cond.append(cond)
        logits = DEN.net(x, t).to(torch.float32)
        return torch.full_like(logits, math.nan) if self.calls == self.nan_at else logits


@pytest.mark.parametrize(
    ("sampler", "steps", "nfe"), [("ancestral", 7, 7), ("remdm", 7, 7), ("first_hitting", None, 5)]
)
def test_nfe_is_exact_and_the_callback_sees_every_step(sampler, steps, nfe):
    net = Counting()
    seen = []
    x, info = sd.discrete.sample(
        sd.discrete.MaskedDenoiser(net, PROC), (4, MIX.L), steps, sampler,
        callback=seen.append, return_info=True, label=3,
    )  # fmt: skip
    assert info.nfe == info.steps == net.calls == len(seen) == nfe
    assert [d["i"] for d in seen] == list(range(nfe)) and [d["nfe"] for d in seen] == list(range(1, nfe + 1))
    assert all(c == {"label": 3} for c in net.cond)
    assert bool((x != MIX.V).all()) and x.dtype == torch.long
    assert seen[-1]["log_probs"].shape == (4, MIX.L, MIX.V) and torch.equal(seen[-1]["x"], x)
    if steps is not None:  # the net is called at the step's start t_i = 1 - i / N, float32
        expected = torch.tensor([1 - i / steps for i in range(steps)], dtype=torch.float32)
        assert torch.equal(torch.stack(net.times)[:, 0], expected) and net.times[0].shape == (4,)
    else:  # first_hitting calls the net at the step's new time s (the state is x_t until then)
        assert torch.equal(torch.stack(net.times), torch.stack([d["t"] for d in seen]).float())


def test_first_hitting_takes_one_step_per_mask_of_the_most_masked_row():
    x_T = torch.tensor([[0, 3, 3, 1, 3], [3, 3, 2, 2, 2]], dtype=torch.int32)
    net = Counting()
    x, info = sd.discrete.sample(
        sd.discrete.MaskedDenoiser(net, PROC), x_T, sampler="first_hitting", return_info=True
    )
    assert info.nfe == net.calls == 3 and x.dtype == torch.int32
    given = x_T != 3
    assert torch.equal(x[given], x_T[given]) and bool((x != 3).all())
    # a fully unmasked batch: nothing to do, and the result is a copy (it was x_T itself)
    again, info = sd.discrete.sample(DEN, x, sampler="first_hitting", return_info=True)
    assert info.nfe == 0 and torch.equal(again, x) and again.data_ptr() != x.data_ptr()
    # steps as any integer type, as ancestral takes it: np.int64(5) was refused as "must be None or 5, got 5"
    x, info = sd.discrete.sample(DEN, (2, MIX.L), np.int64(MIX.L), "first_hitting", return_info=True)
    assert info.nfe == MIX.L and bool((x != 3).all())


@pytest.mark.parametrize(
    ("sampler", "steps"), [("ancestral", 4), ("first_hitting", None), ("remdm", 4), ("confidence", 4)]
)
def test_narrow_integer_tokens_sample_as_long_ones(sampler, steps):
    # uint8 ids (V = 3, mask 3): the carry-over's scatter refused a uint8 index (RuntimeError)
    x_T = torch.tensor([[3, 1, 3, 3, 0], [3, 3, 3, 3, 3]])
    runs = [
        sd.discrete.sample(DEN, x_T.to(dtype), steps, sampler, generator=torch.Generator().manual_seed(0))
        for dtype in (torch.long, torch.uint8)
    ]
    assert runs[1].dtype == torch.uint8 and torch.equal(runs[1].long(), runs[0])


def test_the_time_map_gives_the_net_mdlm_total_noise():
    net = Counting()
    proc = sd.discrete.MaskedProcess(MIX.V, schedule="loglinear")
    sd.discrete.sample(sd.discrete.MaskedDenoiser(net, proc, time_map=proc.total_noise), (2, MIX.L), 4)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    expected = -torch.log1p(-(1 - 1e-3) * t)  # MDLM's log-linear total noise, float64
    torch.testing.assert_close(torch.stack(net.times)[:, 0], expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "remdm", "confidence"])
def test_a_row_is_the_same_whatever_its_batch(sampler):
    steps = None if sampler == "first_hitting" else 6
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch = sd.discrete.sample(DEN, (3, MIX.L), steps, sampler, generator=gens)
    alone = sd.discrete.sample(DEN, (1, MIX.L), steps, sampler, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch[1:2], alone)
    again = sd.discrete.sample(DEN, (3, MIX.L), steps, sampler, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        again, sd.discrete.sample(DEN, (3, MIX.L), steps, sampler, generator=torch.Generator().manual_seed(1))
    )


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting", "remdm", "confidence"])
def test_a_partly_masked_row_is_the_same_whatever_the_masks_of_its_batch(sampler):
    # first_hitting takes as many steps as the most masked row; a row with fewer masks finishes early
    steps = None if sampler == "first_hitting" else 6
    x_T = torch.tensor([[3, 3, 3, 3, 3], [0, 3, 2, 3, 1], [3, 1, 3, 3, 3]])
    batch = sd.discrete.sample(
        DEN, x_T, steps, sampler, generator=[torch.Generator().manual_seed(s) for s in (20, 21, 22)]
    )
    alone = sd.discrete.sample(DEN, x_T[1:2], steps, sampler, generator=[torch.Generator().manual_seed(21)])
    assert torch.equal(batch[1:2], alone)


PC = sd.discrete.Confidence("pc", frequencies=[0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("sampler", ["ancestral", "remdm", "confidence", PC])
def test_one_host_read_per_step_and_no_copy(sampler):
    # on meta (tests/test_device.py's counter): the NaN / no-clean-token checks, read together once per
    # network call; the mask's logit among the ids is filled without a host-to-device copy (it was one
    # per step, with three reads: two checks and a boolean gather), and "pc"'s frequencies are copied to
    # the device once, not at every step (found on an H200)
    from .test_device import _Syncs

    den = sd.discrete.MaskedDenoiser(
        lambda x, t: torch.zeros(*x.shape, 4, device=x.device), sd.discrete.MaskedProcess(4, mask_id=3)
    )

    def count(steps):
        with _Syncs() as mode:
            assert sd.discrete.sample(den, (2, 5), steps, sampler, device="meta").is_meta
        return mode.count

    first = count(1)  # "pc" copies its frequencies to a device at its first run there
    assert first == ({"read": 1, "copy": 1} if isinstance(sampler, sd.discrete.Confidence) else {"read": 1})
    assert count(3) == {"read": 3} and count(6) == {"read": 6}


@pytest.mark.parametrize(("sampler", "steps"), [("ancestral", 5), ("first_hitting", None)])
def test_nan_logits_name_the_step(sampler, steps):
    den = sd.discrete.MaskedDenoiser(Counting(nan_at=3), PROC)
    with pytest.raises(sd.NonFiniteError, match=r"at step 2 \(evaluation 3, t in \[.*\]\).*NaN or \+inf"):
        sd.discrete.sample(den, (2, MIX.L), steps, sampler)


def _net(shape_or_dtype):
    return sd.discrete.MaskedDenoiser(lambda x, t: torch.zeros(*x.shape, 3, dtype=shape_or_dtype), PROC)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sd.discrete.sample(DEN, torch.zeros(2, 5), 4), r"x_T must hold integer token ids.*float32"),
        (lambda: sd.discrete.sample(DEN, torch.zeros(2, 5, dtype=torch.bool), 4), r"integer token ids.*bool"),
        (
            lambda: sd.discrete.sample(DEN, torch.full((2, 5), 7), 4),
            r"ids in \[0, 2\] or the mask id 3, got 7 at \[0, 0\]",
        ),
        (lambda: sd.discrete.sample(DEN, torch.full((5,), 3), 4), r"x_T must be a batch of sequences"),
        (  # an empty batch: first_hitting raised torch's RuntimeError from max()
            lambda: sd.discrete.sample(DEN, torch.full((0, 5), 3), None, "first_hitting"),
            r"x_T must be a batch of sequences, shape \(batch, length\) with both >= 1; got \(0, 5\)",
        ),
        (  # int8 cannot hold ids up to 199: torch's RuntimeError from a clamp
            lambda: sd.discrete.sample(
                sd.discrete.MaskedDenoiser(
                    lambda x, t: torch.zeros(*x.shape, 200), sd.discrete.MaskedProcess(200, 0)
                ),
                torch.zeros(2, 5, dtype=torch.int8),
                4,
            ),
            r"x_T must have an integer dtype that holds the ids up to 199 .*, got torch.int8",
        ),
        (lambda: sd.discrete.sample(DEN, (2, 5, 1), 4), r"x_T must be a shape \(batch, length\)"),
        (lambda: sd.discrete.sample(DEN, (2, 0), 4), r"x_T\[1\] must be an integer >= 1"),
        (lambda: sd.discrete.sample(DEN, (2, 5)), r"steps must be an integer >= 1, got None"),
        (lambda: sd.discrete.sample(DEN, (2, 5), 4, "first_hitting"), r"steps must be None or 5, got 4"),
        (
            lambda: sd.discrete.sample(DEN, (2, 5), 4, "bogus"),
            r"sampler='bogus'; accepted: \['ancestral', 'confidence', 'first_hitting', 'remdm'\]",
        ),
        (
            lambda: sd.discrete.sample(DEN, (2, 5), 4, generator=[torch.Generator()]),
            r"generator must be .* a list of batch = 2",
        ),
        (
            lambda: sd.discrete.sample(DEN, torch.full((2, 5), 3), 4, device="cpu"),
            r"device is for a shape x_T",
        ),
        (lambda: sd.discrete.sample(DEN, (2, 5), 4, callback=1), r"callback must be None or a callable"),
        (lambda: sd.discrete.sample(DEN, (2, 5), 4, progress="no"), r"progress must be True or False"),
        (lambda: sd.discrete.sample(MIX, (2, 5), 4), r"den must be a steerdiff.discrete.MaskedDenoiser"),
        (
            lambda: sd.discrete.sample(_net(torch.long), (2, 5), 4),
            r"floating logits of shape \(2, 5, 3\), got torch.int64",
        ),
        (lambda: sd.discrete.MaskedProcess(0), r"vocab_size must be an integer >= 1"),
        (lambda: sd.discrete.MaskedProcess(3, mask_id=4), r"mask_id must be an integer in \[0, 3\]"),
        (lambda: sd.discrete.MaskedProcess(1, mask_id=0), r"leaves no clean token"),
        (lambda: sd.discrete.MaskedProcess(3, schedule="cos"), r"schedule must be one of \['linear'"),
        (lambda: sd.discrete.MaskedProcess(3, eps=0), r"eps must be a finite number in \(0, 1\)"),
        (lambda: sd.discrete.MaskedProcess(3, sigma_min=2, sigma_max=1), r"need sigma_min < sigma_max"),
        (lambda: sd.discrete.MaskedDenoiser(1, PROC), r"net must be callable"),
        (  # cosine's alpha(2) = 1 - sin(pi) = 1: every token was kept
            lambda: sd.discrete.MaskedProcess(3, schedule="cosine").noise(
                torch.zeros(1, 8, dtype=torch.long), 2.0
            ),
            r"MaskedProcess.noise: t must be a time in \[0, 1\] or one per row of x0 \(1 rows\), got 2.0",
        ),
        (
            lambda: PROC.noise(torch.zeros(2, 8, dtype=torch.long), torch.tensor([0.5, 0.5, 0.5])),
            r"one per row of x0 \(2 rows\), got \[0.5, 0.5, 0.5\]",
        ),
        (  # was torch's RuntimeError from expand
            lambda: DEN.log_probs(torch.full((2, 5), 3), torch.tensor([0.1, 0.2, 0.3])),
            r"MaskedDenoiser: t must be a number or one time per row of x_t \(2\), got shape \(3,\)",
        ),
        (lambda: sd.discrete.ReMDM(eta=1.5), r"ReMDM: eta must be a finite number in \[0, 1\], got 1.5"),
        (
            lambda: sd.discrete.ReMDM(strategy="gibbs"),
            r"ReMDM: strategy must be one of \['cap', 'rescale', 'loop'\]",
        ),
        (
            lambda: sd.discrete.ReMDM(strategy="loop", t_on=0.3, t_off=0.3),
            r"ReMDM: t_off must be a finite number in \[0, 0.3\), got 0.3",
        ),
        (
            lambda: sd.discrete.ReMDM(strategy="loop", t_on=1.5),
            r"ReMDM: t_on must be a finite number in \[0, 1\], got 1.5",
        ),
        (lambda: sd.discrete.ReMDM(t_on=0.5), r"ReMDM: t_on, t_off and alpha_on are the 'loop' strategy's"),
        (
            lambda: sd.discrete.ReMDM(alpha_on=0.5),
            r"ReMDM: t_on, t_off and alpha_on are the 'loop' strategy's",
        ),
        (
            lambda: sd.discrete.ReMDM(strategy="loop", alpha_on=1.0),
            r"ReMDM: alpha_on must be a finite number in \(0, 1\), got 1.0",
        ),
        (  # geometric's alpha(0) = exp(-0.001) = 0.9990: no time has alpha 0.9995
            lambda: sd.discrete.sample(
                MIX.denoiser(sd.discrete.MaskedProcess(MIX.V, schedule="geometric")),
                (2, MIX.L),
                4,
                sd.discrete.ReMDM(strategy="loop", alpha_on=0.9995),
            ),
            r"ReMDM: alpha_on must lie strictly between the schedule's alpha\(1\) = 2.061154e-09 and "
            r"alpha\(0\) = 0.9990005 \(MaskedProcess\(.*geometric.*\)\), got 0.9995",
        ),
        (lambda: MIX.denoiser(sd.discrete.MaskedProcess(4, mask_id=0)), r"clean ids are the tokens 0\.\.2"),
        (
            lambda: sd.toy.CategoricalMixture(torch.ones(2), torch.ones(3, 2, 2)),
            r"probs must have shape \(K, L, V\)",
        ),
        (lambda: sd.toy.CategoricalMixture(torch.tensor([1.0, -1]), torch.ones(2, 2, 2)), r"weights must be"),
        (lambda: MIX.log_prob(torch.full((2, 5), 3)), r"x must hold tokens in \[0, 2\]"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_logits_of_another_shape_are_refused():
    den = sd.discrete.MaskedDenoiser(lambda x, t: torch.zeros(*x.shape, 4), PROC)
    with pytest.raises(
        ValueError,
        match=r"net must return floating logits of shape \(2, 5, 3\), got torch.float32 \(2, 5, 4\)",
    ):
        sd.discrete.sample(den, (2, 5), 4)
    with pytest.raises(sd.NonFiniteError, match=r"step 0 .* -inf for every clean token"):
        sd.discrete.sample(
            sd.discrete.MaskedDenoiser(lambda x, t: torch.full((*x.shape, 3), -math.inf), PROC), (2, 5), 4
        )


def test_the_readme_example_runs_and_samples_the_law():
    from ._docs import block

    scope: dict[str, object] = {"torch": torch, "sd": sd, "print": lambda *a: None}
    exec(compile(block("# Discrete (masked) diffusion"), "docs/discrete.md", "exec"), scope)
    mix, x, xc = scope["mix"], scope["x"], scope["xc"]
    mean, sd_ = tv_floor(mix.table(), len(x))
    assert mix.total_variation(x) < mean + 4 * sd_
    law = mix.component(0)  # classifier guidance with the exact classifier samples p(x | y = 0)
    mean, sd_ = tv_floor(law.table(), len(xc))
    assert law.total_variation(xc) < mean + 4 * sd_
