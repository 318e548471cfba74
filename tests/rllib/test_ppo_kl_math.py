"""PPO+KL's surrogate gradient against the closed-form dJ/dtheta of a 1-D linear-Gaussian chain (MATH.md §5, §5b).

The chain (float64 simulation, fixed seeds), with the policy's mean delta_k = theta x_k (`DriftPolicyModule` with
mean_scale "one" and its mean network replaced by the one-parameter map x -> theta x):

    x_0 ~ N(M0, V0),   x_{k+1} = a_k x_k + delta_k + s_k eps_k,   r(x_K) = -lam/2 (x_K - c)^2
    J(theta) = E[r(x_K)] - alpha sum_k E[KL_k],   KL_k = delta_k^2 / (2 s_k^2) = theta^2 x_k^2 / (2 s_k^2)

x_k is Gaussian with mu_{k+1} = (a_k + theta) mu_k, v_{k+1} = (a_k + theta)^2 v_k + s_k^2, so J(theta) is a closed
form in (mu_k, v_k) and dJ/dtheta is its autograd derivative (float64).

What the learner computes, run through its real code: the learner connector pipeline of `PPOKLLearner` (RLlib's
AddOneTs..., `KLPenaltyConnector`: r_k -= alpha KL_k(behaviour delta), GAE with gamma = lambda = 1, RLlib's
advantage standardisation A^ = (A - m) / sigma_GAE, `KLLossScaleConnector`: column alpha / sigma_A) and
`compute_loss_for_module` at the behaviour parameters (one epoch, ratio = 1, so no clipping is active):

    grad L = -(1 / (N K)) sum A^_t grad log pi_t  +  (alpha / sigma_A) (1 / (N K)) sum_t grad KL_t(theta)

(the value loss has no theta in it). By the learner's own convention (rlft.rllib.ppo_kl: "dividing by sigma_A keeps
alpha the same trade-off between reward and KL as in J") the loss is -J's surrogate / (K sigma_A), so what is compared
with dJ/dtheta is  g = -K sigma_A grad L,  sigma_A read back from the learner's column (alpha / KL_LOSS_COEFF). That
holds exactly only when sigma_A is the std RLlib's GAE divided the advantages by (sigma_GAE): the scale comparison is
the point of the test, so advantage standardisation stays on, as the learner configures it.

A fitted critic matters (`test_learner_gradient_with_a_fitted_critic`): RLlib standardises over ALL rows, the
bootstrap row each episode gets appended included, with numpy's std (ddof 0). `KLLossScaleConnector` used to divide
by the std of the loss-mask rows only (ddof 1): ~1 % apart at the untrained critic, but with a critic that fits the
returns (here the exact value function) sigma_A / sigma_GAE was 0.66 and the learner's gradient -40.4 +- 0.4 against
the exact -50.34. It now divides by the same std as GAE, and the same batches give the closed form.

The standard errors come from independent batches (each with its own standardisation, as the learner sees them).
Batch columns are float32 as RLlib's NumpyToTensor / GAE make them (rounding ~1e-7, far below the Monte-Carlo error);
theta, the policy module, the chain and the closed forms are float64.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing
from torch import nn

from rlft.rllib.connectors import KLPenaltyConnector
from rlft.rllib.keys import ALPHA, KL_LOSS_COEFF
from rlft.rllib.modules import DriftPolicyModule, drift_model_config
from rlft.rllib.ppo_kl import PPOKLLearner

# -- the chain (a_k, s_k per step), the reward, alpha and the behaviour parameter ------------------------------
K = 4
A_K = (0.9, 0.8, 0.9, 1.0)
S_K = (0.6, 0.5, 0.4, 0.3)
M0, V0 = 0.5, 1.0
LAM, C = 1.0, 2.0
ALPHA_ = 1.0
THETA = 0.3  # not 0: the direct KL term's gradient alpha theta E[x_k^2] / s_k^2 vanishes at theta = 0
EPISODES_PER_BATCH = 2000
BATCHES = {"initial": 20, "exact": 20}  # independent batches of EPISODES_PER_BATCH per critic (seeds b, 1000 + b)


def closed_form_j(theta: torch.Tensor) -> torch.Tensor:
    """J(theta) from the Gaussian moments of x_k (float64)."""
    mu, v = torch.tensor(M0, dtype=torch.float64), torch.tensor(V0, dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64)
    for a, s in zip(A_K, S_K):
        kl = kl + theta**2 * (mu**2 + v) / (2 * s**2)
        mu, v = (a + theta) * mu, (a + theta) ** 2 * v + s**2
    return -LAM / 2 * ((mu - C) ** 2 + v) - ALPHA_ * kl


def closed_form_grad() -> float:
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    return float(torch.autograd.grad(closed_form_j(theta), theta)[0])


def exact_value_coefficients(theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V_k(x) = E[r(x_K) - alpha sum_{j >= k} KL_j | x_k = x] = q_k x^2 + l_k x + c_k, k = 0..K (K: r itself).

    V_k(x) = -alpha theta^2 x^2 / (2 s_k^2) + E[V_{k+1}(m x + s_k eps)], m = a_k + theta.
    """
    q, l, c = np.zeros(K + 1), np.zeros(K + 1), np.zeros(K + 1)
    q[K], l[K], c[K] = -LAM / 2, LAM * C, -LAM / 2 * C**2
    for k in range(K - 1, -1, -1):
        m = A_K[k] + theta
        q[k] = q[k + 1] * m * m - ALPHA_ * theta**2 / (2 * S_K[k] ** 2)
        l[k] = l[k + 1] * m
        c[k] = c[k + 1] + q[k + 1] * S_K[k] ** 2
    return tuple(torch.as_tensor(v) for v in (q, l, c))


class ThetaTimesX(nn.Module):
    """The policy's mean network reduced to one float64 parameter: features [x, time features...] -> theta x."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta], dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.theta * features[:, :1].double()


OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)  # [x_k, k/K]
ACT_SPACE = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)  # a_k = x_{k+1} - a_k x_k


def simulate(n: int, seed: int) -> tuple[list[SingleAgentEpisode], np.ndarray]:
    """n exact episodes of the chain under the behaviour policy (float64), as the drift env and its runner record
    them (obs [x_k, k/K], action a_k, reward r(x_K) on the last step, ACTION_LOGP, ACTION_DIST_INPUTS = [delta, log
    s_k]); also each episode's J-return r(x_K) - alpha sum_k KL_k (n,)."""
    g = np.random.default_rng(seed)
    x = M0 + math.sqrt(V0) * g.standard_normal(n)
    obs, act = np.zeros((n, K + 1, 2)), np.zeros((n, K, 1))
    logp, adi, rew = np.zeros((n, K)), np.zeros((n, K, 2)), np.zeros((n, K))
    kl = np.zeros(n)
    for k, (a_k, s_k) in enumerate(zip(A_K, S_K)):
        obs[:, k, 0], obs[:, k, 1] = x, k / K
        delta = THETA * x
        a = delta + s_k * g.standard_normal(n)
        act[:, k, 0], adi[:, k, 0], adi[:, k, 1] = a, delta, math.log(s_k)
        logp[:, k] = -0.5 * ((a - delta) / s_k) ** 2 - math.log(s_k) - 0.5 * math.log(2 * math.pi)
        kl += delta**2 / (2 * s_k**2)
        x = a_k * x + a
    obs[:, K, 0], obs[:, K, 1] = x, 1.0
    rew[:, K - 1] = -LAM / 2 * (x - C) ** 2
    episodes = [
        SingleAgentEpisode(
            observations=list(obs[i].astype(np.float32)), actions=list(act[i].astype(np.float32)), rewards=list(rew[i]),
            extra_model_outputs={Columns.ACTION_LOGP: list(logp[i].astype(np.float32)),
                                 Columns.ACTION_DIST_INPUTS: list(adi[i].astype(np.float32))},
            terminated=True, observation_space=OBS_SPACE, action_space=ACT_SPACE, len_lookback_buffer=0,
        )
        for i in range(n)
    ]
    return episodes, rew[:, K - 1] - ALPHA_ * kl


def build_learner():
    """A local `PPOKLLearner` configured as `ppo_kl` configures it (gamma 1, entropy 0, no PPO KL loss, the KL weight
    in learner_config_dict) with lambda_ = 1 (GAE with lambda < 1 is biased unless the critic is exact)."""
    config = (
        PPOConfig()
        .environment(observation_space=OBS_SPACE, action_space=ACT_SPACE, normalize_actions=False, clip_actions=False)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=DriftPolicyModule,
                                               model_config=drift_model_config(list(S_K), mean_scale="one")))
        .learners(learner_class=PPOKLLearner, learner_config_dict={ALPHA: ALPHA_})
        .training(gamma=1.0, lambda_=1.0, lr=1e-3, num_epochs=1, clip_param=0.2, entropy_coeff=0.0, use_kl_loss=False,
                  vf_clip_param=1e8)
        .debugging(seed=0)
    )
    torch.manual_seed(0)  # the value net's initialisation
    learner = config.build_learner()
    module = learner.module[DEFAULT_MODULE_ID]
    module.double()
    module.mean_net = ThetaTimesX(THETA)
    return learner, module


class Estimator:
    """Runs a batch through the learner and returns -K sigma grad L for the variants the tests compare."""

    def __init__(self) -> None:
        self.learner, self.module = build_learner()
        self.config = self.learner.config.get_config_for_module(DEFAULT_MODULE_ID)
        pieces = [c for c in self.learner._learner_connector.connectors if isinstance(c, KLPenaltyConnector)]
        assert len(pieces) == 1, "PPOKLLearner's pipeline must hold one KLPenaltyConnector"
        self.penalty = pieces[0]

    def batch(self, episodes, penalty: bool = True) -> dict:
        self.penalty.alpha = ALPHA_ if penalty else 0.0  # penalty=False: the DPOK-style partial gradient
        try:
            out = self.learner._learner_connector(rl_module=self.learner.module, batch={}, episodes=episodes,
                                                  shared_data={}, metrics=None)
        finally:
            self.penalty.alpha = ALPHA_
        return out[DEFAULT_MODULE_ID]

    def grad(self, mb: dict) -> float:
        """d L / d theta of the learner's loss on the batch."""
        fwd = self.module.forward_train(mb)
        loss = self.learner.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=self.config, batch=mb, fwd_out=fwd)
        return float(torch.autograd.grad(loss, self.module.mean_net.theta)[0])

    def sigma_gae(self, mb: dict) -> float:
        """The std RLlib's GAE standardised the advantages by: np.std of targets - V over every row."""
        with torch.no_grad():
            raw = (mb[Postprocessing.VALUE_TARGETS].double() - self.module.compute_values(mb).double()).numpy()
        return float(np.std(raw))

    def run(self, critic: str, batches: int) -> dict[str, np.ndarray]:
        keys = ("learner", "flipped", "one_scale", "partial", "scale_ratio", "return")
        out: dict[str, list[float]] = {k: [] for k in keys}
        for b in range(batches):
            seed = 1000 * (critic == "exact") + b
            episodes, returns = simulate(EPISODES_PER_BATCH, seed)
            out["return"].append(float(returns.mean()))
            mb = self.batch(episodes)
            coeff = mb[KL_LOSS_COEFF]
            sigma_a = ALPHA_ / float(coeff[0])  # the learner's own scale of the direct term
            out["learner"].append(-K * sigma_a * self.grad(mb))
            mb[KL_LOSS_COEFF] = -coeff  # the direct KL term with its sign flipped
            out["flipped"].append(-K * sigma_a * self.grad(mb))
            sigma = self.sigma_gae(mb)
            mb[KL_LOSS_COEFF] = torch.full_like(coeff, ALPHA_ / sigma)  # one scale for both terms
            out["one_scale"].append(-K * sigma * self.grad(mb))
            out["scale_ratio"].append(sigma_a / sigma)
            if critic == "initial":
                mb = self.batch(simulate(EPISODES_PER_BATCH, seed)[0], penalty=False)  # the same episodes, KL only in the loss
                out["partial"].append(-K * ALPHA_ / float(mb[KL_LOSS_COEFF][0]) * self.grad(mb))
        return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def estimates() -> dict[str, dict[str, np.ndarray]]:
    est = Estimator()
    results = {"initial": est.run("initial", BATCHES["initial"])}
    q, l, c = exact_value_coefficients(THETA)

    def exact_values(batch, embeddings=None):  # V_k(x_k) from obs [x, k/K]
        obs = batch[Columns.OBS].double()
        k = torch.round(obs[:, 1] * K).long()
        return q[k] * obs[:, 0] ** 2 + l[k] * obs[:, 0] + c[k]

    est.module.compute_values = exact_values  # a critic that fits the returns (the one a trained learner approaches)
    try:
        results["exact"] = est.run("exact", BATCHES["exact"])
    finally:
        del est.module.compute_values
    return results


def mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def report(name: str, x: np.ndarray, exact: float) -> str:
    m, se = mean_se(x)
    return f"{name}: {m:.3f} +- {se:.3f} (closed form {exact:.3f}, {abs(m - exact) / se:.1f} s.e.)"


def test_the_simulated_chain_is_the_closed_forms_chain(estimates):
    """The episodes' mean J-return matches J(theta): simulation and closed form describe the same chain."""
    j = float(closed_form_j(torch.tensor(THETA, dtype=torch.float64)))
    returns = np.concatenate([estimates["initial"]["return"], estimates["exact"]["return"]])
    m, se = mean_se(returns)
    assert abs(m - j) < 3 * se, report("J", returns, j)


def test_learner_gradient_matches_the_closed_form_at_the_initial_critic(estimates):
    """-K sigma_A grad L with the learner's freshly initialised critic: within 3 s.e. of dJ/dtheta = -50.34.

    Measured: -48.87 +- 0.90 (sigma_A / sigma_GAE = 0.988 here, a 1 % scale error the s.e. cannot see)."""
    exact = closed_form_grad()
    m, se = mean_se(estimates["initial"]["learner"])
    assert abs(m - exact) < 3 * se, report("learner gradient (initial critic)", estimates["initial"]["learner"], exact)


def test_learner_gradient_with_a_fitted_critic(estimates):
    """The same comparison with the exact value function as the critic (what a trained critic approaches)."""
    exact = closed_form_grad()
    m, se = mean_se(estimates["exact"]["learner"])
    assert abs(m - exact) < 3 * se, report("learner gradient (exact critic)", estimates["exact"]["learner"], exact)


@pytest.mark.parametrize("critic", ["initial", "exact"])
def test_direct_term_and_advantages_share_one_scale(estimates, critic):
    """alpha / KL_LOSS_COEFF is the std the policy-gradient term was divided by, so alpha weighs KL as it does in J."""
    ratio = estimates[critic]["scale_ratio"]
    assert np.allclose(ratio, 1.0, atol=1e-3), f"sigma_A / sigma_GAE per batch: {np.round(ratio, 4)}"


@pytest.mark.parametrize("critic", ["initial", "exact"])
def test_gradient_with_one_scale_matches_the_closed_form(estimates, critic):
    """With the direct term divided by sigma_GAE (the scale of the advantages), -K sigma_GAE grad L is within 3 s.e.
    of dJ/dtheta for either critic: the connectors, GAE, the PPO term and the direct term are right otherwise.

    Measured: initial critic -49.20 +- 0.91, exact critic -49.53 +- 0.53 (closed form -50.34)."""
    exact = closed_form_grad()
    m, se = mean_se(estimates[critic]["one_scale"])
    assert abs(m - exact) < 3 * se, report(f"one-scale gradient ({critic} critic)", estimates[critic]["one_scale"], exact)


@pytest.mark.parametrize("critic", ["initial", "exact"])
def test_flipping_the_direct_kl_terms_sign_is_detected(estimates, critic):
    """The direct term with its sign flipped moves the estimate > 5 s.e. from dJ/dtheta (measured: -2.71 +- 0.76 and
    5.51 +- 0.18): the comparison above can fail when that term is wrong."""
    exact = closed_form_grad()
    m, se = mean_se(estimates[critic]["flipped"])
    assert abs(m - exact) > 5 * se, report(f"flipped direct term ({critic} critic)", estimates[critic]["flipped"], exact)


def test_the_partial_dpok_gradient_is_detected(estimates):
    """KL only in the loss (no alpha KL_k in the rewards: DPOK's partial gradient, MATH.md §5b) is biased: > 5 s.e.
    from dJ/dtheta (measured -37.09 +- 0.55)."""
    exact = closed_form_grad()
    m, se = mean_se(estimates["initial"]["partial"])
    assert abs(m - exact) > 5 * se, report("partial gradient", estimates["initial"]["partial"], exact)
