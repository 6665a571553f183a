"""Failure notifications: an Airflow 3 notifier on the connection the spec names.

- ``kind: smtp`` → the SMTP provider's ``SmtpNotifier`` (connection = the SMTP server, ``to`` = recipients);
- ``kind: http`` → the HTTP provider's ``HttpNotifier``, POSTing a small JSON document to
  ``endpoint`` below the connection's host (Slack/Teams/PagerDuty-style webhooks, or an in-house one).

The message names the DAG, the task, the run, the try and the exception's one-line message, which are
ours (gate margins, "extract not found", ...) and never carry patient values; the full traceback stays in
the task log. The provider modules are imported only when a spec asks for notifications.
"""

from __future__ import annotations

from typing import Any

from synthfactory.spec import NotifySpec

SUBJECT = "[synthfactory] {{ dag.dag_id }}: task {{ ti.task_id }} failed (run {{ run_id }})"
TEXT = ("DAG {{ dag.dag_id }}, task {{ ti.task_id }}, run {{ run_id }}, try {{ ti.try_number }} failed: "
        "{{ exception | string | truncate(500) }}")
HTML = "<p>" + TEXT + "</p><p>See the task log in Airflow for details.</p>"


def failure_payload() -> dict[str, Any]:
    """The JSON body the http notifier posts (every value is a Jinja template rendered with the task context)."""
    return {"source": "synthfactory", "event": "task_failed", "dag_id": "{{ dag.dag_id }}",
            "task_id": "{{ ti.task_id }}", "run_id": "{{ run_id }}", "try_number": "{{ ti.try_number }}",
            "text": TEXT}


def build_notifier(notify: NotifySpec) -> Any:
    """The notifier instance for ``on_failure_callback``."""
    if notify.kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        return SmtpNotifier(to=list(notify.to), smtp_conn_id=notify.connection_id, subject=SUBJECT,
                            html_content=HTML)
    from airflow.providers.http.notifications.http import HttpNotifier

    return HttpNotifier(http_conn_id=notify.connection_id, endpoint=notify.endpoint, method="POST",
                        json=failure_payload(), headers={"Content-Type": "application/json"})
