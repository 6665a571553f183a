"""AirflowPlugin registration (kept import-light: Airflow imports plugins in every component)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


def release_uri(bucket: str, prefix: str, dataset: str, version: str) -> str:
    """Jinja macro ``{{ macros.synthfactory.release_uri(...) }}``: where a released version lives."""
    return "s3://" + "/".join(p.strip("/") for p in (bucket, prefix, dataset, version) if p) + "/"


class SynthFactoryPlugin(AirflowPlugin):
    name = "synthfactory"
    macros = [release_uri]
