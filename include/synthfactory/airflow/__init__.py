"""Airflow integration of synthfactory: thin hooks and a DAG factory over the library.

``get_provider_info`` is Airflow's provider entry point (declared in pyproject.toml). It must stay
import-light: Airflow calls it while reading its own configuration.
"""

from __future__ import annotations


def get_provider_info() -> dict:
    from synthfactory import __version__

    return {
        "package-name": "synthfactory",
        "name": "Synthetic health-data factory",
        "description": "FHIR ingest, SDV synthesis, quality and privacy gates, and S3 sandbox release.",
        "versions": [__version__],
        "connection-types": [
            {
                "hook-class-name": "synthfactory.airflow.hooks.HmacSaltHook",
                "connection-type": "synthfactory_salt",
            },
            {
                "hook-class-name": "synthfactory.airflow.hooks.FhirHook",
                "connection-type": "fhir",
            },
            {
                "hook-class-name": "synthfactory.airflow.hooks.ReleaseSigningKeyHook",
                "connection-type": "synthfactory_signing_key",
            },
        ],
        "hook-class-names": ["synthfactory.airflow.hooks.HmacSaltHook", "synthfactory.airflow.hooks.FhirHook",
                             "synthfactory.airflow.hooks.ReleaseSigningKeyHook"],
    }
