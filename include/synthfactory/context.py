"""The run context every stage receives, and the rules that place a run: project root, run id, version.

Stages (``synthfactory.pipeline``) and the stage code below them (``ingest``, ``synthesize``, ...) take a
:class:`RunContext`; the Airflow layer (``synthfactory.airflow.context``) and the CLI build one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synthfactory.spec import DatasetSpec
from synthfactory.storage import Store, is_s3, join


def project_root(spec_path: str | Path | None = None) -> Path:
    """The one rule for relative paths in specs (extract, staging, frozen suites): ``$SYNTHFACTORY_HOME``;
    else the project that holds the spec as ``include/datasets/<name>.yaml``; else the current directory."""
    home = os.environ.get("SYNTHFACTORY_HOME")
    if home:
        return Path(home)
    if spec_path is not None:
        path = Path(spec_path).resolve()
        if path.parent.name == "datasets" and path.parent.parent.name == "include":
            return path.parents[2]
    return Path.cwd()


def resolve(uri: str, base: Path | None = None) -> str:
    if is_s3(uri) or os.path.isabs(uri) or re.match(r"^[a-z][a-z0-9+.-]*://", uri):  # s3://, https:// (FHIR servers)
        return uri
    return str((base or project_root()) / uri)


def safe_id(value: str) -> str:
    """Make an Airflow run id or timestamp safe as a path/key segment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_")[:120] or "run"


def version_for(when: datetime | None) -> str:
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return "v" + when.strftime("%Y%m%dT%H%M%SZ")


@dataclass
class RunContext:
    spec: DatasetSpec
    run_id: str
    version: str
    store: Store = field(default_factory=Store)          # the PHI side: extract and staging
    source_uri: str | None = None                         # overrides spec.source.uri
    staging_root: str | None = None                       # overrides spec.staging.uri
    salt: str | bytes | None = None
    profile: str = "default"
    rows: int | None = None
    synthesizer: str | None = None
    base_dir: str | None = None                           # relative spec paths resolve here
    epochs: int | None = None                             # neural synthesizers: overrides params.epochs
    force_ingest: bool = False                            # ignore a reusable previous ingest output
    fhir_auth: Any = None                                 # ingest.smart.AuthConfig of a FHIR server (fhir_bulk/search)
    fhir_base_url: str | None = None                      # the FHIR server, when it comes from a connection
    sql_reader: Any = None                                # table source: query -> DataFrame (an Airflow DbApiHook)
    signing_key: str | bytes | None = None                # release signing key (release.signing_connection_id); None:
                                                          # $SYNTHFACTORY_SIGNING_KEY, else a key file in local staging

    def __post_init__(self) -> None:
        base = Path(self.base_dir) if self.base_dir else None
        self.run_id = safe_id(self.run_id)
        self.staging_root = resolve(self.staging_root or self.spec.staging.uri, base)
        self.source_uri = resolve(self.source_uri or self.spec.source.uri, base)
        self.spec.thresholds(self.profile)  # fail fast on an unknown profile

    @property
    def run_uri(self) -> str:
        return join(self.staging_root, self.spec.name, "runs", self.run_id)

    def uri(self, *parts: str) -> str:
        return join(self.run_uri, *parts)

    @property
    def train_uri(self) -> str:
        """The real training split prepare writes (PHI side, never released)."""
        return self.uri("model", "train.parquet")

    @property
    def holdout_uri(self) -> str:
        """The real holdout split prepare writes: never seen by the synthesizer."""
        return self.uri("model", "holdout.parquet")

    @property
    def quarantine_uri(self) -> str:
        return join(self.staging_root, self.spec.name, "quarantine", self.run_id)

    @property
    def synthesizer_kind(self) -> str:
        return self.synthesizer or self.spec.synthesizer.kind
