"""The digits task: the data and the digit-classifier reward (accuracy, shapes, gradients, the cache, loading,
versioned weights, and its errors)."""

from __future__ import annotations

import pytest
import torch

from rlft.config import ConfigError
from rlft.rewards import build_reward, evaluate, registered_rewards
from rlft.tasks.digits import (
    NOT_A_DIGIT,
    ClassifierTraining,
    DigitClassifierReward,
    _cache_file,
    _split,
    accuracy,
    load_classifier,
    load_digits_data,
    noise_images,
    save_classifier,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache directory for this module; the classifier is trained once, into it."""
    directory = tmp_path_factory.mktemp("rlft_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLFT_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="module")
def reward(cache) -> DigitClassifierReward:
    with torch.no_grad():  # training into the empty cache must work inside an evaluation's no_grad too
        return DigitClassifierReward(target=3)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def test_held_out_accuracy_and_rejection_of_noise(reward, digits):
    images, labels = digits
    _, test_idx = _split(images.shape[0], ClassifierTraining().holdout, ClassifierTraining().seed)
    acc = accuracy(reward.net, images[test_idx], labels[test_idx])
    assert acc > 0.9 and acc == pytest.approx(reward.holdout_accuracy)
    noise = noise_images(200, torch.Generator().manual_seed(7))
    assert (reward.logits(noise).argmax(-1) == NOT_A_DIGIT).float().mean() > 0.9
    # r is higher on real 3s than on the other digits, and on digits than on noise
    r = reward(images)
    assert r[labels == 3].mean() > r[labels != 3].mean() + 3.0
    assert reward(noise).mean() < r[labels == 3].mean() - 5.0


def test_reward_shape_values_and_gradients(reward, digits):
    x = digits[0][:16].clone().double().requires_grad_(True)
    r = evaluate(reward, x)
    assert r.shape == (16,) and r.dtype == torch.float64 and (r <= 0).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # flattened input gives the same values; r is the log-probability of the target among 11 classes
    flat = digits[0][:16].reshape(16, 64)
    torch.testing.assert_close(reward(flat), r.detach().float())
    logits = reward.logits(flat)
    assert logits.shape == (16, 11)
    torch.testing.assert_close(reward(flat), logits.log_softmax(-1)[:, 3])


def test_cache_is_reused_and_written_atomically(cache, reward):
    path = _cache_file(ClassifierTraining())
    assert path.parent == cache and path.is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    stamp = path.stat().st_mtime_ns
    again = DigitClassifierReward(target=5)  # loads, does not retrain
    assert path.stat().st_mtime_ns == stamp
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    assert torch.equal(again.logits(x), reward.logits(x))
    assert again.holdout_accuracy == pytest.approx(reward.holdout_accuracy)


def test_weights_from_a_path(tmp_path, reward, digits):
    path = save_classifier(reward.net, tmp_path / "clf.safetensors", {"holdout_accuracy": "0.5"})
    loaded = DigitClassifierReward(target=3, path=str(path))
    assert torch.equal(loaded(digits[0][:8]), reward(digits[0][:8])) and loaded.holdout_accuracy == 0.5
    with pytest.raises(FileNotFoundError, match="do not exist; omit `path`"):
        DigitClassifierReward(target=3, path=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("target", [10, -1, "3", True, 2.0])
def test_invalid_target_raises(cache, target):
    with pytest.raises(ValueError, match=r"target must be a digit 0\.\.9"):
        DigitClassifierReward(target=target)


def test_wrong_input_shape_raises(reward):
    with pytest.raises(ValueError, match=r"needs x of shape \(B, 1, 8, 8\) or \(B, 64\) \(got \(2, 3, 8, 8\)\)"):
        reward(torch.zeros(2, 3, 8, 8))


def test_registered_and_buildable_from_yaml(cache):
    assert "digit_classifier" in registered_rewards()
    r = build_reward({"type": "digit_classifier", "target": 7})
    assert isinstance(r, DigitClassifierReward) and r.target == 7 and r.name == "digit_classifier"
    with pytest.raises(ConfigError, match="reward.colour"):
        build_reward({"type": "digit_classifier", "colour": 1})


def test_weights_round_trip_and_files_of_other_versions_say_what_to_do(tmp_path, reward, digits):
    from safetensors.torch import save_file

    from rlft import checkpoint
    from rlft.tasks.digits import FORMAT, FORMAT_VERSION

    path = save_classifier(reward.net, tmp_path / "clf.safetensors", {"holdout_accuracy": "0.5"})
    net, meta = load_classifier(path)
    assert meta["format"] == FORMAT and meta["version"] == str(FORMAT_VERSION) and meta["holdout_accuracy"] == "0.5"
    for name, value in reward.net.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    # files written before rlft.checkpoint carry the same metadata (format, version 2) and load unchanged
    state = {k: v.contiguous() for k, v in reward.net.state_dict().items()}
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"format": FORMAT, "version": "2", "holdout_accuracy": "0.9"})
    old = DigitClassifierReward(target=3, path=str(tmp_path / "old.safetensors"))
    assert torch.equal(old(digits[0][:8]), reward(digits[0][:8])) and old.holdout_accuracy == 0.9
    # version 1 (ten classes) and newer versions fail with which version wrote them and what to do
    save_file(state, str(tmp_path / "v1.safetensors"), metadata={"format": FORMAT, "version": "1"})
    with pytest.raises(checkpoint.CheckpointError, match=r"written by rlft-digit-classifier version 1 .*retrain it"):
        load_classifier(tmp_path / "v1.safetensors")
    save_file(state, str(tmp_path / "v9.safetensors"), metadata={"format": FORMAT, "version": "9"})
    with pytest.raises(checkpoint.CheckpointError, match=r"version '9'.*upgrade rlft"):
        load_classifier(tmp_path / "v9.safetensors")
