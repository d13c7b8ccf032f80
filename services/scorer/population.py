"""Population facts: what a single rescore needs to know about the whole portfolio.

Fitted by the portfolio pass (and by the first rescore of a new installation) from every
account's features: the feature percentiles and the 80/20 profit curve for the value score, the
two retention models (BG/NBD and Pareto/NBD) for the risk, and, when the stored history covers
more than two horizons, the layer learned from a replay one horizon back (``combined``).

A fit on a handful of accounts would hand out tiers and risks that the next pass takes back:
below the policy's ``population.min_fit_accounts`` active accounts with orders, the retention
models are not fitted; the documented prior (``PRIOR_BGNBD``) is used and every risk says so.
Each fit belongs to a *generation*: a new one starts when the portfolio grew or changed a lot
since the previous fit (a bulk load). Hysteresis holds only tiers decided in the current
generation, so tiers handed out on a half-loaded portfolio are not kept against the data.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.scorer.engine import (
    IDENTITY_CALIBRATION,
    BgNbdParams,
    PlattCalibration,
    ScoringPolicy,
    behaviour_signals,
    cumulative_profit_share,
    population_percentiles,
)
from services.scorer.engine.arrays import FloatArray
from services.scorer.engine.combined import (
    BASE_MODELS,
    ModelFits,
    Replay,
    RetentionModels,
    choose_base,
    fit_models,
    learn_layer,
    replays_back,
)
from services.scorer.engine.combined import BaseModel as BaseModelName
from services.scorer.engine.pareto import ParetoNbdParams
from services.scorer.engine.value import PopulationPercentiles
from services.scorer.features import FeatureTable, load_features
from shared.models import PopulationFit

log = structlog.get_logger(__name__)

REPLAY_EVERY = timedelta(hours=24)
CURVE_POINTS = 1001
PRIOR_REASON = "too few accounts with orders to fit the purchase models"


class _Facts(BaseModel):
    # Stored JSON: a field an older or newer version wrote and this one does not know is ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ProfitCurve(_Facts):
    """The 80/20 curve sampled: gross profit (descending) and the share of total profit brought
    by accounts at or above it; a single rescore places an account on it by interpolation."""

    gross_profit: list[float]
    share: list[float]

    def place(self, gross_profit: FloatArray) -> FloatArray:
        profit = np.nan_to_num(gross_profit, nan=0.0)
        if not self.gross_profit:
            return np.ones_like(profit)
        # np.interp needs ascending x: walk the curve from the smallest profit up.
        xs = np.asarray(self.gross_profit[::-1])
        ys = np.asarray(self.share[::-1])
        placed = np.interp(profit, xs, ys, left=1.0, right=float(ys[-1]))
        return np.asarray(np.where(profit <= 0, 1.0, placed), dtype=np.float64)


class Calibration(_Facts):
    """What the replay of history at ``cutoff`` showed, and what the service uses from it.

    ``base_model`` and ``method`` are the winner among every base (BG/NBD, Pareto/NBD, their
    average) and method (``policy``: the policy's signal weights as they are; ``calibrated``:
    the same, Platt-calibrated; ``learned``: weights learned from the outcomes, then
    calibrated), judged on the held-out half (``held_out_brier`` has every candidate's score;
    ``auc``, ``deciles`` and ``max_decile_error`` are the winner's). ``used`` is False when no
    replay could be made (``reason`` says why): the policy's model is then used as it is."""

    used: bool
    base_model: str = "average"
    method: Literal["policy", "calibrated", "learned"] = "policy"
    slope: float = 1.0
    intercept: float = 0.0
    signal_weights: dict[str, float] | None = None
    cutoff: datetime | None = None
    horizon_days: int | None = None
    occasion_window_days: int | None = None
    accounts: int = 0
    observed_no_purchase_rate: float | None = None
    judged_on: str | None = None
    auc: float | None = None
    max_decile_error: float | None = None
    held_out_brier: dict[str, float] = {}
    deciles: list[dict[str, float | int]] = []
    reason: str | None = None
    weights_basis: dict[str, float] | None = None  # the policy's signal weights replayed
    model_choice: str | None = None  # the policy's ``risk.model`` replayed

    def applies(self, policy: ScoringPolicy) -> bool:
        """Whether this replay was made for the policy's horizon and occasion window."""
        risk = policy.risk
        return (
            self.used
            and self.horizon_days == risk.horizon_days
            and self.occasion_window_days == risk.occasion_window_days
        )

    def platt(self, policy: ScoringPolicy) -> PlattCalibration:
        if not self.applies(policy):
            return IDENTITY_CALIBRATION
        return PlattCalibration(slope=self.slope, intercept=self.intercept)

    def weights(self, policy: ScoringPolicy) -> dict[str, float] | None:
        return self.signal_weights if self.applies(policy) else None


class PopulationFacts(_Facts):
    """Everything a single rescore needs to know about the population (the stored JSON).

    ``bgnbd`` / ``pareto_nbd`` are the fitted parameters (None: not fitted), each with its
    source: ``fitted``, ``previous fit`` (this fit did not converge; the reason is in
    ``fit_notes``) or ``prior`` (too few accounts). ``generation`` numbers the fits between
    bulk changes of the portfolio (see the module docstring)."""

    percentiles: PopulationPercentiles
    profit_curve: ProfitCurve
    bgnbd: dict[str, float | int | bool | None]
    bgnbd_source: str
    pareto_nbd: dict[str, float | int | bool | None] | None = None
    pareto_source: str = "prior"
    fit_notes: list[str] = []
    fit_seconds: dict[str, float] = {}
    reference_p: float
    horizon_days: int
    occasion_window_days: int = 1
    calibration: Calibration
    accounts: int = 0
    accounts_with_orders: int = 0
    change_seq: int = 0
    generation: int = 0

    def params(self) -> BgNbdParams:
        return BgNbdParams.from_dict(self.bgnbd)

    def pareto_params(self) -> ParetoNbdParams | None:
        return None if self.pareto_nbd is None else ParetoNbdParams.from_dict(self.pareto_nbd)

    def models(self) -> RetentionModels:
        return RetentionModels(bgnbd=self.params(), pareto_nbd=self.pareto_params())

    @property
    def on_prior(self) -> bool:
        return self.bgnbd_source == "prior"

    def base_model(self, policy: ScoringPolicy) -> BaseModelName:
        """The base the risk uses under ``policy``: the policy's fixed choice, else the replay's
        winner when it applies, else the average of the two models."""
        layer = self.calibration.base_model if self.calibration.applies(policy) else None
        return choose_base(policy.risk.model, self.models(), layer)


def _profit_curve(gross_profit: FloatArray) -> ProfitCurve:
    profit = np.sort(np.clip(np.nan_to_num(gross_profit, nan=0.0), 0.0, None))[::-1]
    profit = profit[profit > 0]
    if profit.size == 0:
        return ProfitCurve(gross_profit=[], share=[])
    share = np.cumsum(profit) / profit.sum()
    picks = np.unique(np.linspace(0, profit.size - 1, min(CURVE_POINTS, profit.size)).astype(int))
    return ProfitCurve(
        gross_profit=[float(v) for v in profit[picks]], share=[float(v) for v in share[picks]]
    )


def purchase_history(table: FeatureTable) -> tuple[FloatArray, FloatArray, FloatArray]:
    c = table.columns
    return c["x"], c["t_x"], c["T"]


def fit_retention_models(
    table: FeatureTable,
    *,
    min_accounts: int,
    previous_bgnbd: BgNbdParams | None,
    previous_pareto: ParetoNbdParams | None,
) -> ModelFits:
    """Fit both models to the active accounts with orders of ``table`` (see ``fit_models``)."""
    usable = table.has_orders & ~table.lost
    x, t_x, T = (column[usable] for column in purchase_history(table))
    fits = fit_models(
        x,
        t_x,
        T,
        min_accounts=min_accounts,
        previous_bgnbd=previous_bgnbd,
        previous_pareto=previous_pareto,
    )
    if fits.notes:
        log.info(
            "retention_fit_notes",
            notes=fits.notes,
            bgnbd=fits.bgnbd_source,
            pareto_nbd=fits.pareto_source,
        )
    return fits


def allowed_bases(policy: ScoringPolicy) -> list[BaseModelName]:
    choice = policy.risk.model
    return list(BASE_MODELS) if choice == "auto" else [choice]


def build_replay(
    then: FeatureTable,
    later: FeatureTable,
    policy: ScoringPolicy,
    *,
    previous_bgnbd: BgNbdParams | None,
    previous_pareto: ParetoNbdParams | None,
) -> Replay | None:
    """The accounts as they stood at ``then.as_of`` (the models fitted on them then, each base's
    probability and the signals) and whether they ordered in the horizon after it, read from
    ``later`` (one horizon on). None when too few accounts had history then."""
    horizon = float(policy.risk.horizon_days)
    scored = then.has_orders & ~then.lost
    fits = fit_retention_models(
        then,
        min_accounts=policy.population.min_fit_accounts,
        previous_bgnbd=previous_bgnbd,
        previous_pareto=previous_pareto,
    )
    if fits.bgnbd_source == "prior":
        return None
    position = np.clip(np.searchsorted(later.account_id, then.account_id), 0, len(later) - 1)
    found = later.account_id[position] == then.account_id
    last_gap = later.columns["days_since_last_order"][position]
    # No order in (then, later] <=> the last order as of later is at least a horizon old.
    outcome = np.where(found, ~(last_gap < horizon), True).astype(np.float64)
    x, t_x, T = purchase_history(then)
    bases = fits.models.bases(x, t_x, T, horizon)
    signals = behaviour_signals(then.behaviour(), policy.risk)
    return Replay(
        bases={name: values[scored] for name, values in bases.items()},
        signals={name: values[scored] for name, values in signals.items()},
        outcome=outcome[scored],
        codes=then.account_id[scored],
    )


def _replay_calibration(
    replays: list[FeatureTable],
    now: FeatureTable,
    policy: ScoringPolicy,
    previous: PopulationFacts | None,
) -> Calibration:
    """Score the accounts as they stood one horizon ago (and further back, given), compare
    with what they did since, and keep the base model and layer that predicted best
    (``learn_layer``). ``replays``: the feature tables one, two... horizons back."""
    previous_bgnbd = previous.params() if previous and not previous.on_prior else None
    previous_pareto = previous.pareto_params() if previous else None
    recent = build_replay(
        replays[0],
        now,
        policy,
        previous_bgnbd=previous_bgnbd,
        previous_pareto=previous_pareto,
    )
    earlier = [
        replay
        for k in range(1, len(replays))
        if (
            replay := build_replay(
                replays[k],
                replays[k - 1],
                policy,
                previous_bgnbd=previous_bgnbd,
                previous_pareto=previous_pareto,
            )
        )
        is not None
    ]
    basis = {
        "cutoff": replays[0].as_of,
        "horizon_days": policy.risk.horizon_days,
        "occasion_window_days": policy.risk.occasion_window_days,
        "weights_basis": policy.risk.signal_weights.model_dump(),
        "model_choice": policy.risk.model,
    }
    if recent is None:
        return Calibration(
            used=False, reason="too few accounts with history one horizon ago", **basis
        )
    layer = learn_layer(
        recent,
        policy.risk.signal_weights.model_dump(),
        allowed=allowed_bases(policy),
        earlier=earlier,
    )
    if layer is None:
        return Calibration(
            used=False,
            reason="too few accounts, or outcomes that do not vary, one horizon ago",
            **basis,
        )
    return Calibration(
        used=True,
        base_model=layer.base_model,
        method=layer.method,
        slope=layer.platt.slope,
        intercept=layer.platt.intercept,
        signal_weights=layer.signal_weights,
        accounts=layer.accounts,
        observed_no_purchase_rate=layer.observed_no_purchase_rate,
        judged_on=layer.judged_on,
        auc=_finite(layer.auc),
        max_decile_error=_finite(layer.max_decile_error),
        held_out_brier=layer.held_out_brier,
        deciles=[b.as_dict() for b in layer.deciles],
        **basis,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


async def latest_population(session: AsyncSession) -> tuple[int, PopulationFacts] | None:
    """The newest stored facts and their id (``population_fits.id``), or None."""
    row = (
        await session.execute(
            select(PopulationFit.id, PopulationFit.facts).order_by(PopulationFit.id.desc()).limit(1)
        )
    ).first()
    if row is None:
        return None
    try:
        return int(row[0]), PopulationFacts.model_validate(row[1])
    except ValidationError as exc:
        # Facts in a shape this version cannot read are as good as none: they get refitted.
        log.warning("population_facts_unreadable", errors=exc.error_count())
        return None


def _reusable_calibration(
    previous: PopulationFacts | None, policy: ScoringPolicy, as_of: datetime, generation: int
) -> bool:
    # A new generation (the portfolio grew or was reloaded) replays its history anew.
    if previous is None or previous.generation != generation:
        return False
    calibration = previous.calibration
    return (
        calibration.cutoff is not None
        and calibration.horizon_days == policy.risk.horizon_days
        and calibration.occasion_window_days == policy.risk.occasion_window_days
        and calibration.weights_basis == policy.risk.signal_weights.model_dump()
        and calibration.model_choice == policy.risk.model
        and previous.generation > 0
        and calibration.cutoff + timedelta(days=policy.risk.horizon_days) > as_of - REPLAY_EVERY
    )


def _new_generation(
    table: FeatureTable,
    previous: PopulationFacts | None,
    policy: ScoringPolicy,
    seqs: np.ndarray[Any, np.dtype[np.int64]] | None,
) -> tuple[int, str | None]:
    """The generation of a fit on ``table``: the previous one's, unless the portfolio grew or
    changed by more than the policy's shares since (then the next, with the reason)."""
    if previous is None:
        return 1, "first fit"
    rules = policy.population
    with_orders = int((table.has_orders & ~table.lost).sum())
    grown = with_orders - previous.accounts_with_orders
    if grown > rules.refit_growth_share * max(previous.accounts_with_orders, 1):
        return previous.generation + 1, f"accounts with orders grew by {grown}"
    changed = int((seqs > previous.change_seq).sum()) if seqs is not None else 0
    if changed > rules.bulk_load_share * max(len(table), 1):
        return previous.generation + 1, f"{changed} accounts changed since the last fit"
    return previous.generation, None


async def fit_population(
    session: AsyncSession,
    *,
    table: FeatureTable,
    policy: ScoringPolicy,
    previous: PopulationFacts | None,
    seqs: np.ndarray[Any, np.dtype[np.int64]] | None = None,
) -> PopulationFacts:
    """The population facts from every account's features as of ``table.as_of`` (plus, when the
    stored history covers more than two horizons, a replay one horizon back). ``seqs`` are the
    accounts' change numbers the table includes (``Aggregates.seq``): how many changed since
    the previous fit decides whether a new generation starts."""
    change_seq = int(seqs.max()) if seqs is not None and len(seqs) else 0
    active = ~table.lost
    share = cumulative_profit_share(np.where(active, table.columns["gross_profit_12m"], 0.0))
    percentiles = population_percentiles(table.take(active).value_features(share[active]))
    fits = fit_retention_models(
        table,
        min_accounts=policy.population.min_fit_accounts,
        previous_bgnbd=previous.params() if previous and not previous.on_prior else None,
        previous_pareto=previous.pareto_params() if previous else None,
    )
    generation, why = _new_generation(table, previous, policy, seqs)
    if why is not None:
        log.info("population_generation", generation=generation, reason=why)

    horizon_days = policy.risk.horizon_days
    first_order_age = table.columns["T"][table.has_orders]
    history_days = float(first_order_age.max()) if first_order_age.size else 0.0
    if fits.bgnbd_source == "prior":
        calibration = Calibration(used=False, reason=PRIOR_REASON)
    elif history_days > 2 * horizon_days and _reusable_calibration(
        previous, policy, table.as_of, generation
    ):
        # The replay looks a horizon back; an hour more of history changes little, and it costs
        # a second full feature aggregation. It is redone daily, or when the policy's risk
        # settings change.
        assert previous is not None
        calibration = previous.calibration
    elif history_days > 2 * horizon_days:
        # A replay a horizon back, and history allowing more, a horizon apart, up to a year:
        # the candidates are fitted on the older ones and judged on the latest (``combined``).
        replays = [
            await load_features(
                session,
                as_of=table.as_of - timedelta(days=back * horizon_days),
                occasion_window_days=policy.risk.occasion_window_days,
            )
            for back in range(1, replays_back(history_days, horizon_days) + 1)
        ]
        calibration = _replay_calibration(replays, table, policy, previous)
    else:
        calibration = Calibration(
            used=False, reason=f"history covers {history_days:.0f} days, under two horizons"
        )
    facts = PopulationFacts(
        percentiles=percentiles,
        profit_curve=_profit_curve(np.where(active, table.columns["gross_profit_12m"], 0.0)),
        bgnbd=fits.bgnbd.as_dict(),
        bgnbd_source=fits.bgnbd_source,
        pareto_nbd=None if fits.pareto_nbd is None else fits.pareto_nbd.as_dict(),
        pareto_source=fits.pareto_source,
        fit_notes=fits.notes,
        fit_seconds=fits.seconds,
        reference_p=0.5,
        horizon_days=horizon_days,
        occasion_window_days=policy.risk.occasion_window_days,
        calibration=calibration,
        accounts=len(table),
        accounts_with_orders=int((table.has_orders & ~table.lost).sum()),
        change_seq=change_seq,
        generation=generation,
    )
    x, t_x, T = purchase_history(table)
    base = facts.models().bases(x, t_x, T, float(horizon_days))[facts.base_model(policy)]
    base_known = base[np.isfinite(base) & active]
    reference_p = float(np.median(base_known)) if base_known.size else 0.5
    return facts.model_copy(update={"reference_p": min(max(reference_p, 1e-6), 1 - 1e-6)})


def population_row(
    facts: PopulationFacts, *, policy_version: int, evaluated_at: datetime
) -> dict[str, Any]:
    return {
        "policy_version": policy_version,
        "evaluated_at": evaluated_at,
        "accounts": facts.accounts,
        "facts": facts.model_dump(mode="json"),
    }
