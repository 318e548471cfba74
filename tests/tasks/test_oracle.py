"""The MLP oracle (`rlft.tasks.oracle`): it learns a known function, serves as a differentiable reward, and its
checkpoints round-trip through `rlft.checkpoint` while directories of the earlier layout still load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlft import checkpoint
from rlft.config import ConfigError
from rlft.rewards import build_reward, evaluate
from rlft.tasks.oracle import FORMAT, FORMAT_VERSION, MLPOracleReward, load_oracle, read_oracle_state, save_oracle, train_oracle

F64 = torch.float64


# -- the MLP oracle -------------------------------------------------------------------------------


def _labelled(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, size=(n, 2))
    clean = np.sin(x[:, 0]) + x[:, 1] ** 2
    return x, clean + 0.1 * rng.standard_normal(n), clean


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y, _ = _labelled(2000, 0)
    return train_oracle(x, y, hidden=(64, 64), epochs=150, lr=3e-3, seed=0, patience=20)


def test_oracle_learns_a_known_function(trained):
    oracle, info = trained
    assert info["val_corr"] > 0.95 and info["val_mse"] < 0.1
    x_test, _, clean = _labelled(1000, 1)  # held out, noise-free labels
    with torch.no_grad():
        pred = oracle(torch.as_tensor(x_test, dtype=torch.float32)).numpy()
    assert np.corrcoef(pred, clean)[0, 1] > 0.95


def test_oracle_round_trips_and_serves_as_a_differentiable_reward(trained, tmp_path):
    oracle, info = trained
    path = save_oracle(oracle, tmp_path / "oracle", metrics=info)
    save_oracle(oracle, path)  # overwriting an existing directory is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle"]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_oracle(path)(x), oracle(x), rtol=0, atol=0)
    reward = build_reward({"type": "mlp_oracle", "path": str(path)})
    assert isinstance(reward, MLPOracleReward) and not reward.has_true_reward
    xg = x.double().requires_grad_(True)
    r = evaluate(reward, xg)
    assert r.dtype == F64 and r.shape == (16,)
    (grad,) = torch.autograd.grad(r.sum(), xg)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    # with a genuine reward r* beside the oracle r
    both = build_reward({"type": "mlp_oracle", "path": str(path),
                         "true_reward": {"type": "quadratic", "center": [0.0, 0.0], "scale": 2.0}})
    assert both.has_true_reward
    torch.testing.assert_close(evaluate(both, x, true=True), -(x**2).sum(-1))
    with pytest.raises(ConfigError, match=r"reward.true_reward.type"):
        build_reward({"type": "mlp_oracle", "path": str(path), "true_reward": {"type": "nope"}})
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 2\) \(2 features\), got \(4, 3\)"):
        reward(torch.zeros(4, 3))


def test_oracle_trains_on_the_fly_from_an_npz_and_checks_its_arguments(tmp_path):
    x, y, _ = _labelled(300, 3)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    reward = build_reward({"type": "mlp_oracle", "data": str(tmp_path / "data.npz"), "hidden": [16], "epochs": 5})
    assert reward.train_metrics["epochs"] <= 5 and math.isfinite(reward.train_metrics["val_mse"])
    assert evaluate(reward, torch.zeros(3, 2)).shape == (3,)
    with pytest.raises(ValueError, match=r"exactly one of `path`"):
        MLPOracleReward()
    with pytest.raises(FileNotFoundError, match=r"must hold rlft.json \(or config.json, version 1\) and model.safetensors"):
        MLPOracleReward(path=str(tmp_path))
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(ValueError, match=r"must hold arrays 'x' and 'y'"):
        MLPOracleReward(data=str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match=r"x has 300 rows but y has 299 labels"):
        train_oracle(x, y[:-1])


def test_oracle_checkpoint_is_versioned_and_the_earlier_layout_still_loads(trained, tmp_path):
    oracle, info = trained
    path = save_oracle(oracle, tmp_path / "new", metrics=info)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "rlft.json"]
    state = read_oracle_state(path)
    assert state["format"] == FORMAT and state["version"] == FORMAT_VERSION and state["metrics"]["epochs"] == info["epochs"]
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = oracle(x)
        torch.testing.assert_close(load_oracle(path)(x), expected, rtol=0, atol=0)
    # version 1 (before rlft.checkpoint): {"oracle", "metrics"} in config.json, no format/version, same weights
    old = tmp_path / "old"
    old.mkdir()
    cfg = {"input_shape": [2], "hidden": list(oracle.config.hidden), "activation": oracle.config.activation}
    (old / "config.json").write_text(json.dumps({"oracle": cfg, "metrics": {"val_corr": 0.9}}))
    save_file({k: v.detach().contiguous() for k, v in oracle.state_dict().items()}, str(old / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_oracle(old)(x), expected, rtol=0, atol=0)
    assert read_oracle_state(old) == {"format": FORMAT, "version": 1, "oracle": cfg, "metrics": {"val_corr": 0.9}}
    # a newer version says which wrote it and what to do
    state_file = path / checkpoint.STATE_FILE
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "version": FORMAT_VERSION + 1}))
    with pytest.raises(checkpoint.CheckpointError, match=rf"written by {FORMAT} version {FORMAT_VERSION + 1}.*upgrade rlft"):
        load_oracle(path)
    # a config.json of something else is not mistaken for an oracle
    (old / "config.json").write_text(json.dumps({"arch": "mlp"}))
    with pytest.raises(checkpoint.CheckpointError, match=r"no 'oracle' entry"):
        load_oracle(old)
