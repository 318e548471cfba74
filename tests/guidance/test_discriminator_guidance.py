"""Discriminator guidance (BOOST §3): the correction it applies, its losses' gradients, and the exact bed.

Pinned against closed forms: the exact correction score_P - score_P~ on a 2-D mixture pair (energy distance to P
against the floor), the gradient of J_MSE against autograd of an explicit form, the control's grad log d/(1-d) on a
linear logit, and the trained logit's gradient against the closed-form ratio of a 1-D Gaussian pair.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlft import metrics, registry
from rlft.config import ConfigError, task_from_dict
from rlft.guidance.discriminator import Levels, ce_loss, logit_net, mse_loss
from rlft.guidance.discriminator_guidance import (
    SCORE_ERROR, DiscriminatorGuidance, DiscriminatorGuidanceLearner, DiscriminatorGuidanceOptions,
)
from rlft.learners import build_learner, check_learner_spec
from rlft.models.base import ControlledChain
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft.rewards import build_reward
from rlft.sampling import sample

# P (the data) and P~ (the "pretrained" model): wrong weights, a shifted mode, a missing mode
P = {"weights": [0.4, 0.3, 0.3], "means": [[1.5, 1.5], [-1.5, 1.5], [0.0, -1.5]], "stds": [0.4, 0.4, 0.4]}
P_WRONG = {"weights": [0.2, 0.8], "means": [[1.5, 1.5], [-0.7, 1.5]], "stds": [0.4, 0.4]}


class ExactLogRatio(nn.Module):
    """l(x, n_k) = log q_P,k(x) - log q_P~,k(x): the logit of the perfect discriminator (level looked up by n_k)."""

    def __init__(self, p: GaussianMixture, p_wrong: GaussianMixture, levels: Levels) -> None:
        super().__init__()
        self.noise_std = levels.noise_std.double()
        ab = (levels.signal.double() ** 2).tolist()
        self.p = [p.diffuse(a) for a in ab]
        self.q = [p_wrong.diffuse(a) for a in ab]

    def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        k = int(torch.argmin((self.noise_std - float(noise_std[0])).abs()))
        return self.p[k].log_prob(x) - self.q[k].log_prob(x)


class LinearLogit(nn.Module):
    """l(x, n) = a . x + b n + c: grad_x l = a exactly."""

    def __init__(self, a: list[float], b: float = 0.3, c: float = -0.2) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b, self.c = b, c

    def forward(self, x, noise_std):
        return x @ self.a + self.b * noise_std + self.c


class QuadraticLogit(nn.Module):
    """l(x, n) = (a0 + a1 n) . x + b |x|^2 / 2: grad_x l = a0 + a1 n + b x (the explicit form of J_MSE's test)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a0 = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.a1 = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))

    def forward(self, x, noise_std):
        return (x * (self.a0 + self.a1 * noise_std[:, None])).sum(1) + 0.5 * self.b * (x * x).sum(1)


def _mixture(spec: dict) -> GaussianMixture:
    return GaussianMixture.create(spec["weights"], spec["means"], spec["stds"])


def _task(learner: dict, model: dict | None = None, num_steps: int = 20, seed: int = 0):
    data = {
        "model": model or {"type": "gmm", **P_WRONG}, "reward": {"type": "linear", "direction": [0.0, 0.0]},
        "num_steps": num_steps, "seed": seed, "run": {"iterations": 2},
        "learner": {"type": "discriminator_guidance", "data": {"type": "gmm", **P, "num_samples": 400}, **learner},
    }
    return task_from_dict(data)


def _learner(learner: dict, **kw) -> DiscriminatorGuidanceLearner:
    task = _task(learner, **kw)
    model = GMMModel.create(**{k: v for k, v in task.model.__dict__.items() if k in ("weights", "means", "stds")},
                            num_steps=task.num_steps).to(dtype=torch.float64)
    return build_learner(task, model, build_reward(task.reward, model=model))


# -- item 1: the correction -------------------------------------------------------------------------------------


def test_the_exact_correction_refines_the_wrong_chain_to_p():
    """With l = log q_P,k / q_P~,k (the perfect discriminator), the refined chain samples P: energy distance <= 2x the
    exact-vs-exact floor, while the uncorrected chain is far off (the issue's "Done when")."""
    p, p_wrong = _mixture(P), _mixture(P_WRONG)
    model = GMMModel(p_wrong, num_steps=100).to(dtype=torch.float64)
    control = DiscriminatorGuidance(model, ExactLogRatio(p, p_wrong, Levels(model)))
    n, gen = 2000, torch.Generator().manual_seed(7)
    ref = p.sample(n, gen)
    floor = sum(metrics.energy_distance(p.sample(n, gen), ref, n // 8) for _ in range(8)) / 8  # as rlft.evaluation
    refined = sample(model, n, control=control, seed=1, progress=False).x
    plain = sample(model, n, seed=2, progress=False).x
    ed_refined, ed_plain = metrics.energy_distance(refined, ref, n // 8), metrics.energy_distance(plain, ref, n // 8)
    assert ed_refined <= 2.0 * floor, (ed_refined, floor)
    assert ed_plain >= 10.0 * floor, (ed_plain, floor)
    # the refined chain IS the exact chain of P (same noise, same states): the correction is exact at every step
    exact_chain = sample(GMMModel(p, num_steps=100).to(dtype=torch.float64), n, seed=1, progress=False).x
    torch.testing.assert_close(refined, exact_chain, rtol=1e-9, atol=1e-9)
    # the same sampler as a model: ControlledChain's score is the base score plus grad l
    chain = ControlledChain(model, control)
    x = ref[:5]
    exact = p.diffuse(model.coefficients.alpha_bar[40]).score(x)
    torch.testing.assert_close(chain.score(40, x), exact, rtol=1e-8, atol=1e-8)


def test_the_control_applies_grad_log_d_over_1_minus_d_not_grad_log_d(gmm2d):
    """A linear logit l = a.x + ...: the control must be c_k w a (grad l = grad log d/(1-d)); grad log d would give
    c_k w (1 - sigmoid(l)) a, which differs wherever d is not ~0."""
    a = [0.8, -0.5]
    control = DiscriminatorGuidance(gmm2d, LinearLogit(a), weight=1.7, window=[5, 30])
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for k in (5, 17, 29):
        expected = gmm2d.coefficients.mean_score[k] * 1.7 * torch.tensor(a, dtype=torch.float64).expand(9, 2)
        with torch.no_grad():  # the sampler runs controls under no_grad: they must still differentiate
            torch.testing.assert_close(control(k, x), expected, rtol=1e-12, atol=1e-14)
    for k in (0, 4, 30, gmm2d.num_steps - 1):  # outside the window: no correction
        assert torch.equal(control(k, x), torch.zeros_like(x))
    assert registry.resolve("sampler", "discriminator") is DiscriminatorGuidance
    with pytest.raises(ConfigError, match=r"window must be \[first, stop\)"):
        DiscriminatorGuidance(gmm2d, LinearLogit(a), window=[30, 5])


# -- the losses ---------------------------------------------------------------------------------------------------


def test_j_mse_gradient_matches_autograd_of_the_explicit_form():
    """J_MSE differentiates grad_x l_phi in phi (double back-propagation): against the explicit grad_x l of a
    quadratic logit, and against central finite differences on the MLP the learner uses."""
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    target, weight = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    net = QuadraticLogit(2)
    grads = torch.autograd.grad(mse_loss(net, x, n, target, weight), list(net.parameters()))
    explicit = (weight * (target - (net.a0 + net.a1 * n[:, None] + net.b * x)).pow(2).sum(1)).mean()
    expected = torch.autograd.grad(explicit, list(net.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    mlp = logit_net((2,), hidden=8, depth=2, num_frequencies=2).double()
    p = mlp.net[0].weight
    (grad,) = torch.autograd.grad(mse_loss(mlp, x, n, target, weight), [p])
    h = 1e-6
    for idx in [(0, 0), (3, 1), (7, 4)]:
        with torch.no_grad():
            p[idx] += h
            up = float(mse_loss(mlp, x, n, target, weight))
            p[idx] -= 2 * h
            down = float(mse_loss(mlp, x, n, target, weight))
            p[idx] += h
        assert grad[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-9)


def test_ce_labels_data_one_and_model_samples_zero():
    net = LinearLogit([1.0, 0.0], b=0.0, c=0.0)
    far = torch.tensor([[6.0, 0.0]], dtype=torch.float64)
    n = torch.zeros(1, dtype=torch.float64)
    assert float(ce_loss(net, far, n, -far, n).detach()) < 0.01  # data at l = +6 and model at l = -6: right labels, low loss
    assert float(ce_loss(net, -far, n, far, n).detach()) > 5.0


# -- the learner --------------------------------------------------------------------------------------------------


def test_the_trained_logit_matches_the_closed_form_ratio_of_a_1d_gaussian_pair():
    """P = N(1, 0.5^2), P~ = N(0, 0.8^2): grad log q_P,k/q_P~,k is linear in x at every level. At the optimum of
    J_SM (objective mse) the trained grad l_phi matches it: the weighted error E_phi (BOOST Thm 4) is under 5 % of the
    uncorrected model's E_theta (tolerance stated here; measured ~1 %)."""
    data = {"type": "gmm", "weights": [1.0], "means": [[1.0]], "stds": [0.5], "num_samples": 4000}
    lrn = _learner({"objective": "mse", "hidden": 32, "depth": 2, "drift_iterations": 400, "batch_size": 256,
                    "lr": 3e-3, "data": data},
                   model={"type": "gmm", "weights": [1.0], "means": [[0.0]], "stds": [0.8]}, num_steps=10)
    for _ in range(2):
        lrn.train_iteration()
    e_phi, e_theta = lrn.score_errors(n=512, seed=3)
    assert e_phi < 0.05 * e_theta, (e_phi, e_theta)


def test_the_learner_trains_each_objective_saves_and_loads(tmp_path):
    for objective in ("ce", "mse", "mse_ce"):
        lrn = _learner({"objective": objective, "hidden": 16, "depth": 1, "drift_iterations": 4, "batch_size": 32,
                        "window": [2, 18]})
        metrics_ = lrn.train_iteration()
        assert set(metrics_) >= {"train_loss", "grad_norm"} and all(math.isfinite(v) for v in metrics_.values())
        assert ("mse_loss" in metrics_) == (objective != "ce") and ("ce_loss" in metrics_) == (objective != "mse")
    out = tmp_path / "ckpt"
    lrn.save_checkpoint(str(out))
    again = _learner({"objective": "mse_ce", "hidden": 16, "depth": 1, "drift_iterations": 4, "batch_size": 32,
                      "window": [2, 18]})
    again.load_checkpoint(str(out))
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.control()(10, x), lrn.control()(10, x), rtol=0, atol=0)
    assert again.iteration == lrn.iteration == 1
    assert again.train_iteration() == lrn.train_iteration()  # the optimiser and RNG state came back too
    figures = lrn.evaluate(num_samples=128)
    assert {"energy_distance", "energy_distance_floor", SCORE_ERROR, "pretrained"} <= set(figures)
    assert figures["pretrained"]["energy_distance"] > 0 and math.isfinite(figures["pretrained"][SCORE_ERROR])
    assert figures["objective"] == -figures["energy_distance"]  # what Tune ranks trials by: no reward here


def test_options_errors_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="learner.data is required"):
        check_learner_spec({"type": "discriminator_guidance"})
    with pytest.raises(ConfigError, match=r"learner.objective must be one of \['ce', 'mse', 'mse_ce'\]"):
        check_learner_spec({"type": "discriminator_guidance", "objective": "bce", "data": {"path": "x.npy"}})
    with pytest.raises(ConfigError, match="learner.gamma must be a finite number >= 0"):
        check_learner_spec({"type": "discriminator_guidance", "gamma": -1.0, "data": {"path": "x.npy"}})
    with pytest.raises(ConfigError, match="type gmm needs weights, means and stds"):
        check_learner_spec({"type": "discriminator_guidance", "data": {"type": "gmm", "means": [[0.0, 0.0]]}})
    cls, options = check_learner_spec({"type": "discriminator_guidance", "data": {"path": "x.npy"}})
    assert cls is DiscriminatorGuidanceLearner and isinstance(options, DiscriminatorGuidanceOptions)
    assert (options.objective, options.hidden, options.depth, options.data.kind) == ("mse_ce", 128, 2, "array")
    with pytest.raises(ConfigError, match=r"learner.window must be \[first, stop\)"):
        _learner({"window": [0, 21]})
    with pytest.raises(ConfigError, match="learner.data's mixture is 2-D but the model's samples have shape"):
        _learner({"drift_iterations": 1, "batch_size": 8},
                 model={"type": "gmm", "weights": [1.0], "means": [[0.0]], "stds": [0.8]}).train_iteration()


def test_array_data_hold_out_rows_for_evaluation(tmp_path):
    import numpy as np

    x = _mixture(P).sample(300, torch.Generator().manual_seed(1)).numpy()
    np.save(tmp_path / "data.npy", x)
    lrn = _learner({"hidden": 8, "depth": 1, "drift_iterations": 2, "batch_size": 16,
                    "data": {"path": str(tmp_path / "data.npy"), "holdout": 0.25}})
    lrn.train_iteration()
    data, model_x = lrn.samples()
    assert data.shape == (225, 2) and model_x.shape == (225, 2)
    torch.testing.assert_close(data, torch.as_tensor(x[:225]))
    figures = lrn.evaluate(num_samples=500)
    assert figures["num_samples"] == 75 and SCORE_ERROR not in figures


def test_score_error_is_the_path_kl_from_the_data_chain_to_the_corrected_one():
    """BOOST Thm 4 on the chain: E_theta = sum_k c_k^2/(2 s_k^2) E_{q_P,k}|score_P - s_theta|^2 is the path KL from the
    chain of P to the uncorrected chain: the KL the sampler reports for the uncorrected chain displaced by the exact
    correction c_k (score_P - s_theta), whose states follow P's chain."""
    lrn = _learner({"hidden": 8, "depth": 1, "drift_iterations": 1, "batch_size": 8,
                    "data": {"type": "gmm", "weights": [1.0], "means": [[1.0]], "stds": [0.5], "num_samples": 100}},
                   model={"type": "gmm", "weights": [1.0], "means": [[0.0]], "stds": [0.8]}, num_steps=50)
    with torch.no_grad():
        for p in lrn.discriminator.parameters():
            p.zero_()  # l = 0: the refined chain is the uncorrected one, E_phi = E_theta
    e_phi, e_theta = lrn.score_errors(n=4000, seed=0)
    assert e_phi == pytest.approx(e_theta, rel=1e-12)
    p_chain = GMMModel.create([1.0], [[1.0]], [0.5], num_steps=50).to(dtype=torch.float64)
    c = p_chain.coefficients.mean_score

    def exact_correction(k, x, cond=None):
        return c[k] * (p_chain.score(k, x) - lrn.model.score(k, x))

    kl = sample(lrn.model, 8000, control=exact_correction, seed=0, progress=False).kl.mean()
    assert e_theta == pytest.approx(float(kl), rel=0.05)


# the bench's pair (P: 4 modes, P~: one shifted, one missing) and an unseen one (P: 5 modes of unequal stds; P~: 4
# modes, one shifted, one missing, every std wrong): on the unseen pair the defaults measured 0.429 -> 0.0069
# (floor 0.0025, E_phi 0.090 vs E_theta 2.10) in 93 CPU s of training
PAIRS = {
    "bench": ({"weights": [0.4, 0.3, 0.2, 0.1], "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]],
               "stds": [0.4] * 4},
              {"weights": [0.2, 0.5, 0.3], "means": [[2.0, 2.0], [-1.2, 2.0], [2.0, -2.0]], "stds": [0.4] * 3}),
    "unseen": ({"weights": [0.35, 0.25, 0.15, 0.15, 0.10], "means": [[0.0, 2.5], [2.4, 0.8], [1.5, -2.0], [-1.5, -2.0],
                [-2.4, 0.8]], "stds": [0.3, 0.5, 0.35, 0.45, 0.3]},
               {"weights": [0.2, 0.3, 0.3, 0.2], "means": [[0.6, 2.0], [2.4, 0.8], [1.5, -2.0], [-1.5, -2.0]],
                "stds": [0.5] * 4}),
}


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(PAIRS))
def test_the_default_learner_refines_a_2d_wrong_mixture_to_a_tenth_of_its_distance(pair):
    """The issue's measurement as a benchmark (about 2.5 min on one thread): `learner: {type: discriminator_guidance}`
    with only its data (5,000 samples of P) takes the energy distance to P below a tenth of the uncorrected model's."""
    p4, wrong = PAIRS[pair]
    wrong = {"type": "gmm", **wrong}
    task = task_from_dict({"model": wrong, "reward": {"type": "linear", "direction": [0.0, 0.0]}, "num_steps": 100,
                           "learner": {"type": "discriminator_guidance", "data": {"type": "gmm", **p4, "num_samples": 5000}}})
    model = GMMModel.create(wrong["weights"], wrong["means"], wrong["stds"], num_steps=100)
    lrn = build_learner(task, model, build_reward(task.reward, model=model))
    while lrn.drift_updates < lrn.options.drift_iterations:
        lrn.train_iteration()
    figures = lrn.evaluate(num_samples=16000)
    assert figures["energy_distance"] <= 0.1 * figures["pretrained"]["energy_distance"]
    assert figures[SCORE_ERROR] <= 0.1 * figures["pretrained"][SCORE_ERROR]


# -- diffusers chains (issue 18 item 4: the digits UNet) ---------------------------------------------------------


def _tiny_unet_chain(num_steps: int = 8):
    """A randomly initialised tiny UNet2DModel on (1, 8, 8) with the digits scheduler (no x0 clipping), float64."""
    from rlft.models.diffusers_chain import DiffusersChain
    from rlft.tasks.digits_unet import digits_scheduler_config, tiny_unet_config

    chain = DiffusersChain.from_config(tiny_unet_config((8, 16)), digits_scheduler_config(100), num_steps=num_steps, seed=0)
    return chain.to(dtype=torch.float64)


class ImageLinearLogit(nn.Module):
    """l(x, n) = <A, x> + n: grad_x l = A for images (B, 1, 8, 8)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.A = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def forward(self, x, noise_std):
        return (x * self.A).flatten(1).sum(1) + noise_std


def test_on_a_diffusers_chain_the_correction_is_the_means_response_to_a_score_shift_by_grad_l():
    """On a DiffusersChain the control c_k w grad l must equal what the chain's own mean does when the UNet's score
    -eps/sqrt(1 - ab_k) is shifted by w grad l (eps -> eps - sqrt(1 - ab_k) w grad l), and Levels.diffuse must be the
    scheduler's own add_noise at the step's timestep."""
    chain = _tiny_unet_chain()
    levels, w, logit = Levels(chain), 0.7, ImageLinearLogit()
    control = DiscriminatorGuidance(chain, logit, weight=w)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    base_output = chain.model_output
    for k in (0, 3, chain.num_steps - 1):
        tau = int(chain.scheduler.timesteps[k])
        ab = float(chain.scheduler.alphas_cumprod[tau])
        kk = torch.full((4,), k)
        torch.testing.assert_close(levels.diffuse(x0, kk, eps), chain.scheduler.add_noise(x0, eps, torch.full((4,), tau)),
                                   rtol=1e-6, atol=1e-6)  # the scheduler keeps alphas_cumprod in float32
        x = levels.diffuse(x0, kk, eps)
        with torch.no_grad():
            plain = chain.mean(k, x)
            chain.model_output = lambda k_, x_, cond=None: base_output(k_, x_, cond) - math.sqrt(1.0 - ab) * w * logit.A
            shifted = chain.mean(k, x)
            del chain.model_output  # back to the class's method
            torch.testing.assert_close(ControlledChain(chain, control).mean(k, x) - plain, shifted - plain,
                                       rtol=1e-9, atol=1e-12)
        assert float((shifted - plain).abs().max()) > 1e-4  # a real shift, not 0 = 0


def test_the_conv_discriminator_double_backpropagates_and_the_learner_runs_on_a_diffusers_chain(tmp_path):
    """network auto is a conv net for images: J_MSE's phi-gradient through it matches central finite differences;
    the learner trains on an image array (N, 1, 8, 8), evaluates and keeps the UNet frozen."""
    import numpy as np

    from rlft.guidance.discriminator import ConvLogitNet

    net = logit_net((1, 8, 8), hidden=4, depth=2, num_frequencies=2).double()
    assert isinstance(net, ConvLogitNet) and not isinstance(logit_net((2,), 4, 2, 2), ConvLogitNet)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    target, weight = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    params = list(net.parameters())
    grads = torch.autograd.grad(mse_loss(net, x, n, target, weight), params, allow_unused=True)
    grads = [torch.zeros_like(q) if gr is None else gr for q, gr in zip(params, grads)]  # grad_x l ignores the last bias
    v = [torch.randn(q.shape, generator=g, dtype=torch.float64) for q in params]  # a random direction in phi
    directional, h = sum(float((gr * vi).sum()) for gr, vi in zip(grads, v)), 1e-5

    def shifted(t: float) -> float:
        with torch.no_grad():
            for q, vi in zip(params, v):
                q.add_(t * vi)
        value = float(mse_loss(net, x, n, target, weight).detach())
        with torch.no_grad():
            for q, vi in zip(params, v):
                q.sub_(t * vi)
        return value

    assert directional == pytest.approx((shifted(h) - shifted(-h)) / (2 * h), rel=1e-6)
    assert abs(directional) > 1e-3

    chain = _tiny_unet_chain()
    np.save(tmp_path / "images.npy", torch.randn(40, 1, 8, 8, generator=g).numpy())
    task = _task({"hidden": 4, "depth": 1, "drift_iterations": 2, "batch_size": 8, "objective": "mse_ce",
                  "data": {"path": str(tmp_path / "images.npy"), "holdout": 0.25}}, num_steps=8)
    lrn = build_learner(task, chain, None)
    before = [q.clone() for q in chain.unet.parameters()]
    figures = lrn.train_iteration()
    assert isinstance(lrn.discriminator, ConvLogitNet) and math.isfinite(figures["mse_loss"])
    assert lrn.samples()[1].shape == (30, 1, 8, 8)
    out = lrn.evaluate(num_samples=10)
    assert out["num_samples"] == 10 and math.isfinite(out["energy_distance"]) and out["pretrained"]["energy_distance"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, chain.unet.parameters()))
    with pytest.raises(ConfigError, match="learner.network conv needs image events"):
        _learner({"network": "conv"})
