"""Conditional tasks (issue 19 items 1-2): the `conditions:` section, conditional rewards, the exact conditional bed.

Math pinned: a conditional GMM task's exact tilted target p_tar(.|c) and J*(c) (the reward's closed form at c,
`rlft.rewards.base.AtCondition`) against self-normalised importance sampling from the pretrained mixture, per
condition, training and held-out alike; conditional built-in rewards against their explicit formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlft.conditions import Conditions, conditions_of, expand, parse_conditions
from rlft.config import ConfigError
from rlft.rewards.base import AtCondition, FunctionReward, RewardError, at_condition, build_reward, evaluate, is_conditional
from rlft.run_config import validate_task
from tests.conftest import MIX2D, make_mixture

TASK = {
    "model": {"type": "gmm", **MIX2D},
    "reward": {"type": "quadratic", "center": "condition", "scale": 1.5},
    "conditions": {"train": [[1.0, 1.0], [-1.0, 0.5], [0.5, -1.0], [0.0, 0.0]], "eval": [[1.5, -0.5], [-0.5, -1.0]]},
}


# -- parsing --------------------------------------------------------------------------------------------


def test_vectors_numbers_labels_and_missing_eval():
    c = parse_conditions({"train": [[1, 2], [3, 4]], "eval": [[5, 6]]})
    assert c.train.dtype == torch.float32 and c.train.tolist() == [[1, 2], [3, 4]] and c.eval.tolist() == [[5, 6]]
    assert c.dim == 2 and c.shape == (2,) and c.train_names == ("[1, 2]", "[3, 4]")
    c = parse_conditions({"train": [0.5, 2.0]})
    assert c.train.shape == (2, 1) and c.eval.shape == (0, 1)
    c = parse_conditions({"train": [0, 3], "eval": [1], "num_classes": 4})
    assert c.train.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]] and c.eval.tolist() == [[0, 1, 0, 0]]


def test_distributions_use_the_task_seed_and_differ_between_splits():
    spec = {"train": {"type": "normal", "mean": [1.0, -1.0], "std": 0.5, "num": 6},
            "eval": {"type": "uniform", "low": -2.0, "high": [2.0, 3.0], "num": 3}}
    a, b, other = parse_conditions(spec, seed=3), parse_conditions(spec, seed=3), parse_conditions(spec, seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval) and not torch.equal(a.train, other.train)
    g = torch.Generator().manual_seed(3)
    expected = torch.tensor([1.0, -1.0], dtype=torch.float64) + 0.5 * torch.randn((6, 2), generator=g, dtype=torch.float64)
    torch.testing.assert_close(a.train, expected.float())
    assert a.eval.shape == (3, 2) and (a.eval[:, 0].abs() <= 2).all() and (a.eval[:, 1] >= -2).all() and (a.eval[:, 1] <= 3).all()


def test_npy_file_and_prompt_embedding(tmp_path, monkeypatch):
    path = tmp_path / "conds.npy"
    np.save(path, np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert parse_conditions({"train": str(path)}).train.tolist() == [[1, 2], [3, 4]]
    import tests.test_conditions as me

    monkeypatch.setattr(me, "embed", lambda prompts: torch.tensor([[float(len(p)), 1.0] for p in prompts]), raising=False)
    c = parse_conditions({"train": ["a cat", "a horse"], "eval": ["an owl"], "embedding": "tests.test_conditions:embed"})
    assert c.train.tolist() == [[5, 1], [7, 1]] and c.eval.tolist() == [[6, 1]] and c.train_names == ("a cat", "a horse")


@pytest.mark.parametrize("spec, words", [
    ({"eval": [[1.0]]}, "conditions.train is required"),
    ({"train": [[1.0]], "test": [[1.0]]}, "conditions.test is not a known key"),
    ({"train": [[1.0, 2.0]], "eval": [[1.0]]}, "same length"),
    ({"train": [[1.0, 2.0], [1.0]]}, "one length"),
    ({"train": ["a"]}, "conditions.embedding"),
    ({"train": [5], "num_classes": 3}, "[0, 3)"),
    ({"train": {"type": "normal", "mean": 0.0, "std": -1.0, "num": 2}}, "std must be > 0"),
    ({"train": {"type": "beta", "num": 2}}, "conditions.train.type must be one of"),
    ({"train": {"type": "normal", "mean": 0.0, "num": 0}}, "conditions.train.num"),
    ({"train": "conds.txt"}, ".npy"),
])
def test_malformed_conditions_name_the_key(spec, words):
    with pytest.raises(ConfigError, match=None) as err:
        parse_conditions(spec)
    assert words in str(err.value)


def test_validate_task_checks_conditions_before_ray():
    task = validate_task(TASK)
    assert conditions_of(task).train.shape == (4, 2)
    with pytest.raises(ConfigError, match="conditions.eval"):
        validate_task({**TASK, "conditions": {"train": [[1.0, 1.0]], "eval": [[1.0]]}})
    assert conditions_of(validate_task({k: v for k, v in TASK.items() if k != "conditions"})) is None


def test_sample_and_groups_draw_training_conditions_only():
    c = parse_conditions(TASK["conditions"])
    g = torch.Generator().manual_seed(0)
    drawn = c.sample(4000, g)
    rows = {tuple(r) for r in drawn.tolist()}
    assert rows == {tuple(r) for r in c.train.tolist()}
    counts = torch.bincount(c.sample_indices(4000, g), minlength=4).double()
    assert (counts / 4000 - 0.25).abs().max() < 0.03  # uniform over the 4 training conditions (se 0.007)
    idx, conds = c.groups(3, 5, g)
    assert conds.shape == (15, 2) and len(set(idx.tolist())) == 3
    assert all(len(set(idx[i * 5:(i + 1) * 5].tolist())) == 1 for i in range(3))
    assert expand(c.train[0], 3).shape == (3, 2)


# -- conditional rewards --------------------------------------------------------------------------------


def test_conditional_builtins_match_their_formulas():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    quad = build_reward({"type": "quadratic", "center": "condition", "scale": 2.0})
    lin = build_reward({"type": "linear", "direction": "condition"})
    assert is_conditional(quad) and is_conditional(lin) and quad.exact_form is None
    torch.testing.assert_close(evaluate(quad, x, cond=c), -(x - c).pow(2).sum(-1))
    torch.testing.assert_close(evaluate(lin, x, cond=c), (x * c).sum(-1))
    assert quad.exact_form_at(c[0])[1]["center"] == c[0].tolist()
    with pytest.raises(RewardError, match="depends on the condition"):
        evaluate(quad, x)
    with pytest.raises(ConfigError):
        validate_task({**TASK, "reward": {"type": "quadratic", "center": "conditions"}})


def test_unconditional_reward_unchanged_in_a_conditional_task():
    """An unconditional reward ignores cond: same values, and `at_condition` returns it as it is."""
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r = build_reward({"type": "quadratic", "center": [1.0, 0.5]})
    c = torch.ones(5, 2, dtype=torch.float64)
    assert not is_conditional(r)
    torch.testing.assert_close(evaluate(r, x, cond=c), evaluate(r, x))
    assert at_condition(r, c[0]) is r
    fn = FunctionReward(lambda x: -x.pow(2).sum(-1))
    torch.testing.assert_close(evaluate(fn, x, cond=c), -x.pow(2).sum(-1))
    fc = FunctionReward(lambda x, cond: (x * cond).sum(-1))
    assert fc.conditional
    torch.testing.assert_close(evaluate(fc, x, cond=c), x.sum(-1))


# -- the exact conditional bed -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["quadratic", "linear"])
def test_conditional_exact_target_matches_importance_sampling_per_condition(kind):
    """p_tar(.|c) ∝ exp(r(x, c)/alpha) p_pre and J*(c) = alpha log E_pre[exp(r(x, c)/alpha)] for every condition
    (training and held-out): the closed form at c against self-normalised importance weights of 400k exact
    pretrained samples. Fails if the condition is not what the reward is centred on (checked: passing the
    condition negated, or another condition's, moves J*(c) by many standard errors)."""
    alpha = 0.7
    mixture = make_mixture()
    spec = {"type": "quadratic", "center": "condition", "scale": 1.5} if kind == "quadratic" else {"type": "linear", "direction": "condition"}
    reward = build_reward(spec)
    conds = parse_conditions(TASK["conditions"])
    x = mixture.sample(400_000, torch.Generator().manual_seed(5))  # (N, 2) float64
    for c in torch.cat([conds.train, conds.eval]).double():
        fixed = at_condition(reward, c)
        assert isinstance(fixed, AtCondition)
        target, log_c = mixture.tilt(fixed, alpha)
        r = evaluate(reward, x, cond=expand(c, x.shape[0]))  # (N,)
        log_w = r / alpha
        j_mc = alpha * (torch.logsumexp(log_w, 0) - math.log(x.shape[0]))
        w = torch.softmax(log_w, 0)
        ess = 1.0 / float((w**2).sum())
        assert ess > 1000
        assert abs(float(j_mc) - alpha * log_c) < 4 * alpha / math.sqrt(ess) + 1e-3, (c, float(j_mc), alpha * log_c)
        # the target's mean and second moment against the weighted pretrained samples
        mean_mc, second_mc = (w[:, None] * x).sum(0), (w[:, None] * x**2).sum(0)
        tm = target.mean()
        second = torch.diagonal(target.covariance()) + tm**2
        tol = 6 * float(x.std()) / math.sqrt(ess)
        torch.testing.assert_close(mean_mc, tm, atol=tol, rtol=0)
        torch.testing.assert_close(second_mc, second, atol=3 * tol * float(second.abs().max()) ** 0.5, rtol=0)
