"""Signed release records: the gate's decision and the reviewer's approval, HMAC-SHA256 under a release key.

The publisher trusts only what the gate and the reviewer wrote. Both records live in staging as JSON, so each
carries a ``signature``: HMAC-SHA256 under the release signing key over a canonical JSON of every other field
of the record (dataset, version, run id, approved, the audited file hashes, the profile and every check with
its threshold, ...) and the record's kind (a decision cannot pass for an approval). The publisher verifies
both before it writes anything, and checks that they belong to the run and version it is publishing: an
edited record, an unsigned one, or one copied from another run or version is refused.

The key: an explicit one (the Airflow layer reads ``release.signing_connection_id``'s password), else
``$SYNTHFACTORY_SIGNING_KEY``, else a key file created once (0600) at the local staging root, next to the
HMAC salt: never in the sandbox. s3:// staging needs the connection or the variable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from synthfactory.errors import EXIT_PUBLISH, ConfigError, RefusedError
from synthfactory.keys import secret_file
from synthfactory.storage import is_s3

__all__ = ["ALG", "KEY_FILE", "MIN_KEY_BYTES", "SignatureRefused", "canonical", "key_id", "resolve_signing_key",
           "sign", "verify"]

ALG = "HMAC-SHA256"
KEY_FILE = ".release_signing_key"
KEY_ENV = "SYNTHFACTORY_SIGNING_KEY"
MIN_KEY_BYTES = 16
SIGNATURE = "signature"
KINDS = ("decision", "approval")
#: what a record must name to be bound to a run (the publisher compares them with its own)
BOUND_FIELDS = ("dataset", "version", "run_id", "approved", "audited_files")


class SignatureRefused(RefusedError, RuntimeError):
    """A release record is unsigned, edited, signed with another key, or belongs to another run or version."""

    exit_code = EXIT_PUBLISH
    label = "publish refused"


def resolve_signing_key(explicit: str | bytes | None, staging_root: str) -> bytes:
    """The release signing key: ``explicit`` (an Airflow connection's password), else ``$SYNTHFACTORY_SIGNING_KEY``,
    else a key file created once (0600) at the local staging root and reused by later runs."""
    key: str | bytes | None = explicit or os.environ.get(KEY_ENV)
    if not key:
        if is_s3(str(staging_root)):
            raise ConfigError("no release signing key: set release.signing_connection_id (Airflow) or "
                              f"${KEY_ENV} for s3:// staging")
        key = secret_file(staging_root, KEY_FILE)
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigError(f"release signing key: at least {MIN_KEY_BYTES} bytes, got {len(raw)}")
    return raw


def key_id(key: bytes) -> str:
    """A short public name of a key (an HMAC of a constant, never the key): says which key signed a record."""
    return hmac.new(key, b"synthfactory-release-key-id", hashlib.sha256).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    """The record as JSON would give it back (numpy scalars, NaN -> null, tuples -> lists), so a record signed
    in memory verifies after a write and a read."""
    import orjson

    return orjson.loads(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))


def canonical(record: dict, kind: str) -> bytes:
    """The signed bytes: ``kind`` and every field but the signature, as sorted compact JSON."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    body = {k: v for k, v in record.items() if k != SIGNATURE}
    return json.dumps({"kind": kind, "record": _plain(body)}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def _mac(record: dict, kind: str, key: bytes) -> str:
    return hmac.new(key, canonical(record, kind), hashlib.sha256).hexdigest()


def sign(record: dict, kind: str, key: bytes) -> dict:
    """``record`` with its ``signature`` (any previous one replaced). It must name its dataset, version, run
    id, approval and audited files."""
    missing = [f for f in BOUND_FIELDS if f not in record]
    if missing:
        raise ValueError(f"a {kind} record to sign needs {missing}")
    body = _plain({k: v for k, v in record.items() if k != SIGNATURE})
    return {**body, SIGNATURE: {"alg": ALG, "kind": kind, "key_id": key_id(key), "value": _mac(body, kind, key)}}


def verify(record: dict | None, kind: str, key: bytes, *, dataset: str, version: str, run_id: str) -> dict:
    """Check ``record``'s signature under ``key`` and that it belongs to ``dataset``/``version``/``run_id``.
    Returns the record; raises :class:`SignatureRefused` naming what is wrong."""
    what = "the gate's decision" if kind == "decision" else "the human approval record"
    if not isinstance(record, dict):
        raise SignatureRefused(f"refusing to publish: {what} is missing")
    sig = record.get(SIGNATURE)
    if not isinstance(sig, dict) or not sig.get("value"):
        raise SignatureRefused(f"refusing to publish: {what} is not signed")
    if sig.get("alg") != ALG or sig.get("kind") != kind:
        raise SignatureRefused(f"refusing to publish: {what} carries a {sig.get('alg')}/{sig.get('kind')} "
                               f"signature, not {ALG}/{kind}")
    try:
        expected = _mac(record, kind, key)
    except (TypeError, ValueError) as err:
        raise SignatureRefused(f"refusing to publish: {what} cannot be read as a signed record ({err})") from None
    if not hmac.compare_digest(str(sig["value"]), expected):
        if sig.get("key_id") != key_id(key):
            raise SignatureRefused(f"refusing to publish: {what} was signed with another key "
                                   f"(key id {sig.get('key_id')}, this release key is {key_id(key)})")
        raise SignatureRefused(f"refusing to publish: {what} was edited after it was signed "
                               f"(its signature does not match its contents)")
    bound = {"dataset": dataset, "version": version, "run_id": run_id}
    wrong = [f"{f} {record.get(f)!r} (publishing {want!r})" for f, want in bound.items() if record.get(f) != want]
    if wrong:
        raise SignatureRefused(f"refusing to publish: {what} belongs to another run or version: {'; '.join(wrong)}")
    return record
