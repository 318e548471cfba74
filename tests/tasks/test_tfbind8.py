"""TFBind8 task: encoding, the exact tilted target, the rewards and the model from YAML, every learner one iteration.

Tiny budgets throughout (a 20-step score network, a 3-epoch oracle, K = 4) in a temporary cache; the learning runs
that reproduce numbers are `rlft bench tfbind8` and the `slow` tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft.config import load_yaml, task_from_dict
from rlft.models import build_model
from rlft.rewards.base import build_reward, evaluate, registered_rewards
from rlft.tasks import tfbind8 as tb
from rlft.tasks.tfbind8_data import NUM_SEQUENCES, decode_index, encode_index, load_table

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "tune_configs" / "tfbind8.yaml"
TINY_MODEL = {"pretrain_steps": 20, "hidden": 16, "depth": 1}
TINY_ORACLE_EPOCHS = 3
#: held-out Pearson correlation of r with r* (SIX6, random half): 0.834 after 3 epochs, 0.851 with the defaults
TINY_HELDOUT_CORR = 0.80
DEFAULT_HELDOUT_CORR = 0.84


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("rlft_cache"))


@pytest.fixture(scope="module")
def task_data(cache) -> dict:
    """tune_configs/tfbind8.yaml with a tiny model, a tiny oracle and K = 4."""
    data = load_yaml(YAML)
    data.pop("run")
    data["model"].update(cache_dir=cache, **TINY_MODEL)
    data["reward"].update(cache_dir=cache, epochs=TINY_ORACLE_EPOCHS)
    data["num_steps"] = 4
    return data


@pytest.fixture(scope="module")
def built(task_data):
    task = task_from_dict(task_data)
    model = build_model(task.model, task.num_steps)
    return task, model, build_reward(task.reward, model=model)


def test_one_hot_decoding_round_trips():
    idx = torch.arange(NUM_SEQUENCES)
    x = tb.one_hot(decode_index(idx.numpy()))
    assert x.shape == (NUM_SEQUENCES, 8, 4) and torch.all(x.sum(-1) == 1)
    assert torch.equal(tb.sequence_index(x), idx)
    noisy = x + 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # argmax survives < 0.5 noise
    assert torch.equal(tb.decode(noisy), torch.as_tensor(decode_index(idx.numpy())))
    with pytest.raises(ValueError, match=r"\(B, 8, 4\)"):
        tb.decode(torch.zeros(3, 8))


def test_data_distribution_is_design_bench_rows():
    p = tb.data_distribution()
    assert p.shape == (NUM_SEQUENCES,) and abs(p.sum() - 1) < 1e-12
    tokens = decode_index(np.arange(NUM_SEQUENCES))
    palindromes = encode_index((3 - tokens)[:, ::-1]) == np.arange(NUM_SEQUENCES)
    assert palindromes.sum() == 256
    assert np.allclose(p[palindromes], 2 / 65_792) and np.allclose(p[~palindromes], 1 / 65_792)
    rows = tb.pretraining_data()
    assert rows.shape == (65_792, 8, 4)
    assert np.allclose(tb.empirical_distribution(torch.from_numpy(rows)), p)


def test_tilted_target_against_the_naive_formula():
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(NUM_SEQUENCES))
    base[:100] = 0.0
    base /= base.sum()
    r = rng.random(NUM_SEQUENCES)
    for alpha in (0.01, 0.3):
        p = tb.tilted_distribution(base, r, alpha)
        naive = base * np.exp(r / alpha) / (base * np.exp(r / alpha)).sum()
        assert np.allclose(p, naive, rtol=1e-10, atol=1e-300)
        j_star = tb.optimal_objective(base, r, alpha)
        assert abs(j_star - alpha * np.log((base * np.exp(r / alpha)).sum())) < 1e-10
        # Donsker-Varadhan at the optimum: J* = E_tar[r] - alpha KL(p_tar || base)
        assert abs(j_star - (p @ r - alpha * tb.kl_divergence(p, base))) < 1e-9
    assert tb.total_variation(base, base) == 0.0 and abs(tb.total_variation(np.eye(2)[0], np.eye(2)[1]) - 1) < 1e-15
    assert tb.tv_floor(p, 100_000) < tb.tv_floor(p, 1000)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        tb.tilted_distribution(base, r, 0.0)


def test_exact_reward_from_yaml_is_the_lookup_of_argmax(tmp_path):
    assert {"tfbind8_exact", "tfbind8_learned"} <= set(registered_rewards())
    reward = build_reward({"type": "tfbind8_exact"})
    table = load_table()
    idx = torch.randint(NUM_SEQUENCES, (64,), generator=torch.Generator().manual_seed(1))
    x = tb.one_hot(decode_index(idx.numpy())) + 0.1
    assert torch.equal(evaluate(reward, x), torch.from_numpy(table[idx.numpy()]))
    assert not reward.differentiable
    from tests.tasks.test_tfbind8_data import _write_fixture

    e = _write_fixture(tmp_path / "tf.txt", np.random.default_rng(2))  # another "transcription factor"
    other = build_reward({"type": "tfbind8_exact", "scores": str(tmp_path / "tf.txt")})
    expected = (e - e.min()) / (e.max() - e.min())
    assert np.allclose(other(x).numpy(), expected[idx.numpy()], atol=1e-6)


def test_learned_reward_from_yaml_trains_to_its_stated_heldout_correlation(built, cache):
    _, _, reward = built
    assert reward.metrics[tb.HELDOUT_CORR] > TINY_HELDOUT_CORR
    assert reward.metrics["train_size"] == reward.metrics["heldout_size"] == NUM_SEQUENCES // 2
    x = tb.all_sequences()[:256].clone().requires_grad_(True)
    r = evaluate(reward, x)
    assert torch.all((r > 0) & (r < 1))  # sigmoid output (ELEGANT Table 5)
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert grad.abs().sum() > 0
    assert torch.equal(evaluate(reward, x.detach(), true=True), torch.from_numpy(load_table()[:256]))
    # cached: a second reward with the same settings loads the same oracle without training
    again = build_reward({"type": "tfbind8_learned", "cache_dir": cache, "epochs": TINY_ORACLE_EPOCHS})
    assert again.metrics == reward.metrics and torch.equal(again(x.detach()), r.detach())


def test_shipped_yaml_files_validate():
    from rlft.run_config import load_experiment

    task, run, _ = load_experiment(YAML)
    assert task.model.type == "tfbind8" and task.reward["type"] == "tfbind8_learned" and task.alpha == 0.01
    task, _, grid = load_experiment(ROOT / "tune_configs" / "tfbind8_alpha_sweep.yaml")
    assert grid.params == {"alpha": [0.003, 0.01, 0.03, 0.1]} and task.learner["learn_init"] is False


def test_oracle_split_is_a_seeded_half_and_visible_split_is_the_lower_half():
    table = load_table()
    train, held = tb.oracle_split(table, tb.OracleSettings(seed=3))
    assert len(train) == len(held) == NUM_SEQUENCES // 2 and not np.intersect1d(train, held).size
    assert np.array_equal(train, tb.oracle_split(table, tb.OracleSettings(seed=3))[0])
    low, high = tb.oracle_split(table, tb.OracleSettings(split="visible"))
    assert table[low].max() <= table[high].min()
    with pytest.raises(ValueError, match="split"):
        tb.OracleSettings(split="top")


def test_model_from_yaml_is_built_once_into_the_cache_and_samples_sequences(built, task_data, monkeypatch):
    task, model, _ = built
    assert model.event_shape == (8, 4) and model.num_steps == 4
    from rlft.models import pretrain

    monkeypatch.setattr(pretrain, "train_scorenet", lambda *a, **k: pytest.fail("the cached model was retrained"))
    again = build_model(task.model, 7)
    assert again.num_steps == 7
    x = torch.randn(5, 8, 4)
    torch.testing.assert_close(again.score(0, x), model.score(0, x))


def _learner_specs() -> dict[str, dict]:
    tiny_init = {"value_starts": 8, "value_rollouts": 2, "value_iterations": 2, "init_iterations": 2, "init_steps": 2}
    common = {"batch_size": 4, "drift_iterations_per_train_iteration": 1, "hidden": 16, "depth": 1}
    return {
        "elegant": {"type": "elegant", **common, **tiny_init},
        "elegant_f": {"type": "elegant", **common, **tiny_init, "divergence": "forward_kl"},
        "no_kl": {"type": "no_kl", **common},
        "truncation": {"type": "truncation", **common, "truncation_steps": 1},
        "random_k": {"type": "random_k", **common},
    }


@pytest.mark.parametrize("name", list(_learner_specs()))
def test_every_differentiable_learner_runs_one_tiny_iteration_from_yaml(name, built, task_data):
    from rlft.learners import build_learner
    from rlft.sampling import sample

    _, model, reward = built
    data = copy.deepcopy(task_data)
    data["learner"] = _learner_specs()[name]
    learner = build_learner(task_from_dict(data), model, reward)
    metrics = learner.train_iteration()
    assert learner.iteration == 1 and learner.reward_queries >= 4
    assert all(np.isfinite(v) for v in metrics.values())
    out = sample(model, 16, control=learner.control(), init=learner.init_dist(), seed=0, progress=False)
    assert out.x.shape == (16, 8, 4) and torch.isfinite(out.kl).all()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ppo_kl_runs_one_tiny_iteration_from_yaml(built, task_data, ray_session):
    from rlft.learners import build_learner

    _, model, reward = built
    data = copy.deepcopy(task_data)
    data["learner"] = {"type": "ppo_kl", "episodes_per_iteration": 8, "num_envs": 8, "hidden": 16,
                       "save_rllib_checkpoint": False}
    learner = build_learner(task_from_dict(data), model, reward)
    try:
        learner.train_iteration()
        assert learner.reward_queries == 8
        assert learner.control()(0, torch.zeros(3, 8, 4), None).shape == (3, 8, 4)
    finally:
        learner.algo.stop()


def test_bench_tiny_run_reports_every_figure(built, cache, tmp_path):
    from rlft.benchmarks.tfbind8 import Budget, benchmark

    budget = Budget(num_steps=4, batch_size=4, updates=1, seeds=2, samples=64, value_starts=8, value_rollouts=2,
                    value_iterations=2, init_iterations=2, init_steps=2, classifier_steps=5)
    names = ["pretrained", "guidance", "guidance_tweedie", "no_kl", "elegant_drift", "elegant_f"]
    report = benchmark(names, budget, 0.01, None, cache, 30.0, "forward_kl", tmp_path,
                       model_options=TINY_MODEL, reward_options={"epochs": TINY_ORACLE_EPOCHS})
    assert set(report["learners"]) == set(names) and not report["failures"]
    for row in report["learners"].values():
        for key in ("reward", "true_reward", "kl", "diversity", "hamming_diversity", "distinct_fraction", "tv_to_target"):
            assert np.isfinite(row[key]), key
        assert row["num_seeds"] == 2 and np.isfinite(row["true_reward_se"])
    assert report["learners"]["pretrained"]["kl"] == 0.0
    target = report["target"]
    assert target["true_reward"] > target["data"]["true_reward"] and 0 < target["tv_floor"] < 1
    # the exact f-divergence optimum is reported, and it is a law over sequences
    assert target["target_f"]["divergence"] == "forward_kl" and 0 < target["target_f"]["tv_floor"] < 1
    assert Path(report["plots"]["histograms"]).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["task"]["alpha"] == 0.01


def test_sweep_results_become_r_star_against_alpha(built, tmp_path):
    from rlft.benchmarks.tfbind8 import sweep_report

    _, _, reward = built
    trials = [{"config": {"alpha": a}, "reward": 0.9, "true_reward": 0.8 + a, "kl": 1.0 / a} for a in (0.1, 0.01)]
    trials.append({"config": {"alpha": 0.03}, "status": "ERROR", "true_reward": None})
    (tmp_path / "rlft_results.json").write_text(json.dumps({"trials": trials}))
    report = sweep_report(tmp_path / "rlft_results.json", tmp_path, reward)
    assert [p["alpha"] for p in report["points"]] == [0.01, 0.1]  # sorted, the failed trial left out
    curve = report["target_curve"]
    assert curve[0]["reward"] > curve[-1]["reward"]  # the exact target's E[r] falls as alpha grows
    assert Path(report["plots"]["alpha_sweep"]).is_file()
    (tmp_path / "empty.json").write_text(json.dumps({"trials": []}))
    with pytest.raises(ValueError, match="no trials"):
        sweep_report(tmp_path / "empty.json", tmp_path, reward)


@pytest.mark.slow
def test_default_oracle_reaches_its_stated_heldout_correlation(tmp_path):
    _, metrics = tb.learned_oracle(cache_dir=tmp_path)
    assert metrics[tb.HELDOUT_CORR] > DEFAULT_HELDOUT_CORR
