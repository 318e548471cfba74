"""Discriminator guidance: refine an imperfect pretrained chain with a time-conditioned discriminator (BOOST §3).

A pretrained model P~ is never exactly the data law P; the corrected reverse process uses the score
s_theta + grad log(p_k / p~_k) (BOOST Thm 2, eq. 3.2). A logit network l_phi(x, k) (d = sigmoid(l), data = 1,
model samples = 0; Kim et al. 2023) estimates the ratio as d / (1 - d) = exp(l_phi), so at step k

    delta_k(x) = c_k w grad_x l_phi(x, k)          (c_k = mean_score[k]; only for k in the window)

which is grad log d/(1-d), NOT grad log d = (1 - d) grad l (`rlft.guidance.classifier.ClassifierGuidance`).

`DiscriminatorGuidance` is that control (the `guidance: discriminator` sampler): `rlft.sampling.sample(model, n,
control=...)` and `ControlledChain(model, control)` run it. `DiscriminatorGuidanceLearner`
(`learner: {type: discriminator_guidance}`) trains l_phi, on the `DifferentiableLearner` base (its Adam step,
cosine lr tied to `run.iterations`, gradient clipping and checkpoints), by one of (`rlft.guidance.discriminator`):

    objective: ce      J_CE      (eq. 3.4)      Kim et al.'s cross-entropy
    objective: mse     J_MSE     (eq. 3.8, intended form; double back-propagation)
    objective: mse_ce  J_MSE + gamma J_CE        (eq. 3.10)

Data (label 1) come from `learner.data`: `{type: gmm, weights, means, stds, num_samples}` (the TRUE mixture, sampled
once with the task's seed; exact samples of it are the held-out set) or `{path: X.npy}` (an (N, *event) array; the
last `holdout` rows are held out). Model samples (label 0) are the pretrained chain's, drawn once. `evaluate()`
reports the energy distance of refined samples to held-out data with its floor, the same for the uncorrected
model under `pretrained`, and, for mixture data, the discriminator-adjusted score error E_phi (BOOST Thm 4,
`score_error`) against the uncorrected model's E_theta; its `objective` is minus the energy distance (no reward).
A task for it needs no `reward:` (`needs_reward = False`; one given is ignored); `alpha` is unused. It runs on any
chain whose mean is affine in the score: GMMModel, ScoreNetChain and diffusers UNets without x0 clipping (no LoRA:
the discriminator is a network of its own, a small conv net for image events under `network: auto`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import numpy as np
import torch

import rlft.checkpoint as checkpoint
import rlft.metrics as metrics
from rlft.config import ConfigError
from rlft.control.options import DifferentiableOptions
from rlft.control.rollout import DifferentiableLearner
from rlft.evaluation import (
    ENERGY_BLOCKS, ENERGY_DISTANCE, ENERGY_DISTANCE_FLOOR, FLOOR_DRAWS, KL, NUM_SAMPLES, OBJECTIVE, PRETRAINED,
)
from rlft.guidance.discriminator import (
    CE_LOSS, MSE_LOSS, TRAIN_LOSS, Levels, ce_loss, logit_and_gradient, logit_net, mse_loss, score_error,
    scores_at_levels,
)
from rlft.models.base import DiffusionModel
from rlft.models.gmm import GaussianMixture
from rlft.sampling import sample

#: evaluation key: the discriminator-adjusted score error (BOOST Thm 4) of the refined chain (and, under
#: `pretrained`, E_theta of the uncorrected one)
SCORE_ERROR = "score_error"
DISCRIMINATOR_FILE = "discriminator.safetensors"
#: data states per level in `score_error`
SCORE_ERROR_SAMPLES = 256


class DiscriminatorGuidance:
    """delta_k = c_k w grad_x l_phi(x_k, n_k) for k in [window[0], window[1]), else 0 (module docstring).

    Holds a reference to `discriminator` (a `rlft.guidance.discriminator.LogitNet`), so a learner's control follows
    its training; n_k = sqrt(1 - alpha_bar_k) is the noise std the network is conditioned on.
    """

    def __init__(self, model: DiffusionModel, discriminator: torch.nn.Module, weight: float = 1.0,
                 window: tuple[int, int] | list[int] | None = None) -> None:
        self.levels = Levels(model)  # raises for a chain without LevelCoefficients
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number >= 0 (got {weight})")
        self.model, self.discriminator, self.weight = model, discriminator, float(weight)
        self.window = check_window(window, model.num_steps, "window")

    def active(self, k: int) -> bool:
        return self.window[0] <= k < self.window[1]

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active(k):
            return torch.zeros_like(x)
        noise_std = x.new_full((x.shape[0],), float(self.levels.noise_std[k]))
        _, grad = logit_and_gradient(self.discriminator, x, noise_std)  # grad log d/(1-d) = grad l
        return (float(self.levels.c[k]) * self.weight) * grad.detach()


def check_window(window, num_steps: int, path: str) -> tuple[int, int]:
    """[first, stop) as a tuple (None = every step); errors name `path`, the value, the rule and the fix."""
    if window is None:
        return 0, num_steps
    if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
        raise ConfigError(f"{path} must be [first, stop) step indices with 0 <= first < stop <= num_steps = {num_steps} "
                          f"(got {list(window)}); e.g. [0, {num_steps}] applies the correction at every step")
    return int(window[0]), int(window[1])


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where the data (label 1) come from: the true mixture (`type: gmm`) or an array file (`path`)."""

    type: Union[Literal["gmm", "array"], None] = None
    """gmm | array; None = array when `path` is given, gmm when `means` is."""
    path: Union[str, None] = None
    """A .npy file holding (N, *event_shape) samples of the data law."""
    weights: Union[list[float], None] = None
    """The true mixture's weights (type gmm)."""
    means: Union[list[list[float]], None] = None
    """The true mixture's means, C lists of D numbers (type gmm)."""
    stds: Union[list[float], float, None] = None
    """The true mixture's isotropic stds, one per component or one shared number (type gmm)."""
    num_samples: int = 5000
    """Data samples drawn from the mixture (type gmm) with the task's seed."""
    holdout: float = 0.2
    """Fraction of an array's rows held out for evaluation (type array)."""

    def __post_init__(self) -> None:
        kind = self.kind
        if kind == "gmm" and (self.means is None or self.weights is None or self.stds is None):
            raise ConfigError("learner.data of type gmm needs weights, means and stds (the TRUE mixture the data follow)")
        if kind == "array" and self.path is None:
            raise ConfigError("learner.data of type array needs path: a .npy file of (N, *event) samples")
        if self.num_samples < 2:
            raise ConfigError(f"learner.data.num_samples must be an integer >= 2 (got {self.num_samples})")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"learner.data.holdout must be in (0, 1) (got {self.holdout}); e.g. 0.2")

    @property
    def kind(self) -> str | None:
        return self.type or ("array" if self.path is not None else "gmm" if self.means is not None else None)

    def mixture(self) -> GaussianMixture:
        try:
            return GaussianMixture.create(self.weights, self.means, self.stds)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"learner.data: {err}") from None


@dataclasses.dataclass(frozen=True)
class DiscriminatorGuidanceOptions(DifferentiableOptions):
    """Discriminator guidance's options (plus the shared ones: lr, batch_size, drift_iterations, ...)."""

    objective: Literal["ce", "mse", "mse_ce"] = "mse_ce"
    """The discriminator's loss: ce (Kim et al., eq. 3.4), mse (J_MSE, eq. 3.8) or mse_ce (J_MSE + gamma J_CE, eq. 3.10).
    The default: on a 2-D wrong-mixture pair (5,000 data samples, 3,000 updates) E_phi was 2.46 (ce), 0.185 (mse),
    0.087 (mse_ce) against the uncorrected 4.89, and the energy distance to P 0.0335, 0.0072, 0.0062 against 0.191."""
    gamma: float = 1.0
    """Weight of J_CE in mse_ce (eq. 3.10)."""
    weight: float = 1.0
    """Guidance weight w of the correction at sampling time (1 = the ratio's exact form)."""
    window: Union[list[int], None] = None
    """[first, stop) steps the correction is applied (and trained) at; None = every step."""
    data: DataOptions = dataclasses.field(default_factory=DataOptions)
    """The data: {type: gmm, weights, means, stds, num_samples} or {path: X.npy}."""
    model_samples: Union[int, None] = None
    """Pretrained-model samples (label 0), drawn once; None = as many as the training data."""
    hidden: int = 128
    """Width of the logit network."""
    depth: int = 2
    """Hidden layers of the logit network."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gamma", "weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"learner.{name} must be a finite number >= 0 (got {v})")
        if self.data.kind is None:
            raise ConfigError("learner.data is required: {type: gmm, weights, means, stds, num_samples} (the true "
                              "mixture) or {path: X.npy} (an (N, *event) array of data samples)")
        if self.model_samples is not None and self.model_samples < 2:
            raise ConfigError(f"learner.model_samples must be an integer >= 2 (got {self.model_samples})")


class DiscriminatorGuidanceLearner(DifferentiableLearner):
    """Trains l_phi on data (label 1) vs pretrained-model samples (label 0); the control is `DiscriminatorGuidance`.

    Each update draws `batch_size` data and `batch_size` model samples, a level k per row (uniform over the
    window) and diffuses them to level k with the forward kernel (`Levels.diffuse`); J_MSE's rows are weighted by
    lambda_k = c_k^2 / (2 s_k^2), normalised to mean 1 over the window. The pretrained model is never changed.
    """

    Options: ClassVar[type] = DiscriminatorGuidanceOptions
    name: ClassVar[str] = "discriminator_guidance"
    checkpoint_format: ClassVar[str] = "rlft-discriminator-guidance"
    needs_reward: ClassVar[bool] = False  # data, not a reward, define the correction
    checkpoint_version: ClassVar[int] = 1
    architecture_options: ClassVar[tuple[str, ...]] = ("hidden", "depth", "time_frequencies", "network")

    def resolve_defaults(self, o: DiscriminatorGuidanceOptions) -> DiscriminatorGuidanceOptions:
        # 3000 Adam steps of a 128x2 CE discriminator took a 2-D pair from 0.299 to 0.013 (MATH.md §7)
        return dataclasses.replace(o, lr=o.lr or 1e-3, max_grad_norm=0.0 if o.max_grad_norm is None else o.max_grad_norm,
                                   drift_iterations=o.drift_iterations or 3000)

    def check_model(self) -> None:
        super().check_model()
        self.uses_lora = False  # the discriminator is a network of its own; the pretrained chain stays as it is
        self.window = check_window(self.options.window, self.model.num_steps, "learner.window")
        if self.options.network == "conv" and len(self.model.event_shape) != 3:
            raise ConfigError(f"learner.network conv needs image events (C, H, W) (the model's are "
                              f"{tuple(self.model.event_shape)}); use network: mlp or auto")

    def build_networks(self) -> None:
        o, model = self.options, self.model
        self.discriminator = logit_net(model.event_shape, o.hidden, o.depth, o.time_frequencies, o.network)
        self.discriminator.to(device=model.device, dtype=model.dtype)
        self.drift_net = self.discriminator  # what the base saves, clips and steps
        self._drift_params = list(self.discriminator.parameters())
        self._control = DiscriminatorGuidance(model, self.discriminator, o.weight, o.window)
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=o.lr)
        self.levels = Levels(model, dtype=model.dtype, device=model.device)
        lam = self.levels.kl_weight[self.window[0]:self.window[1]]
        self._mse_weight = self.levels.kl_weight / lam.mean()  # lambda_k, mean 1 over the window
        self._data: torch.Tensor | None = None

    def compute_derived(self) -> dict[str, Any]:
        return {**super().compute_derived(), "objective": self.options.objective, "window": list(self.window)}

    # -- data ----------------------------------------------------------------------------------------
    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(data (N, *event), model samples (M, *event)) on the model's device, drawn once from the task's seed."""
        if self._data is None:
            model, d = self.model, self.options.data
            if d.kind == "gmm":
                data = self._mixture().sample(d.num_samples, torch.Generator().manual_seed(int(self.task.seed)))
            else:
                data, _ = self._array_split()
            self._check_data(data)
            n_model = self.options.model_samples or data.shape[0]
            self._data = data.to(device=model.device, dtype=model.dtype)
            self._model_x = sample(model, n_model, seed=int(self.task.seed) + 1, progress=False).x.to(model.device)
        return self._data, self._model_x

    def _mixture(self) -> GaussianMixture:
        mixture = self.options.data.mixture()
        if (mixture.dim,) != tuple(self.model.event_shape):
            raise ConfigError(f"learner.data's mixture is {mixture.dim}-D but the model's samples have shape "
                              f"{tuple(self.model.event_shape)}; give means of the model's dimension")
        return mixture

    def _array_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.options.data
        path = Path(d.path)
        if not path.is_file():
            raise ConfigError(f"learner.data.path {str(path)!r} does not exist; give a .npy file of (N, *event) samples")
        x = torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float64)
        x = x.reshape(x.shape[0], *self.model.event_shape) if x.ndim >= 1 and x[0].numel() == self.model.event_dim else x
        self._check_data(x)
        n_hold = max(1, int(round(d.holdout * x.shape[0])))
        if x.shape[0] - n_hold < 2:
            raise ConfigError(f"learner.data.path holds {x.shape[0]} rows: too few to hold out {d.holdout} of them")
        return x[: x.shape[0] - n_hold], x[x.shape[0] - n_hold:]

    def _check_data(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != tuple(self.model.event_shape) or not bool(torch.isfinite(x).all()):
            raise ConfigError(f"learner.data must be finite samples of shape (N, {', '.join(map(str, self.model.event_shape))}) "
                              f"for this model (got shape {tuple(x.shape)})")

    def held_out(self, n: int, seed: int) -> tuple[torch.Tensor, float]:
        """n held-out data samples (exact samples of P for mixture data) and the energy-distance floor at that size."""
        block = max(64, n // ENERGY_BLOCKS)
        if self.options.data.kind == "gmm":
            mixture, gen = self._mixture(), torch.Generator().manual_seed(seed)
            ref = mixture.sample(n, gen)
            floors = [metrics.energy_distance(mixture.sample(n, gen), ref, block) for _ in range(FLOOR_DRAWS)]
            return ref, sum(floors) / len(floors)
        train, hold = self._array_split()
        n = min(n, hold.shape[0], train.shape[0])
        return hold[:n], metrics.energy_distance(train[:n], hold[:n], max(64, n // ENERGY_BLOCKS))

    # -- training ------------------------------------------------------------------------------------
    def _levels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(self.window[0], self.window[1], (n,), generator=gen, device=self.model.device)

    def objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        o, lv = self.options, self.levels
        data, model_x = self.samples()
        gen, B = self.device_generator(), o.batch_size
        dev = self.model.device
        x0_d = data[torch.randint(data.shape[0], (B,), generator=gen, device=dev)]
        x0_m = model_x[torch.randint(model_x.shape[0], (B,), generator=gen, device=dev)]
        k_d, k_m = self._levels(B, gen), self._levels(B, gen)
        eps_d = torch.randn(x0_d.shape, generator=gen, device=dev, dtype=x0_d.dtype)
        eps_m = torch.randn(x0_m.shape, generator=gen, device=dev, dtype=x0_m.dtype)
        x_d, x_m = lv.diffuse(x0_d, k_d, eps_d), lv.diffuse(x0_m, k_m, eps_m)  # (B, *event)
        n_d, n_m = lv.noise_std[k_d], lv.noise_std[k_m]  # (B,)
        out: dict[str, float] = {}
        loss = x_d.new_zeros(())
        if o.objective in ("mse", "mse_ce"):
            view = (-1,) + (1,) * (x_d.ndim - 1)
            target = -eps_d / n_d.view(view) - scores_at_levels(self.model, k_d, x_d)  # grad log q(x_k|x_0) - s_theta
            mse = mse_loss(self.discriminator, x_d, n_d, target, self._mse_weight[k_d])
            loss = loss + mse
            out[MSE_LOSS] = float(mse.detach())
        if o.objective in ("ce", "mse_ce"):
            ce = ce_loss(self.discriminator, x_d, n_d, x_m, n_m)
            loss = loss + (o.gamma if o.objective == "mse_ce" else 1.0) * ce
            out[CE_LOSS] = float(ce.detach())
        out[TRAIN_LOSS] = float(loss.detach())
        return -loss, out

    # -- evaluation ----------------------------------------------------------------------------------
    def score_errors(self, n: int = SCORE_ERROR_SAMPLES, seed: int = 0) -> tuple[float, float]:
        """(E_phi, E_theta): BOOST Thm 4's weighted squared error, sum_k lambda_k E|g_k - (score_P - s_theta)_k|^2
        along the data's forward process, of the correction g = w grad l_phi (0 outside the window) and of none.
        Mixture data only (the exact correction needs score_P)."""
        mixture, lv, gen = self._mixture(), self.levels, torch.Generator().manual_seed(seed)
        alpha_bar = (lv.signal.double() ** 2).tolist()
        corrections, exact = [], []
        for k in range(self.model.num_steps):
            x = mixture.diffuse(alpha_bar[k]).sample(n, gen).to(device=self.model.device, dtype=self.model.dtype)
            with torch.no_grad():
                e = mixture.diffuse(alpha_bar[k]).score(x.double()) - self.model.score(k, x).double()
            g = self._control(k, x) / float(lv.c[k]) if self._control.active(k) else torch.zeros_like(x)
            corrections.append(g)
            exact.append(e)
        zero = [torch.zeros_like(e) for e in exact]
        return score_error(lv, corrections, exact), score_error(lv, zero, exact)

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        """Energy distance of refined and of uncorrected samples to held-out data, with its floor; E_phi and E_theta
        for mixture data; the refined chain's path KL to the pretrained one. This learner has no reward, so its
        `objective` (what `rlft sweep` ranks trials by, maximised) is minus the energy distance to held-out data."""
        seed = int(self.task.seed) + 1 if seed is None else seed
        ref, floor = self.held_out(num_samples, seed + 20_000)
        n = ref.shape[0]
        block = max(64, n // ENERGY_BLOCKS)
        tuned = sample(self.model, n, control=self._control, seed=seed, progress=progress, desc="refined")
        pre = sample(self.model, n, seed=seed + 10_000, progress=progress, desc="pretrained")
        out: dict[str, Any] = {
            ENERGY_DISTANCE: metrics.energy_distance(tuned.x.double(), ref, block), ENERGY_DISTANCE_FLOOR: floor,
            KL: float(tuned.kl.double().mean()), NUM_SAMPLES: n,
        }
        pretrained: dict[str, Any] = {ENERGY_DISTANCE: metrics.energy_distance(pre.x.double(), ref, block),
                                      ENERGY_DISTANCE_FLOOR: floor, KL: 0.0, NUM_SAMPLES: n}
        out[OBJECTIVE], pretrained[OBJECTIVE] = -out[ENERGY_DISTANCE], -pretrained[ENERGY_DISTANCE]
        if self.options.data.kind == "gmm":
            out[SCORE_ERROR], pretrained[SCORE_ERROR] = self.score_errors(seed=seed)
        out[PRETRAINED] = pretrained
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_networks(self, out: Path) -> None:
        checkpoint.save_module(out / DISCRIMINATOR_FILE, self.discriminator)

    def load_networks(self, src: Path) -> None:
        checkpoint.load_module(src / DISCRIMINATOR_FILE, self.discriminator, self.model.device)
