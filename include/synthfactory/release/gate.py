"""The gate: the spec's thresholds decide whether a synthetic dataset may leave staging.

The decision record lists every check with its figure, threshold and margin, and the sha256 of each
audited file. The publisher refuses any file whose content does not match the audited hash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from synthfactory.spec import PrivacyThresholds, QualityThresholds


class GateRefused(RuntimeError):
    """A gate failed; ``decision`` holds the full record. The message says which gate and by how much."""

    def __init__(self, message: str, decision: dict):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class Check:
    gate: str
    name: str
    value: float | None
    op: str  # ">=" or "<=" or "=="
    threshold: float | bool
    passed: bool

    def describe(self) -> str:
        if self.op == "==":
            return f"{self.gate} gate failed: {self.name} is {self.value} (required {self.threshold})"
        if self.value is None:
            return f"{self.gate} gate failed: {self.name} could not be measured"
        limit = "min" if self.op == ">=" else "max"
        by = abs(self.value - float(self.threshold))
        rel = "<" if self.op == ">=" else ">"
        return (f"{self.gate} gate failed: {self.name} {self.value:.4g} {rel} {limit} {float(self.threshold):.4g} "
                f"(by {by:.4g})")


def ge(gate: str, name: str, value: float | None, threshold: float) -> Check:
    """A check that passes when ``value >= threshold`` (a missing figure fails)."""
    return Check(gate, name, value, ">=", threshold, value is not None and value >= threshold)


def le(gate: str, name: str, value: float | None, threshold: float) -> Check:
    """A check that passes when ``value <= threshold`` (a missing figure fails)."""
    return Check(gate, name, value, "<=", threshold, value is not None and value <= threshold)


def is_true(gate: str, name: str, value: bool | None) -> Check:
    return Check(gate, name, value, "==", True, value is True)


def quality_checks(quality: dict, qt: QualityThresholds) -> list[Check]:
    return [
        ge("quality", "quality_score", quality.get("quality_score"), qt.min_quality_score),
        ge("quality", "expectation_success_ratio", quality.get("expectation_success_ratio"),
           qt.min_expectation_success),
    ]


def privacy_checks(privacy: dict, pt: PrivacyThresholds) -> list[Check]:
    checks = [
        le("privacy", "exact_match_rate", privacy.get("exact_match_rate"), pt.max_exact_match_rate),
        le("privacy", "dcr_share", privacy.get("dcr_share"), pt.max_dcr_share),
        ge("privacy", "dcr_ratio", privacy.get("dcr_ratio"), pt.min_dcr_ratio),
    ]
    if pt.leak_scan:
        checks.append(is_true("privacy", "leak_scan_clean", privacy.get("leak_clean")))
    return checks


def decide(quality: dict, privacy: dict, qt: QualityThresholds, pt: PrivacyThresholds,
           audited_files: dict[str, str], profile: str = "default") -> dict:
    """Evaluate every check of every gate. ``quality``/``privacy`` are the stage summaries; ``audited_files``
    maps the release-relative path of each file to its sha256. Stages may add checks of their own: a
    summary's ``extra_checks`` (list of Check dicts) is evaluated as recorded."""
    checks = [*quality_checks(quality, qt), *privacy_checks(privacy, pt)]
    for summary in (quality, privacy):
        checks += [Check(**c) for c in summary.get("extra_checks", [])]
    failed = [c for c in checks if not c.passed]
    return {
        "approved": not failed,
        "profile": profile,
        "checks": [asdict(c) for c in checks],
        "failed": [c.describe() for c in failed],
        "message": "; ".join(c.describe() for c in failed) if failed else "all gates passed",
        "audited_files": dict(sorted(audited_files.items())),
    }
