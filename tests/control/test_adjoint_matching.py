"""Adjoint Matching (rlft.control.adjoint_matching) pinned against autograd and closed forms (float64, fixed seeds).

- the lean adjoint with no control and the noise held fixed is grad_{x_k} r(x_K) / alpha by autograd through the
  pretrained chain (3 steps, a mixture's non-linear score);
- one update's gradient, accumulated chunk by chunk in the backward sweep, is autograd of L(theta) written out;
- on a 1-D linear-Gaussian chain the regression's fixed point delta_k = s_k^2 E[a_{k+1} | x_k] is the chain's
  drift-only optimum (backward Riccati recursion) to 1e-3 in J, and regressing on a_k instead misses it;
- the backward sweep (steps before a front uncontrolled, damped refits from the last step back) reaches the same
  optimum in one sweep; the importance-weighted target's minimiser is the optimum from a deliberately wrong control;
- the learner closes most of the gap on a small mixture task in a few updates and resumes exactly;
- a chain that remembers x_0, and a reward without gradients, are refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlft.config import ConfigError, task_from_dict
from rlft.control import adjoint_matching as am
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.rewards.base import FunctionReward
from rlft.sampling import rollout


def quadratic(center: float | list[float], lam: float = 1.0):
    c = torch.as_tensor(center, dtype=torch.float64)
    return FunctionReward(lambda x: -0.5 * lam * (x - c).pow(2).sum(-1), name="quadratic")


def test_lean_adjoint_is_the_reward_gradient_through_the_pretrained_chain(gmm_factory):
    model = gmm_factory(num_steps=3)  # a mixture: the score, hence m_k, is non-linear in x
    reward, alpha = FunctionReward(lambda x: torch.sin(x).sum(-1) - 0.3 * x.pow(2).sum(-1)), 0.7
    g = torch.Generator().manual_seed(0)
    x0 = model.prior_sample(5, g)
    noise = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    path = rollout(model, x0, noise=noise, keep_path=True).path  # (5, 4, 2)
    _, grad_r = am.reward_gradient(reward, path[:, -1])
    a = am.lean_adjoint(model, path, grad_r / alpha)  # (5, 4, 2)
    for k in range(4):
        xk = path[:, k].clone().requires_grad_(True)
        x = xk
        for j in range(k, 3):  # the pretrained chain from x_k with the same noise
            x = model.mean(j, x) + model.std(j) * noise[:, j]
        (expected,) = torch.autograd.grad(reward(x).sum() / alpha, xk)
        torch.testing.assert_close(a[:, k], expected, rtol=1e-10, atol=1e-12)
    assert a[:, 0].abs().max() > 1e-3  # not trivially zero


def make(data: dict | None = None, **learner):
    base = {
        "model": {"type": "gmm", "weights": [0.5, 0.3, 0.2], "means": [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]],
                  "stds": [0.4, 0.3, 0.5]},
        "reward": {"type": "quadratic", "center": [1.0, 0.5], "scale": 1.0}, "alpha": 1.0, "num_steps": 10, "seed": 0,
    }
    task = task_from_dict({**base, **(data or {}), "learner": {"type": "adjoint_matching", **learner}})
    model = build_model(task.model, task.num_steps).to(dtype=torch.float64)
    return build_learner(task, model, build_reward(task.reward, model=model))


@pytest.mark.parametrize("step_subset,clip,weighting,sweep,mix", [
    (False, None, "path_kl", 0.0, 0.0), (True, None, "path_kl", 0.0, 0.0), (False, 0.8, "path_kl", 0.0, 0.0),
    (True, None, "uniform", 0.0, 0.0), (False, None, "path_kl", 0.5, 0.0), (True, None, "path_kl", 0.5, 0.7)])
def test_the_swept_gradient_is_autograd_of_the_written_out_loss(monkeypatch, step_subset, clip, weighting, sweep, mix):
    monkeypatch.setattr(am, "LOSS_ROWS", 3 * 32)  # chunks of 3 steps at batch 32: 3 + 3 + 3 + 1 for K = 10
    lrn = make(batch_size=32, hidden=16, depth=2, step_subset=step_subset, loss_clip_quantile=clip, loss_weighting=weighting,
               backward_sweep=sweep, drift_iterations=4, importance_mix=mix)
    assert lrn.chunk_steps() == 3
    front = lrn.sweep_front()
    if sweep:  # update 0 of a sweep over 0.5 * 4 updates: the front starts at ceil(10 (1 - 1/2)) = 5
        lrn.drift_updates = 0
        assert front == 5
        lrn.drift_updates = 1
        assert lrn.sweep_front() == 0  # over after 2 updates
        lrn.drift_updates = 0
    with torch.no_grad():
        for p in lrn.drift_net.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    params = lrn._drift_params
    state = lrn._rng.get_state()
    surrogate, metrics = lrn.objective()
    swept = torch.autograd.grad(-surrogate, params)
    # the same update written out: same RNG stream, so the same x_0, noise and step subset
    lrn._rng.set_state(state)
    gen = lrn.device_generator()
    x0 = lrn.initial_states(32, gen)
    seeds = lrn.window_seeds(len(lrn.windows()))
    net_control = lrn.control()
    with torch.no_grad():
        if front:  # steps before the front run uncontrolled
            lrn._control = am.FrontControl(net_control, front)
        x_final, kl, path = lrn.drift_rollout(x0, seeds, keep_path=True)
        sampler, lrn._control = lrn._control, net_control
    r, grad_r = am.reward_gradient(lrn.reward, x_final)
    a = am.lean_adjoint(lrn.model, path, grad_r / lrn.task.alpha)  # (B, K+1, 2)
    weights = lrn.regression_steps()
    assert (len(weights) < 10) == (step_subset or bool(front)) and all(k in weights for k in range(8, 10))
    assert min(weights) >= front
    if front:  # the path KL counts the controlled steps only
        kl_front = sum(net_control(k, path[:, k]).pow(2).sum(-1) / (2 * lrn.model.std(k) ** 2) for k in range(front, 10))
        torch.testing.assert_close(kl, kl_front, rtol=1e-9, atol=1e-12)
        assert metrics[am.TRAIN_KL] == pytest.approx(float(kl.mean()), rel=1e-10)
    if weighting == "uniform":  # |delta - s^2 a|^2 / s^2 = (c^2 / s^2) |g - s^2 a / c|^2 for delta = c g
        c = lrn.control().scales
        assert weights[9] == pytest.approx(lrn.model.std(9) ** 2 / c[9] ** 2, rel=1e-12)
    terms = {k: (lrn.control()(k, path[:, k]) - lrn.model.std(k) ** 2 * a[:, k + 1]).pow(2).sum(-1) / lrn.model.std(k) ** 2
             for k in weights}  # (B,) each
    if clip is not None:  # the first update's running quantile is the batch's
        terms = {k: torch.clamp(t, max=float(torch.quantile(t.detach(), clip))) for k, t in terms.items()}
        assert sorted(lrn.clip_thresholds) == sorted(weights)
    if mix:  # (1 - beta) + beta w_k, w_k from the log-ratios of the control that sampled the paths
        w, ess = am.self_normalised(am.importance_log_weights(lrn.model, sampler, path, r, lrn.task.alpha))
        terms = {k: t * ((1 - mix) + mix * w[:, k]) for k, t in terms.items()}
        assert metrics[am.IMPORTANCE_ESS_MIN] == pytest.approx(float(ess.min()))
    loss = sum(w * terms[k] for k, w in weights.items()).mean()
    assert metrics[am.REGRESSION_LOSS] == pytest.approx(float(loss.detach()), rel=1e-10)
    for got, want in zip(swept, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# -- the fixed point on a linear-Gaussian chain ------------------------------------------------------------------


def linear_chain(gaussian_chain_factory):
    """The exact chain of N(0.3, 0.6^2) in 1-D, K = 10: m_k(x) = A_k x + E_k exactly (a Gaussian's score is affine)."""
    model = gaussian_chain_factory([0.3], std=0.6, num_steps=10)
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    E = [float(model.mean(k, zero)) for k in range(10)]
    A = [float(model.mean(k, one)) - E[k] for k in range(10)]
    S = [model.std(k) for k in range(10)]
    return model, A, E, S


def objective_of(theta, b, A, E, S, lam, c, alpha) -> float:
    """J of delta_k = theta_k x + b_k, x_0 ~ N(0, 1), r = -lam/2 (x - c)^2, by exact Gaussian moments."""
    mu, var, kl = 0.0, 1.0, 0.0
    for k in range(len(A)):
        kl += (theta[k] ** 2 * (var + mu**2) + 2 * theta[k] * b[k] * mu + b[k] ** 2) / (2 * S[k] ** 2)
        mu, var = (A[k] + theta[k]) * mu + E[k] + b[k], (A[k] + theta[k]) ** 2 * var + S[k] ** 2
    return -0.5 * lam * ((mu - c) ** 2 + var) - alpha * kl


def drift_only_optimum(A, E, S, lam, c, alpha):
    """max over delta_k(x) of J, backward (the optimum is affine): V_{k+1}(y) = -P/2 y^2 + q y + const gives
    delta = s^2 (q - P m) / (alpha + P s^2) at m = A x + E, and V_k by substitution."""
    P, q = lam, lam * c
    theta, b = [0.0] * len(A), [0.0] * len(A)
    for k in reversed(range(len(A))):
        d = S[k] ** 2 / (alpha + P * S[k] ** 2)
        theta[k], b[k] = -d * P * A[k], d * (q - P * E[k])
        g, h = A[k] + theta[k], E[k] + b[k]  # x_{k+1} mean = g x + h
        P, q = P * g**2 + alpha * theta[k] ** 2 / S[k] ** 2, (q - P * h) * g - alpha * theta[k] * b[k] / S[k] ** 2
    return theta, b


def adjoint_matching_fixed_point(model, A, E, S, lam, c, alpha, shift: int, n=20000, rounds=14):
    """Iterates: paths under delta = theta x + b (common random numbers), lean adjoint, then the exact minimiser
    of `regression_loss` over (theta, b) (a quadratic: one Newton step). shift = 1 regresses on a_{k+1}, 0 on a_k."""
    K = len(A)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, K, 1, generator=g, dtype=torch.float64)
    reward = quadratic([c], lam)
    params = torch.zeros(2, K, dtype=torch.float64)
    std = torch.tensor(S, dtype=torch.float64)
    for _ in range(rounds):
        path = rollout(model, x0, lambda k, x, _c: params[0, k] * x + params[1, k], noise=noise, keep_path=True).path
        _, grad_r = am.reward_gradient(reward, path[:, -1])
        a = am.lean_adjoint(model, path, grad_r / alpha)  # (n, K+1, 1)
        states, targets = path[:, :-1], a[:, shift:K + shift]  # (n, K, 1)

        def loss(p):
            return am.regression_loss(p[0].reshape(1, K, 1) * states + p[1].reshape(1, K, 1), targets, std).mean()

        p0 = torch.zeros(2, K, dtype=torch.float64, requires_grad=True)
        grad = torch.autograd.grad(loss(p0), p0)[0].reshape(-1)
        hess = torch.autograd.functional.hessian(loss, p0).reshape(2 * K, 2 * K)
        params = -torch.linalg.solve(hess, grad).reshape(2, K)
    return params[0].tolist(), params[1].tolist()


def test_the_fixed_point_is_the_drift_only_optimum_on_a_linear_gaussian_chain(gaussian_chain_factory):
    model, A, E, S = linear_chain(gaussian_chain_factory)
    lam, c, alpha = 2.0, 1.5, 0.5
    theta, b = drift_only_optimum(A, E, S, lam, c, alpha)
    best = objective_of(theta, b, A, E, S, lam, c, alpha)
    # the recursion is the optimum: perturbing any coefficient lowers J
    for k in (0, 5, 9):
        for eps in (1e-3, -1e-3):
            bumped = [t + (eps if j == k else 0.0) for j, t in enumerate(theta)]
            assert objective_of(bumped, b, A, E, S, lam, c, alpha) < best
    pretrained = objective_of([0.0] * 10, [0.0] * 10, A, E, S, lam, c, alpha)
    assert best - pretrained > 0.1  # a non-trivial gap
    fixed = objective_of(*adjoint_matching_fixed_point(model, A, E, S, lam, c, alpha, shift=1), A, E, S, lam, c, alpha)
    assert fixed == pytest.approx(best, abs=1e-3)
    wrong = objective_of(*adjoint_matching_fixed_point(model, A, E, S, lam, c, alpha, shift=0), A, E, S, lam, c, alpha)
    assert best - wrong > 1e-2  # a_k instead of a_{k+1}: a different, worse fixed point


def backward_sweep_fit(model, A, E, S, lam, c, alpha, shift: int, inner: int, n=10000, step=0.6):
    """The backward sweep on the linear chain: for k = K-1 .. 0, paths with steps < k uncontrolled (FrontControl) and
    steps > k at their already fitted laws; `inner` damped refits of step k alone (params += step (fit - params)):
    step k's own target moves with delta_k (x_{k+1} contains it), by -s_k^2 P / alpha times its change (P: the
    curvature of V_{k+1}), so undamped refits diverge once s_k^2 P / alpha > 1."""
    K = len(A)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, K, 1, generator=g, dtype=torch.float64)
    reward = quadratic([c], lam)
    params = torch.zeros(2, K, dtype=torch.float64)
    for k in reversed(range(K)):
        for _ in range(inner):
            control = am.FrontControl(lambda j, x, _c: params[0, j] * x + params[1, j], k)
            path = rollout(model, x0, control, noise=noise, keep_path=True).path
            _, grad_r = am.reward_gradient(reward, path[:, -1])
            a = am.lean_adjoint(model, path, grad_r / alpha)  # (n, K+1, 1)
            x, y = path[:, k, 0], S[k] ** 2 * a[:, k + shift, 0]  # least squares of y on (x, 1): the exact minimiser
            design = torch.stack([x, torch.ones_like(x)], dim=1)
            fit = torch.linalg.lstsq(design, y.unsqueeze(1)).solution[:, 0]
            params[:, k] += step * (fit - params[:, k])
    return params[0].tolist(), params[1].tolist()


def test_one_backward_sweep_reaches_the_drift_only_optimum(gaussian_chain_factory):
    """G is triangular up to each step's own (diagonal) term: fitting the last step first, each step against the laws
    already fitted after it on states of the UNCONTROLLED chain before it, reaches the optimum in one sweep, whatever
    the marginal the earlier (still uncontrolled) steps give x_k; the simultaneous iteration after the same number of
    regressions of step 0 (4 rounds, undamped) is still off."""
    model, A, E, S = linear_chain(gaussian_chain_factory)
    lam, c, alpha = 2.0, 1.5, 0.5
    best = objective_of(*drift_only_optimum(A, E, S, lam, c, alpha), A, E, S, lam, c, alpha)
    swept = objective_of(*backward_sweep_fit(model, A, E, S, lam, c, alpha, shift=1, inner=4), A, E, S, lam, c, alpha)
    assert swept == pytest.approx(best, abs=1e-3)  # measured: 5e-5 off
    simultaneous = objective_of(*adjoint_matching_fixed_point(model, A, E, S, lam, c, alpha, shift=1, rounds=4),
                                A, E, S, lam, c, alpha)
    assert best - simultaneous > 1e-2, (best, simultaneous)  # measured: 0.024 short
    wrong = objective_of(*backward_sweep_fit(model, A, E, S, lam, c, alpha, shift=0, inner=4), A, E, S, lam, c, alpha)
    assert best - wrong > 1e-2  # a_k instead of a_{k+1}


def importance_weighted_fit(model, A, E, S, lam, c, alpha, theta_u, b_u, sign=1.0, weighted=True, n=40000):
    """One weighted least-squares fit per step of s_k^2 a_{k+1} on (x_k, 1), weights w_k = importance_log_weights,
    on paths sampled under the fixed (wrong) control delta_k = theta_u x + b_u."""
    K = len(A)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, K, 1, generator=g, dtype=torch.float64)
    reward = quadratic([c], lam)

    def control(k, x, _c=None):
        return theta_u * x + b_u

    path = rollout(model, x0, control, noise=noise, keep_path=True).path
    r, grad_r = am.reward_gradient(reward, path[:, -1])
    a = am.lean_adjoint(model, path, grad_r / alpha)
    log_w = am.importance_log_weights(model, lambda k, x, cnd: sign * control(k, x), path, r, alpha)  # (n, K)
    w, ess = am.self_normalised(log_w if weighted else torch.zeros_like(log_w))
    theta, b = [], []
    for k in range(K):
        x, y, sw = path[:, k, 0], S[k] ** 2 * a[:, k + 1, 0], w[:, k].sqrt()
        design = torch.stack([x, torch.ones_like(x)], dim=1) * sw.unsqueeze(1)
        fit = torch.linalg.lstsq(design, (y * sw).unsqueeze(1)).solution[:, 0]
        theta.append(float(fit[0]))
        b.append(float(fit[1]))
    return theta, b, ess


def test_the_importance_weighted_target_is_the_optimum_from_a_wrong_control(gaussian_chain_factory):
    """The weighted regression's minimiser is delta* whatever control sampled the paths (E_u[w_k f | x_k] is
    e^{V_k / alpha} E_{u*}[f | x_k]): from a deliberately wrong control, one fit per step reaches the optimum, while the
    plain target from the same paths (one step of the fixed-point iteration) and a flipped log-ratio sign do not."""
    model, A, E, S = linear_chain(gaussian_chain_factory)
    lam, c, alpha = 2.0, 1.5, 0.5
    best = objective_of(*drift_only_optimum(A, E, S, lam, c, alpha), A, E, S, lam, c, alpha)
    theta, b, ess = importance_weighted_fit(model, A, E, S, lam, c, alpha, theta_u=-0.3, b_u=0.4)
    assert objective_of(theta, b, A, E, S, lam, c, alpha) == pytest.approx(best, abs=1e-3)  # measured: 3e-5 off
    assert float(ess.min()) > 0.01  # the weights are usable at this alpha
    plain = objective_of(*importance_weighted_fit(model, A, E, S, lam, c, alpha, -0.3, 0.4, weighted=False)[:2], A, E, S, lam, c, alpha)
    assert best - plain > 1e-2
    flipped = objective_of(*importance_weighted_fit(model, A, E, S, lam, c, alpha, -0.3, 0.4, sign=-1.0)[:2], A, E, S, lam, c, alpha)
    assert best - flipped > 1e-2


# -- the learner -------------------------------------------------------------------------------------------------


def small(**extra):
    return {**dict(batch_size=256, hidden=32, depth=2, lr=1e-2, drift_iterations=60, drift_iterations_per_train_iteration=10),
            **extra}


def test_clipping_thresholds_resume_exactly(tmp_path):
    lrn = make(**small(loss_clip_quantile=0.9, batch_size=64))
    lrn.train_iteration()
    lrn.save_checkpoint(str(tmp_path))
    other = make(**small(loss_clip_quantile=0.9, batch_size=64))
    other.load_checkpoint(str(tmp_path))
    assert other.clip_thresholds == lrn.clip_thresholds and len(lrn.clip_thresholds) == 10
    assert lrn.train_iteration() == other.train_iteration()


def test_the_learner_closes_the_gap_and_resumes_exactly(tmp_path):
    lrn = make(**small())
    before = lrn.evaluate(num_samples=1000)
    assert abs(before["gap_closure"]) < 0.05  # zero-initialised control: the pretrained sampler
    for _ in range(5):
        lrn.train_iteration()
    after = lrn.evaluate(num_samples=1000)
    assert after["gap_closure"] > 0.6, after
    assert lrn.reward_queries == 50 * 256
    lrn.save_checkpoint(str(tmp_path))
    other = make(**small())
    other.load_checkpoint(str(tmp_path))
    assert (other.iteration, other.drift_updates, other.reward_queries) == (lrn.iteration, lrn.drift_updates, lrn.reward_queries)
    assert lrn.train_iteration() == other.train_iteration()
    for p, q in zip(lrn._drift_params, other._drift_params):
        assert torch.equal(p, q)


def test_a_chain_that_remembers_x0_and_a_reward_without_gradients_are_refused(gaussian_chain_factory):
    from rlft.schedule import VPSchedule

    # N(0, 1) data: the forward process keeps a(T)^2 of x_T's variance from x_0, and so does the reverse chain
    short = gaussian_chain_factory([0.0], std=1.0, num_steps=50, schedule=VPSchedule(beta_min=0.1, beta_max=1.0))
    memory = am.chain_memory(short, torch.Generator().manual_seed(0), n=256)
    a_T2 = short.coefficients.alpha_bar[0]
    assert a_T2 == pytest.approx(0.58, abs=0.01) and memory == pytest.approx(a_T2, abs=0.08)
    assert am.chain_memory(gaussian_chain_factory([0.0], std=1.0, num_steps=50), torch.Generator().manual_seed(0)) < 1e-3
    with pytest.raises(ConfigError, match="not memoryless"):
        make({"model": {"type": "gmm", "weights": [1.0], "means": [[0.0, 0.0]], "stds": [1.0], "beta_max": 1.0}})
    make({"model": {"type": "gmm", "weights": [1.0], "means": [[0.0, 0.0]], "stds": [1.0], "beta_max": 1.0}}, max_memory=1.0)
    lrn = make()
    lrn.reward.differentiable = False
    with pytest.raises(ConfigError, match="ppo_kl"):
        lrn.check_model()
    with pytest.raises(ConfigError, match="learner.max_memory"):
        make(max_memory=2.0)
    with pytest.raises(ConfigError, match="learner.loss_clip_quantile"):
        make(loss_clip_quantile=1.0)
    with pytest.raises(ConfigError, match="learner.loss_weighting"):
        make(loss_weighting="kl")
    assert dataclasses.asdict(lrn.options)["step_subset"] is False


@pytest.mark.slow  # 5-17 s: diffusers' import and a UNet VJP per step
def test_a_lora_adapter_on_a_diffusers_chain_is_the_control():
    from rlft.config import task_from_dict as task_of
    from tests.models.test_diffusers_chain import float64, make_chain

    chain = float64(make_chain("ddpm"))  # a random tiny UNet: K = 10 steps over 100 timesteps, not memoryless
    task = task_of({
        "model": {"type": "gmm", "weights": [1.0], "means": [[0.0]], "stds": [1.0]}, "reward": {"type": "linear", "direction": [1.0]},
        "alpha": 1.0, "num_steps": chain.num_steps, "seed": 0,
        "learner": {"type": "adjoint_matching", "batch_size": 2, "max_memory": 1.0, "drift_iterations": 1}})
    lrn = build_learner(task, chain, FunctionReward(lambda x: x.flatten(1).mean(1)))
    assert lrn.uses_lora and lrn.chunk_steps() == 1
    before = [p.detach().clone() for p in lrn._drift_params]
    metrics = lrn.update()
    assert metrics["grad_norm"] > 0 and lrn.reward_queries == 2
    assert any(not torch.equal(p, q) for p, q in zip(lrn._drift_params, before))


# -- the bench (rlft bench adjoint-matching) ---------------------------------------------------------------------


def test_bench_memory_probe_and_tables(tmp_path):
    """The memory probe runs in process for each method; the tables and the PNG take the rows the sections write."""
    import io

    from rlft.benchmarks import adjoint_matching as bench

    rows = [bench.memory_probe(10, method, 4, 1) for method in bench.MEMORY_METHODS]
    # peak_mb: ru_maxrss above the resident size before; a few hundred KB below 0 where the updates added nothing
    assert all(r["ok"] and r["peak_mb"] > -1.0 and r["s_per_update"] > 0 for r in rows), rows
    per_k = {str(K): {m: {"peak_mb": 1.0 + i, "s_per_update": 0.1} for i, m in enumerate(bench.MEMORY_METHODS)}
             for K in bench.MEMORY_STEPS}
    curve = [{"iteration": i, "reward_queries": 256 * i, "train_time_s": float(i), "gap_closure": g}
             for i, g in ((1, 0.3), (2, 0.6), (3, 0.96))]
    quality = [{"task": "2d", "alpha": 1.0, "learner": "adjoint_matching", "gap_closure": 0.96, "ed_over_floor": 1.2,
                "kl": 1.3, "train_time_s": 3.0, "curve": curve,
                **{f"queries_to_{p}pct": q for p, q in ((50, 512), (90, 768), (95, 768))},
                **{f"time_to_{p}pct_s": t for p, t in ((50, 2.0), (90, 3.0), (95, 3.0))}},
               {"task": "2d", "alpha": 1.0, "learner": "ppo_kl", "error": "RuntimeError: no Ray"}]
    out = io.StringIO()
    bench.print_tables({"memory": {"per_K": per_k, "batch_size": 4, "peak_ratio_K1000_over_K50": {"backprop": 1.0}},
                        "quality": quality}, out)
    text = out.getvalue()
    assert "768" in text and "no Ray" in text and "1000" in text
    assert (tmp_path / "adjoint_matching_quality.png").name in bench.make_plot(quality, str(tmp_path))
    assert bench.rllib_first(curve, 0.9)["reward_queries"] == 768  # the first evaluation at or above the threshold
