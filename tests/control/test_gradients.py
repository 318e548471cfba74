"""The differentiable learners' gradients pinned against closed forms and plain autograd (float64, fixed seeds).

The bed is a 1-D linear-Gaussian chain: the VP chain of a one-component Gaussian "mixture", whose transition
means m_k(x) = A_k x + E_k are affine, so with the control delta_k = c_k theta (the control network's last bias,
its last weights at zero) every moment of x_K is a closed form in theta.
"""

from __future__ import annotations

import pytest
import torch

from rlft.config import task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.sampling import step_kl

SMALL = {"hidden": 4, "depth": 1, "learn_init": False, "drift_iterations_per_train_iteration": 1, "drift_iterations": 10}


def linear_gaussian(learner: dict, alpha: float = 0.5, num_steps: int = 4, reward: dict | None = None):
    data = {
        "model": {"type": "gmm", "weights": [1.0], "means": [[0.7]], "stds": [0.6]},
        "reward": reward or {"type": "linear", "direction": [1.0]},
        "alpha": alpha, "num_steps": num_steps, "seed": 0, "learner": learner,
    }
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps).to(dtype=torch.float64)
    return build_learner(task, model, build_reward(task.reward, model=model))


def affine_steps(model) -> tuple[list[float], list[float]]:
    """(A_k, E_k) with m_k(x) = A_k x + E_k (checked affine at a third point)."""
    one, zero, two = (torch.full((1, 1), v, dtype=torch.float64) for v in (1.0, 0.0, 2.0))
    A, E = [], []
    for k in range(model.num_steps):
        e, a = float(model.mean(k, zero)), float(model.mean(k, one) - model.mean(k, zero))
        assert float(model.mean(k, two)) == pytest.approx(e + 2 * a, rel=1e-12, abs=1e-12)
        A.append(a)
        E.append(e)
    return A, E


def bias_grad(lrn, n: int) -> float:
    """d(drift surrogate)/d(last bias) of one batch of n trajectories."""
    lrn.drift_opt.zero_grad(set_to_none=True)
    obj, _, _ = lrn.drift_objective(n)
    obj.backward()
    return float(lrn.drift_net.net[-1].bias.grad[0])


def test_likelihood_ratio_gradient_with_leave_one_out_baseline_is_unbiased_at_n_4():
    """E[g_LR] over independent batches of n = 4 equals the pathwise gradient; the in-sample baseline
    (b = mean r, i.e. (1 - 1/n) g_LR on every batch) misses it by 25 %, far outside 3 standard errors."""
    n, batches = 4, 1500
    # one step: the estimator's relative spread per batch is 0.8 there (3 at K = 2), so 1500 batches give s.e. 2 %
    lr_learner = linear_gaussian({"type": "elegant", **SMALL, "pathwise_weight": 0.0}, num_steps=1)
    pathwise = linear_gaussian({"type": "elegant", **SMALL, "pathwise_weight": 1.0}, num_steps=1)
    # at theta = 0 the KL gradient is 0: both surrogates' gradients are the reward gradient alone; for a linear
    # reward on an affine chain the pathwise one is deterministic (d x_K / d theta does not depend on the noise)
    exact = bias_grad(pathwise, 64)
    A, _ = affine_steps(pathwise.model)
    c = pathwise.control().scales
    closed = sum(c[k] * torch.tensor(A[k + 1:], dtype=torch.float64).prod().item() for k in range(len(c)))
    assert exact == pytest.approx(closed, rel=1e-10)
    g = torch.tensor([bias_grad(lr_learner, n) for _ in range(batches)], dtype=torch.float64)
    mean, se = float(g.mean()), float(g.std() / batches**0.5)
    assert se < 0.04 * abs(exact)  # the test can tell a 25 % bias apart
    assert abs(mean - exact) < 3 * se
    in_sample = (1 - 1 / n) * mean  # the old estimator on the same batches
    assert abs(in_sample - exact) > 3 * (1 - 1 / n) * se


def test_leave_one_out_advantage():
    from rlft.control.elegant import leave_one_out_advantage

    r = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    expected = torch.stack([r[i] - (r.sum() - r[i]) / 3 for i in range(4)])
    assert torch.equal(leave_one_out_advantage(r), expected)
    assert torch.equal(leave_one_out_advantage(r[:1]), torch.zeros(1, dtype=torch.float64))


def test_elegant_drift_gradient_matches_the_closed_form_on_a_linear_gaussian_chain():
    """delta_k = c_k theta, r = -s/2 (x - y)^2:  dJ/dtheta = -s (mu_K - y) sum_k c_k prod_{j>k} A_j
    - alpha theta sum_k c_k^2 / s_k^2 with mu_K = E[x_K]; ELEGANT's default estimator (w = 0.25, a mix of the
    pathwise and the likelihood-ratio gradients) matches it within 3 standard errors."""
    alpha, theta, y, s = 0.5, 0.3, 1.5, 2.0
    lrn = linear_gaussian({"type": "elegant", **SMALL}, alpha=alpha, num_steps=5,
                          reward={"type": "quadratic", "center": [y], "scale": s})
    assert lrn.options.pathwise_weight == 0.25
    with torch.no_grad():
        lrn.drift_net.net[-1].bias.fill_(theta)
    model, c = lrn.model, lrn.control().scales
    A, E = affine_steps(model)
    K = model.num_steps
    mu, dmu = 0.0, 0.0  # x_0 ~ N(0, 1)
    for k in range(K):
        mu, dmu = A[k] * mu + E[k] + c[k] * theta, A[k] * dmu + c[k]
    exact = -s * (mu - y) * dmu - alpha * theta * sum(c[k] ** 2 / model.std(k) ** 2 for k in range(K))
    g = torch.tensor([bias_grad(lrn, 256) for _ in range(60)], dtype=torch.float64)
    mean, se = float(g.mean()), float(g.std() / 60**0.5)
    kl_part = alpha * theta * sum(c[k] ** 2 / model.std(k) ** 2 for k in range(K))
    assert se < kl_part / 3  # a flipped KL sign (a 2 x kl_part shift) cannot pass
    assert abs(mean - exact) < 3 * se


class StepControl:
    """delta_k(x) = theta_k x: one parameter per step, so each step's gradient can be read off."""

    def __init__(self, theta: torch.Tensor) -> None:
        self.theta = theta

    def __call__(self, k: int, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.theta[k] * x


def _step_grads(lrn, theta: torch.Tensor, x0: torch.Tensor, grad_start: int, seeds: list[int]):
    """(learner's per-step gradient, plain autograd's with x_{grad_start} detached, plain autograd's from x_0)."""
    model, reward, alpha = lrn.model, lrn.train_reward, 0.4
    theta.grad = None
    x, kl = lrn.drift_rollout(x0, seeds, grad_start)
    (reward(x).mean() - alpha * kl.mean()).backward()
    ours = theta.grad.clone()
    with torch.no_grad():  # the noise s_k eps_k of each step, read off the same path
        _, _, path = lrn.drift_rollout(x0, seeds, grad_start, keep_path=True)  # (B, K+1, D)
        noise = [path[:, k + 1] - model.mean(k, path[:, k]) - theta[k] * path[:, k] for k in range(model.num_steps)]

    def plain(start: int) -> torch.Tensor:
        theta.grad = None
        x, kl = path[:, start].detach(), 0.0
        for k in range(start, model.num_steps):
            delta = theta[k] * x
            kl = kl + step_kl(delta, model.std(k))
            x = model.mean(k, x) + delta + noise[k]
        (reward(x).mean() - alpha * kl.mean()).backward()
        return theta.grad.clone()

    return ours, plain(grad_start), plain(0)


@pytest.mark.parametrize("learner", [
    {"type": "truncation", "truncation_steps": 3, "segment_steps": 4},  # grad_start 3 cuts a window
    {"type": "truncation", "truncation_steps": 3, "segment_steps": 4, "checkpointing": True},
    {"type": "random_k", "segment_steps": 2},
])
def test_truncation_and_random_k_give_zero_gradient_before_the_window_and_plain_backprop_inside(learner):
    lrn = linear_gaussian({**SMALL, **learner}, num_steps=6, reward={"type": "quadratic", "center": [1.0], "scale": 1.0})
    K = lrn.model.num_steps
    theta = torch.linspace(-0.2, 0.3, K, dtype=torch.float64).requires_grad_(True)
    lrn._control = StepControl(theta)
    x0 = lrn.model.prior_sample(64, torch.Generator().manual_seed(3))
    starts = {lrn.grad_start() for _ in range(40)}
    assert starts == ({3} if learner["type"] == "truncation" else set(range(K)))
    for start in sorted(starts - {0}):
        seeds = list(range(10, 10 + len(lrn.windows(start))))
        ours, detached, full = _step_grads(lrn, theta, x0, start, seeds)
        assert torch.equal(ours[:start], torch.zeros(start, dtype=torch.float64))  # exactly zero before the window
        assert torch.allclose(ours[start:], detached[start:], rtol=1e-10, atol=1e-13)  # plain backprop inside
        assert (full[:start].abs() > 1e-6).all()  # without the cut the early steps do get a gradient
    ours, _, full = _step_grads(lrn, theta, x0, 0, list(range(10, 10 + len(lrn.windows(0)))))
    assert torch.allclose(ours, full, rtol=1e-10, atol=1e-13)  # no cut: the learner's gradient is plain backprop's
