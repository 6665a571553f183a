"""The privacy budget across recurring DP releases (synthesize/budget.py), DP bounds and the DP spec checks."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthfactory.errors import EXIT_GATE
from synthfactory.spec import DPBudgetSpec, SpecError, load_spec
from synthfactory.storage import Store
from synthfactory.synthesize import budget
from synthfactory.synthesize.dp import DPBoundsError, DPSynthesizer, bin_edges, dp_bounds
from tests.conftest import write_spec

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def _charge(root: Path, run: str, eps: float, cap: DPBudgetSpec, now: datetime = NOW, delta: float = 1e-5) -> dict:
    return budget.charge(Store(), str(root), "ds", run, epsilon=eps, delta=delta, kind="dp_mst", budget=cap, now=now)


def test_ledger_composes_refuses_and_never_counts_a_retry_twice(tmp_path):
    cap = DPBudgetSpec(epsilon=5.0, window=30)
    s = _charge(tmp_path, "r1", 3.0, cap)
    assert s["spent_epsilon"] == 3.0 and s["remaining_epsilon"] == 2.0 and s["releases_in_window"] == 1
    assert s["charged_on"] == "fit" and s["composition"].startswith("basic")
    again = _charge(tmp_path, "r1", 3.0, cap)  # a retried fit of the same run: still one entry
    assert again["spent_epsilon"] == 3.0 and len(budget.entries(Store(), str(tmp_path), "ds")) == 1
    entry = tmp_path / "ds" / "dp_ledger" / "r1.json"
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600  # staging: PHI side, whatever the umask
    with pytest.raises(budget.BudgetRefused) as err:
        _charge(tmp_path, "r2", 2.5, cap, now=NOW + timedelta(days=3))
    msg = str(err.value)
    assert err.value.exit_code == EXIT_GATE
    assert "ε 2.5 needed, 3 of 5 spent in the last 30 days, 2 remaining" in msg and "basic composition" in msg
    assert not (tmp_path / "ds" / "dp_ledger" / "r2.json").exists()  # refused: nothing charged
    assert _charge(tmp_path, "r3", 2.0, cap, now=NOW + timedelta(days=3))["remaining_epsilon"] == 0.0
    # r1 leaves the window after 30 days: its ε no longer counts
    later = _charge(tmp_path, "r4", 3.0, cap, now=NOW + timedelta(days=31))
    assert later["spent_epsilon"] == 5.0 and later["releases_in_window"] == 2


def test_delta_cap_and_no_window(tmp_path):
    cap = DPBudgetSpec(delta=1e-5)
    _charge(tmp_path, "a", 1.0, cap, delta=6e-6)
    with pytest.raises(budget.BudgetRefused, match="δ 6e-06 needed"):
        _charge(tmp_path, "b", 1.0, cap, now=NOW + timedelta(days=3000), delta=6e-6)


def test_a_racing_run_that_overshoots_withdraws(tmp_path, monkeypatch):
    cap = DPBudgetSpec(epsilon=4.0)
    real_entries = budget.entries
    calls = {"n": 0}

    def racing(store, root, ds):  # another run records 3.0 between this run's check and its re-read
        calls["n"] += 1
        if calls["n"] == 2:
            store.write_json(str(tmp_path / "ds" / "dp_ledger" / "other.json"),
                             {"run_id": "other", "epsilon": 3.0, "delta": 0.0, "at": NOW.isoformat()})
        return real_entries(store, root, ds)

    monkeypatch.setattr(budget, "entries", racing)
    with pytest.raises(budget.BudgetRefused):
        _charge(tmp_path, "mine", 2.0, cap)
    assert not (tmp_path / "ds" / "dp_ledger" / "mine.json").exists()


def test_dp_bounds_and_data_independent_bins():
    rng = np.random.default_rng(0)
    values = rng.normal(7.0, 1.0, 2000)
    lo, hi = dp_bounds(values, 1.0)
    assert 1 <= lo <= 4 and 8 <= hi <= 32  # power-of-two cells around the bulk, one cell of margin
    assert dp_bounds(np.append(values, [1e9, -1e9]), 1.0)[1] <= 32  # stray values do not stretch them
    assert dp_bounds(np.concatenate([np.zeros(500), values]), 1.0)[0] == 0.0  # zeros of a count kept
    assert dp_bounds(np.array([5.0, 6.0, np.nan]), 0.01) is None  # too few rows for that ε
    assert list(bin_edges(0, 5, integer=True, bins=10)) == [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    counts = bin_edges(0, 200, integer=True, bins=10, count=True)
    assert list(counts[:6]) == [-0.5, 0.5, 1.5, 2.5, 3.5, 5.5] and counts[-1] == 200.5
    assert len(bin_edges(3.0, 20.0, integer=False, bins=20)) == 21


def test_dp_fit_refuses_naming_columns_when_bounds_cannot_be_estimated():
    df = pd.DataFrame({"gender": ["f", "m"] * 10, "hba1c": np.linspace(5, 9, 20)})
    with pytest.raises(DPBoundsError, match="could not estimate bounds of hba1c"):
        DPSynthesizer("dp_mst", epsilon=0.5).fit(df)
    with pytest.raises(DPBoundsError, match="no public bounds for hba1c"):
        DPSynthesizer("dp_mst", epsilon=0.5, estimate_bounds=False).fit(df)
    with pytest.raises(SpecError, match="default_distribution \\(a parameter of gaussian_copula"):
        DPSynthesizer("dp_mst", default_distribution="norm")


def test_spec_refuses_foreign_params_profile_budgets_and_unbounded_columns(tmp_path):
    with pytest.raises(SpecError, match="dp_mst does not take default_distribution \\(a parameter of gaussian_copula"):
        load_spec(write_spec(tmp_path, "dp_params", tmp_path, tmp_path / "s", synthesizer__kind="dp_mst",
                             synthesizer__params={"default_distribution": "truncnorm"}))
    with pytest.raises(SpecError, match="dp_budget: the privacy budget is the dataset's"):
        load_spec(write_spec(tmp_path, "dp_prof", tmp_path, tmp_path / "s",
                             profiles={"loose": {"privacy": {"dp_budget": {"epsilon": 100}}}}))
    with pytest.raises(SpecError, match=r"no public bounds for the numeric column\(s\) \['n_encounters', "
                                        r"'n_conditions', 'hba1c'"):
        load_spec(write_spec(tmp_path, "dp_bounds", tmp_path, tmp_path / "s", synthesizer__kind="dp_mst",
                             synthesizer__dp={"estimate_bounds": False, "bounds": {"bmi": [10, 80]}}))
    ok = load_spec(write_spec(tmp_path, "dp_ok", tmp_path, tmp_path / "s", synthesizer__kind="dp_aim",
                              synthesizer__params={"max_model_size": 20}, privacy__dp_budget={"epsilon": 10,
                                                                                               "window": 28}))
    assert ok.privacy.dp_budget.window == 28


def test_dp_fit_stage_charges_the_ledger_and_refuses_before_fit(tmp_path):
    from synthfactory import pipeline
    from synthfactory.synthesize.engine import metadata_dict

    rng = np.random.default_rng(1)
    n = 400
    train = pd.DataFrame({"patient_key": [f"k{i}" for i in range(n)], "gender": rng.choice(["f", "m"], n),
                          "n_encounters": rng.poisson(3, n), "hba1c": rng.normal(6.5, 1.0, n).round(1)})
    spec = load_spec(write_spec(tmp_path, "dp_stage", tmp_path, tmp_path / "staging", synthesizer__kind="dp_mst",
                                synthesizer__dp={"epsilon": 3.0, "bounds": {"hba1c": [3, 20],
                                                                            "n_encounters": [0, 100]}},
                                privacy__dp_budget={"epsilon": 5.0, "window": 7}))
    prepared = {}
    for run in ("r1", "r2"):
        ctx = pipeline.RunContext(spec=spec, run_id=run, version="v1")
        ctx.store.write_df(ctx.train_uri, train)
        ctx.store.write_json(ctx.uri("model", "metadata.json"), metadata_dict(train, exclude=("patient_key",)))
        prepared[run] = {"train_uri": ctx.train_uri, "metadata_uri": ctx.uri("model", "metadata.json")}
    fitted = pipeline.fit(pipeline.RunContext(spec=spec, run_id="r1", version="v1"), prepared["r1"])
    assert fitted["dp_budget"]["spent_epsilon"] == 3.0 and fitted["dp_budget"]["remaining_epsilon"] == 2.0
    assert fitted["dp"]["epsilon_bounds"] == 0.0 and fitted["dp"]["delta"] == pytest.approx(1 / (n * n ** 0.5))
    assert fitted["dp"]["bins"]["n_encounters"] < 20  # geometric count bins
    ctx2 = pipeline.RunContext(spec=spec, run_id="r2", version="v1")
    with pytest.raises(budget.BudgetRefused, match="ε 3 needed, 3 of 5 spent in the last 7 days, 2 remaining"):
        pipeline.fit(ctx2, prepared["r2"])
    assert not Path(ctx2.uri("model", "synthesizer.pkl")).exists()  # refused before the fit


def test_card_shows_spent_and_remaining_budget():
    from synthfactory.quality.datacard import render_datacard
    from synthfactory.testing.cohorts import cohort_table
    from tests.quality.test_datacard import DECISION

    real = cohort_table(120, seed=3, key=None)
    status = budget.status(DPBudgetSpec(epsilon=10.0, window=28),
                           {"epsilon": 6.0, "delta": 2e-5, "releases": 2, "runs": ["a", "b"]}, 28)
    html = render_datacard(
        dataset="dp_x", version="v1", run_id="b", decision=DECISION,
        quality_report={"quality_score": 0.8, "fidelity": {}, "expectations": {"evaluated": 0, "successful": 0,
                                                                                "failed": []}},
        real=real, synthetic=real, max_plot_columns=1,
        synthesizer={"kind": "dp_mst", "params": {}, "dp_budget": {**status, "epsilon": 3.0, "delta": 1e-5}})
    section = html[html.index('<section id="dp_budget">'):]
    section = section[:section.index("</section>")]
    for text in ("Privacy budget", "ε 3, δ 1e-05", "the last 28 days", "2 DP fit(s)", "ε 6, δ 2e-05", "ε 10",
                 "remaining</th><td>ε 4", "published or not", "basic (sequential) composition"):
        assert text in section, text
