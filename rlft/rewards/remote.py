"""Rewards served by a pool of Ray actors: `reward: {type: <any reward>, ..., workers: M, batch_size: b}`.

A reward that is itself a large model (an aesthetic scorer, a classifier, a folding oracle) runs best beside
the learner, not inside it: `RewardPool` builds the named reward once in each of M Ray actors (each with
its own `num_cpus` / `num_gpus`, e.g. 0.25 of a GPU) and evaluates a batch x (B, *event) by cutting it into
chunks of `batch_size` rows, scoring the chunks on the actors in parallel and concatenating the values in
order. The values equal the in-process reward's (same code, same dtype on the same device kind).

Gradients. A reward scores each sample alone (r_i depends on x_i only), so its vector-Jacobian product with
any upstream gradient g is g_i * grad r(x_i): when x requires a gradient and the reward is differentiable,
each actor also returns grad r(x_i) (autograd of sum_i r(x_i)) and `_Served` hands g_i * grad r(x_i) back
to the caller's graph. ELEGANT and the other differentiable learners thus train through a served reward.

Failures. An actor that dies is restarted by Ray (`max_restarts = max_retries`) and its chunk is sent again,
at most `max_retries` times per chunk; then a `RewardError` names the reward and the actor. While an actor
restarts, its chunk waits for it (up to `RESTART_TIMEOUT_S`). An exception the
reward itself raises is not retried: it is re-raised with its own message. No value is ever filled in.

Reward queries are counted by the learners, as for an in-process reward (a served reward is called the same
way). Ray is imported only when a pool is built, so the core still imports without it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from rlft.config import ConfigError
from rlft.rewards.base import Reward, RewardError, build_reward, check_reward_values

#: seconds between retries of a chunk whose actor died (doubled each time)
RETRY_BACKOFF_S = 0.5
#: while Ray restarts an actor its calls fail at once (ActorUnavailableError): poll every this many seconds, and
#: give up after RESTART_TIMEOUT_S (not counted against max_retries: the chunk never ran)
UNAVAILABLE_POLL_S, RESTART_TIMEOUT_S = 0.25, 120.0


class _Served(torch.autograd.Function):
    """r (B,) computed elsewhere, with its per-sample gradient grad r(x_i) (B, *event) as the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grads)
        return values.clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return upstream.reshape(-1, *([1] * (grads.ndim - 1))) * grads, None, None  # g_i * grad r(x_i)


class RewardWorker:
    """One actor of the pool: builds the reward from its mapping and scores chunks (values, and gradients)."""

    def __init__(self, spec: dict[str, Any], context: dict[str, Any], device: str) -> None:
        torch.set_num_threads(1)
        self.device = device
        self.reward = build_reward(spec, **context).to(device)

    def info(self) -> dict[str, Any]:
        r = self.reward
        return {"name": getattr(r, "name", type(r).__name__), "differentiable": bool(getattr(r, "differentiable", True)),
                "exact_form": getattr(r, "exact_form", None), "has_true_reward": bool(getattr(r, "has_true_reward", False))}

    def score(self, x: torch.Tensor, true: bool, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device)
        fn = self.reward.true_reward if true else self.reward
        if not with_grad:
            with torch.no_grad():
                return fn(x).cpu(), None
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            values = fn(x)
            (grads,) = torch.autograd.grad(values.sum(), x)  # rows are independent: d sum_i r_i / d x_i = grad r(x_i)
        return values.detach().cpu(), grads.cpu()

    def ping(self) -> bool:
        return True


class RewardPool(Reward):
    """A reward evaluated by `workers` Ray actors in chunks of `batch_size` rows (see the module docstring)."""

    def __init__(
        self, reward: dict[str, Any], workers: int = 1, batch_size: int = 0, num_cpus: float = 1.0,
        num_gpus: float = 0.0, max_retries: int = 2, model: Any = None,
    ) -> None:
        """
        Args:
            reward: the served reward's own mapping (`type` and its keyword arguments).
            workers: actors in the pool (>= 1).
            batch_size: rows per chunk sent to one actor; 0 = split a batch evenly over the actors.
            num_cpus: CPUs reserved per actor (> 0; fractions allowed).
            num_gpus: GPUs reserved per actor (fractions allowed); the reward runs on cuda when > 0.
            max_retries: times a chunk is resent after its actor died (and times Ray restarts an actor).
            model: the task's model, passed on to rewards that take one (filled in by rlft).
        """
        check_pool_options(workers, batch_size, num_cpus, num_gpus, max_retries)
        self.spec, self.workers, self.batch_size = dict(reward), int(workers), int(batch_size)
        self.max_retries = int(max_retries)
        self._context = {"model": model} if model is not None else {}
        self._resources = {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)}
        self._actors: list = []
        self._start()
        info = self._call(0, "info")
        self.name = f"{info['name']}@{self.workers}"
        self.differentiable, self.exact_form = info["differentiable"], info["exact_form"]
        self._has_true = info["has_true_reward"]

    # -- the pool ------------------------------------------------------------------------------------
    def _start(self) -> None:
        import ray

        device = "cuda" if self._resources["num_gpus"] > 0 else "cpu"
        cls = ray.remote(RewardWorker).options(max_restarts=self.max_retries, max_task_retries=0, **self._resources)
        # kept for the pool's lifetime: a restarted actor fetches its constructor's arguments again
        self._context_ref = ray.put(self._context) if self._context else {}
        self._actors = [cls.remote(self.spec, self._context_ref, device) for _ in range(self.workers)]

    def actors(self) -> list:
        """The actor handles (tests kill one to check the retry)."""
        return list(self._actors)

    def _call(self, i: int, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self._actors[i], method).remote(*args))

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = self.batch_size or math.ceil(n / self.workers)
        return [(a, min(a + size, n)) for a in range(0, n, max(size, 1))]

    def _score(self, x: torch.Tensor, true: bool, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores x (B, *event) chunk by chunk on the actors (round robin); resends chunks whose actor died."""
        import ray

        chunks = self._chunks(x.shape[0])
        host = x.detach().cpu()
        results: list = [None] * len(chunks)
        attempts, waited = [0] * len(chunks), [0] * len(chunks)
        pending = {self._submit(j, host, chunks, true, with_grad): j for j in range(len(chunks))}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(done[0])
            try:
                results[j] = ray.get(done[0])
            except ray.exceptions.ActorUnavailableError as err:  # restarting: wait for it, up to a deadline
                waited[j] += 1
                if waited[j] * UNAVAILABLE_POLL_S > RESTART_TIMEOUT_S:
                    raise RewardError(
                        f"reward {self.spec.get('type')!r}: actor {j % self.workers} of {self.workers} did not come back "
                        f"within {RESTART_TIMEOUT_S:g} s after dying ({type(err).__name__}); check the cluster's resources"
                    ) from None
                time.sleep(UNAVAILABLE_POLL_S)
                pending[self._submit(j, host, chunks, true, with_grad)] = j
            except ray.exceptions.RayActorError as err:
                attempts[j] += 1
                actor = j % self.workers
                if attempts[j] > self.max_retries:
                    raise RewardError(
                        f"reward {self.spec.get('type')!r}: actor {actor} of {self.workers} died {attempts[j]} times on "
                        f"rows {chunks[j][0]}..{chunks[j][1] - 1} (max_retries {self.max_retries}): {type(err).__name__}; "
                        "check the actor's memory and device, or raise reward.max_retries"
                    ) from None
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempts[j] - 1))  # Ray restarts the actor meanwhile
                pending[self._submit(j, host, chunks, true, with_grad)] = j
            except ray.exceptions.RayTaskError as err:  # the reward's own exception: not retried
                raise err.as_instanceof_cause() from None
        values = torch.cat([v for v, _ in results]).to(device=x.device, dtype=x.dtype)
        grads = torch.cat([g for _, g in results]).to(device=x.device, dtype=x.dtype) if with_grad else None
        return values, grads

    def _submit(self, j: int, host: torch.Tensor, chunks: list[tuple[int, int]], true: bool, with_grad: bool):
        a, b = chunks[j]
        return self._actors[j % self.workers].score.remote(host[a:b], true, with_grad)

    # -- the reward protocol --------------------------------------------------------------------------
    def _evaluate(self, x: torch.Tensor, true: bool) -> torch.Tensor:
        with_grad = self.differentiable and x.requires_grad and torch.is_grad_enabled()
        values, grads = self._score(x, true, with_grad)
        values = check_reward_values(values, x.shape[0], self.name, "true_reward" if true else "reward")
        return _Served.apply(x, values, grads) if with_grad else values

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, False)

    @property
    def has_true_reward(self) -> bool:
        return self._has_true

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, True)

    def close(self) -> None:
        """Ends the actors (they also end with the process that owns them)."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def pool_bundles(spec: dict[str, Any] | None) -> list[dict[str, float]]:
    """Placement-group bundles a trial reserves for its reward actors (none unless the mapping has `workers:`)."""
    if not isinstance(spec, dict) or "workers" not in spec:
        return []
    gpus = float(spec.get("num_gpus", 0.0))
    bundle = {"CPU": float(spec.get("num_cpus", 1.0)), **({"GPU": gpus} if gpus > 0 else {})}
    return [dict(bundle) for _ in range(int(spec["workers"]))]


def check_pool_options(workers: Any, batch_size: Any, num_cpus: Any, num_gpus: Any, max_retries: Any, path: str = "reward") -> None:
    """The pool keys' rules (run before Ray starts by `rlft.run_config.check_reward_spec`, and at construction)."""
    rules = [
        ("workers", workers, isinstance(workers, int) and workers >= 1, "an integer >= 1"),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 0, "an integer >= 0 (0 = B / workers)"),
        ("num_cpus", num_cpus, isinstance(num_cpus, (int, float)) and num_cpus > 0, "a number > 0 (fractions allowed)"),
        ("num_gpus", num_gpus, isinstance(num_gpus, (int, float)) and num_gpus >= 0, "a number >= 0 (fractions allowed)"),
        ("max_retries", max_retries, isinstance(max_retries, int) and max_retries >= 0, "an integer >= 0"),
    ]
    for key, value, ok, rule in rules:
        if isinstance(value, bool) or not ok:
            raise ConfigError(f"{path}.{key} must be {rule} (got {value!r}); fix it in the reward mapping")
