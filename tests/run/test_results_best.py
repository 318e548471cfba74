"""The final report names the best evaluated iteration and its checkpoint (`rlft.run.results.best_of`, the trial
loop's checkpoint at a new best), and learning-rate schedules end at the same final value whatever
`run.iterations` (`--iterations`) is: DifferentiableLearner's cosine and the RLlib learners' `lr_final`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from rlft.config import DEFAULT_TASK, task_from_dict
from rlft.learners import Learner, build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.run.keys import (
    CONFIG, EVAL_ITERATION, GAP_CLOSURE, ITERATION, KL, OBJECTIVE, REWARD, STATUS, TASK_KEY, TERMINATED,
)
from rlft.run.results import BEST, CHECKPOINT, best_line, best_of, print_table
from rlft.run.trial import best_evaluated
from rlft.run_config import SweepGrid
from rlft.rllib.adapter import lr_schedule

#: the J each evaluation of `ScriptedLearner` returns, by iteration: a peak at 3, then worse (a short run's complaint)
SCRIPT = {1: -3.0, 2: -2.0, 3: -1.0, 4: -1.5, 5: -2.5, 6: -2.6}


class ScriptedLearner(Learner):
    """A test learner whose evaluate() returns J = SCRIPT[iteration]; checkpoints hold its iteration."""

    def control(self):
        return None  # the pretrained chain (only the final plot samples use it)

    def train_iteration(self) -> dict[str, float]:
        self.iteration += 1
        return {"loss": 0.0}

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict:
        j = SCRIPT[self.iteration]
        return {OBJECTIVE: j, REWARD: j + 0.5, KL: 0.5, GAP_CLOSURE: (j + 4.0) / 3.0}

    def save_checkpoint(self, directory: str) -> None:
        Path(directory, "state.json").write_text(json.dumps({"iteration": self.iteration}))

    def load_checkpoint(self, directory: str) -> None:
        self.iteration = json.loads(Path(directory, "state.json").read_text())["iteration"]


def _row(it: int, ev: int, j: float) -> dict:
    return {ITERATION: it, EVAL_ITERATION: ev, OBJECTIVE: j, REWARD: j + 1, KL: 1.0}


def test_best_evaluated_takes_the_highest_j_among_evaluated_rows_only():
    rows = [_row(1, 1, -3.0), _row(2, 1, -3.0), _row(3, 3, -1.0), _row(4, 3, -1.0), _row(5, 5, -2.0),
            {ITERATION: 6, EVAL_ITERATION: 6}]  # no J: not a candidate
    assert best_evaluated(rows)[ITERATION] == 3
    rows[3][OBJECTIVE] = 10.0  # a carried-forward row (its figures are iteration 3's) is never the best
    assert best_evaluated(rows)[ITERATION] == 3
    assert best_evaluated([]) is None and best_evaluated([{ITERATION: 2, EVAL_ITERATION: 1, OBJECTIVE: 0.0}]) is None
    best = best_of(rows, {3: "/x/checkpoint_000001", 5: "/x/checkpoint_000002"})
    assert best == {ITERATION: 3, OBJECTIVE: -1.0, REWARD: 0.0, KL: 1.0, CHECKPOINT: "/x/checkpoint_000001"}
    assert best_of(rows, {5: "/x/c"})[CHECKPOINT] is None  # Tune did not keep it: said so, not guessed
    assert "not kept" in best_line(best_of(rows, {}))


def test_the_trial_checkpoints_its_best_evaluation_and_the_report_names_it(tmp_path, monkeypatch):
    """`trial_main` in this process (Tune's calls recorded): J peaks at iteration 3 of 6 (evaluated every iteration,
    checkpoints every 4): a checkpoint is written at 3 (the new best) besides 4 and 6; the final history's best is 3."""
    from ray import tune

    from rlft.run import trial

    reported = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda row, checkpoint=None: reported.append((row, checkpoint is not None)))
    monkeypatch.setattr(trial, "_trial_device", lambda run: "cpu")
    data = dict(DEFAULT_TASK, num_steps=10, learner={"type": "tests.run.test_results_best:ScriptedLearner"},
                run={"iterations": 6, "eval_every": 1, "checkpoint_every": 4, "eval_samples": 100,
                     "storage_path": str(tmp_path)})
    trial.trial_main({TASK_KEY: data})
    rows = [row for row, _ in reported]
    assert [r[ITERATION] for r in rows] == [1, 2, 3, 4, 5, 6]
    # iteration 2 is a new best too (J -2 > -3), 1 is the start only
    assert [it for (r, c), it in zip(reported, range(1, 7)) if c] == [2, 3, 4, 6]
    best = best_of(rows, {3: "CKPT3"})
    assert best[ITERATION] == 3 and best[OBJECTIVE] == -1.0 and best[CHECKPOINT] == "CKPT3"
    assert rows[-1][OBJECTIVE] == -2.6  # the last row stays the last iteration's figures
    out = io.StringIO()
    print_table([{CONFIG: {}, STATUS: TERMINATED, ITERATION: 6, OBJECTIVE: -2.6, BEST: best}], SweepGrid({}), out)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("best evaluated: iteration 3") and "J -1" in line and "CKPT3" in line


# -- schedules follow run.iterations ---------------------------------------------------------------------------


@pytest.mark.parametrize("learner", ["no_kl", "elegant"])
def test_differentiable_lr_ends_at_lr_final_whatever_the_iterations(learner):
    """With --iterations 10 or 40 the cosine schedule spans the run: the last update of the last iteration runs at
    lr_final (up to the cosine's last step), and the middle iteration at the midpoint lr."""
    last, middle = {}, {}
    for iterations in (10, 40):
        task = task_from_dict(dict(DEFAULT_TASK, num_steps=10, learner={"type": learner, "drift_iterations": 400},
                                   run={"iterations": iterations}))
        model = build_model(task.model, task.num_steps)
        lrn = build_learner(task, model, build_reward(task.reward, model=model))
        per = lrn.options.drift_iterations_per_train_iteration
        assert per * iterations == 400
        last[iterations] = lrn.lr_at(per * iterations - 1)  # the lr of the last update of the last iteration
        middle[iterations] = lrn.lr_at(per * iterations // 2)
        o = lrn.options
    assert last[10] == pytest.approx(last[40], rel=1e-3, abs=1e-12)
    assert last[40] == pytest.approx(o.lr_final, rel=1e-3)
    assert middle[10] == pytest.approx(middle[40]) == pytest.approx(0.5 * (o.lr + o.lr_final))


def test_rllib_lr_schedule_reaches_lr_final_at_the_last_iteration_whatever_the_iterations():
    """RLlib trains iteration i (1-based) at schedule((i-1) S), S = env steps per iteration (its Learner updates the
    lr after each update from the steps sampled so far): the last iteration runs at lr_final for 10 and for 40."""
    from ray.rllib.utils.schedules.scheduler import Scheduler

    S = 256 * 50
    for iterations in (10, 40):
        sched = Scheduler(lr_schedule(1e-3, 1e-4, iterations, S), framework="torch")
        lr_of = [sched.update((i - 1) * S) for i in range(1, iterations + 1)]  # the lr iteration i trains at
        assert lr_of[0] == pytest.approx(1e-3) and lr_of[-1] == pytest.approx(1e-4)
        assert lr_of[-2] > 1e-4  # the decay ends at the last iteration, not before
        assert all(a >= b for a, b in zip(lr_of, lr_of[1:]))
    assert lr_schedule(1e-3, None, 10, S) == 1e-3  # lr_final: null keeps the constant lr
    assert torch.isfinite(torch.tensor(lr_schedule(1e-3, 1e-4, 1, S)[1][0]))  # one iteration: a valid schedule


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ppo_kl_trains_its_last_iteration_at_lr_final(ray_session):
    """PPO+KL with lr_final, 3 iterations: the lr RLlib's Learner sets after iteration i (for i + 1) follows the
    schedule, so iteration 3 trains at lr_final."""
    task = task_from_dict(dict(DEFAULT_TASK, num_steps=4, run={"iterations": 3}, learner={
        "type": "ppo_kl", "lr": 1e-3, "lr_final": 1e-4, "episodes_per_iteration": 16, "num_envs": 16, "minibatch_size": 64,
        "num_epochs": 1, "save_rllib_checkpoint": False}))
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    try:
        lrs = []
        for _ in range(3):
            learner.train_iteration()
            optimizer = next(iter(learner.algo.learner_group._learner._named_optimizers.values()))
            lrs.append(optimizer.param_groups[0]["lr"])  # set after the update: the next iteration's lr
        assert lrs[0] == pytest.approx(5.5e-4, rel=1e-3)  # iteration 2: halfway (S of 2 S)
        assert lrs[1] == pytest.approx(1e-4, rel=1e-3)  # iteration 3: lr_final
    finally:
        learner.algo.stop()
