"""A fast RLlib EnvRunner for batched diffusion envs, and the one env creator RLlib builds any rlft env id with.

RLlib's `SingleAgentEnvRunner._sample` pays Python bookkeeping per env step per sub-env: connector passes that
unbatch the actions into B items, one `SingleAgentEpisode.add_env_step` per sub-env and step, and callbacks
(RAY_NOTES.md §2: ~25 us per env step, 0.05x of a raw torch loop over a small MLP at B = 256). Diffusion
episodes are short and their sub-envs move (nearly) in lockstep, so `BulkEnvRunner` samples in *rounds*:

    1. reset all B sub-envs; one batched RLModule forward + one action draw + one `env.step` per step, storing
       whole (B, ...) arrays, until every sub-env has finished its first episode (a drift round is exactly K
       steps; restart episodes end at different steps, the steps of a sub-env after its episode ended are
       discarded, so no episode is ever cut and none is biased towards short ones);
    2. build each finished episode at once from array slices: `SingleAgentEpisode(observations=(L+1, obs),
       actions=(L, ...), rewards=(L,), extra_model_outputs={action_dist_inputs, action_logp, ...})`, already in
       numpy form, exactly what the default runner's `episode.to_numpy()` returns (same columns and dtypes), so
       PPO's learner connectors accept them unchanged.

The actions are drawn as RLlib's `GetActions` connector draws them (`dist_cls.from_logits(...).sample()` with the
global torch RNG, then `logp`), so with the same seeds the two runners return the same episodes.

Scope (checked at construction, errors name the setting): the default env-to-module and module-to-env pipelines
(no custom connectors), a stateless RLModule, no action normalisation or clipping. Per-episode callbacks
(`on_episode_start/step/end`) are not called; `on_sample_end` is. Infos are not kept (empty dicts).
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers.vector import DictInfoToList
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.env.utils.infinite_lookback_buffer import InfiniteLookbackBuffer
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO
from ray.rllib.utils.spaces.space_utils import get_base_struct_from_space

#: `config.env_runners(gym_env_vectorize_mode=...)` for the rlft envs (the env itself is a batched VectorEnv).
VECTORIZE_MODE = "vector_entry_point"


#: Short names of the built-in env ids (`learner.env: drift | restart`).
ENV_ALIASES = {"drift": "rlft/DenoisingDrift-v0", "restart": "rlft/Restart-v0"}
#: The env_config key naming the Gymnasium env id `make_env` builds.
ENV_ID = "env_id"
#: The RLlib env name (Tune's registry) of `make_env`: ``config.environment(RLLIB_ENV, env_config={ENV_ID: ..., "task": ...})``.
RLLIB_ENV = "rlft_env"


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The Gymnasium spec of an env id: an alias (`ENV_ALIASES`), a registered id, or "module:Id".

    "module:Id" imports `module` first (it registers the id, as `envs.example_custom` does), here and so on every
    EnvRunner that calls `make_env`. Raises ValueError naming the id, the registered rlft ids and the fix.
    """
    import envs  # noqa: F401  (registers the built-in ids)

    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env id must be a non-empty string (got {env_id!r})")
    name = ENV_ALIASES.get(env_id, env_id)
    module, sep, gym_id = name.partition(":")
    if sep:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"env id {env_id!r}: module {module!r} cannot be imported ({err}); it must be importable on "
                             "the driver and on every Ray worker (working directory or PYTHONPATH)") from None
    else:
        gym_id = name
    try:
        return gym.spec(gym_id)
    except gym.error.Error:
        known = sorted(set(ENV_ALIASES) | {i for i in gym.registry if i.startswith(("rlft/", "example/"))})
        raise ValueError(f"env id {env_id!r} is not registered with Gymnasium; use one of {known}, or name your own as "
                         "'module:Id' where importing module registers Id (envs.register)") from None


def env_class(env_id: str) -> type:
    """The batched env class (`vector_entry_point`) of an env id; ValueError if it has none."""
    creator = env_spec(env_id).vector_entry_point
    if isinstance(creator, str):
        creator = gym.envs.registration.load_env_creator(creator)
    if not isinstance(creator, type):
        raise ValueError(f"env id {env_id!r} needs a vector_entry_point that is a gymnasium.vector.VectorEnv class "
                         f"(got {creator!r}); register it with envs.register(id, SingleEnv, BatchedEnv)")
    return creator


def make_env(env_config: Mapping[str, Any]):
    """RLlib env creator of any registered rlft env: ``env_config = {ENV_ID: id, "task": {...}, "num_envs": B, ...}``.

    The id's module is imported here (on the EnvRunner) before ``gym.make_vec``; the other keys are the env's
    keyword arguments (`rlft.rllib.adapter.EnvSpec.env_config` writes them).
    """
    cfg = dict(env_config)
    spec = env_spec(cfg.pop(ENV_ID))
    return gym.make_vec(spec.id, num_envs=int(cfg.pop("num_envs", 1)), vectorization_mode=VECTORIZE_MODE, **cfg)


def register_envs() -> None:
    """Registers `RLLIB_ENV` with RLlib (idempotent; done on import)."""
    from ray.tune.registry import register_env

    register_env(RLLIB_ENV, make_env)


register_envs()


class BulkEnvRunner(SingleAgentEnvRunner):
    """`SingleAgentEnvRunner` that steps a batched env in rounds and builds episodes from whole arrays."""

    def __init__(self, *, config, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        cfg = self.config
        problems = []
        if cfg._env_to_module_connector is not None or not cfg.add_default_connectors_to_env_to_module_pipeline:
            problems.append("custom env-to-module connectors (config.env_runners(env_to_module_connector=...))")
        if cfg._module_to_env_connector is not None or not cfg.add_default_connectors_to_module_to_env_pipeline:
            problems.append("custom module-to-env connectors (config.env_runners(module_to_env_connector=...))")
        if cfg.normalize_actions or cfg.clip_actions:
            problems.append(f"normalize_actions={cfg.normalize_actions} / clip_actions={cfg.clip_actions} (set both False)")
        module = self._policy()
        if module is not None and module.is_stateful():
            problems.append("a stateful (recurrent) RLModule")
        if problems:
            raise ValueError(
                f"BulkEnvRunner does not support {'; '.join(problems)}; use RLlib's SingleAgentEnvRunner "
                "(learner key fast_env_runner: false) for those"
            )
        self._episode_factory: EpisodeFactory | None = None  # built with the env (the local runner may have none)

    # -- helpers ---------------------------------------------------------------------------------------
    def _policy(self):
        module = self.module
        if isinstance(module, MultiRLModule):
            module = module[DEFAULT_MODULE_ID]
        return module

    def _raw_env(self):
        """The batched env without RLlib's info-to-list wrapper (infos are not kept)."""
        env = self.env
        return env.env if isinstance(env, DictInfoToList) else env

    # -- sampling --------------------------------------------------------------------------------------
    def _sample(
        self,
        *,
        num_timesteps: int | None = None,
        num_episodes: int | None = None,
        explore: bool,
        random_actions: bool = False,
        force_reset: bool = False,
    ) -> list[SingleAgentEpisode]:
        done: list[SingleAgentEpisode] = []
        steps = 0
        while (steps < num_timesteps) if num_timesteps is not None else (len(done) < num_episodes):
            episodes = self._sample_round(explore, random_actions)
            done.extend(episodes)
            steps += sum(len(e) for e in episodes)
        self._done_episodes_for_metrics.extend(done)
        if steps:
            self._log_env_steps(metric=self._metrics_num_env_steps_sampled, num_steps=steps)
        self._increase_sampled_metrics(steps, len(done))
        return done

    def _sample_round(self, explore: bool, random_actions: bool) -> list[SingleAgentEpisode]:
        """Resets all sub-envs and steps until each has finished one episode; returns the B episodes."""
        env, B = self._raw_env(), self.num_envs
        seed = self._seed if self._needs_initial_reset else None
        self._needs_initial_reset = False
        obs, _ = env.reset(seed=seed)
        start = time.perf_counter()
        module = self._policy()
        forward = dist_cls = None
        if not random_actions:
            dist_cls = module.get_exploration_action_dist_cls() if explore else module.get_inference_action_dist_cls()
            # what forward_exploration/forward_inference do, without toggling train/eval at every step
            module.eval()
            forward = module._forward_exploration if explore else module._forward_inference
        obs_steps, act_steps, rew_steps, term_steps, trunc_steps = [obs], [], [], [], []
        extra_steps: dict[str, list[np.ndarray]] = {}
        end = np.full(B, -1, dtype=np.int64)  # step at which each sub-env's first episode ended
        t = 0
        while (end < 0).any():
            if random_actions:
                actions, extra = env.action_space.sample(), {}
            else:
                with torch.no_grad():
                    batch = {Columns.OBS: torch.from_numpy(obs).to(self._device)}
                    out = forward(batch, t=self.num_env_steps_sampled_lifetime + t * B) if explore else forward(batch)
                    dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
                    if not explore:
                        dist = dist.to_deterministic()
                    action_t = dist.sample()  # as RLlib's GetActions: global torch RNG, then logp
                    out[Columns.ACTION_LOGP] = dist.logp(action_t)
                actions = action_t.cpu().numpy()
                extra = {k: v.cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
            obs, rewards, terminated, truncated, _ = env.step(actions)
            # copies: an env may reuse (and later mutate) the arrays it returned; RLlib's runner unbatches at once
            terminated, truncated = np.array(terminated, dtype=bool), np.array(truncated, dtype=bool)
            obs_steps.append(obs), act_steps.append(actions), rew_steps.append(np.array(rewards))
            term_steps.append(terminated), trunc_steps.append(truncated)
            for k, v in extra.items():
                extra_steps.setdefault(k, []).append(v)
            finished = (end < 0) & (terminated | truncated)
            end[finished] = t
            t += 1
        return self._build_episodes(obs_steps, act_steps, rew_steps, term_steps, trunc_steps, extra_steps, end, start)

    def _build_episodes(self, obs_steps, act_steps, rew_steps, term_steps, trunc_steps, extra_steps, end, start):
        """One numpy-form `SingleAgentEpisode` per sub-env from the (T, B, ...) step arrays."""

        def per_env(steps: list) -> np.ndarray:  # (T, B, ...) -> (B, T, ...), contiguous per sub-env
            return np.ascontiguousarray(np.swapaxes(np.stack(steps), 0, 1))

        obs, actions, rewards = per_env(obs_steps), per_env(act_steps), per_env(rew_steps)  # (B, T+1, obs), (B, T, ...)
        terminated, truncated = per_env(term_steps), per_env(trunc_steps)  # (B, T)
        extras = {k: per_env(v) for k, v in extra_steps.items()}
        seq_no = np.full(obs.shape[1] - 1, self._weights_seq_no, dtype=np.int64)
        stop = time.perf_counter()
        if self._episode_factory is None:
            self._episode_factory = EpisodeFactory(self.env.single_observation_space, self.env.single_action_space)
        episodes = []
        for i, e in enumerate(end.tolist()):
            n = e + 1  # episode length L
            extra = {k: v[i, :n] for k, v in extras.items()}
            if extra:
                extra[WEIGHTS_SEQ_NO] = seq_no[:n]
            episodes.append(self._episode_factory(
                obs[i, : n + 1], actions[i, :n], rewards[i, :n], extra, bool(terminated[i, e]), bool(truncated[i, e]),
                start, stop,
            ))
        return episodes


class EpisodeFactory:
    """Builds finished, numpy-form `SingleAgentEpisode`s from arrays (~10x faster than the constructor).

    The constructor re-derives the space structure of every buffer and validates the episode; here the structures
    are computed once and the attributes set directly. At construction the factory builds one episode both ways and
    falls back to the constructor if the attribute sets differ (a different RLlib version), so the fast path can only
    ever produce what the constructor would.
    """

    def __init__(self, observation_space, action_space) -> None:
        self.observation_space, self.action_space = observation_space, action_space
        self._obs_struct = get_base_struct_from_space(observation_space)
        self._act_struct = get_base_struct_from_space(action_space)
        probe = SingleAgentEpisode(observations=np.zeros((2, 1)), actions=np.zeros((1, 1)), rewards=np.zeros(1), infos=[{}, {}],
                                   extra_model_outputs={"a": np.zeros(1)}, observation_space=observation_space,
                                   action_space=action_space, len_lookback_buffer=0)
        fast = self._fast(np.zeros((2, 1)), np.zeros((1, 1)), np.zeros(1), {"a": np.zeros(1)}, False, False, 0.0, 0.0)
        pairs = [(probe, fast)] + [(getattr(probe, k), getattr(fast, k)) for k in ("observations", "actions", "rewards", "infos")]
        pairs.append((probe.extra_model_outputs["a"], fast.extra_model_outputs["a"]))
        self.use_fast = all(_attributes(a) == _attributes(b) for a, b in pairs)

    def __call__(self, obs, actions, rewards, extra, terminated, truncated, start, stop) -> SingleAgentEpisode:
        if self.use_fast:
            return self._fast(obs, actions, rewards, extra, terminated, truncated, start, stop)
        ep = SingleAgentEpisode(observations=obs, actions=actions, rewards=rewards, infos=[{} for _ in range(len(obs))],
                                terminated=terminated, truncated=truncated, extra_model_outputs=extra,
                                observation_space=self.observation_space, action_space=self.action_space, len_lookback_buffer=0)
        ep._start_time, ep._last_step_time = start, stop
        return ep

    @staticmethod
    def _buffer(data, space=None, struct=None) -> InfiniteLookbackBuffer:
        buf = InfiniteLookbackBuffer.__new__(InfiniteLookbackBuffer)
        buf.data, buf.lookback, buf.finalized = data, 0, not isinstance(data, list)
        buf._space, buf._space_struct = space, struct
        return buf

    def _fast(self, obs, actions, rewards, extra, terminated, truncated, start, stop) -> SingleAgentEpisode:
        from ray.rllib.env.single_agent_episode import _REWARDS_BOX_SPACE

        ep = SingleAgentEpisode.__new__(SingleAgentEpisode)
        ep.id_, ep.agent_id, ep.module_id, ep.multi_agent_episode_id = uuid.uuid4().hex, None, None, None
        ep.observations = self._buffer(obs, self.observation_space, self._obs_struct)
        ep._observation_space = self.observation_space
        ep.infos = self._buffer([{} for _ in range(len(obs))])
        ep.actions = self._buffer(actions, self.action_space, self._act_struct)
        ep._action_space = self.action_space
        ep.rewards = self._buffer(rewards, _REWARDS_BOX_SPACE, _REWARDS_STRUCT)
        ep.is_terminated, ep.is_truncated = terminated, truncated
        ep.extra_model_outputs = {k: self._buffer(v) for k, v in extra.items()}
        ep.t_started, ep.t = 0, len(rewards)
        ep._custom_data = {}
        ep._start_time, ep._last_step_time = start, stop
        ep._last_added_observation = ep._last_added_infos = None
        return ep


def _attributes(obj: Any) -> set[str]:
    """Names of the attributes an object has set (``__slots__`` over the MRO and ``__dict__``)."""
    names = set(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names |= {n for n in ([slots] if isinstance(slots, str) else slots) if hasattr(obj, n)}
    return names


def _rewards_struct():
    from ray.rllib.env.single_agent_episode import _REWARDS_BOX_SPACE

    return get_base_struct_from_space(_REWARDS_BOX_SPACE)


_REWARDS_STRUCT = _rewards_struct()
