import pytest
import torch

import steerdiff as sd


def test_relative_rmse_value_and_shape_check():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    x = ref + torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # ||x - ref||^2 = 3, ||ref||^2 = 25 (means over the same 4 entries)
    assert sd.metrics.relative_rmse(x, ref) == pytest.approx((3 / 25) ** 0.5, rel=1e-15)
    assert sd.metrics.relative_rmse(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        sd.metrics.relative_rmse(x, ref[:1])


def test_sliced_wasserstein_of_a_shift():
    # for Y = X + v, W_2(theta^T X, theta^T Y) = |theta . v| exactly, so SW_2 = |v| / sqrt(d)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    v = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    sw = sd.metrics.sliced_wasserstein(x, x + v, 4000, torch.Generator().manual_seed(1))
    assert sw == pytest.approx(0.5, rel=0.03)
    same = sd.metrics.sliced_wasserstein(x, x.clone(), 64, torch.Generator().manual_seed(1))
    assert same == pytest.approx(0.0, abs=1e-12)
    # the same generator state gives the same projections
    a = sd.metrics.sliced_wasserstein(x, x + v, 8, torch.Generator().manual_seed(5))
    b = sd.metrics.sliced_wasserstein(x, x + v, 8, torch.Generator().manual_seed(5))
    assert a == b
    # a set against its own duplicate (sizes n and 2n) is the same law as against itself
    sorted_ = sd.metrics.sliced_wasserstein(x, x + v, 64, torch.Generator().manual_seed(5))
    doubled = sd.metrics.sliced_wasserstein(x, torch.cat([x, x]) + v, 64, torch.Generator().manual_seed(5))
    assert doubled == pytest.approx(sorted_, rel=1e-12)
    # the block matching (sizes 500 and 1000) against POT's general 1-D solver on the same projections
    ot = pytest.importorskip("ot")
    y = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    theta = torch.randn(4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    block = sd.metrics.sliced_wasserstein(x, y, 32, torch.Generator().manual_seed(2))
    assert block == pytest.approx(float(ot.sliced_wasserstein_distance(x, y, projections=theta)), rel=1e-9)
    with pytest.raises(ValueError, match="dimensions differ"):
        sd.metrics.sliced_wasserstein(x, x[:, :3])


def test_mmd_is_unbiased_and_detects_a_shift():
    g = torch.Generator().manual_seed(0)
    draws = [torch.randn(400, 3, generator=g, dtype=torch.float64) for _ in range(10)]
    same = [sd.metrics.mmd(draws[i], draws[i + 1]) for i in range(0, 10, 2)]
    assert abs(sum(same) / len(same)) < 2e-3  # unbiased: centred on 0
    assert sd.metrics.mmd(draws[0], draws[1] + 1.0) > 0.1


def test_floor_is_the_metric_between_exact_sets():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    small = sd.metrics.floor(gmm.sample, 200, repeats=4)
    large = sd.metrics.floor(gmm.sample, 1600, repeats=4)
    assert 0 < large < small  # the floor shrinks with the sample size


def test_floor_against_a_fixed_reference():
    gmm = sd.toy.GaussianMixture(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    ref = gmm.sample(4000, torch.Generator().manual_seed(9))
    seen = []
    value = sd.metrics.floor(gmm.sample, 100, lambda a, b: seen.append(b) or 1.0, repeats=3, reference=ref)
    assert value == 1.0 and len(seen) == 3 and all(b is ref for b in seen)
