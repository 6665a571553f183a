"""The privacy budget of a dataset across recurring DP releases: a ledger in staging, composed over a window.

The factory runs on a schedule over overlapping data, so every differentially private fit of a dataset spends
from one budget. Each DP fit is recorded in ``<staging>/<dataset>/dp_ledger/<run_id>.json`` (PHI side, 0600 like
every staging file): ε, δ, the kind and when. One object per run id, written whole (a local write is a rename, an
S3 put is atomic): a retried fit of the same run rewrites its own entry instead of adding one, so retries never
count twice, and concurrent runs never overwrite each other's entries.

**When the budget is spent: at fit.** ε is consumed when the mechanism sees the real rows, whether or not the
run is published (a refused or abandoned run's model still exists in staging); this is the conservative choice.
The entry is written *before* the fit, then the ledger is read again: when runs racing each other push the window
past the cap, this run withdraws its entry and is refused (both may be refused; never both admitted).

**Composition: basic** (sequential composition): the ε of the releases in the window add up, and so do the δ.
It holds for any mechanisms and any overlap of the data; it is loose for many releases (advanced composition
would give ≈ √k·ε for k releases of ε each, at an extra δ), and we do not use it here.

``privacy.dp_budget``: ``epsilon`` (cap on the window's total ε), ``delta`` (cap on its total δ) and ``window``
(days; null = every release ever). A DP fit that would pass either cap is refused before it touches the data
(:class:`BudgetRefused`, exit 4), saying what was spent and what remains.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from synthfactory.errors import EXIT_GATE, RefusedError
from synthfactory.storage import Store, join

log = logging.getLogger(__name__)

LEDGER_DIR = "dp_ledger"
COMPOSITION = "basic (sequential) composition: the ε of every DP fit in the window add up, and so do the δ"


class BudgetRefused(RefusedError):
    """A DP fit would take the dataset's privacy budget past ``privacy.dp_budget`` (refused before fit)."""

    exit_code = EXIT_GATE
    label = "privacy budget refused"


def ledger_uri(staging_root: str, dataset: str) -> str:
    return join(staging_root, dataset, LEDGER_DIR)


def entries(store: Store, staging_root: str, dataset: str) -> list[dict]:
    """Every recorded DP fit of ``dataset`` (oldest first)."""
    out = []
    for uri in store.listdir(ledger_uri(staging_root, dataset)):
        if uri.endswith(".json"):
            out.append(store.read_json(uri))
    return sorted(out, key=lambda e: (e.get("at") or "", e.get("run_id") or ""))


def _parse(at: str) -> datetime:
    return datetime.fromisoformat(at).astimezone(timezone.utc)


def compose(items: list[dict], *, now: datetime, window_days: int | None) -> dict:
    """Basic composition of the entries within ``window_days`` of ``now`` (all of them when None)."""
    since = None if window_days is None else now - timedelta(days=window_days)
    used = [e for e in items if since is None or _parse(e["at"]) >= since]
    return {"epsilon": float(sum(float(e["epsilon"]) for e in used)),
            "delta": float(sum(float(e.get("delta") or 0.0) for e in used)),
            "releases": len(used), "runs": [e["run_id"] for e in used]}


def status(budget: Any, spent: dict, window_days: int | None) -> dict:
    """What the card and the fit summary show: caps, spent and remaining (None: no cap)."""
    cap_e, cap_d = budget.epsilon, budget.delta
    return {
        "epsilon_cap": cap_e, "delta_cap": cap_d, "window_days": window_days,
        "spent_epsilon": round(spent["epsilon"], 6), "spent_delta": spent["delta"],
        "remaining_epsilon": None if cap_e is None else round(max(0.0, cap_e - spent["epsilon"]), 6),
        "remaining_delta": None if cap_d is None else max(0.0, cap_d - spent["delta"]),
        "releases_in_window": spent["releases"], "composition": COMPOSITION, "charged_on": "fit",
    }


def _over(budget: Any, spent: dict) -> list[str]:
    over = []
    if budget.epsilon is not None and spent["epsilon"] > budget.epsilon * (1 + 1e-9):
        over.append("epsilon")
    if budget.delta is not None and spent["delta"] > budget.delta * (1 + 1e-9):
        over.append("delta")
    return over


def charge(store: Store, staging_root: str, dataset: str, run_id: str, *, epsilon: float, delta: float,
           kind: str, budget: Any, now: datetime | None = None) -> dict:
    """Record this run's DP fit in the ledger, or refuse it (:class:`BudgetRefused`) when the window's composed
    ε or δ would pass ``budget``'s caps. Idempotent per ``run_id``. Returns :func:`status` including this run."""
    now = now or datetime.now(timezone.utc)
    window = budget.window
    uri = join(ledger_uri(staging_root, dataset), f"{run_id}.json")
    previous = store.read_json(uri) if store.exists(uri) else None
    others = [e for e in entries(store, staging_root, dataset) if e.get("run_id") != run_id]
    before = compose(others, now=now, window_days=window)
    entry = {"run_id": run_id, "dataset": dataset, "kind": kind, "epsilon": float(epsilon), "delta": float(delta),
             "at": (previous or {}).get("at") or now.isoformat(timespec="seconds")}
    if previous:  # a retry of the same run: one entry, the larger of the two spends
        entry["epsilon"] = max(entry["epsilon"], float(previous["epsilon"]))
        entry["delta"] = max(entry["delta"], float(previous.get("delta") or 0.0))
    after = compose([*others, entry], now=now, window_days=window)
    over = _over(budget, after)
    if over:
        raise BudgetRefused(_refusal(dataset, entry, before, budget, over))
    store.write_json(uri, entry)
    # runs racing this one: read again; when the window is now past a cap, withdraw (unless already recorded)
    again = compose(entries(store, staging_root, dataset), now=now, window_days=window)
    over = _over(budget, again)
    if over and previous is None:
        _remove(store, uri)
        raise BudgetRefused(_refusal(dataset, entry, compose([e for e in entries(store, staging_root, dataset)
                                                              if e.get("run_id") != run_id], now=now,
                                                             window_days=window), budget, over))
    out = status(budget, again, window)
    log.info("dp budget of %s: run %s charged epsilon=%.4g delta=%.3g; window spent epsilon=%.4g delta=%.3g "
             "(remaining epsilon=%s)", dataset, run_id, entry["epsilon"], entry["delta"], again["epsilon"],
             again["delta"], out["remaining_epsilon"])
    return out


def _remove(store: Store, uri: str) -> None:
    from synthfactory.storage import is_s3, split_s3

    if is_s3(uri):
        bucket, key = split_s3(uri)
        store._client().delete_object(Bucket=bucket, Key=key)
    else:
        import os

        os.remove(uri)


def _refusal(dataset: str, entry: dict, before: dict, budget: Any, over: list[str]) -> str:
    window = f"the last {budget.window} days" if budget.window else "all time"
    parts = []
    if "epsilon" in over:
        parts.append(f"ε {entry['epsilon']:g} needed, {before['epsilon']:g} of {budget.epsilon:g} spent in {window}, "
                     f"{max(0.0, budget.epsilon - before['epsilon']):g} remaining")
    if "delta" in over:
        parts.append(f"δ {entry['delta']:.3g} needed, {before['delta']:.3g} of {budget.delta:.3g} spent, "
                     f"{max(0.0, budget.delta - before['delta']):.3g} remaining")
    return (f"{dataset}: the DP fit of run {entry['run_id']} would exceed privacy.dp_budget ({'; '.join(parts)}; "
            f"{before['releases']} earlier DP fit(s) in the window, basic composition: ε and δ add up). Nothing "
            f"was fitted; lower synthesizer.dp.epsilon, raise the budget or wait for the window to pass")
