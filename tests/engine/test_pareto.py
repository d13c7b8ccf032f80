"""Pareto/NBD population model: the likelihood against independent integrals and the published
closed form, parameter recovery on data drawn from the process, convergence on data that is
not, and the no-purchase probability against simulation."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, special

from services.scorer.engine.pareto import (
    ParetoNbdParams,
    _log_likelihood,
    _log_likelihood_gradient,
    fit_pareto_nbd,
    p_alive_pareto,
    p_no_purchase_within_pareto,
    pareto_nbd_log_likelihood,
    simulate_pareto_nbd,
)
from services.scorer.engine.retention import (
    BgNbdParams,
    InsufficientDataError,
    SimulatedCohort,
    calibration_table,
    p_no_purchase_within,
    simulate_bgnbd,
)
from services.scorer.engine.retention import _log_likelihood as bgnbd_log_likelihood_per_account

# A B2B-like process in days: about one order every five weeks while alive (r/alpha), and an
# expected lifetime in the order of two years (beta/s), varying widely between accounts.
TRUE = ParetoNbdParams(r=0.8, alpha=30.0, s=0.7, beta=500.0)
# Fader, Hardie & Lee's CDNOW fit (alpha and beta converted from weeks to days).
CDNOW = ParetoNbdParams(r=0.5534, alpha=10.5802 * 7, s=0.6061, beta=11.6695 * 7)
HORIZON = 90.0
N = 12_000

PARAMETER_SETS = {
    "cdnow": CDNOW,
    "alpha_below_beta": ParetoNbdParams(r=0.5, alpha=15.0, s=0.6, beta=600.0),
    "alpha_above_beta": ParetoNbdParams(r=1.5, alpha=600.0, s=0.9, beta=20.0),
    "alpha_equals_beta": ParetoNbdParams(r=0.8, alpha=40.0, s=0.5, beta=40.0),
    "large_alpha_beta": ParetoNbdParams(r=3.0, alpha=5e4, s=2.0, beta=8e4),
}
HISTORIES = [(0.0, 0.0, 400.0), (1.0, 35.0, 400.0), (6.0, 300.0, 420.0), (40.0, 690.0, 700.0)]


def _cohort(params: ParetoNbdParams, seed: int, n: int = N) -> SimulatedCohort:
    rng = np.random.default_rng(seed)
    ages = rng.uniform(180.0, 1460.0, n)  # first order six months to four years ago
    return simulate_pareto_nbd(params, n, ages, rng, horizon_days=HORIZON)


def _distinct_days(cohort: SimulatedCohort) -> tuple[np.ndarray, np.ndarray]:
    """Whole days and one row per distinct (x, t_x, T) with its count, as the service fits."""
    rows = np.column_stack([cohort.x, np.round(cohort.t_x), np.round(cohort.T)])
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    return distinct, counts


@pytest.fixture(scope="module")
def cohort() -> SimulatedCohort:
    return _cohort(TRUE, seed=31)


@pytest.fixture(scope="module")
def fitted(cohort: SimulatedCohort) -> ParetoNbdParams:
    rows, counts = _distinct_days(cohort)
    return fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts)


# --------------------------------------------------------------------------------------------
# The likelihood
# --------------------------------------------------------------------------------------------


def _log_likelihood_by_double_integral(
    params: ParetoNbdParams, x: float, t_x: float, T: float
) -> float:
    """log E[L(x, t_x, T | lambda, mu)] over the Gamma mixing distributions, by dblquad over
    log lambda and log mu of the individual-level likelihood (SMC 1987):
    lambda^x mu/(lambda+mu) e^-(lambda+mu) t_x + lambda^(x+1)/(lambda+mu) e^-(lambda+mu) T."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta

    def log_integrand(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        lam, mu = np.exp(u), np.exp(v)
        total = lam + mu
        prior = (r * math.log(alpha) - special.gammaln(r) + r * u - alpha * lam) + (
            s * math.log(beta) - special.gammaln(s) + s * v - beta * mu
        )
        died = v - np.log(total) - total * t_x
        alive = u - np.log(total) - total * T
        return np.asarray(prior + x * u + np.logaddexp(died, alive))

    # Locate the mass on a grid, then integrate adaptively over the box that holds it.
    grid_u = np.linspace(-150.0, 10.0, 1601)
    grid_v = np.linspace(-150.0, 10.0, 1601)
    values = log_integrand(grid_u[:, None], grid_v[None, :])
    peak = float(values.max())
    inside = np.argwhere(values > peak - 40.0)
    (ui_lo, vi_lo), (ui_hi, vi_hi) = inside.min(axis=0), inside.max(axis=0)
    u_lo, u_hi = grid_u[max(ui_lo - 2, 0)], grid_u[min(ui_hi + 2, len(grid_u) - 1)]
    v_lo, v_hi = grid_v[max(vi_lo - 2, 0)], grid_v[min(vi_hi + 2, len(grid_v) - 1)]
    constant = r * math.log(alpha) - math.lgamma(r) + s * math.log(beta) - math.lgamma(s) - peak

    def integrand(u: float, v: float) -> float:  # the same, scalar: dblquad calls it ~1e5 times
        lam, mu = math.exp(u), math.exp(v)
        total = lam + mu
        died = v - total * t_x
        alive = u - total * T
        top = max(died, alive)
        mixed = top + math.log(math.exp(died - top) + math.exp(alive - top)) - math.log(total)
        return math.exp(constant + (r + x) * u - alpha * lam + s * v - beta * mu + mixed)

    value, _ = integrate.dblquad(
        integrand,
        v_lo,
        v_hi,
        u_lo,
        u_hi,
        epsabs=0.0,
        epsrel=1e-10,
    )
    return peak + math.log(value)


@pytest.mark.parametrize("name", sorted(PARAMETER_SETS))
def test_likelihood_matches_a_double_integral_over_lambda_and_mu(name: str) -> None:
    params = PARAMETER_SETS[name]
    x, t_x, T = (np.array(column) for column in zip(*HISTORIES, strict=True))
    ours = pareto_nbd_log_likelihood(params, x, t_x, T)
    for i, history in enumerate(HISTORIES):
        reference = _log_likelihood_by_double_integral(params, *history)
        assert ours[i] == pytest.approx(reference, abs=1e-8), history


def _log_death_integral(params: ParetoNbdParams, x: float, t_x: float, T: float) -> float:
    """log J = log of the integral over tau in (t_x, T] of (alpha+tau)^-(r+x) (beta+tau)^-(s+1),
    by adaptive quadrature split at multiples of the integrand's decay scale."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta

    def log_f(tau: float) -> float:
        return -(r + x) * math.log(alpha + tau) - (s + 1.0) * math.log(beta + tau)

    top = log_f(t_x)
    decay = 1.0 / ((r + x) / (alpha + t_x) + (s + 1.0) / (beta + t_x))
    edges = [t_x] + [t_x + decay * k for k in (1, 5, 25, 125, 625) if t_x + decay * k < T] + [T]
    total = 0.0
    for low, high in itertools.pairwise(edges):
        total += integrate.quad(
            lambda tau: math.exp(log_f(tau) - top), low, high, epsabs=0.0, epsrel=1e-13, limit=500
        )[0]
    return top + math.log(total)


def _log_likelihood_from_death_integral(
    params: ParetoNbdParams, x: float, t_x: float, T: float
) -> float:
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    common = math.lgamma(r + x) - math.lgamma(r) + r * math.log(alpha) + s * math.log(beta)
    alive = -(r + x) * math.log(alpha + T) - s * math.log(beta + T)
    if t_x == T:
        return common + alive
    died = math.log(s) + _log_death_integral(params, x, t_x, T)
    return common + float(np.logaddexp(alive, died))


def test_likelihood_is_accurate_across_a_wide_parameter_range() -> None:
    # Random parameters over five orders of magnitude, alpha and beta equal in a fifth of the
    # draws, heavy buyers, a last order a moment before the end: the hard corners of the 2F1 form.
    rng = np.random.default_rng(7)
    errors = []
    for draw in range(150):
        r, s = math.exp(rng.uniform(-3, 2)), math.exp(rng.uniform(-3, 2))
        alpha = math.exp(rng.uniform(-2, 9))
        beta = alpha if draw % 5 == 0 else alpha * math.exp(rng.uniform(-4.6, 4.6))
        x = float(rng.choice([0, 1, 3, 10, 50, 300, 1000]))
        T = rng.uniform(10.0, 2000.0)
        t_x = 0.0 if x == 0 else (T * (1 - 1e-4) if draw % 7 == 0 else rng.uniform(0.5, T))
        params = ParetoNbdParams(r=r, alpha=alpha, s=s, beta=beta)
        ours = float(
            _log_likelihood(r, alpha, s, beta, np.array([x]), np.array([t_x]), np.array([T]))[0]
        )
        errors.append(abs(ours - _log_likelihood_from_death_integral(params, x, t_x, T)))
    assert np.isfinite(errors).all()
    assert max(errors) < 1e-7
    assert float(np.median(errors)) < 1e-11


def _log_likelihood_closed_form(params: ParetoNbdParams, x: float, t_x: float, T: float) -> float:
    """Fader & Hardie (2005), eq. (22), with scipy's hyp2f1 (times in the parameters' unit)."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    a = r + s + x
    if alpha >= beta:
        offset, second = alpha, s + 1.0
    else:
        offset, second = beta, r + x
    gap = abs(alpha - beta)

    def piece(t: float) -> float:
        z = gap / (offset + t)
        value: float = float(special.hyp2f1(a, second, a + 1.0, z)) / (offset + t) ** a
        return value

    alive = 1.0 / ((alpha + T) ** (r + x) * (beta + T) ** s)
    bracket = alive + s / a * (piece(t_x) - piece(T))
    common = math.lgamma(r + x) - math.lgamma(r) + r * math.log(alpha) + s * math.log(beta)
    return common + math.log(bracket)


def test_likelihood_matches_the_published_closed_form_at_the_cdnow_fit() -> None:
    # In weeks, as published; CDNOW's calibration period is 39 weeks, purchases up to ~30.
    weeks = ParetoNbdParams(r=0.5534, alpha=10.5802, s=0.6061, beta=11.6695)
    histories = [
        (0, 0.0, 38.86),
        (1, 1.71, 38.86),
        (2, 30.43, 38.86),
        (10, 34.0, 36.0),
        (29, 35.7, 38.0),
    ]
    x, t_x, T = (np.array(column, dtype=np.float64) for column in zip(*histories, strict=True))
    ours = pareto_nbd_log_likelihood(weeks, x, t_x, T)
    for i, history in enumerate(histories):
        assert ours[i] == pytest.approx(_log_likelihood_closed_form(weeks, *history), abs=1e-9)
    # The same histories in days differ by the Jacobian of the x order times only.
    in_days = pareto_nbd_log_likelihood(CDNOW, x, t_x * 7, T * 7)
    np.testing.assert_allclose(in_days, ours - x * math.log(7.0), atol=1e-9)


def _cdnow() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = Path(__file__).with_name("cdnow_summary.csv").read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    x, t_x, T = (np.array([float(row[k]) for row in rows]) for k in ("frequency", "recency", "T"))
    return x, t_x, T


def test_fit_reproduces_the_published_cdnow_estimates() -> None:
    # Fader, Hardie & Lee: r = 0.5534, alpha = 10.5802, s = 0.6061, beta = 11.6695 (weeks),
    # log-likelihood -9594.98, on these 2,357 customers.
    x, t_x, T = _cdnow()
    assert len(x) == 2357
    published = ParetoNbdParams(r=0.5534, alpha=10.5802, s=0.6061, beta=11.6695)
    at_published = float(pareto_nbd_log_likelihood(published, x, t_x, T).sum())
    assert at_published == pytest.approx(-9594.98, abs=0.01)
    fitted = fit_pareto_nbd(x, t_x, T)
    assert fitted.converged
    assert fitted.log_likelihood >= at_published
    assert fitted.log_likelihood == pytest.approx(-9594.98, abs=0.01)
    for field in ("r", "alpha", "s", "beta"):
        assert getattr(fitted, field) == pytest.approx(getattr(published, field), rel=3e-3), field

    # The same customers in days, one row per distinct history: the same fit, in days.
    rows, counts = np.unique(np.column_stack([x, t_x * 7, T * 7]), axis=0, return_counts=True)
    in_days = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts)
    assert in_days.alpha == pytest.approx(fitted.alpha * 7, rel=1e-3)
    assert in_days.beta == pytest.approx(fitted.beta * 7, rel=1e-3)
    assert in_days.log_likelihood == pytest.approx(
        fitted.log_likelihood - x.sum() * math.log(7.0), abs=1e-3
    )


def test_probabilities_of_all_histories_sum_to_one() -> None:
    # P(X = 0) = L(0, 0, T); P(X = x) = integral over t of L(x, t, T) t^(x-1)/(x-1)!: the
    # likelihood is the density of the x order times, and they are ordered below t_x.
    params = ParetoNbdParams(r=0.9, alpha=40.0, s=0.8, beta=300.0)
    T = 365.0
    probabilities = [math.exp(float(pareto_nbd_log_likelihood(params, 0.0, 0.0, T)[0]))]
    for x in range(1, 250):

        def density(t: np.ndarray, x: int = x) -> np.ndarray:
            ll = pareto_nbd_log_likelihood(
                params, np.full(t.shape, float(x)), t, np.full(t.shape, T)
            )
            return np.asarray(np.exp(ll + (x - 1) * np.log(t) - math.lgamma(x)))

        probabilities.append(integrate.fixed_quad(density, 0.0, T, n=200)[0])
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
    assert probabilities[-1] < 1e-6  # the tail beyond is negligible

    # ... and they are the frequencies the simulation produces.
    rng = np.random.default_rng(8)
    simulated = simulate_pareto_nbd(params, 200_000, T, rng, horizon_days=1.0)
    for x in range(6):
        share = float(np.mean(simulated.x == x))
        standard_error = math.sqrt(probabilities[x] * (1 - probabilities[x]) / 200_000)
        assert abs(share - probabilities[x]) < 4 * standard_error, x


def test_likelihood_gradient_matches_finite_differences(cohort: SimulatedCohort) -> None:
    x, t_x, ages = cohort.x[:400], cohort.t_x[:400] / 365.0, cohort.T[:400] / 365.0
    for point in ((0.8, 0.08, 0.7, 1.4), (2.0, 0.3, 0.4, 0.3), (0.5, 0.5, 1.2, 0.5)):

        def total(r: float, alpha: float, s: float, beta: float) -> float:
            return float(_log_likelihood(r, alpha, s, beta, x, t_x, ages).sum())

        _, gradient = _log_likelihood_gradient(*point, x, t_x, ages)
        for j in range(4):
            step = 1e-6 * point[j]
            up = tuple(v + step if i == j else v for i, v in enumerate(point))
            down = tuple(v - step if i == j else v for i, v in enumerate(point))
            numeric = (total(*up) - total(*down)) / (2 * step)
            assert gradient[:, j].sum() == pytest.approx(numeric, rel=1e-5, abs=1e-4)


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def _relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / truth


def test_fit_recovers_known_parameters(fitted: ParetoNbdParams) -> None:
    assert fitted.converged
    assert fitted.n == N
    assert _relative_error(fitted.r, TRUE.r) < 0.1
    assert _relative_error(fitted.alpha, TRUE.alpha) < 0.1
    assert _relative_error(fitted.s, TRUE.s) < 0.2
    assert _relative_error(fitted.beta, TRUE.beta) < 0.3


def test_fit_is_the_maximum_of_the_likelihood(
    cohort: SimulatedCohort, fitted: ParetoNbdParams
) -> None:
    rows, counts = _distinct_days(cohort)

    def total(params: ParetoNbdParams) -> float:
        return float(counts @ pareto_nbd_log_likelihood(params, rows[:, 0], rows[:, 1], rows[:, 2]))

    assert total(fitted) == pytest.approx(fitted.log_likelihood)
    assert total(fitted) >= total(TRUE)
    for field in ("r", "alpha", "s", "beta"):
        values = fitted.as_dict() | {field: getattr(fitted, field) * 1.05}
        assert total(fitted) > total(ParetoNbdParams.from_dict(values)), field


def test_a_fit_from_the_last_fit_finds_the_same_maximum(
    cohort: SimulatedCohort, fitted: ParetoNbdParams
) -> None:
    rows, counts = _distinct_days(cohort)
    far = ParetoNbdParams(r=5.0, alpha=3.0, s=0.1, beta=20_000.0)
    for start in (fitted, far):
        again = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts, start=start)
        assert again.converged
        assert again.log_likelihood == pytest.approx(fitted.log_likelihood, rel=1e-7)
        assert again.r == pytest.approx(fitted.r, rel=1e-3)
        assert again.alpha == pytest.approx(fitted.alpha, rel=1e-3)
        assert again.s == pytest.approx(fitted.s, rel=1e-2)
        assert again.beta == pytest.approx(fitted.beta, rel=1e-2)


def test_fit_with_count_weights_equals_fit_on_repeated_rows(cohort: SimulatedCohort) -> None:
    x = cohort.x[:1500]
    t_x = np.round(cohort.t_x[:1500] / 30.0) * 30.0
    ages = np.maximum(np.round(cohort.T[:1500] / 90.0) * 90.0, t_x)
    distinct, counts = np.unique(np.column_stack([x, t_x, ages]), axis=0, return_counts=True)
    weighted = fit_pareto_nbd(distinct[:, 0], distinct[:, 1], distinct[:, 2], weights=counts)
    plain = fit_pareto_nbd(x, t_x, ages)
    assert weighted.n == plain.n == 1500
    assert weighted.log_likelihood == pytest.approx(plain.log_likelihood, rel=1e-6)
    assert weighted.r == pytest.approx(plain.r, rel=1e-2)
    assert weighted.s == pytest.approx(plain.s, rel=5e-2)


def test_a_large_cold_fit_matches_a_fit_from_the_truth() -> None:
    # Above 4,000 rows a cold fit first solves a sample: it must still end at the full optimum.
    big = _cohort(TRUE, seed=32, n=20_000)
    rows, counts = _distinct_days(big)
    assert len(rows) > 4000
    cold = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts)
    warm = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts, start=TRUE)
    assert cold.converged
    assert warm.converged
    assert cold.log_likelihood == pytest.approx(warm.log_likelihood, rel=1e-8)
    assert cold.beta == pytest.approx(warm.beta, rel=1e-2)


def test_fit_refuses_too_few_accounts() -> None:
    with pytest.raises(InsufficientDataError, match="at least 20"):
        fit_pareto_nbd([1.0] * 19, [10.0] * 19, [30.0] * 19)
    params = fit_pareto_nbd([0, 2, 5], [0, 100, 300], [400, 400, 400], weights=[10, 10, 10])
    assert params.n == 30


def test_fit_refuses_history_without_repeat_orders() -> None:
    with pytest.raises(InsufficientDataError, match="repeat"):
        fit_pareto_nbd([0.0] * 30, [0.0] * 30, [100.0] * 30)


def test_fit_rejects_recency_beyond_age() -> None:
    with pytest.raises(ValueError, match="recency <= age"):
        fit_pareto_nbd([1.0] * 30, [50.0] * 30, [40.0] * 30)


def _bursty_cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accounts that order in bursts: occasions at gamma-distributed gaps (regular, not Poisson),
    each followed by up to three more orders within a week, and a drop-out after some occasion
    with a per-account chance. Nothing like either model's assumptions."""
    rng = np.random.default_rng(seed)
    x, t_x, ages = np.zeros(n), np.zeros(n), rng.uniform(180.0, 1460.0, n)
    for i in range(n):
        mean_gap = rng.gamma(2.0, 30.0)
        quit_chance = rng.beta(1.0, 6.0)
        times: list[float] = [0.0]
        now = 0.0
        while True:
            for _ in range(rng.integers(0, 4)):
                times.append(now + rng.uniform(0.5, 7.0))
            if rng.random() < quit_chance:
                break
            now += rng.gamma(4.0, mean_gap / 4.0)
            if now > ages[i]:
                break
            times.append(now)
        seen = sorted({math.floor(t) for t in times if t <= ages[i]})  # order days
        x[i] = len(seen) - 1
        t_x[i] = seen[-1]
    return x, t_x, np.floor(ages)


def test_fit_converges_on_data_from_other_processes() -> None:
    rng = np.random.default_rng(41)
    bgnbd = simulate_bgnbd(
        BgNbdParams(r=1.2, alpha=40.0, a=0.8, b=4.0), 8000, rng.uniform(180.0, 730.0, 8000), rng
    )
    samples = {
        "bgnbd": (bgnbd.x, np.round(bgnbd.t_x), np.round(bgnbd.T)),
        "bursty": _bursty_cohort(5000, seed=42),
    }
    for name, (x, t_x, ages) in samples.items():
        rows, counts = np.unique(np.column_stack([x, t_x, ages]), axis=0, return_counts=True)
        params = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts)
        assert params.converged, name
        assert math.isfinite(params.log_likelihood), name
        again = fit_pareto_nbd(rows[:, 0], rows[:, 1], rows[:, 2], weights=counts, start=params)
        assert again.log_likelihood == pytest.approx(params.log_likelihood, rel=1e-7), name
        p = p_no_purchase_within_pareto(params, x, t_x, ages, HORIZON)
        assert ((p >= 0.0) & (p <= 1.0)).all(), name


def test_fit_reports_no_convergence_on_the_edge_of_the_parameter_box() -> None:
    # Every account ordered steadily for 200 days and then stopped: a population far more
    # uniform than a gamma mixture of drop-out rates can be drives the shape s to the box edge,
    # and the fit must say so instead of passing the edge off as an estimate.
    x = np.tile(np.arange(1.0, 11.0), 5)
    ages = np.full(50, 400.0)
    params = fit_pareto_nbd(x, ages / 2.0, ages)
    assert not params.converged
    assert params.s > 1e4


# --------------------------------------------------------------------------------------------
# Per-account probabilities
# --------------------------------------------------------------------------------------------


def test_no_purchase_probability_is_the_likelihood_ratio_for_bgnbd_too() -> None:
    # The identity P(no order in (T, T+h]) = L(x, t_x, T+h) / L(x, t_x, T) holds for BG/NBD,
    # whose closed form was derived another way.
    params = BgNbdParams(r=1.2, alpha=40.0, a=0.8, b=4.0)
    x = np.array([0.0, 1.0, 4.0, 12.0, 30.0])
    t_x = np.array([0.0, 20.0, 200.0, 330.0, 700.0])
    ages = np.array([50.0, 300.0, 360.0, 340.0, 730.0])
    for h in (7.0, 90.0, 365.0):
        ratio = np.exp(
            bgnbd_log_likelihood_per_account(
                params.r, params.alpha, params.a, params.b, x, t_x, ages + h
            )
            - bgnbd_log_likelihood_per_account(
                params.r, params.alpha, params.a, params.b, x, t_x, ages
            )
        )
        np.testing.assert_allclose(ratio, p_no_purchase_within(params, x, t_x, ages, h), rtol=1e-12)


def test_no_purchase_probability_of_one_history_matches_simulation() -> None:
    # With one common age, every account without a repeat order has the very same history, so
    # the share of them that stays quiet over the horizon estimates that one probability.
    # For any other selection by history, the mean prediction over the selected accounts is the
    # expected share of them that orders nothing.
    rng = np.random.default_rng(51)
    T = 365.0
    simulated = simulate_pareto_nbd(TRUE, 300_000, T, rng, horizon_days=HORIZON)
    groups = {
        "no repeat order": simulated.x == 0,
        "one repeat order": simulated.x == 1,
        "2-5, last in the first half year": (simulated.x >= 2)
        & (simulated.x <= 5)
        & (simulated.t_x < 180.0),
        "over 10": simulated.x > 10,
    }
    for name, group in groups.items():
        observed = float(np.mean(simulated.purchases_in_horizon[group] == 0))
        predicted = float(
            np.mean(
                p_no_purchase_within_pareto(
                    TRUE, simulated.x[group], simulated.t_x[group], simulated.T[group], HORIZON
                )
            )
        )
        standard_error = math.sqrt(predicted * (1 - predicted) / int(group.sum()))
        assert int(group.sum()) > 1000
        assert abs(observed - predicted) < 4 * standard_error, (name, observed, predicted)


def test_predicted_no_purchase_rates_are_calibrated_per_decile(fitted: ParetoNbdParams) -> None:
    # Fitted on one cohort, predicting a fresh one drawn from the same process.
    fresh = _cohort(TRUE, seed=33, n=20_000)
    p = p_no_purchase_within_pareto(fitted, fresh.x, fresh.t_x, fresh.T, HORIZON)
    observed = (fresh.purchases_in_horizon == 0).astype(np.float64)
    table = calibration_table(p, observed, bins=10)
    gaps = [abs(b.mean_predicted - b.observed_rate) for b in table]
    assert max(gaps) < 0.04, gaps
    assert table[0].mean_predicted < 0.2
    assert table[-1].mean_predicted > 0.9


def test_risk_moves_the_right_way() -> None:
    later = p_no_purchase_within_pareto(
        TRUE, [4.0] * 4, [90.0] * 4, [100.0, 200.0, 300.0, 500.0], HORIZON
    )
    assert (np.diff(later) > 0).all()
    more = p_no_purchase_within_pareto(
        TRUE, [1.0, 3.0, 6.0, 12.0], [300.0] * 4, [310.0] * 4, HORIZON
    )
    assert (np.diff(more) < 0).all()
    longer = p_no_purchase_within_pareto(
        TRUE, [3.0] * 3, [100.0] * 3, [200.0] * 3, [30.0, 90.0, 180.0]
    )
    assert (np.diff(longer) < 0).all()
    assert p_no_purchase_within_pareto(TRUE, 3.0, 100.0, 200.0, 0.0)[0] == pytest.approx(1.0)


def test_p_alive_bounds_the_risk_and_can_doubt_one_time_buyers() -> None:
    x, t_x, ages = (
        np.array([0.0, 0.0, 5.0, 5.0]),
        np.array([0.0, 0.0, 150.0, 150.0]),
        np.array([30.0, 900.0, 160.0, 900.0]),
    )
    alive = p_alive_pareto(TRUE, x, t_x, ages)
    quiet = p_no_purchase_within_pareto(TRUE, x, t_x, ages, HORIZON)
    assert ((alive > 0.0) & (alive <= 1.0)).all()
    assert alive[1] < alive[0]  # unlike BG/NBD, a silent one-time buyer may have left
    assert alive[3] < alive[2]
    assert (quiet >= 1.0 - alive - 1e-12).all()  # the departed never order


def test_unknown_history_gives_nan_not_a_guess() -> None:
    p = p_no_purchase_within_pareto(TRUE, [np.nan, 2.0], [np.nan, 30.0], [np.nan, 60.0], HORIZON)
    assert math.isnan(p[0])
    assert 0.0 < p[1] < 1.0
    assert math.isnan(p_alive_pareto(TRUE, [np.nan], [np.nan], [np.nan])[0])
    with pytest.raises(ValueError, match="horizon"):
        p_no_purchase_within_pareto(TRUE, [2.0], [30.0], [60.0], -1.0)


def test_params_round_trip_and_refuse_nonsense() -> None:
    params = ParetoNbdParams(r=0.5, alpha=70.0, s=0.6, beta=80.0, log_likelihood=-12.5, n=40)
    assert ParetoNbdParams.from_dict(params.as_dict()) == params
    assert ParetoNbdParams.from_dict(ParetoNbdParams(1.0, 2.0, 3.0, 4.0).as_dict()).n == 0
    with pytest.raises(ValueError, match="beta"):
        ParetoNbdParams(r=0.5, alpha=70.0, s=0.6, beta=0.0)
