"""`rlft.load(path)`: the fine-tuned sampler of any rlft checkpoint, in plain torch (Ray is never started).

`path` is one of
    a learner checkpoint      the directory a learner's `save_checkpoint` wrote (`rlft.json` inside);
    a trial checkpoint        Tune's `checkpoint_*` directory (`rlft_state.json` + `learner/`, `rlft.run.trial`),
                              checked against its manifest first;
    a trial directory         its newest checkpoint that passes the manifest check;
    an experiment folder      a local `<run.storage_path>/<name>` with one trial: that trial's newest good checkpoint
                              (with several, an error lists them and how to pick one).

The task comes from the learner checkpoint's JSON (`task`), else from the trial's `params.json`, else from the
experiment's `rlft_experiment.json`; the model and reward are rebuilt from it. Learners are restored two ways:

- a learner with data-only weights that runs without Ray (ELEGANT, NO KL, Truncation, Random-K, a user's own):
  `build_learner(task, model, reward).load_checkpoint(dir)`, then its `control()` and `init_dist()`;
- an RLlib learner (format `rlft-rllib`: PPO+KL, f-PG on a drift env): the policy's mean network is read from
  `weights.safetensors` and rebuilt here as `DriftControl`, the same function
  delta_k(x) = c_k * net(x, time features of k/K, cond) as `rlft.rllib.modules.DriftPolicyModule.delta`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

import rlft.checkpoint as checkpoint
from rlft.checkpoint import CheckpointError
from rlft.conditions import conditions_of, expand
from rlft.config import TaskConfig, task_from_dict
from rlft.evaluation import control_at, init_at
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.models.base import ControlledChain, DiffusionModel
from rlft.rewards import build_reward
from rlft.rllib.drift_mean import DriftControl
from rlft.rllib.keys import EVENT_DIM, HIDDEN, LORA, MEAN_SCALE, NUM_LAYERS, NUM_STEPS, STDS
from rlft.run.keys import EXPERIMENT_FILE, LEARNER_DIR, STATE_FILE, TASK_KEY
from rlft.run.storage import log
from rlft.run.trial import read_checkpoint_state
from rlft.run_config import apply_overrides
from rlft.sampling import InitialDistribution, sample

#: the RLlib learners' checkpoint format and weights file (`rlft.rllib.adapter`, which imports Ray: not imported here)
RLLIB_FORMAT, RLLIB_WEIGHTS = "rlft-rllib", "weights.safetensors"
#: RLlib's names of the learner state's module component and of the policy module (`ray.rllib.core`)
RL_MODULE, POLICY_ID = "rl_module", "default_policy"
#: the drift policy's mean-network parameters inside the module state (`DriftPolicyModule.mean_net`)
MEAN_NET = "mean_net."
TUNE_PARAMS = "params.json"
EXPECTED = ("a learner checkpoint (a directory with rlft.json), a trial checkpoint (checkpoint_* with rlft_state.json "
            "and learner/), a trial directory or an experiment folder (<run.storage_path>/<name>)")


class FineTuned:
    """A fine-tuned sampler: the pretrained chain `base` run with the learned `control` (and initial distribution).

    Attributes:
        task: the task it was trained on.
        base: the pretrained chain.
        control: delta_k(x) = control(k, x, cond), the learned displacement of the transition mean.
        init: the learned initial distribution, or None for the prior.
        model: `ControlledChain(base, control, init)`, the fine-tuned chain as a `DiffusionModel`.
        checkpoint: the learner checkpoint directory it was loaded from.
    """

    def __init__(self, task: TaskConfig, base: DiffusionModel, control: Any, init: InitialDistribution | None,
                 source: Path) -> None:
        self.task, self.base, self.control, self.init, self.checkpoint = task, base, control, init, source
        self.model = ControlledChain(base, control, init)

    def sample(self, n: int, seed: int | None = None, batch_size: int = 4096, progress: bool = False,
               cond: Any = None) -> torch.Tensor:
        """n samples x_K of the fine-tuned chain, (n, *event_shape) on the CPU; seed None: the task's seed.

        The same as `rlft.sampling.sample(base, n, control=learner.control(), init=learner.init_dist(), seed=seed).x`
        of the learner that wrote the checkpoint. A conditional task's sampler takes `cond`: one condition (d,) for all
        n samples, or one per sample (n, d) (each distinct condition is sampled with seed + its index among them)."""
        seed = self.task.seed if seed is None else int(seed)
        if cond is None:
            if conditions_of(self.task) is not None:
                raise ValueError("this sampler was fine-tuned on a conditional task: pass cond, one condition (d,) or (n, d)")
            return sample(self.base, n, control=self.control, init=self.init, seed=seed, batch_size=batch_size,
                          progress=progress).x
        cond = torch.as_tensor(cond, dtype=self.base.dtype, device=self.base.device)
        rows = expand(cond, n) if cond.ndim == 1 else cond  # (n, d)
        if rows.ndim != 2 or rows.shape[0] != n:
            raise ValueError(f"cond must be one condition (d,) or one per sample ({n}, d) (got shape {tuple(cond.shape)})")
        unique, which = torch.unique(rows, dim=0, return_inverse=True)
        out = torch.empty((n, *self.base.event_shape), dtype=self.base.dtype)
        for j, c in enumerate(unique):
            idx = (which == j).nonzero().reshape(-1).cpu()
            model_cond = expand(c, idx.numel()) if self.base.cond_shape is not None else None
            out[idx] = sample(self.base, idx.numel(), control=control_at(self.control, c), init=init_at(self.init, c),
                              cond=model_cond, seed=seed + j, batch_size=batch_size, progress=progress).x.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return f"FineTuned({self.checkpoint}, event_shape={tuple(self.base.event_shape)}, K={self.base.num_steps})"


def load(path: str | Path) -> FineTuned:
    """The fine-tuned sampler of a learner checkpoint, trial checkpoint, trial directory or experiment folder.

    Raises:
        CheckpointError: `path` is none of these, is damaged, or holds a learner whose sampler cannot be rebuilt.
    """
    learner_dir, task_sources = find_checkpoint(Path(path).expanduser())
    state = _raw_state(learner_dir)
    task = _task(state, task_sources, learner_dir)
    torch.manual_seed(task.seed)
    base = build_model(task.model, task.num_steps)
    if state.get("format") == RLLIB_FORMAT:
        control, init = _rllib_control(learner_dir, state, task, base), None
    else:
        learner = build_learner(task, base, build_reward(task.reward, model=base) if task.reward is not None else None)
        learner.load_checkpoint(str(learner_dir))
        control, init = learner.control(), learner.init_dist()
    if control is None:
        raise CheckpointError(f"{learner_dir}: this learner learns no drift control (e.g. f-PG on a restart env), so "
                              "rlft.load cannot build its sampler; use the learner's own evaluate()/sampler")
    return FineTuned(task, base, control, init, learner_dir)


# -- finding the checkpoint ---------------------------------------------------------------------------------


def find_checkpoint(path: Path) -> tuple[Path, list[Path]]:
    """(the learner checkpoint directory, the files that may record its task, nearest first)."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise CheckpointError(f"{path} {what}; expected {EXPECTED}")
    if (path / checkpoint.STATE_FILE).is_file() or (path / "state.json").is_file():  # a learner checkpoint
        trial = path.parent.parent if (path.parent / STATE_FILE).is_file() else None
        return path, _task_files(trial)
    if (path / STATE_FILE).is_file() and (path / LEARNER_DIR).is_dir():  # a trial checkpoint
        read_checkpoint_state(str(path))
        return path / LEARNER_DIR, _task_files(path.parent)
    if _checkpoints(path):  # a trial directory
        return _newest_good(path) / LEARNER_DIR, _task_files(path)
    trials = sorted(p for p in path.iterdir() if p.is_dir() and _checkpoints(p))
    if len(trials) == 1:
        return _newest_good(trials[0]) / LEARNER_DIR, _task_files(trials[0])
    if len(trials) > 1:
        names = "\n  ".join(str(t) for t in trials)
        raise CheckpointError(f"{path} holds {len(trials)} trials; pick one by passing its directory:\n  {names}")
    raise CheckpointError(f"{path} holds no checkpoint (no rlft.json, rlft_state.json or checkpoint_* inside); "
                          f"expected {EXPECTED}")


def newest_good_checkpoints(experiment: Path) -> list[Path]:
    """The newest checkpoint passing its manifest check of each trial of a local experiment folder."""
    trials = sorted(p for p in experiment.iterdir() if p.is_dir() and _checkpoints(p)) if experiment.is_dir() else []
    out = []
    for trial in trials:
        try:
            out.append(_newest_good(trial))
        except CheckpointError:
            pass
    return out


def _checkpoints(trial: Path) -> list[Path]:
    """The trial's checkpoint_* directories, newest first."""
    found = [p for p in trial.glob("checkpoint_*") if p.is_dir() and re.fullmatch(r"checkpoint_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def _newest_good(trial: Path) -> Path:
    """The newest checkpoint of a trial that passes its manifest check (damaged ones are skipped, with a warning)."""
    problems = []
    for ckpt in _checkpoints(trial):
        try:
            read_checkpoint_state(str(ckpt))
            return ckpt
        except CheckpointError as err:
            problems.append(str(err))
            log(f"rlft.load: warning: skipping the damaged checkpoint {ckpt}: {err}")
    raise CheckpointError(f"no checkpoint of {trial} passes its manifest check: " + "; ".join(problems))


def _task_files(trial: Path | None) -> list[Path]:
    if trial is None:
        return []
    return [trial / TUNE_PARAMS, trial.parent / EXPERIMENT_FILE]


# -- the task -----------------------------------------------------------------------------------------------


def _raw_state(learner_dir: Path) -> dict[str, Any]:
    for name in (checkpoint.STATE_FILE, "state.json"):
        if (learner_dir / name).is_file():
            try:
                state = json.loads((learner_dir / name).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{learner_dir / name} cannot be read ({err}); the checkpoint is damaged") from None
            if isinstance(state, dict):
                return state
    raise CheckpointError(f"{learner_dir} holds no learner state (rlft.json); expected {EXPECTED}")


def _task(state: dict[str, Any], sources: list[Path], learner_dir: Path) -> TaskConfig:
    """The task recorded in the learner state, else in the trial's params.json, else in the experiment's file."""
    # parsed, not validated through the learner's options: that would import an RLlib learner's module (Ray)
    if isinstance(state.get("task"), dict):
        return task_from_dict(state["task"])
    for source in sources:
        if source.is_file():
            data = json.loads(source.read_text())
            if source.name == TUNE_PARAMS:  # the base task and the trial's grid values (`rlft.run.trial.trial_task`)
                data = apply_overrides(data[TASK_KEY], {k: v for k, v in data.items() if k != TASK_KEY})
            else:
                data = data["task"]
            data.pop("sweep", None)
            return task_from_dict(data)
    raise CheckpointError(f"{learner_dir} does not record its task (a checkpoint of an earlier rlft) and no params.json "
                          f"or {EXPERIMENT_FILE} is beside it; load it from its trial or experiment folder")


# -- RLlib drift policies, without Ray ------------------------------------------------------------------------


def _rllib_control(learner_dir: Path, state: dict[str, Any], task: TaskConfig, model: DiffusionModel) -> DriftControl:
    config = state.get("module_config")
    if config is None:  # written before rlft recorded it: the options' defaults, as the learners build it
        spec = task.learner or {}
        config = {STDS: [float(model.std(k)) for k in range(model.num_steps)], NUM_STEPS: model.num_steps,
                  HIDDEN: spec.get("hidden", 64), NUM_LAYERS: spec.get("num_layers", 2),
                  MEAN_SCALE: spec.get("mean_scale", "std")}
    if LORA in config or EVENT_DIM in config:
        kind = "a LoRA-on-UNet policy" if LORA in config else "a restart policy"
        raise CheckpointError(f"{learner_dir} holds {kind}; rlft.load rebuilds MLP drift policies only: load it with "
                              "its learner (rlft.learners.build_learner + load_checkpoint, which starts Ray)")
    tensors = checkpoint.load_tensors(learner_dir / RLLIB_WEIGHTS)
    module = _module_weights(tensors, state.get("learner_state"))
    weights = {k[len(MEAN_NET):]: torch.as_tensor(v) for k, v in module.items() if k.startswith(MEAN_NET)}
    conditions = conditions_of(task)  # reward-only conditioning: the policy still reads the condition (its obs)
    cond_dim = int(torch.Size(model.cond_shape).numel()) if model.cond_shape else (conditions.dim if conditions else 0)
    control = DriftControl(config, model.event_dim, cond_dim)
    try:
        control.mean_net.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{learner_dir}: the policy weights do not fit the task's model ({str(err).splitlines()[0]}); "
                              "the checkpoint was written for another task") from None
    return control


def _module_weights(tensors: dict[str, torch.Tensor], meta: Any) -> dict[str, Any]:
    """The policy module's parameters from the learner state (`rlft.checkpoint.flatten_state`'s layout)."""
    learner_state = checkpoint.unflatten_state(tensors, meta)
    try:
        return learner_state[RL_MODULE][POLICY_ID]
    except (KeyError, TypeError):
        raise CheckpointError(f"the RLlib learner state holds no {RL_MODULE}/{POLICY_ID} weights; the checkpoint is "
                              "damaged or from another RLlib layout") from None
