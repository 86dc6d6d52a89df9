import pytest

import steerdiff as sd

from .reference import diffusers_sample, exact_sample, nodes_of, rel_rmse, sd_betas_config

diffusers = pytest.importorskip("diffusers")


def test_dpmpp_2m_matches_diffusers(gmm, sd_process, x_T):
    sched = diffusers.DPMSolverMultistepScheduler(**sd_betas_config())
    ref, nfe = diffusers_sample(sched, gmm, sd_process, x_T, 10)
    ours, info = sd.sample(
        gmm.denoiser(sd_process), x_T, steps=10, solver="dpmpp_2m", schedule=nodes_of(sched), return_info=True
    )
    assert info.nfe == nfe == 10
    assert rel_rmse(ours, ref) < 1e-4
    assert rel_rmse(ours, exact_sample(gmm, sd_process, x_T)) < 0.1
