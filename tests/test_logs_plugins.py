"""Structured logs carry role, pid and the job; plugins also come from the
``corral.tasks`` entry-point group."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Env, json_events, wait_for

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
