import pytest
import torch

import steerdiff as sd

from .reference import noise, smooth_mixture


@pytest.fixture(scope="session")
def gmm():
    return smooth_mixture()


@pytest.fixture(scope="session")
def sd_process():
    return sd.VP.scaled_linear()


@pytest.fixture(scope="session")
def x_T():
    return noise(16, 8)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
