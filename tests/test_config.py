"""Task YAML validation: every bad input names its key path, the rule and the fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from rlft.config import DEFAULT_TASK, ConfigError, load_task, task_from_dict
from rlft.models import build_model


def _task(**changes):
    data = copy.deepcopy(DEFAULT_TASK)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            data[section][sub] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"alpha": -1.0}, r"alpha must be > 0 \(got -1.0\); use alpha=0 only with learner type 'no_kl'"),
        ({"alpha": 0.0}, r"alpha must be > 0"),
        ({"alpha": "big"}, r"alpha must be a number \(got 'big'\)"),
        ({"num_steps": 2.5}, r"num_steps must be an integer"),
        ({"num_steps": 0}, r"num_steps must be >= 1"),
        ({"typo_key": 1}, r"typo_key is not a known key; valid keys here: \['alpha'"),
        ({"model__colour": "red"}, r"model.colour is not a known key"),
        ({"model__type": "vae"}, r"model.type must be one of \['diffusers', 'gmm', 'scorenet', 'tfbind8'\]"),
        ({"model__weights": [0.5, 0.5]}, r"model.weights has 2 entries but model.means has 4 components"),
        ({"model__means": [[0, 0], [1]]}, r"model.means must be C lists of the same length D"),
        ({"model__means": "origin"}, r"model.means must be a list of list of float"),
        ({"model__stds": [1, 1]}, r"model.stds has 2 entries"),
        ({"reward": {"center": [0, 0]}}, r"reward.type is required"),
        ({"seed": True}, r"seed must be an integer"),
    ],
)
def test_bad_task_is_rejected_with_key_path(changes, message):
    with pytest.raises(ConfigError, match=message):
        task_from_dict(_task(**changes))


def test_alpha_zero_is_allowed_with_no_kl():
    assert task_from_dict(_task(alpha=0.0, learner={"type": "no_kl"})).alpha == 0.0


def test_mixture_values_are_checked_when_parsed():
    with pytest.raises(ConfigError, match="sum to 1"):
        task_from_dict(_task(model__weights=[0.5, 0.5, 0.5, 0.5]))


def test_missing_model_path_names_the_fix(tmp_path):
    task = task_from_dict(_task(model={"type": "scorenet", "path": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match=r"model.path .*nope.* does not exist; pretrain .*rlft pretrain"):
        build_model(task.model, task.num_steps)


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(DEFAULT_TASK))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nalpha: 0.3\nreward: {scale: 2.0}\n")
    task = load_task(tmp_path / "child.yaml")
    assert task.alpha == 0.3 and task.reward["scale"] == 2.0 and task.reward["type"] == "quadratic"
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_task(tmp_path / "bad.yaml")


def test_unknown_reward_argument_names_the_path():
    from rlft.rewards import build_reward

    with pytest.raises(ConfigError, match=r"reward.radius is not a parameter of QuadraticReward"):
        build_reward({"type": "quadratic", "center": [0, 0], "radius": 1})
    with pytest.raises(ConfigError, match=r"reward.type: .*'nonsense' is not known; choose one of \[.*'quadratic'"):
        build_reward({"type": "nonsense"})
    with pytest.raises(ConfigError, match=r"reward.scale must be a number"):
        build_reward({"type": "quadratic", "center": [0, 0], "scale": "x"})


def test_override_with_another_type_replaces_the_mapping(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(DEFAULT_TASK))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nreward: {type: linear, direction: [1.0, 0.0]}\n")
    assert load_task(tmp_path / "child.yaml").reward == {"type": "linear", "direction": [1.0, 0.0]}


@pytest.mark.parametrize(
    "data",
    [
        DEFAULT_TASK["model"],
        {"type": "gmm", "weights": [1.0], "means": [[0.0, 1.0, 2.0]], "stds": 0.5, "beta_min": 0.2, "beta_max": 10.0},
        {"type": "scorenet", "path": "/some/dir"},
        {"type": "diffusers", "path": "/a/unet", "scheduler": "ddim", "eta": 0.5, "subfolder_unet": "u", "subfolder_scheduler": "s"},
        {"type": "tfbind8", "cache_dir": None, "pretrain_steps": 10, "hidden": 8, "depth": 2},
    ],
    ids=["gmm", "gmm-shared-std", "scorenet", "diffusers", "tfbind8"],
)
def test_model_config_round_trips_through_a_plain_mapping(data):
    import json

    from rlft.config import MODEL_CONFIGS, model_config_from_dict, model_config_to_dict

    cfg = model_config_from_dict(copy.deepcopy(data))
    assert isinstance(cfg, MODEL_CONFIGS[data["type"]])
    out = model_config_to_dict(cfg)
    assert out["type"] == data["type"] and {k: out[k] for k in data} == data  # what was given survives, defaults filled
    back = model_config_from_dict(json.loads(json.dumps(out)))  # what a Ray worker or a checkpoint sees
    assert back == cfg and model_config_to_dict(back) == out
    assert model_config_from_dict(cfg) is cfg
    assert task_from_dict({**DEFAULT_TASK, "model": out}).model == cfg  # the same typed config the task YAML gives


def test_model_config_from_dict_names_the_path():
    from rlft.config import model_config_from_dict, model_config_to_dict

    with pytest.raises(ConfigError, match=r"env.model.type must be one of \['diffusers', 'gmm', 'scorenet', 'tfbind8'\]"):
        model_config_from_dict({"type": "vae"}, path="env.model")
    with pytest.raises(ConfigError, match=r"env.model.colour is not a known key"):
        model_config_from_dict({"type": "scorenet", "path": "x", "colour": 1}, path="env.model")
    with pytest.raises(ConfigError, match=r"model must be a mapping"):
        model_config_from_dict("gmm")
    with pytest.raises(ConfigError, match=r"model config must be one of"):
        model_config_to_dict({"type": "gmm"})
