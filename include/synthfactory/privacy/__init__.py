"""Privacy gate: exact matches, distance to closest record (DCR, NNDR), membership inference (table-wide and
on rare records), k-anonymity, the real-data reference (fresh real rows scored alike), anonymeter's
singling-out / linkability / inference risks, SDMetrics' DCRBaselineProtection on a fast exact search, and
the identifier leak scan."""

from synthfactory.privacy.encoding import encode
from synthfactory.privacy.leak import Identifier, leak_scan, load_identifiers
from synthfactory.privacy.metrics import (
    dcr,
    dcr_baseline_protection,
    exact_match_rate,
    membership_inference,
    privacy_metrics,
    quasi_identifier_risk,
)
from synthfactory.privacy.neighbors import nearest_distances

__all__ = [
    "Identifier",
    "dcr",
    "dcr_baseline_protection",
    "encode",
    "exact_match_rate",
    "leak_scan",
    "load_identifiers",
    "membership_inference",
    "nearest_distances",
    "privacy_metrics",
    "quasi_identifier_risk",
]
