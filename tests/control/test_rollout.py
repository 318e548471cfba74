"""The DifferentiableLearner base on its own: a learner that regresses (no back-propagation through the chain)
reuses the rollout without gradients, the seeds, the schedule, the optimiser step and the checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import pytest
import torch

from rlft.config import task_from_dict
from rlft.control.options import DifferentiableOptions
from rlft.control.rollout import DifferentiableLearner
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward

LOSS = "regression_loss"


@dataclasses.dataclass(frozen=True)
class RegressOptions(DifferentiableOptions):
    """A toy regression learner's options."""

    target: float = 0.5
    """The value every step's g_theta(t_k, x_k) is regressed on."""


class Regress(DifferentiableLearner):
    """Regresses g_theta(t_k, x_k) = delta_k / c_k on a constant along paths simulated without gradients."""

    Options: ClassVar[type] = RegressOptions
    name: ClassVar[str] = "tests.control.test_rollout:Regress"
    checkpoint_format: ClassVar[str] = "rlft-test-regress"

    def resolve_defaults(self, o):
        return dataclasses.replace(o, lr=o.lr or 1e-2, max_grad_norm=1.0 if o.max_grad_norm is None else o.max_grad_norm,
                                   drift_iterations=o.drift_iterations or 40)

    def objective(self):
        gen = self.device_generator()
        x0 = self.initial_states(self.options.batch_size, gen)
        seeds = self.window_seeds(len(self.windows()))
        with torch.no_grad():
            _, _, path = self.drift_rollout(x0, seeds, keep_path=True)  # (B, K+1, D)
        assert not path.requires_grad
        deltas = self.control().all_steps(path[:, :-1])  # (B, K, D)
        c = torch.tensor(self.control().scales, dtype=path.dtype).reshape(1, -1, 1)
        loss = (deltas / c - self.options.target).pow(2).mean()
        return -loss, {LOSS: float(loss.detach())}


def make(run: dict | None = None, **learner):
    data = {
        "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 0.0], [-1.0, 0.0]], "stds": [0.5, 0.5]},
        "reward": {"type": "linear", "direction": [1.0, 0.0]}, "alpha": 1.0, "num_steps": 5, "seed": 2,
        "learner": {"type": "tests.control.test_rollout:Regress", "batch_size": 64, "hidden": 8, "depth": 1, **learner},
    }
    if run:
        data["run"] = run
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps).to(dtype=torch.float64)
    return build_learner(task, model, build_reward(task.reward, model=model))


def test_a_regression_learner_trains_on_the_base(caplog):
    with caplog.at_level(logging.INFO, logger="rlft.control.rollout"):
        lrn = make(run={"iterations": 10}, target=0.5)
    assert isinstance(lrn, Regress)
    lines = [r.getMessage() for r in caplog.records if "drift_iterations_per_train_iteration=4" in r.getMessage()]
    assert len(lines) == 1  # the derived sizes, once: ceil(40 / 10) updates per iteration
    first = lrn.train_iteration()
    for _ in range(9):
        last = lrn.train_iteration()
    assert lrn.drift_updates == 40 and last["drift_updates"] == 40.0
    assert last[LOSS] < 0.1 * first[LOSS]
    assert last["lr"] == pytest.approx(lrn.options.lr_final)  # the cosine ran its whole length in the run's iterations
    assert first["lr"] == pytest.approx(lrn.lr_at(4)) and lrn.lr_at(0) == lrn.options.lr
    assert lrn.lr_at(20) == pytest.approx(0.5 * (lrn.options.lr + lrn.options.lr_final))


def test_a_regression_learner_checkpoints_and_resumes(tmp_path):
    a = make()
    a.train_iteration()
    a.save_checkpoint(str(tmp_path))
    b = make()
    b.load_checkpoint(str(tmp_path))
    assert (b.iteration, b.drift_updates) == (a.iteration, a.drift_updates)
    assert a.train_iteration() == b.train_iteration()  # same optimiser moments, same RNG stream
    with pytest.raises(ValueError, match="learner.hidden"):
        make(hidden=4).load_checkpoint(str(tmp_path))


def test_the_rollout_without_gradients_is_the_rollout_with_them():
    lrn = make()
    with torch.no_grad():
        for p in lrn.drift_net.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    x0 = lrn.model.prior_sample(16, torch.Generator().manual_seed(1))
    seeds = lrn.window_seeds(len(lrn.windows()))
    x, kl = lrn.drift_rollout(x0, seeds)
    with torch.no_grad():
        y, kl_y = lrn.drift_rollout(x0, seeds)
    assert x.requires_grad and not y.requires_grad
    assert torch.equal(x.detach(), y) and torch.equal(kl.detach(), kl_y)
    with pytest.raises(ValueError, match="one seed per window"):
        lrn.drift_rollout(x0, seeds[:1])
