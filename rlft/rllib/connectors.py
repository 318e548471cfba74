"""Learner connectors of the rlft RLlib learners: they relabel a batch before (or scale it after) GAE, nothing else.

    KLPenaltyConnector    PPO+KL, before GAE:  r_k <- r_k - alpha KL_k(delta_behaviour)        (ELEGANT eq. 22-23)
    KLLossScaleConnector  PPO+KL, after GAE:   column alpha / sigma_A for the direct KL term  (see `rlft.rllib.ppo_kl`)
    FPGRewardConnector    f-PG, before GAE:    r_t <- shaped -f'(ratio(s_{t+1}))               (BOOST eq. 4.7)
    GroupAdvantageConnector  GRPO, in GAE's place: A_i = (R_i - mean_group) / (std_group + eps) on every step of
                          trajectory i, and the direct KL term's column (see `rlft.rllib.grpo`)

KL_k = |delta_k|^2 / (2 s_k^2) is the closed-form per-step KL (`rlft.sampling.step_kl`), read from the batch's
ACTION_DIST_INPUTS = [delta, log s_k]; f-PG's ratio p_pi / p_* = exp(logit) comes from the learner-only
discriminator RLModule (`rlft.rllib.modules.DiscriminatorModule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing

from rlft.divergences import get_divergence
from rlft.rllib.keys import DISCRIMINATOR, FPG_REWARD, GROUP_RETURN_STD, KL_LOSS_COEFF, LOGITS, PATH_KL
from rlft.rllib.modules import DriftPolicyModule
from rlft.rllib.restart import shape_rewards
from rlft.sampling import step_kl


def _unwrapped(module):
    """The RLModule inside a DDP wrapper (num_learners > 1), else the module itself."""
    return module.unwrapped() if hasattr(module, "unwrapped") else module


def kl_from_dist_inputs(dist_inputs: torch.Tensor) -> torch.Tensor:
    """Per-step KL to the pretrained chain from ACTION_DIST_INPUTS = [delta, log s_k] (B, 2D), shape (B,)."""
    delta, log_std = dist_inputs.chunk(2, dim=-1)
    return step_kl(delta, torch.exp(log_std[:, 0]))


class KLPenaltyConnector(ConnectorV2):
    """Learner connector (batch level, after NumpyToTensor, before GAE): rewards -= alpha * KL_k(behaviour delta)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, alpha: float, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.alpha = float(alpha)

    def __call__(self, *, rl_module, batch, episodes, metrics=None, **kwargs):
        for mid, mb in batch.items():
            if Columns.ACTION_DIST_INPUTS not in mb or not isinstance(_unwrapped(rl_module[mid]), DriftPolicyModule):
                continue
            mask = mb[Columns.LOSS_MASK].float()
            cost = kl_from_dist_inputs(mb[Columns.ACTION_DIST_INPUTS]) * mask  # (N,), 0 on the bootstrap steps
            mb[Columns.REWARDS] = mb[Columns.REWARDS] - self.alpha * cost
            if metrics is not None:
                num_episodes = max(1.0, float(mb[Columns.TERMINATEDS].float().sum() + mb[Columns.TRUNCATEDS].float().sum()))
                metrics.log_value((mid, PATH_KL), float(cost.sum()) / num_episodes, window=1)
        return batch


class KLLossScaleConnector(ConnectorV2):
    """Learner connector after GAE: adds the column alpha / sigma_A, sigma_A = the std GAE standardised by.

    RLlib's GAE standardises the advantages; dividing the direct term by sigma_A keeps alpha the same trade-off
    between reward and KL as in J (`rlft.rllib.ppo_kl`)."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, alpha: float, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.alpha = float(alpha)

    def __call__(self, *, rl_module, batch, episodes, **kwargs):
        for mid, mb in batch.items():
            if Postprocessing.VALUE_TARGETS not in mb or not isinstance(_unwrapped(rl_module[mid]), DriftPolicyModule):
                continue
            with torch.no_grad():
                raw = mb[Postprocessing.VALUE_TARGETS] - _unwrapped(rl_module[mid]).compute_values(mb)  # A = targets - V
            # the std RLlib's GAE standardised the advantages with: numpy's (ddof 0) over every row of the batch,
            # each episode's bootstrap row included; the loss-mask rows' std (ddof 1) differs by up to 1.5x once the
            # critic fits, and alpha would then weigh the direct KL term by sigma_GAE / sigma_A instead of 1
            # (tests/rllib/test_ppo_kl_math.py: -40.4 +- 0.4 against the exact dJ/dtheta = -50.34 before this)
            sigma = float(raw.double().std(unbiased=False)) if raw.numel() > 1 else 1.0
            mb[KL_LOSS_COEFF] = torch.full_like(raw, self.alpha / max(sigma, 1e-4))
        return batch


# -- f-PG ---------------------------------------------------------------------------------------------------


def fpg_reward(logits: torch.Tensor, fpg_divergence: str, logit_clip: float, center: bool = False) -> torch.Tensor:
    """-f'(p_pi / p_*) with the ratio exp(logit) of a discriminator that labels agent states 1, shape of logits.

    center=True returns -(f'(ratio) - f'(1)): 0 where the agent matches the expert. For fixed-length episodes (drift
    env) the shift is a constant return offset, so the policy gradient is unchanged and the value net fits returns
    near 0 instead of -K f'(1); for variable-length episodes (restart env) it changes the optimum (see restart.py).
    """
    div = get_divergence(fpg_divergence)
    ratio = torch.exp(logits.clamp(-logit_clip, logit_clip))
    out = -div.f_prime(ratio)
    if center:
        out = out + div.f_prime(torch.ones((), dtype=ratio.dtype, device=ratio.device))
    return out


def level_of(obs: torch.Tensor, event_dim: int, num_steps: int) -> torch.Tensor:
    """The noise level (drift: step k; restart: level l) from an observation's column D = level / K, (B,)."""
    return torch.round(obs[:, event_dim] * num_steps).long().clamp(0, num_steps)


@dataclass(frozen=True)
class FPGRewardSpec:
    """How `FPGRewardConnector` turns discriminator logits into per-step rewards (from `rlft.rllib.fpg.FPGOptions`)."""

    fpg_divergence: str
    """f of D_f(p_pi || p_*) (`rlft.divergences.get_divergence`)."""
    fpg_coeff: float
    """Reward scale: r = fpg_coeff * shaped -f'(ratio)."""
    logit_clip: float
    """|logit| is clipped to this before exp (the ratio's range)."""
    center: bool
    """Use -(f'(ratio) - f'(1)) (0 where agent and expert agree)."""
    event_dim: int
    """D: the observation's first D numbers are x, column D is the level / K."""
    num_steps: int
    """K, the number of levels below the data end."""
    shaping: str = "none"
    """One of `rlft.rllib.restart.SHAPINGS`."""
    shaping_coeff: float = 0.0
    """Weight of the time cost ("time_weighted") or of the per-level term ("level_aware")."""
    nfe_cost: float = 0.0
    """Cost per effective NOISE action (restart env)."""


class FPGRewardConnector(ConnectorV2):
    """Learner connector (batch level, before GAE): reward of step t = shaped -f'(ratio(s_{t+1})) (`rlft.rllib.restart`).

    The state after step t is the batch's next row: RLlib lays each episode out as its rows s_0..s_{L-1} followed by
    one bootstrap row s_L (loss mask False), episodes one after another."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, spec: FPGRewardSpec, **kw: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kw)
        self.spec = spec

    def __call__(self, *, rl_module, batch, episodes, metrics=None, **kwargs):
        s = self.spec
        mb = batch.get(DEFAULT_MODULE_ID)
        if mb is None or Columns.OBS not in mb:
            return batch
        obs, mask = mb[Columns.OBS], mb[Columns.LOSS_MASK]
        with torch.no_grad():
            logits = rl_module[DISCRIMINATOR].forward_inference({Columns.OBS: obs})[LOGITS]
            g = fpg_reward(logits, s.fpg_divergence, s.logit_clip, s.center)
        level = level_of(obs, s.event_dim, s.num_steps)
        g_next = torch.cat([g[1:], g.new_zeros(1)])  # row t's next state is row t+1 (episodes are contiguous rows)
        level_next = torch.cat([level[1:], level.new_zeros(1)])
        rewards = shape_rewards(
            s.shaping, g_next, level, level_next, mb[Columns.ACTIONS], mb[Columns.TERMINATEDS].bool(),
            mask, s.num_steps, s.shaping_coeff, s.nfe_cost,
        )
        mb[Columns.REWARDS] = s.fpg_coeff * rewards * mask.float()
        if metrics is not None:
            metrics.log_value((DEFAULT_MODULE_ID, FPG_REWARD), float(g_next[mask].mean()), window=1)
        return batch


# -- GRPO ----------------------------------------------------------------------------------------------------


def group_advantages(returns: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages (Flow-GRPO / DanceGRPO; MATH.md "GRPO"): groups are consecutive runs of G returns.

        A_i = (R_i - mean_g R) / (std_g R + eps)      (normalize_std; std with Bessel's correction, ddof 1)
        A_i =  R_i - mean_g R                         (otherwise)

    Args:
        returns: R_i, (N,), N a multiple of G; trajectories i = gG .. gG + G - 1 form group g.
        group_size: G >= 2.
        normalize_std: divide by the group's std (+ eps).
        eps: added to the std (a group of equal returns gets A = 0, not 0/0).

    Returns:
        (A (N,), the divisor of each trajectory's group (N,): std_g + eps, or 1 without normalisation).
    """
    n, G = returns.shape[0], int(group_size)
    if G < 2 or n % G:
        raise ValueError(f"{n} returns do not split into groups of {G} (need G >= 2 and N a multiple of G)")
    R = returns.reshape(n // G, G)  # (N/G, G)
    centred = R - R.mean(dim=1, keepdim=True)
    scale = R.std(dim=1, keepdim=True) + eps if normalize_std else torch.ones_like(R[:, :1])
    return (centred / scale).reshape(n), scale.expand(-1, G).reshape(n)


class GroupAdvantageConnector(ConnectorV2):
    """Learner connector in GAE's place (GRPO, no critic): the same group-relative advantage on every step of a trajectory.

    Groups are G consecutive episodes of the batch (the EnvRunners return each round's sub-envs in order, and the env
    gives G consecutive sub-envs one condition); a group whose episodes start from different conditions is an error.
    R_i is the episode's reward sum after `KLPenaltyConnector` (r_i - alpha sum_k KL_k(behaviour)), so the score
    part sees the future KL terms (MATH.md §5b). Columns written: ADVANTAGES (A_i per row), VALUE_TARGETS (R_i per
    row, for RLlib's logging only) and, when alpha > 0, KL_LOSS_COEFF = alpha (G - 1) / (G scale_g): the mean baseline
    scales the score part by (G - 1) / G in expectation (it holds R_i itself), and the direct term is scaled alike so
    that the loss gradient is -(G - 1) / (G K scale_g) dJ/dtheta per group (tests/rllib/test_grpo.py pins it).
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, alpha: float, group_size: int,
                 normalize_std: bool = True, eps: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.alpha, self.group_size, self.normalize_std, self.eps = float(alpha), int(group_size), bool(normalize_std), float(eps)

    def __call__(self, *, rl_module, batch, episodes, metrics=None, **kwargs):
        lens = [len(e) for e in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False)]
        G = self.group_size
        for mid, mb in batch.items():
            module = _unwrapped(rl_module[mid])
            if Columns.REWARDS not in mb or not isinstance(module, DriftPolicyModule):
                continue
            if len(lens) % G or sum(lens) != mb[Columns.REWARDS].shape[0]:
                raise ValueError(f"GRPO got {len(lens)} episodes ({sum(lens)} rows for {mb[Columns.REWARDS].shape[0]} in the "
                                 f"batch): not whole groups of {G} consecutive episodes; keep episodes_per_iteration and "
                                 "num_envs multiples of group_size and num_learners <= 1")
            counts = torch.as_tensor(lens, device=mb[Columns.REWARDS].device)
            episode = torch.repeat_interleave(torch.arange(len(lens), device=counts.device), counts)  # (rows,)
            rewards = mb[Columns.REWARDS].double()
            returns = torch.zeros(len(lens), dtype=torch.float64, device=rewards.device).index_add_(0, episode, rewards)
            self._check_groups(mb[Columns.OBS], counts, module)
            adv, scale = group_advantages(returns, G, self.normalize_std, self.eps)  # (E,), (E,)
            dtype = mb[Columns.REWARDS].dtype
            mb[Postprocessing.ADVANTAGES] = adv[episode].to(dtype)
            mb[Postprocessing.VALUE_TARGETS] = returns[episode].to(dtype)
            if self.alpha > 0:
                mb[KL_LOSS_COEFF] = (self.alpha * (G - 1) / G / scale[episode]).to(dtype)
            if metrics is not None:
                metrics.log_value((mid, GROUP_RETURN_STD), float(returns.reshape(-1, G).std(dim=1).mean()), window=1)
        return batch

    def _check_groups(self, obs: torch.Tensor, counts: torch.Tensor, module) -> None:
        """Raises unless the G episodes of every group start from the same condition (obs columns after k/K)."""
        if module.cond_dim == 0:
            return
        starts = torch.cumsum(counts, 0) - counts  # first row of each episode
        cond = obs[starts, module.event_dim + 1 :].reshape(-1, self.group_size, module.cond_dim)  # (groups, G, C)
        bad = (cond != cond[:, :1]).any(dim=2).any(dim=1).nonzero().flatten()
        if len(bad):
            raise ValueError(f"GRPO group {int(bad[0])} (episodes {int(bad[0]) * self.group_size}..) holds episodes of "
                             "different conditions; the env must give each run of group_size consecutive sub-envs one "
                             "condition (conditions drawn per group, not per trajectory)")
