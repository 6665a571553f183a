"""Test, demo and benchmark tooling: nothing in the pipeline, the CLI or the Airflow layer imports it.

* :mod:`.dev`: a loopback S3 emulator, an Airflow home on SQLite and ``airflow dags test``, the offline
  sample extract (``carebundle``), and helpers to read a released version back;
* :mod:`.cohorts`: fixed-seed patient-level modelling tables with known clinical relationships (quality
  and privacy tests, benchmarks);
* :mod:`.records`: fixed-seed longitudinal flattened FHIR tables and an NDJSON extract made from them
  (relational and pipeline tests, benchmarks).
"""
