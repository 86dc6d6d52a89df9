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


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """Tiny tensors: torch's thread pool only adds overhead (4-20x on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
