"""The scorer's pure scoring engine: no I/O, no SQL, no queue.

Vectorised functions over numpy columns (many accounts at once; one account is a column of one)
and small immutable inputs and outputs. The jobs load features in SQL, call these, and store the
results, so the same code serves the portfolio pass, a single rescore, the policy preview and
the backtest.

- ``policy`` (re-exported from ``shared.policy``): the scoring policy body with its defaults.
- ``value``: value score 0-100, tier gates, hysteresis, manager overrides.
- ``retention``: BG/NBD fit and the no-purchase probability, behavioural log-odds adjustment,
  Platt calibration, calibration table, AUC, Brier, risk bands.
- ``pareto``: the Pareto/NBD model beside it; ``combined``: the two together and the layer
  learned from a replay of history.
- ``drivers``: the reasons in words.
- ``history``: per-account purchase summaries (the model's x, t_x, T and the order facts) from
  dated transactions, for the backtest.
"""

from services.scorer.engine.drivers import (
    Driver,
    explain_risk,
    explain_tier,
    explain_value,
    top_risk_drivers,
)
from services.scorer.engine.history import (
    PurchaseSummary,
    occasion_starts,
    ordered_within,
    summarise_purchases,
)
from services.scorer.engine.pareto import (
    ParetoNbdParams,
    fit_pareto_nbd,
    p_alive_pareto,
    p_no_purchase_within_pareto,
    pareto_nbd_log_likelihood,
    simulate_pareto_nbd,
)
from services.scorer.engine.retention import (
    IDENTITY_CALIBRATION,
    SIGNAL_NAMES,
    BehaviourFacts,
    BgNbdParams,
    CalibrationBin,
    InsufficientDataError,
    PlattCalibration,
    RiskAssessment,
    SimulatedCohort,
    adjust_log_odds,
    apply_platt,
    assess_base_risk,
    assess_risk,
    auc,
    behaviour_signals,
    bgnbd_log_likelihood,
    brier,
    calibration_table,
    expected_purchases,
    fit_bgnbd,
    fit_platt,
    fit_signal_weights,
    p_alive,
    p_no_purchase_within,
    risk_band,
    simulate_bgnbd,
)
from services.scorer.engine.value import (
    TIER_ORDER,
    AccountFeatures,
    PopulationPercentiles,
    TierDecision,
    ValueScore,
    apply_hysteresis,
    apply_override,
    cumulative_profit_share,
    decide_tier,
    override_active,
    percentile_rank,
    population_percentiles,
    score_breakdown,
    tier_codes,
    value_score,
)
from shared.policy import (
    DEFAULT_POLICY,
    Hysteresis,
    RiskPolicy,
    ScoringPolicy,
    SignalWeights,
    TierRules,
    ValueWeights,
)

__all__ = [
    "DEFAULT_POLICY",
    "IDENTITY_CALIBRATION",
    "SIGNAL_NAMES",
    "TIER_ORDER",
    "AccountFeatures",
    "BehaviourFacts",
    "BgNbdParams",
    "CalibrationBin",
    "Driver",
    "Hysteresis",
    "InsufficientDataError",
    "ParetoNbdParams",
    "PlattCalibration",
    "PopulationPercentiles",
    "PurchaseSummary",
    "RiskAssessment",
    "RiskPolicy",
    "ScoringPolicy",
    "SignalWeights",
    "SimulatedCohort",
    "TierDecision",
    "TierRules",
    "ValueScore",
    "ValueWeights",
    "adjust_log_odds",
    "apply_hysteresis",
    "apply_override",
    "apply_platt",
    "assess_base_risk",
    "assess_risk",
    "auc",
    "behaviour_signals",
    "bgnbd_log_likelihood",
    "brier",
    "calibration_table",
    "cumulative_profit_share",
    "decide_tier",
    "expected_purchases",
    "explain_risk",
    "explain_tier",
    "explain_value",
    "fit_bgnbd",
    "fit_pareto_nbd",
    "fit_platt",
    "fit_signal_weights",
    "occasion_starts",
    "ordered_within",
    "override_active",
    "p_alive",
    "p_alive_pareto",
    "p_no_purchase_within",
    "p_no_purchase_within_pareto",
    "pareto_nbd_log_likelihood",
    "percentile_rank",
    "population_percentiles",
    "risk_band",
    "score_breakdown",
    "simulate_bgnbd",
    "simulate_pareto_nbd",
    "summarise_purchases",
    "tier_codes",
    "top_risk_drivers",
    "value_score",
]
