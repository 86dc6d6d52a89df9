"""Backpropagation through the sampler (reward fine-tuning through the chain, as DRaFT): the autograd
directional derivative of a loss on ``sd.sample``'s output, with respect to ``x_T`` and to a net
parameter, equals a central finite difference in float64."""

from __future__ import annotations

import pytest
import torch

import steerdiff as sd

F64 = torch.float64


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.3 * torch.randn(6, 6, generator=g, dtype=F64))
        self.freq = torch.nn.Parameter(torch.randn(6, generator=g, dtype=F64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) + torch.sin(t[:, None] / 1000 * self.freq)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "dpm_solver"])
def test_gradient_through_sample_equals_finite_differences(solver):
    net = _Net()
    den = sd.Denoiser(net, sd.VP.scaled_linear(), "eps")
    g = torch.Generator().manual_seed(1)
    x_T, dx, target = (torch.randn(3, 6, generator=g, dtype=F64) for _ in range(3))
    dw = torch.randn(6, generator=g, dtype=F64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (sd.sample(den, x, steps=6, solver=solver) - target).square().sum()

    x = x_T.clone().requires_grad_(True)
    loss(x).backward()
    auto_x, auto_w = float((x.grad * dx).sum()), float((net.freq.grad * dw).sum())
    eps = 1e-6
    with torch.no_grad():
        fd_x = float(loss(x_T + eps * dx) - loss(x_T - eps * dx)) / (2 * eps)
        freq = net.freq.clone()
        net.freq.copy_(freq + eps * dw)
        up = loss(x_T)
        net.freq.copy_(freq - eps * dw)
        fd_w = float(up - loss(x_T)) / (2 * eps)
        net.freq.copy_(freq)
    assert abs(fd_x) > 1e-3 and abs(fd_w) > 1e-3
    assert auto_x == pytest.approx(fd_x, rel=1e-7)
    assert auto_w == pytest.approx(fd_w, rel=1e-7)
