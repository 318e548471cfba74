"""S-MEME: score-based maximum-entropy exploration by mirror descent over fine-tuning rounds (De Santi et al. 2025,
"Provable Maximum Entropy Manifold Exploration via Diffusion Models", Alg. 1, eq. 9-12; MATH.md §6).

Round j = 1 .. R fine-tunes the previous round's model pi_{j-1} (pi_0 = the pretrained chain) with

    reward gradient  grad f_j(x) = -s^{j-1}(x)      (eq. 12: the first variation of the entropy, -log p_{j-1})
    KL weight        alpha_j, the KL taken to pi_{j-1} (not to pi_pre)

solved by Adjoint Matching (`rlft.control.adjoint_matching`) against pi_{j-1}: the lean adjoint runs through
pi_{j-1}'s mean and the rollout through pi_{j-1} plus this round's control. The round's exact target is

    p_j ∝ p_{j-1} exp(f_j / alpha_j) = p_{j-1}^{1 - 1/alpha_j},   so   p_j = p_pre^{beta_j},   beta_j = prod_{i<=j} (1 - 1/alpha_i).

Notation: s^{j} the score of round j's model at the data level, read at the last step's level K-1 (the least noisy
level the chain and its control are defined at); R `rounds`; alpha_j from `alpha_schedule` (constant: alpha;
increasing: alpha * j, the theory's sum 1/alpha_j = inf, sum 1/alpha_j^2 < inf, Thm 7.1; or a list).

`previous_score` network (default) reads s^{j-1} from pi_{j-1}'s chain as above, the paper's choice: each round then
damps the previous rounds' errors (p_j ∝ pi_{j-1}^{1 - 1/alpha_j}, pi_{j-1} the law actually reached). terminal uses
the terminal condition of the previous rounds' optimal controls instead, s^i = s^{i-1} + grad f_i / alpha_i, exact
for exact rounds and free of the level-(K-1) reading (the regression's least-weighted step), but it keeps pushing
where an earlier round overshot. `warm_start` starts round j >= 2 from round j-1's network scaled by the ratio of
the two rounds' exact data-level increments.

Why a ControlledChain: a drift control on rlft's chain is a score correction (delta_k = c_k g_k), so round j's model
is ControlledChain(pretrained, delta^{(1)} + .. + delta^{(j)}): its score is s_pre + sum_i g^{(i)}. Earlier rounds'
networks are frozen; each round trains a new zero-initialised one (so a round starts at its reference exactly).

Support: every rlft chain samples R^d, where p_pre^beta is normalisable only for beta > 0, i.e. every alpha_j > 1
(S-MEME's compact-support theory allows alpha = 1: one exact round is then uniform on the support, Thm 5.2). Options
with some alpha_j <= 1 are refused when parsed, before Ray starts.

An optional task reward r is added to the entropy term (S-MEME §4.4): grad f_j = -s^{j-1} + grad r, so the round
target becomes p_{j-1}^{1 - 1/alpha_j} exp(r / alpha_j). Without one the task needs no `reward:` (needs_reward =
False). Reward gradients only: no value of f exists, so there is no likelihood-ratio term and no value function.

Figures (`evaluate`): the entropy by the probability-flow ODE (`rlft.entropy`), the path KL to the previous round's
model and to the pretrained one, and, where the scores are exact (a Gaussian mixture chain), the exact round
target's entropy (closed form for one Gaussian, grid quadrature in <= 2-D) and the energy distance to its samples
(grid sampling) with the exact-vs-exact floor; per round and for the final round.

Pitfalls the tests pin (MATH.md's measured warning on the public code): the reward gradient's sign (grad f = -s
ascends the entropy), the training trajectories come from the model being fine-tuned (pi_{j-1} + this round), and the
reference of round j is pi_{j-1}.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

import rlft.checkpoint as checkpoint
import rlft.metrics as metrics
from rlft.config import ConfigError
from rlft.control.adjoint_matching import AdjointMatchingLearner
from rlft.control.networks import NetworkControl, build_control_net
from rlft.control.smeme_options import DEFAULT_LR, DEFAULT_ROUND_ITERATIONS, SMEMEOptions, round_exponents
from rlft.entropy import TemperedGrid, gaussian_entropy, knn_entropy, ode_entropy
from rlft.evaluation import ENERGY_DISTANCE, ENERGY_DISTANCE_FLOOR, KL, OBJECTIVE, PRETRAINED
from rlft.models.base import ControlledChain, DiffusionModel
from rlft.rewards.base import evaluate
from rlft.sampling import sample

FORMAT = "rlft-smeme"
FORMAT_VERSION = 1
ROUND_FILE = "round_{}.safetensors"
#: grid cells per dimension of the exact round target, and its box in tempered component stds
GRID_CELLS, GRID_STDS = 400, 7.0
#: exact-vs-exact draws of the energy-distance floor, and its blocks (as rlft.evaluation)
FLOOR_DRAWS, ENERGY_BLOCKS = 8, 8

ENTROPY = "entropy"
TARGET_ENTROPY = "target_entropy"
KL_PREVIOUS = "kl_previous"
KL_PRETRAINED = KL  # the path KL to the pretrained model: the standard figure's key
ROUNDS = "rounds"
EXACT_ENTROPY = "exact_entropy"
ENTROPY_CLOSURE = "entropy_closure"
SAMPLE_ENTROPY = "sample_entropy"
SAMPLE_ENTROPY_CLOSURE = "sample_entropy_closure"


class SumControl:
    """delta_k = sum_i control_i(k, x, cond): the rounds' displacements added (a model's total fine-tuning)."""

    def __init__(self, controls: list) -> None:
        self.controls = list(controls)

    def __call__(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        for control in self.controls:
            out = out + control(k, x, cond)
        return out


def data_score(model: DiffusionModel, x: torch.Tensor) -> torch.Tensor:
    """s(x) at the data level, read at the last step's level K-1 (where the chain and its control are defined)."""
    return model.score(model.num_steps - 1, x)


class EntropyGradient:
    """The round's 'reward' for Adjoint Matching: value w r(x) (0 without a task reward), gradient -s_ref(x) + w grad r.

    Only the gradient of f_j = -log p_{j-1} is known (eq. 12), so its value part is (x - x.detach()) . g, which is 0
    with gradient g = -s_ref(x) (detached: the score is the reward gradient, not differentiated again).
    `reference` is the previous round's model (its score read at the data level) or a callable x -> s_{j-1}(x)."""

    differentiable = True
    name = "smeme_entropy"

    def __init__(self, reference, reward=None, reward_weight: float = 1.0) -> None:
        self.reference, self.reward, self.reward_weight = reference, reward, reward_weight

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.reference, DiffusionModel):
            return data_score(self.reference, x)
        return self.reference(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            g = -self.score(x.detach())  # grad f = -s^{j-1}
        value = ((x - x.detach()) * g).flatten(1).sum(1)  # (B,): 0, gradient g
        if self.reward is not None:
            value = value + self.reward_weight * evaluate(self.reward, x)
        return value


class SMEMELearner(AdjointMatchingLearner):
    """S-MEME on one task (module docstring): R rounds of Adjoint Matching, each against the previous round's model."""

    Options: ClassVar[type] = SMEMEOptions
    name: ClassVar[str] = "smeme"
    checkpoint_format: ClassVar[str] = FORMAT
    checkpoint_version: ClassVar[int] = FORMAT_VERSION
    #: a task for this learner may leave out `reward:` (the entropy is the objective)
    needs_reward: ClassVar[bool] = False

    def resolve_defaults(self, o: SMEMEOptions) -> SMEMEOptions:
        o = dataclasses.replace(
            o, lr=DEFAULT_LR if o.lr is None else o.lr, max_grad_norm=0.0 if o.max_grad_norm is None else o.max_grad_norm,
            drift_iterations=DEFAULT_ROUND_ITERATIONS if o.drift_iterations is None else o.drift_iterations,
            rounds=len(o.alpha_schedule) if isinstance(o.alpha_schedule, list) else o.rounds)
        if o.drift_iterations_per_train_iteration is None:  # the runner's iterations cover all rounds
            o = dataclasses.replace(o, drift_iterations_per_train_iteration=math.ceil(
                o.rounds * o.drift_iterations / self.run_iterations()))
        return o

    def build_networks(self) -> None:
        super().build_networks()
        if self.uses_lora:
            raise ConfigError(f"learner {self.name!r} needs a network control (a LoRA adapter per round is not built "
                              "yet); use a GMM or score-net model")
        self.base = self.model
        self.frozen: list[torch.nn.Module] = []  # networks of the finished rounds
        self.round_figures: list[dict[str, Any]] = []  # figures of the finished rounds

    @property
    def round(self) -> int:
        """The round being trained, 0-based."""
        return len(self.frozen)

    def alphas(self) -> list[float]:
        return self.options.alphas()

    def compute_derived(self) -> dict[str, Any]:
        return {**super().compute_derived(), "rounds": self.options.rounds, "alphas": self.alphas(),
                "betas": round_exponents(self.alphas())}

    # -- the models of the rounds --------------------------------------------------------------------
    def _frozen_controls(self, n: int) -> list:
        return [NetworkControl(self.base, net) for net in self.frozen[:n]]

    def round_model(self, j: int) -> DiffusionModel:
        """pi_j: the pretrained chain (j = 0) plus the displacements of rounds 1 .. j (j <= finished rounds + 1)."""
        if j == 0:
            return self.base
        controls = self._frozen_controls(j) if j <= self.round else self._frozen_controls(j - 1) + [self._control]
        return ControlledChain(self.base, SumControl(controls))

    def reference(self) -> DiffusionModel:
        """The KL reference of the round being trained: the previous round's model pi_{j-1}."""
        return self.round_model(self.round)

    def control(self) -> SumControl:
        """The total displacement over the pretrained chain (all rounds, the current one included)."""
        return SumControl(self._frozen_controls(self.round) + [self._control])

    # -- training -----------------------------------------------------------------------------------
    def objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One Adjoint Matching update of this round: chain, reward gradient and alpha are the round's."""
        reference = self.reference()
        saved = self.model, self.reward, self.task
        self.model = reference  # rollout through pi_{j-1} + this round's control; lean adjoint through pi_{j-1}
        self.reward = self.entropy_gradient(reference, saved[1])
        self.task = dataclasses.replace(saved[2], alpha=self.alphas()[self.round])
        try:
            surrogate, out = super().objective()
        finally:
            self.model, self.reward, self.task = saved
        out["round"] = float(self.round + 1)
        return surrogate, out

    def entropy_gradient(self, reference: DiffusionModel, reward) -> EntropyGradient:
        """The round's reward gradient -s^{j-1} (+ the task reward's share of grad r), `previous_score` deciding how
        s^{j-1} is read. terminal: s^i = s^{i-1} + grad f_i / alpha_i with grad f_i = -s^{i-1} + grad r gives
        s^i = beta_i s_pre + gamma_i grad r, gamma_i = (1 - 1/alpha_i) gamma_{i-1} + 1/alpha_i, so
        grad f_j = -beta_{j-1} s_pre + (1 - gamma_{j-1}) grad r."""
        if self.options.previous_score == "network":
            return EntropyGradient(reference, reward)
        beta, gamma = 1.0, 0.0
        for a in self.alphas()[: self.round]:
            beta, gamma = beta * (1.0 - 1.0 / a), (1.0 - 1.0 / a) * gamma + 1.0 / a
        base = self.base
        return EntropyGradient(lambda x: beta * data_score(base, x), reward, 1.0 - gamma)

    def update(self) -> dict[str, float]:
        if self.drift_updates >= (self.round + 1) * self.options.drift_iterations and self.round + 1 < self.options.rounds:
            self.next_round()
        return super().update()

    def lr_at(self, update: int) -> float:
        """The cosine schedule restarted each round."""
        return super().lr_at(update - self.round * self.options.drift_iterations)

    def next_round(self) -> None:
        """Freezes this round's network (after recording its figures) and starts the next from zero."""
        self.round_figures.append(self.figures(self.round + 1, self.options.entropy_samples, int(self.task.seed) + 7))
        net = self.drift_net
        net.requires_grad_(False)
        self.frozen.append(net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.task.seed) + self.round)
            self._new_round_network()
        if self.options.warm_start:
            self._warm_start(net, self.warm_start_scale(self.round))
        self.clip_thresholds = {}

    def warm_start_scale(self, j: int) -> float:
        """rho of round j + 1 (j >= 1, 0-based as `round`): (beta_j / alpha_{j+1}) / (beta_{j-1} / alpha_j)."""
        alphas, betas = self.alphas(), [1.0] + round_exponents(self.alphas())
        return (betas[j] / alphas[j]) / (betas[j - 1] / alphas[j - 1])

    def _warm_start(self, previous: torch.nn.Module, scale: float) -> None:
        """This round's network := `previous` with its output layer (the last Linear) scaled by `scale`."""
        linear = [m for m in previous.modules() if isinstance(m, torch.nn.Linear)]
        if not linear:
            return
        self.drift_net.load_state_dict(previous.state_dict())
        out = [m for m in self.drift_net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            out.weight.mul_(scale)
            out.bias.mul_(scale)
        self.drift_net.requires_grad_(True)
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=self.options.lr)

    def _new_round_network(self) -> None:
        o = self.options
        self.drift_net = build_control_net(self.base.event_shape, self.base.cond_shape, o.network, o.hidden, o.depth,
                                           o.time_frequencies).to(device=self.base.device, dtype=self.base.dtype)
        self._drift_params = list(self.drift_net.parameters())
        self._control = NetworkControl(self.base, self.drift_net)
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=o.lr)

    # -- figures ------------------------------------------------------------------------------------
    def exact_target(self, beta: float):
        """(entropy, sampler n -> (n, D)) of the exact round target p_pre^beta, or None where p_pre is not exact.

        p_pre is the pretrained chain's law at the last level (a Gaussian mixture for the exact bed): one component
        gives the closed form N(m, s^2 / beta I); 1-2 dimensions use grid quadrature and grid sampling."""
        marginal = getattr(self.base, "marginal", None)
        if marginal is None:
            return None
        mix = marginal(self.base.num_steps)
        if len(mix.weights) == 1:
            var = float(mix.stds[0]) ** 2 / beta
            mean = mix.means[0]
            return gaussian_entropy(mix.dim, var), lambda n, g: mean + math.sqrt(var) * torch.randn(
                n, mix.dim, generator=g, dtype=torch.float64)
        if mix.dim > 2:
            return None
        spread = GRID_STDS * mix.stds[:, None] / math.sqrt(beta)  # (C, 1)
        grid = TemperedGrid(mix.log_prob, (mix.means - spread).min(0).values, (mix.means + spread).max(0).values, beta,
                            GRID_CELLS)
        return grid.entropy(), grid.sample

    @torch.no_grad()
    def figures(self, j: int, n: int, seed: int) -> dict[str, Any]:
        """Round j's figures: PF-ODE entropy, path KL to pi_{j-1} and to pi_pre, exact target entropy and energy
        distance (with floor) where the scores are exact."""
        model = self.round_model(j)
        out: dict[str, Any] = {"round": j, "alpha": self.alphas()[j - 1], "beta": round_exponents(self.alphas())[j - 1]}
        with torch.enable_grad():
            out[ENTROPY] = ode_entropy(model, n, seed)
        tuned = sample(self.base, n, control=model.control, seed=seed, progress=False)
        out[SAMPLE_ENTROPY] = knn_entropy(tuned.x)
        out[KL_PRETRAINED] = float(tuned.kl.double().mean())
        previous = self.round_model(j - 1)
        own = SumControl(model.control.controls[j - 1:])  # round j's displacement over pi_{j-1}
        out[KL_PREVIOUS] = float(sample(previous, n, control=own, seed=seed, progress=False).kl.double().mean())
        exact = self.exact_target(out["beta"])
        if exact is not None:
            entropy, draw = exact
            g = torch.Generator().manual_seed(seed + 1)
            ref = draw(n, g)
            block = max(64, n // ENERGY_BLOCKS)
            out[TARGET_ENTROPY] = entropy
            out[ENERGY_DISTANCE] = metrics.energy_distance(tuned.x.double(), ref, block)
            floors = [metrics.energy_distance(draw(n, g), ref, block) for _ in range(FLOOR_DRAWS)]
            out[ENERGY_DISTANCE_FLOOR] = sum(floors) / len(floors)
        return out

    def pretrained_figures(self, n: int, seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with torch.enable_grad():
            out[ENTROPY] = ode_entropy(self.base, n, seed)
        out[SAMPLE_ENTROPY] = knn_entropy(sample(self.base, n, seed=seed, progress=False).x)
        exact = self.exact_target(1.0)
        if exact is not None:
            out[EXACT_ENTROPY] = exact[0]
        return out

    def evaluate(self, num_samples: int = 2000, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        """The final (current) round's figures at the top level, every round's under `rounds`, the pretrained
        model's under `pretrained`."""
        seed = int(self.task.seed) + 1 if seed is None else seed
        current = self.figures(self.round + 1, num_samples, seed)
        rounds = self.round_figures + [current]
        out = {k: v for k, v in current.items() if k not in ("round", "alpha", "beta")}
        pre = out[PRETRAINED] = self.pretrained_figures(num_samples, seed)  # same x_0: common random numbers
        if TARGET_ENTROPY in out:  # the estimate's share of the way to the exact target (biases of the ODE cancel)
            out[ENTROPY_CLOSURE] = (out[ENTROPY] - pre[ENTROPY]) / (out[TARGET_ENTROPY] - pre[EXACT_ENTROPY])
            out[SAMPLE_ENTROPY_CLOSURE] = ((out[SAMPLE_ENTROPY] - pre[SAMPLE_ENTROPY])
                                           / (out[TARGET_ENTROPY] - pre[EXACT_ENTROPY]))
        out[ROUNDS] = {str(f["round"]): {k: v for k, v in f.items() if k != "round"} for f in rounds}
        out[OBJECTIVE] = out[ENTROPY]  # what `rlft sweep` ranks trials by
        out["num_samples"] = num_samples
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "round_figures": self.round_figures}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.round_figures = list(state.get("round_figures", []))

    def save_networks(self, out: Path) -> None:
        super().save_networks(out)
        for i, net in enumerate(self.frozen):
            checkpoint.save_module(out / ROUND_FILE.format(i + 1), net)

    def load_networks(self, src: Path) -> None:
        pattern = re.compile(r"round_(\d+)\.safetensors$")
        done = sorted(int(m.group(1)) for p in src.iterdir() if (m := pattern.match(p.name)))
        if done != list(range(1, len(done) + 1)):
            raise checkpoint.CheckpointError(f"{src}: round networks {done} are not 1 .. n; the checkpoint is incomplete")
        o = self.options
        self.frozen = []
        for i in done:
            net = build_control_net(self.base.event_shape, self.base.cond_shape, o.network, o.hidden, o.depth,
                                    o.time_frequencies).to(device=self.base.device, dtype=self.base.dtype)
            checkpoint.load_module(src / ROUND_FILE.format(i), net, self.base.device)
            net.requires_grad_(False)
            self.frozen.append(net)
        self._new_round_network()
        super().load_networks(src)
        self._drift_params = list(self.drift_net.parameters())
