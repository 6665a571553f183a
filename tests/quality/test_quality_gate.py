"""The quality stage and the gate end to end on staging files: a good synthesizer passes and is released with
its data card; one that breaks a clinical relationship (HbA1c shuffled across patients) or a distribution
(systolic BP shifted) is refused with the failed check and its figure, and quarantined with its card."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory import pipeline
from synthfactory.testing.cohorts import RELATIONSHIPS, UTILITY, cohort_table, shift_column, shuffle_column
from synthfactory.release.gate import GateRefused
from synthfactory.spec import parse_spec
from synthfactory.synthesize.engine import SYNTHETIC_ID, metadata_dict
from synthfactory.synthesize.modelling import KEY

N_REAL, N_HOLDOUT = 1000, 350
SECRET_NAME = "Zebulon Quixotewright"  # a "real" identifier for the leak scan


def spec_for(root: Path, description: str = "Quality gate test cohort"):
    return parse_spec({
        "name": "qgate", "description": description,
        "source": {"uri": str(root / "extract")},
        "quality": {"relationships": RELATIONSHIPS, "utility": UTILITY},
        "release": {"bucket": "sandbox-bucket"},
        "staging": {"uri": str(root / "staging")},
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real train/holdout/metadata in staging, the ingest summary (identifiers) and a privacy summary."""
    root = tmp_path_factory.mktemp("qgate")
    ctx = pipeline.RunContext(spec=spec_for(root), run_id="setup", version="v0", base_dir=str(root))
    train = cohort_table(N_REAL, seed=21, key=KEY)
    holdout = cohort_table(N_HOLDOUT, seed=22, key=KEY)
    prepared = {"train_uri": ctx.uri("model", "train.parquet"), "holdout_uri": ctx.uri("model", "holdout.parquet"),
                "metadata_uri": ctx.uri("model", "metadata.json"), "rows_train": N_REAL}
    ctx.store.write_df(prepared["train_uri"], train)
    ctx.store.write_df(prepared["holdout_uri"], holdout)
    ctx.store.write_json(prepared["metadata_uri"], metadata_dict(train, exclude=(KEY,)))
    ids_uri = ctx.uri("ingest", "identifiers.parquet")
    Path(ids_uri).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"value": [SECRET_NAME, "555-867-5309", "MRN-0042-7781"],
                             "kind": ["name", "phone", "mrn"]}), ids_uri)
    ingested = {"identifiers_uri": ids_uri, "extract_sha256": "ab" * 32}
    privacy_uri = ctx.uri("reports", "privacy.json")
    ctx.store.write_json(privacy_uri, {"dataset": "qgate", "note": "stand-in privacy report"})
    privacy_summary = {"report_uri": privacy_uri, "exact_match_rate": 0.0, "dcr_share": 0.5, "dcr_ratio": 1.0,
                       "leak_clean": True, "leak_hits": 0, "mia_auc": 0.5,
                       "mia_battery": {"attacks": {a: {"status": "skipped", "reason": "stand-in"}
                                                   for a in ("distance", "domias", "shadow")}}}
    # stand-in figures for whatever other privacy checks the spec's defaults hold: exactly at their threshold
    from synthfactory.release.gate import privacy_checks

    for check in privacy_checks(privacy_summary, ctx.spec.thresholds()[1]):
        if check.value is None and "." not in check.name:
            privacy_summary[check.name] = check.threshold
    return {"root": root, "prepared": prepared, "ingested": ingested, "privacy": privacy_summary}


def stage_splits(world, ctx) -> None:
    """The real splits where prepare writes them for this run (the gate reads them from the run's layout)."""
    ctx.store.write_bytes(ctx.train_uri, ctx.store.read_bytes(world["prepared"]["train_uri"]))
    ctx.store.write_bytes(ctx.holdout_uri, ctx.store.read_bytes(world["prepared"]["holdout_uri"]))


def run_quality_and_gate(world, run_id: str, synthetic: pd.DataFrame, base_dir: Path | None = None,
                         description: str = "Quality gate test cohort"):
    ctx = pipeline.RunContext(spec=spec_for(world["root"], description), run_id=run_id, version="v1",
                              base_dir=str(base_dir or world["root"]))
    stage_splits(world, ctx)
    sampled = {"synthetic_uri": ctx.uri("synthetic", "patients.parquet"), "rows": len(synthetic)}
    ctx.store.write_df(sampled["synthetic_uri"], synthetic)
    q = pipeline.quality(ctx, world["prepared"], sampled)
    try:
        g = pipeline.gate(ctx, sampled, q, world["privacy"], world["ingested"])
        return ctx, sampled, q, g, None
    except GateRefused as err:
        return ctx, sampled, q, None, err


def synthetic(seed: int) -> pd.DataFrame:
    return cohort_table(N_REAL, seed=seed, key=SYNTHETIC_ID)


@pytest.fixture(scope="module")
def good_run(world):
    return run_quality_and_gate(world, "good", synthetic(23))


def test_good_synthesizer_passes_every_check_and_releases_its_card(world, good_run, tmp_path):
    ctx, sampled, q, g, refused = good_run
    assert refused is None, refused and refused.decision["message"]
    # the quality summary (XCom) carries every gate figure, URIs and no data
    assert q["expectation_success_ratio"] >= 0.9 and q["quality_score"] >= 0.75
    assert q["min_column_score"] >= 0.6 and q["column_pair_trends"] >= 0.6
    assert set(q["relationships"]) == {r["name"] for r in RELATIONSHIPS}
    assert all(r["status"] == "passed" for r in q["relationships"].values())
    assert q["utility_status"] == "measured" and q["utility_ratio"] >= 0.8 and q["utility_metric"] == "roc_auc"
    assert q["suite_source"] == "derived" and q["rows_holdout"] == N_HOLDOUT
    assert q["data_docs_uri"].endswith("reports/data_docs/index.html") and Path(q["data_docs_uri"]).is_file()
    json.dumps(q, allow_nan=False)

    decision = json.loads(Path(g["decision_uri"]).read_text())
    names = {c["name"] for c in decision["checks"]}
    assert {"min_column_score", "column_pair_trends", "relationship.hba1c_by_diabetes",
            "relationship.hypertension_by_age_band", "relationship.egfr_by_sex", "utility_ratio.cond_e11_9",
            "datacard_leak_scan_clean"} <= names
    card = Path(g["datacard_uri"])
    assert g["datacard_uri"] == ctx.uri("reports", "datacard.html") and card.is_file()
    html = card.read_text()
    assert "APPROVED for release" in html and "hba1c_by_diabetes" in html
    import hashlib

    assert decision["audited_files"][pipeline.RELEASE_DATACARD] == hashlib.sha256(card.read_bytes()).hexdigest()

    from synthfactory.release.publish import LocalWriter

    out = pipeline.release(ctx, g, sampled, q, world["privacy"], world["ingested"], LocalWriter(tmp_path / "sandbox"))
    released = {p.relative_to(tmp_path / "sandbox").as_posix() for p in (tmp_path / "sandbox").rglob("*") if p.is_file()}
    prefix = pipeline.release_key_prefix(ctx)
    assert f"{prefix}/{pipeline.RELEASE_DATACARD}" in released
    assert (tmp_path / "sandbox" / prefix / pipeline.RELEASE_DATACARD).read_bytes() == card.read_bytes()
    manifest = json.loads((tmp_path / "sandbox" / prefix / "manifest.json").read_text())
    assert pipeline.RELEASE_DATACARD in {f["path"] for f in manifest["files"]}
    assert out["version"] == "v1"


def test_shuffled_hba1c_breaks_the_relationship_and_is_refused(world):
    ctx, _, q, g, refused = run_quality_and_gate(world, "shuffled", shuffle_column(synthetic(23), "hba1c", seed=5))
    assert g is None and refused is not None
    assert q["relationships"]["hba1c_by_diabetes"]["status"] == "failed"
    figure = q["relationships"]["hba1c_by_diabetes"]["max_excess"]
    assert figure > 1.0
    msg = refused.decision["message"]
    assert f"quality gate failed: relationship.hba1c_by_diabetes {figure:.4g} > max 0.4" in msg
    # the marginal distribution is untouched: the shape checks alone would have let it through
    failed = {c["name"] for c in refused.decision["checks"] if not c["passed"]}
    assert "min_column_score" not in failed and "quality_score" not in failed
    quarantined = Path(ctx.quarantine_uri)
    card = (quarantined / pipeline.RELEASE_DATACARD).read_text()
    assert "REFUSED" in card and "relationship.hba1c_by_diabetes" in card
    assert json.loads((quarantined / "reasons.json").read_text())["approved"] is False


def test_shifted_distribution_is_refused_using_a_frozen_suite(world, good_run, tmp_path):
    from synthfactory.cli import main as cli

    good_ctx = good_run[0]
    project = tmp_path / "project"
    spec_path = tmp_path / "qgate.yaml"
    spec_path.write_text("name: qgate\nsource: {uri: x}\nrelease: {bucket: sandbox-bucket}\n")
    dest = project / "include" / "expectations" / "qgate.json"
    assert cli(["freeze-suite", str(spec_path), "--run-dir", good_ctx.run_uri, "--out", str(dest)]) == 0
    frozen = json.loads(dest.read_text())
    assert frozen["name"] == "qgate_frozen" and "id" not in frozen
    assert cli(["freeze-suite", str(spec_path), "--run-dir", good_ctx.run_uri, "--out", str(dest)]) == 2  # no --force

    ctx, _, q, g, refused = run_quality_and_gate(world, "shifted", shift_column(synthetic(24), "systolic_bp", 30),
                                                 base_dir=project)
    assert q["suite_source"] == "frozen:include/expectations/qgate.json"
    assert refused is not None and q["worst_column"] == "systolic_bp"
    msg = refused.decision["message"]
    # judged at the reference's row count against what real held-out rows score, which the message names
    assert f"quality gate failed: min_column_score {q['matched']['min_column_score']:.4g} < min " in msg
    assert "real data itself: " in msg
    assert (Path(ctx.quarantine_uri) / pipeline.RELEASE_DATACARD).is_file()


def test_a_card_that_leaks_an_identifier_is_refused(world, good_run):
    _, sampled, q, _, _ = good_run
    ctx = pipeline.RunContext(spec=spec_for(world["root"], f"Cohort curated by {SECRET_NAME}"), run_id="leaky",
                              version="v1", base_dir=str(world["root"]))
    stage_splits(world, ctx)
    with pytest.raises(GateRefused) as err:
        pipeline.gate(ctx, sampled, q, world["privacy"], world["ingested"])
    decision = err.value.decision
    assert decision["failed"] == ["privacy gate failed: datacard_leak_scan_clean is False (required True)"]
    assert decision["datacard_leak_scan"]["clean"] is False
    assert SECRET_NAME not in json.dumps(decision)  # the record names kinds and counts, never the value
    assert (Path(ctx.quarantine_uri) / pipeline.RELEASE_DATACARD).is_file()
