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
