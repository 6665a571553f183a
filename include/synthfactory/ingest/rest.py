"""FHIR REST search as an extract: ``GET [base]/<Type>?<params>&_count=N``, following ``Bundle.link``
``next`` until there is none (or ``max_pages``). Entries (``search.mode`` match or include) are written as
NDJSON per resource type (duplicates across pages dropped), then flattened like any NDJSON extract.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import orjson

from .fhirclient import FhirClient, FhirHttpError

log = logging.getLogger(__name__)

__all__ = ["search_to_ndjson", "next_link"]


def next_link(bundle: Any) -> str | None:
    """The ``next`` link of a searchset Bundle, or None."""
    if not isinstance(bundle, dict):
        return None
    for link in bundle.get("link") or ():
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def search_to_ndjson(client: FhirClient, types: Iterable[str], dest_dir: str, *,
                     params: dict[str, dict[str, str]] | None = None, page_size: int = 500,
                     max_pages: int = 10_000) -> dict:
    """Run one paged search per type and write ``<dest_dir>/<Type>.search.ndjson``. Returns counts
    (pages, resources per type, duplicates dropped, OperationOutcome issues seen)."""
    os.makedirs(dest_dir, exist_ok=True)
    stats: dict[str, Any] = {"pages": 0, "resources": {}, "duplicates": 0, "outcomes": 0, "truncated": []}
    handles: dict[str, Any] = {}
    seen: dict[str, set[str]] = {}
    try:
        for rtype in types:
            url: str | None = rtype
            query: dict[str, Any] | None = {**(params or {}).get(rtype, {}), "_count": str(page_size)}
            pages = 0
            while url is not None:
                if pages >= max_pages:
                    stats["truncated"].append(rtype)
                    log.warning("search %s: stopped after %d pages (max_pages)", rtype, max_pages)
                    break
                bundle = client.get_json(url, params=query)
                query = None  # the next link carries its own query
                pages += 1
                if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                    raise FhirHttpError(f"search {rtype}: page {pages} is not a Bundle")
                for entry in bundle.get("entry") or ():
                    res = entry.get("resource") if isinstance(entry, dict) else None
                    mode = ((entry or {}).get("search") or {}).get("mode", "match")
                    if not isinstance(res, dict):
                        continue
                    t = res.get("resourceType")
                    if mode == "outcome" or t == "OperationOutcome":
                        stats["outcomes"] += 1
                        continue
                    if not isinstance(t, str) or not t.isalnum():
                        continue
                    rid = res.get("id")
                    ids = seen.setdefault(t, set())
                    if isinstance(rid, str):
                        if rid in ids:
                            stats["duplicates"] += 1
                            continue
                        ids.add(rid)
                    fh = handles.get(t)
                    if fh is None:
                        fh = handles[t] = open(os.path.join(dest_dir, f"{t}.search.ndjson"), "wb")
                    fh.write(orjson.dumps(res))
                    fh.write(b"\n")
                    stats["resources"][t] = stats["resources"].get(t, 0) + 1
                url = next_link(bundle)
            stats["pages"] += pages
            log.info("search %s: %d page(s)", rtype, pages)
    finally:
        for fh in handles.values():
            fh.close()
    return stats
