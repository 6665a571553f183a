"""Dataset spec: the declarative description of one synthetic dataset.

A spec lives in ``include/datasets/<name>.yaml``. :func:`load_spec` validates it with the typed
model below and raises :class:`SpecError` whose message names every bad field and its problem, e.g.
``privacy.max_dcr_share: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthfactory import kinds
from synthfactory.source_specs import BUILTIN_RESOURCES, BulkSpec, ColumnType, EhrSpec, SearchSpec, TableRule
from synthfactory.errors import ConfigError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")


def condition_column(code: str) -> str:
    """The modelling table's flag column of a condition code: ``cond_<code>`` in lower snake case."""
    return "cond_" + re.sub(r"[^a-z0-9]+", "_", code.lower()).strip("_")
NEURAL_KINDS = kinds.NEURAL
STAGE_NAMES = ("ingest", "prepare", "fit", "sample", "quality", "privacy", "gate", "release")
LOINC_RE = re.compile(r"^\d{1,7}-\d$")


class SpecError(ConfigError, ValueError):
    """A dataset spec is missing, unreadable or invalid. The message names the field(s)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Model):
    """Where the extract comes from (the secure, PHI side), and how it is flattened.

    ``kind``: ``fhir_ndjson`` (folder/s3 of <Type>.ndjson[.gz], the default), ``fhir_bundle`` (Bundle JSON
    files), ``fhir_bulk`` (a Bulk Data $export), ``fhir_search`` (REST search), ``ehr_csv``/``ehr_parquet``
    (flat EHR tables with a column mapping), ``table`` (one flat clinical table, one row per patient: a CSV or
    Parquet file, or a SQL query). See :mod:`synthfactory.ingest.sources`."""

    kind: Literal["fhir_ndjson", "fhir_bundle", "fhir_bulk", "fhir_search", "ehr_csv", "ehr_parquet",
                  "table"] = "fhir_ndjson"
    uri: str | None = Field(
        default=None, description="Local folder or s3://bucket/prefix of the extract files (file kinds); for "
                                  "fhir_bulk/fhir_search it defaults to base_url")
    connection_id: str | None = Field(
        default=None, description="Airflow AWS connection for an s3:// extract (staging side, never the sandbox)"
    )
    salt_connection_id: str | None = Field(
        default=None,
        description="Airflow connection whose password is the HMAC salt for keys; unset = a salt file kept in staging",
    )
    resources: list[str] = Field(
        default_factory=lambda: ["Patient", "Encounter", "Condition", "Observation"],
        description="FHIR resource types to ingest; built-in tables exist for Patient, Encounter, Condition, "
                    "Observation, MedicationRequest and Procedure, others need a view")
    base_url: str | None = Field(default=None, description="FHIR server base URL (fhir_bulk, fhir_search); "
                                                           "default: the fhir connection's host")
    fhir_connection_id: str | None = Field(
        default=None, description="Airflow connection (type fhir) with the server's credentials: SMART backend "
                                  "services key (PEM/JWKS), bearer token or basic auth")
    bulk: BulkSpec = Field(default_factory=BulkSpec, description="Bulk Data $export options (fhir_bulk)")
    search: SearchSpec = Field(default_factory=SearchSpec, description="REST search options (fhir_search)")
    ehr: EhrSpec | None = Field(default=None, description="Column mapping of a flat EHR extract (ehr_csv/ehr_parquet)")
    views: list[dict[str, Any] | str] = Field(
        default_factory=list, description="Extra SQL-on-FHIR ViewDefinitions (inline, or .json/.yaml paths), one "
                                          "table each; a view named like a built-in table replaces it")
    validate_sample_rate: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Share of resources validated with fhir.resources R4B (the "
                                                  "first 20 per file always; 1.0 = all)")
    validate_max_per_type: int = Field(
        default=1000, ge=0, description="The sampled validation stops after this many validated resources of a "
                                        "type (bounds its cost on large extracts; 0 = no cap, e.g. with rate 1.0)")
    engine: Literal["fast", "views"] = Field(
        default="fast", description="fast: hand-written flatteners for the four built-in tables; views: every "
                                    "table through its ViewDefinition (same rows, slower)")
    on_dangling: Literal["quarantine", "keep"] = Field(
        default="quarantine", description="A resource whose patient is not in the extract: quarantine it, or keep "
                                          "it (counted either way)")
    max_line_bytes: int = Field(default=16 << 20, ge=1024, description="Longer NDJSON lines are quarantined unread")
    text_codes: list[str] = Field(
        default_factory=list, description="Codes (code.coding.code) whose strings are coded values: an Observation's "
                                          "valueString (or text-only valueCodeableConcept) is kept in "
                                          "observation.value_code, a CodeableConcept's text stands in for its missing "
                                          "display; every other valueString and .text is free text and never "
                                          "reaches a table (fast engine)")
    text_columns: list[str] = Field(
        default_factory=list, description="Columns of source.views ('view.column') allowed to select free text or "
                                          "direct identifiers (note, narrative text, valueString, name, address...); "
                                          "a view with any other such column is refused")
    value_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Plausible [low, high] of an Observation value by UCUM unit, over the "
                                          "defaults (synthfactory.ingest.flatteners.DEFAULT_VALUE_RANGES); a value "
                                          "outside is quarantined with the reason")
    value_range_default: tuple[float, float] = Field(
        default=(-1e12, 1e12), description="Plausible [low, high] of a value in any other unit or without one")
    # -- kind: table (one flat clinical table) -----------------------------------------------------
    query: str | None = Field(
        default=None, description="table: a SQL query giving one row per patient, run on sql_connection_id (an "
                                  "Airflow SQL connection) or, in the CLI, on the SQLAlchemy URL in uri/--extract")
    sql_connection_id: str | None = Field(
        default=None, description="table: Airflow SQL connection (any DbApiHook) the query runs on")
    id_column: str | None = Field(
        default=None, description="table: the column that identifies a patient (replaced by a fresh synthetic id "
                                  "in the output; its values are leak-scanned); unset = row numbers")
    format: Literal["auto", "csv", "parquet"] = Field(
        default="auto", description="table: file format; auto = from the file name (.csv[.gz], .tsv, .parquet)")
    delimiter: str | None = Field(default=None, min_length=1, max_length=1,
                                  description="table: CSV delimiter; default ',' (tab for .tsv)")
    columns: dict[str, ColumnType] = Field(
        default_factory=dict, description="table: column type overrides (numeric, integer, ordinal, categorical, "
                                          "boolean, date, age, sex, identifier, exclude); others are detected")
    rules: list[TableRule] = Field(
        default_factory=list, description="table: logic rules kept at sampling (only_when, required_when, "
                                          "exclusive), on top of the ones detected from the data")
    detect_rules: bool = Field(default=True, description="table: detect conditional columns and mutually "
                                                         "exclusive flags from the data")

    @field_validator("value_ranges")
    @classmethod
    def _value_ranges(cls, v: dict) -> dict:
        for unit, (lo, hi) in v.items():
            if not (lo <= hi) or len(unit.encode()) > 64:
                raise ValueError(f"value_ranges[{unit!r}]: needs low <= high and a unit of at most 64 bytes")
        if len(v) > 64:
            raise ValueError("value_ranges: at most 64 units")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_uri(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in ("fhir_bulk", "fhir_search") and not data.get("uri"):
            data = dict(data)
            data["uri"] = data.get("base_url") or (
                f"fhir-connection://{data['fhir_connection_id']}" if data.get("fhir_connection_id") else None)
        if isinstance(data, dict) and data.get("kind") == "table" and data.get("sql_connection_id") \
                and not data.get("uri"):
            data = {**data, "uri": f"sql-connection://{data['sql_connection_id']}"}
        return data

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3 URI needs a bucket")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if not re.match(r"^[A-Z][A-Za-z]{1,63}$", r)]
        if bad:
            raise ValueError(f"{bad} are not FHIR resource type names")
        if not v:
            raise ValueError("needs at least one resource type")
        return list(dict.fromkeys(v))

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/") if v else v

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[Any]) -> list[Any]:
        from synthfactory.fhir.views import ViewError, compile_view

        names: list[str] = []
        for i, view in enumerate(v):
            if isinstance(view, str):
                if not view.endswith((".json", ".yaml", ".yml")):
                    raise ValueError(f"[{i}]: {view!r} is not a .json/.yaml ViewDefinition file")
                continue
            try:
                names.append(compile_view(view).name)
            except ViewError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate view name(s) {dupes}")
        return v

    @model_validator(mode="after")
    def _free_text(self) -> "SourceSpec":
        from synthfactory.fhir.views import ViewError, check_free_text

        for i, view in enumerate(self.views):
            if isinstance(view, dict):
                try:
                    check_free_text(view, self.text_columns, where=f"views[{i}]")
                except ViewError as exc:
                    raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _needs(self) -> "SourceSpec":
        table_only = [f for f in ("query", "sql_connection_id", "id_column", "delimiter")
                      if getattr(self, f) is not None] + [f for f in ("columns", "rules") if getattr(self, f)]
        if self.kind != "table" and table_only:
            raise ValueError(f"{table_only[0]}: only used with kind: table")
        if self.kind == "table":
            if self.query and self.uri and not re.match(r"^[a-z][a-z0-9+.-]*://", self.uri):
                raise ValueError("uri: with a query, uri is a SQLAlchemy URL (e.g. postgresql://host/db, "
                                 "sqlite:///file.db); or leave it out and set sql_connection_id")
            if not self.query and not self.uri:
                raise ValueError("uri: kind table needs uri (a CSV/Parquet file) or query (SQL)")
            if self.sql_connection_id and not self.query:
                raise ValueError("query: sql_connection_id needs a query")
            if self.id_column and self.columns.get(self.id_column, "identifier") != "identifier":
                raise ValueError(f"columns.{self.id_column}: the id_column is an identifier")
            return self
        if self.kind in ("fhir_bulk", "fhir_search"):
            if not (self.base_url or self.fhir_connection_id):
                raise ValueError(f"base_url: {self.kind} needs base_url or fhir_connection_id")
        elif not self.uri:
            raise ValueError(f"uri: {self.kind} needs the extract's folder or s3:// URI")
        if self.kind in ("ehr_csv", "ehr_parquet") and self.ehr is None:
            raise ValueError(f"ehr: {self.kind} needs a column mapping (e.g. ehr: {{preset: clinosim}})")
        covered = set(BUILTIN_RESOURCES) | {v.get("resource") for v in self.views if isinstance(v, dict)}
        has_files = any(isinstance(v, str) for v in self.views)
        missing = [r for r in self.resources if r not in covered]
        if missing and not has_files and self.kind not in ("ehr_csv", "ehr_parquet"):
            raise ValueError(f"resources: no table for {missing}: add a view with that resource to source.views")
        return self


#: columns every modelling table may have besides labs and condition flags (see synthesize/modelling.py)
BASE_FEATURE_COLUMNS = ("gender", "age", "race", "ethnicity", "deceased", "n_encounters", "n_enc_ambulatory",
                        "n_enc_inpatient", "n_enc_emergency", "days_observed", "n_conditions")
#: short names of code systems as the flattened tables hold them (``code_system``), and their URIs
CODE_SYSTEM_URIS = {
    "icd10cm": ("http://hl7.org/fhir/sid/icd-10-cm", "urn:oid:2.16.840.1.113883.6.90"),
    "snomed": ("http://snomed.info/sct", "urn:oid:2.16.840.1.113883.6.96"),
    "loinc": ("http://loinc.org", "urn:oid:2.16.840.1.113883.6.1"),
    "rxnorm": ("http://www.nlm.nih.gov/research/umls/rxnorm", "urn:oid:2.16.840.1.113883.6.88"),
}
_SYSTEM_ALIASES = {uri: short for short, uris in CODE_SYSTEM_URIS.items() for uri in uris} | {
    "icd10": "icd10cm", "icd-10-cm": "icd10cm", "sct": "snomed", "snomedct": "snomed", "snomed-ct": "snomed"}
CONCEPT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,57}$")


def code_system_key(system: str) -> str:
    """The short name of a code system (``icd10cm``, ``snomed``, ``loinc``, ``rxnorm``) or the URI as given."""
    s = str(system).strip()
    return _SYSTEM_ALIASES.get(s, _SYSTEM_ALIASES.get(s.lower(), s.lower() if s.lower() in CODE_SYSTEM_URIS else s))


class LabFeature(_Model):
    """A lab (or vital sign) by concept: the numeric values of any of its LOINC codes, aggregated per patient.

    Synonyms are pooled as they are, without unit conversion: list only codes reported in the same unit
    (e.g. eGFR 98979-8 CKD-EPI 2021 and 48642-3 MDRD, both mL/min/{1.73_m2}; not HbA1c 59261-8, which is
    mmol/mol where 4548-4 is %). The units seen are recorded per lab, and more than one is logged."""

    name: str = Field(description="Column name in the modelling table, e.g. hba1c")
    loinc: list[str] = Field(description="LOINC code(s) of the lab: one code (4548-4) or synonyms "
                                         "([98979-8, 48642-3]); values of any of them count")
    agg: Literal["last", "mean", "max", "min"] = "last"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, _), 2-63 chars")
        if v in BASE_FEATURE_COLUMNS or v.startswith("cond_") or v == "patient_key":
            raise ValueError(f"{v!r} is a name the modelling table uses for another column")
        return v

    @field_validator("loinc", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("loinc")
    @classmethod
    def _loinc(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one LOINC code")
        for code in v:
            if not LOINC_RE.match(code):
                raise ValueError(f"{code!r} is not a LOINC code (digits-checkdigit, e.g. 4548-4)")
        return list(dict.fromkeys(v))


class ConditionConcept(_Model):
    """A condition by concept: a boolean column ``cond_<name>``, true for a patient with a Condition coded with
    any of ``codes`` (code system -> codes). A code ending in ``*`` is a prefix (``E11*``: every ICD-10-CM
    code under E11); ICD-10-CM codes match with or without the dot (E11.9 = E119). SNOMED CT codes match
    exactly: no hierarchy is available offline, so list the descendants you mean (e.g. 44054006 and
    313436004 for type 2 diabetes)."""

    name: str = Field(description="Concept name; the column is cond_<name>, e.g. t2_diabetes -> cond_t2_diabetes")
    codes: dict[str, list[str]] = Field(
        description="Code system (icd10cm, snomed, or a system URI) -> codes, e.g. {icd10cm: [E11*], snomed: "
                    "[44054006]}")
    description: str = ""

    @property
    def column(self) -> str:
        return "cond_" + self.name

    @field_validator("name")
    @classmethod
    def _concept_name(cls, v: str) -> str:
        if not CONCEPT_NAME_RE.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, _), starting with a letter, at most 58 chars")
        return v

    @field_validator("codes", mode="before")
    @classmethod
    def _codes_lists(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: [c] if isinstance(c, str) else c for k, c in v.items()}
        return v

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError("needs at least one code system with codes, e.g. {icd10cm: [E11*]}")
        out: dict[str, list[str]] = {}
        for system, codes in v.items():
            key = code_system_key(system)
            if not key or not codes:
                raise ValueError(f"{system!r}: needs at least one code")
            for code in codes:
                c = str(code).strip()
                if not c or c == "*" or "*" in c[:-1] or any(ch.isspace() for ch in c):
                    raise ValueError(f"{system}: {code!r} is not a code or a prefix pattern like E11*")
            out[key] = list(dict.fromkeys([*out.get(key, []), *(str(c).strip() for c in codes)]))
        return out


class FeatureSpec(_Model):
    """How the patient-level modelling table is derived from the flattened tables."""

    top_conditions: int = Field(
        default=8, ge=0, le=50, description="Flags cond_<code> for the N most prevalent condition codes (codes "
                                            "that a concept in 'conditions' covers are not counted)")
    condition_codes: list[str] = Field(default_factory=list, description="Extra condition codes to flag")
    conditions: list[ConditionConcept] = Field(
        default_factory=list, description="Conditions by concept, codes in one or more systems -> cond_<name>")
    labs: list[LabFeature] = Field(default_factory=list)
    auto: bool = Field(
        default=False, description="Also discover features: the top_conditions most prevalent condition codes get "
                                   "readable names (cond_<display>), and every numeric LOINC lab measured in at "
                                   "least auto_min_share of the patients becomes a column (known synonyms pooled, "
                                   "e.g. egfr)")
    auto_min_share: float = Field(default=0.2, gt=0.0, le=1.0,
                                  description="auto: a lab must be measured in at least this share of patients")
    auto_max_labs: int = Field(default=20, ge=0, le=200, description="auto: at most this many discovered labs")
    reference_date: str | None = Field(
        default=None, description="ISO date ages are computed at; default: latest date in the extract"
    )
    min_patients: int = Field(default=20, ge=2, description="Refuse to model fewer real patients than this")

    @model_validator(mode="after")
    def _unique_names(self) -> "FeatureSpec":
        names = [lab.name for lab in self.labs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"labs: duplicate name(s) {dupes}")
        concepts = [c.name for c in self.conditions]
        dupes = sorted({n for n in concepts if concepts.count(n) > 1})
        if dupes:
            raise ValueError(f"conditions: duplicate name(s) {dupes}")
        return self

    def columns(self) -> set[str]:
        """Columns these features name explicitly (labs, concept flags, cond_<code> of condition_codes)."""
        return ({lab.name for lab in self.labs} | {c.column for c in self.conditions}
                | {condition_column(code) for code in self.condition_codes})


# the synthesizer kinds, from the one registry (synthfactory.kinds)
SYNTHESIZER_KINDS = kinds.SINGLE_TABLE
DP_KINDS = kinds.DP
RELATIONAL_CHILD_KINDS = kinds.RELATIONAL_CHILD_KINDS


class ConstraintSpec(_Model):
    """A constraint on synthetic rows. ``inequality`` (low <= high), ``range`` (low <= middle <= high) and
    ``fixed_combinations`` (only combinations seen in the real data) are SDV 2.0 constraints built into the
    model; ``bounds`` (min <= column <= max) is enforced on each sampled batch: ``reject`` redraws the rows,
    ``clip`` moves values to the bound; either way the count lands in the synthesis report."""

    type: Literal["inequality", "range", "fixed_combinations", "bounds"]
    table: str = Field(default="patients", description="patients (the patient table), or a flattened table name "
                                                       "in relational mode (patient, encounter, observation, ...)")
    low: str | None = None
    middle: str | None = None
    high: str | None = None
    strict: bool = False
    columns: list[str] = Field(default_factory=list, description="fixed_combinations: the columns")
    column: str | None = Field(default=None, description="bounds: the column")
    min: float | None = None
    max: float | None = None
    action: Literal["reject", "clip"] = "reject"

    @model_validator(mode="after")
    def _needs(self) -> "ConstraintSpec":
        need = {"inequality": ("low", "high"), "range": ("low", "middle", "high"), "bounds": ("column",)}
        missing = [f for f in need.get(self.type, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.type} needs {', '.join(missing)}")
        if self.type == "fixed_combinations" and len(self.columns) < 2:
            raise ValueError("fixed_combinations needs at least two columns")
        if self.type == "bounds" and self.min is None and self.max is None:
            raise ValueError("bounds needs min and/or max")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError("max: must be >= min")
        return self


class RebalanceSpec(_Model):
    column: str = Field(description="Categorical or boolean column, e.g. gender")
    proportions: dict[str | bool | int, float] = Field(
        description="Target share of synthetic rows per value, e.g. {female: 0.5, male: 0.5} (normalised)")

    @field_validator("proportions")
    @classmethod
    def _props(cls, v: dict) -> dict:
        if not v or any(p < 0 for p in v.values()) or sum(v.values()) <= 0:
            raise ValueError("needs at least one value with a share > 0, and no negative shares")
        return v


class OversampleSpec(_Model):
    column: str = Field(description="Categorical or boolean column, e.g. cond_e11_9")
    value: str | bool | int = Field(description="The rare value, e.g. true")
    factor: float = Field(gt=0, le=1000, description="Its share of synthetic rows = real share x factor (max 1)")


class DPSpec(_Model):
    """Differential privacy of dp_mst / dp_aim (smartnoise-synth). Recorded in reports/synthesis.json."""

    epsilon: float = Field(default=3.0, gt=0, le=100, description="Total privacy budget")
    delta: float | None = Field(default=None, gt=0, lt=1, description="null = 1/(n*sqrt(n)) for n training rows")
    preprocessor_epsilon: float | None = Field(
        default=None, gt=0, description="Part of epsilon spent estimating bin bounds of numeric columns without "
                                        "public bounds (DP estimates, split evenly over them); null = 25% of epsilon")
    bins: int = Field(default=20, ge=2, le=1000, description="Equal-width bins of a measurement (integer columns: "
                      "one bin per value up to 2 x bins values, else geometric count bins 0, 1, 2, 3, 4, 6, 8, ...)")
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Public bounds per numeric column (spend no budget), e.g. hba1c: [3, 20]")
    estimate_bounds: bool = Field(
        default=True, description="Estimate the bounds of numeric columns without public bounds with DP "
                                  "(preprocessor_epsilon); false: validate refuses such columns, naming them")

    @model_validator(mode="after")
    def _bounds_order(self) -> "DPSpec":
        bad = sorted(c for c, (lo, hi) in self.bounds.items() if not lo < hi)
        if bad:
            raise ValueError(f"bounds: lower must be below upper for {bad}")
        if self.preprocessor_epsilon is not None and self.preprocessor_epsilon >= self.epsilon:
            raise ValueError("preprocessor_epsilon: must be below epsilon (it is a share of it)")
        return self


class RelationalSpec(_Model):
    """mode: relational. The whole patient record (patient + every flattened child table with a patient_key)."""

    engine: Literal["patient_centred", "hma", "par"] = Field(
        default="patient_centred",
        description="patient_centred: patient model with children counts + one context-conditioned model per "
                    "child table (no table limit); hma: SDV HMASynthesizer (<= 5 tables); par: PAR sequences "
                    "per child table")
    child_kind: Literal[RELATIONAL_CHILD_KINDS] = Field(
        default="cart", description="cart: sequential CART per child table, rows drawn given the patient's "
                                    "context (measured in bench/relational_bench.py); or an SDV kind")
    child_params: dict[str, Any] | None = Field(default=None, description="null = the kind's defaults "
                                                                          "(gaussian_copula: truncnorm)")
    tables: list[str] = Field(default_factory=list, description="Child tables to synthesize; empty = all")
    flags_top: int = Field(default=3, ge=0, le=20, description="Most frequent condition codes carried as patient "
                                                               "flags (condition rows honour them; context of "
                                                               "the other tables)")
    age_band_years: int = Field(default=20, ge=1, le=100, description="Age band width of the children's context")
    par_epochs: int = Field(default=64, ge=1, le=10_000)


class SynthesizerSpec(_Model):
    kind: Literal[SYNTHESIZER_KINDS] = Field(
        default="cart", description="cart (sequential CART synthesis, synthpop's method: the default, chosen by "
                                   "bench/cohorts_bench.py), SDV single-table synthesizers, smartnoise DP "
                                   "(dp_mst, dp_aim), or tabular_argn: MOSTLY AI's TabularARGN in its own "
                                   "interpreter (make argn-venv)")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the synthesizer")
    mode: Literal["patient_table", "relational"] = Field(
        default="patient_table", description="patient_table: one row per patient (default); relational: the "
                                             "patient record as several tables with keys (see relational)")
    relational: RelationalSpec = Field(default_factory=RelationalSpec)
    epochs: int | None = Field(default=None, ge=1, le=100_000, description="Neural kinds: training epochs "
                                                                          "(the epochs Param overrides)")
    batch_size: int | None = Field(default=None, ge=2, le=1_000_000,
                                   description="Neural kinds: training batch size (CTGAN: a multiple of pac=10)")
    time_budget_s: float | None = Field(default=None, gt=0, description="Neural kinds: stop training after this "
                                                                        "many seconds, keeping the model so far")
    checkpoint_every: int = Field(default=10, ge=0, le=100_000, description="Neural kinds: checkpoint to staging "
                                                                           "every N epochs (0 = never)")
    sample_batch_size: int = Field(default=100_000, ge=100, le=5_000_000,
                                   description="Rows (relational: patients / 5) per sampling batch")
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    rebalance: RebalanceSpec | None = None
    oversample: OversampleSpec | None = None
    dp: DPSpec = Field(default_factory=DPSpec)
    metadata: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-column SDV metadata overrides, e.g. {state: {sdtype: categorical}}, "
                                          "{phone: {sdtype: phone_number, pii: true}} (PII columns get fake values)")
    rows: int | None = Field(default=None, ge=1, le=10_000_000, description="Rows to sample; default = real rows")
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    seed: int = Field(default=42, description="Seeds the split, the transforms, the fit and every sampled draw: "
                                              "the same extract, spec and seed give the same release")
    transforms: Literal["auto", "ehr", "none"] = Field(
        default="auto", description="EHR-aware transforms between the patient table and the model (a lab's "
                                    "'measured' flag plus its observed values, zero-inflated counts, integer "
                                    "and range restore): auto = on, except for the DP kinds (their privacy "
                                    "accounting does not cover the transforms) and relational mode")
    queue: str | None = Field(
        default=None, description="Airflow queue of the fit and sample tasks; default: 'gpu' for neural kinds "
                                  "(ctgan, tvae, copulagan), else the CPU default queue")
    pool: str | None = Field(
        default=None, description="Airflow pool of the fit and sample tasks (slots = GPUs); default: 'gpu' for "
                                  "neural kinds, else default_pool")
    gpus: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu requested per GPU task (KubernetesExecutor)")

    def transforms_for(self, kind: str) -> str:
        """``ehr`` or ``none``: what :attr:`transforms` means for ``kind`` (the run may choose another kind)."""
        if self.transforms == "auto":
            return "none" if kind in DP_KINDS or self.mode == "relational" else "ehr"
        return self.transforms

    @property
    def neural(self) -> bool:
        """Neural training (GPU workers): a neural kind, or a relational model with PAR or neural child models."""
        if self.kind in NEURAL_KINDS:
            return True
        rel = self.relational
        return self.mode == "relational" and (rel.engine == "par" or rel.child_kind in NEURAL_KINDS)

    @model_validator(mode="before")
    @classmethod
    def _relational_default_kind(cls, data: Any) -> Any:
        """The default kind (cart) models one patient table: relational mode defaults to gaussian_copula."""
        if isinstance(data, dict) and data.get("mode") == "relational" and "kind" not in data:
            data = {**data, "kind": "gaussian_copula"}
        return data

    @model_validator(mode="after")
    def _synth_checks(self) -> "SynthesizerSpec":
        if self.rebalance and self.oversample:
            raise ValueError("rebalance: set either rebalance or oversample, not both")
        foreign = kinds.foreign_params(self.kind, self.params)
        if foreign:  # e.g. gaussian_copula's default_distribution left behind when the kind became dp_mst
            raise ValueError(f"params: {self.kind} does not take {', '.join(foreign)}; remove them or change kind")
        if self.kind in DP_KINDS and self.mode == "relational":
            raise ValueError("kind: dp_mst/dp_aim cover one table; use mode: patient_table for differential privacy")
        if self.kind in DP_KINDS and (self.constraints or self.metadata):
            raise ValueError("kind: dp_mst/dp_aim take no SDV constraints or metadata overrides")
        if self.kind in DP_KINDS and self.transforms == "ehr":
            raise ValueError("transforms: the EHR-aware transforms fill gaps from real rows outside the DP "
                             "accounting; use transforms: auto or none with dp_mst/dp_aim")
        if self.mode == "relational" and any(c.type == "bounds" for c in self.constraints):
            raise ValueError("constraints: bounds apply in mode: patient_table; in relational mode use inequality/"
                             "range/fixed_combinations on a table (per-code value ranges are kept automatically)")
        if self.kind == "tabular_argn":
            unsupported = [name for name, v in (("mode: relational", self.mode == "relational"),
                                                ("constraints", self.constraints), ("metadata", self.metadata),
                                                ("rebalance", self.rebalance), ("oversample", self.oversample)) if v]
            if unsupported:
                raise ValueError(f"kind: tabular_argn does not take {', '.join(unsupported)} here yet "
                                 "(it models one patient table; use an SDV kind for these)")
        if self.kind == "cart":
            unsupported = [name for name, v in (
                ("SDV constraints (inequality/range/fixed_combinations; bounds work)",
                 [c for c in self.constraints if c.type != "bounds"]),
                ("metadata overrides", self.metadata), ("transforms: none", self.transforms == "none")) if v]
            if unsupported:
                raise ValueError(f"kind: cart does not take {', '.join(unsupported)} (it models one patient table "
                                 "behind the EHR-aware transforms; use an SDV kind for these)")
        if self.kind == "ctgan" and self.batch_size and self.batch_size % 10:
            raise ValueError("batch_size: CTGAN needs a multiple of 10 (pac)")
        return self


class Relationship(_Model):
    """A clinical relationship the synthetic data must keep: a statistic of ``measure`` in each group of ``by``
    (e.g. mean HbA1c by diabetes status), compared real (train split) vs synthetic."""

    name: str = Field(description="Short lower_snake_case name, shown in the gate decision and the data card")
    measure: str = Field(description="Column whose statistic is compared, e.g. hba1c")
    by: str = Field(description="Grouping column, e.g. cond_e11_9, gender, age (numeric: give bins)")
    stat: Literal["mean", "median", "rate", "measured"] = Field(
        default="mean", description="mean/median of the measure, rate = share of rows where it is true/non-zero, "
                                    "or measured = share of rows where it has a value at all (HbA1c measured in "
                                    "diabetics: a mean among the measured cannot see a lab given to the wrong "
                                    "patients)")
    bins: list[float] | None = Field(
        default=None, description="Cut points for a numeric 'by' column, left-closed bands [a, b): "
                                  "e.g. [0, 55, 200] for age <55 / 55+")
    tolerance: float = Field(
        gt=0.0, description="Largest allowed |synthetic - real| of the statistic in any group beyond sampling "
                            "noise (noise_z standard errors of the difference), in the measure's units (rate: a "
                            "proportion, 0.1 = 10 points)")
    noise_z: float = Field(
        default=2.0, ge=0.0, le=5.0, description="Sampling-noise allowance in standard errors of the group "
                                                 "difference (0 = compare the raw difference with the tolerance)")
    min_group_rows: int = Field(
        default=20, ge=1, description="Groups with fewer real rows are not compared (and not reported: small cells)")
    min_effect_kept: float = Field(
        default=0.8, ge=0.0, description="When the real effect (difference between the highest and lowest real "
                                         "group) is significant, the synthetic/real effect ratio's interval must "
                                         "reach [min_effect_kept, max_effect_kept]")
    max_effect_kept: float = Field(default=1.25, gt=0.0, description="Upper end of the effect-kept band")

    @field_validator("name")
    @classmethod
    def _rel_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, _), 2-63 chars")
        return v

    @field_validator("bins")
    @classmethod
    def _bins(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 2 or any(b <= a for a, b in zip(v, v[1:]))):
            raise ValueError("needs at least two strictly increasing cut points")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "Relationship":
        if self.measure == self.by:
            raise ValueError("by: must differ from measure")
        return self


class UtilitySpec(_Model):
    """Machine-learning utility: train on synthetic, test on the real holdout (TSTR) vs train on real (TRTR)."""

    target: str = Field(description="Column to predict, e.g. cond_e11_9 (binary: AUC) or hba1c (numeric: R²)")
    features: list[str] = Field(default_factory=list, description="Predictor columns; empty = every other column")
    max_train_rows: int = Field(default=25_000, ge=100, description="Rows each model trains on at most (seeded "
                                                                    "subsample; keeps the stage fast)")
    min_class_rows: int = Field(
        default=10, ge=1, description="A binary target needs this many holdout rows of each class (numeric: 3x "
                                      "this many rows) to be scored; otherwise utility is reported as skipped")
    leak_auc: float = Field(
        default=0.98, ge=0.5, le=1.0, description="A feature that alone predicts a binary target with a real-data "
                                                  "ROC AUC at least this high is flagged as leaking the outcome")
    keep_leaking_features: bool | None = Field(
        default=None, description="Keep flagged outcome-leaking features in the utility models; default (null): "
                                  "left out for a flat table (source.kind: table), kept (and flagged) for the "
                                  "FHIR/EHR modelling table, whose benches are anchored with them")


class ReferenceSpec(_Model):
    """The real-data reference every quality figure is judged against (``quality.reference``).

    prepare scores real held-out rows against real train rows over ``resplits`` re-splits, as the synthetic
    table will be scored: that is what a perfect generator achieves, with its spread. A synthetic figure
    fails when it is below ``fraction`` x the reference mean by more than ``noise_z`` reference standard
    deviations."""

    resplits: int = Field(default=8, ge=2, le=200, description="Re-splits of the real table (cost: one SDMetrics "
                                                               "report each)")
    quality_fraction: float = Field(default=0.95, gt=0.0, le=1.5,
                                    description="quality score >= this share of the reference (minus noise)")
    pair_trends_fraction: float = Field(default=0.95, gt=0.0, le=1.5,
                                        description="Column Pair Trends >= this share of the reference")
    column_fraction: float = Field(default=0.9, gt=0.0, le=1.5,
                                   description="worst eligible column >= this share of the reference's worst")
    noise_z: float = Field(default=2.0, ge=0.0, le=5.0, description="Reference standard deviations of slack")
    min_values: int = Field(default=50, ge=1, description="The worst-column check covers only columns with at "
                                                          "least this many real (train) values")
    matched_repeats: int = Field(default=4, ge=1, le=100,
                                 description="Synthetic subsamples of the reference's row count the gated figures "
                                             "are averaged over (scores rise with the row count)")


class TrajectorySpec(_Model):
    """A lab over time in patients with vs without a condition (``quality.trajectory``, relational mode): the
    lab's median (or mean) value per period since the patient's first value of it, real vs synthetic, beside
    real held-out vs real train patients (synthfactory.quality.tables). Example: ``{lab: hba1c, loinc:
    [4548-4], group_by_condition: diabetes, condition_codes: {icd10cm: [E11*]}}``."""

    lab: str = Field(description="The lab's name, e.g. hba1c: a features.labs name (its LOINC codes), or any "
                                 "name with loinc")
    loinc: list[str] = Field(default_factory=list, description="LOINC code(s) of the lab; empty = those of the "
                                                                "features.labs entry named lab")
    group_by_condition: str = Field(description="The condition splitting the patients: a features.conditions "
                                                "name, or any name with condition_codes")
    condition_codes: dict[str, list[str]] | None = Field(
        default=None, description="Code system -> codes of the condition (E11* a prefix), e.g. {icd10cm: [E11*]}; "
                                  "null = those of the features.conditions entry named group_by_condition")
    period_days: int = Field(default=365, ge=1, le=3650, description="Period width (365: per year since the "
                                                                     "patient's first value of the lab)")
    periods: int = Field(default=5, ge=1, le=50, description="Periods compared (0 .. periods - 1)")
    stat: Literal["median", "mean"] = "median"
    min_values: int = Field(default=20, ge=1, description="A (group, period) cell is compared only with at least "
                                                          "this many real values (small cells are not reported)")
    margin: float = Field(default=0.25, ge=0.0, le=5.0,
                          description="Gate: the distance (mean |synthetic - real| per cell, in real standard "
                                      "deviations of the lab) at most the reference's + this margin")

    @field_validator("loinc", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("loinc")
    @classmethod
    def _loinc(cls, v: list[str]) -> list[str]:
        for code in v:
            if not LOINC_RE.match(code):
                raise ValueError(f"{code!r} is not a LOINC code (digits-checkdigit, e.g. 4548-4)")
        return list(dict.fromkeys(v))

    def resolve(self, features: "FeatureSpec") -> tuple[LabFeature, ConditionConcept]:
        """The lab and the condition as features (codes from ``features`` where the trajectory names them)."""
        lab = next((x for x in features.labs if x.name == self.lab), None)
        if self.loinc:
            lab = LabFeature(name=lab.name if lab else "trajectory_lab", loinc=self.loinc)
        concept = next((c for c in features.conditions if c.name == self.group_by_condition), None)
        if self.condition_codes:
            concept = ConditionConcept(name=concept.name if concept else "trajectory_condition",
                                       codes=self.condition_codes)
        if lab is None:
            raise ValueError(f"quality.trajectory.lab: {self.lab!r} is not a features.labs name; give loinc")
        if concept is None:
            raise ValueError(f"quality.trajectory.group_by_condition: {self.group_by_condition!r} is not a "
                             "features.conditions name; give condition_codes")
        return lab, concept


class RelationalThresholds(_Model):
    """Relational mode: the margins of the time and cross-table checks, each judged against its real-data
    reference (real held-out vs real train patients, synthfactory.quality.tables)."""

    interval_ks_margin: float = Field(
        default=0.05, ge=0.0, le=1.0, description="KS of the days between a patient's consecutive events (and of the "
                                                  "age at the first event) at most the reference's + this")
    in_encounter_margin: float = Field(
        default=0.02, ge=0.0, le=1.0, description="Share of encounter-linked rows inside their encounter at least "
                                                  "the reference's - this")
    cooccurrence_top: int = Field(default=10, ge=2, le=100, description="Condition codes (most prevalent) whose "
                                                                        "pairwise co-occurrence is compared")
    cooccurrence_margin: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Co-occurrence error (sum |synthetic - real| / sum real of the "
                                                 "pairwise co-occurrence rates) at most the reference's + this")


class QualityThresholds(_Model):
    min_quality_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Absolute floor on the SDMetrics quality score (null = only "
                                                  "the relative check against the real-data reference)")
    min_expectation_success: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Share of the derived GX expectations that must pass; lowered "
                                                 "to what real held-out rows pass (minus noise) when real data "
                                                 "itself passes fewer")
    min_column_score: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Absolute floor on the worst eligible column's similarity (KS complement for numbers/dates, "
                    "TV complement for categories); null = only the relative check")
    min_pair_trends: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Absolute floor on SDMetrics Column Pair Trends; null = only the relative check")
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec,
                                     description="The real-data reference and the relative thresholds")
    min_utility_ratio: float = Field(
        default=0.8, ge=0.0,
        description="TSTR / TRTR score ratio on the real holdout (AUC for a binary target, R² for a numeric one); "
                    "checked only when 'utility' is set")
    utility: UtilitySpec | None = Field(default=None, description="ML-utility target; null = not measured")
    relationships: list[Relationship] = Field(
        default_factory=list, description="Clinical relationships compared real vs synthetic, each with a tolerance")
    trajectory: TrajectorySpec | None = Field(
        default=None, description="Relational mode: a lab over time in patients with vs without a condition, "
                                  "compared with its real-data reference (null = not measured)")
    relational: RelationalThresholds = Field(
        default_factory=RelationalThresholds, description="Relational mode: margins of the time and cross-table "
                                                          "checks")
    range_tolerance: float = Field(
        default=0.0, ge=0.0, description="Derived suite: min/max widened by this share of the real range")
    quantile_tolerance: float = Field(
        default=0.1, ge=0.0, description="Derived suite: quantiles (10/25/50/75/90 %) may move by this share of "
                                         "the real 10-90 % spread (integer columns: at least 1)")
    null_tolerance: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Derived suite: null rate may exceed the real one by this much")

    @model_validator(mode="after")
    def _unique_relationships(self) -> "QualityThresholds":
        names = [r.name for r in self.relationships]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"relationships: duplicate name(s) {dupes}")
        return self


class DPBudgetSpec(_Model):
    """The dataset's privacy budget across recurring DP releases (synthesize/budget.py): every DP fit is charged
    to a ledger in staging; fits compose by basic composition (the ε add up, the δ add up) over ``window``."""

    epsilon: float | None = Field(default=None, gt=0, le=1000, description="Cap on the total ε of the dataset's "
                                  "DP fits within the window; null = no cap (the ledger still records every fit)")
    delta: float | None = Field(default=None, gt=0, lt=1, description="Cap on their total δ; null = no cap")
    window: int | None = Field(default=None, ge=1, le=36_500, description="Days over which fits compose (a fit "
                               "older than this no longer counts); null = every fit ever")


class MiaThresholds(_Model):
    """The membership-inference battery (:mod:`synthfactory.privacy.mia`) and its gate. Each attack scores
    train members against holdout non-members; the gate takes, per figure, the largest lower end of the 95 %
    intervals over the attacks (significant evidence from any one attack refuses) and certifies the release
    only when every attack's upper end is within the threshold ("not certified": the intervals are too wide
    to conclude; refused only with ``require_certification``)."""

    attacks: list[Literal["distance", "domias", "shadow"]] = Field(
        default_factory=lambda: ["distance", "domias", "shadow"],
        description="Attacks to run: distance (to the closest synthetic record), domias (density ratio of "
                    "synthetic data to the holdout population), shadow (TAPAS-style shadow models of the spec's "
                    "synthesizer on the most exposed records); [] = no battery")
    max_auc: float = Field(
        default=0.6, ge=0.5, le=1.0,
        description="Refused when the largest lower 95 % bound of the attacks' ROC AUC exceeds this (0.5 = chance)")
    max_tpr_at_fpr_01: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="Refused when the largest lower 95 % bound of the attacks' true-positive rate at a 1 % "
                    "false-positive rate exceeds this (0.01 = chance)")
    max_tpr_at_fpr_10: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Optional: the same at a 10 % false-positive rate (0.10 = chance); null = reported only")
    require_certification: bool = Field(
        default=False,
        description="Refuse unless every attack's upper 95 % bounds are within the thresholds (needs many "
                    "targets: a few hundred non-members at least for the TPR at 1 % FPR)")
    shadow_models: int = Field(
        default=8, ge=2, le=256,
        description="Shadow models of the spec's synthesizer (the attack's cost: this many fits; neural kinds "
                    "on the GPU queue)")
    shadow_targets: int = Field(
        default=50, ge=5, le=5000, description="Most exposed records attacked per side (members, non-members)")
    shadow_rows: int = Field(
        default=2000, ge=50, le=1_000_000,
        description="Rows of each shadow training set (at most the train size)")
    max_targets: int = Field(
        default=5000, ge=10, le=1_000_000,
        description="Members and non-members scored by the distance and DOMIAS attacks (seeded subsample)")
    bandwidth: Literal["nn", "scott"] = Field(
        default="nn", description="DOMIAS kernel bandwidth: nn = median holdout-to-train nearest distance; "
                                  "scott = Scott's rule on the holdout")
    bootstrap: int = Field(default=200, ge=0, le=10_000, description="Bootstrap draws for the 95 % intervals")

    @property
    def shadow(self) -> bool:
        """The shadow-model attack is on (it trains the synthesizer ``shadow_models`` times)."""
        return "shadow" in self.attacks


class PrivacyThresholds(_Model):
    """The privacy gate. Every gated figure is judged against what *fresh real rows* score on it (the
    real-data reference, see :mod:`synthfactory.privacy.reference`): it fails when it lies more than
    ``noise_z`` reference standard deviations beyond the reference mean, and never passes beyond its
    absolute cap (``max_*``) where one is set."""

    max_exact_match_rate: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Optional absolute cap on the share of synthetic rows identical to a real row. The gate "
                    "refuses above the reference (fresh real rows can coincide with a real patient exactly on "
                    "tables of discrete columns) + noise_z sd, and above this cap when set; without a reference "
                    "the cap (or 0) applies")
    max_dcr_share: float = Field(
        default=0.7, ge=0.0, le=1.0,
        description="Cap on the share of synthetic rows closer to train than to holdout, adjusted for their "
                    "sizes (0.5 is ideal, 1.0 means the rows were memorised). The gate refuses above the "
                    "reference mean + noise_z sd, never above this cap; and, two-sided, below the reference "
                    "mean - noise_z sd (synthetic rows closer to the holdout than fresh rows are: a leak of "
                    "real rows the model never trained on)",
    )
    min_dcr_ratio: float = Field(
        default=0.5, ge=0.0,
        description="median DCR(synthetic->train) / median DCR(holdout->train); far below 1 means copying",
    )
    leak_scan: bool = True
    reference_resplits: int = Field(
        default=20, ge=0, le=500,
        description="Re-splits of the real rows for the privacy reference (fresh real rows scored like the "
                    "synthetic table); 0 = no reference: only the absolute caps are checked")
    dcr_max_query_rows: int = Field(
        default=50_000, ge=100, le=100_000_000,
        description="Synthetic (and holdout) rows whose distance to the closest record the DCR figures and "
                    "SDMetrics' baseline measure: a seeded subsample when there are more (each nearest is still "
                    "searched in every real row; the report gives the rows used and the shares' standard "
                    "errors). The search costs queries x real rows: every row of a 2M-patient table would "
                    "take hours")
    noise_z: float = Field(
        default=2.5, ge=0.0, le=5.0,
        description="Reference standard deviations of slack (dcr_share both ways, exact_match_rate, mia_auc), "
                    "and the one-sided z of the rare-record membership test. 2.5 refuses fresh real rows in "
                    "<= 2.5 % of random splits on the demo cohorts (2.0: up to 7.5 %)")
    # -- re-identification audit (privacy.metrics / privacy.attacks) --------------------------------
    quasi_identifiers: list[str] = Field(
        default_factory=list,
        description="Modelling-table columns an attacker can know about a person (e.g. age, gender): "
                    "rare-record membership test, singling out, linkability and inference use them")
    sensitive_attributes: list[str] = Field(
        default_factory=list,
        description="Columns an attacker wants to learn (e.g. a condition flag, a lab): inference attacks "
                    "guess each from the quasi-identifiers; linkability links them to the quasi-identifiers")
    max_mia_auc: float = Field(
        default=0.6, ge=0.5, le=1.0,
        description="Cap on the membership-inference attack (distance to the closest synthetic record) ROC "
                    "AUC, train members vs holdout non-members (0.5 = chance); the gate also refuses above "
                    "the reference mean + noise_z sd")
    max_anonymeter_risk: float = Field(
        default=0.10, gt=0.0, le=1.0,
        description="Anonymeter risks (singling out, linkability, inference per sensitive attribute): the "
                    "upper end of each 95 % interval must not exceed this where the interval is narrow "
                    "enough to certify it (half-width <= half this value, at least anonymeter_min_attacks); "
                    "otherwise the lower end must not (no significant evidence of risk) and the risk is "
                    "reported as not certified")
    anonymeter_attacks: int = Field(
        default=5000, ge=0, le=1_000_000,
        description="Attacks per anonymeter evaluator (capped by the holdout size for linkability and "
                    "inference); 0 = do not run the anonymeter attacks")
    anonymeter_min_attacks: int = Field(
        default=100, ge=1,
        description="Fewer attacks than this never certify a risk (the interval is not trusted)")
    require_anonymeter_certification: bool = Field(
        default=False,
        description="Refuse unless every anonymeter risk is certified (upper 95 % bound <= "
                    "max_anonymeter_risk with enough attacks); needs a large holdout")
    min_k_anonymity: int = Field(
        default=5, ge=2, le=1000,
        description="k: a real record whose quasi-identifier combination is shared by fewer than k real "
                    "records (train and holdout) is rare, one of the most exposed")
    max_rare_record_mia_auc: float = Field(
        default=0.55, ge=0.5, le=1.0,
        description="Membership test on the rare records (checked when quasi_identifiers are named): AUC of "
                    "rare train members vs rare holdout non-members by their distance to the closest "
                    "synthetic row. Refused when its one-sided lower bound (AUC - noise_z x standard error) "
                    "exceeds this: members significantly *and* materially closer (0.5 = any significant "
                    "effect, which at thousands of rare records refuses trivial ones)")
    dp_budget: DPBudgetSpec = Field(
        default_factory=DPBudgetSpec,
        description="Privacy budget of the dataset's DP releases (dp_mst, dp_aim) across runs: a DP fit that "
                    "would take the window's composed ε or δ past the cap is refused before fit. Per dataset: "
                    "not in a profile")

    mia: MiaThresholds = Field(
        default_factory=MiaThresholds,
        description="The membership-inference battery: attacks, thresholds on their maximum, cost knobs")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_rare_combination_excess" in data:
            raise ValueError(
                "max_rare_combination_excess was removed (the share of synthetic rows in rare combinations "
                "passed a copier of the training rows and refused fresh real rows): delete it; rare records "
                "are now checked by a membership test, threshold max_rare_record_mia_auc")
        return data

    @model_validator(mode="after")
    def _attribute_lists(self) -> "PrivacyThresholds":
        for label, names in (("quasi_identifiers", self.quasi_identifiers),
                             ("sensitive_attributes", self.sensitive_attributes)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{label}: duplicate column(s) {dupes}")
        both = sorted(set(self.quasi_identifiers) & set(self.sensitive_attributes))
        if both:
            raise ValueError(f"sensitive_attributes: {both} also named in quasi_identifiers")
        return self


class Profile(_Model):
    quality: QualityThresholds | None = None
    privacy: PrivacyThresholds | None = None

    @model_validator(mode="after")
    def _no_budget(self) -> "Profile":
        if self.privacy is not None and self.privacy.dp_budget != DPBudgetSpec():  # set (not the empty default)
            raise ValueError("privacy.dp_budget: the privacy budget is the dataset's, whatever the profile; set it "
                             "in the spec's privacy section, not in a profile")
        return self


class ReleaseSpec(_Model):
    """Where approved releases go: ``s3://<bucket>/<prefix>/<dataset>/<version>/``, plus ``latest.json``."""

    connection_id: str = Field(
        default="sandbox_s3",
        description="Airflow AWS connection of the sandbox writer; must differ from the PHI-side connections "
                    "(source.connection_id, staging.connection_id)")
    bucket: str = Field(description="The sandbox bucket researchers and partners read from")
    prefix: str = Field(default="releases", description="Key prefix of all datasets in the sandbox bucket")
    formats: list[Literal["parquet", "fhir_ndjson"]] = Field(
        default_factory=lambda: ["parquet"], description="Release formats: parquet tables; fhir_ndjson adds "
                                                         "fhir/<Type>.ndjson (synthesizer.mode: relational)")
    encryption: Literal["AES256", "aws:kms"] = Field(
        default="AES256", description="Server-side encryption of every released object: SSE-S3 (AES256) or SSE-KMS")
    kms_key_id: str | None = Field(
        default=None, description="KMS key id, ARN or alias for encryption aws:kms (required there, not allowed "
                                  "with AES256)")
    keep_versions: int = Field(
        default=10, ge=1, le=10_000, description="Retention: released versions kept per dataset (the newest N; "
                                                 "the one latest.json names is never deleted)")
    require_approval: bool = Field(
        default=False, description="Add a human approval step (Airflow HITL) between the gate and the release; "
                                   "the publisher then refuses without a recorded approval")
    approval_timeout_hours: float | None = Field(
        default=72.0, gt=0, description="With require_approval: hours to wait for a reviewer, after which the "
                                        "run is rejected (and quarantined); null = wait indefinitely")
    multipart_threshold_mb: int = Field(
        default=64, ge=5, le=5120, description="Files at least this large (MiB) are uploaded in parts")
    multipart_chunksize_mb: int = Field(default=16, ge=5, le=5120, description="Part size (MiB) of multipart uploads")
    max_attempts: int = Field(
        default=8, ge=1, le=20, description="botocore attempts per S3 request (standard retry mode: exponential "
                                            "backoff with jitter on throttling, 5xx and connection errors)")
    signing_connection_id: str | None = Field(
        default=None, description="Airflow connection whose password is the release signing key: the gate signs "
                                  "its decision and the reviewer's approval with it and the publisher verifies "
                                  "them; unset = $SYNTHFACTORY_SIGNING_KEY, else a key file kept in local staging")

    @model_validator(mode="after")
    def _kms(self) -> "ReleaseSpec":
        if self.encryption == "aws:kms" and not self.kms_key_id:
            raise ValueError("kms_key_id: required when encryption is aws:kms")
        if self.encryption != "aws:kms" and self.kms_key_id:
            raise ValueError("kms_key_id: only used with encryption aws:kms (set encryption: aws:kms or remove it)")
        return self

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v):
            raise ValueError(f"{v!r} is not a valid S3 bucket name")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v


class StagingSpec(_Model):
    uri: str = Field(default=".staging", description="Local folder or s3:// URI for run-scoped staging (PHI side); "
                                                     "never the sandbox bucket, the filesystem root or a home folder")
    connection_id: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("s3://"):
            if not v[len("s3://"):].split("/", 1)[0]:
                raise ValueError("s3 URI needs a bucket")
            return v
        if re.match(r"^[a-z][a-z0-9+.-]*://", v):
            raise ValueError(f"{v!r}: staging is a local folder or an s3:// URI")
        if _is_root_or_home(v):
            raise ValueError(f"{v!r} is the filesystem root or a home folder: staging holds PHI (real identifiers, "
                             f"the real train split) and gets a folder of its own, e.g. /srv/synthfactory/staging")
        return v


def _is_root_or_home(path: str) -> bool:
    """``/`` or a home folder itself (``~``, ``~user``, ``$HOME``, ``/root``, ``/home/<user>``, ``/Users/<user>``,
    and ``/home`` itself)."""
    raw = path.strip()
    if raw.startswith("~") and "/" not in raw.rstrip("/"):  # ~ or ~user, however it expands here
        return True
    expanded = os.path.normpath(os.path.expanduser(os.path.expandvars(raw)))
    if expanded.startswith("//"):
        expanded = "/" + expanded.lstrip("/")
    if not os.path.isabs(expanded):
        return False
    homes = {"/", "/root", "/home", "/Users", os.path.normpath(os.path.expanduser("~"))}
    return expanded in homes or re.fullmatch(r"/(home|Users)/[^/]+", expanded) is not None


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_MINUTES = {"s": 1 / 60, "m": 1.0, "": 1.0, "h": 60.0, "d": 1440.0}


def parse_minutes(value: Any) -> float:
    """A duration as minutes: a number (minutes) or a string like ``90s``, ``30m``, ``2h``, ``1d``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration (minutes, or e.g. '30m', '2h')")
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (minutes, or e.g. '90s', '30m', '2h', '1d')")
        minutes = float(m.group(1)) * _UNIT_MINUTES[m.group(2)]
    if not 0 < minutes <= 7 * 1440:
        raise ValueError(f"{value!r} must be more than 0 and at most 7 days")
    return minutes


class TriggerSpec(_Model):
    """Start runs when a new extract lands, instead of (or before) the cron schedule."""

    asset: str | None = Field(
        default=None, description="Schedule the DAG on this Airflow Asset URI (e.g. s3://phi-extracts/cohort/); "
                                  "the extract producer, or a POST to /api/v2/assets/events, updates it")
    wait_for_key: str | None = Field(
        default=None, description="s3://bucket/key (wildcards allowed): a deferrable S3KeySensor waits for it "
                                  "as the first task")
    connection_id: str | None = Field(
        default=None, description="AWS connection for wait_for_key; default: source.connection_id")
    wait_timeout: float = Field(default=360.0, description="How long the sensor waits (minutes, or '6h')")
    poke_interval_seconds: int = Field(default=60, ge=5, le=3600)

    @field_validator("asset")
    @classmethod
    def _asset(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z][a-z0-9+.-]*://\S+$", v):
            raise ValueError(f"{v!r} is not an asset URI (scheme://...)")
        return v

    @field_validator("wait_for_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$", v):
            raise ValueError(f"{v!r} is not an s3://bucket/key URI")
        return v

    @field_validator("wait_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return parse_minutes(v)


class NotifySpec(_Model):
    """Failure notifications through an Airflow notifier on a named connection."""

    kind: Literal["smtp", "http"] = Field(
        default="smtp", description="smtp: SmtpNotifier (needs 'to'); http: HttpNotifier (POSTs JSON to endpoint)")
    connection_id: str = Field(description="Airflow connection of the SMTP server or the webhook")
    to: list[str] = Field(default_factory=list, description="Recipients (smtp)")
    endpoint: str | None = Field(default=None, description="Path below the connection's host (http)")

    @model_validator(mode="after")
    def _needs(self) -> "NotifySpec":
        if self.kind == "smtp" and not self.to:
            raise ValueError("to: smtp notifications need at least one recipient")
        return self


class OperationsSpec(_Model):
    """How the DAG runs: retries, per-stage timeouts, failure notifications, ingest reuse."""

    retries: int = Field(default=2, ge=0, le=10, description="Retries per task (exponential backoff)")
    retry_delay_seconds: int = Field(default=30, ge=1, le=3600)
    max_retry_delay_minutes: float = Field(default=30.0, gt=0)
    timeouts: dict[str, float] = Field(
        default_factory=dict,
        description="Per-stage execution timeout (minutes, or '30m', '2h'); stages not named use the defaults")
    notify: NotifySpec | None = Field(default=None, description="null = no failure notifications")
    reuse_ingest: bool = Field(
        default=True, description="Reuse a previous run's ingest output when the extract's content sha256, the "
                                  "spec hash, the salt and the code version all match (the force_ingest Param "
                                  "overrides)")
    ingest_shards: int = Field(
        default=1, ge=1, le=1024,
        description="Ingest in this many shards (fhir_ndjson only): the DAG plans them, maps one ingest task over "
                    "each (Airflow dynamic task mapping, spread over the workers) and merges them into the outputs "
                    "of a one-process ingest (duplicate ids, dangling references and the sampled validation "
                    "decided as one process would); the CLI runs the shards in turn. 1 = one ingest task")
    leak_scan_shards: int = Field(
        default=1, ge=1, le=1024,
        description="Leak-scan the release's files in about this many parts: the DAG plans them after the privacy "
                    "report is written (each file one part, a big Parquet file cut into row-group ranges), maps one "
                    "scan task over each (Airflow dynamic task mapping) and merges them in the task 'privacy' into "
                    "exactly the one-process scan's result, which the gate reads; the data card is still scanned "
                    "by the gate that renders it. The CLI runs the parts in turn. 1 = the scan inside the privacy "
                    "task")

    @field_validator("timeouts", mode="before")
    @classmethod
    def _timeouts(cls, v: Any) -> dict[str, float]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of stage -> duration")
        unknown = sorted(set(v) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGE_NAMES)}")
        return {k: parse_minutes(d) for k, d in v.items()}

    def timeout_minutes(self, stage: str) -> float:
        return self.timeouts.get(stage, DEFAULT_TIMEOUT_MINUTES.get(stage, 60.0))


DEFAULT_TIMEOUT_MINUTES = {"ingest": 60.0, "prepare": 30.0, "fit": 240.0, "sample": 60.0, "quality": 60.0,
                           "privacy": 60.0, "gate": 10.0, "release": 30.0}


class DatasetSpec(_Model):
    name: str
    description: str = ""
    owner: str = Field(default="data-platform", description="Team that owns the dataset (card, manifest, DAG owner)")
    contact: str | None = Field(
        default=None, description="Who answers researchers' questions about the dataset (e-mail or team channel); "
                                  "on the data card and in the release manifest")
    licence: str | None = Field(
        default=None, description="Terms the release may be used under (e.g. CC-BY-4.0, or the name of an "
                                  "internal data use agreement); on the data card and in the release manifest")
    intended_use: str = Field(
        default="", description="What the synthetic data is for, and what it is not for (e.g. method development, "
                                "teaching; not clinical decisions); on the data card and in the release manifest")
    tags: list[str] = Field(default_factory=list)
    schedule: str | None = Field(default=None, description="cron expression or preset (@daily); null = manual only")
    source: SourceSpec
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    synthesizer: SynthesizerSpec = Field(default_factory=SynthesizerSpec)
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    privacy: PrivacyThresholds = Field(default_factory=PrivacyThresholds)
    profiles: dict[str, Profile] = Field(default_factory=dict, description="Named threshold overrides")
    release: ReleaseSpec = Field(description="Where approved releases go; default: bucket "
                                             "$SYNTHFACTORY_SANDBOX_BUCKET (else synthetic-sandbox)")
    staging: StagingSpec = Field(default_factory=StagingSpec)
    trigger: TriggerSpec = Field(default_factory=TriggerSpec)
    operations: OperationsSpec = Field(default_factory=OperationsSpec)

    @model_validator(mode="before")
    @classmethod
    def _default_release(cls, data: Any) -> Any:
        """No ``release`` block: the sandbox bucket is ``$SYNTHFACTORY_SANDBOX_BUCKET`` (default
        ``synthetic-sandbox``) with every other release default (the minimal spec: name and source)."""
        if isinstance(data, dict) and "release" not in data:
            data = {**data, "release": {"bucket": os.environ.get("SYNTHFACTORY_SANDBOX_BUCKET",
                                                                 "synthetic-sandbox")}}
        return data

    @model_validator(mode="after")
    def _sandbox_writer_is_not_phi_side(self) -> "DatasetSpec":
        phi = {"source.connection_id": self.source.connection_id, "staging.connection_id": self.staging.connection_id}
        clash = [name for name, conn in phi.items() if conn and conn == self.release.connection_id]
        if clash:
            raise ValueError(f"release.connection_id: {self.release.connection_id!r} is also {' and '.join(clash)}; "
                             f"the sandbox writer must use its own connection, never the PHI-side one")
        return self

    @model_validator(mode="after")
    def _staging_is_not_the_sandbox(self) -> "DatasetSpec":
        uri = self.staging.uri
        if uri.startswith("s3://") and uri[len("s3://"):].split("/", 1)[0] == self.release.bucket:
            raise ValueError(f"staging.uri: {uri!r} is inside the release bucket {self.release.bucket!r} "
                             f"(release.bucket), which researchers read: staging holds PHI and must live elsewhere")
        return self

    @model_validator(mode="after")
    def _fhir_needs_relational(self) -> "DatasetSpec":
        if "fhir_ndjson" in self.release.formats and self.synthesizer.mode != "relational":
            raise ValueError("release.formats: fhir_ndjson needs synthesizer.mode: relational (FHIR resources are "
                             "written from the synthetic patient, encounter, condition, ... tables)")
        return self

    @model_validator(mode="after")
    def _dp_public_bounds(self) -> "DatasetSpec":
        """A DP kind with ``dp.estimate_bounds: false``: every numeric feature needs public bounds."""
        syn = self.synthesizer
        if syn.kind in DP_KINDS and not syn.dp.estimate_bounds:
            numeric = ["n_encounters", "n_conditions", *(lab.name for lab in self.features.labs)]
            missing = [c for c in numeric if c not in syn.dp.bounds]
            if missing:
                raise ValueError(f"synthesizer.dp.bounds: no public bounds for the numeric column(s) {missing}, and "
                                 f"dp.estimate_bounds is false; give [low, high] for each, or let DP estimate them")
        return self

    @model_validator(mode="after")
    def _shards_need_ndjson(self) -> "DatasetSpec":
        if self.operations.ingest_shards > 1 and self.source.kind != "fhir_ndjson":
            raise ValueError(f"operations.ingest_shards: {self.operations.ingest_shards} shards need source.kind "
                             f"fhir_ndjson (the extract's files are cut at line ends); {self.source.kind!r} is "
                             "ingested in one task (set ingest_shards: 1)")
        return self

    @model_validator(mode="after")
    def _trajectory_resolves(self) -> "DatasetSpec":
        """``quality.trajectory`` names a lab and a condition the spec can resolve to codes."""
        if self.quality.trajectory is not None:
            self.quality.trajectory.resolve(self.features)
        return self

    @model_validator(mode="after")
    def _trigger_vs_schedule(self) -> "DatasetSpec":
        if self.trigger.asset and self.schedule:
            raise ValueError("trigger.asset: set either schedule (cron) or trigger.asset (run when the extract "
                             "asset is updated), not both")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, _), 2-63 chars, starting with a letter")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is None:
            return v
        presets = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@continuous"}
        if v.startswith("@"):
            if v not in presets:
                raise ValueError(f"unknown preset {v!r}; use one of {sorted(presets)} or a cron expression")
        elif len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a 5-field cron expression")
        return v

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: dict[str, Profile]) -> dict[str, Profile]:
        if "default" in v:
            raise ValueError("'default' is reserved: it is the spec's own quality/privacy thresholds")
        return v

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def profile_names(self) -> list[str]:
        return ["default", *sorted(self.profiles)]

    def thresholds(self, profile: str = "default") -> tuple[QualityThresholds, PrivacyThresholds]:
        """Quality and privacy thresholds for a named profile ('default' = the spec's own)."""
        if profile == "default":
            return self.quality, self.privacy
        if profile not in self.profiles:
            raise SpecError(f"profile: unknown profile {profile!r}; known: {self.profile_names}")
        p = self.profiles[profile]
        # A profile overrides only the fields it sets; the rest (relationships, utility target, ...) are the
        # spec's own.
        return _override(self.quality, p.quality), _override(self.privacy, p.privacy)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the validated spec (recorded in the release manifest)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def _override(base: _Model, profile: _Model | None) -> Any:
    if profile is None:
        return base
    return base.model_copy(update={k: getattr(profile, k) for k in profile.model_fields_set})


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<spec>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check spelling)"
        elif e["type"] == "missing":
            msg = "field required"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_spec(data: Any, origin: str = "<spec>") -> DatasetSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a dataset spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{origin}: invalid dataset spec: {_format_errors(err)}") from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML keeps the last silently, e.g. a weakened threshold)."""

    def __str__(self) -> str:
        return self.problem or "duplicate key"


# YAML aliases expand by reference: a few dozen nested ones (a "billion laughs") stand for billions of nodes, which
# validation, hashing or JSON exhaust memory walking. A spec needs few (``<<: *defaults`` merge keys).
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded


class AliasLimitError(yaml.composer.ComposerError):
    """Too many YAML aliases, an expansion too large, or an alias inside its own anchor."""

    def __str__(self) -> str:
        return self.problem or "YAML alias limit"


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (merge keys ``<<`` still override),
    more than :data:`MAX_YAML_ALIASES` aliases, and a document whose aliases expand to more than
    :data:`MAX_YAML_NODES` nodes or into themselves."""

    _aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                event = self.peek_event()
                raise AliasLimitError(None, None, f"more than {MAX_YAML_ALIASES} YAML aliases (*name) at line "
                                      f"{event.start_mark.line + 1}: a spec refuses alias expansion this large",
                                      event.start_mark)
        return super().compose_node(parent, index)

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None and self._aliases:
            _expanded_size(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} at line {line} (first at line {first}): a spec names each key "
                        f"once", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Node count of ``root`` with every alias expanded (memoised per node, so linear in the document)."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise AliasLimitError(None, None, f"a YAML alias inside its own anchor (line {node.start_mark.line + 1})",
                                  node.start_mark)
        busy.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        sizes[key] = n
        if n > MAX_YAML_NODES:
            raise AliasLimitError(None, None, f"YAML aliases expand to more than {MAX_YAML_NODES} nodes (anchor at "
                                  f"line {node.start_mark.line + 1}): a spec refuses alias expansion this large",
                                  node.start_mark)
        return n

    return size(root)


def load_yaml(text: str) -> Any:
    """Parse YAML safely, refusing duplicate keys (:class:`DuplicateKeyError` names the key and its line)."""
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 (a SafeLoader subclass)


def load_spec(path: str | Path) -> DatasetSpec:
    """Load and validate a dataset spec YAML file. Raises SpecError naming the bad field(s)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: not a UTF-8 text file (byte {err.start}: {err.reason}); a spec is YAML text") from None
    except (DuplicateKeyError, AliasLimitError) as err:
        raise SpecError(f"{p}: {err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    spec = parse_spec(data, origin=str(p))
    if p.stem != spec.name:
        raise SpecError(f"{p}: name: {spec.name!r} must match the file name {p.stem!r}")
    return spec


def discover_specs(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.yaml"))
