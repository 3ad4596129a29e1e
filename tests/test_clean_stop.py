"""A broker stopped cleanly leaves no socket file and no lock file behind;
one that crashed leaves them, and the next start recovers. The lock file
is unlinked while it is still held, and a starter that locked a file
unlinked meanwhile tries again (see corral.broker.lockfile)."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import pytest
from conftest import Env, broker_processes, wait_for

from corral.broker.lockfile import StateDirBusy, StateDirLock

EVENTS = 'events_endpoint = "ipc://{home}/state/events.sock"'


def leftovers(env: Env) -> list[str]:
    """Socket and lock files in the home and state directories."""
    state = env.home / "state"
    found = [*env.home.glob("*.sock"), *state.glob("*.sock"), *state.glob("*.lock")]
    return sorted(str(path.relative_to(env.home)) for path in found)


@pytest.mark.parametrize(
    ("command", "sig"),
    [("broker", signal.SIGTERM), ("broker", signal.SIGINT), ("run", signal.SIGTERM)],
)
def test_a_clean_stop_leaves_no_socket_or_lock_file(env: Env, command: str, sig: int) -> None:
    env.write_config(processes=1, extra_broker=EVENTS.format(home=env.home))
    daemon = env.start(command)
    env.wait_ready(daemon)
    assert leftovers(env) == ["c.sock", "state/broker.lock", "state/events.sock", "w.sock"]
    job_id = env.client().enqueue("e2e.square", 3, queue="nobody")
    if command == "run":
        (broker,) = broker_processes(daemon)
    daemon.signal(sig)
    assert daemon.wait(60) == 0, daemon.output()
    if command == "run":
        wait_for(lambda: not broker.is_running(), 30, message="the broker child to exit")
    assert leftovers(env) == []
    again = env.start(command)  # a restart works, and kept the job
    env.wait_ready(again)
    assert env.client().job(job_id).status == "queued"


def test_a_crashed_broker_leaves_its_files_and_the_next_start_recovers(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    job_id = env.client().enqueue("e2e.square", 3, queue="nobody")
    broker.signal(signal.SIGKILL)
    broker.wait(30)
    assert leftovers(env) == ["c.sock", "state/broker.lock", "w.sock"]
    again = env.start("broker")
    env.wait_ready(again)
    assert env.client().job(job_id).status == "queued"


def test_the_lock_file_goes_with_its_release_and_busy_names_the_holder(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    first.acquire()
    with pytest.raises(StateDirBusy) as refused:
        StateDirLock(tmp_path, owner="corral log verify").acquire()
    assert refused.value.pid == str(os.getpid())
    first.release()
    assert not (tmp_path / "broker.lock").exists()
    second = StateDirLock(tmp_path)
    second.acquire()
    second.release()


def test_a_starter_that_locked_a_file_unlinked_meanwhile_takes_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of an unlinked lock file: the starter opens the file, the
    holder unlinks it and lets go, the starter's flock succeeds on the
    unlinked file. It must see that and lock the file at the path, as any
    other starter would, so two never both hold the state directory."""
    holder = StateDirLock(tmp_path)
    holder.acquire()
    real_flock = fcntl.flock

    def flock_after_the_holder_left(fd: int, operation: int) -> None:
        if holder._fd is not None:
            holder.release()  # between the starter's open and its flock
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    starter = StateDirLock(tmp_path)
    starter.acquire()
    monkeypatch.undo()
    try:
        assert starter._fd is not None
        held, at_path = os.fstat(starter._fd), (tmp_path / "broker.lock").stat()
        assert (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
        with pytest.raises(StateDirBusy):  # and a third starter is refused
            StateDirLock(tmp_path).acquire()
    finally:
        starter.release()
