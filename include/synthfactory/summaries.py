"""The declared shape of each stage's summary: what one stage hands the next through XCom (or the CLI).

Summaries are plain JSON-able dicts (XCom serialises them), so these are ``TypedDict``s: they document and
type-check the keys without changing what travels. They carry URIs under the run's staging folder, counts
and figures: never rows, never identifiers. Keys a stage adds only in some modes are optional
(``total=False``).
"""

from __future__ import annotations

from typing import Any, TypedDict


class _Timed(TypedDict, total=False):
    seconds: float                      # the stage's wall time (added by pipeline._stage)


class IngestSummary(_Timed, total=False):
    tables: dict[str, str]              # table name -> Parquet URI
    rows: dict[str, int]
    quarantined_total: int
    quarantine_uri: str
    identifiers_uri: str                # real identifiers, for the leak scan (PHI side)
    extract_sha256: str
    report_uri: str
    reused_from_run: str                # when operations.reuse_ingest found the same extract ingested


class PrepareSummary(_Timed, total=False):
    train_uri: str
    holdout_uri: str
    metadata_uri: str
    reference_uri: str                  # the real-data reference (quality/reference.py)
    reference_quality_score: float | None
    features_uri: str
    rows_train: int
    rows_holdout: int
    columns: list[str]
    reference_date: str
    condition_flags: list[str]
    concepts: Any
    labs: list[str]
    relational_uris: dict[str, str]     # synthesizer.mode: relational
    relational_holdout_uris: dict[str, str]  # the held-out patients' tables (record-level privacy)


class FitSummary(_Timed, total=False):
    model_uri: str
    synthesizer: str
    mode: str
    fit_seconds: float
    model_bytes: int
    device: str
    epochs: int
    training: dict[str, Any]
    transforms: str
    transformed_columns: dict[str, list[str]]
    dp: dict[str, Any]


class SampleSummary(_Timed, total=False):
    synthetic_uri: str                  # the patient-level table
    rows: int
    synthesis_report_uri: str
    tables: dict[str, str]              # relational mode: synthetic/<table>.parquet
    fhir: dict[str, str]
    fixes: dict[str, int]
    conditional: dict[str, Any]


class QualitySummary(_Timed, total=False):
    report_uri: str
    suite_uri: str
    suite_source: str
    data_docs_uri: str | None
    rows_real: int
    rows_holdout: int
    rows_synthetic: int
    quality_score: float
    expectation_success_ratio: float
    expectations_failed: int
    column_shapes: float | None
    column_pair_trends: float | None
    min_column_score: float | None
    worst_column: str | None
    relationships: dict[str, dict[str, Any]]
    reference: dict[str, Any]           # real held-out vs train: mean/sd per gated figure
    matched: dict[str, float | None]    # the synthetic figures at the reference's row count (gated)
    matched_rows: int
    utility_status: str | None
    utility_metric: str | None
    utility_tstr: float | None
    utility_trtr: float | None
    utility_ratio: float | None


class PrivacySummary(_Timed, total=False):
    report_uri: str
    exact_match_rate: float
    dcr_share: float
    dcr_share_subsample: float
    dcr_ratio: float
    leak_clean: bool
    leak_hits: int
    mia_auc: float | None
    anonymeter_risks: dict[str, dict[str, Any]]
    anonymeter_certified: bool
    # the membership-inference battery (privacy/mia.py): per attack (distance, domias, shadow) its status,
    # auc / tpr_at_fpr_01 / tpr_at_fpr_10 with *_ci [low, high] and *_reference {mean, sd}; and the maximum
    # over attacks: max_<figure>, max_<figure>_ci, max_<figure>_attack, max_<figure>_ci_low (gated),
    # max_<figure>_ci_high
    mia_battery: dict[str, Any]
    mia_max_auc: float | None           # largest AUC over the attacks (0.5 = chance)
    mia_max_tpr_at_fpr_01: float | None  # largest true-positive rate at 1 % false positives (0.01 = chance)
    mia_max_tpr_at_fpr_10: float | None  # largest true-positive rate at 10 % false positives (0.10 = chance)
    mia_certified: bool                 # every attack's upper 95 % bound within the thresholds
    # relational mode: a patient's whole record as the unit (privacy/records.py summarise_record_audit): exact
    # match, DCR share, partial-knowledge exact match, and per record-level attack (partial_distance,
    # partial_domias) auc / tpr_at_fpr_* with *_ci and *_reference; gated as record.* (release/gate.py)
    record: dict[str, Any]
    extra_checks: list[dict[str, Any]]


class GateSummary(_Timed, total=False):
    approved: bool
    decision_uri: str
    message: str
    datacard_uri: str
    quarantine_datacard_uri: str


class ReviewSummary(_Timed, total=False):
    approved: bool
    approval_uri: str
    timed_out: bool
    quarantine_uri: str
    message: str


class ReleaseSummary(_Timed, total=False):
    uri: str
    version: str
    manifest_key: str
    files: list[dict[str, Any]]


class RunSummary(TypedDict):
    ingest: IngestSummary
    prepare: PrepareSummary
    fit: FitSummary
    sample: SampleSummary
    quality: QualitySummary
    privacy: PrivacySummary
    gate: GateSummary
    release: ReleaseSummary
