"""`corral log verify|repair|compact` on real state directories: they take
the state directory's lock (so never run beside a live broker), and repair
keeps every valid record, says which jobs it lost, and prints lines a
person can read (or JSON)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import Env

import corral

SMALL_LOG = 'segment_size = "1MiB"\ndisk_reserve = "16KiB"\nmax_message_size = "512KiB"'


def _segment_bytes(env: Env) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (env.home / "state" / "log").glob("*.seg")}


def _frame_holding(data: bytes, needle: bytes) -> int:
    """The offset of the frame whose bytes hold ``needle``."""
    pos = 32
    while pos + 9 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:
            break
        if needle in data[pos : pos + 8 + length]:
            return pos
        pos += 8 + length
    raise AssertionError(f"no frame holds {needle!r}")


def _damage_frame_of(env: Env, job_id: str) -> tuple[Path, int]:
    """Flip a bit of the checksum of the frame that holds ``job_id`` in the
    log's one segment (the broker stopped); returns the segment and the
    frame's offset."""
    (segment,) = sorted((env.home / "state" / "log").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    start = _frame_holding(bytes(data), job_id.encode())
    data[start + 5] ^= 0x10  # its checksum
    segment.write_bytes(bytes(data))
    return segment, start


def test_log_tools_refuse_to_run_beside_a_live_broker(env: Env) -> None:
    env.write_config(extra_broker=SMALL_LOG)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = [client.enqueue("e2e.square", n) for n in range(5)]
    cfg = ["-c", str(env.config)]
    before = _segment_bytes(env)
    for action in ("verify", "repair", "compact"):
        done = env.run("log", action, *cfg)
        assert done.returncode == 2, (action, done.stdout, done.stderr)
        assert f"pid {broker.pid}" in done.stderr, done.stderr
        assert "broker.lock" in done.stderr and "stop the broker" in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""
    assert _segment_bytes(env) == before
    assert client.job(ids[0]).status == "queued"  # the broker never noticed

    broker.signal(15)
    assert broker.wait(30) == 0
    for action in ("verify", "repair"):
        done = env.run("log", action, *cfg)
        assert done.returncode == 0, (action, done.stderr)


def test_log_repair_names_the_lost_job_and_keeps_the_rest(env: Env) -> None:
    env.write_config(extra_broker=SMALL_LOG)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = [client.enqueue("e2e.square", n) for n in range(20)]
    broker.signal(15)
    assert broker.wait(30) == 0
    cfg = ["-c", str(env.config)]
    log_dir = env.home / "state" / "log"
    segment, start = _damage_frame_of(env, ids[9])

    done = env.run("log", "verify", "--json", *cfg)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["lost_jobs"] == [ids[9]]
    assert report["corrupt"][:2] == [str(segment), start]

    done = env.run("log", "verify", *cfg)
    assert done.returncode == 1
    assert f"{segment.name} offset {start}" in done.stdout and ids[9] in done.stdout

    done = env.run("log", "repair", *cfg)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{log_dir}: repaired")
    assert any(line.startswith("lost jobs") and ids[9] in line for line in lines), done.stdout
    assert not any(line.lstrip().startswith(("{", "RepairReport(")) for line in lines)
    (backup,) = log_dir.glob("repair-*")
    assert str(backup) in done.stdout
    assert json.loads((backup / "repair.json").read_text())["lost_jobs"] == [ids[9]]

    done = env.run("log", "repair", "--json", *cfg)
    assert json.loads(done.stdout)["action"] == "none"

    broker = env.start("broker", name="broker-after-repair")
    env.wait_ready(broker)
    client = env.client()
    for job_id in ids[:9] + ids[10:]:
        assert client.job(job_id).status == "queued"
    with pytest.raises(corral.JobNotFound):
        client.job(ids[9])


def test_log_tools_name_a_missing_log(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for action in ("verify", "repair"):
        done = env.run("log", action, "--state-dir", str(missing), "-c", str(env.config))
        assert done.returncode == 2
        assert str(missing / "log") in done.stderr and "Traceback" not in done.stderr
    assert not missing.exists()  # a check never creates the state directory


def test_log_tools_sum_up_a_long_list_of_lost_jobs_for_a_person(env: Env) -> None:
    """A damaged batch loses hundreds of jobs: the human output names a few
    and counts the rest, on a line a person can read; ``--json`` (and the
    backup's repair.json) lists every one."""
    env.write_config(extra_broker=SMALL_LOG)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = client.enqueue_many([corral.Job("e2e.square", n) for n in range(300)])
    broker.signal(15)
    assert broker.wait(30) == 0
    cfg = ["-c", str(env.config)]
    log_dir = env.home / "state" / "log"
    _damage_frame_of(env, ids[150])

    for action, all_in in (("verify", "verify --json"), ("repair", "repair.json")):
        done = env.run("log", action, *cfg)
        (line,) = [line for line in done.stdout.splitlines() if line.startswith("lost jobs")]
        assert len(line) < 1000, line
        assert "300 jobs" in line and ids[0] in line and "and 290 more" in line, line
        assert f"{all_in}` lists them all" in line or f"{all_in} lists them all" in line, line
    (backup,) = log_dir.glob("repair-*")
    assert sorted(json.loads((backup / "repair.json").read_text())["lost_jobs"]) == sorted(ids)
