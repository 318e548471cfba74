"""Conditions of a conditional task: the `conditions:` section parsed into training and held-out tensors.

A task may declare a finite set of conditions c it is fine-tuned for, and a separate held-out set it is only
evaluated on (MATH.md §8: target p_tar(x|c) ∝ exp(r(x,c)/alpha) p_pre(x|c), J*(c) = alpha log E_pre[exp(r/alpha)|c]):

    conditions:
      train: [[1.0, 0.5], [-1.0, 1.0], ...]          # vectors (N, d)
      eval:  [[0.0, 1.5], ...]                         # held-out (never drawn in training)

Each of `train` / `eval` is one of
    - a list of vectors                [[1.0, 0.5], ...]           -> (N, d)
    - a list of numbers                [0.5, 1.0, 2.0]             -> (N, 1); class labels [0, 3] with
                                                                     `num_classes: 10` -> one-hot (N, 10)
    - a list of prompt strings         ["a cat", "a dog"]          -> embedding(list of str) (N, d), with
                                                                     `embedding: "module:fn"`
    - a .npy file                      "conds/train.npy"           -> (N, d) (a 1-D file is (N, 1))
    - a distribution, sampled once     {type: normal, mean: [0, 0], std: 1.0, num: 8}
                                       {type: uniform, low: [-2, -2], high: [2, 2], num: 8}
      with the task seed (train: seed, eval: seed + 1), so every process draws the same finite set.
`eval` may be omitted (no held-out conditions). Both sets must have the same dimension d.

`Conditions.sample(n, generator)` draws training conditions (uniformly, with replacement) for n trajectories;
`Conditions.groups(num_groups, group_size, generator)` draws num_groups training conditions and repeats each
group_size times (GRPO's groups). Held-out conditions are never returned by either.

This module sits in the foundation layer (config, torch, numpy): rewards, learners, envs and evaluation read it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import torch

import rlft.registry as registry
from rlft.config import ConfigError

#: the split names (keys of per-condition reports, `Conditions.split`)
TRAIN, EVAL = "train", "eval"
#: the keys a `conditions:` mapping may have
KEYS = (TRAIN, EVAL, "embedding", "num_classes")
DISTRIBUTIONS = ("normal", "uniform")
#: seed offset of the held-out set's draw (a distribution is sampled once per split)
EVAL_SEED_OFFSET = 1


@dataclasses.dataclass(frozen=True)
class Conditions:
    """The training and held-out conditions of a task, as float32 tensors on the CPU.

    Attributes:
        train: (N_train, d) conditions the learners train on.
        eval: (N_eval, d) held-out conditions (evaluation only; N_eval may be 0).
        train_names / eval_names: a display name per condition (the prompt, the label, or the vector).
    """

    train: torch.Tensor
    eval: torch.Tensor
    train_names: tuple[str, ...]
    eval_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.train.ndim != 2 or self.train.shape[0] < 1:
            raise ConfigError(f"conditions.train must hold at least one condition, shape (N, d) (got {tuple(self.train.shape)})")
        if self.eval.ndim != 2 or self.eval.shape[1] != self.train.shape[1]:
            raise ConfigError(
                f"conditions.eval has dimension {self.eval.shape[-1] if self.eval.ndim else 0} but conditions.train has "
                f"{self.train.shape[1]}; both sets must be vectors of the same length")
        if not (torch.isfinite(self.train).all() and torch.isfinite(self.eval).all()):
            raise ConfigError("conditions must be finite numbers (a NaN/inf came from the list, file or embedding)")

    @property
    def dim(self) -> int:
        """d, the length of one condition vector."""
        return int(self.train.shape[1])

    @property
    def shape(self) -> tuple[int]:
        """(d,): the cond_shape of the networks that take the condition."""
        return (self.dim,)

    def split(self, name: str) -> torch.Tensor:
        """`train` or `eval` by name."""
        if name not in (TRAIN, EVAL):
            raise ValueError(f"split must be {TRAIN!r} or {EVAL!r} (got {name!r})")
        return self.train if name == TRAIN else self.eval

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n indices into `train`, uniform with replacement, (n,) int64 on the generator's device."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.train.shape[0], (n,), generator=generator, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """n training conditions, one per trajectory, (n, d) on the generator's device (in `dtype`, default float32).
        Never a held-out one."""
        idx = self.sample_indices(n, generator)
        return self.train.to(device=idx.device, dtype=dtype)[idx]

    def groups(self, num_groups: int, group_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """num_groups training conditions each repeated group_size times: (indices (G*S,), conds (G*S, d)).

        Rows [i*S, (i+1)*S) share condition i. The groups' conditions are distinct while num_groups <= N_train
        (a random permutation, cycled when there are more groups than conditions)."""
        device = generator.device if generator is not None else "cpu"
        n = self.train.shape[0]
        reps = math.ceil(num_groups / n)
        perm = torch.cat([torch.randperm(n, generator=generator, device=device) for _ in range(reps)])[:num_groups]
        idx = perm.repeat_interleave(group_size)  # (G*S,)
        return idx, self.train.to(device)[idx]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe {train: [[...]], eval: [[...]], train_names, eval_names}."""
        return {TRAIN: self.train.tolist(), EVAL: self.eval.tolist(),
                "train_names": list(self.train_names), "eval_names": list(self.eval_names)}


def expand(cond: torch.Tensor, n: int) -> torch.Tensor:
    """One condition (d,) (or (1, d)) as a batch (n, d) (a view)."""
    return cond.reshape(1, -1).expand(n, -1)


def check_task_conditions(conditions: Conditions | None, model_cond_shape: tuple[int, ...] | None, reward: Any,
                          learner: str, supported: bool = True) -> None:
    """The checks a learner runs when built: a conditional model or reward needs conditions, the learner must take
    them (`supported`), and their length must match a conditional model's cond_shape. Raises `ConfigError`."""
    if conditions is None and (model_cond_shape is not None or getattr(reward, "conditional", False)):
        what = (f"the model is conditional (cond_shape {tuple(model_cond_shape)})" if model_cond_shape is not None
                else f"reward {getattr(reward, 'name', '?')!r} depends on the condition")
        raise ConfigError(f"{what} but the task declares no conditions to train on; add "
                          "conditions: {train: [...], eval: [...]} (rlft.conditions)")
    if conditions is None:
        return
    if not supported:
        raise ConfigError(f"learner {learner!r} does not take conditions yet; use learner type elegant (or no_kl, truncation, "
                          "random_k), or remove the task's conditions: section")
    if model_cond_shape is not None and math.prod(model_cond_shape) != conditions.dim:  # (L, D) takes flat L*D vectors
        raise ConfigError(f"conditions are vectors of length {conditions.dim} but the model takes conditions of shape "
                          f"{tuple(model_cond_shape)}; make conditions.train/eval match the model")


def parse_conditions(spec: Any, seed: int = 0, path: str = "conditions") -> Conditions:
    """The `conditions:` mapping as `Conditions`; errors name the key, the value, the rule and the fix.

    Args:
        spec: {train: ..., eval: ..., embedding: "module:fn", num_classes: int} (see the module docstring).
        seed: the task seed (a distribution's draw uses seed for train and seed + 1 for eval).
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} must be a mapping {{train: [...], eval: [...]}} (got {spec!r})")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a known key; valid keys here: {list(KEYS)}")
    if TRAIN not in spec:
        raise ConfigError(f"{path}.train is required: the conditions to fine-tune for (e.g. train: [[1.0, 0.5], [-1.0, 1.0]])")
    num_classes = spec.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ConfigError(f"{path}.num_classes must be an integer >= 2 (got {num_classes!r}); omit it for numeric conditions")
    embedding = spec.get("embedding")
    if embedding is not None and not isinstance(embedding, str):
        raise ConfigError(f"{path}.embedding must be a 'module:fn' string (got {embedding!r})")
    train, train_names = _parse_split(spec[TRAIN], seed, f"{path}.train", embedding, num_classes)
    if spec.get(EVAL) is None:
        held, held_names = train.new_zeros((0, train.shape[1])), ()
    else:
        held, held_names = _parse_split(spec[EVAL], seed + EVAL_SEED_OFFSET, f"{path}.eval", embedding, num_classes)
    return Conditions(train, held, train_names, held_names)


def conditions_of(task: Any) -> Conditions | None:
    """The parsed conditions of a task (`task.conditions`, with `task.seed`), or None for an unconditional task."""
    spec = getattr(task, "conditions", None)
    return None if spec is None else parse_conditions(spec, int(getattr(task, "seed", 0)))


def _parse_split(value: Any, seed: int, path: str, embedding: str | None, num_classes: int | None) -> tuple[torch.Tensor, tuple[str, ...]]:
    if isinstance(value, dict):
        return _sample_distribution(value, seed, path)
    if isinstance(value, str):
        return _load_file(value, path)
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise ConfigError(f"{path} must be a non-empty list, a .npy file or a distribution {{type: normal|uniform, ...}} (got {value!r})")
    if all(isinstance(v, str) for v in value):
        return _embed(list(value), embedding, path), tuple(value)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if num_classes is not None:
            bad = [v for v in value if not isinstance(v, int) or not 0 <= v < num_classes]
            if bad:
                raise ConfigError(f"{path}: class labels must be integers in [0, {num_classes}) (got {bad[0]!r})")
            eye = torch.eye(num_classes)
            return eye[torch.tensor(value)], tuple(str(v) for v in value)
        return torch.tensor(value, dtype=torch.float32)[:, None], tuple(str(v) for v in value)
    if all(isinstance(v, (list, tuple)) for v in value):
        if len({len(v) for v in value}) != 1 or len(value[0]) == 0:
            raise ConfigError(f"{path} must be vectors of one length d >= 1 (got lengths {[len(v) for v in value]})")
        try:
            t = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be lists of numbers (got {value!r})") from None
        return t, tuple(_name(row) for row in t.tolist())
    raise ConfigError(f"{path} must be all vectors, all numbers or all strings (got {value!r})")


def _name(row: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in row) + "]"


def _sample_distribution(spec: dict, seed: int, path: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{path}.type must be one of {list(DISTRIBUTIONS)} (got {kind!r})")
    valid = {"normal": ("type", "mean", "std", "num"), "uniform": ("type", "low", "high", "num")}[kind]
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a key of a {kind} distribution; valid keys: {list(valid)}")
    num = spec.get("num")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ConfigError(f"{path}.num must be an integer >= 1, the number of conditions drawn (got {num!r})")
    a_key, b_key = ("mean", "std") if kind == "normal" else ("low", "high")
    a, b = _vector(spec.get(a_key), f"{path}.{a_key}"), _vector(spec.get(b_key, 1.0 if kind == "normal" else None), f"{path}.{b_key}")
    d = max(a.numel(), b.numel())
    if a.numel() not in (1, d) or b.numel() not in (1, d):
        raise ConfigError(f"{path}.{a_key} and {path}.{b_key} must have the same length or be numbers (got {a.numel()} and {b.numel()})")
    a, b = a.expand(d), b.expand(d)
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "normal":
        if not (b > 0).all():
            raise ConfigError(f"{path}.std must be > 0 (got {b.tolist()})")
        t = a + b * torch.randn((num, d), generator=gen, dtype=torch.float64)
    else:
        if not (b > a).all():
            raise ConfigError(f"{path}: uniform needs high > low in every coordinate (got low {a.tolist()}, high {b.tolist()})")
        t = a + (b - a) * torch.rand((num, d), generator=gen, dtype=torch.float64)
    t = t.float()
    return t, tuple(_name(row) for row in t.tolist())


def _vector(value: Any, path: str) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{path} must be a number or a list of numbers (got {value!r})")
    t = torch.tensor(value, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ConfigError(f"{path} must be finite (got {value!r})")
    return t


def _load_file(value: str, path: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    import numpy as np

    p = Path(value).expanduser()
    if p.suffix != ".npy":
        raise ConfigError(f"{path} names a file {value!r}; only .npy files are read (numpy.save of an (N, d) array)")
    if not p.is_file():
        raise ConfigError(f"{path}: file {value!r} does not exist (relative paths are read from the working directory, "
                          "which must be the same on every Ray worker; use an absolute path)")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: {value!r} is not a readable .npy array ({err})") from None
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] == 0:
        raise ConfigError(f"{path}: {value!r} must hold an (N, d) or (N,) array with N >= 1 (got shape {tuple(t.shape)})")
    return t, tuple(_name(row) for row in t.tolist())


def _embed(prompts: list[str], embedding: str | None, path: str) -> torch.Tensor:
    if embedding is None:
        raise ConfigError(f"{path} holds prompt strings; set conditions.embedding: 'module:fn', a function "
                          "(list of str) -> tensor (N, d) that embeds them")
    try:
        fn = registry.import_target(embedding, "conditions.embedding")
    except registry.RegistryError as err:
        raise ConfigError(str(err)) from None
    out = fn(prompts)
    t = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[0] != len(prompts):
        raise ConfigError(f"conditions.embedding {embedding!r} must return one vector per prompt, shape ({len(prompts)}, d) "
                          f"(got {tuple(t.shape)})")
    return t
