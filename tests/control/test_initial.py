"""The initial-distribution SDE on [-T, 0] (ELEGANT eq. 8-10): q = 0 gives nu_ini exactly; its chain is exact."""

from __future__ import annotations

import math

import torch

from rlft.control.initial import BrownianChain, InitialControl
from rlft.models.gmm import GMMModel


def test_zero_control_gives_the_standard_normal_with_zero_kl():
    model = GMMModel.create([1.0], [[0.0, 0.0, 0.0]], [1.0], num_steps=5).to(dtype=torch.float64)
    init = InitialControl(model, num_steps=10, hidden=16, depth=1).double()
    with torch.no_grad():
        x0, kl = init.init_sample(40_000, torch.Generator().manual_seed(0))
    assert x0.shape == (40_000, 3) and x0.dtype == torch.float64
    assert float(kl.abs().max()) == 0.0
    assert torch.allclose(x0.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.02)
    assert torch.allclose(torch.cov(x0.T), torch.eye(3, dtype=torch.float64), atol=0.03)


def test_brownian_chain_score_ode_and_kernel_are_those_of_its_gaussian_marginals():
    chain = BrownianChain((2,), num_steps=8).to(dtype=torch.float64)
    assert abs(sum(chain.std(j) ** 2 for j in range(8)) - 1.0) < 1e-12  # total variance 1: nu_ini = N(0, I)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    j = 3
    v = j / 8
    logp = (-0.5 * (x**2).sum(-1) / v).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert torch.allclose(chain.score(j, x.detach()), grad)
    # ODE step maps N(0, v_j) onto N(0, v_{j+1}); the reverse kernel maps N(0, v_{j+1}) onto N(0, v_j)
    assert math.isclose(float(chain.ode_step(j, torch.ones(1, 2, dtype=torch.float64))[0, 0]) ** 2 * v, (j + 1) / 8)
    scale, std = chain.noise_kernel(j)
    assert math.isclose(scale**2 * (j + 1) / 8 + std**2, v)
    assert torch.equal(chain.prior_sample(3), torch.zeros(3, 2, dtype=torch.float64))


def test_linear_value_is_matched_by_the_exact_tilt():
    """With a(x) = w.x the optimum of eq. 10 is nu* = N(w/alpha, I), KL = |w|^2 / (2 alpha^2) (Theorem 2)."""
    torch.manual_seed(0)
    model = GMMModel.create([1.0], [[0.0, 0.0]], [1.0], num_steps=5).to(dtype=torch.float64)
    init = InitialControl(model, num_steps=8, hidden=32, depth=2).double()
    w = torch.tensor([0.6, -0.3], dtype=torch.float64)
    alpha = 0.5

    def value(x: torch.Tensor) -> torch.Tensor:
        return x @ w

    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(init.net.parameters(), lr=1e-2)
    for _ in range(150):
        obj, _ = init.objective(value, alpha, 256, gen)
        opt.zero_grad()
        (-obj).backward()
        opt.step()
    with torch.no_grad():
        x0, kl = init.init_sample(8000, gen)
    assert torch.allclose(x0.mean(0), w / alpha, atol=0.06)
    assert abs(float(kl.mean()) - float(w @ w) / (2 * alpha**2)) < 0.05
    j_opt = float(w @ w) / (2 * alpha)  # max of E[w.x] - alpha KL
    assert float((x0 @ w).mean() - alpha * kl.mean()) > j_opt - 0.03
