"""Retention risk: the probability that an account places no order within a horizon.

The base is the BG/NBD "buy till you die" model (Fader, Hardie & Lee, 2005, "Counting your
customers the easy way"), fitted to the whole population by maximum likelihood. Per account it
needs three numbers, **all in days**, measured from the account's first order:

- ``x`` (frequency): the number of *repeat* orders, i.e. order days after the first one. Orders
  on the same day count once: the model is a continuous-time purchase process and two orders an
  hour apart are one buying occasion.
- ``t_x`` (recency): days from the first order to the last one (0 when ``x == 0``).
- ``T`` (age): days from the first order to the evaluation time.

The model: while alive, an account orders as a Poisson process with rate ``lambda``; after each
repeat order it drops out for good with probability ``p``. Across accounts ``lambda ~
Gamma(r, alpha)`` (rate ``alpha``, in days) and ``p ~ Beta(a, b)``.

On top of the base probability, behavioural signals (satisfaction, complaints, contact gap, late
payment, revenue decline) shift the log-odds with policy weights, each shift kept as a driver;
then an optional Platt calibration learned from history maps the result to observed rates. The
evaluation helpers (calibration table, AUC, Brier) are the ones the backtest reports, so the
service and the backtest compute the same numbers the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import integrate, optimize, special

from services.scorer.engine.arrays import (
    FloatArray,
    ObjectArray,
    as_float_array,
    same_length,
)
from shared.enums import RiskBand
from shared.policy import RiskPolicy

MIN_CUSTOMERS = 20
"""Fewer accounts than this cannot identify four parameters; the fit refuses rather than guess."""

PROBABILITY_EPS = 1e-6
"""Probabilities are clipped to [eps, 1 - eps] before taking log-odds, so that a base model that
is certain still moves with the signals and no logit is infinite."""

# Log-parameters are kept in this box: exp(+-12) spans ~6e-6 .. 1.6e5, far beyond any plausible
# fit. A solution on the box edge means the data does not identify that parameter.
_LOG_BOUND = 12.0


class InsufficientDataError(ValueError):
    """Too few accounts (or too little purchase history) to fit the population model."""


@dataclass(frozen=True)
class BgNbdParams:
    """Fitted BG/NBD population parameters; ``alpha`` is in days.

    ``log_likelihood`` is the (weighted) total at the optimum, ``n`` the number of accounts fitted,
    ``converged`` whether the optimiser reported success away from the parameter box edges.
    """

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = math.nan
    n: int = 0
    converged: bool = True

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "a", "b"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"BG/NBD parameter {name} must be positive and finite: {value}")

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """JSON-safe form for the population row (nan becomes None: jsonb has no NaN)."""
        ll = None if math.isnan(self.log_likelihood) else self.log_likelihood
        return {
            "r": self.r,
            "alpha": self.alpha,
            "a": self.a,
            "b": self.b,
            "log_likelihood": ll,
            "n": self.n,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BgNbdParams:
        ll = data.get("log_likelihood")
        return cls(
            r=float(data["r"]),
            alpha=float(data["alpha"]),
            a=float(data["a"]),
            b=float(data["b"]),
            log_likelihood=math.nan if ll is None else float(ll),
            n=int(data.get("n", 0)),
            converged=bool(data.get("converged", True)),
        )


# --------------------------------------------------------------------------------------------
# BG/NBD: likelihood, fit, per-account probabilities
# --------------------------------------------------------------------------------------------


def _rfm_columns(
    x: ArrayLike, t_x: ArrayLike, T: ArrayLike, *, allow_nan: bool
) -> tuple[FloatArray, FloatArray, FloatArray]:
    xs = as_float_array(x, "frequency")
    ts = as_float_array(t_x, "recency")
    ages = as_float_array(T, "age")
    same_length({"frequency": xs, "recency": ts, "age": ages})
    known = ~(np.isnan(xs) | np.isnan(ts) | np.isnan(ages))
    if not allow_nan and not known.all():
        raise ValueError("frequency, recency and age must not contain nan when fitting")
    kx, kt, ka = xs[known], ts[known], ages[known]
    if (kx < 0).any() or not np.isfinite(kx).all():
        raise ValueError("frequency (repeat orders) must be finite and >= 0")
    if (kt < 0).any() or (ka < kt).any() or not np.isfinite(ka).all():
        raise ValueError("need 0 <= recency <= age (days since first order), all finite")
    return xs, ts, ages


def _log_likelihood(
    r: float, alpha: float, a: float, b: float, x: FloatArray, t_x: FloatArray, T: FloatArray
) -> FloatArray:
    """Per-account BG/NBD log-likelihood (FHL 2005, eq. 6), in log space throughout.

    L = B(a, b+x)/B(a, b) * Gamma(r+x) alpha^r / (Gamma(r) (alpha+T)^(r+x))          [alive at T]
      + [x>0] B(a+1, b+x-1)/B(a, b) * Gamma(r+x) alpha^r / (Gamma(r) (alpha+t_x)^(r+x))
                                                               [dropped right after the last order]
    The two terms are combined with logaddexp so that neither underflows for heavy buyers.
    """
    common = special.gammaln(r + x) - special.gammaln(r) + r * math.log(alpha)
    log_beta_ab = special.betaln(a, b)
    alive = special.betaln(a, b + x) - log_beta_ab - (r + x) * np.log(alpha + T)
    repeat = x > 0
    # betaln(a+1, b-1) is undefined for b < 1 when x == 0; that term does not exist there anyway.
    x_safe = np.where(repeat, x, 1.0)
    dropped = special.betaln(a + 1.0, b + x_safe - 1.0) - log_beta_ab
    dropped = dropped - (r + x) * np.log(alpha + t_x)
    dropped = np.where(repeat, dropped, -np.inf)
    return np.asarray(common + np.logaddexp(alive, dropped), dtype=np.float64)


def _log_likelihood_gradient(
    r: float, alpha: float, a: float, b: float, x: FloatArray, t_x: FloatArray, T: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per-account log-likelihood and its gradient in (r, alpha, a, b), one row per account.

    With ll = common + log(e^alive + [x>0] e^dropped) and s = the posterior weight of the
    "dropped" branch, every derivative is the alive branch's times (1 - s) plus the dropped
    branch's times s; the Beta-function terms differentiate to digammas. An exact gradient lets
    L-BFGS-B take one likelihood pass per step instead of five, which matters at 100k accounts.
    """
    ll = _log_likelihood(r, alpha, a, b, x, t_x, T)
    repeat = x > 0
    x_safe = np.where(repeat, x, 1.0)
    log_beta_ab = special.betaln(a, b)
    alive = special.betaln(a, b + x) - log_beta_ab - (r + x) * np.log(alpha + T)
    dropped = special.betaln(a + 1.0, b + x_safe - 1.0) - log_beta_ab
    dropped = dropped - (r + x) * np.log(alpha + t_x)
    share_dropped = np.where(repeat, special.expit(dropped - alive), 0.0)
    share_alive = 1.0 - share_dropped

    psi = special.digamma
    d_r = (
        psi(r + x)
        - psi(r)
        + math.log(alpha)
        - share_alive * np.log(alpha + T)
        - share_dropped * np.log(alpha + t_x)
    )
    d_alpha = r / alpha - (r + x) * (share_alive / (alpha + T) + share_dropped / (alpha + t_x))
    d_beta_ab_a = psi(a) - psi(a + b)  # d/da of betaln(a, b)
    d_beta_ab_b = psi(b) - psi(a + b)
    abx = psi(a + b + x)
    d_a = share_alive * (psi(a) - abx - d_beta_ab_a) + share_dropped * (
        psi(a + 1.0) - abx - d_beta_ab_a
    )
    d_b = share_alive * (psi(b + x) - abx - d_beta_ab_b) + share_dropped * (
        psi(b + x_safe - 1.0) - abx - d_beta_ab_b
    )
    gradient = np.column_stack([d_r, d_alpha, d_a, d_b])
    return ll, np.asarray(gradient, dtype=np.float64)


def fit_bgnbd(
    frequency: ArrayLike,
    recency: ArrayLike,
    age: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    start: BgNbdParams | None = None,
) -> BgNbdParams:
    """Fit the BG/NBD population parameters by maximum likelihood.

    ``frequency``, ``recency`` and ``age`` are per account ``x``, ``t_x`` and ``T`` in days (see
    the module docstring). ``weights`` lets the caller pass one row per distinct
    ``(x, t_x, T)`` with its count, which is much cheaper for a large portfolio.

    The optimiser works on log-parameters (so positivity is free) with times rescaled by the
    median age (so ``alpha`` is O(1) whatever the unit) with an exact gradient, from a
    moment-based start; if that does not end in a clean interior optimum, a second, more
    dispersed start is tried and the better optimum wins. ``converged`` is False when the optimum
    sits on the edge of the parameter box (e.g. drop-out not identified in a small or uniform
    population): the caller should then keep the previous fit rather than publish this one.
    ``start`` (the last fit, say) is tried first: an hour's more data moves the optimum little,
    so the optimiser needs a few steps from there instead of a few dozen.

    Raises ``InsufficientDataError`` with fewer than ``MIN_CUSTOMERS`` accounts or no repeat
    order at all (then nothing identifies the purchase rate against drop-out).
    """
    x, t_x, T = _rfm_columns(frequency, recency, age, allow_nan=False)
    if weights is None:
        w = np.ones(len(x), dtype=np.float64)
    else:
        w = as_float_array(weights, "weights")
        if len(w) != len(x) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, one per account and not all zero")
    # With weights a row stands for that many accounts: count accounts, not rows.
    n = round(float(w.sum()))
    if n < MIN_CUSTOMERS:
        raise InsufficientDataError(
            f"the retention model needs at least {MIN_CUSTOMERS} accounts with orders, got {n}"
        )
    if not (x[w > 0] > 0).any():
        raise InsufficientDataError("no account has a repeat order; the model cannot be fitted")
    if not (T[w > 0] > 0).any():
        raise InsufficientDataError("every account is younger than a day; nothing to fit")

    scale = float(np.median(T[T > 0]))
    ts, Ts = t_x / scale, T / scale
    total_weight = float(w.sum())

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        params = np.exp(theta)
        r, alpha, a, b = (float(v) for v in params)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ll, gradient = _log_likelihood_gradient(r, alpha, a, b, x, ts, Ts)
        value = -float(np.dot(w, ll)) / total_weight
        # Chain rule to log-parameters: d/dtheta = d/dparam * param.
        d_theta = -(w @ gradient) / total_weight * params
        if not (math.isfinite(value) and np.isfinite(d_theta).all()):
            # A non-finite value would derail the line search; a large finite one steers back.
            return 1e12, np.zeros(4)
        return value, np.asarray(d_theta, dtype=np.float64)

    def negative_mean_ll(theta: FloatArray) -> float:
        return objective(theta)[0]

    rate = float(
        np.dot(w, x) / max(float(np.dot(w, Ts)), 1e-9)
    )  # repeat orders per unit of scaled time
    rate = max(rate, 1e-3)
    starts = [
        np.log([1.0, 1.0 / rate, 1.0, 3.0]),
        np.log([0.5, 0.5 / rate, 0.5, 1.5]),
    ]
    if start is not None:
        last = np.log([start.r, start.alpha / scale, start.a, start.b])
        if np.isfinite(last).all():
            starts.insert(0, np.clip(last, -_LOG_BOUND + 0.5, _LOG_BOUND - 0.5))
    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * 4
    best: Any = None
    for theta0 in starts:
        result = optimize.minimize(
            objective,
            theta0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 2000},
        )
        if not result.success:
            # L-BFGS-B sometimes stops on an imprecise line search in flat valleys; a
            # derivative-free polish from where it stopped settles it.
            polished = optimize.minimize(
                negative_mean_ll,
                result.x,
                method="Nelder-Mead",
                bounds=bounds,
                options={"maxiter": 4000, "xatol": 1e-7, "fatol": 1e-10},
            )
            if polished.fun <= result.fun:
                result = polished
        if best is None or result.fun < best.fun:
            best = result
        if best.success and (np.abs(best.x) < _LOG_BOUND - 0.1).all():
            break  # a clean interior optimum: the fallback start is not needed

    theta = np.asarray(best.x, dtype=np.float64)
    r, alpha_scaled, a, b = (float(v) for v in np.exp(theta))
    alpha = alpha_scaled * scale
    interior = bool((np.abs(theta) < _LOG_BOUND - 0.1).all())
    log_likelihood = float(np.dot(w, _log_likelihood(r, alpha, a, b, x, t_x, T)))
    return BgNbdParams(
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        log_likelihood=log_likelihood,
        n=n,
        converged=bool(best.success) and interior,
    )


def bgnbd_log_likelihood(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> float:
    """Total log-likelihood of the data under ``params`` (days); for comparing fits."""
    xs, ts, ages = _rfm_columns(x, t_x, T, allow_nan=False)
    return float(_log_likelihood(params.r, params.alpha, params.a, params.b, xs, ts, ages).sum())


def p_alive(params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> FloatArray:
    """P(the account is still alive at ``T`` | x, t_x, T) (FHL 2005, eq. 13).

    1 / (1 + [x>0] a/(b+x-1) * ((alpha+T)/(alpha+t_x))^(r+x)). An account without a repeat order
    is alive for sure, because BG/NBD drops accounts out only right after a repeat order.

    This is NOT the probability of ordering in the next period: an alive account with a low rate
    may well not order within the horizon. Use ``p_no_purchase_within`` for the risk.
    Nan inputs give nan.
    """
    xs, ts, ages = _rfm_columns(x, t_x, T, allow_nan=True)
    known = ~(np.isnan(xs) | np.isnan(ts) | np.isnan(ages))
    repeat = known & (xs > 0)
    x_safe = np.where(repeat, xs, 1.0)
    t_safe = np.where(repeat, ts, 0.0)
    age_safe = np.where(repeat, ages, 0.0)
    log_odds_dead = (
        math.log(params.a)
        - np.log(params.b + x_safe - 1.0)
        + (params.r + x_safe) * (np.log(params.alpha + age_safe) - np.log(params.alpha + t_safe))
    )
    alive = np.where(repeat, special.expit(-log_odds_dead), 1.0)
    return np.asarray(np.where(known, alive, np.nan), dtype=np.float64)


def p_no_purchase_within(
    params: BgNbdParams, x: ArrayLike, t_x: ArrayLike, T: ArrayLike, horizon: ArrayLike
) -> FloatArray:
    """P(no order in (T, T + horizon] | x, t_x, T): the base retention risk. Days throughout.

    Derivation. Given the history, the account is either dead (probability 1 - P_alive) and then
    certainly orders nothing, or alive. If alive at T it has not dropped out after its last order,
    and since BG/NBD drops out only *right after* an order, it cannot drop out before its next
    order: the next order arrives after an Exp(lambda) wait, whatever p is. The posterior of
    lambda given "alive" is Gamma(r + x, alpha + T) (the likelihood's alive term is
    lambda^x e^(-lambda T)), so P(no order within h | alive) = E[e^(-lambda h)] =
    ((alpha + T) / (alpha + T + h))^(r + x). Hence

        P = (1 - P_alive) + P_alive * ((alpha + T) / (alpha + T + h))^(r + x).

    It rises as time passes without an order (T grows with x, t_x fixed) and falls with more
    orders. Nan inputs give nan (an account with no order has no purchase process to model).
    """
    xs, _, ages = _rfm_columns(x, t_x, T, allow_nan=True)
    h = np.broadcast_to(as_float_array(horizon, "horizon"), xs.shape)
    if (h[~np.isnan(h)] < 0).any():
        raise ValueError("horizon must be >= 0 days")
    alive = p_alive(params, x, t_x, T)
    with np.errstate(invalid="ignore"):
        log_quiet = (params.r + xs) * (
            np.log(params.alpha + ages) - np.log(params.alpha + ages + h)
        )
    quiet_if_alive = np.exp(log_quiet)
    return np.asarray((1.0 - alive) + alive * quiet_if_alive, dtype=np.float64)


def expected_purchases(params: BgNbdParams, t: ArrayLike) -> FloatArray:
    """E[X(t)]: expected repeat orders in the first ``t`` days of a new account (FHL eq. 9).

    (a+b-1)/(a-1) * [1 - (alpha/(alpha+t))^r * 2F1(r, b; a+b-1; t/(alpha+t))] when a > 1. For
    a <= 1 that closed form does not apply (E[1/p] diverges), so the same expectation,
    E[(1 - e^(-lambda p t)) / p], is integrated over p numerically.
    """
    ts = as_float_array(t, "t")
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    if a > 1.0:
        z = ts / (alpha + ts)
        value = (
            (a + b - 1.0)
            / (a - 1.0)
            * (1.0 - (alpha / (alpha + ts)) ** r * special.hyp2f1(r, b, a + b - 1.0, z))
        )
        return np.asarray(value, dtype=np.float64)
    return _expected_purchases_by_integration(params, ts)


def _expected_purchases_by_integration(params: BgNbdParams, ts: FloatArray) -> FloatArray:
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    log_beta = float(special.betaln(a, b))

    def integrand(p: float, t: float) -> float:
        # (1/p) * (1 - (alpha/(alpha+p t))^r) * Beta(p; a, b); the bracket ~ r p t / alpha near 0.
        bracket = -math.expm1(-r * math.log1p(p * t / alpha))
        density = math.exp((a - 1.0) * math.log(p) + (b - 1.0) * math.log1p(-p) - log_beta)
        return bracket / p * density

    out = np.empty_like(ts)
    for i, t in enumerate(ts):
        out[i] = integrate.quad(integrand, 0.0, 1.0, args=(float(t),), limit=200)[0] if t else 0.0
    return out


class SimulatedCohort(NamedTuple):
    """Accounts drawn from a known BG/NBD process: the calibration-period summary and the truth.

    ``purchases_in_horizon`` counts orders in (T, T + horizon]; zero means "did not order".
    """

    x: FloatArray
    t_x: FloatArray
    T: FloatArray
    purchases_in_horizon: FloatArray


def simulate_bgnbd(
    params: BgNbdParams,
    n: int,
    T_days: ArrayLike,
    rng: np.random.Generator,
    *,
    horizon_days: float = 90.0,
) -> SimulatedCohort:
    """Draw ``n`` accounts from the BG/NBD process, each observed for ``T_days`` after its first
    order (a scalar or one value per account) and then for ``horizon_days`` more.

    For tests and the backtest's synthetic history: with data from a known process, parameter
    recovery and calibration can be checked against the truth.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    ages = np.broadcast_to(as_float_array(T_days, "T_days"), (n,)).astype(np.float64)
    end = ages + horizon_days
    # Rates so small that 1/lambda overflows are "never orders"; keep them finite.
    lam = np.maximum(rng.gamma(shape=params.r, scale=1.0 / params.alpha, size=n), 1e-300)
    dropout = rng.beta(params.a, params.b, size=n)

    now = np.zeros(n)
    x = np.zeros(n)
    t_x = np.zeros(n)
    future = np.zeros(n)
    active = np.arange(n)
    while active.size:
        now[active] += rng.exponential(size=active.size) / lam[active]
        within = now[active] <= end[active]
        active = active[within]
        in_calibration = now[active] <= ages[active]
        seen = active[in_calibration]
        x[seen] += 1.0
        t_x[seen] = now[seen]
        future[active[~in_calibration]] += 1.0
        # Drop-out happens right after an order (never at the first, unobserved, one).
        active = active[rng.random(active.size) >= dropout[active]]
    return SimulatedCohort(x=x, t_x=t_x, T=ages.copy(), purchases_in_horizon=future)


# --------------------------------------------------------------------------------------------
# Behavioural adjustment in log-odds
# --------------------------------------------------------------------------------------------


def logit(p: ArrayLike) -> FloatArray:
    """log(p / (1 - p)) after clipping to [eps, 1 - eps]; nan stays nan."""
    clipped = np.clip(as_float_array(p, "p"), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return np.asarray(special.logit(clipped), dtype=np.float64)


def adjust_log_odds(
    base_p: ArrayLike,
    signals: Mapping[str, ArrayLike],
    weights: Mapping[str, float],
) -> tuple[FloatArray, dict[str, FloatArray]]:
    """Shift the base risk by weighted behavioural signals in log-odds space.

    logit(adjusted) = logit(clip(base_p)) + sum_i weights[i] * signals[i]. Working in log-odds
    keeps the result a probability and makes each signal's effect an odds ratio (e^w at full
    signal), the same whatever the base risk, which is how a manager reads "a complaint doubles
    the odds". Signals are expected on 0..1 (see ``behaviour_signals``), oriented so that more
    means more risk; a negative weight lowers the risk. A nan signal means "no evidence" and
    contributes 0. Every signal needs a weight (a typo must not silently drop a driver); weights
    without a signal are ignored.

    Returns the adjusted probabilities and each signal's contribution in log-odds.
    """
    z = logit(base_p)
    contributions: dict[str, FloatArray] = {}
    for name, values in signals.items():
        if name not in weights:
            raise ValueError(f"no weight for signal {name!r}")
        signal = np.broadcast_to(as_float_array(values, name), z.shape)
        contribution = float(weights[name]) * np.nan_to_num(signal, nan=0.0)
        contributions[name] = np.asarray(contribution, dtype=np.float64)
        z = z + contribution
    return np.asarray(special.expit(z), dtype=np.float64), contributions


@dataclass(frozen=True)
class BehaviourFacts:
    """Raw per-account facts behind the risk signals (and the drivers' words). Nan = unknown.

    Satisfaction is the 1 (very dissatisfied) .. 5 (very satisfied) survey scale;
    ``revenue_growth`` is the relative change of 12-month revenue on the previous 12 months
    (-0.3 means down 30%); ``late_share`` the share of invoices paid after their due date.
    """

    days_since_last_order: FloatArray
    usual_gap_days: FloatArray
    satisfaction_last: FloatArray
    satisfaction_previous: FloatArray
    complaints_180d: FloatArray
    days_since_last_contact: FloatArray
    late_share: FloatArray
    avg_days_late: FloatArray
    revenue_growth: FloatArray

    def __post_init__(self) -> None:
        columns = {
            name: as_float_array(getattr(self, name), name) for name in self.__dataclass_fields__
        }
        same_length(columns)
        for name, column in columns.items():
            object.__setattr__(self, name, column)

    def __len__(self) -> int:
        return len(self.days_since_last_order)


SIGNAL_NAMES = (
    "satisfaction_drop",
    "complaints_180d",
    "contact_gap_ratio",
    "late_payment_share",
    "revenue_decline",
)


def behaviour_signals(facts: BehaviourFacts, policy: RiskPolicy) -> dict[str, FloatArray]:
    """Normalise the raw facts to signals on 0 (no warning) .. 1 (strongest warning).

    - ``satisfaction_drop``: the stronger of a fall since the previous survey answer (two points
      is the full signal) and a last answer below neutral (very dissatisfied is the full signal).
    - ``complaints_180d``: complaints in 180 days over ``policy.complaints_saturation``, capped.
    - ``contact_gap_ratio``: 0 up to the usual contact gap, 1 at ``contact_gap_saturation``
      times it.
    - ``late_payment_share``: the share of invoices paid late.
    - ``revenue_decline``: the fall of 12-month revenue on the previous 12 months (0.4 = down 40%).

    Unknown facts (no survey, no invoice, no history) give 0: absence of evidence is not a
    warning, and the base model already covers the purchase rhythm.
    """
    last, previous = facts.satisfaction_last, facts.satisfaction_previous
    drop = np.clip((previous - last) / 2.0, 0.0, 1.0)
    low = np.clip((3.0 - last) / 2.0, 0.0, 1.0)
    satisfaction = np.fmax(np.nan_to_num(drop, nan=0.0), np.nan_to_num(low, nan=0.0))

    complaints = np.clip(facts.complaints_180d / policy.complaints_saturation, 0.0, 1.0)
    gap_ratio = facts.days_since_last_contact / policy.usual_contact_gap_days
    contact = np.clip((gap_ratio - 1.0) / (policy.contact_gap_saturation - 1.0), 0.0, 1.0)
    late = np.clip(facts.late_share, 0.0, 1.0)
    decline = np.clip(-facts.revenue_growth, 0.0, 1.0)
    return {
        "satisfaction_drop": satisfaction,
        "complaints_180d": np.nan_to_num(complaints, nan=0.0),
        "contact_gap_ratio": np.nan_to_num(contact, nan=0.0),
        "late_payment_share": np.nan_to_num(late, nan=0.0),
        "revenue_decline": np.nan_to_num(decline, nan=0.0),
    }


# --------------------------------------------------------------------------------------------
# Calibration and evaluation
# --------------------------------------------------------------------------------------------


class PlattCalibration(NamedTuple):
    """calibrated = expit(slope * logit(p) + intercept). Identity is (1.0, 0.0)."""

    slope: float
    intercept: float


IDENTITY_CALIBRATION = PlattCalibration(1.0, 0.0)


def _outcomes(outcome: ArrayLike, n: int) -> FloatArray:
    y = as_float_array(outcome, "outcome")
    if len(y) != n:
        raise ValueError(f"outcome has {len(y)} rows, predictions {n}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("outcome must be 0/1 (1 = no order within the horizon)")
    return y


def _fit_logistic(
    features: FloatArray,
    targets: FloatArray,
    offset: FloatArray,
    *,
    l2: float = 0.0,
    bounds: list[tuple[float | None, float | None]] | None = None,
) -> FloatArray:
    """Coefficients beta minimising the mean log-loss of expit(offset + features @ beta) against
    (possibly soft) targets, plus l2/2 * |beta|^2 / n, with an analytic gradient."""
    n = len(targets)

    def loss(beta: FloatArray) -> tuple[float, FloatArray]:
        z = offset + features @ beta
        value = (
            float(np.mean(np.logaddexp(0.0, z) - targets * z)) + 0.5 * l2 * float(beta @ beta) / n
        )
        gradient = features.T @ (special.expit(z) - targets) / n + l2 * beta / n
        return value, np.asarray(gradient, dtype=np.float64)

    start = np.zeros(features.shape[1])
    result = optimize.minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return np.asarray(result.x, dtype=np.float64)


def fit_platt(p_pred: ArrayLike, outcome: ArrayLike) -> PlattCalibration:
    """Platt scaling: a logistic regression of the outcome on logit(p_pred).

    Uses Platt's smoothed targets ((N+ + 1)/(N+ + 2) and 1/(N- + 2)) so that perfectly
    separated data gives a finite fit instead of an infinite slope. ``outcome`` is 1 when the
    account did NOT order within the horizon (the event the risk predicts).
    """
    z = logit(p_pred)
    y = _outcomes(outcome, len(z))
    keep = ~np.isnan(z)
    z, y = z[keep], y[keep]
    positives, negatives = float(y.sum()), float(len(y) - y.sum())
    if positives == 0 or negatives == 0:
        raise ValueError("calibration needs both outcomes (accounts that ordered and did not)")
    soft = np.where(y == 1.0, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    design = np.column_stack([z, np.ones_like(z)])
    slope, intercept = _fit_logistic(design, soft, np.zeros_like(z))
    return PlattCalibration(float(slope), float(intercept))


def apply_platt(p: ArrayLike, calibration: PlattCalibration) -> FloatArray:
    """Map probabilities through a fitted Platt calibration; nan stays nan."""
    z = calibration.slope * logit(p) + calibration.intercept
    return np.asarray(special.expit(z), dtype=np.float64)


def fit_signal_weights(
    base_p: ArrayLike,
    signals: Mapping[str, ArrayLike],
    outcome: ArrayLike,
    *,
    l2: float = 1.0,
    nonnegative: bool = True,
) -> dict[str, float]:
    """Learn the log-odds weights of the signals from history, keeping the base model fixed.

    A logistic regression with logit(base_p) as offset: the weights say how much each signal
    adds beyond what the purchase rhythm already predicts. The ridge penalty ``l2`` (in units of
    accounts) keeps weights of rare signals near zero; ``nonnegative`` keeps the policy's
    orientation (more signal, more risk). Follow with ``fit_platt`` on the adjusted output.
    """
    offset = logit(base_p)
    y = _outcomes(outcome, len(offset))
    names = list(signals)
    if not names:
        return {}
    columns = [
        np.nan_to_num(np.broadcast_to(as_float_array(signals[k], k), offset.shape), nan=0.0)
        for k in names
    ]
    design = np.column_stack(columns)
    keep = ~np.isnan(offset)
    bounds: list[tuple[float | None, float | None]] | None = (
        [(0.0, None)] * len(names) if nonnegative else None
    )
    beta = _fit_logistic(design[keep], y[keep], offset[keep], l2=l2, bounds=bounds)
    return {name: float(value) for name, value in zip(names, beta, strict=True)}


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a calibration table: accounts grouped by predicted probability."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lower": self.lower,
            "upper": self.upper,
            "count": self.count,
            "mean_predicted": self.mean_predicted,
            "observed_rate": self.observed_rate,
        }


def calibration_table(
    p_pred: ArrayLike, outcome: ArrayLike, bins: int = 10
) -> list[CalibrationBin]:
    """Equal-count bins (deciles by default) by predicted probability, each with its mean
    prediction and the observed rate of the outcome. Calibrated means the two agree per bin.

    Accounts are sorted by prediction (stably) and split into ``bins`` groups of nearly equal
    size, so ties may straddle a bin edge; nan predictions are left out.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    p = as_float_array(p_pred, "p_pred")
    y = _outcomes(outcome, len(p))
    keep = ~np.isnan(p)
    p, y = p[keep], y[keep]
    order = np.argsort(p, kind="stable")
    table: list[CalibrationBin] = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if chunk.size == 0:
            continue
        table.append(
            CalibrationBin(
                lower=float(p[chunk].min()),
                upper=float(p[chunk].max()),
                count=int(chunk.size),
                mean_predicted=float(p[chunk].mean()),
                observed_rate=float(y[chunk].mean()),
            )
        )
    return table


def auc(p: ArrayLike, outcome: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic, ties counted as one half.

    The probability that a random account with outcome 1 got a higher prediction than a random
    one with outcome 0. Nan when only one outcome occurs (there is nothing to rank against).
    """
    scores = as_float_array(p, "p")
    y = _outcomes(outcome, len(scores))
    keep = ~np.isnan(scores)
    scores, y = scores[keep], y[keep]
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # Mid-ranks: tied scores share the average of the ranks they span.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0
    rank_sum = float(mid_ranks[inverse][y == 1.0].sum())
    u = rank_sum - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


def brier(p: ArrayLike, outcome: ArrayLike) -> float:
    """Mean squared difference between predicted probability and the 0/1 outcome (lower is
    better; always predicting the base rate q scores q(1-q))."""
    predictions = as_float_array(p, "p")
    y = _outcomes(outcome, len(predictions))
    keep = ~np.isnan(predictions)
    return float(np.mean((predictions[keep] - y[keep]) ** 2))


# --------------------------------------------------------------------------------------------
# Bands and the composed risk
# --------------------------------------------------------------------------------------------

_BANDS: ObjectArray = np.array(
    [RiskBand.low, RiskBand.medium, RiskBand.high, RiskBand.critical], dtype=object
)


def risk_band(p: ArrayLike, thresholds: tuple[float, float, float]) -> ObjectArray:
    """``RiskBand`` per account: ``thresholds`` are the lower edges of medium, high, critical
    (a probability equal to an edge falls in the higher band). Nan gives None."""
    medium, high, critical = thresholds
    if not medium < high < critical:
        raise ValueError("risk band thresholds must be increasing")
    probabilities = as_float_array(p, "p")
    index = np.digitize(np.nan_to_num(probabilities, nan=0.0), [medium, high, critical])
    bands = _BANDS[index]
    bands[np.isnan(probabilities)] = None
    return bands


@dataclass(frozen=True)
class RiskAssessment:
    """The risk of many accounts and why.

    ``contributions`` are in log-odds of the final probability: ``purchase_pattern`` is how far
    the account's own order rhythm puts it from the population's typical risk, the others are
    the behavioural signals. Positive means "raises the risk".
    """

    base_p: FloatArray
    probability: FloatArray
    band: ObjectArray
    contributions: dict[str, FloatArray]
    signals: dict[str, FloatArray]


def assess_risk(
    params: BgNbdParams,
    x: ArrayLike,
    t_x: ArrayLike,
    T: ArrayLike,
    facts: BehaviourFacts,
    policy: RiskPolicy,
    *,
    calibration: PlattCalibration = IDENTITY_CALIBRATION,
    signal_weights: Mapping[str, float] | None = None,
    reference_p: float = 0.5,
) -> RiskAssessment:
    """The whole risk path used by the service and the backtest alike.

    base = P(no order within ``policy.horizon_days``) from BG/NBD, shifted in log-odds by the
    behavioural signals (``signal_weights`` or the policy's), then calibrated. ``reference_p`` is
    the population's typical base risk (the portfolio pass stores its median): the
    ``purchase_pattern`` driver is the account's distance from it, so "orders like everyone else"
    is not reported as a reason. Accounts without any order give nan risk and no band.
    """
    base = p_no_purchase_within(params, x, t_x, T, float(policy.horizon_days))
    return assess_base_risk(
        base,
        facts,
        policy,
        calibration=calibration,
        signal_weights=signal_weights,
        reference_p=reference_p,
    )


def assess_base_risk(
    base_p: ArrayLike,
    facts: BehaviourFacts,
    policy: RiskPolicy,
    *,
    calibration: PlattCalibration = IDENTITY_CALIBRATION,
    signal_weights: Mapping[str, float] | None = None,
    reference_p: float = 0.5,
) -> RiskAssessment:
    """``assess_risk`` from a base probability already computed (by one population model or a
    combination of them, see ``combined``)."""
    base = as_float_array(base_p, "base_p")
    weights = (
        dict(signal_weights) if signal_weights is not None else policy.signal_weights.model_dump()
    )
    signals = behaviour_signals(facts, policy)
    if len(facts) != len(base):
        raise ValueError("facts and purchase history differ in length")
    adjusted, contributions = adjust_log_odds(base, signals, weights)
    probability = apply_platt(adjusted, calibration)
    reference = float(logit(reference_p)[0])
    scaled = {"purchase_pattern": calibration.slope * (logit(base) - reference)}
    scaled.update({name: calibration.slope * value for name, value in contributions.items()})
    return RiskAssessment(
        base_p=base,
        probability=probability,
        band=risk_band(probability, policy.band_thresholds),
        contributions=scaled,
        signals=signals,
    )
