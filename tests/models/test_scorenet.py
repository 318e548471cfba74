"""Score networks against closed forms: a DSM-trained MLP reproduces the exact GMM and Gaussian scores, its
chain samples like the exact chain, save/load is exact, and every bad input fails with a clear message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlft.cli import main
from rlft.config import ScoreNetModelConfig
from rlft.models import build_model
from rlft.models.gmm import GaussianMixture, GMMModel
from rlft import checkpoint
from rlft.models.pretrain import dsm_loss, train_scorenet
from rlft.models.scorenet import ScoreNetChain, ScoreNetConfig, build_network, load_scorenet, save_scorenet
from rlft.sampling import sample

K = 50
MID_LEVELS = (10, 25, 35)  # noise times s = 0.8, 0.5, 0.3 of T with K = 50


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """E|approx - exact|^2 / E|exact|^2 over the batch."""
    return float(((approx - exact) ** 2).sum(-1).mean() / (exact**2).sum(-1).mean())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets: intra-op threads only contend on a shared 2-core machine (measured 25x slower with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mix() -> GaussianMixture:
    return GaussianMixture.create([0.5, 0.3, 0.2], [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]], [0.4, 0.3, 0.5])


@pytest.fixture(scope="module")
def gmm_net(mix):
    """An MLP trained for 800 steps on 4000 samples of the 2-D mixture (a few seconds on a CPU)."""
    data = mix.sample(4000, torch.Generator().manual_seed(0)).float().numpy()
    return train_scorenet(data, "mlp", steps=800, batch_size=256, lr=3e-3, hidden=64, seed=0, progress=False)


def test_dsm_loss_decreases(gmm_net):
    s = gmm_net.summary
    assert s.steps == 800 and s.num_data == 4000
    assert s.final_loss < 0.4 * s.initial_loss, (s.initial_loss, s.final_loss)
    assert s.loss_curve[-1] < 0.7 * s.loss_curve[0]  # the first window (16 steps) already averages a falling loss


def test_learned_score_matches_exact_gmm_score(mix, gmm_net):
    chain = ScoreNetChain(gmm_net, K).to(dtype=torch.float64)
    exact = GMMModel(mix, K).to(dtype=torch.float64)
    untrained = ScoreNetChain(build_network(gmm_net.config), K).to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for k in MID_LEVELS:
        x = exact.marginal(k).sample(2000, gen)  # (2000, 2) from the exact forward marginal q_{s_k}
        want = exact.score(k, x)
        assert rel_error(chain.score(k, x), want) < 0.01, k  # measured <= 0.0015
        assert rel_error(untrained.score(k, x), want) > 0.5, k  # the bound tells a broken model apart
        # eps and score are the same prediction: score = -eps / sqrt(1 - a^2)
        ab = chain.schedule.alpha_bar(chain.schedule.levels(K)[k].item())
        torch.testing.assert_close(chain.score(k, x), -chain.eps(k, x) / math.sqrt(1 - ab))


def test_trained_chain_samples_like_exact_chain_and_data(mix, gmm_net):
    chain = ScoreNetChain(gmm_net, 100).to(dtype=torch.float64)
    exact = GMMModel(mix, 100).to(dtype=torch.float64)
    x = sample(chain, 4000, seed=3, progress=False).x  # (4000, 2)
    x_exact = sample(exact, 4000, seed=3, progress=False).x  # same prior draws and step noises
    assert float((x - x_exact).norm(dim=-1).median()) < 0.1  # pathwise: same noise gives nearly the same sample
    torch.testing.assert_close(x.mean(0), x_exact.mean(0), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.cov(x_exact.T), atol=0.06, rtol=0)
    torch.testing.assert_close(x.mean(0), mix.mean(), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), mix.covariance(), atol=0.15, rtol=0)


def test_gaussian_data_closed_form_score_and_jacobian():
    """Data N(mu, sigma^2 I): every marginal is N(a mu, v I), v = a^2 sigma^2 + 1 - a^2, score -(x - a mu)/v."""
    mu, sigma = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), 0.6
    data = (mu + sigma * torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).numpy()
    net = train_scorenet(data, "mlp", steps=600, batch_size=256, lr=3e-3, hidden=64, seed=1, progress=False)
    chain = ScoreNetChain(net, K).to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    for k in MID_LEVELS:
        a2 = chain.coefficients.alpha_bar[k]
        a, v = math.sqrt(a2), a2 * sigma**2 + 1 - a2
        x = a * mu + math.sqrt(v) * torch.randn(2000, 3, generator=gen, dtype=torch.float64)
        assert rel_error(chain.score(k, x), -(x - a * mu) / v) < 0.01, k
        # the score is differentiable in x and its Jacobian is the closed-form -I / v
        x1 = x[:64].clone().requires_grad_(True)
        jac = torch.autograd.functional.jacobian(lambda z: chain.score(k, z).sum(0), x1)  # (3, 64, 3)
        mean_jac = jac.mean(1)  # (3, 3); measured within 0.02 / v of the closed form
        torch.testing.assert_close(mean_jac, -torch.eye(3, dtype=torch.float64) / v, atol=0.05 / v, rtol=0)


def test_score_is_differentiable_and_net_frozen(gmm_net):
    chain = ScoreNetChain(gmm_net, 10).to(dtype=torch.float64)
    assert not chain.net.training and not any(p.requires_grad for p in chain.net.parameters())
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: chain.score(3, z), (x,))
    assert torch.autograd.gradcheck(lambda z: chain.mean(3, z), (x,))
    assert all(p.grad is None for p in chain.net.parameters())
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        chain.score(0, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unconditional"):
        chain.score(0, torch.zeros(4, 2), cond=torch.zeros(4, 1))


def test_to_moves_the_network(gmm_net):
    chain = ScoreNetChain(gmm_net, 10).to(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in chain.net.parameters())
    assert chain.prior_sample(3).dtype == torch.float64
    chain.to(dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in chain.net.parameters())
    assert chain.score(5, torch.zeros(3, 2)).dtype == torch.float32


# -- sequences ---------------------------------------------------------------------------------------


def one_hot_data(n: int, length: int = 8, alphabet: int = 4, seed: int = 0) -> np.ndarray:
    idx = torch.randint(alphabet, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, alphabet).float().numpy()  # (n, L, A)


def test_sequence_net_shapes_and_no_cross_batch_leakage():
    torch.manual_seed(0)
    net = build_network(ScoreNetConfig("seq", (8, 4), hidden=32, depth=2, heads=4)).double().eval()
    y = torch.randn(5, 8, 4, dtype=torch.float64)
    s = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    out = net(y, s)
    assert out.shape == (5, 8, 4)
    naive = torch.cat([net(y[i : i + 1], s[i : i + 1]) for i in range(5)])  # one sample at a time
    torch.testing.assert_close(out, naive)
    chain = ScoreNetChain(net, 20).to(dtype=torch.float64)
    assert chain.event_shape == (8, 4)
    x = chain.prior_sample(6)
    assert chain.score(0, x).shape == chain.mean(0, x).shape == chain.ode_step(0, x).shape == (6, 8, 4)
    assert sample(chain, 3, seed=0, progress=False).x.shape == (3, 8, 4)


def test_sequence_net_learns_exact_score_of_uniform_one_hot_data():
    """Uniform one-hot sequences: positions are independent, each a 4-component mixture of the corners e_j (std
    ~ 0), so the exact score at level s is per position the score of sum_j 1/4 N(a e_j, (1 - a^2) I)."""
    length, alphabet = 8, 4
    net = train_scorenet(one_hot_data(2048, length, alphabet), "seq", steps=150, batch_size=64, lr=3e-3, hidden=32,
                         seed=0, progress=False)
    assert net.config.event_shape == (length, alphabet)
    assert net.summary.final_loss < 0.3 * net.summary.initial_loss, (net.summary.initial_loss, net.summary.final_loss)
    chain = ScoreNetChain(net, K).to(dtype=torch.float64)
    untrained = ScoreNetChain(build_network(net.config), K).to(dtype=torch.float64)
    corners = GaussianMixture.create([1 / alphabet] * alphabet, torch.eye(alphabet).tolist(), 1e-4)
    gen = torch.Generator().manual_seed(1)
    for k in MID_LEVELS:
        marginal = corners.diffuse(chain.coefficients.alpha_bar[k])
        x = marginal.sample(500 * length, gen).reshape(500, length * alphabet)  # (500, L * A)
        want = marginal.score(x.reshape(-1, alphabet)).reshape(500, -1)
        got = chain.score(k, x.reshape(500, length, alphabet)).reshape(500, -1)
        assert rel_error(got, want) < 0.05, k  # measured ~0.01
        assert rel_error(untrained.score(k, x.reshape(500, length, alphabet)).reshape(500, -1), want) > 0.5, k


# -- save / load -------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(gmm_net, tmp_path):
    out = save_scorenet(ScoreNetChain(gmm_net, 5), tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "rlft.json"]
    meta = json.loads((out / "rlft.json").read_text())
    assert meta["format"] == "rlft-scorenet" and meta["version"] == 2
    assert meta["arch"] == "mlp" and meta["event_shape"] == [2] and meta["hidden"] == 64
    assert meta["schedule"] == {"beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "s_min": 0.001}
    assert meta["training"]["final_loss"] == gmm_net.summary.final_loss
    loaded, original = load_scorenet(out, num_steps=K), ScoreNetChain(gmm_net, K)
    assert loaded.net.config == gmm_net.config and loaded.net.summary == gmm_net.summary
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for k in (0, 20, K - 1):
        assert torch.equal(loaded.score(k, x), original.score(k, x))
    assert torch.equal(sample(loaded, 256, seed=7, progress=False).x, sample(original, 256, seed=7, progress=False).x)
    # the task config route builds the same chain
    via_cfg = build_model(ScoreNetModelConfig(type="scorenet", path=str(out)), num_steps=K)
    assert torch.equal(via_cfg.score(10, x), original.score(10, x))


def test_directories_written_before_the_checkpoint_module_still_load(gmm_net, tmp_path):
    """Format version 1 (rlft <= the renovation): the state in config.json, weights in model.safetensors."""
    old = tmp_path / "old"
    old.mkdir()
    meta = {"format": "rlft-scorenet", "version": 1, **gmm_net.config.to_dict(), "training": gmm_net.summary.to_dict()}
    (old / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    checkpoint.save_tensors(old / "model.safetensors", gmm_net.state_dict(), metadata={"format": "pt"})
    loaded = load_scorenet(old, num_steps=K)
    assert loaded.net.config == gmm_net.config and loaded.net.summary == gmm_net.summary
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.score(7, x), ScoreNetChain(gmm_net, K).score(7, x))
    save_scorenet(loaded, old)  # an old directory is a scorenet directory: re-saving upgrades it in place
    assert sorted(p.name for p in old.iterdir()) == ["model.safetensors", "rlft.json"]
    assert torch.equal(load_scorenet(old, num_steps=K).score(7, x), loaded.score(7, x))


def test_save_replaces_atomically_and_refuses_foreign_dirs(gmm_net, tmp_path, monkeypatch):
    target = save_scorenet(gmm_net, tmp_path / "model")
    before = (target / "model.safetensors").read_bytes()
    other = build_network(gmm_net.config)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_scorenet(other, target)
    assert (target / "model.safetensors").read_bytes() == before  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left behind
    monkeypatch.undo()
    save_scorenet(other, target)  # replacing a scorenet directory is allowed
    assert (target / "model.safetensors").read_bytes() != before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a scorenet directory"):
        save_scorenet(gmm_net, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_load_errors_name_the_path_and_the_fix(gmm_net, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*rlft pretrain"):
        load_scorenet(tmp_path / "nowhere", num_steps=10)
    out = save_scorenet(gmm_net, tmp_path / "model")
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing.*rlft pretrain"):
        load_scorenet(out, num_steps=10)
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model\.safetensors could not be loaded.*rlft pretrain"):
        load_scorenet(out, num_steps=10)
    (out / "rlft.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"rlft\.json is not a valid scorenet config.*rlft pretrain"):
        load_scorenet(out, num_steps=10)
    (out / "rlft.json").write_text(json.dumps({"format": "rlft-scorenet", "version": 9, "arch": "mlp"}))
    with pytest.raises(ValueError, match=r"written by rlft-scorenet version 9.*upgrade rlft"):
        load_scorenet(out, num_steps=10)


# -- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "arch", "message"),
    [
        (np.array([[0.0, 1.0], [np.nan, 0.0], [np.inf, 1.0]]), "mlp", r"2 non-finite .* 2 samples, first at .* index 1"),
        (np.zeros(10), "mlp", r"got a 1-D array .* data\.reshape\(-1, 1\)"),
        (np.zeros((0, 2)), "mlp", "data is empty"),
        (np.zeros((4, 8, 4)), "mlp", "use arch='seq'"),
        (np.zeros((4, 2)), "seq", "use arch='mlp'"),
        (np.array([["a", "b"]]), "mlp", "must hold numbers"),
        (np.zeros((4, 2)), "unet", "arch must be one of"),
    ],
)
def test_bad_data_raises_clear_errors(data, arch, message):
    with pytest.raises(ValueError, match=message):
        train_scorenet(data, arch, steps=1, progress=False)


def test_bad_training_arguments():
    data = np.zeros((4, 2))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train_scorenet(data, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_scorenet(data, lr=0.0, progress=False)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        train_scorenet(data, ema_decay=1.0, progress=False)
    with pytest.raises(ValueError, match="divisible by heads"):
        ScoreNetConfig("seq", (8, 4), hidden=30, heads=4)


def test_dsm_loss_of_zero_network_is_one():
    net = build_network(ScoreNetConfig("mlp", (3,)))
    torch.nn.init.zeros_(net.out[1].weight)
    torch.nn.init.zeros_(net.out[1].bias)
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(20000, 3, generator=gen)
    loss = dsm_loss(net, torch.randn(20000, 3, generator=gen), torch.rand(20000, generator=gen), eps)
    assert loss.item() == pytest.approx(eps.pow(2).mean().item())


# -- the command ------------------------------------------------------------------------------------


def test_pretrain_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32))
    out = tmp_path / "net"
    code = main(["pretrain", "--data", str(data), "--out", str(out), "--steps", "40", "--hidden", "16", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert report["arch"] == "mlp" and report["event_shape"] == [2] and report["steps"] == 40
    assert report["final_loss"] < report["initial_loss"]
    chain = load_scorenet(out, num_steps=10)
    assert chain.net.summary.final_loss == report["final_loss"]
    # one-hot sequences pick arch seq from the data's ndim
    np.save(tmp_path / "seq.npy", one_hot_data(32))
    assert main(["pretrain", "--data", str(tmp_path / "seq.npy"), "--out", str(tmp_path / "seq"), "--steps", "3",
                 "--hidden", "16"]) == 0
    assert "use it in a task as" in capsys.readouterr().out
    assert load_scorenet(tmp_path / "seq", num_steps=5).event_shape == (8, 4)


def test_pretrain_cli_bad_data_files(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "text.npy").write_text("hello")
    assert main(["pretrain", "--data", str(tmp_path / "text.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a readable .npy array" in capsys.readouterr().err
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    assert main(["pretrain", "--data", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_registry_builder_loads_the_directory_and_names_a_missing_path(gmm_net, tmp_path):
    from rlft import registry

    build = registry.resolve("model", "scorenet")
    out = save_scorenet(gmm_net, tmp_path / "model")
    chain = build(ScoreNetModelConfig(type="scorenet", path=str(out)), 12)
    assert isinstance(chain, ScoreNetChain) and chain.num_steps == 12
    with pytest.raises(FileNotFoundError, match=r"model.path .*nope.* does not exist; pretrain .*rlft pretrain"):
        build(ScoreNetModelConfig(type="scorenet", path=str(tmp_path / "nope")), 12)
