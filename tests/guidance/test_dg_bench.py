"""`rlft bench dg` on a tiny grid: its E_phi and gradient profile pinned by the exact and the zero discriminator.

With the exact log-ratio l = log q_P,k - log q_P~,k plugged in as the discriminator, grad l IS the exact correction:
E_phi must be ~0 (to float64 round-off), the refinement value E_theta - E_phi equals E_theta, and |grad l| equals
|exact correction| along the profile line. With the sign flipped (l -> -l), E_phi = 4 E_theta exactly (the error is
twice the exact correction). With l = 0, E_phi = E_theta.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

import rlft.benchmarks.dg as dg
from rlft.models.gmm import GaussianMixture


class ExactLogRatio(nn.Module):
    """l(x, n_k) = sign (log q_P,k(x) - log q_P~,k(x)), the level looked up by the noise std n_k."""

    def __init__(self, levels, sign: float = 1.0) -> None:
        super().__init__()
        self.noise_std, self.sign = levels.noise_std.double(), sign
        p = GaussianMixture.create(dg.P["weights"], dg.P["means"], dg.P["stds"])
        q = GaussianMixture.create(dg.P_WRONG["weights"], dg.P_WRONG["means"], dg.P_WRONG["stds"])
        ab = (levels.signal.double() ** 2).tolist()
        self.p, self.q = [p.diffuse(a) for a in ab], [q.diffuse(a) for a in ab]

    def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        k = int(torch.argmin((self.noise_std - float(noise_std[0])).abs()))
        return self.sign * (self.p[k].log_prob(x) - self.q[k].log_prob(x))


class Zero(nn.Module):
    def forward(self, x, noise_std):
        return 0.0 * x.sum(1)


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(objectives=["ce", "mse_ce"], widths=[8], sizes=[40, 80], updates=2, batch_size=16, gamma=1.0,
                num_steps=10, eval_samples=200, seed=0, threads=1, out=str(tmp_path / "out"), json=True, optimum=False,
                sections=["exact"], gammas=[0.1, 10.0])
    base.update(kw)
    return argparse.Namespace(**base)


def _levels(args):
    return dg.build("ce", 8, 40, args).levels


def test_e_phi_of_the_exact_correction_is_zero_and_its_profile_matches(tmp_path):
    args = _args(tmp_path)
    c = dg.cell("ce", 8, 40, args, logit=ExactLogRatio(_levels(args)))
    assert c["e_theta"] > 1.0  # the wrong mixture is far off
    assert c["e_phi"] == pytest.approx(0.0, abs=1e-9 * c["e_theta"])
    assert c["refinement"] == pytest.approx(c["e_theta"], rel=1e-9)
    for figures in c["profile"]["levels"].values():
        torch.testing.assert_close(torch.tensor(figures["grad_norm"]), torch.tensor(figures["exact_norm"]),
                                   rtol=1e-9, atol=1e-9)
        assert max(figures["exact_norm"]) > 0.5  # the line crosses the shifted mode: a real correction there
    assert c["energy_distance"] < c["pretrained_energy_distance"]


def test_e_phi_of_the_flipped_and_of_the_zero_discriminator(tmp_path):
    args = _args(tmp_path)
    flipped = dg.cell("ce", 8, 40, args, logit=ExactLogRatio(_levels(args), sign=-1.0))
    assert flipped["e_phi"] == pytest.approx(4.0 * flipped["e_theta"], rel=1e-9)  # |-e - e|^2 = 4 |e|^2
    zero = dg.cell("ce", 8, 40, args, logit=Zero())
    assert zero["e_phi"] == pytest.approx(zero["e_theta"], rel=1e-12) and zero["refinement"] == pytest.approx(0.0, abs=1e-12)


def test_the_bench_runs_a_tiny_grid_and_writes_json_table_and_pngs(tmp_path, capsys):
    args = _args(tmp_path)
    assert dg.run(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert [(c["objective"], c["n"]) for c in result["cells"]] == [("ce", 40), ("ce", 80), ("mse_ce", 40), ("mse_ce", 80)]
    for c in result["cells"]:
        assert c["refinement"] == pytest.approx(c["e_theta"] - c["e_phi"]) and c["energy_distance_floor"] > 0
    assert "E_phi" in err and "ED/floor" in err
    assert [p.rsplit("/", 1)[1] for p in result["pngs"]] == ["dg_gradient_norm.png", "dg_samples.png"]
    assert all((tmp_path / "out" / name).stat().st_size > 0 for name in ("dg_gradient_norm.png", "dg_samples.png",
                                                                         "results.json"))


def test_the_over_fitted_optimum_approaches_the_exact_correction_as_n_grows(tmp_path):
    """The logit log q^_N,k - log q~_k of N data points (every objective's minimiser on the finite data, Thm 6) has an
    E_phi below E_theta that shrinks with N: it converges to the exact log-ratio."""
    args = _args(tmp_path)
    small, large = (dg.cell("ce", 8, n, args, logit="optimum") for n in (20, 2000))
    assert large["e_phi"] < 0.5 * small["e_phi"] < 0.5 * small["e_theta"], (small["e_phi"], large["e_phi"])


# -- sections beyond the toy (rlft.benchmarks.dg_sections) --------------------------------------------------------


def test_frechet_distance_matches_the_closed_forms():
    """1-D: (m1 - m2)^2 + (s1 - s2)^2; non-commuting covariances: tr(A + B - 2 (A^1/2 B A^1/2)^1/2) by eigh."""
    import numpy as np

    from rlft.benchmarks.dg_sections import frechet_distance

    one = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert one == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal((2, 4, 4))
    A, B = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)

    def psd_root(S):
        w, V = np.linalg.eigh(S)
        return (V * np.sqrt(np.clip(w, 0, None))) @ V.T

    ra = psd_root(A)
    mu_a, mu_b = rng.standard_normal(4), rng.standard_normal(4)
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(A + B - 2 * psd_root(ra @ B @ ra))
    assert frechet_distance(mu_a, A, mu_b, B) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu_a, A, mu_a, A) == pytest.approx(0.0, abs=1e-9)


def test_digit_features_are_the_classifiers_penultimate_layer_and_label_figures_count_predictions():
    from rlft.benchmarks.dg_sections import digit_features, label_figures
    from rlft.tasks.digits import NOT_A_DIGIT, DigitCNN

    torch.manual_seed(0)
    net = DigitCNN().double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net.fc2(digit_features(net, x)), net(x), rtol=1e-12, atol=1e-12)

    class Fixed(nn.Module):  # predicts class i for image i
        def __init__(self, classes):
            super().__init__()
            self.classes = classes

        def forward(self, x):
            return 10.0 * nn.functional.one_hot(torch.tensor(self.classes), NOT_A_DIGIT + 1).float()

    data_labels = torch.tensor([0, 1, 2, 3] * 5)  # 0..3 at 1/4 each
    figures = label_figures(Fixed([0, 0, 1, NOT_A_DIGIT]), torch.zeros(4, 1, 8, 8), data_labels)
    # digits predicted: 0, 0, 1 -> (2/3, 1/3, 0, 0) against (1/4, 1/4, 1/4, 1/4): TV = (5/12 + 1/12 + 1/4 + 1/4) / 2
    assert figures["label_tv"] == pytest.approx(0.5, rel=1e-12) and figures["not_a_digit"] == pytest.approx(0.25)


def test_the_gamma_scorenet_and_digits_sections_run_tiny(tmp_path, capsys):
    args = _args(tmp_path, sizes=[40], sections=["gamma", "scorenet", "digits"], scorenet_steps=[5],
                 scorenet_updates=2, digits_steps=2, digits_updates=2, digits_objective="mse_ce", digits_num_steps=4,
                 digits_samples=16, digits_model_samples=32)
    assert dg.run(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["cells"] == [] and [c["gamma"] for c in result["gamma_cells"]] == [0.1, 10.0]
    (s,), d = result["sections"]["scorenet"]["rows"], result["sections"]["digits"]
    assert s["energy_distance_floor"] > 0 and s["pretrained_energy_distance"] > s["energy_distance_floor"]
    assert s["fresh"]["floor"] > 0 and s["fresh"]["pretrained"] > s["fresh"]["floor"]
    assert d["frechet_floor"] >= 0 and {"frechet", "label_tv", "not_a_digit"} <= set(d["refined"])
    assert (tmp_path / "out" / "dg_digits.png").stat().st_size > 0 and "Fréchet" in err and "scorenet" in err
