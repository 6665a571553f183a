"""Where the dataset specs are: one rule for the DAG file and the "Synthetic datasets" page.

1. ``$SYNTHFACTORY_SPECS_DIR``, when set: that folder and no other;
2. else the first of these that holds a ``*.yaml``:

   - ``<dags folder>/../include/datasets`` (a project laid out as ``dags/``, ``plugins/``, ``include/``: the
     DAG file's own folder, or Airflow's ``[core] dags_folder`` for the page);
   - ``$SYNTHFACTORY_HOME/include/datasets`` (the project root the specs' relative paths resolve against).

Never the folder synthfactory's own code sits in: a deployment reads its own specs, not the package's.

A search that finds no spec raises :class:`NoSpecsFound` naming every folder it looked in: the DAG file lets
it propagate, so Airflow shows it as the file's import error instead of quietly building no DAG.
Import-light (no Airflow at import time): the plugin imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from synthfactory.errors import ConfigError

ENV = "SYNTHFACTORY_SPECS_DIR"
SUBDIR = Path("include") / "datasets"


class NoSpecsFound(ConfigError):
    """No ``*.yaml`` dataset spec in any folder searched."""

    def __init__(self, searched: list[Path]):
        self.searched = searched
        where = ", ".join(str(p) for p in searched) or f"nothing (no ${ENV}, dags folder or $SYNTHFACTORY_HOME)"
        how = (f"${ENV} names it" if os.environ.get(ENV) else
               f"set ${ENV} to the folder of the dataset specs, or put them in <project>/include/datasets next to "
               f"<project>/dags")
        super().__init__(f"no dataset spec (*.yaml) found; searched: {where} ({how})")


def _airflow_dags_folder() -> Path | None:
    try:
        from synthfactory.airflow.compat import conf

        return Path(conf.get("core", "dags_folder"))
    except Exception:  # noqa: BLE001 - outside Airflow (tests, the app run on its own)
        return None


def candidates(dags_folder: str | Path | None = None) -> list[Path]:
    """The folders searched, in order (only ``$SYNTHFACTORY_SPECS_DIR`` when it is set)."""
    explicit = os.environ.get(ENV)
    if explicit:
        return [Path(explicit)]
    out: list[Path] = []
    dags = Path(dags_folder) if dags_folder else _airflow_dags_folder()
    if dags is not None:
        out.append(dags.resolve().parent / SUBDIR)
    home = os.environ.get("SYNTHFACTORY_HOME")
    if home:
        out.append(Path(home) / SUBDIR)
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def has_specs(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.yaml"))


def find(dags_folder: str | Path | None = None) -> Path:
    """The specs folder; raises :class:`NoSpecsFound` naming the folders searched when none holds a spec."""
    searched = candidates(dags_folder)
    for folder in searched:
        if has_specs(folder):
            return folder
    raise NoSpecsFound(searched)
