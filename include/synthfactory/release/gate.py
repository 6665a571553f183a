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


def _ge(gate: str, name: str, value: float | None, threshold: float) -> Check:
    return Check(gate, name, value, ">=", threshold, value is not None and value >= threshold)


def _le(gate: str, name: str, value: float | None, threshold: float) -> Check:
    return Check(gate, name, value, "<=", threshold, value is not None and value <= threshold)


def decide(quality: dict, privacy: dict, qt: QualityThresholds, pt: PrivacyThresholds,
           audited_files: dict[str, str], profile: str = "default") -> dict:
    """Evaluate all checks. ``quality``/``privacy`` are the stage summaries; ``audited_files`` maps the
    release-relative path of each file to its sha256."""
    checks = [
        _ge("quality", "quality_score", quality.get("quality_score"), qt.min_quality_score),
        _ge("quality", "expectation_success_ratio", quality.get("expectation_success_ratio"),
            qt.min_expectation_success),
        _le("privacy", "exact_match_rate", privacy.get("exact_match_rate"), pt.max_exact_match_rate),
        _le("privacy", "dcr_share", privacy.get("dcr_share"), pt.max_dcr_share),
        _ge("privacy", "dcr_ratio", privacy.get("dcr_ratio"), pt.min_dcr_ratio),
    ]
    if pt.leak_scan:
        clean = privacy.get("leak_clean")
        checks.append(Check("privacy", "leak_scan_clean", clean, "==", True, clean is True))
    failed = [c for c in checks if not c.passed]
    return {
        "approved": not failed,
        "profile": profile,
        "checks": [asdict(c) for c in checks],
        "failed": [c.describe() for c in failed],
        "message": "; ".join(c.describe() for c in failed) if failed else "all gates passed",
        "audited_files": dict(sorted(audited_files.items())),
    }
