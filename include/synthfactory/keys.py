"""Stable pseudonymous keys: salted HMAC-SHA256 of source ids.

Real resource ids never reach the modelling tables; every key is ``hmac(salt, "<Type>/<id>")`` cut to
32 hex characters (128 bits). The same salt gives the same keys across runs, so tables join and
incremental runs line up; without the salt the keys cannot be reversed or recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from synthfactory.storage import private_dirs

KEY_HEX_CHARS = 32
SALT_FILE = ".hmac_salt"
MIN_SALT_BYTES = 16


class Keyer:
    """Maps (resource type, source id) to a salted HMAC key."""

    def __init__(self, salt: bytes):
        if len(salt) < MIN_SALT_BYTES:
            raise ValueError(f"HMAC salt must be at least {MIN_SALT_BYTES} bytes, got {len(salt)}")
        self._mac = hmac.new(salt, digestmod=hashlib.sha256)
        k = (salt if len(salt) <= 64 else hashlib.sha256(salt).digest()).ljust(64, b"\0")
        self._pads = (bytes(b ^ 0x36 for b in k), bytes(b ^ 0x5C for b in k))

    def key(self, resource_type: str, source_id: str) -> str:
        m = self._mac.copy()
        m.update(f"{resource_type}/{source_id}".encode())
        return m.hexdigest()[:KEY_HEX_CHARS]

    def openssl_hmac(self) -> Any:
        """The OpenSSL HMAC object keyed with the salt (nothing hashed yet), or None where ``hmac`` has none:
        ``m = obj.copy(); m.update(b"<Type>/<id>"); m.hexdigest()[:KEY_HEX_CHARS]`` is :meth:`key` without
        the pure-Python ``hmac.HMAC.copy`` wrapper (:func:`synthfactory.fhir.normalize.fast_key`)."""
        return getattr(self._mac, "_hmac", None)

    def hmac_pads(self) -> tuple[bytes, bytes]:
        """The inner and outer pads of the HMAC key (RFC 2104), for a compiled keyer in this process
        (:mod:`synthfactory.ingest.native`), which checks its keys against :meth:`key` before use."""
        return self._pads


def secret_file(root: str | Path, name: str) -> str:
    """The secret in ``<root>/<name>``: created once (0600, 32 random bytes as hex; ``root`` 0700 if the
    factory creates it) and read back by later runs."""
    root = private_dirs(root)
    path = root / name
    if not path.exists():  # written whole to a private temporary file, then linked in: never seen half-written
        tmp = root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process created it first: use theirs
                pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def resolve_salt(explicit: str | bytes | None, staging_root: str) -> bytes:
    """The salt to key with: an explicit one (e.g. from an Airflow connection) or a salt file that is
    created once inside the local staging root (the secure PHI area) and reused by later runs."""
    if explicit:
        return explicit.encode() if isinstance(explicit, str) else explicit
    env = os.environ.get("SYNTHFACTORY_HMAC_SALT")
    if env:
        return env.encode()
    if str(staging_root).startswith("s3://"):
        raise ValueError(
            "no HMAC salt: set source.salt_connection_id (Airflow) or SYNTHFACTORY_HMAC_SALT for s3:// staging"
        )
    return secret_file(staging_root, SALT_FILE).encode()
