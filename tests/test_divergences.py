"""f-divergences (TANG §4, MATH.md §4): f' vs its inverse, the lambda root against closed forms and quadrature,
the r_f map, Def. 4.2's direction check, and the variational check that ties each f to its name and direction.
(The f-regularised reward built on them is tested in tests/rewards/test_f_regularised.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from rlft import divergences as dv

ALL = ["kl", "forward_kl", "gamma:0.3", "gamma:0.7", "chi2", "js", "hellinger"]


@pytest.fixture(autouse=True)
def _float64():
    """Math tests run in float64 (restored afterwards so other test files keep float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _quantile_normal(n: int) -> torch.Tensor:
    """Deterministic N(0, 1) 'samples' x_i = Phi^{-1}((i - 1/2)/n): means over them are quadrature rules."""
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)


def _grid_lambda(r_fn, alpha: float, div: dv.FDivergence) -> float:
    """lambda with int (f')^{-1}((r(x) - lambda)/alpha) N(x; 0, 1) dx = 1, by trapezoid quadrature + bisection."""
    x = torch.linspace(-12.0, 12.0, 24_001)
    dens = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    r = r_fn(x)

    def integral(lam: float) -> float:
        return float(torch.trapezoid(div.f_prime_inv((r - lam) / alpha) * dens, x))

    lo, hi = float(r.max()) - alpha * float(div.f_prime(torch.tensor(1e6))), float(r.max()) - alpha * float(div.f_prime(torch.tensor(1.0)))
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if integral(mid) > 1.0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("name", ALL)
def test_f_prime_and_inverse_are_inverses_on_their_domains(name):
    div = dv.get_divergence(name)
    t = torch.logspace(-3, 3, 301)
    torch.testing.assert_close(div.f_prime_inv(div.f_prime(t)), t, rtol=1e-9, atol=1e-12)
    lo, hi = div.domain
    y = div.f_prime(t)  # points of the range of f'
    assert bool((y > lo).all() and (y < hi).all())
    torch.testing.assert_close(div.f_prime(div.f_prime_inv(y)), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(div.log_ratio(y), torch.log(t), rtol=1e-9, atol=1e-9)
    assert bool((torch.diff(y) > 0).all()), "f' must be strictly increasing"


@pytest.mark.parametrize("name", ALL)
def test_f_prime_is_the_derivative_of_f(name):
    div = dv.get_divergence(name)
    t = torch.tensor([0.2, 0.7, 1.0, 1.5, 4.0], requires_grad=True)
    (grad,) = torch.autograd.grad(div.f(t).sum(), t)
    torch.testing.assert_close(grad, div.f_prime(t.detach()), rtol=1e-10, atol=1e-12)
    assert abs(float(div.f(torch.tensor(1.0)))) < 1e-12  # f(1) = 0
    assert abs(float(div.f_prime_inv(div.f_prime(torch.tensor(1.0)))) - 1.0) < 1e-12


def test_kl_lambda_has_its_closed_form():
    # KL: mean exp((r - lambda)/alpha - 1) = 1  <=>  lambda = alpha log mean exp(r/alpha) - alpha
    g = torch.Generator().manual_seed(0)
    r = 3.0 * torch.randn(1000, generator=g)
    for alpha in (0.1, 1.0, 5.0):
        exact = alpha * (torch.logsumexp(r / alpha, 0) - math.log(r.numel())) - alpha
        assert dv.solve_lambda(r, alpha, "kl") == pytest.approx(float(exact), abs=1e-8)
    # population: p_pre = N(0,1), r = b x  ->  lambda = b^2/(2 alpha) - alpha; Monte-Carlo error ~ alpha * sd(w)/sqrt(n)
    b, alpha, n = 1.0, 1.0, 200_000
    x = torch.randn(n, generator=g)
    se = alpha * math.sqrt(math.e - 1.0) / math.sqrt(n)
    assert dv.solve_lambda(b * x, alpha, "kl") == pytest.approx(b**2 / (2 * alpha) - alpha, abs=5 * se)


def test_chi2_lambda_has_its_closed_form_with_the_clip_active():
    # chi^2, r = x ~ N(0,1): w = max(1 + (x - lambda)/(2 alpha), 0), so E[w] = 1 <=> E[(X - c)_+] = 2 alpha with
    # c = lambda - 2 alpha, and E[(X - c)_+] = phi(c) - c (1 - Phi(c)).
    alpha = 0.25
    normal = torch.distributions.Normal(0.0, 1.0)

    def excess(c: float) -> float:
        c_t = torch.tensor(c)
        return float(normal.log_prob(c_t).exp() - c_t * (1 - normal.cdf(c_t)))

    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 2 * alpha else (lo, mid)
    exact = 0.5 * (lo + hi) + 2 * alpha
    x = _quantile_normal(200_000)
    lam = dv.solve_lambda(x, alpha, "chi2")
    assert lam == pytest.approx(exact, abs=2e-4)
    w = dv.f_tilt_weights(x, alpha, "chi2", lam)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-9)
    assert 0.1 < float((w == 0).double().mean()) < 0.9, "the KKT clip must be active in this case"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_lambda_root_makes_the_tilted_density_integrate_to_one(name, alpha):
    div = dv.get_divergence(name)

    def r_fn(x):  # bounded above, so every divergence has a root (forward KL needs lambda > sup r)
        return -0.5 * (x - 1.0) ** 2

    x = _quantile_normal(50_000)
    lam = dv.solve_lambda(r_fn(x), alpha, div)
    w = dv.f_tilt_weights(r_fn(x), alpha, div, lam)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-8)  # the in-sample root
    assert bool((w >= 0).all())
    lam_quad = _grid_lambda(r_fn, alpha, div)  # the population root
    assert lam == pytest.approx(lam_quad, abs=1e-5 * alpha)
    # a fresh Monte-Carlo sample integrates the tilted density to one within its standard error
    g = torch.Generator().manual_seed(1)
    fresh = dv.f_tilt_weights(r_fn(torch.randn(50_000, generator=g)), alpha, div, lam, max_ratio=1e9)
    se = float(fresh.std()) / math.sqrt(fresh.numel())
    assert float(fresh.mean()) == pytest.approx(1.0, abs=4 * se)


def test_forward_kl_lambda_respects_its_domain():
    r = torch.tensor([0.0, 1.0, 2.0, 5.0])
    lam = dv.solve_lambda(r, 0.5, "forward_kl")
    assert lam > 5.0  # (r - lambda)/alpha < 0 for every sample
    assert float(dv.f_tilt_weights(r, 0.5, "forward_kl", lam).mean()) == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match=r"y = \(r - lambda\)/alpha < 0"):
        dv.f_tilt_weights(torch.tensor([lam + 1.0]), 0.5, "forward_kl", lam)
    capped = dv.f_tilt_weights(torch.tensor([lam + 1.0]), 0.5, "forward_kl", lam, max_ratio=100.0)
    assert float(capped) == pytest.approx(100.0)


def test_kl_f_reward_is_the_exp_tilt_up_to_a_constant():
    g = torch.Generator().manual_seed(2)
    r = 2.0 * torch.randn(500, generator=g)
    alpha = 0.7
    lam = dv.solve_lambda(r, alpha, "kl")
    rf = dv.f_reward(r, alpha, "kl", lam)
    torch.testing.assert_close(rf - r / alpha, torch.full_like(r, -lam / alpha - 1.0))
    # exp(r_f) p_pre integrates to one over the pretrained samples: the normaliser is built in
    assert float(torch.exp(rf).mean()) == pytest.approx(1.0, abs=1e-9)
    fn = dv.f_reward(lambda x: x.sum(-1), alpha, "kl", lam)
    torch.testing.assert_close(fn(r.unsqueeze(-1)), rf)


@pytest.mark.parametrize("name", ALL)
def test_f_reward_is_increasing_and_differentiable(name):
    r = torch.linspace(-3.0, 0.0, 50, requires_grad=True)
    lam = dv.solve_lambda(r.detach(), 0.5, name)
    rf = dv.f_reward(r, 0.5, name, lam)
    assert bool(torch.isfinite(rf).all())
    assert bool((torch.diff(rf) >= 0).all())
    (grad,) = torch.autograd.grad(rf.sum(), r)
    assert bool((grad >= 0).all() and (grad > 0).any())


def test_chi2_r_f_stays_finite_and_increasing_where_the_ratio_is_zero():
    # chi^2: ratio = max(1 + y/2, 0); y0 = f'(1e-6) = 2 (1e-6 - 1) is where the ratio reaches min_ratio
    y0 = 2.0 * (1e-6 - 1.0)
    r = torch.tensor([-100.0, -3.0, y0, y0 + 1e-3, 0.0], dtype=torch.float64, requires_grad=True)
    rf = dv.f_reward(r, 1.0, "chi2", 0.0, min_ratio=1e-6)
    assert bool(torch.isfinite(rf).all())
    # below y0: the line log(min_ratio) + (y - y0), continuous at y0; above: the exact log(1 + y/2)
    torch.testing.assert_close(rf[:3], math.log(1e-6) + (r[:3].detach() - y0))
    torch.testing.assert_close(rf[3:], torch.log1p(r[3:].detach() / 2.0))
    (grad,) = torch.autograd.grad(rf.sum(), r)
    torch.testing.assert_close(grad[:2], torch.ones(2, dtype=torch.float64))  # the zero-ratio region still has a slope
    assert bool((grad > 0).all())


def test_tang_def42_raises_for_forward_kl_and_agrees_for_kl():
    r = torch.tensor([0.0, 0.5, 2.0])
    with pytest.raises(ValueError, match=r"(?s)forward_kl.*decreasing.*solve_lambda"):
        dv.tang_def42_reward(r, 1.0, "forward_kl")
    torch.testing.assert_close(dv.tang_def42_reward(r, 2.0, "kl"), r / 2.0 - 1.0)
    # gamma: (f')^{-1}(r/alpha) needs r/alpha < 1/gamma; beyond, Def. 4.2's branch is decreasing
    out = dv.tang_def42_reward(r, 1.0, "gamma:0.3")
    assert bool((torch.diff(out) > 0).all())
    with pytest.raises(ValueError, match=r"needs r/alpha in"):
        dv.tang_def42_reward(torch.tensor([1.0, 4.0]), 1.0, "gamma:0.3")


def test_get_divergence_parses_names_and_lists_choices():
    assert dv.get_divergence("gamma:0.3").name == "gamma:0.3"
    assert dv.get_divergence("reverse_kl").name == "kl"
    with pytest.raises(ValueError, match=r"unknown divergence 'tv'.*'forward_kl'.*'kl'.*'gamma:G'"):
        dv.get_divergence("tv")
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\) \(got 1.5\)"):
        dv.get_divergence("gamma:1.5")
    with pytest.raises(ValueError, match=r"'gamma:G'"):
        dv.get_divergence("gamma:x")
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0"):
        dv.solve_lambda(torch.zeros(3), 0.0, "kl")
    with pytest.raises(ValueError, match=r"finite rewards"):
        dv.solve_lambda(torch.tensor([0.0, math.nan]), 1.0, "kl")


def test_custom_divergence_reproduces_kl_and_rejects_a_decreasing_f_prime():
    custom = dv.custom_divergence(lambda t: torch.log(t) + 1.0, lambda y: torch.exp(y - 1.0), name="my_kl")
    r = torch.randn(300, generator=torch.Generator().manual_seed(3))
    assert dv.solve_lambda(r, 0.4, custom) == pytest.approx(dv.solve_lambda(r, 0.4, "kl"), abs=1e-8)
    bad = dv.custom_divergence(lambda t: -torch.log(t), lambda y: torch.exp(-y), name="decreasing")
    with pytest.raises(ValueError, match=r"'decreasing'.*f' is increasing"):
        dv.solve_lambda(r, 1.0, bad)


# -- the variational check: the f-tilted target maximises E_p[r] - alpha D_f(p || p_pre) ----------------
#
# D_f is written here from each divergence's textbook definition, independent of `FDivergence.f`, so the check
# ties the library's (f')^{-1} to the NAME and the DIRECTION (p || p_pre) the option promises.


def _named_divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D(p || q) over atoms (p >= 0, q > 0) from its definition, float64."""
    if name == "kl":  # KL(p || q)
        return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum()
    if name == "forward_kl":  # KL(q || p): +inf where p = 0
        return (q * (torch.log(q) - torch.log(p))).sum()
    if name == "chi2":  # Pearson chi^2(p || q)
        return ((p - q) ** 2 / q).sum()
    if name == "js":  # Jensen-Shannon, m = (p + q)/2
        m = 0.5 * (p + q)
        return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum() + 0.5 * (q * (torch.log(q) - torch.log(m))).sum()
    if name == "hellinger":  # squared Hellinger, sum (sqrt p - sqrt q)^2
        return ((p.sqrt() - q.sqrt()) ** 2).sum()
    if name.startswith("gamma:"):  # Amari alpha-divergence: (1 - sum p^(1-g) q^g) / (g (1 - g)); KL as g -> 0
        g = float(name.partition(":")[2])
        return (1.0 - (p.pow(1.0 - g) * q.pow(g)).sum()) / (g * (1.0 - g))
    raise AssertionError(name)


# six atoms; p_pre has multiplicities (3, 1, 2, 2, 1, 1)/10, so `solve_lambda` over the repeated rewards is the
# exact root under p_pre. With alpha = 0.4, chi^2's clip is active at the lowest reward (p = 0 there).
_ATOMS_R = torch.tensor([-1.0, 0.3, 0.8, -0.4, 1.5, 0.0], dtype=torch.float64)
_ATOMS_MULT = torch.tensor([3, 1, 2, 2, 1, 1])
_ATOMS_ALPHA = 0.4
VARIATIONAL = ["kl", "forward_kl", "chi2", "js", "hellinger", "gamma:0.5"]
#: each divergence's (f')^{-1} swapped for another's (the negative control)
SWAPPED = {"kl": "forward_kl", "forward_kl": "kl", "chi2": "js", "js": "chi2", "hellinger": "gamma:0.5", "gamma:0.5": "hellinger"}


def _tilted_target(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_pre, p) with p = (f')^{-1}((r - lambda)/alpha) p_pre for the library's divergence `name`."""
    p_pre = _ATOMS_MULT.double() / _ATOMS_MULT.sum()
    lam = dv.solve_lambda(_ATOMS_R.repeat_interleave(_ATOMS_MULT), _ATOMS_ALPHA, name)
    p = dv.f_tilt_weights(_ATOMS_R, _ATOMS_ALPHA, name, lam) * p_pre
    return p_pre, p


def _objective(name: str, p: torch.Tensor, p_pre: torch.Tensor) -> float:
    return float((p * _ATOMS_R).sum() - _ATOMS_ALPHA * _named_divergence(name, p, p_pre))


def _perturbations(p: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Feasible neighbours of p (normalised, >= 0): mixtures towards random points of the simplex at several step
    sizes, and every single move of mass from one atom to another."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in (1e-3, 1e-2, 0.1, 0.5):
        for _ in range(50):
            q = -torch.log(torch.rand(p.numel(), generator=gen, dtype=torch.float64))  # Dirichlet(1)
            out.append((1.0 - t) * p + t * q / q.sum())
    eps = 1e-3
    for i in range(p.numel()):
        for j in range(p.numel()):
            if i != j and p[i] >= eps:
                moved = p.clone()
                moved[i] -= eps
                moved[j] += eps
                out.append(moved)
    return out


@pytest.mark.parametrize("name", VARIATIONAL)
def test_the_f_tilted_target_beats_every_feasible_perturbation_of_itself(name):
    """TANG Prop. 4.1: p = (f')^{-1}((r - lambda)/alpha) p_pre maximises E_p[r] - alpha D_f(p || p_pre) over the simplex."""
    p_pre, p = _tilted_target(name)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-10) and bool((p >= 0).all())
    if name == "chi2":
        assert float(p[0]) == 0.0, "the KKT clip should be active at the lowest reward (the test covers it)"
    best = _objective(name, p, p_pre)
    gaps = torch.tensor([best - _objective(name, other, p_pre) for other in _perturbations(p)])
    assert bool((gaps > 0).all()), f"{name}: {int((gaps <= 0).sum())} perturbations do at least as well (min gap {float(gaps.min()):.3g})"


@pytest.mark.parametrize("name", VARIATIONAL)
def test_the_check_fails_when_f_prime_is_another_divergences(name):
    """Negative control: the tilt of another divergence's (f')^{-1} is beaten under this divergence's objective."""
    p_pre, wrong = _tilted_target(SWAPPED[name])
    best = _objective(name, wrong, p_pre)
    gaps = torch.tensor([best - _objective(name, other, p_pre) for other in _perturbations(wrong)])
    assert bool((gaps < 0).any()), f"{name}: the tilt of {SWAPPED[name]} was not beaten"
