"""The relational privacy stage audits the whole record: record.* figures beside their references in the privacy
summary, and the gate judges them."""

from __future__ import annotations

import json
from pathlib import Path

from synthfactory import pipeline as p
from synthfactory.release.gate import privacy_checks
from synthfactory.spec import load_spec
from synthfactory.testing.records import write_extract
from tests.conftest import write_spec


def test_relational_privacy_stage_computes_the_record_figures(tmp_path):
    extract = Path(write_extract(str(tmp_path / "ndjson"), patients=90, seed=5))
    spec = load_spec(write_spec(tmp_path / "specs", "rel_record", extract, tmp_path / "staging",
                                features__labs=[{"name": "hba1c", "loinc": "4548-4"}], quality__relationships=[],
                                synthesizer__mode="relational", synthesizer__kind="gaussian_copula",
                                synthesizer__params={"default_distribution": "norm"},
                                synthesizer__relational={"child_kind": "gaussian_copula",
                                                         "child_params": {"default_distribution": "norm"}},
                                privacy__anonymeter_attacks=0, privacy__reference_resplits=4,
                                privacy__mia={"attacks": ["distance"], "bootstrap": 50}))
    ctx = p.RunContext(spec=spec, run_id="r1", version="v1")
    ingested = p.ingest(ctx)
    prepared = p.prepare(ctx, ingested)
    hold = ctx.store.read_df(prepared["relational_holdout_uris"]["patient"])
    train = ctx.store.read_df(prepared["relational_uris"]["patient"])
    assert len(hold) == prepared["rows_holdout"] and not set(hold["patient_key"]) & set(train["patient_key"])
    sampled = p.sample(ctx, p.fit(ctx, prepared), prepared)
    quality_uri = ctx.uri("reports", "quality.json")
    ctx.store.write_json(quality_uri, {"dataset": "rel_record"})
    summary = p.privacy(ctx, prepared, sampled, ingested, {"report_uri": quality_uri})
    rec = summary["record"]
    assert rec["members"] == prepared["rows_train"] and rec["nonmembers"] == prepared["rows_holdout"]
    dist = rec["mia"]["partial_distance"]
    assert dist["status"] == "measured" and dist["auc_ci"][0] <= dist["auc"] <= dist["auc_ci"][1]
    assert dist["auc_reference"]["mean"] is not None and rec["exact_match_rate_reference"] is not None
    assert "partial_exact_match_rate" in rec
    names = {c.name for c in privacy_checks(summary, spec.thresholds("default")[1])}
    assert {"record.exact_match_rate", "record.dcr_share", "record.partial_exact_match_rate",
            "record.mia.partial_distance.auc.ci_low"} <= names
    report = ctx.store.read_json(summary["report_uri"])
    assert report["record"]["mia"]["attacks"]["partial_distance"]["auc"] == dist["auc"]
    json.dumps(summary)
