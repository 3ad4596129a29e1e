"""Disk full and I/O errors (issue 12, fault 6), on real broker processes.

- A full disk (a real small tmpfs) under a backlog that workers are
  draining: enqueues get a clear ``DiskFull`` error, the workers' results
  still go into the log's reserve, the broker never exits, nothing
  acknowledged is lost across a kill -9, and enqueues are accepted again
  once space returns.
- An fsync error ends the broker with exit code 70 (never a retried fsync:
  fsyncgate), and the restart recovers every acknowledged job. The error
  comes from a small ``LD_PRELOAD`` library built here with the system's C
  compiler, which makes ``fsync``/``fdatasync`` fail with EIO while a
  trigger file exists (skipped, saying so, where no compiler is found).

Covered elsewhere and not repeated: enqueues refused on a full disk and none
lost across a kill -9 (tests/test_hostile.py); compactions that find the
disk full, retried while the broker serves on, as a process and in-process;
schedule fires and follow-ups held on a full disk (tests/test_disk_full.py).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Env, fill_disk, wait_for

import corral

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *trigger = getenv("CORRAL_TEST_FSYNC_FAILS");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"""


def build_shim(where: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fsync-failing LD_PRELOAD library")
    source, lib = where / "failfsync.c", where / "failfsync.so"
    source.write_text(SHIM)
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(lib), str(source), "-ldl"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot build the fsync-failing library: {done.stderr.strip()}")
    return lib


def test_an_fsync_error_ends_the_broker_with_exit_70_and_the_restart_recovers(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = build_shim(tmp_path)
    trigger = env.home / "fail-fsync"
    monkeypatch.setenv("LD_PRELOAD", str(lib))
    monkeypatch.setenv("CORRAL_TEST_FSYNC_FAILS", str(trigger))
    broker = env.start("broker")
    monkeypatch.delenv("LD_PRELOAD")  # only the broker fails its fsyncs
    env.wait_ready(broker)
    client = env.client(timeout=3.0)
    acked = [client.enqueue("e2e.square", n) for n in range(20)]

    trigger.touch()
    with pytest.raises(corral.CorralError):  # no acknowledgement: the broker is gone
        client.enqueue("e2e.square", 99)
    assert broker.wait(30) == 70
    out = broker.output()
    assert "broker.fsync_failed" in out and "Input/output error" in out

    trigger.unlink()
    broker = env.start("broker", name="broker-after")
    env.wait_ready(broker)
    client = env.client()
    assert [client.job(i).status for i in acked] == ["queued"] * len(acked)
    assert client.enqueue("e2e.square", 100)  # and it serves


def test_a_full_disk_under_a_backlog_refuses_enqueues_drains_and_resumes(
    env: Env, tmpfs: object
) -> None:
    fs = tmpfs("4m")  # type: ignore[operator]
    env.write_config(
        state_dir=f"{fs}/state",
        processes=1,
        extra_broker='segment_size = "512KiB"\ndisk_reserve = "128KiB"\n'
        'max_message_size = "128KiB"\ncompact_min_size = "64MiB"',
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    backlog = client.enqueue_many([corral.Job("e2e.noop", n) for n in range(300)])
    filler = fill_disk(fs, leave=0)
    acked: list[str] = []
    with pytest.raises(corral.DiskFull) as info:
        for _ in range(5000):  # into the segment's room, then refused
            acked.append(client.enqueue("e2e.noop", "y" * 2000))
    message = str(info.value)
    assert "disk is full" in message and "free space" in message

    env.start("supervisor")  # the backlog drains into the reserve
    wait_for(
        lambda: client.status().queues["default"].get("succeeded", 0) >= len(backlog),
        60,
        message="the backlog to drain on a full disk",
    )
    assert broker.alive()
    with pytest.raises(corral.DiskFull):
        client.enqueue("e2e.noop", 1)

    broker.signal(signal.SIGKILL)
    assert broker.wait(10) == -signal.SIGKILL
    broker = env.start("broker", name="broker-full")
    env.wait_ready(broker)
    client = env.client()
    statuses = {i: client.job(i).status for i in backlog + acked}
    assert set(statuses.values()) <= {"queued", "running", "succeeded"}, statuses

    filler.unlink()

    def accepted() -> bool:
        try:
            client.enqueue("e2e.noop", "after")
        except corral.DiskFull:
            return False
        return True

    wait_for(accepted, 30, interval=0.2, message="enqueues to be accepted again")
    assert broker.alive()
