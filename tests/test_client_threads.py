"""One ``corral.Client`` shared by threads, and a client that survives a fork:
a real ``corral run`` daemon (or ``corral broker``), real threads, real
``os.fork`` and ``multiprocessing`` children. Every child is waited for
against a deadline and killed in teardown; a child never returns into
pytest (it ends with ``os._exit``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Env, wait_for

import corral

THREADS = 8
#: Jobs per thread: 1,000 in the soak profile, 250 in the fast suite (8,000
#: jobs cost the suite 5 s of CPU; 2,000 interleave the threads as well).
ROUND_TRIPS = {"fast": 250, "soak": 1_000}
#: Seconds any child or thread may take before the test gives up on it.
DEADLINE = 60.0

# Exit codes of a forked child.
OK, WRONG, UNAVAILABLE, CRASHED = 0, 1, 3, 70


# ------------------------------------------------------------ helpers


class Children:
    """Forked children: each runs a function and exits with its code; each
    is waited for against a deadline, and killed in teardown if alive."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, body: Callable[[], int]) -> int:
        with warnings.catch_warnings():  # 3.12+ warns on a fork with threads alive
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never back into pytest
            code = CRASHED
            try:
                code = body()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        self.pids.append(pid)
        return pid

    def exit_code(self, pid: int, timeout: float = DEADLINE) -> int:
        """The child's exit code, once it has exited (fails after ``timeout``)."""
        status: list[int] = []

        def exited() -> bool:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(raw)
                self.pids.remove(pid)
            return bool(done)

        wait_for(exited, timeout, message=f"forked child {pid} to exit")
        return os.waitstatus_to_exitcode(status[0])

    def kill_all(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    forked = Children()
    try:
        yield forked
    finally:
        forked.kill_all()


def start_daemon(env: Env) -> None:
    """``corral run`` with two worker processes of four threads each; the
    log is not fsync'd (these tests are about the client, not durability)."""
    env.write_config(fsync="never", processes=2, concurrency=4, prefetch=8)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)


def round_trip(client: corral.Client, n: int) -> int:
    """Enqueue ``e2e.square(n)`` and wait for its result."""
    result: int = client.result(client.enqueue("e2e.square", n), timeout=30)
    return result


def run_threads(count: int, body: Callable[[int], None]) -> list[str]:
    """Run ``body(index)`` on ``count`` threads started together; returns
    the errors they raised, as text (fails if one is still running after
    DEADLINE seconds)."""
    errors: list[str] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            start.wait(DEADLINE)
            body(index)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    running = [thread.name for thread in threads if thread.is_alive()]
    assert not running, f"threads still running after {DEADLINE}s: {running}"
    return errors


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------ threads
#
# Each runs its threads in a forked child: a client that breaks under threads
# can abort its process (libzmq asserts), and it must not take pytest, and
# the teardown that kills the daemon, with it.


def in_a_child(children: Children, body: Callable[[], list[str]]) -> None:
    """Run ``body`` in a forked child; fail with the errors it returns, or
    with its exit status if it died."""

    def child() -> int:
        errors = body()
        for error in errors:
            print(error, file=sys.stderr)
        return WRONG if errors else OK

    code = children.exit_code(children.fork(child), timeout=DEADLINE + 30)
    assert code == OK, f"the child exited with {code}; its errors are on stderr"


@pytest.mark.parametrize("profile", ["fast", pytest.param("soak", marks=pytest.mark.soak)])
def test_eight_threads_share_one_client(env: Env, children: Children, profile: str) -> None:
    """8 threads x 1,000 jobs (250 in the fast profile) on ONE client: each
    thread enqueues its jobs (a round trip each), then gets their results (a
    round trip each), every one right. (Getting each result right after its
    enqueue would take twice as long: a long poll per job, woken as it
    finishes.)"""
    round_trips = ROUND_TRIPS[profile]
    start_daemon(env)

    def body() -> list[str]:
        client = corral.Client(env.endpoint, timeout=10)

        def work(index: int) -> None:
            numbers = range(index * round_trips, (index + 1) * round_trips)
            ids = [client.enqueue("e2e.square", n) for n in numbers]
            for n, job_id in zip(numbers, ids, strict=True):
                value = client.result(job_id, timeout=30)
                assert value == n * n, f"job {n}: {value!r}"

        errors = run_threads(THREADS, work)
        succeeded = client.status().queues["default"]["succeeded"]
        if succeeded != THREADS * round_trips:
            errors.append(f"{succeeded} jobs succeeded, not {THREADS * round_trips}")
        return errors

    in_a_child(children, body)


def test_close_from_another_thread_while_threads_use_the_client(
    env: Env, children: Children
) -> None:
    """``close()`` while other threads are mid-request neither crashes nor
    fails their requests; the client goes on working afterwards."""
    start_daemon(env)

    def body() -> list[str]:
        client = corral.Client(env.endpoint, timeout=10)
        stop = threading.Event()

        def work(index: int) -> None:
            if index == 0:
                for _ in range(200):
                    client.close()
                stop.set()
                return
            while not stop.is_set():
                client.ping()

        errors = run_threads(4, work)
        if round_trip(client, 7) != 49:
            errors.append("a wrong result after close()")
        return errors

    in_a_child(children, body)


def test_a_burst_of_threads_leaves_few_sockets_open(env: Env, children: Children) -> None:
    """Sockets opened for a burst of threads are closed when they are done,
    down to a small pool, and close() closes the rest."""
    start_daemon(env)

    def body() -> list[str]:
        client = corral.Client(env.endpoint, timeout=10)
        client.ping()
        before = open_fds()
        errors = run_threads(64, lambda index: client.ping())
        # Each socket holds two descriptors (its connection and its
        # mailbox; libzmq's reaper closes them soon after close()): at
        # most the pool's few are left, not 64.
        kept = 2 * corral.Client.max_idle_sockets
        wait_for(lambda: open_fds() - before <= kept, 10, message="the extra sockets to close")
        client.close()
        wait_for(lambda: open_fds() < before, 10, message="close() to close the sockets")
        return errors

    in_a_child(children, body)


# ------------------------------------------------------------ fork


def child_round_trip(client: corral.Client, n: int) -> int:
    """The body of a forked child: one enqueue + result on the inherited client."""
    try:
        value = round_trip(client, n)
    except corral.BrokerUnavailable:
        traceback.print_exc()
        return UNAVAILABLE
    return OK if value == n * n else WRONG


def test_a_forked_child_uses_the_client_its_parent_used(env: Env, children: Children) -> None:
    """Fork after use (gunicorn --preload): the child enqueues and gets its
    result within its timeout, and the parent keeps working."""
    start_daemon(env)
    client = env.client(timeout=3)
    assert round_trip(client, 2) == 4
    pid = children.fork(lambda: child_round_trip(client, 3))
    assert round_trip(client, 4) == 16  # while the child runs
    assert children.exit_code(pid) == OK
    assert round_trip(client, 5) == 25


def test_children_forked_while_threads_use_the_client(env: Env, children: Children) -> None:
    """A fork while other threads are mid-request (a socket in use, the
    pool's lock perhaps held): each child still gets its result, and the
    parent's threads never see an error."""
    start_daemon(env)
    client = env.client(timeout=3)
    stop = threading.Event()
    codes: list[int] = []

    def work(index: int) -> None:
        if index == 0:
            try:
                for n in range(5):
                    pid = children.fork(lambda n=n: child_round_trip(client, n))
                    codes.append(children.exit_code(pid))
            finally:
                stop.set()
            return
        n = 0
        while not stop.is_set():
            n += 1
            assert round_trip(client, n) == n * n

    errors = run_threads(4, work)
    assert not errors, errors[0]
    assert codes == [OK] * 5


def _multiprocessing_child(client: corral.Client, n: int, path: str) -> None:
    value = round_trip(client, n)
    Path(path).write_text(json.dumps(value))


def test_a_multiprocessing_fork_child_uses_the_client(env: Env) -> None:
    """The same through multiprocessing's fork start method."""
    start_daemon(env)
    client = env.client(timeout=3)
    assert round_trip(client, 6) == 36
    out = env.home / "child.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        process = multiprocessing.get_context("fork").Process(
            target=_multiprocessing_child, args=(client, 9, str(out))
        )
        process.start()
    try:
        process.join(DEADLINE)
        assert process.exitcode == 0, f"the child exited with {process.exitcode}"
        assert json.loads(out.read_text()) == 81
    finally:
        if process.is_alive():
            process.kill()
            process.join(10)
    assert round_trip(client, 8) == 64


def test_a_child_whose_broker_is_gone_raises_within_its_timeout(
    env: Env, children: Children
) -> None:
    """A child forked after use, its broker gone: BrokerUnavailable within
    its timeout, never a hang."""
    env.write_config(fsync="never")
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=1)
    client.ping()
    broker.signal(signal.SIGKILL)
    broker.wait(10)

    def child() -> int:
        try:
            client.enqueue("e2e.square", 1)
        except corral.BrokerUnavailable:
            return OK
        return WRONG

    pid = children.fork(child)
    assert children.exit_code(pid, timeout=30) == OK
    with pytest.raises(corral.BrokerUnavailable):
        client.ping()


def test_an_async_client_survives_a_fork(env: Env, children: Children) -> None:
    """An AsyncClient used in the parent's event loop works in a forked
    child's own loop, and in the parent's next one."""
    start_daemon(env)
    client = corral.AsyncClient(env.endpoint, timeout=3)

    async def use(n: int) -> int:
        value: int = await client.result(await client.enqueue("e2e.square", n), timeout=30)
        return value

    try:
        assert asyncio.run(use(2)) == 4
        pid = children.fork(lambda: OK if asyncio.run(use(3)) == 9 else WRONG)
        assert children.exit_code(pid) == OK
        assert asyncio.run(use(4)) == 16
    finally:
        client.close()


def test_an_async_client_forked_beside_an_open_loop(env: Env, children: Children) -> None:
    """A fork while the parent's event loop is still open, and a child that
    closes the client first (as a post-fork hook would): the child never
    unregisters the parent's socket from that loop's epoll (which the two
    processes share), so the parent's next request on it, one that is
    never resent, is answered."""
    start_daemon(env)
    client = corral.AsyncClient(env.endpoint, timeout=3)

    async def use(n: int) -> int:
        value: int = await client.result(await client.enqueue("e2e.square", n), timeout=30)
        return value

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(use(2)) == 4

        def child() -> int:
            client.close()
            gc.collect()
            value = asyncio.run(use(3))
            return OK if value == 9 else WRONG

        pid = children.fork(child)
        assert children.exit_code(pid) == OK
        loop.run_until_complete(client.pause("elsewhere"))  # sent once: no resend hides a loss
        loop.run_until_complete(client.resume("elsewhere"))
        assert loop.run_until_complete(use(4)) == 16
    finally:
        client.close()
        loop.close()
