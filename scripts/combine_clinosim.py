"""Combine clinosim FHIR R4 NDJSON cohorts into one extract with distinct ids (bench tooling, issue 17 item 7).

clinosim seeds reuse resource ids (``pt-006e35dbbfb4`` is a patient of seed 11 and of seed 41), so every resource id
and every ``reference`` (``Type/id``) gets its cohort's prefix. Only the six resources of relational mode are copied.

    python scripts/combine_clinosim.py OUT/fhir_r4 c11=/work/cohorts/clino_11_1700/fhir_r4 c23=...
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import orjson

RESOURCES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure")
REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/(.+)$")


def prefix_references(node: Any, prefix: str) -> None:
    """Every ``reference`` of the form ``Type/id`` below ``node`` becomes ``Type/<prefix>-id`` (in place)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                m = REFERENCE.match(value)
                if m:
                    node[key] = f"{m.group(1)}/{prefix}-{m.group(2)}"
            else:
                prefix_references(value, prefix)
    elif isinstance(node, list):
        for value in node:
            prefix_references(value, prefix)


def combine(out: Path, cohorts: list[tuple[str, Path]]) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for rtype in RESOURCES:
        n = 0
        with open(out / f"{rtype}.ndjson", "wb") as fo:
            for prefix, folder in cohorts:
                with open(folder / f"{rtype}.ndjson", "rb") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        resource = orjson.loads(line)
                        resource["id"] = f"{prefix}-{resource['id']}"
                        prefix_references(resource, prefix)
                        fo.write(orjson.dumps(resource) + b"\n")
                        n += 1
        counts[rtype] = n
    return counts


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cohorts = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in argv[1:]]
    for rtype, n in combine(Path(argv[0]), cohorts).items():
        print(rtype, n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
