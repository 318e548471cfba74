"""The ELEGANT learner and its baselines: pretrained at start, exact KL gradients, checkpoints, options."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.config import ConfigError, task_from_dict
from rlft.control.elegant import ElegantLearner
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.sampling import sample

#: budgets small enough for a unit test (the defaults are for real runs)
TINY = {
    "batch_size": 32, "drift_iterations_per_train_iteration": 2, "drift_iterations": 10, "hidden": 16, "depth": 2,
    "init_steps": 4, "init_iterations": 3, "init_batch_size": 32, "value_starts": 32, "value_rollouts": 2,
    "value_iterations": 3,
}


def make(learner: dict | None = None, alpha: float = 0.5, num_steps: int = 6, reward: dict | None = None, **model_keys):
    data = {
        "model": {"type": "gmm", "weights": [0.6, 0.4], "means": [[1.0, 0.5], [-1.0, -0.5]], "stds": [0.5, 0.4], **model_keys},
        "reward": reward or {"type": "quadratic", "center": [0.5, 1.0], "scale": 1.0},
        "alpha": alpha, "num_steps": num_steps, "seed": 3, "learner": learner or {"type": "elegant", **TINY},
    }
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps).to(dtype=torch.float64)
    return build_learner(task, model, build_reward(task.reward, model=model))


def test_untrained_learner_is_the_pretrained_sampler():
    learner = make()
    assert learner.init_dist() is None  # nu_ini until the initial control is trained
    tuned = sample(learner.model, 64, control=learner.control(), init=learner.init_dist(), seed=7, progress=False)
    pre = sample(learner.model, 64, seed=7, progress=False)
    assert torch.equal(tuned.x, pre.x)
    assert float(tuned.kl.abs().max()) == 0.0


def test_setup_fits_value_and_initial_control_and_counts_reward_queries():
    learner = make()
    metrics = learner.train_iteration()
    assert learner.iteration == 1 and learner.init_dist() is not None
    assert {"value_mse", "init_kl", "train_objective", "lr"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    # value data (32 starts x 2 rollouts) + 2 drift updates of 32
    assert learner.reward_queries == 32 * 2 + 2 * 32
    x0, kl = learner.init_dist().init_sample(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, 2) and kl.shape == (5,) and (kl >= 0).all()


def test_iteration_reports_the_mean_and_the_largest_gradient_norm():
    learner = make({"type": "elegant", **TINY, "drift_iterations_per_train_iteration": 4})
    norms = []
    update = learner.update

    def recorded():
        out = update()
        norms.append(out["grad_norm"])
        return out

    learner.update = recorded
    learner.train_iteration()
    metrics = learner.train_iteration()
    last = norms[-4:]
    assert len(norms) == 8 and len(set(last)) == 4
    assert metrics["grad_norm"] == pytest.approx(sum(last) / 4) and metrics["grad_norm_max"] == max(last)


def test_one_step_increases_the_objective():
    """A trivial task (linear reward): one Adam step along the exact gradient raises J (common random numbers)."""
    learner = make({"type": "elegant", **TINY, "learn_init": False, "batch_size": 512, "lr": 1e-2},
                   reward={"type": "linear", "direction": [1.0, 0.5]})

    def objective() -> float:
        out = sample(learner.model, 4000, control=learner.control(), seed=11, progress=False)
        return float((out.x @ torch.tensor([1.0, 0.5], dtype=torch.float64)).mean() - learner.task.alpha * out.kl.mean())

    before = objective()
    learner.update()
    after = objective()
    assert after > before + 1e-3


def test_kl_term_back_propagates_exactly_on_a_one_step_chain():
    """K = 1, g = constant bias theta: J = E[b.x_1] - alpha c^2 |theta|^2 / (2 s^2), so dJ/dtheta = c b - alpha c^2 theta / s^2."""
    learner = make({"type": "elegant", **TINY, "learn_init": False, "batch_size": 8, "pathwise_weight": 1.0}, alpha=0.7, num_steps=1,
                   reward={"type": "linear", "direction": [1.0, -2.0]})
    net = learner.drift_net.net
    theta = torch.tensor([0.3, -0.8], dtype=torch.float64)
    with torch.no_grad():
        net[-1].bias.copy_(theta)
    obj, _, kl = learner.drift_objective(8)
    obj.backward()
    c, s = learner.control().scales[0], learner.model.std(0)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(kl, torch.full((8,), c**2 * float(theta @ theta) / (2 * s**2), dtype=torch.float64))
    assert torch.allclose(net[-1].bias.grad, c * b - 0.7 * c**2 * theta / s**2, rtol=1e-10, atol=1e-12)


def test_drift_gradient_matches_finite_differences():
    learner = make({"type": "elegant", **TINY, "learn_init": False}, num_steps=3)
    torch.manual_seed(0)
    for p in learner.drift_net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seeds = [5, 6, 7]
    reward = learner.train_reward

    def J() -> torch.Tensor:
        x, kl = learner.drift_rollout(x0, seeds)
        return reward(x).mean() - learner.train_alpha * kl.mean()

    weight = learner.drift_net.net[0].weight
    J().backward()
    grad = weight.grad[1, 0].item()
    h = 1e-6
    with torch.no_grad():
        weight[1, 0] += h
        up = J().item()
        weight[1, 0] -= 2 * h
        down = J().item()
    assert abs((up - down) / (2 * h) - grad) < 1e-6 * max(1.0, abs(grad))


def test_checkpointing_gives_the_same_gradients_as_plain_backprop():
    grads = []
    for checkpointing in (False, True):
        learner = make({"type": "elegant", **TINY, "learn_init": False, "checkpointing": checkpointing, "segment_steps": 2})
        torch.manual_seed(0)
        for p in learner.drift_net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        obj, _, _ = learner.drift_objective(16)
        obj.backward()
        grads.append(torch.cat([p.grad.flatten() for p in learner.drift_net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_checkpoint_restores_the_sampler_and_resume_continues(tmp_path):
    a = make()
    a.train_iteration()
    a.save_checkpoint(str(tmp_path))
    b = make()
    b.load_checkpoint(str(tmp_path))
    assert b.iteration == 1 and b.reward_queries == a.reward_queries and b.drift_updates == a.drift_updates
    sa = sample(a.model, 50, control=a.control(), init=a.init_dist(), seed=4, progress=False)
    sb = sample(b.model, 50, control=b.control(), init=b.init_dist(), seed=4, progress=False)
    assert torch.equal(sa.x, sb.x) and torch.equal(sa.kl, sb.kl)
    # resuming continues the same run: the optimiser moments and the RNG come back too
    ma, mb = a.train_iteration(), b.train_iteration()
    assert b.iteration == 2 and ma == mb
    for pa, pb in zip(a.drift_net.parameters(), b.drift_net.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "learner",
    [
        {"type": "no_kl"},
        {"type": "truncation", "truncation_steps": 2},
        {"type": "random_k"},
        {"type": "elegant", "learn_init": False},
        {"type": "elegant", "divergence": "gamma:0.5"},
        {"type": "elegant", "divergence": "chi2", "checkpointing": True},
        {"type": "truncation", "kl_penalty": True},
    ],
)
def test_each_learner_runs_one_iteration_with_its_own_objective(learner):
    """One iteration of each learner: the reported training objective is its own reward minus its own alpha times
    the path KL, the reward queries add up, the control moved away from the pretrained model, and the evaluation
    reports J at the task's alpha (not the training alpha)."""
    lrn = make({**TINY, **learner})
    params = [p.detach().clone() for p in lrn._drift_params]
    metrics = lrn.train_iteration()
    assert lrn.iteration == 1 and lrn.drift_updates == TINY["drift_iterations_per_train_iteration"]
    kl_on = learner.get("kl_penalty", learner["type"] == "elegant")
    assert (lrn.train_alpha > 0) == kl_on
    f_route = learner.get("divergence", "kl") != "kl"
    assert lrn.train_alpha == (1.0 if f_route else 0.5 if kl_on else 0.0)  # TANG: the f-reward runs at alpha = 1
    assert metrics["train_objective"] == pytest.approx(metrics["train_reward"] - lrn.train_alpha * metrics["train_kl"], rel=1e-9)
    learns_init = learner["type"] == "elegant" and learner.get("learn_init", True)
    assert (lrn.init_dist() is not None) == learns_init
    from rlft.control.elegant import LAMBDA_SAMPLES

    value_queries = TINY["value_starts"] * TINY["value_rollouts"] if learns_init else 0
    assert lrn.reward_queries == value_queries + (LAMBDA_SAMPLES if f_route else 0) + 2 * TINY["batch_size"]
    assert any(not torch.equal(a, b) for a, b in zip(params, lrn._drift_params))
    report = lrn.evaluate(num_samples=64)
    assert report["num_samples"] == 64
    assert report["objective"] == pytest.approx(report["reward"] - 0.5 * report["kl"], rel=1e-9)


def test_no_kl_runs_at_alpha_zero():
    lrn = make({"type": "no_kl", **TINY}, alpha=0.0)
    lrn.train_iteration()
    assert lrn.train_alpha == 0.0


@pytest.mark.parametrize("learner, lr, clip", [
    ({"type": "elegant"}, 5e-3, 0.0), ({"type": "no_kl"}, 1e-3, 1.0), ({"type": "truncation"}, 1e-3, 1.0),
    ({"type": "random_k", "kl_penalty": True}, 5e-3, 0.0), ({"type": "no_kl", "lr": 2e-3, "max_grad_norm": 0.0}, 2e-3, 0.0),
])
def test_step_size_defaults_follow_the_kl_term(learner, lr, clip):
    """Without the KL term nothing bounds the control, so those learners default to a smaller, clipped step."""
    lrn = make({**learner, **TINY})
    assert lrn.options.lr == lr and lrn.options.max_grad_norm == clip
    assert lrn.drift_opt.param_groups[0]["lr"] == lr


def _drift_grad(weight: float, batch: int, num_steps: int, checkpointing: bool = False):
    """The drift gradient and objective of one batch (same task seed, so the same x0 and noise for every weight)."""
    lrn = make({"type": "elegant", **TINY, "learn_init": False, "pathwise_weight": weight, "checkpointing": checkpointing,
                "segment_steps": 2}, num_steps=num_steps, reward={"type": "linear", "direction": [1.0, -0.5]})
    obj, _, _ = lrn.drift_objective(batch)
    lrn.drift_opt.zero_grad()
    obj.backward()
    return torch.cat([p.grad.flatten() for p in lrn._drift_params]), float(obj.detach())


def test_likelihood_ratio_gradient_matches_the_pathwise_one_on_average():
    """Both estimators are unbiased for the same gradient: at w = 0 (likelihood ratio only) and w = 1 (pathwise)
    they agree within Monte-Carlo error on a large batch; the objective's value does not depend on w."""
    pathwise, j1 = _drift_grad(1.0, 100_000, 2)
    ratio, j0 = _drift_grad(0.0, 100_000, 2)
    assert j0 == pytest.approx(j1, rel=1e-12)
    assert torch.linalg.vector_norm(pathwise) > 0.1
    assert torch.linalg.vector_norm(ratio - pathwise) < 0.05 * torch.linalg.vector_norm(pathwise)


def test_pathwise_weight_mixes_the_two_gradients_linearly_also_with_checkpointing():
    g1, _ = _drift_grad(1.0, 256, 6, checkpointing=True)
    g0, _ = _drift_grad(0.0, 256, 6, checkpointing=True)
    g_half, _ = _drift_grad(0.3, 256, 6, checkpointing=True)
    assert not torch.allclose(g0, g1, rtol=0.1)  # a small batch: the two estimates differ
    assert torch.allclose(g_half, 0.3 * g1 + 0.7 * g0, rtol=1e-9, atol=1e-12)
    plain, _ = _drift_grad(0.3, 256, 6)
    assert torch.allclose(plain, g_half, rtol=1e-9, atol=1e-12)  # windows recomputed in the backward pass: same result


@pytest.mark.parametrize("learner, weight, updates, per_call", [
    ({"type": "elegant"}, 0.25, 1200, 6),
    ({"type": "elegant", "learn_init": False}, 0.25, 1200, 6),
    ({"type": "elegant", "pathwise_weight": 1.0}, 1.0, 2000, 10),  # cheaper updates: more of them
    ({"type": "elegant", "drift_iterations": 300}, 0.25, 300, 2),  # ceil(300 / run.iterations 200)
    ({"type": "no_kl"}, 1.0, 2000, 10),
    ({"type": "truncation"}, 1.0, 2000, 10),
    ({"type": "random_k"}, 1.0, 2000, 10),
])
def test_per_type_defaults_of_the_gradient_estimator_and_the_schedule(learner, weight, updates, per_call):
    o = make(learner).options
    assert (o.pathwise_weight, o.drift_iterations, o.drift_iterations_per_train_iteration) == (weight, updates, per_call)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward pass while fn() runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_checkpointing_also_bounds_the_likelihood_ratio_pass():
    """The second pass over the detached path keeps one window's activations, like the rollout, and gives the
    same log-density and gradient as the pass over all steps at once."""
    lrns = [make({"type": "elegant", **TINY, "learn_init": False, "checkpointing": c, "segment_steps": 5, "hidden": 64}, num_steps=40)
            for c in (False, True)]
    for lrn in lrns:
        with torch.no_grad():
            lrns[0].drift_net.net[-1].weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
        lrn.drift_net.load_state_dict(lrns[0].drift_net.state_dict())
    _, _, path = lrns[0].drift_rollout(lrns[0].model.prior_sample(64, torch.Generator().manual_seed(1)), [5, 6, 7, 8, 9, 10, 11, 12], keep_path=True)
    plain, windowed = (_saved_bytes(lambda lrn=lrn: lrn.path_log_prob(path)) for lrn in lrns)
    assert windowed < plain / 4  # 8 windows of 5 steps; the stored paths are shared
    grads, values = [], []
    for lrn in lrns:
        lrn.drift_opt.zero_grad()
        logp = lrn.path_log_prob(path)
        logp.sum().backward()
        values.append(logp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lrn._drift_params]))
    assert torch.allclose(values[0], values[1], rtol=1e-12) and torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_truncation_and_random_k_cut_the_gradient():
    lrn = make({"type": "truncation", **TINY, "truncation_steps": 2, "segment_steps": 4})
    assert lrn.grad_start() == 4 and lrn.windows(4) == [(0, 4), (4, 6)]
    lrn = make({"type": "random_k", **TINY})
    starts = {lrn.grad_start() for _ in range(200)}
    assert starts == set(range(6))


@pytest.mark.parametrize(
    "learner, alpha, message",
    [
        ({"type": "elegant", "lr": -1.0}, 0.5, "learner.lr must be"),
        ({"type": "elegant", "batch_size": 0}, 0.5, "learner.batch_size"),
        ({"type": "elegant", "bogus": 1}, 0.5, "learner.bogus is not a known key"),
        ({"type": "elegant", "hidden": "big"}, 0.5, "learner.hidden must be an integer"),
        ({"type": "elegant", "divergence": "nope"}, 0.5, "learner.divergence"),
        ({"type": "no_kl", "kl_penalty": True}, 0.5, "kl_penalty must be false"),
        ({"type": "no_kl", "learn_init": True}, 0.5, "learn_init needs the KL term"),
        ({"type": "truncation", "truncation_steps": 0}, 0.5, "truncation_steps must be an integer >= 1"),
        ({"type": "truncation", "kl_penalty": True}, 0.0, "alpha must be"),
        ({"type": "elegant", "lr": 1e-3, "lr_final": 1e-2}, 0.5, "lr_final must be <= learner.lr"),
        ({"type": "elegant", "pathwise_weight": 1.5}, 0.5, r"pathwise_weight must be in \[0, 1\]"),
        ({"type": "truncation", "pathwise_weight": 0.5}, 0.5, "pathwise_weight < 1 is for types elegant and no_kl"),
    ],
)
def test_bad_options_raise_clear_errors(learner, alpha, message):
    with pytest.raises(ConfigError, match=message):
        make(learner, alpha=alpha)


def test_checkpoint_of_other_options_is_refused(tmp_path):
    a = make()
    a.save_checkpoint(str(tmp_path))
    b = make({"type": "elegant", **TINY, "hidden": 8})
    with pytest.raises(ValueError, match="learner.hidden"):
        b.load_checkpoint(str(tmp_path))
    c = make({"type": "no_kl", **TINY})
    with pytest.raises(ValueError, match="'elegant'"):
        c.load_checkpoint(str(tmp_path))


def test_registry_names_build_their_learner_classes():
    from rlft.control.baselines import NoKLLearner, RandomKLearner, TruncationLearner

    classes = {"elegant": ElegantLearner, "no_kl": NoKLLearner, "truncation": TruncationLearner, "random_k": RandomKLearner}
    for name, cls in classes.items():
        lrn = make({"type": name, **TINY})
        assert type(lrn) is cls and lrn.name == name and isinstance(lrn.options, cls.Options)


def test_options_are_declared_once_and_keyword_overrides_parse_like_yaml():
    """The constructor takes the parsed Options (no second parameter list); Python keyword overrides go through the
    same parser as YAML, with the same path-naming errors."""
    import inspect

    from rlft.control.elegant import ElegantOptions

    assert set(inspect.signature(ElegantLearner.__init__).parameters) == {"self", "task", "model", "reward", "options", "overrides"}
    lrn = make()
    again = ElegantLearner(lrn.task, lrn.model, lrn.reward, hidden=8, learn_init=False)
    assert again.options.hidden == 8 and again.options.learn_init is False and again.options.depth == 3  # the rest: defaults
    with pytest.raises(ConfigError, match="learner.hidden must be an integer"):
        ElegantLearner(lrn.task, lrn.model, lrn.reward, hidden="big")
    with pytest.raises(ConfigError, match="learner.lr must be a finite number > 0"):
        ElegantOptions(lr=-1.0)  # model-independent checks run when the options are parsed, before Ray starts


def test_options_are_checked_before_a_model_exists():
    from rlft.learners import check_learner_spec

    with pytest.raises(ConfigError, match="kl_penalty must be false"):
        check_learner_spec({"type": "no_kl", "kl_penalty": True})
    with pytest.raises(ConfigError, match="learner.truncation_steps is not a known key"):
        check_learner_spec({"type": "random_k", "truncation_steps": 3})
    cls, options = check_learner_spec({"type": "truncation"})
    assert (options.learn_init, options.kl_penalty, options.truncation_steps) == (False, False, 10)


def test_derived_sizes_follow_the_runners_iterations():
    """drift_iterations_per_train_iteration None = ceil(drift_iterations / run.iterations): the run performs the
    whole schedule; the derived sizes are one dict."""
    data = {
        "model": {"type": "gmm", "weights": [0.6, 0.4], "means": [[1.0, 0.5], [-1.0, -0.5]], "stds": [0.5, 0.4]},
        "reward": {"type": "quadratic", "center": [0.5, 1.0], "scale": 1.0}, "alpha": 0.5, "num_steps": 6, "seed": 3,
    }
    for run, per_call in ((None, 6), ({"iterations": 100}, 12), ({"iterations": 7}, 172)):
        task = task_from_dict({**data, "learner": {"type": "elegant", "learn_init": False}, **({"run": run} if run else {})})
        model = build_model(task.model, task.num_steps)
        lrn = build_learner(task, model, build_reward(task.reward, model=model))
        d = lrn.derived()
        assert d["drift_iterations_per_train_iteration"] == lrn.options.drift_iterations_per_train_iteration == per_call
        assert d["run_iterations"] * per_call >= d["drift_iterations"] == 1200
        assert (d["lr"], d["pathwise_weight"], d["windows"], d["segment_steps"]) == (5e-3, 0.25, 2, 3)


def _old_layout(tmp_path, learner):
    """A checkpoint in the layout rlft wrote before rlft.checkpoint (format rlft-elegant version 1): learner.json with
    these keys beside control/init/value/optim safetensors (tensors written by safetensors directly, no metadata)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    def tensors(module_or_dict):
        sd = module_or_dict if isinstance(module_or_dict, dict) else module_or_dict.state_dict()
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    out = tmp_path / "old"
    out.mkdir()
    save_file(tensors(learner.drift_net), str(out / "control.safetensors"))
    save_file(tensors(learner.init_control.net), str(out / "init.safetensors"))
    save_file(tensors(learner.value_net), str(out / "value.safetensors"))
    sd = learner.drift_opt.state_dict()
    optim = {f"drift.{i}.{k}": torch.as_tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    optim["rng_state"] = learner._rng.get_state()
    save_file(tensors(optim), str(out / "optim.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    state = {
        "format": "rlft-elegant", "version": 1, "type": "elegant", "options": {**dataclasses.asdict(learner.options), "truncation_steps": 10},
        "iteration": learner.iteration, "reward_queries": learner.reward_queries, "drift_updates": learner.drift_updates,
        "setup_done": learner.setup_done, "lambda": None, "drift_param_groups": groups, "task": dataclasses.asdict(learner.task),
    }
    (out / "learner.json").write_text(json.dumps(state, indent=2, default=str))
    return out


def test_a_checkpoint_of_the_old_layout_still_loads_and_resumes(tmp_path):
    a = make()
    a.train_iteration()
    old = _old_layout(tmp_path, a)
    b = make()
    b.load_checkpoint(str(old))
    assert (b.iteration, b.reward_queries, b.drift_updates) == (a.iteration, a.reward_queries, a.drift_updates)
    sa = sample(a.model, 50, control=a.control(), init=a.init_dist(), seed=4, progress=False)
    sb = sample(b.model, 50, control=b.control(), init=b.init_dist(), seed=4, progress=False)
    assert torch.equal(sa.x, sb.x)
    assert a.train_iteration() == b.train_iteration()  # optimiser moments and RNG came back too
    b.save_checkpoint(str(tmp_path / "new"))  # written again in today's layout (rlft.json, version 2)
    import json

    assert json.loads((tmp_path / "new" / "rlft.json").read_text())["version"] == 2


def test_a_checkpoint_of_a_newer_version_says_which_wrote_it(tmp_path):
    import json

    from rlft.checkpoint import CheckpointError

    a = make()
    a.save_checkpoint(str(tmp_path))
    state = json.loads((tmp_path / "rlft.json").read_text())
    (tmp_path / "rlft.json").write_text(json.dumps({**state, "version": 9}))
    with pytest.raises(CheckpointError, match="rlft-elegant version 9.*up to 2.*upgrade rlft"):
        make().load_checkpoint(str(tmp_path))


def test_memory_probe_runs_in_process():
    from rlft.benchmarks.elegant import memory_probe

    out = memory_probe(10, True, 4, 1, 0.0)
    assert out["ok"] and out["peak_rss_mb"] > 0 and out["wall_s_per_update"] > 0


def test_bench_run_that_raises_comes_back_as_an_error_row():
    """One diverging baseline must not lose the other runs' figures: its row carries the error instead."""
    from rlft.benchmarks.elegant import _train_row, gmm_task

    row = _train_row((gmm_task("2d", 1.0), {"type": "elegant", "batch_size": -3}, 1, 10, False, "broken", 1))
    assert row["label"] == "broken" and row["alpha"] == 1.0
    assert "batch_size" in row["error"]


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    from rlft.cli import main

    assert main(["bench", "elegant", "--quick", "--sections", "baselines", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "elegant_samples.png").is_file()


@pytest.mark.slow
def test_default_elegant_closes_the_gap_on_the_2d_mixture():
    """`learner: {type: elegant}` with the runner's default 200 iterations: >= 90 % of the gap to J* at alpha = 1."""
    from rlft.benchmarks.elegant import gmm_task, train_run

    row = train_run(gmm_task("2d", 1.0), {"type": "elegant"}, 200, 2000, False, "2d")
    assert row["gap_closure"] >= 0.9
    assert row["energy_distance"] <= 2 * row["energy_distance_floor"]


def test_bench_gmm_runs_each_seed_and_summarises_them(tmp_path):
    """--tasks/--alphas/--seeds: one row per seed with that seed, and a summary whose ratios are the rows' ED/floor."""
    import json

    from rlft.cli import main

    args = ["bench", "elegant", "--quick", "--sections", "gmm", "--tasks", "2d", "--alphas", "1", "--seeds", "5", "6",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["gmm"]
    assert [(r["task"], r["alpha"], r["seed"]) for r in rows] == [("2d", 1.0, 5), ("2d", 1.0, 6)]
    assert rows[0]["energy_distance"] != rows[1]["energy_distance"]  # the seed reached the training and the evaluation
    (summary,) = res["gmm_seeds"]
    ratios = [r["energy_distance"] / r["energy_distance_floor"] for r in rows]
    assert summary["seeds"] == [5, 6] and summary["ratios"] == pytest.approx(ratios)
    assert summary["ratio_max"] == pytest.approx(max(ratios)) and summary["within_2x"] == sum(x <= 2 for x in ratios)
    assert summary["gap_min"] == pytest.approx(min(r["gap_closure"] for r in rows))


def test_bench_gmm_refuses_a_non_positive_alpha(tmp_path, capsys):
    from rlft.cli import main

    assert main(["bench", "elegant", "--quick", "--sections", "gmm", "--alphas", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "every alpha must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_f_target_floor_matches_an_exact_sampler_and_flags_the_kl_target():
    """The chi2 optimum's figures: an independent exact draw scores near the (mean) floor; the KL target does not."""
    from rlft.benchmarks.elegant import F_TARGET_PROPOSALS, f_target_figures
    from rlft.divergences import get_divergence, solve_lambda

    learner = make(alpha=1.0, reward={"type": "quadratic", "center": [1.5, 1.5], "scale": 2.0})
    model, reward, div = learner.model, learner.reward, get_divergence("chi2")
    g = torch.Generator().manual_seed(99)
    proposals = model.data.sample(F_TARGET_PROPOSALS, g)
    r = reward(proposals).double()
    w = div.f_prime_inv((r - solve_lambda(r, 1.0, div)) / 1.0).clamp_min(0.0)
    exact = proposals[torch.multinomial(w, 2000, replacement=True, generator=g)]
    kl_target = model.exact_target(reward, 1.0).mixture.sample(2000, g)
    same = f_target_figures(model, reward, 1.0, "chi2", exact, seed=5)
    other = f_target_figures(model, reward, 1.0, "chi2", kl_target, seed=5)
    assert same["energy_distance_f_floor"] == other["energy_distance_f_floor"] > 0  # the floor does not depend on x
    assert 0.5 < same["energy_distance_f"] / same["energy_distance_f_floor"] < 2.0
    assert other["energy_distance_f"] > 5 * other["energy_distance_f_floor"]


def test_path_log_prob_in_one_network_call_equals_the_step_loop():
    lrn = make({"type": "elegant", **TINY, "learn_init": False})
    with torch.no_grad():
        for p in lrn.drift_net.parameters():
            p.normal_(0, 0.3)  # a non-zero control
    x0 = lrn.model.prior_sample(7, torch.Generator().manual_seed(1))
    _, _, path = lrn.drift_rollout(x0, [5] * len(lrn.windows()), keep_path=True)
    naive = torch.zeros(7, dtype=path.dtype)
    for k in range(lrn.model.num_steps):
        resid = path[:, k + 1] - lrn.model.mean(k, path[:, k]) - lrn.control()(k, path[:, k])
        naive -= resid.pow(2).sum(1) / (2 * lrn.model.std(k) ** 2)
    assert path.shape == (7, lrn.model.num_steps + 1, 2)
    assert torch.allclose(lrn.path_log_prob(path), naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gmm_args, reused", [
    (["--tasks", "2d", "--alphas", "1"], True),  # the baselines' ELEGANT row is the gmm section's run of that cell
    (["--tasks", "8d", "--alphas", "1"], False),  # no such cell: ELEGANT is trained with the baselines
    (["--tasks", "2d", "--alphas", "1", "--seeds", "5"], False),  # another seed is another run, not the baseline's
])
def test_bench_baselines_rows_keep_their_labels_whatever_gmm_cells_run(tmp_path, monkeypatch, gmm_args, reused):
    """Wiring only (training replaced by echo rows): each baselines row is the run of the learner its label names."""
    from rlft.benchmarks import elegant as bench
    from rlft.cli import main

    submitted = []

    def echo(jobs, args):
        submitted.extend(label for _, _, label in jobs)
        return [{"label": label, "learner": learner, "seed": task["seed"], "alpha": task["alpha"], "energy_distance": 1.0,
                 "energy_distance_floor": 1.0, "gap_closure": 1.0} for task, learner, label in jobs]

    monkeypatch.setattr(bench, "run_jobs", echo)
    monkeypatch.setattr(bench, "make_plots", lambda results, out: {})
    monkeypatch.setattr(bench, "print_tables", lambda results: None)
    assert main(["bench", "elegant", "--sections", "gmm", "baselines", *gmm_args, "--out", str(tmp_path), "--no-progress"]) == 0
    import json

    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["baselines"]
    assert [r["label"] for r in rows] == [label for label, _ in bench.BASELINES]
    assert [r["learner"] for r in rows] == [learner for _, learner in bench.BASELINES]
    assert all(r["seed"] == bench.BASELINE_CELL[2] for r in rows)
    assert (rows[0]["task"], rows[0]["alpha"]) == ("2d", 1.0)
    assert ("elegant" in submitted) == (not reused)  # trained once: by the gmm section or with the baselines


def test_bench_lists_a_failed_run_once_and_exits_nonzero(tmp_path, monkeypatch):
    """The gmm section's 2-D alpha = 1 run doubles as the baselines' ELEGANT row: its failure is one failure."""
    from rlft.benchmarks import elegant as bench
    from rlft.cli import main

    def echo(jobs, args):
        return [{"label": label, "error": "boom"} if i == 0 else
                {"label": label, "energy_distance": 1.0, "energy_distance_floor": 1.0, "gap_closure": 1.0}
                for i, (task, learner, label) in enumerate(jobs)]

    monkeypatch.setattr(bench, "run_jobs", echo)
    monkeypatch.setattr(bench, "make_plots", lambda results, out: {})
    monkeypatch.setattr(bench, "print_tables", lambda results: None)
    args = ["bench", "elegant", "--sections", "gmm", "baselines", "--tasks", "2d", "--alphas", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 1
    import json

    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in res["failures"]] == ["2d alpha=1.0 seed=0"]
    assert res["gmm"] == [] and [r["label"] for r in res["baselines"]] == [label for label, _ in bench.BASELINES][1:]


def test_a_failed_checkpoint_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    import rlft.checkpoint as module

    learner = make()
    learner.train_iteration()
    learner.save_checkpoint(str(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert not any(name.startswith(".") for name in before)

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the previous checkpoint stays, no temporaries


# -- drift_solver: adjoint_matching ------------------------------------------------------------------------------


def _surrogate_grads(learner) -> list[torch.Tensor]:
    surrogate, metrics = learner.objective()
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(learner._drift_params, torch.autograd.grad(surrogate, learner._drift_params, allow_unused=True))]


def test_the_adjoint_matching_drift_solver_is_adjoint_matchings_update_from_elegants_initial_law():
    """Before setup (x_0 from the prior) one update of ELEGANT with drift_solver adjoint_matching is type
    adjoint_matching's update (same control, same noise); after setup its x_0 are the learned initial law's."""
    keys = {k: v for k, v in TINY.items() if not k.startswith(("init_", "value_"))}
    ours = make({"type": "elegant", **TINY, "drift_solver": "adjoint_matching"})
    theirs = make({"type": "adjoint_matching", **keys})
    assert (ours.options.lr, ours.options.max_grad_norm) == (3e-3, 0.0)
    with torch.no_grad():  # a non-zero control (the network starts at zero), the same in both
        for p, q in zip(ours._drift_params, theirs._drift_params):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
            q.copy_(p)
    ga, gb = _surrogate_grads(ours), _surrogate_grads(theirs)
    assert max(float(g.abs().max()) for g in ga) > 1e-3
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # after setup: x_0 from nu_hat, drawn with the update's generator
    ours.train_iteration()
    state = ours._rng.get_state()
    seen = {}
    rollout = ours.drift_rollout

    def spy(x0, *args, **kwargs):
        seen["x0"] = x0
        return rollout(x0, *args, **kwargs)

    ours.drift_rollout = spy
    metrics = ours.update()
    rng = torch.Generator().set_state(state)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
    expected = ours.init_dist().init_sample(ours.options.batch_size, gen)[0]
    torch.testing.assert_close(seen["x0"], expected)
    assert "regression_loss" in metrics and math.isfinite(metrics["grad_norm"])


def test_the_adjoint_matching_drift_solver_refuses_a_biased_setting():
    with pytest.raises(ConfigError, match="learner.drift_solver must be one of"):
        make({"type": "elegant", "drift_solver": "sde"})
    with pytest.raises(ConfigError, match="needs the KL term"):
        make({"type": "no_kl", "drift_solver": "adjoint_matching", "learn_init": False})
    # a chain that remembers x_0 (beta_max = 1: a(T)^2 = 0.58) needs the learned initial law
    with pytest.raises(ConfigError, match="learn_init: true"):
        make({"type": "elegant", **TINY, "drift_solver": "adjoint_matching", "learn_init": False}, num_steps=20, beta_max=1.0)
    make({"type": "elegant", **TINY, "drift_solver": "adjoint_matching"}, num_steps=20, beta_max=1.0)
    assert make({"type": "elegant", "drift_solver": "adjoint_matching"}).options.drift_iterations == 800
