"""S-MEME (rlft.control.smeme): round targets against closed forms, the reward-gradient sign, the KL reference of a
round, no-reward tasks, checkpoints. Float64 chains, fixed seeds, tiny budgets."""

from __future__ import annotations

import math

import pytest
import torch

import rlft.control.adjoint_matching as am
from rlft.config import ConfigError, task_from_dict
from rlft.control.networks import NetworkControl
from rlft.control.smeme import EntropyGradient, SMEMELearner, SMEMEOptions, data_score, round_exponents
from rlft.entropy import gaussian_entropy
from rlft.learners import build_learner, check_learner_spec
from rlft.models.gmm import GaussianMixture
from rlft.run_config import validate_task

MIX = {"type": "gmm", "weights": [0.9, 0.1], "means": [[-1.5, 0.0], [1.5, 0.0]], "stds": [0.4, 0.4]}


def _learner(model, **options) -> SMEMELearner:
    learner = {"type": "smeme", "batch_size": 64, "hidden": 16, "depth": 2, **options}
    task = task_from_dict({"model": MIX, "num_steps": model.num_steps, "learner": learner, "run": {"iterations": 1}})
    return build_learner(task, model, None)


# -- options -------------------------------------------------------------------------------------------------


def test_alpha_schedules_and_exponents():
    assert SMEMEOptions(rounds=3, alpha=2.0).alphas() == [2.0, 2.0, 2.0]
    assert SMEMEOptions(rounds=3, alpha=2.0, alpha_schedule="increasing").alphas() == [2.0, 4.0, 6.0]
    assert SMEMEOptions(alpha_schedule=[3.0, 5.0]).alphas() == [3.0, 5.0]
    assert round_exponents([2.0, 4.0]) == pytest.approx([0.5, 0.375])


@pytest.mark.parametrize("spec", [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha_schedule": [4.0, 1.0]}])
def test_alpha_at_most_one_is_refused_before_a_model_exists(spec):
    with pytest.raises(ConfigError, match="normalisable on an unbounded support"):
        check_learner_spec({"type": "smeme", **spec})


# -- round targets: closed forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("alphas", [[4.0], [4.0, 4.0, 4.0], [2.0, 3.0]])
def test_gaussian_round_target_is_the_closed_form(gaussian_chain_factory, alphas):
    """p_j ∝ p_{j-1}^{1 - 1/alpha_j} step by step (each a quadratic tilt of a Gaussian by f = -log p_{j-1}, through
    the GMM bed's exact tilt) equals N(m, s^2 / beta_j I); the learner's target entropy is its closed form."""
    model = gaussian_chain_factory([0.5, -1.0], std=0.6, num_steps=10)
    mix = model.marginal(model.num_steps)
    current = mix
    learner = _learner(model, alpha_schedule=alphas)
    for j, (alpha, beta) in enumerate(zip(alphas, round_exponents(alphas))):
        var = float(current.stds[0]) ** 2
        # p_{j-1} exp(f / alpha) with f = -log p_{j-1} = |x - m|^2 / (2 var): a Gaussian with precision
        # 1/var - 1/(alpha var) (product of Gaussian densities), the same mean
        tilted = GaussianMixture.create([1.0], [current.means[0].tolist()], math.sqrt(1.0 / (1.0 / var - 1.0 / (alpha * var))))
        assert float(tilted.stds[0]) ** 2 == pytest.approx(float(mix.stds[0]) ** 2 / beta, rel=1e-12)
        entropy, draw = learner.exact_target(beta)
        assert entropy == pytest.approx(gaussian_entropy(2, float(mix.stds[0]) ** 2 / beta), rel=1e-12)
        x = draw(100_000, torch.Generator().manual_seed(j))
        assert torch.allclose(x.var(0), torch.full((2,), float(tilted.stds[0]) ** 2, dtype=torch.float64), rtol=0.02)
        current = tilted


def test_mixture_round_target_by_grid(gmm_factory):
    """Two components: the grid target's entropy rises with each round and is the pretrained one at beta = 1."""
    model = gmm_factory(10)
    learner = _learner(model)
    h1, _ = learner.exact_target(1.0)
    exact = model.marginal(10)
    assert h1 == pytest.approx(float(-exact.log_prob(exact.sample(100_000, torch.Generator().manual_seed(0))).mean()), abs=0.02)
    assert h1 < learner.exact_target(0.75)[0] < learner.exact_target(0.5)[0]


# -- the reward gradient and the reference ------------------------------------------------------------------------


def test_entropy_gradient_is_minus_the_reference_score(gmm_factory):
    """grad f = -s_ref at the data level (value 0 without a task reward); -s points away from the modes."""
    model = gmm_factory(10)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    f = EntropyGradient(model)
    value = f(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.equal(value.detach(), torch.zeros(32, dtype=torch.float64))
    assert torch.allclose(grad, -data_score(model, x.detach()))
    # ascends -log p: a small step along grad f lowers the density
    lp = model.marginal(9).log_prob
    assert bool((lp(x.detach() + 1e-3 * grad) < lp(x.detach())).all())


def test_one_round_raises_the_variance_of_a_gaussian(gaussian_chain_factory):
    """Monotone improvement on the trivial task: one round (alpha = 2, exact target variance x2) spreads samples.
    With the reward gradient's sign flipped the variance shrinks and this fails."""
    from rlft.sampling import sample

    model = gaussian_chain_factory([0.0], std=0.5, num_steps=20)
    task = task_from_dict({"model": MIX, "num_steps": 20, "seed": 0, "run": {"iterations": 1},
                           "learner": {"type": "smeme", "rounds": 1, "alpha": 2.0, "drift_iterations": 40, "batch_size": 256,
                                       "hidden": 32, "depth": 2, "lr": 1e-2, "lr_final": 1e-2}})
    learner = build_learner(task, model, None)
    learner.train_iteration()
    before = float(sample(model, 4000, seed=3, progress=False).x.var())  # the K = 20 chain's own law: 0.29, not 0.25
    after = float(sample(model, 4000, control=learner.control(), seed=3, progress=False).x.var())
    target = before / 0.5  # its law tempered by beta = 1 - 1/alpha
    assert after > before + 0.5 * (target - before), (before, after, target)  # measured 0.29 -> 0.52 (target 0.58)


def _set_constant_round(learner: SMEMELearner, shift: float) -> None:
    """Makes the current round's network output the constant `shift` (last layer bias) and starts the next round."""
    last = learner.drift_net.net[-1]
    with torch.no_grad():
        last.bias.fill_(shift)
    learner.next_round()


def test_round_two_is_regularised_towards_round_one(gmm_factory, monkeypatch):
    """At the start of round 2 (fresh zero network) the KL to the reference is 0 only if the reference is round 1's
    model, the trajectories come from round 1's model (shifted by its control), and the lean adjoint runs through it."""
    model = gmm_factory(10)
    learner = _learner(model, rounds=2, drift_iterations=1, entropy_samples=64, warm_start=False, previous_score="network")
    _set_constant_round(learner, 2.0)
    assert learner.round == 1
    seen = {}
    real_step, real_grad = am.lean_adjoint_step, am.reward_gradient

    def spy_step(m, k, x, a, cond=None):
        seen.setdefault("models", set()).add(id(m))
        return real_step(m, k, x, a, cond)

    def spy_grad(reward, x):
        seen["x"] = x
        return real_grad(reward, x)

    monkeypatch.setattr(am, "lean_adjoint_step", spy_step)
    monkeypatch.setattr(am, "reward_gradient", spy_grad)
    reference = learner.reference()
    monkeypatch.setattr(learner, "reference", lambda: reference)
    _, metrics = learner.objective()
    assert metrics[am.TRAIN_KL] == 0.0  # KL to pi_1, not to pi_pre (which would be > 0 here)
    assert seen["models"] == {id(reference)}
    from rlft.sampling import sample

    pre_mean = sample(model, 512, seed=1, progress=False).x.mean(0)
    assert float(seen["x"].mean(0)[0] - pre_mean[0]) > 0.5  # x_K from pi_1 (shifted right), not from pi_pre
    # and the reference's mean is the pretrained mean plus round 1's displacement
    x = torch.zeros(4, 2, dtype=torch.float64)
    c = learner._control.scales[3]
    assert torch.allclose(reference.mean(3, x), model.mean(3, x) + c * 2.0)
    assert learner.figures(2, 64, 0)["kl_previous"] == pytest.approx(0.0, abs=1e-12)
    assert learner.figures(2, 64, 0)["kl"] > 0.1


def test_control_is_the_sum_of_the_rounds(gmm_factory):
    model = gmm_factory(10)
    learner = _learner(model, rounds=3, drift_iterations=1, entropy_samples=64, warm_start=False)
    _set_constant_round(learner, 1.0)
    _set_constant_round(learner, 0.5)
    x = torch.zeros(3, 2, dtype=torch.float64)
    c = learner._control.scales[5]
    assert torch.allclose(learner.control()(5, x, None), torch.full_like(x, 1.5 * c))
    assert len(learner.round_figures) == 2 and learner.round == 2


def test_terminal_previous_score_is_the_exact_round_recursion(gaussian_chain_factory):
    """previous_score terminal: round j's reward gradient is -s^{j-1} + grad r with s^{j-1} the data-level score of the
    exact previous round target. Pinned on a Gaussian p_pre = N(m, v I) and a linear reward r = b.x, where each round's
    target p_j ∝ p_{j-1}^{1 - 1/alpha_j} exp(r / alpha_j) is a Gaussian by the product of densities (precision
    (1 - 1/alpha) / v_{j-1}, mean from the linear term)."""
    from rlft.rewards.base import evaluate

    model = gaussian_chain_factory([0.5, -1.0], std=0.6, num_steps=10)
    b = torch.tensor([0.7, -0.3], dtype=torch.float64)

    class Linear:
        differentiable = True

        def __call__(self, x):
            return x @ b

    alphas = [2.0, 4.0, 3.0]
    learner = _learner(model, alpha_schedule=alphas, drift_iterations=1, entropy_samples=64, previous_score="terminal")
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s_pre = data_score(model, x)
    mean, prec = model.marginal(9).means[0], 1.0 / float(model.marginal(9).stds[0]) ** 2  # the level the score is read at
    for j, alpha in enumerate(alphas):
        learner.frozen = [learner.drift_net] * j  # round j (0-based)
        f = learner.entropy_gradient(learner.reference(), Linear())
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(evaluate(f, xg).sum(), xg)
        s_prev = -(x - mean) * prec  # the exact previous round's score
        assert torch.allclose(grad, -s_prev + b, atol=1e-10), j
        if j == 0:
            assert torch.allclose(s_prev, s_pre, atol=1e-10)
        # p_j: precision (1 - 1/alpha) prec, mean m + b / (alpha (1 - 1/alpha) prec) ... from -prec_j (x - m_j)
        new_prec = (1.0 - 1.0 / alpha) * prec
        mean = (new_prec * mean + b / alpha) / new_prec
        prec = new_prec


def test_network_previous_score_reads_the_previous_chain(gmm_factory):
    model = gmm_factory(10)
    learner = _learner(model, rounds=2, drift_iterations=1, entropy_samples=64, previous_score="network", warm_start=False)
    _set_constant_round(learner, 2.0)
    f = learner.entropy_gradient(learner.reference(), None)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x).sum(), x)
    assert torch.allclose(grad, -(data_score(model, x.detach()) + 2.0))  # s_pre + round 1's score shift of 2


def test_warm_start_scales_the_previous_round(gmm_factory):
    """Round 2 starts as round 1's network times rho = (beta_1 / alpha_2) / (beta_0 / alpha_1): alphas [2, 4] give the
    data-level score increments -s_pre / 2 and -s_pre / 8, rho = 0.25."""
    model = gmm_factory(10)
    learner = _learner(model, alpha_schedule=[2.0, 4.0], drift_iterations=1, entropy_samples=64, warm_start=True)
    assert learner.warm_start_scale(1) == pytest.approx(0.25)
    torch.nn.init.normal_(learner.drift_net.net[-1].weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = learner._control(4, x).detach()
    learner.next_round()
    assert torch.allclose(learner._control(4, x), 0.25 * before)
    assert learner.frozen[0] is not learner.drift_net and all(p.requires_grad for p in learner.drift_net.parameters())
    assert torch.allclose(NetworkControl(model, learner.frozen[0])(4, x), before)


# -- tasks without a reward ---------------------------------------------------------------------------------------


def test_tasks_without_reward():
    validate_task({"model": MIX, "learner": {"type": "smeme"}})
    validate_task({"model": MIX, "learner": {"type": "discriminator_guidance",
                                             "data": {"type": "gmm", "weights": [0.5, 0.5], "means": [[-1, 0], [1, 0]],
                                                      "stds": [0.4, 0.4]}}})
    with pytest.raises(ConfigError, match="reward is required for learner 'elegant'"):
        validate_task({"model": MIX, "learner": {"type": "elegant"}})
    with pytest.raises(ConfigError, match="reward is required"):
        validate_task({"model": MIX})


def test_build_learner_refuses_a_missing_reward(gmm_factory):
    task = task_from_dict({"model": MIX, "num_steps": 10, "learner": {"type": "elegant"}})
    with pytest.raises(ConfigError, match="add one"):
        build_learner(task, gmm_factory(10), None)


# -- figures and checkpoints --------------------------------------------------------------------------------------


def test_evaluate_and_checkpoint_round_trip(gmm_factory, tmp_path):
    model = gmm_factory(10)
    learner = _learner(model, rounds=2, drift_iterations=2, entropy_samples=64)
    learner.train_iteration()  # 4 updates: round 1 then round 2
    assert learner.round == 1
    report = learner.evaluate(num_samples=64)
    for key in ("entropy", "target_entropy", "kl", "kl_previous", "energy_distance", "energy_distance_floor"):
        assert math.isfinite(report[key]), key
    assert set(report["rounds"]) == {"1", "2"} and math.isfinite(report["pretrained"]["entropy"])
    learner.save_checkpoint(str(tmp_path))
    other = _learner(gmm_factory(10), rounds=2, drift_iterations=2, entropy_samples=64)
    other.load_checkpoint(str(tmp_path))
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert other.round == 1 and other.round_figures == learner.round_figures
    for k in (0, 9):
        assert torch.equal(other.control()(k, x, None), learner.control()(k, x, None))
