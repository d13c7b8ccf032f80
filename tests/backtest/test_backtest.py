"""``kam backtest`` on a history drawn from a known BG/NBD process: the model ranks and is
calibrated, the reports have their documented shape, nothing after the cutoff reaches the
predictions, and every input problem is one line with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.cli.backtest import BacktestReport, backtest, parse_day, read_transactions
from services.cli.main import main
from tests.backtest.synthetic import END, write_orders_csv

ACCOUNTS = 4000
CUTOFF = date(2025, 9, 30)  # 92 days before the file ends: the 90-day outcome is complete
KAM = (sys.executable, "-m", "services.cli.main")
SCORES = ("model", "bgnbd", "pareto_nbd", "average", "days_since_last_order", "order_count")


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backtest") / "orders.csv"
    write_orders_csv(path, ACCOUNTS, seed=3)
    return path


@pytest.fixture(scope="module")
def report(history: Path) -> BacktestReport:
    return backtest(read_transactions(history), cutoff=CUTOFF, horizon_days=90)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["backtest", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _score(report: BacktestReport, key: str) -> Any:
    [score] = [s for s in report.scores if s.key == key]
    return score


def test_model_ranks_accounts_far_better_than_chance(report: BacktestReport) -> None:
    model = _score(report, "model")
    assert model.auc > 0.8
    assert model.brier < report.no_purchase_rate * (1 - report.no_purchase_rate)
    # The rhythm-aware model beats counting orders; days since the last order is the strong
    # naive rule, which the model should at least match.
    assert model.auc > _score(report, "order_count").auc + 0.1
    assert model.auc >= _score(report, "days_since_last_order").auc
    assert model.brier < _score(report, "days_since_last_order").brier


def test_model_is_calibrated_per_decile(report: BacktestReport) -> None:
    # Each decile holds ~370 accounts, so its observed rate scatters around the truth by one
    # binomial standard error sqrt(p(1-p)/n) (<= 0.026); 3 of them bound it (a 0.3% chance per
    # decile). The 0.02 beside it is the model's own approximation on this data: a
    # continuous-time process observed in whole days, and the revenue-decline signal's prior
    # weight applied on top.
    table = _score(report, "model").calibration
    assert len(table) == 10
    assert sum(b.count for b in table) == len(report.account_ids)
    for b in table:
        spread = math.sqrt(b.mean_predicted * (1 - b.mean_predicted) / b.count)
        assert abs(b.mean_predicted - b.observed_rate) <= 3 * spread + 0.02, b
    assert table[0].mean_predicted < 0.1 < 0.9 < table[-1].mean_predicted
    # Over all accounts the same bound is much tighter.
    rate, n = report.no_purchase_rate, len(report.account_ids)
    mean = float(_score(report, "model").probability.mean())
    assert abs(mean - rate) <= 3 * math.sqrt(rate * (1 - rate) / n) + 0.02


def test_scope_is_accounts_with_an_order_by_the_cutoff(history: Path) -> None:
    transactions = read_transactions(history)
    cut = CUTOFF.toordinal()
    ordered = transactions.amount > 0
    expected = {
        transactions.account_ids[a]
        for a in np.unique(transactions.account[ordered & (transactions.day <= cut)])
    }
    scored = backtest(transactions, cutoff=CUTOFF, horizon_days=90).account_ids
    assert set(scored) == expected
    assert len(scored) < len(transactions.account_ids)  # some accounts start after the cutoff


def test_text_report(capsys: pytest.CaptureFixture[str], history: Path) -> None:
    code, out, err = _run(capsys, "--orders", str(history), "--cutoff", str(CUTOFF))
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"kam backtest: {history}"
    assert "no order in 2025-10-01 .. 2025-12-29" in lines[1]
    header = next(line for line in lines if line.strip().startswith("model"))
    for label in ("model", "BG/NBD", "Pareto/NBD", "combined", "days since last", "order count"):
        assert label in header
    for name in ("AUC", "Brier", "accounts", "no-order rate", "mean predicted"):
        [row] = [line for line in lines if line.startswith(name)]
        assert len(row.split()) >= 4
    start = lines.index(next(line for line in lines if line.startswith("decile")))
    deciles = lines[start + 1 : start + 11]
    assert [line.split()[0] for line in deciles] == [str(i) for i in range(1, 11)]
    assert all(line.count("/") == 6 for line in deciles)  # predicted / observed, six scores


def test_json_report(capsys: pytest.CaptureFixture[str], history: Path) -> None:
    code, out, _ = _run(capsys, "--orders", str(history), "--cutoff", str(CUTOFF), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["cutoff"] == "2025-09-30"
    assert report["horizon_days"] == 90
    assert report["outcome"] == {"event": "no order", "after": "2025-09-30", "until": "2025-12-29"}
    assert report["accounts"]["in_file"] == ACCOUNTS
    scored = report["accounts"]["scored"]
    assert 0 < report["accounts"]["no_purchase_rate"] < 1
    assert set(report["model"]["bgnbd"]) >= {"r", "alpha", "a", "b", "converged"}
    assert report["model"]["bgnbd"]["n"] == scored
    assert report["baseline_fit"]["cutoff"] == "2025-07-02"
    assert list(report["scores"]) == list(SCORES)
    for score in report["scores"].values():
        assert 0.5 < score["auc"] <= 1
        assert 0 <= score["brier"] < 0.25
        assert score["note"] is None
        bins = score["calibration"]
        assert len(bins) == 10
        assert sum(b["count"] for b in bins) == scored
        assert set(bins[0]) == {"lower", "upper", "count", "mean_predicted", "observed_rate"}
        means = [b["mean_predicted"] for b in bins]
        assert means == sorted(means)
    assert report["warnings"] == []


def _probabilities(report: BacktestReport) -> dict[str, dict[str, float]]:
    return {
        score.key: dict(zip(report.account_ids, score.probability, strict=True))
        for score in report.scores
        if score.probability is not None
    }


def test_data_after_the_cutoff_changes_no_prediction(tmp_path: Path, history: Path) -> None:
    before = backtest(read_transactions(history), cutoff=CUTOFF, horizon_days=90)
    later = tmp_path / "later.csv"
    text = history.read_text()
    rows = [
        "A000001,2025-10-01,999.00,",  # inside the horizon: an outcome, not an input
        "A000002,2025-12-01T08:00:00,5.00,1.00",
        "NEW-1,2025-10-15,100.00,60.00",  # an account born after the cutoff
        "A000003,2026-03-01,10.00,",  # after the horizon: changes nothing at all
        "NEW-2,2026-02-01,10.00,",
    ]
    later.write_text(text + "\n".join(rows) + "\n")
    after = backtest(read_transactions(later), cutoff=CUTOFF, horizon_days=90)
    assert after.account_ids == before.account_ids
    assert after.fits.bgnbd == before.fits.bgnbd
    assert after.fits.pareto_nbd == before.fits.pareto_nbd
    # Every score's probability, account by account, bit for bit.
    assert len(_probabilities(before)) == len(SCORES)
    assert _probabilities(after) == _probabilities(before)

    beyond = tmp_path / "beyond.csv"
    beyond.write_text(text + "\n".join(rows[3:]) + "\n")
    far = backtest(read_transactions(beyond), cutoff=CUTOFF, horizon_days=90)
    for old, new in zip(before.scores, far.scores, strict=True):
        assert (new.auc, new.brier, new.calibration) == (old.auc, old.brier, old.calibration)


def test_baselines_without_earlier_history_report_auc_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 40 accounts, all starting within the 90 days before the cutoff: nothing at cutoff - 90.
    lines = ["account_id,date,amount"]
    for a in range(40):
        lines.append(f"C{a},2024-0{1 + a % 3}-1{a % 10},10")
        lines.append(f"C{a},2024-03-2{a % 10},10")
        if a % 2:
            lines.append(f"C{a},2024-05-0{1 + a % 9},10")
    lines.append("C0,2024-08-01,10")  # the file reaches past the horizon
    path = _write(tmp_path / "young.csv", "\n".join(lines) + "\n")
    code, out, err = _run(capsys, "--orders", str(path), "--cutoff", "2024-03-31", "--json")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    for key in ("days_since_last_order", "order_count"):
        assert scores[key]["brier"] is None
        assert scores[key]["calibration"] is None
        assert scores[key]["note"].startswith("AUC only: 0 account(s) had ordered by 2024-01-01")
        assert scores[key]["auc"] is not None
    assert scores["model"]["calibration"] is not None
    code, out, _ = _run(capsys, "--orders", str(path), "--cutoff", "2024-03-31")
    assert "note: days since last: AUC only" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-31", date(2024, 3, 31)),
        ("2024-03-31T23:59:59", date(2024, 3, 31)),
        ("2024-03-31 08:00", date(2024, 3, 31)),
        ("2024-03-31T23:30:00-02:00", date(2024, 4, 1)),  # in UTC, as the service stores it
        ("2024-04-01T00:30:00Z", date(2024, 4, 1)),
        (" 2024-03-31 ", date(2024, 3, 31)),
    ],
)
def test_dates_and_datetimes_give_their_day(text: str, expected: date) -> None:
    assert parse_day(text) == expected.toordinal()


def test_header_is_forgiving_about_case_spaces_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffAccount_ID , Date,AMOUNT\nA,2024-01-01,1\n\nA,2024-01-02,2\n".encode())
    transactions = read_transactions(path)
    assert transactions.account_ids == ["A"]
    assert list(transactions.amount) == [1.0, 2.0]


GOOD = "account_id,date,amount\nA,2024-01-01,10\nB,2024-02-01,20\n"


def _few_accounts() -> str:
    rows = [f"A{a},2024-01-0{1 + a},10\nA{a},2024-02-0{1 + a},10" for a in range(5)]
    return "account_id,date,amount\n" + "\n".join(rows) + "\nA0,2024-12-31,5\n"


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, (), "no such file"),
        ("", (), "the file is empty"),
        ("account_id,date\nA,2024-01-01\n", (), "missing column(s) amount"),
        ("account_id,date,amount,region\nA,2024-01-01,1,x\n", (), "unknown column(s) 'region'"),
        ("account_id,date,amount,amount\nA,2024-01-01,1,1\n", (), "named twice: amount"),
        (GOOD + "C,31/12/2024,5\n", (), "line 4: unparsable date '31/12/2024'"),
        (GOOD + "C,2024-12-31T25:00,5\n", (), "line 4: unparsable date '2024-12-31T25:00'"),
        (GOOD + "C,,5\n", (), "line 4: unparsable date ''"),
        (GOOD + "C,2024-12-31,12.5 EUR\n", (), "line 4: unparsable amount '12.5 EUR'"),
        (GOOD + "C,2024-12-31,nan\n", (), "line 4: unparsable amount 'nan'"),
        ("account_id,date,amount,cost\nA,2024-01-01,10,abc\n", (), "line 2: unparsable cost"),
        (GOOD + "C,2024-12-31\n", (), "line 4: 2 fields, the header has 3"),
        (GOOD + ",2024-12-31,1\n", (), "line 4: empty account_id"),
        ("account_id,date,amount\n", (), "no transactions after the header"),
        (GOOD, ("--cutoff", "2023-12-31"), "--cutoff 2023-12-31 is before the data"),
        (GOOD, ("--cutoff", "2024-02-01"), "--cutoff 2024-02-01 leaves no data after it"),
        (GOOD, ("--cutoff", "2024-01-15"), "the horizon ends on 2024-04-14 but the file runs"),
        (GOOD, ("--cutoff", "31.12.2024"), "--cutoff '31.12.2024' is not a date"),
        (GOOD, ("--horizon-days", "3"), "--horizon-days 3: input should be greater than"),
        (_few_accounts(), ("--cutoff", "2024-06-30"), "too few accounts to fit the risk model"),
    ],
)
def test_input_problems_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: str | None,
    args: tuple[str, ...],
    message: str,
) -> None:
    path = tmp_path / "orders.csv"
    if content is not None:
        path.write_text(content)
    if "--cutoff" not in args:
        args = ("--cutoff", "2024-01-15", *args)
    code, out, err = _run(capsys, "--orders", str(path), *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("kam backtest: error: ")
    assert message in err, err


def test_the_command_as_a_process_prints_no_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", GOOD + "C,2024-13-01,5\n")
    result = subprocess.run(  # noqa: S603
        [*KAM, "backtest", "--orders", str(path), "--cutoff", "2024-01-15"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "kam backtest: error: line 4: unparsable date '2024-13-01' (expected an ISO date such "
        "as 2024-03-31 or a datetime such as 2024-03-31T14:05:00+01:00)\n"
    )


def test_the_synthetic_file_ends_on_its_end_date(history: Path) -> None:
    assert read_transactions(history).last_day <= END.toordinal()


@pytest.fixture(scope="module")
def realistic_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log not drawn from either model: bursts, seasons, slowdowns, pauses, Weibull churn."""
    from tests.backtest.realistic import generate_purchase_log, write_purchase_log_csv

    path = tmp_path_factory.mktemp("realistic") / "orders.csv"
    write_purchase_log_csv(path, generate_purchase_log(8000, years=4.0, seed=2))
    return path


@pytest.mark.parametrize("horizon_days", [91, 273])
def test_on_a_log_not_drawn_from_the_models_the_model_beats_days_since_last_order(
    realistic_history: Path, horizon_days: int
) -> None:
    transactions = read_transactions(realistic_history)
    cutoff = date.fromordinal(transactions.last_day - horizon_days)
    report = backtest(transactions, cutoff=cutoff, horizon_days=horizon_days)
    model = _score(report, "model")
    baseline = _score(report, "days_since_last_order")
    assert report.layer is not None  # four years: the layer is learned on replays
    assert report.fits.bgnbd_source == "fitted"
    assert report.fits.pareto_source == "fitted"
    assert model.auc > baseline.auc
    assert model.brier < baseline.brier
    assert model.max_decile_error < 0.1
