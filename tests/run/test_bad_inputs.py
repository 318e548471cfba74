"""Every bad input a user may give `rlft train|sweep|check|submit` fails before Ray starts, as one message.

Each case asserts: exit status 2, the message's key words (the problem AND the fix), that nothing was written under
the storage path, and (in-process) that Ray was not imported by the command. The table is run through
`rlft.cli.main` in this process; `test_train_refuses_without_importing_ray` runs one case in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from unittest import mock
import yaml

import rlft.cli as cli

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 1.0], [-1.0, -1.0]], "stds": [0.5, 0.5]},
    "reward": {"type": "quadratic", "center": [1.0, 1.0]},
    "alpha": 1.0,
    "num_steps": 10,
    "learner": {"type": "elegant"},
    "run": {"iterations": 2, "name": "exp"},
}

#: a user's reward module with the ways a reward goes wrong (written once per session, imported by name)
BAD_REWARDS = '''
import torch

def nan_reward(x):
    return torch.full((x.shape[0],), float("nan"))

def wide_reward(x):
    return x

def list_reward(x):
    return [0.0] * x.shape[0]

def raising_reward(x):
    raise RuntimeError("boom in my reward")

def int_reward(x):
    return (x[:, 0] > 0).long()
'''

MODULE = "rlft_test_bad_rewards"

# (id, edits of BASE as {dotted.key: value} (None deletes the key), extra argv, key words of problem and fix)
# argv's first word is the command ("train" unless given); "{tmp}" is replaced by the test's directory.
CASES: list[tuple[str, dict, list[str], list[str]]] = [
    # -- the task ------------------------------------------------------------------------------------------
    ("unknown_top_key", {"colour": "red"}, [], ["colour is not a known key", "valid keys"]),
    ("alpha_nan", {"alpha": float("nan")}, [], ["alpha must be a finite number", "e.g. alpha: 1.0"]),
    ("alpha_inf", {"alpha": float("inf")}, [], ["alpha must be a finite number", "e.g. alpha"]),
    ("alpha_negative", {"alpha": -1.0}, [], ["alpha must be > 0", "no_kl"]),
    ("alpha_string", {"alpha": "one"}, [], ["alpha must be a number", "'one'"]),
    ("alpha0_elegant", {"alpha": 0.0}, [], ["alpha = 0 with learner 'elegant'", "use alpha > 0"]),
    ("num_steps_1e9_yaml", {"num_steps": "1e9"}, [], ["num_steps must be an integer", "'1e9'"]),
    ("num_steps_huge", {"num_steps": 10**9}, [], ["num_steps must be <= 100000", "e.g. num_steps: 100"]),
    ("num_steps_zero", {"num_steps": 0}, [], ["num_steps must be >= 1", "e.g. num_steps"]),
    ("seed_float", {"seed": 1.5}, [], ["seed must be an integer", "1.5"]),
    ("reward_missing", {"reward": None}, [], ["reward", "quadratic"]),
    ("reward_no_type", {"reward": {"center": [1.0, 1.0]}}, [], ["reward.type is required", "quadratic"]),
    # -- the model -----------------------------------------------------------------------------------------
    ("model_type_unknown", {"model": {"type": "vae"}}, [], ["model.type must be one of", "gmm"]),
    ("model_unknown_key", {"model.colour": 1}, [], ["model.colour is not a known key", "valid keys"]),
    ("weights_sum", {"model.weights": [0.5, 0.6]}, [], ["model.weights must be >= 0 and sum to 1", "divide each weight"]),
    ("weights_negative", {"model.weights": [1.5, -0.5]}, [], ["sum to 1", "divide each weight"]),
    ("weights_count", {"model.weights": [1.0]}, [], ["model.weights has 1 entries", "2 components"]),
    ("std_negative", {"model.stds": [0.5, -0.5]}, [], ["model.stds must be > 0", "positive number"]),
    ("std_zero_shared", {"model.stds": 0.0}, [], ["model.stds must be > 0", "positive number"]),
    ("stds_count", {"model.stds": [0.5]}, [], ["model.stds has 1 entries", "2 components"]),
    ("means_ragged", {"model.means": [[1.0, 1.0], [1.0]]}, [], ["model.means must be C lists", "same length"]),
    ("means_nan", {"model.means": [[1.0, float("nan")], [-1.0, -1.0]]}, [], ["must be finite", "NaN"]),
    ("means_missing", {"model.means": None}, [], ["model.means is required", "list"]),
    ("beta_order", {"model.beta_min": 30.0}, [], ["0 < beta_min < beta_max", "defaults are 0.1 and 20"]),
    ("scorenet_missing_dir", {"model": {"type": "scorenet", "path": "{tmp}/no_such_model"}}, [],
     ["model.path", "is not a directory", "rlft pretrain"]),
    ("scorenet_corrupt_dir", {"model": {"type": "scorenet", "path": "{tmp}/corrupt_model"}}, [],
     ["model (scorenet) cannot be built", "rlft pretrain"]),
    ("diffusers_missing_dir", {"model": {"type": "diffusers", "path": "{tmp}/no_unet"}}, [],
     ["model.path", "is not a directory", "unet/, scheduler/"]),
    # -- the reward ----------------------------------------------------------------------------------------
    ("reward_type_unknown", {"reward": {"type": "qudratic"}}, [], ["'qudratic' is not known", "choose one of"]),
    ("reward_module_missing", {"reward": {"type": "no_such_module_xyz:MyReward"}}, [],
     ["cannot be imported", "working directory", "PYTHONPATH"]),
    ("reward_attr_missing", {"reward": {"type": f"{MODULE}:no_such_reward"}}, [], ["has no attribute", "no_such_reward"]),
    ("reward_center_dim", {"reward.center": [1.0, 1.0, 1.0]}, [], ["center has 3 entries", "fix the reward's arguments"]),
    ("reward_scale_negative", {"reward.scale": -1.0}, [], ["scale must be > 0", "fix the reward's arguments"]),
    ("reward_scale_zero", {"reward.scale": 0.0}, [], ["scale must be > 0", "fix the reward's arguments"]),
    ("reward_unknown_arg", {"reward.centre": [1.0, 1.0]}, [], ["reward.centre is not a parameter", "valid"]),
    ("reward_center_nan", {"reward.center": [1.0, float("nan")]}, [], ["center must be finite", "fix the reward"]),
    ("reward_required_arg", {"reward": {"type": "quadratic"}}, [], ["reward.center is required", "QuadraticReward"]),
    ("reward_center_string", {"reward.center": "middle"}, [], ["reward.center", "list"]),
    ("linear_direction_dim", {"reward": {"type": "linear", "direction": [1.0]}}, [],
     ["direction has 1 entries", "fix the reward's arguments"]),
    ("distance_scale", {"reward": {"type": "distance_to_mode", "scale": -2.0}}, [], ["scale must be > 0", "fix the reward"]),
    ("reward_nan_values", {"reward": {"type": f"{MODULE}:nan_reward"}}, [], ["returned nan", "fix the reward"]),
    ("reward_wrong_shape", {"reward": {"type": f"{MODULE}:wide_reward"}}, [], ["must return shape (256,)", "sum over"]),
    ("reward_not_tensor", {"reward": {"type": f"{MODULE}:list_reward"}}, [], ["must return a torch.Tensor", "list"]),
    ("reward_raises", {"reward": {"type": f"{MODULE}:raising_reward"}}, [], ["boom in my reward", "fix the reward's"]),
    ("f_reg_divergence", {"reward": {"type": "f_regularised", "base": {"type": "quadratic", "center": [1.0, 1.0]},
                                     "alpha": 1.0, "divergence": "nonsense"}}, [], ["divergence", "choose one of"]),
    # -- the learner ---------------------------------------------------------------------------------------
    ("learner_type_unknown", {"learner": {"type": "elegent"}}, [], ["learner.type", "choose one of"]),
    ("learner_unknown_key", {"learner.learning_rate": 0.1}, [], ["learner.learning_rate is not a known key", "valid keys"]),
    ("learner_lr_negative", {"learner.lr": -1.0}, [], ["learner.lr must be", "e.g. 1e-3"]),
    ("learner_divergence", {"learner.divergence": "foo"}, [], ["unknown divergence 'foo'", "choose one of"]),
    ("learner_bool", {"learner.learn_init": "yes"}, [], ["learner.learn_init must be true or false", "'yes'"]),
    ("truncation_am_solver", {"learner": {"type": "truncation", "drift_solver": "adjoint_matching"}}, [],
     ["learner.drift_solver 'adjoint_matching' is for type elegant", "leave drift_solver: backprop"]),
    # -- run: ----------------------------------------------------------------------------------------------
    ("run_unknown_key", {"run.iterationz": 5}, [], ["run.iterationz is not a known key", "valid keys"]),
    ("iterations_zero", {"run.iterations": 0}, [], ["run.iterations must be >= 1", "got 0"]),
    ("eval_every_zero", {"run.eval_every": 0}, [], ["run.eval_every must be >= 1", "got 0"]),
    ("max_failures", {"run.max_failures": -2}, [], ["run.max_failures must be >= -1", "-1 retries forever"]),
    ("cpus_8_on_machine", {"run.cpus_per_trial": 1000}, [], ["needs 1000 CPUs but this machine has", "set run.cpus_per_trial <="]),
    ("cpus_zero", {"run.cpus_per_trial": 0}, [], ["run.cpus_per_trial must be > 0", "fractions like 0.5"]),
    ("gpus_absent", {"run.gpus_per_trial": 64}, [], ["needs 64 GPUs but this machine has", "run.gpus_per_trial: 0"]),
    ("gpus_fraction", {"run.gpus_per_trial": 1.5}, [], ["run.gpus_per_trial must be <= 1 or a whole number", "1.5"]),
    ("device_cuda_no_gpu", {"run.device": "cuda"}, [], ["run.device is 'cuda'", "run.device: auto"]),
    ("device_unknown", {"run.device": "tpu"}, [], ["run.device must be one of", "'cuda'"]),
    ("loggers_unknown", {"run.loggers": ["tensorbored"]}, [], ["run.loggers[0] must be one of", "'tensorboard'"]),
    ("name_too_long", {"run.name": "x" * 240}, [], ["240 characters", "must be at most 200"]),
    ("name_bad_chars", {"run.name": "my run:1"}, [], ["must be at most 200 letters, digits", "choose another --name"]),
    ("name_slash", {"run.name": "a/b"}, [], ["run.name must be a plain directory name", "without '/'"]),
    ("storage_under_file", {"run.storage_path": "{tmp}/a_file/results"}, [], ["which is a file", "give a directory"]),
    ("storage_empty", {"run.storage_path": ""}, [], ["run.storage_path must not be empty", "give a local directory"]),
    ("experiment_exists", {"run.name": "existing"}, [], ["already exists", "pass --resume"]),
    # -- sweep: --------------------------------------------------------------------------------------------
    ("sweep_missing", {}, ["sweep"], ["has no sweep: section", "use rlft train"]),
    ("sweep_unknown_key", {"sweep": {"colour": [1, 2]}}, ["sweep"], ["sweep.colour is not a task key", "e.g. alpha"]),
    ("sweep_not_list", {"sweep": {"alpha": 0.5}}, ["sweep"], ["sweep.alpha must be a non-empty list", "0.5"]),
    ("sweep_bad_value", {"sweep": {"alpha": [1.0, -1.0]}}, ["sweep"], ["sweep.alpha[1] = -1.0 gives an invalid task", "alpha must be > 0"]),
    # -- the command line ----------------------------------------------------------------------------------
    ("set_no_equals", {}, ["train", "--set", "alpha"], ["must look like key=value", "--set learner.lr=1e-3"]),
    ("set_through_scalar", {}, ["train", "--set", "alpha.x=1"], ["cannot set alpha.x", "not a mapping"]),
    ("iterations_flag_zero", {}, ["train", "--iterations", "0"], ["run.iterations must be >= 1", "got 0"]),
    ("check_bad_config", {"alpha": float("nan")}, ["check"], ["alpha must be a finite number", "e.g. alpha"]),
    ("resume_missing", {}, ["train", "--resume"], ["holds no rlft experiment", "run without --resume"]),
    ("resume_other_dimension", {"run.name": "other_dim"}, ["train", "--resume"], ["dimension 3 there, 2 here", "another --name"]),
    ("resume_other_learner", {"run.name": "other_learner"}, ["train", "--resume"], ["learner type 'no_kl' there", "config that made it"]),
    ("resume_checkpoint_other_task", {"run.name": "ckpt_other"}, ["check", "--resume"], ["checkpoint", "dimension 3 there, 2 here"]),
    ("submit_address_not_url", {}, ["submit", "--address", "not-a-url"], ["'not-a-url' is not a Jobs API URL", "http://HOST:PORT"]),
    ("submit_address_no_host", {}, ["submit", "--address", "http://"], ["is not a Jobs API URL", "--address http://127.0.0.1:8265"]),
    ("submit_bad_config", {"model.weights": [0.1, 0.1]}, ["submit", "--address", "http://127.0.0.1:1"], ["sum to 1", "divide"]),
    # last: resolving an RLlib learner's options imports (never starts) Ray
    ("alpha0_ppo_kl", {"alpha": 0.0, "learner": {"type": "ppo_kl"}}, [], ["alpha = 0 with learner 'ppo_kl'", "no_kl"]),
    ("alpha0_fpg", {"alpha": 0.0, "learner": {"type": "fpg"}}, [], ["undefined at alpha = 0", "use alpha > 0"]),
]

# configs given as files rather than as edits of BASE: (id, {file name: text}, file to pass, key words)
FILE_CASES: list[tuple[str, dict[str, str], str, list[str]]] = [
    ("config_is_directory", {"dir/x.yaml": "alpha: 1\n"}, "dir", ["is a directory", "give a YAML file"]),
    ("config_missing", {}, "nope.yaml", ["does not exist", "check the path"]),
    ("config_not_yaml", {"c.yaml": "model: [1, 2\n"}, "c.yaml", ["is not valid YAML", "line"]),
    ("config_top_list", {"c.yaml": "- 1\n- 2\n"}, "c.yaml", ["must hold a mapping at the top level", "model:"]),
    ("base_self_loop", {"c.yaml": "base: c.yaml\nalpha: 1\n"}, "c.yaml", ["base: loop", "remove one `base:` line"]),
    ("base_two_file_loop", {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml", ["base: loop", "remove one"]),
    ("base_missing", {"c.yaml": "base: gone.yaml\n"}, "c.yaml", ["gone.yaml' does not exist", "named by `base:`"]),
    ("base_not_string", {"c.yaml": "base: [a.yaml]\n"}, "c.yaml", ["must be a file name", "e.g. base: base_gmm.yaml"]),
]


def _edit(data: dict, edits: dict, tmp: Path) -> dict:
    out = json.loads(json.dumps(data))
    for key, value in edits.items():
        if isinstance(value, str):
            value = value.replace("{tmp}", str(tmp))
        elif isinstance(value, dict):
            value = json.loads(json.dumps(value).replace("{tmp}", str(tmp)))
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return out


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / f"{MODULE}.py").write_text(BAD_REWARDS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _fake_experiment(storage: Path, name: str, task: dict, checkpoint_task: dict | None = None) -> None:
    """An experiment folder as `rlft train` leaves it (rlft_experiment.json; a trial checkpoint with a manifest)."""
    import rlft.checkpoint as checkpoint
    from rlft.run.trial import TRIAL_FORMAT, TRIAL_VERSION, _file_digest, _files

    path = storage / name
    path.mkdir(parents=True)
    (path / "rlft_experiment.json").write_text(json.dumps({"task": task, "grid": {}}))
    if checkpoint_task is not None:
        ckpt = path / "trial_0" / "checkpoint_000001"
        checkpoint.write_state(ckpt / "learner", "elegant", 1, {"task": checkpoint_task})
        manifest = {rel: _file_digest(str(ckpt / rel)) for rel in _files(str(ckpt))}
        checkpoint.write_state(ckpt, TRIAL_FORMAT, TRIAL_VERSION, {"iteration": 1, "manifest": manifest},
                               name="rlft_state.json")


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _run(argv: list[str], capsys, rllib: bool = False) -> tuple[int, str]:
    """Runs the CLI; asserts that it neither imported Ray (unless an RLlib learner's module must) nor started it
    (a spy on `rlft.run.cli.init_ray`: the test session may have a Ray of its own running already)."""
    import rlft.run.cli as run_cli

    before = "ray" in sys.modules
    started: list[str] = []
    with mock.patch.object(run_cli, "init_ray", side_effect=lambda *a, **k: started.append("init_ray")):
        code = cli.main(argv)
    err = capsys.readouterr().err
    if not before and not rllib:
        assert "ray" not in sys.modules, f"{argv} imported Ray"
    assert not started, f"{argv} started Ray"
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch, reward_module):
    name, edits, argv, words = case
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "corrupt_model").mkdir()
    (tmp_path / "corrupt_model" / "config.json").write_text("{ not json")
    (tmp_path / "corrupt_model" / "model.safetensors").write_bytes(b"\x00" * 10)
    data = _edit(BASE, {"run.storage_path": str(storage), **edits}, tmp_path)
    three_d = _edit(BASE, {"model.means": [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], "reward.center": [1.0, 1.0, 1.0]}, tmp_path)
    if name == "experiment_exists":
        (storage / "existing").mkdir(parents=True)
    if name == "resume_other_dimension":
        _fake_experiment(storage, "other_dim", three_d)
    if name == "resume_other_learner":
        _fake_experiment(storage, "other_learner", _edit(BASE, {"learner": {"type": "no_kl"}}, tmp_path))
    if name == "resume_checkpoint_other_task":
        _fake_experiment(storage, "ckpt_other", data, checkpoint_task=three_d)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    before = _snapshot(storage)
    command, *rest = argv or ["train"]
    rllib = (data.get("learner") or {}).get("type") in ("ppo_kl", "fpg")
    code, err = _run([command, str(config), *rest], capsys, rllib)
    assert code == 2, f"{name}: exit {code}\n{err}"
    for word in words:
        assert word in err, f"{name}: {word!r} not in the message:\n{err}"
    assert len(err.strip().splitlines()) <= 3, f"{name}: not one message:\n{err}"
    assert _snapshot(storage) == before, f"{name}: something was written under {storage}"


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case, tmp_path, capsys, monkeypatch):
    name, files, given, words = case
    monkeypatch.chdir(tmp_path)
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = _snapshot(tmp_path)
    code, err = _run(["train", str(tmp_path / given), "--storage-path", str(tmp_path / "storage")], capsys)
    assert code == 2, f"{name}: exit {code}\n{err}"
    for word in words:
        assert word in err, f"{name}: {word!r} not in the message:\n{err}"
    assert _snapshot(tmp_path) == before


def test_enough_cases():
    assert len(CASES) + len(FILE_CASES) >= 60


def test_train_refuses_without_importing_ray(tmp_path):
    """The whole `rlft train` path in a fresh interpreter: exit 2, one message, Ray never imported."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_edit(BASE, {"model.weights": [0.2, 0.2], "run.storage_path": str(tmp_path / "s")},
                                           tmp_path)))
    script = textwrap.dedent(f"""
        import sys
        import rlft.cli as cli
        code = cli.main(["train", {str(config)!r}])
        assert "ray" not in sys.modules, "ray imported"
        sys.exit(code)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.weights must be >= 0 and sum to 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()
