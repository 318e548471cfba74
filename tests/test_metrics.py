"""Metrics against naive loops and closed forms: energy distance, sliced Wasserstein, diversity, J, J*, gap closure."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlft import metrics

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _naive_energy(x: torch.Tensor, y: torch.Tensor) -> float:
    def mean_dist(a, b):
        return sum(float(torch.linalg.norm(ai - bj)) for ai in a for bj in b) / (len(a) * len(b))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


# -- energy distance ------------------------------------------------------------------------------


def test_energy_distance_equals_the_naive_v_statistic_when_one_block():
    x = torch.randn(7, 3, generator=_gen(0), dtype=F64)
    y = torch.randn(9, 3, generator=_gen(1), dtype=F64) + 0.3
    assert metrics.energy_distance(x, y, block_size=7) == pytest.approx(_naive_energy(x, y), rel=1e-12)
    assert metrics.energy_distance(x, y) == pytest.approx(_naive_energy(x, y), rel=1e-12)
    # events of any shape are flattened
    assert metrics.energy_distance(x.reshape(7, 3, 1), y.reshape(9, 3, 1)) == pytest.approx(_naive_energy(x, y), rel=1e-12)


def test_energy_distance_averages_disjoint_blocks():
    x = torch.randn(9, 2, generator=_gen(2), dtype=F64)
    y = torch.randn(10, 2, generator=_gen(3), dtype=F64)
    # min(9, 10) // 3 = 3 blocks: x in 3+3+3, y in 4+3+3 (torch.tensor_split), block i with block i
    expected = (
        _naive_energy(x[:3], y[:4]) + _naive_energy(x[3:6], y[4:7]) + _naive_energy(x[6:], y[7:])
    ) / 3
    assert metrics.energy_distance(x, y, block_size=3) == pytest.approx(expected, rel=1e-12)


def test_energy_distance_bias_under_h0_and_a_clear_shift():
    # Under H0 each block's V-statistic has mean 2 E|X-X'| / b; in 1-D N(0,1), E|X-X'| = 2/sqrt(pi).
    b = 200
    x = torch.randn(40_000, 1, generator=_gen(4), dtype=F64)
    y = torch.randn(40_000, 1, generator=_gen(5), dtype=F64)
    bias = 2 * (2 / math.sqrt(math.pi)) / b
    assert metrics.energy_distance(x, y, block_size=b) == pytest.approx(bias, rel=0.25)
    # 2-D: same-distribution figure ~ the exact-vs-exact floor; a 0.5 shift is many times larger
    x2, y2, z2 = (torch.randn(4000, 2, generator=_gen(s), dtype=F64) for s in (6, 7, 8))
    floor = metrics.energy_distance(z2, y2, block_size=500)
    same = metrics.energy_distance(x2, y2, block_size=500)
    shifted = metrics.energy_distance(x2 + torch.tensor([0.5, 0.0], dtype=F64), y2, block_size=500)
    assert 0.5 * floor < same < 2.0 * floor
    assert shifted > 8.0 * floor


def test_energy_distance_checks_its_inputs():
    with pytest.raises(ValueError, match=r"same event size \(got 2 and 3"):
        metrics.energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"block_size must be >= 1"):
        metrics.energy_distance(torch.zeros(4, 2), torch.zeros(4, 2), block_size=0)


# -- sliced Wasserstein ---------------------------------------------------------------------------


def test_sliced_wasserstein_in_1d_is_the_empirical_w2():
    x = torch.randn(500, 1, generator=_gen(9), dtype=F64)
    y = 2.0 * torch.randn(500, 1, generator=_gen(10), dtype=F64) + 0.7
    w2 = float(((x.sort(0).values - y.sort(0).values) ** 2).mean().sqrt())  # sorted matching is optimal in 1-D
    assert metrics.sliced_wasserstein(x, y, num_projections=16) == pytest.approx(w2, rel=1e-9)
    # equal-variance Gaussians: W = |mu1 - mu2|
    a = torch.randn(20_000, 1, generator=_gen(11), dtype=F64)
    b = torch.randn(20_000, 1, generator=_gen(12), dtype=F64) + 1.5
    assert metrics.sliced_wasserstein(a, b) == pytest.approx(1.5, abs=0.05)


def test_sliced_wasserstein_of_a_translation():
    # SW_2^2(x, x + c) = E_theta[(theta . c)^2] = |c|^2 / d; the Monte-Carlo over 1024 directions is ~2 % accurate
    x = torch.randn(300, 2, generator=_gen(13), dtype=F64)
    c = torch.tensor([1.0, -1.0], dtype=F64)
    assert metrics.sliced_wasserstein(x, x + c, num_projections=1024, seed=3) == pytest.approx(1.0, rel=0.05)
    assert metrics.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


# -- diversity ------------------------------------------------------------------------------------


def test_mean_pairwise_distance_vs_naive_loop():
    x = torch.randn(12, 3, generator=_gen(14), dtype=F64)
    naive = sum(float(torch.linalg.norm(x[i] - x[j])) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    assert metrics.mean_pairwise_distance(x) == pytest.approx(naive, rel=1e-12)
    assert metrics.mean_pairwise_distance(x[:1]) == 0.0
    big = torch.randn(3000, 2, generator=_gen(15), dtype=F64)
    sub = metrics.mean_pairwise_distance(big, max_samples=500)
    assert sub == metrics.mean_pairwise_distance(big, max_samples=500)  # deterministic
    assert sub == pytest.approx(math.sqrt(math.pi), rel=0.05)  # E|X-X'| for 2-D N(0, I)


def _naive_levenshtein(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _ids(s: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in s], dtype=torch.long)


def test_levenshtein_on_known_strings():
    for a, b, d in [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "abc", 0), ("abc", "", 3), ("", "ab", 2),
                    ("intention", "execution", 5), ("ACGT", "TGCA", 4)]:
        assert metrics.levenshtein_distance(_ids(a), _ids(b)) == d, (a, b)


def test_sequence_diversities_vs_naive_loops():
    seqs = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [3, 1, 2, 0]])  # "ACGT", "ACGA", "TCGA"
    assert metrics.hamming_diversity(seqs) == pytest.approx(4 / 3)  # pairs: 1, 2, 1
    rand = torch.randint(0, 4, (40, 9), generator=_gen(16))
    pairs = list(itertools.combinations(range(40), 2))
    naive_h = sum(int((rand[i] != rand[j]).sum()) for i, j in pairs) / len(pairs)
    naive_l = sum(_naive_levenshtein(rand[i].tolist(), rand[j].tolist()) for i, j in pairs) / len(pairs)
    assert metrics.hamming_diversity(rand) == pytest.approx(naive_h, rel=1e-12)
    assert metrics.levenshtein_diversity(rand, chunk_pairs=97) == pytest.approx(naive_l, rel=1e-12)
    onehot = torch.nn.functional.one_hot(rand, 4).double()  # (n, L, V) inputs are reduced by argmax
    assert metrics.hamming_diversity(onehot) == pytest.approx(naive_h, rel=1e-12)
    assert metrics.levenshtein_diversity(rand) <= metrics.hamming_diversity(rand)
    with pytest.raises(ValueError, match=r"integer token ids"):
        metrics.hamming_diversity(rand.double())


def test_distinct_fraction():
    seqs = torch.tensor([[0, 1], [0, 1], [1, 0], [2, 2]])
    assert metrics.distinct_fraction(seqs) == pytest.approx(0.75)
    assert metrics.distinct_fraction(torch.zeros(5, 3, dtype=torch.long)) == pytest.approx(0.2)


# -- rewards, J, J*, gap closure ------------------------------------------------------------------


def test_reward_summary_and_objective():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=F64)
    s = metrics.reward_summary(r)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)
    assert s == pytest.approx({"mean": 3.0, "std": std, "se": std / 2})
    assert metrics.reward_summary(torch.tensor([5.0]))["std"] == 0.0
    kl = torch.tensor([0.5, 0.5, 1.0, 2.0], dtype=F64)
    assert metrics.objective(r, kl, 2.0) == pytest.approx(3.0 - 2.0 * 1.0)
    with pytest.raises(ValueError, match=r"same shape"):
        metrics.objective(r, kl[:3], 1.0)


def test_optimal_objective_mc_is_stable_and_matches_closed_forms():
    # no overflow: exp(1e6) would overflow; alpha log mean exp(r/alpha) = 1000 + alpha log(2/3) + O(e^-1000)
    r = torch.tensor([1000.0, 999.0, 1000.0], dtype=F64)
    assert metrics.optimal_objective_mc(r, 1e-3) == pytest.approx(1000.0 + 1e-3 * math.log(2 / 3), abs=1e-12)
    assert metrics.optimal_objective_mc(r, 0.0) == 1000.0
    assert math.isfinite(metrics.optimal_objective_mc(r.float(), 1e-6))
    # Gaussian r ~ N(mu, s^2): alpha log E exp(r/alpha) = mu + s^2/(2 alpha); quantile 'samples' of N(0, 1)
    n = 200_000
    z = torch.special.ndtri((torch.arange(n, dtype=F64) + 0.5) / n)
    mu, s, alpha = 0.3, 0.8, 1.0
    assert metrics.optimal_objective_mc(mu + s * z, alpha) == pytest.approx(mu + s**2 / (2 * alpha), abs=2e-3)
    assert metrics.optimal_objective_mc(r, 5.0) >= float(r.mean())  # Jensen
    torch.testing.assert_close(metrics.log_mean_exp(torch.tensor([1e4, 1e4], dtype=F64)), torch.tensor(1e4, dtype=F64))
    with pytest.raises(ValueError, match=r"alpha must be >= 0"):
        metrics.optimal_objective_mc(r, -1.0)


def test_gap_closure():
    assert metrics.gap_closure(3.0, 1.0, 5.0) == pytest.approx(0.5)
    assert metrics.gap_closure(1.0, 1.0, 5.0) == 0.0
    assert metrics.gap_closure(5.0, 1.0, 5.0) == pytest.approx(1.0)
    assert metrics.gap_closure(-1.0, 1.0, 5.0) == pytest.approx(-0.5)
    assert math.isnan(metrics.gap_closure(2.0, 1.0, 1.0))  # no gap: undefined, not 0
    assert math.isnan(metrics.gap_closure(2.0, 1.0, 0.5))  # J* < J_pre: only Monte-Carlo noise can do that


# -- the standard figures' floor ------------------------------------------------------------------


def test_energy_distance_floor_is_the_mean_of_exact_draws_against_the_reference(gmm2d):
    """`evaluate_run`'s floor: FLOOR_DRAWS exact draws, each against the reference the figure uses (naive loop)."""
    from rlft import evaluation
    from rlft.rewards.builtin import QuadraticReward

    reward, alpha, n, seed = QuadraticReward([2.0, 2.0], 2.0), 1.0, 400, 3
    evaluation.clear_cache()
    out = evaluation.evaluate_run(gmm2d, reward, alpha, num_samples=n, seed=seed)
    target = gmm2d.exact_target(reward, alpha).mixture
    g = torch.Generator().manual_seed(seed + 10_000 + 1)  # the pretrained figures' seed + 1
    reference = target.sample(n, g)
    draws = [metrics.energy_distance(target.sample(n, g), reference, evaluation._block(n)) for _ in range(evaluation.FLOOR_DRAWS)]
    assert evaluation.FLOOR_DRAWS >= 4 and len(set(draws)) == len(draws)
    assert out["energy_distance_floor"] == pytest.approx(sum(draws) / len(draws), rel=1e-12)
    # the pretrained model is far from the tilted target, the figure of the pretrained samples far above the floor
    assert out["pretrained"]["energy_distance"] > 5 * out["energy_distance_floor"]


def test_optimal_objective_mc_se_matches_closed_form_and_the_spread_of_the_estimate():
    """r ~ N(0, 1), alpha = 1: w = e^r is log-normal, sd(w)/mean(w) = sqrt(e - 1), so se = sqrt(e - 1)/sqrt(n);
    and the estimator's own spread over independent draws is that se (delta method)."""
    import math

    import torch

    from rlft.metrics import optimal_objective_mc, optimal_objective_mc_se

    n = 4000
    g = torch.Generator().manual_seed(0)
    big = torch.randn(400_000, generator=g, dtype=torch.float64)
    assert optimal_objective_mc_se(big, 1.0) * math.sqrt(big.numel()) == pytest.approx(math.sqrt(math.e - 1), rel=0.05)
    draws = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(300)]
    spread = torch.tensor([optimal_objective_mc(r, 1.0) for r in draws]).std().item()
    se = sum(optimal_objective_mc_se(r, 1.0) for r in draws) / len(draws)
    assert se == pytest.approx(spread, rel=0.15)
    assert se == pytest.approx(math.sqrt(math.e - 1) / math.sqrt(n), rel=0.1)
    assert optimal_objective_mc_se(draws[0], 0.0) == 0.0
