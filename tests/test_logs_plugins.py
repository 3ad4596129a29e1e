"""Structured logs carry role, pid and the job; plugins also come from the
``corral.tasks`` entry-point group."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Env, json_events, wait_for

import corral
from corral.workers.registry import load_plugins


def test_every_line_has_role_and_pid_and_job_lines_have_the_job(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    job_id = client.enqueue("e2e.chatty", "hi")
    assert client.result(job_id, timeout=30) == "hi"
    wait_for(lambda: "chatty.plain" in daemon.output(), 10, message="the job's log lines")
    worker_pid = client.job(job_id).tries[0].pid
    # Stop the daemon, so its output is complete: every line of it, from
    # every process, start to exit, must be a JSON object (a traceback or a
    # stray print would not be).
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    lines = json_events(daemon.output())
    assert lines and all("role" in line and "pid" in line for line in lines)
    assert {line["role"] for line in lines} >= {"broker", "supervisor", "worker"}
    for event in ("chatty.bound", "chatty.plain"):
        line = next(x for x in lines if x["event"] == event)
        assert line["job_id"] == job_id
        assert line["task"] == "e2e.chatty"
        assert line["attempt"] == 1
        assert line["role"] == "worker"
        assert line["pid"] == worker_pid


@pytest.mark.parametrize("jobs", ["info", "off"])
def test_a_worker_logs_a_line_per_job_received_and_ended_with_its_duration(
    env: Env, jobs: str
) -> None:
    env.config.write_text(
        env.config.read_text().replace('format = "json"', f'format = "json"\njobs = "{jobs}"')
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    ok = client.enqueue("e2e.square", 4)
    bad = client.enqueue("e2e.order", {"item": 1}, max_attempts=1)
    assert client.result(ok, timeout=30) == 16
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    lines = [x for x in json_events(daemon.output()) if x["event"].startswith("job.")]
    if jobs == "off":
        assert lines == []
        return
    by = {(x["event"], x["job_id"]): x for x in lines}
    for job_id, task in ((ok, "e2e.square"), (bad, "e2e.order")):
        received = by["job.received", job_id]
        assert (received["task"], received["attempt"], received["level"]) == (task, 1, "info")
    succeeded = by["job.succeeded", ok]
    assert succeeded["level"] == "info" and 0 <= succeeded["seconds"] < 30
    failed = by["job.failed", bad]  # a payload the task refuses: failed, no retry
    assert failed["level"] == "warning" and failed["error"].startswith("ValidationError")


#: Logs ``lines`` JSON lines to stderr through corral's logging set-up.
CHATTER = """
import sys
import structlog
from corral.logs import configure
configure("chatter", fmt="json")
log = structlog.get_logger()
for i in range(int(sys.argv[1])):
    log.info("chatter.line", i=i)
"""


def test_lines_of_processes_sharing_one_output_never_interleave(tmp_path: Path) -> None:
    """The daemon's processes share one stderr: each line must reach it in
    one write, or a line of one process lands inside a line of another."""
    out = tmp_path / "shared.log"
    lines, writers = 3000, 4
    with out.open("ab") as shared:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHATTER, str(lines)], stdout=shared, stderr=shared
            )
            for _ in range(writers)
        ]
        for proc in procs:
            assert proc.wait(60) == 0
    events = json_events(out.read_text())
    assert len(events) == lines * writers
    per_pid = {e["pid"] for e in events}
    assert len(per_pid) == writers


def test_plugins_from_the_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "ep_tasks_mod.py"
    module.write_text(
        "import corral\n\n"
        "@corral.task(name='ep.hello')\n"
        "def hello(ctx: corral.JobContext) -> str:\n"
        "    return 'hi'\n"
    )
    dist = tmp_path / "ep_tasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[corral.tasks]\nhello = ep_tasks_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ep_tasks_mod", raising=False)
    registry = load_plugins([])
    assert "ep.hello" in registry.names()
    assert "ep.hello" not in load_plugins([], entry_point_group=False).names()
