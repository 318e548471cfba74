"""Conditional differentiable learners (issue 19 item 1): the networks take the condition, training draws only
training conditions, evaluation reports per condition, and an unconditional task's numbers are unchanged.

Pinned: the per-condition evaluation of the exact optimal control at every condition (training and held-out) closes
the gap to within Monte-Carlo error (so the reward, the control and the initial law all see the right c);
`NetworkControl.all_steps` with a condition against the step-by-step stack; a value fit that can only succeed
through its condition input; ELEGANT without conditions against numbers recorded before conditions existed.
"""

from __future__ import annotations

import pytest
import torch

import rlft.evaluation as ev
from rlft.conditions import parse_conditions
from rlft.config import ConfigError, task_from_dict
from rlft.control.elegant import ElegantLearner
from rlft.control.networks import NetworkControl, VectorControlNet
from rlft.control.value import ValueNet, fit_value
from rlft.rewards.base import Reward, at_condition
from rlft.rewards.builtin import QuadraticReward
from tests.conftest import MIX2D, make_gmm

CONDITIONS = {"train": [[1.0, 1.0], [-1.0, 0.5], [0.5, -1.0], [0.0, 0.0]], "eval": [[1.5, -0.5], [-0.5, -1.0]]}
TINY = dict(batch_size=32, drift_iterations=4, value_starts=32, value_rollouts=4, value_iterations=10, init_iterations=3,
            init_batch_size=16, init_steps=4, hidden=16, depth=2)


def _task(reward: dict, conditions: dict | None = CONDITIONS, alpha: float = 0.5, num_steps: int = 12):
    data = {"model": {"type": "gmm", **MIX2D}, "reward": reward, "alpha": alpha, "num_steps": num_steps, "seed": 3,
            "run": {"iterations": 2}}
    if conditions is not None:
        data["conditions"] = conditions
    return task_from_dict(data)


class RecordingReward(Reward):
    """r(x, c) = -|x - c|^2 / 2 that records every condition it is called with."""

    conditional = True
    name = "recording"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.seen.append(cond.detach().clone())
        return -0.5 * (x - cond).pow(2).sum(-1)


def test_unconditional_elegant_numbers_unchanged():
    """Regression guard: without conditions ELEGANT draws, trains and samples exactly as before conditions existed
    (numbers recorded with the code of commit 948e718, before the control took a condition)."""
    task = _task({"type": "quadratic", "center": [0.5, 1.0]}, conditions=None)
    learner = ElegantLearner(task, make_gmm(12), QuadraticReward([0.5, 1.0]), None, **TINY)
    m1, m2 = learner.train_iteration(), learner.train_iteration()
    x = learner.initial_states(5, torch.Generator().manual_seed(0))
    got = [m1["train_objective"], m1["init_value"], m2["train_objective"], m2["train_reward"], float(x.sum())]
    expected = [-1.2674756648585777, -0.7753180947107505, -1.3378168403264556, -1.334938074605448, -4.229191313440852]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_training_never_draws_a_heldout_condition():
    """Every condition the reward and the control see during training (value data, initial law, drift updates) is a
    training condition, every training condition is drawn, and no held-out one ever is (fails if `sample` draws
    from the held-out set too: checked by a temporary edit)."""
    task = _task({"type": "quadratic", "center": "condition"})
    reward = RecordingReward()
    learner = ElegantLearner(task, make_gmm(12), reward, None, **TINY)
    seen_by_control: list[torch.Tensor] = []
    forward = learner.drift_net.forward

    def recording_forward(t, x, cond=None):
        seen_by_control.append(cond.detach().clone())
        return forward(t, x, cond)

    learner.drift_net.forward = recording_forward
    learner.train_iteration()
    learner.train_iteration()
    conds = parse_conditions(CONDITIONS)
    train = {tuple(r) for r in conds.train.double().tolist()}
    held = {tuple(r) for r in conds.eval.double().tolist()}
    for name, seen in (("reward", reward.seen), ("control", seen_by_control)):
        rows = {tuple(r) for r in torch.cat(seen).tolist()}
        assert rows <= train and not rows & held, f"the {name} saw a condition outside the training set"
        assert rows == train, f"the {name} never saw some training condition"
    assert learner.reward_queries == sum(s.shape[0] for s in reward.seen)


def test_optimal_control_per_condition_closes_every_gap():
    """With the exact optimal control and initial law of each condition (dispatched on c), evaluate_conditional's
    figures at each condition equal the unconditional evaluation of that condition's problem (reward at c, its
    optimal control and law, same seed), J*(c) is the closed form at c, every gap (training and held-out) closes up
    to the chain's discretisation, and the means are over the right sets. A wrong condition reaching the control,
    the initial law or the reward breaks the equalities."""
    model = make_gmm(20)
    alpha = 0.5
    reward = QuadraticReward("condition", scale=1.0)
    conds = parse_conditions(CONDITIONS)
    every = torch.cat([conds.train, conds.eval]).double()
    optimal = [model.optimal_control(QuadraticReward(c.tolist()), alpha) for c in every]  # the explicit reward at c

    def which(cond: torch.Tensor) -> int:
        assert (cond == cond[0]).all(), "the rows of one condition's evaluation differ"
        i = int((every - cond[0].double()).abs().sum(1).argmin())
        assert torch.equal(every[i], cond[0].double())
        return i

    class Dispatch:
        def __call__(self, k, x, cond):
            return optimal[which(cond)](k, x, cond)

        def init_sample(self, n, generator=None, cond=None):
            return optimal[which(cond)].init_sample(n, generator)

    d = Dispatch()
    n = 400
    out = ev.evaluate_run(model, reward, alpha, control=d, init=d, num_samples=n, seed=1, conditions=conds)
    per = out[ev.PER_CONDITION]
    assert sorted(per) == ["eval_0", "eval_1", "train_0", "train_1", "train_2", "train_3"]
    for i, key in ((1, "train_1"), (5, "eval_1")):
        alone = ev.evaluate_run(model, at_condition(reward, every[i]), alpha, control=optimal[i], init=optimal[i],
                                num_samples=n, seed=1)
        for k in (ev.REWARD, ev.KL, ev.OBJECTIVE, ev.OPTIMAL_OBJECTIVE, ev.GAP_CLOSURE, ev.ENERGY_DISTANCE):
            assert per[key][k] == pytest.approx(alone[k], rel=1e-12), (key, k)
        assert per[key][ev.PRETRAINED][ev.OBJECTIVE] == pytest.approx(alone[ev.PRETRAINED][ev.OBJECTIVE], rel=1e-12)
    for key, fig in per.items():
        c = torch.tensor(fig[ev.CONDITION], dtype=torch.float64)
        assert fig[ev.OPTIMAL_OBJECTIVE] == pytest.approx(model.exact_target(QuadraticReward(c.tolist()), alpha).optimal_objective)
        assert fig[ev.GAP_CLOSURE] > 0.85, key  # K = 20: the discrete chain under the continuous-time optimum
    assert out[ev.GAP_CLOSURE] == pytest.approx(sum(per[f"train_{i}"][ev.GAP_CLOSURE] for i in range(4)) / 4)
    assert out[ev.HELDOUT][ev.GAP_CLOSURE] == pytest.approx((per["eval_0"][ev.GAP_CLOSURE] + per["eval_1"][ev.GAP_CLOSURE]) / 2)
    assert out[ev.PRETRAINED][ev.GAP_CLOSURE] == 0.0


def test_unconditional_reward_in_a_conditional_task():
    """An unconditional reward needs no change: ELEGANT trains on a conditional task with it, and per condition the
    pretrained figures are identical (the reward does not depend on c; the same seed draws the same samples)."""
    task = _task({"type": "quadratic", "center": [0.5, 1.0]})
    reward = QuadraticReward([0.5, 1.0])
    learner = ElegantLearner(task, make_gmm(12), reward, None, **TINY)
    assert learner.drift_net.cond_dim == 2 and learner.value_net.mlp.cond_dim == 2
    learner.train_iteration()
    out = learner.evaluate(num_samples=200)
    pre = [f[ev.PRETRAINED] for f in out[ev.PER_CONDITION].values()]
    assert all(p[ev.REWARD] == pre[0][ev.REWARD] and p[ev.OPTIMAL_OBJECTIVE] == pre[0][ev.OPTIMAL_OBJECTIVE] for p in pre)
    assert out[ev.PRETRAINED][ev.REWARD] == pytest.approx(pre[0][ev.REWARD])


def test_a_conditional_reward_needs_conditions_and_a_learner_that_takes_them():
    with pytest.raises(ConfigError, match="declares no conditions"):
        ElegantLearner(_task({"type": "quadratic", "center": [0.5, 1.0]}, conditions=None), make_gmm(12),
                       QuadraticReward("condition"), None, **TINY)
    from rlft.control.adjoint_matching import AdjointMatchingLearner

    with pytest.raises(ConfigError, match="does not take conditions"):
        AdjointMatchingLearner(_task({"type": "quadratic", "center": "condition"}), make_gmm(12), QuadraticReward("condition"))


def test_all_steps_with_a_condition_equals_the_step_by_step_stack():
    torch.manual_seed(0)
    model = make_gmm(6)
    net = VectorControlNet((2,), (3,), hidden=8, depth=2, zero_init=False).double()
    control = NetworkControl(model, net)
    states = torch.randn(4, 3, 2, dtype=torch.float64)  # (B, n, D) at levels 2, 3, 4
    cond = torch.randn(4, 3, dtype=torch.float64)
    stacked = torch.stack([control(2 + j, states[:, j], cond) for j in range(3)], dim=1)
    torch.testing.assert_close(control.all_steps(states, 2, cond), stacked)


def test_value_fit_uses_the_condition():
    """Targets that depend on the condition only: the conditional value fits them (held-out R^2 near 1, the fit is
    kept); x0 alone carries no information about them."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(400, 2, generator=g, dtype=torch.float64)
    cond = torch.randn(400, 2, generator=g, dtype=torch.float64)
    y = cond[:, 0] - 0.5 * cond[:, 1]
    net = ValueNet((2,), hidden=32, depth=2, cond_shape=(2,)).double()
    fit = fit_value(net, x0, y, 600, g, lr=3e-3, cond=cond)
    assert fit["value_flat"] == 0.0 and fit["value_r2"] > 0.9


def test_finetuned_sampler_takes_cond():
    """`rlft.load`'s sampler: cond (d,) gives the chain run with the control at c; cond (n, d) samples each distinct
    condition with its own seed; a conditional sampler refuses to sample without cond."""
    from pathlib import Path

    from rlft.api import FineTuned
    from rlft.evaluation import control_at, init_at
    from rlft.sampling import sample

    task = _task({"type": "quadratic", "center": "condition"})
    learner = ElegantLearner(task, make_gmm(12), QuadraticReward("condition"), None, **TINY)
    learner.train_iteration()
    tuned = FineTuned(task, learner.model, learner.control(), learner.init_dist(), Path("."))
    c = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x = tuned.sample(50, seed=4, cond=c)
    ref = sample(learner.model, 50, control=control_at(learner.control(), c), init=init_at(learner.init_dist(), c), seed=4,
                 progress=False).x
    torch.testing.assert_close(x, ref)
    rows = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64).repeat_interleave(25, 0)  # (50, 2)
    mixed = tuned.sample(50, seed=4, cond=rows)
    torch.testing.assert_close(mixed[rows[:, 0] == 0.0], tuned.sample(25, seed=4, cond=rows[-1]))
    with pytest.raises(ValueError, match="pass cond"):
        tuned.sample(5)


def test_bench_conditional_starts_ray_only_for_rllib_learners_and_plots_both_splits(tmp_path):
    """`rlft bench conditional` runs every learner in one process: Ray only for the RLlib ones; the PNG has a
    training (solid) and a held-out (dashed) curve per learner."""
    pytest.importorskip("matplotlib")
    from rlft.benchmarks.conditional import _to_threshold, needs_ray, plot_curves

    assert needs_ray("grpo") and needs_ray("ppo_kl") and not needs_ray("elegant")
    curve = [{"iteration": i, "reward_queries": 256 * i, "train_time": float(i), "gap_closure": g, "kl": 1.0,
              "heldout_gap_closure": g - 0.05} for i, g in ((1, 0.3), (2, 0.6), (3, 0.95))]
    hit = _to_threshold(curve)
    assert hit["50%"]["reward_queries"] == 512 and hit["90%"]["reward_queries"] == 768
    path = plot_curves({"grpo": {"curve": curve}, "elegant": {"error": "x"}}, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("c.png")
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # nothing half-written beside it
