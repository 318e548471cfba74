"""Metrics of a fine-tuned sampler: reward summaries, J and J*, the gap closure, sample-set distances, diversity.

    J  = E[r(x_K)] - alpha E[path KL]                         (ELEGANT Eq. 5; MATH.md §2)
    J* = alpha log E_pre[exp(r/alpha)]                         (Donsker-Varadhan; Monte-Carlo: log-mean-exp)
    gap closure = (J - J_pre) / (J* - J_pre)

Sample-set distances: the energy distance (block-averaged V-statistic, below) and the sliced Wasserstein
distance (POT's `ot.sliced_wasserstein_distance`). Diversity: mean pairwise Euclidean distance; for token
sequences the mean pairwise Hamming and Levenshtein distances (ELEGANT §8 uses Levenshtein) and the
fraction of distinct sequences.

All figures are computed in float64 and returned as Python floats. Pure torch (plus numpy/POT).
"""

from __future__ import annotations

import math

import torch

# cdist entries held at once by the chunked pairwise sums (~32 MB in float64)
_CHUNK_ENTRIES = 4_000_000


# -- rewards and objectives -----------------------------------------------------------------------


def _vec(values: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to(torch.float64).cpu()
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor (n,) (got shape {tuple(t.shape)})")
    return t


def reward_summary(values: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation (n-1 denominator; 0 for n = 1) and standard error of rewards (n,)."""
    r = _vec(values, "values")
    n = r.numel()
    std = float(r.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(r.mean()), "std": std, "se": std / math.sqrt(n)}


def objective(reward_values: torch.Tensor, kl: torch.Tensor, alpha: float) -> float:
    """J = mean(r) - alpha mean(kl) (ELEGANT Eq. 5) from per-sample rewards (n,) and path KLs (n,)."""
    r, k = _vec(reward_values, "reward_values"), _vec(kl, "kl")
    if r.shape != k.shape:
        raise ValueError(f"reward_values {tuple(r.shape)} and kl {tuple(k.shape)} must have the same shape (n,)")
    return float(r.mean() - alpha * k.mean())


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log mean exp(x) along `dim`, without overflow (logsumexp - log n)."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def optimal_objective_mc(reward_values: torch.Tensor, alpha: float) -> float:
    """Monte-Carlo J* = alpha log mean_i exp(r_i / alpha) over pretrained samples (MATH.md §2).

    Stable for small alpha and large rewards (log-sum-exp in float64); alpha = 0 gives max r, the limit.
    On the same samples it is >= mean r (Jensen), and it is biased low for small alpha (the max of n draws).
    """
    r = _vec(reward_values, "reward_values")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (got {alpha})")
    if alpha == 0:
        return float(r.max())
    return float(alpha * log_mean_exp(r / alpha))


def optimal_objective_mc_se(reward_values: torch.Tensor, alpha: float) -> float:
    """Standard error of `optimal_objective_mc` by the delta method: with w_i = exp(r_i / alpha) and
    J* = alpha log mean w, se = alpha * sd(w) / (mean(w) sqrt(n)), computed as sd(w / max w) / mean(w / max w)
    so that it does not overflow; 0 for alpha = 0 (the max, no sampling error to first order)."""
    r = _vec(reward_values, "reward_values").double()
    if not alpha > 0 or r.numel() < 2:
        return 0.0
    w = torch.exp(r / alpha - (r / alpha).max())
    return float(alpha * w.std(unbiased=True) / (w.mean() * math.sqrt(r.numel())))


def gap_closure(objective: float, pretrained_objective: float, optimal_objective: float) -> float:
    """(J - J_pre) / (J* - J_pre): 0 for the pretrained model, 1 at the optimum.

    Returns NaN when there is no gap to close: J* - J_pre <= 1e-12 * max(1, |J*|, |J_pre|) (e.g. a constant
    reward, where every sampler is optimal, or a Monte-Carlo J* below J_pre, which only noise can produce).
    A NaN fails `rlft.evaluation.is_finite_report` on purpose: the figure is undefined, not zero.
    """
    gap = optimal_objective - pretrained_objective
    scale = max(1.0, abs(optimal_objective), abs(pretrained_objective))
    if not gap > 1e-12 * scale:
        return math.nan
    return float((objective - pretrained_objective) / gap)


# -- pairwise sums --------------------------------------------------------------------------------


def _flat64(x: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64).cpu()
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (n, ...) (got shape {tuple(t.shape)})")
    return t.reshape(t.shape[0], -1)  # (n, D)


def _sum_cdist(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_{i,j} |a_i - b_j| for a (n, D), b (m, D), in row chunks so memory stays bounded."""
    rows = max(1, _CHUNK_ENTRIES // max(1, b.shape[0]))
    total = 0.0
    for start in range(0, a.shape[0], rows):
        # compute_mode: the exact difference form, never the |a|^2 + |b|^2 - 2ab shortcut (cancellation)
        total += float(torch.cdist(a[start : start + rows], b, compute_mode="donot_use_mm_for_euclid_dist").sum())
    return total


def _check_events(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same event size (got {x.shape[1]} and {y.shape[1]} after flattening)")


# -- sample-set distances -------------------------------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor, block_size: int = 2048) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between sample sets, as a block-averaged V-statistic.

    Each set is split into B = max(1, min(n, m) // block_size) contiguous blocks of >= block_size samples
    (all samples used; samples must be in exchangeable order, as i.i.d. draws are); block i of x is paired
    with block i of y, the V-statistic (self-pairs' zero distances included) is computed on each pair, and
    the B figures are averaged. With block_size >= min(n, m) this is the plain V-statistic on all samples.

    Why blocks: under H0 (same distribution) a single V-statistic on n samples has mean ~ 2 E|X-X'|/n and a
    spread of the same order, so comparing a sampler's figure with the exact-vs-exact floor would be a coin
    toss. Averaging over B blocks of size b keeps the positive bias 2 E|X-X'|/b identical for the figure and
    the floor while shrinking the spread by sqrt(B); a genuine discrepancy D adds to it (figure ~ D + bias).

    Args:
        x: samples (n, ...), flattened to (n, D).
        y: samples (m, ...), flattened to (m, D).
        block_size: minimum samples per block.
    Returns:
        The block-averaged energy distance (float64), >= 0 up to rounding.
    """
    a, b = _flat64(x, "x"), _flat64(y, "y")
    _check_events(a, b)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    blocks = max(1, min(a.shape[0], b.shape[0]) // block_size)
    values = []
    for xa, yb in zip(torch.tensor_split(a, blocks), torch.tensor_split(b, blocks)):
        n, m = xa.shape[0], yb.shape[0]
        xy = _sum_cdist(xa, yb) / (n * m)
        xx = _sum_cdist(xa, xa) / (n * n)
        yy = _sum_cdist(yb, yb) / (m * m)
        values.append(2.0 * xy - xx - yy)
    return float(sum(values) / len(values))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between sample sets (POT's `ot.sliced_wasserstein_distance`, p = 2).

    Events are flattened to vectors; uniform weights; `num_projections` random directions drawn with `seed`.
    In 1-D it equals the 2-Wasserstein distance between the empirical distributions.
    """
    import ot

    a, b = _flat64(x, "x"), _flat64(y, "y")
    _check_events(a, b)
    return float(ot.sliced_wasserstein_distance(a.numpy(), b.numpy(), n_projections=num_projections, p=2, seed=seed))


# -- diversity ------------------------------------------------------------------------------------


def _subsample(n: int, max_samples: int) -> torch.Tensor | None:
    """Deterministic subset of indices (seeded permutation) when n > max_samples, else None."""
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2 (got {max_samples})")
    if n <= max_samples:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_samples]


def mean_pairwise_distance(x: torch.Tensor, max_samples: int = 2000) -> float:
    """Mean Euclidean distance over distinct pairs i != j (diversity); deterministic subsample beyond max_samples.

    Args:
        x: samples (n, ...), flattened to (n, D).
        max_samples: at most this many samples are used (a fixed-seed random subset), so cost is bounded.
    Returns:
        The mean distance, 0.0 for a single sample.
    """
    a = _flat64(x, "x")
    idx = _subsample(a.shape[0], max_samples)
    if idx is not None:
        a = a[idx]
    n = a.shape[0]
    if n < 2:
        return 0.0
    return _sum_cdist(a, a) / (n * (n - 1))


def _tokens(seqs: torch.Tensor) -> torch.Tensor:
    """(n, L) integer tokens; one-hot / probability inputs (n, L, V) are reduced by argmax."""
    t = torch.as_tensor(seqs).detach().cpu()
    if t.ndim == 3:
        t = t.argmax(-1)  # (n, L)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"seqs must be token ids (n, L) or one-hot (n, L, V) (got shape {tuple(t.shape)})")
    if t.is_floating_point():
        raise ValueError("seqs must hold integer token ids (n, L); pass one-hot sequences as (n, L, V)")
    return t.long()


def hamming_diversity(seqs: torch.Tensor) -> float:
    """Mean pairwise Hamming distance (differing positions) over distinct pairs i != j.

    Exact and O(n L): per position, the ordered pairs that agree are sum_c n_c (n_c - 1), n_c the count of token c.

    Args:
        seqs: token ids (n, L) (or one-hot (n, L, V)).
    """
    t = _tokens(seqs)
    n, length = t.shape
    if n < 2:
        return 0.0
    t = t - t.min()
    counts = torch.zeros(length, int(t.max()) + 1, dtype=torch.float64)  # (L, V)
    counts.scatter_add_(1, t.T.contiguous(), torch.ones(length, n, dtype=torch.float64))
    agree = (counts * (counts - 1)).sum()
    return float((length * n * (n - 1) - agree) / (n * (n - 1)))


def _levenshtein_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Edit distances between rows a (P, L1) and b (P, L2): the Wagner-Fischer DP, one row at a time.

    Row i: D[i, j] = min(D[i-1, j] + 1, D[i-1, j-1] + [a_i != b_j], D[i, j-1] + 1). The last (left-to-right)
    dependency unrolls to D[i, j] = j + min_{k <= j} (c_k - k) with c the first two options, a cummin.
    """
    p, l2 = b.shape
    ar = torch.arange(l2 + 1)
    prev = ar.expand(p, l2 + 1).clone()  # (P, L2+1): D[0, j] = j
    for i in range(a.shape[1]):
        sub = prev[:, :-1] + (a[:, i : i + 1] != b).long()  # (P, L2)
        cand = torch.cat([torch.full((p, 1), i + 1), torch.minimum(prev[:, 1:] + 1, sub)], dim=1)
        prev = torch.cummin(cand - ar, dim=1).values + ar
    return prev[:, -1]


def levenshtein_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Edit distance between two token sequences (1-D tensors)."""
    return int(_levenshtein_pairs(torch.as_tensor(a).reshape(1, -1), torch.as_tensor(b).reshape(1, -1))[0])


def levenshtein_diversity(seqs: torch.Tensor, max_samples: int = 300, chunk_pairs: int = 50_000) -> float:
    """Mean pairwise Levenshtein (edit) distance over distinct pairs (ELEGANT §8's diversity for sequences).

    A vectorised Wagner-Fischer DP over all pairs at once (L torch steps per chunk of pairs); no extra package.
    Beyond `max_samples` sequences a deterministic subsample is used.

    Args:
        seqs: token ids (n, L) (or one-hot (n, L, V)).
        max_samples: at most this many sequences (n(n-1)/2 pairs).
        chunk_pairs: pairs per DP batch (memory ~ chunk_pairs * L integers).
    """
    t = _tokens(seqs)
    idx = _subsample(t.shape[0], max_samples)
    if idx is not None:
        t = t[idx]
    n = t.shape[0]
    if n < 2:
        return 0.0
    i, j = torch.triu_indices(n, n, offset=1)
    total = 0
    for start in range(0, i.numel(), chunk_pairs):
        sl = slice(start, start + chunk_pairs)
        total += int(_levenshtein_pairs(t[i[sl]], t[j[sl]]).sum())
    return total / i.numel()


def distinct_fraction(seqs: torch.Tensor) -> float:
    """Fraction of distinct sequences among n (1.0: all different; 1/n: all the same)."""
    t = _tokens(seqs)
    return torch.unique(t, dim=0).shape[0] / t.shape[0]
