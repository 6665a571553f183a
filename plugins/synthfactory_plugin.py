"""Registers the synthfactory AirflowPlugin. Nothing heavy may be imported here."""

from synthfactory.airflow.plugin import SynthFactoryPlugin

__all__ = ["SynthFactoryPlugin"]
