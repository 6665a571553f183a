"""Typed configuration of the ingest sources (used by :class:`synthfactory.spec.SourceSpec`).

Kept apart from :mod:`synthfactory.spec` so the ingest layer owns its own options; pydantic only (light to
import while Airflow parses DAG files).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["EhrTableMapping", "EhrSpec", "BulkSpec", "SearchSpec", "EHR_TABLES", "COLUMN_TYPES", "ColumnType",
           "TableRule"]

_COL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .\-]{0,127}$")
#: resource types with a built-in table (kept here, import-light, for spec validation)
BUILTIN_RESOURCES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")
#: target tables an EHR extract can fill (their schemas are the built-in ones)
EHR_TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "procedure")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EhrTableMapping(_M):
    """One source file (CSV or Parquet) -> rows of one target table."""

    file: str = Field(description="File name or glob under source.uri, e.g. lab_results.csv or labs/*.parquet")
    id: str | None = Field(
        default=None, description="Column holding the row's source id, or a template like '{patient_id}:{code}' "
                                  "({value}/{column} in melt/explode); unset = <file>#<row number>")
    patient: str | None = Field(default=None, description="Column holding the patient's source id -> patient_key")
    encounter: str | None = Field(default=None, description="Column holding the encounter's source id -> encounter_key")
    columns: dict[str, str] = Field(default_factory=dict, description="target column: source column")
    values: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="target column: {source value: target value} (others kept as they are)")
    lookup: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="source column: {source value: {target column: value, ...}} (e.g. a local lab name to its "
                    "LOINC code, system and display); the key '*' gives the values for anything not listed")
    constants: dict[str, Any] = Field(default_factory=dict, description="target column: value for every row")
    melt: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="wide -> long: source column: {target column: value} (e.g. code/unit); each listed column "
                    "gives one row whose value goes to 'melt_into'")
    melt_into: str = Field(default="value_num", description="target column of a melted cell")
    explode: dict[str, str] | None = Field(
        default=None, description="{column: <source column>, sep: '|', into: <target column>}: one row per piece")
    age: str | None = Field(default=None, description="Column of age in years -> birth_date (year precision) at "
                                                      "the reference date")
    identifiers: list[str] = Field(
        default_factory=list, description="Source columns holding direct identifiers (names, MRNs, addresses): "
                                          "kept in staging for the leak scan, never in the tables")
    dedupe: bool = Field(default=True, description="Drop rows identical to an earlier row with the same id "
                                                   "(repeated patient rows in joined exports); differing ones "
                                                   "are quarantined as duplicate ids")

    @model_validator(mode="after")
    def _explode(self) -> "EhrTableMapping":
        if self.explode is not None and not {"column", "into"} <= set(self.explode):
            raise ValueError("explode needs 'column' and 'into' (and optionally 'sep', default '|')")
        return self


class EhrSpec(_M):
    """Column mapping of a flat EHR extract (``kind: ehr_csv`` / ``ehr_parquet``)."""

    preset: Literal["clinosim"] | None = Field(
        default=None, description="A built-in mapping (clinosim --format csv: patients, encounters, diagnoses, "
                                  "lab_results, vital_signs, prescriptions, procedures); 'tables' extend/replace it")
    tables: dict[str, list[EhrTableMapping]] = Field(
        default_factory=dict, description="target table -> source file mappings")
    reference_date: str | None = Field(
        default=None, description="ISO date that ages are counted back from; default: today")
    delimiter: str = Field(default=",", min_length=1, max_length=1)

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        unknown = sorted(set(v) - set(EHR_TABLES))
        if unknown:
            raise ValueError(f"unknown target table(s) {unknown}; known: {list(EHR_TABLES)}")
        return {k: (m if isinstance(m, list) else [m]) for k, m in v.items()}

    @model_validator(mode="after")
    def _something(self) -> "EhrSpec":
        if not self.preset and not self.tables:
            raise ValueError("set a preset or map at least the patient table")
        if not self.preset and "patient" not in self.tables:
            raise ValueError("tables: the patient table needs a mapping")
        return self


class BulkSpec(_M):
    """FHIR Bulk Data $export options (``kind: fhir_bulk``)."""

    level: Literal["system", "patient", "group"] = Field(
        default="patient", description="system: [base]/$export; patient: [base]/Patient/$export; "
                                       "group: [base]/Group/<group_id>/$export")
    group_id: str | None = None
    since: str | None = Field(default=None, description="_since (FHIR instant); default: the previous run's "
                                                        "transactionTime (incremental), none on the first run")
    incremental: bool = Field(default=True, description="Use the previous transactionTime as _since")
    type_filter: list[str] = Field(default_factory=list, description="_typeFilter entries (OR)")
    elements: list[str] = Field(default_factory=list, description="_elements")
    max_wait_minutes: float = Field(default=24 * 60, gt=0, description="Give up when the export is not done "
                                                                       "after this long")
    max_retry_after_seconds: float = Field(default=300, gt=0, description="Cap on a server's Retry-After")
    min_poll_seconds: float = Field(default=2, ge=0, description="Shortest wait between status polls")
    download_retries: int = Field(default=5, ge=0, le=50)
    deferrable: bool = Field(default=True, description="Wait in the Airflow triggerer (no worker slot) while "
                                                       "the server prepares the export")
    on_count_mismatch: Literal["fail", "report"] = Field(
        default="fail", description="A downloaded file with fewer or more lines than the manifest's count: fail "
                                    "the ingest (a TransientError: the file is fetched again on the next try), or "
                                    "only report it in the ingest report")

    @model_validator(mode="after")
    def _group(self) -> "BulkSpec":
        if self.level == "group" and not self.group_id:
            raise ValueError("group_id: required when level is 'group'")
        if self.since is not None and not re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
                                                    self.since):
            raise ValueError(f"since: {self.since!r} is not a FHIR instant (e.g. 2024-01-01T00:00:00Z)")
        return self


class SearchSpec(_M):
    """FHIR REST search options (``kind: fhir_search``)."""

    params: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="resource type: {search parameter: value}, e.g. "
                                          "{Observation: {category: laboratory}}")
    page_size: int = Field(default=500, ge=1, le=10_000, description="_count")
    max_pages: int = Field(default=10_000, ge=1, description="Stop following next links after this many pages")


#: column types of a flat table (``source.kind: table``, ``source.columns``)
COLUMN_TYPES = ("numeric", "integer", "ordinal", "categorical", "boolean", "date", "age", "sex", "identifier",
                "exclude")
ColumnType = Literal["numeric", "integer", "ordinal", "categorical", "boolean", "date", "age", "sex", "identifier",
                     "exclude"]


class TableRule(_M):
    """A logic rule of a flat table, kept at sampling and checked by a GX expectation on the output.

    * ``only_when``: ``column`` is set (has a value; a boolean column: is true) only when ``other`` takes one of
      ``values`` (``values`` unset: only when ``other`` has a value), e.g. cause of death only if dead;
    * ``required_when``: ``column`` is set whenever ``other`` takes one of ``values`` (unset: has a value);
    * ``exclusive``: ``column`` and ``other`` are never set together (mutually exclusive flags).
    """

    type: Literal["only_when", "required_when", "exclusive"]
    column: str
    other: str
    values: list[Any] | None = Field(default=None, description="Values of 'other' (only_when/required_when)")

    @model_validator(mode="after")
    def _distinct(self) -> "TableRule":
        if self.column == self.other:
            raise ValueError("other: must differ from column")
        if self.type == "exclusive" and self.values is not None:
            raise ValueError("values: not used by an exclusive rule")
        return self
