"""Dataset spec: the declarative description of one synthetic dataset.

A spec lives in ``include/datasets/<name>.yaml``. :func:`load_spec` validates it with the typed
model below and raises :class:`SpecError` whose message names every bad field and its problem, e.g.
``privacy.max_dcr_share: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
LOINC_RE = re.compile(r"^\d{1,7}-\d$")


class SpecError(ValueError):
    """A dataset spec is missing, unreadable or invalid. The message names the field(s)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Model):
    """Where the FHIR extract comes from (the secure, PHI side)."""

    kind: Literal["fhir_ndjson"] = "fhir_ndjson"
    uri: str = Field(description="Local folder or s3://bucket/prefix holding <Type>.ndjson[.gz] files")
    connection_id: str | None = Field(
        default=None, description="Airflow AWS connection for an s3:// extract (staging side, never the sandbox)"
    )
    salt_connection_id: str | None = Field(
        default=None,
        description="Airflow connection whose password is the HMAC salt for keys; unset = a salt file kept in staging",
    )
    resources: list[Literal["Patient", "Encounter", "Condition", "Observation"]] = Field(
        default_factory=lambda: ["Patient", "Encounter", "Condition", "Observation"]
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3 URI needs a bucket")
        return v


class LabFeature(_Model):
    name: str = Field(description="Column name in the modelling table, e.g. hba1c")
    loinc: str = Field(description="LOINC code of the lab, e.g. 4548-4")
    agg: Literal["last", "mean", "max", "min"] = "last"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, _), 2-63 chars")
        return v

    @field_validator("loinc")
    @classmethod
    def _loinc(cls, v: str) -> str:
        if not LOINC_RE.match(v):
            raise ValueError(f"{v!r} is not a LOINC code (digits-checkdigit, e.g. 4548-4)")
        return v


class FeatureSpec(_Model):
    """How the patient-level modelling table is derived from the flattened tables."""

    top_conditions: int = Field(default=8, ge=0, le=50, description="Flags for the N most prevalent conditions")
    condition_codes: list[str] = Field(default_factory=list, description="Extra condition codes to flag")
    labs: list[LabFeature] = Field(default_factory=list)
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
        return self


class SynthesizerSpec(_Model):
    kind: Literal["gaussian_copula", "ctgan", "tvae", "copulagan"] = "gaussian_copula"
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the SDV synthesizer")
    rows: int | None = Field(default=None, ge=1, le=10_000_000, description="Rows to sample; default = real rows")
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=0.9)
    seed: int = 42


class QualityThresholds(_Model):
    min_quality_score: float = Field(default=0.75, ge=0.0, le=1.0, description="SDMetrics QualityReport score")
    min_expectation_success: float = Field(
        default=0.9, ge=0.0, le=1.0, description="Share of the derived GX expectations that must pass"
    )


class PrivacyThresholds(_Model):
    max_exact_match_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    max_dcr_share: float = Field(
        default=0.6, ge=0.0, le=1.0,
        description="Share of synthetic rows closer to train than to holdout, adjusted for their sizes "
                    "(0.5 is ideal, 1.0 means the rows were memorised)",
    )
    min_dcr_ratio: float = Field(
        default=0.5, ge=0.0,
        description="median DCR(synthetic->train) / median DCR(holdout->train); far below 1 means copying",
    )
    leak_scan: bool = True


class Profile(_Model):
    quality: QualityThresholds | None = None
    privacy: PrivacyThresholds | None = None


class ReleaseSpec(_Model):
    connection_id: str = Field(default="sandbox_s3", description="Airflow AWS connection of the sandbox writer")
    bucket: str
    prefix: str = "releases"

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
    uri: str = Field(default=".staging", description="Local folder or s3:// URI for run-scoped staging (PHI side)")
    connection_id: str | None = None


class DatasetSpec(_Model):
    name: str
    description: str = ""
    owner: str = "data-platform"
    tags: list[str] = Field(default_factory=list)
    schedule: str | None = Field(default=None, description="cron expression or preset (@daily); null = manual only")
    source: SourceSpec
    features: FeatureSpec = Field(default_factory=FeatureSpec)
    synthesizer: SynthesizerSpec = Field(default_factory=SynthesizerSpec)
    quality: QualityThresholds = Field(default_factory=QualityThresholds)
    privacy: PrivacyThresholds = Field(default_factory=PrivacyThresholds)
    profiles: dict[str, Profile] = Field(default_factory=dict, description="Named threshold overrides")
    release: ReleaseSpec
    staging: StagingSpec = Field(default_factory=StagingSpec)

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
        return p.quality or self.quality, p.privacy or self.privacy

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the validated spec (recorded in the release manifest)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


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


def load_spec(path: str | Path) -> DatasetSpec:
    """Load and validate a dataset spec YAML file. Raises SpecError naming the bad field(s)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: spec file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML: {err}") from None
    spec = parse_spec(data, origin=str(p))
    if p.stem != spec.name:
        raise SpecError(f"{p}: name: {spec.name!r} must match the file name {p.stem!r}")
    return spec


def discover_specs(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.yaml"))
