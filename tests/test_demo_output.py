"""`make demo` prints a short, clean summary (issue #21, item 5): no access-log lines from the S3 emulator, a
line per task as `airflow dags test` finishes it, and no ANSI codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from synthfactory.testing import dev

ROOT = Path(__file__).resolve().parents[1]

LOG = """\
2026-12-06T02:04:29.697125Z [info     ] [DAG TEST] running task <TaskInstance: synthfactory_cohort_demo.ingest \
manual__2026-12-06T02:04:29.522687+00:00 [TaskInstanceState.SCHEDULED] ti_id=01a2> [airflow.sdk.definitions.dag]
2026-12-06T02:04:34.333910Z [info     ] Task instance state updated    [airflow.api_fastapi.execution_api] \
loc=task_instances.py:254 rows_affected=1 ti_id=01a2
2026-12-06T02:04:34.401000Z [info     ] stage=ingest dataset=cohort_demo run=manual start [synthfactory.pipeline]
2026-12-06T02:04:35.085915Z [info     ] \x1b[32mTask instance state updated\x1b[0m    [airflow.api_fastapi] \
loc=task_instances.py:485 new_state=success rows_affected=1 ti_id=01a2
2026-12-06T02:04:35.511882Z [info     ] [DAG TEST] running task <TaskInstance: synthfactory_cohort_demo.approve \
manual__2026-12-06T02:04:29.522687+00:00 [TaskInstanceState.SCHEDULED] ti_id=01a3> [airflow.sdk.definitions.dag]
2026-12-06T02:04:36.085915Z [info     ] Task instance state updated    loc=task_instances.py:485 \
new_state=awaiting_input rows_affected=1
"""


def test_a_line_per_finished_task():
    lines: list[str] = []
    progress = dev.TaskProgress(lines.append)
    for line in LOG.splitlines(keepends=True):
        progress(line)
    assert [ln.split()[:2] for ln in lines] == [["ingest", "success"], ["approve", "awaiting_input"]]
    assert progress.finished == [("ingest", "success"), ("approve", "awaiting_input")]
    assert not any("\x1b" in ln for ln in lines) and all(ln.startswith("      ") for ln in lines)


def test_the_s3_emulator_prints_no_access_log():
    """A subprocess, as the demo runs it (werkzeug adds its own stderr handler when none is configured)."""
    code = ("from synthfactory.testing import dev\n"
            "with dev.S3Emulator() as s3:\n"
            "    c = s3.client(); c.create_bucket(Bucket='bkt'); c.put_object(Bucket='bkt', Key='k', Body=b'x')\n"
            "    c.get_object(Bucket='bkt', Key='k'); print('done')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**dev.os.environ, "PYTHONPATH": str(ROOT / "include")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "done"
    assert "HTTP/1.1" not in res.stderr and "\x1b[" not in res.stderr, res.stderr[-2000:]


def test_the_demo_prints_progress_and_the_data_card():
    text = (ROOT / "scripts" / "demo.py").read_text()
    assert "on_line=dev.TaskProgress(" in text and "data card:" in text
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Example output (a fresh clone, `make demo`):")
    example = readme[start:readme.index("```", readme.index("```", start) + 3)]
    assert "data card: " in example and re.search(r"\n\s+ingest\s+success", example)
    assert "HTTP/1.1" not in example and "\x1b" not in example
