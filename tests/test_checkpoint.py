"""rlft/checkpoint.py: checkpoints are data, versioned, and replaced atomically.

- tensors and modules round-trip bit for bit (dtypes kept; non-contiguous and grad-carrying tensors accepted);
- `atomic_dir` replaces a directory whole, and leaves the old one intact (and no debris) when the block raises;
- `read_state` refuses another format, a newer version, a truncated or non-object JSON and a missing directory,
  with messages that name the file and the version and say what to do; older versions and legacy file names
  are returned for the caller to upgrade;
- an Adam optimiser saved mid-run and restored into fresh objects takes bit-identical steps afterwards (and a
  fresh Adam does not: the test can fail).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlft import checkpoint as ck
from rlft.checkpoint import CheckpointError

FMT, VERSION = "rlft-test", 2


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "w32_t": torch.randn(4, 3, generator=g).t(),  # non-contiguous
        "grad": torch.randn(5, generator=g).requires_grad_(),
        "idx": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
    }


def test_tensors_round_trip_bit_for_bit(tmp_path):
    tensors = _tensors()
    ck.save_tensors(tmp_path / "t.safetensors", tensors, metadata={"step": 3})
    back = ck.load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach()), k
        assert not back[k].requires_grad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temporary file left


def test_damaged_or_missing_tensor_files_name_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is missing"):
        ck.load_tensors(path)
    ck.save_tensors(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} cannot be read.*damaged"):
        ck.load_tensors(path)
    assert issubclass(CheckpointError, ValueError)


def test_modules_round_trip_and_a_wrong_size_says_so(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    ck.save_module(tmp_path / "net.safetensors", net)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert not torch.equal(fresh(x), net(x))
    ck.load_module(tmp_path / "net.safetensors", fresh)
    assert torch.equal(fresh(x), net(x))
    wider = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    with pytest.raises(CheckpointError, match=r"net.safetensors does not fit this network.*another size"):
        ck.load_module(tmp_path / "net.safetensors", wider)


# -- JSON state ------------------------------------------------------------------------------------------------


def test_state_round_trip_with_format_and_version(tmp_path):
    state = {"iteration": 7, "lr": 1e-3, "path": tmp_path / "x", "scalar": torch.tensor(2.5), "vec": torch.tensor([1, 2])}
    ck.write_state(tmp_path, FMT, VERSION, state)
    raw = json.loads((tmp_path / ck.STATE_FILE).read_text())
    assert raw["format"] == FMT and raw["version"] == VERSION
    back = ck.read_state(tmp_path, FMT, VERSION)
    assert back["iteration"] == 7 and back["lr"] == 1e-3 and back["path"] == str(tmp_path / "x")
    assert back["scalar"] == 2.5 and back["vec"] == [1, 2]
    # an older version is returned for the caller to upgrade
    ck.write_state(tmp_path, FMT, 1, {"iteration": 3})
    assert ck.read_state(tmp_path, FMT, VERSION)["version"] == 1


def test_another_format_is_refused_naming_both(tmp_path):
    ck.write_state(tmp_path, "rlft-elegant", 1, {})
    with pytest.raises(CheckpointError) as err:
        ck.read_state(tmp_path, FMT, VERSION)
    message = str(err.value)
    assert str(tmp_path / ck.STATE_FILE) in message and "'rlft-elegant'" in message and repr(FMT) in message
    assert "load it with the learner or model that wrote it" in message


@pytest.mark.parametrize("written", [VERSION + 1, "2", None])
def test_a_newer_or_unreadable_version_is_refused(tmp_path, written):
    (tmp_path / ck.STATE_FILE).write_text(json.dumps({"format": FMT, "version": written}))
    with pytest.raises(CheckpointError) as err:
        ck.read_state(tmp_path, FMT, VERSION)
    message = str(err.value)
    assert str(tmp_path / ck.STATE_FILE) in message
    assert f"version {written!r}" in message and f"versions up to {VERSION}" in message
    assert "upgrade rlft" in message


@pytest.mark.parametrize("text", ['{"format": "rlft-test", "vers', "[1, 2]", "\udcff"], ids=["truncated", "list", "bytes"])
def test_a_damaged_state_file_is_refused(tmp_path, text):
    path = tmp_path / ck.STATE_FILE
    if text == "\udcff":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} (cannot be read|is not a JSON object).*damaged: use an earlier one"):
        ck.read_state(tmp_path, FMT, VERSION)


def test_missing_state_and_legacy_names(tmp_path):
    with pytest.raises(CheckpointError, match=f"directory {re.escape(str(tmp_path / 'nope'))} does not exist"):
        ck.read_state(tmp_path / "nope", FMT, VERSION)
    (tmp_path / "control.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path))} holds no {FMT} checkpoint \({ck.STATE_FILE} is missing; files: \['control.safetensors'\]"):
        ck.read_state(tmp_path, FMT, VERSION)
    # a state file of an earlier release, under its old name
    (tmp_path / "learner.json").write_text(json.dumps({"format": FMT, "version": 1, "iteration": 4}))
    assert ck.read_state(tmp_path, FMT, VERSION, legacy={"learner.json": 1})["iteration"] == 4
    # the current name wins over a legacy one
    ck.write_state(tmp_path, FMT, VERSION, {"iteration": 9})
    assert ck.read_state(tmp_path, FMT, VERSION, legacy={"learner.json": 1})["iteration"] == 9


# -- whole directories -------------------------------------------------------------------------------------------


def _fill(directory: Path, tag: str) -> None:
    (directory / "weights.safetensors").write_text(tag)
    (directory / f"only_{tag}.txt").write_text(tag)


def test_atomic_dir_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "ckpt"
    with ck.atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp != target and tmp.parent == target.parent and not any(tmp.iterdir())
        _fill(tmp, "old")
        assert not target.exists()  # nothing appears at the target before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["only_old.txt", "weights.safetensors"]
    with ck.atomic_dir(target) as tmp:
        _fill(tmp, "new")
    assert sorted(p.name for p in target.iterdir()) == ["only_new.txt", "weights.safetensors"]
    assert (target / "weights.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or .old directory left


def test_atomic_dir_leaves_the_old_directory_intact_when_the_block_raises(tmp_path):
    target = tmp_path / "ckpt"
    with ck.atomic_dir(target) as tmp:
        _fill(tmp, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with ck.atomic_dir(target) as tmp:
            _fill(tmp, "new")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["only_old.txt", "weights.safetensors"]
    assert (target / "weights.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # and a first write that raises leaves nothing behind
    with pytest.raises(KeyboardInterrupt):
        with ck.atomic_dir(tmp_path / "other") as tmp:
            _fill(tmp, "x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- optimiser state -----------------------------------------------------------------------------------------------


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=1e-3)
    return net, opt


def _steps(net, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, 3, generator=g, dtype=torch.float64)
        loss = ((net(x).squeeze(-1) - x.sin().sum(-1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(directory: Path, net, opt) -> None:
    tensors, groups = ck.optimizer_tensors(opt, "drift")
    other, _ = ck.optimizer_tensors(opt, "value")  # a second optimiser in the same file must not interfere
    ck.save_tensors(directory / "optim.safetensors", {**tensors, **{k: v * 0 + 7 for k, v in other.items()}})
    ck.save_module(directory / "net.safetensors", net)
    ck.write_state(directory, FMT, VERSION, {"groups": groups})


def test_adam_restored_from_a_checkpoint_takes_identical_steps(tmp_path):
    net, opt = _problem()
    _steps(net, opt, 5, seed=1)
    _save(tmp_path, net, opt)
    _steps(net, opt, 5, seed=2)  # the uninterrupted run
    expected = [p.detach().clone() for p in net.parameters()]

    net2 = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    opt2 = torch.optim.Adam(net2.parameters(), lr=1.0)  # wrong hyperparameters, overwritten by the groups
    ck.load_module(tmp_path / "net.safetensors", net2)
    state = ck.read_state(tmp_path, FMT, VERSION)
    ck.load_optimizer(opt2, ck.load_tensors(tmp_path / "optim.safetensors"), "drift", state["groups"], "cpu")
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 3e-2
    _steps(net2, opt2, 5, seed=2)
    for a, b in zip(expected, net2.parameters()):
        assert torch.equal(a, b)


def test_a_fresh_adam_does_not_take_the_same_steps(tmp_path):
    """The control for the test above: without the saved moments the steps differ (so that test can fail)."""
    net, opt = _problem()
    _steps(net, opt, 5, seed=1)
    _save(tmp_path, net, opt)
    _steps(net, opt, 5, seed=2)
    net2 = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    ck.load_module(tmp_path / "net.safetensors", net2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=3e-2, betas=(0.8, 0.95), weight_decay=1e-3)
    _steps(net2, opt2, 5, seed=2)
    assert any(not torch.allclose(a, b) for a, b in zip(net.parameters(), net2.parameters()))
