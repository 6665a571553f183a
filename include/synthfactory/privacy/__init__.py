"""Privacy gate: exact-match rate, distance to closest record (DCR) and the identifier leak scan."""

from synthfactory.privacy.leak import Identifier, leak_scan, load_identifiers
from synthfactory.privacy.metrics import dcr, encode, exact_match_rate, nearest_distances, privacy_metrics

__all__ = [
    "Identifier",
    "dcr",
    "encode",
    "exact_match_rate",
    "leak_scan",
    "load_identifiers",
    "nearest_distances",
    "privacy_metrics",
]
