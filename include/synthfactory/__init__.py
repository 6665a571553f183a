"""synthfactory: the synthetic health-data factory (domain library; never imports Airflow)."""

__version__ = "0.1.0"
