"""Tasks the end-to-end tests run in real worker processes."""

from __future__ import annotations

import os
import signal
import time

import msgspec

import corral


class Order(msgspec.Struct):
    item: str
    qty: int


@corral.task(name="e2e.square")
def square(ctx: corral.JobContext, n: int) -> int:
    return n * n


@corral.task(name="e2e.sleep")
def sleep(ctx: corral.JobContext, seconds: float) -> dict[str, object]:
    time.sleep(seconds)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@corral.task(name="e2e.spin")
def spin(ctx: corral.JobContext, seconds: float) -> int:
    """Pure-Python CPU work holding the GIL in a tight loop."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return ctx.attempt


@corral.task(name="e2e.order")
def order(ctx: corral.JobContext, o: Order) -> str:
    return f"{o.qty}x{o.item}"


@corral.task(name="e2e.noop")
def noop(ctx: corral.JobContext, payload: object = None) -> None:
    return None


@corral.task(name="e2e.flaky", max_attempts=3, retry_backoff=0.05)
def flaky(ctx: corral.JobContext, succeed_on: int) -> int:
    if ctx.attempt < succeed_on:
        raise ValueError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


_hoard: list[bytearray] = []


@corral.task(name="e2e.hog")
def hog(ctx: corral.JobContext, mib: int) -> int:
    """Keep ``mib`` MiB alive after the job: the process grows."""
    block = bytearray(mib * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    _hoard.append(block)
    return os.getpid()


@corral.task(name="e2e.crash", max_attempts=3)
def crash(ctx: corral.JobContext, code: int) -> None:
    """Ends its own process every time: a poison job."""
    os._exit(code)


@corral.task(name="e2e.sigkill", max_attempts=3)
def sigkill(ctx: corral.JobContext, payload: object = None) -> None:
    """Sends its own process SIGKILL every time: a poison job."""
    os.kill(os.getpid(), signal.SIGKILL)


@corral.task(name="e2e.soft", soft_timeout=0.3, timeout=5)
def soft(ctx: corral.JobContext, seconds: float) -> str:
    try:
        time.sleep(seconds)
    except corral.SoftTimeout:
        return "cleaned up"
    return "finished"


@corral.task(name="e2e.pid")
def pid(ctx: corral.JobContext, payload: object = None) -> int:
    return os.getpid()


@corral.task(name="e2e.async_nap")
async def async_nap(ctx: corral.JobContext, seconds: float) -> list[float]:
    import asyncio

    start = time.time()
    await asyncio.sleep(seconds)
    return [start, time.time()]


@corral.task(name="e2e.chatty")
def chatty(ctx: corral.JobContext, word: str) -> str:
    import structlog

    ctx.log.info("chatty.bound", word=word)
    structlog.get_logger().info("chatty.plain", word=word)  # contextvars carry the job
    return word


@corral.task(name="e2e.until_cancelled")
def until_cancelled(ctx: corral.JobContext, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            return "saw the cancel"
        time.sleep(0.01)
    return "never cancelled"


@corral.task(name="e2e.progress")
def progress(ctx: corral.JobContext, path: str) -> str:
    """Reports half way, then runs until the file ``path`` exists (at most
    a minute)."""
    ctx.progress(0.5, "half way")
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"


@corral.task(name="e2e.release", max_attempts=2)
def release(ctx: corral.JobContext, times: int) -> int:
    """Asks to be retried ``times`` times without counting a failure (the
    run number tells how many it asked for); returns that count."""
    if ctx.attempt <= times:
        raise corral.Retry(delay=0.05)
    return ctx.attempt - 1


@corral.task(name="e2e.give_up", max_attempts=5)
def give_up(ctx: corral.JobContext, reason: str) -> None:
    raise corral.Fail(reason)


@corral.task(name="e2e.stamp")
def stamp(ctx: corral.JobContext, label: str) -> list[object]:
    return [label, time.time()]


@corral.task(name="e2e.chain_step")
def chain_step(ctx: corral.JobContext, n: int) -> int:
    return (ctx.prev_result or 0) + n


@corral.task(name="e2e.slow_step")
def slow_step(ctx: corral.JobContext, n: int) -> int:
    time.sleep(0.4)
    return (ctx.prev_result or 0) + n


@corral.task(name="e2e.sum_prev")
def sum_prev(ctx: corral.JobContext, extra: int) -> int:
    results: list[int] = ctx.prev_result
    return sum(results) + extra


@corral.task(name="e2e.echo_prev")
def echo_prev(ctx: corral.JobContext, payload: object = None) -> object:
    return ctx.prev_result


@corral.task(name="e2e.gate")
def gate(ctx: corral.JobContext, path: str) -> dict[str, object]:
    """Runs until the file ``path`` exists (at most a minute), so a test
    decides when the job ends."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@corral.task(name="e2e.mark")
def mark(ctx: corral.JobContext, path: str) -> str:
    """Appends a line to the file ``path``: the job's id, whether it saw
    itself cancelled, and the time it ran (epoch seconds)."""
    with open(path, "a") as file:
        file.write(f"{ctx.job_id} cancelled={ctx.cancelled} at={time.time()}\n")
    return ctx.job_id


@corral.task(name="e2e.amark")
async def amark(ctx: corral.JobContext, path: str) -> str:
    """As e2e.mark, in a coroutine: one line a run (the job's id)."""
    with open(path, "a") as file:
        file.write(f"{ctx.job_id} attempt={ctx.attempt}\n")
    return ctx.job_id


@corral.task(name="e2e.big_result")
def big_result(ctx: corral.JobContext, mib: int) -> str:
    """A result of ``mib`` MiB: over max_message_size when large enough."""
    return "x" * (mib * 2**20)


@corral.task(name="e2e.odd_error", max_attempts=2, retry_backoff=0.05)
def odd_error(ctx: corral.JobContext, payload: object = None) -> None:
    """Raises an error whose text is not valid UTF-8 (a file name from odd bytes)."""
    raise FileNotFoundError(os.fsdecode(b"report-\xe9t\xe9.csv"))


@corral.task(name="e2e.always_retry", max_retries=3, retry_backoff=0.05)
def always_retry(ctx: corral.JobContext, path: str) -> None:
    """Asks for a retry on every run, noting its run number in ``path``."""
    with open(path, "a") as file:
        file.write(f"{ctx.attempt}\n")
    raise corral.Retry()


@corral.task(name="e2e.stubborn")
def stubborn(ctx: corral.JobContext, gate: str) -> dict[str, object]:
    """Runs until the file ``gate`` exists, cancelled or not (a handler that
    ignores ctx.cancelled); then appends "<run> <pid> <saw cancel>" to
    ``gate``.log."""
    saw = False
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        saw = saw or ctx.cancelled
        time.sleep(0.01)
    saw = saw or ctx.cancelled
    with open(gate + ".log", "a") as file:
        file.write(f"{ctx.attempt} {os.getpid()} {saw}\n")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@corral.task(name="e2e.email", queue="emails", max_attempts=7, result_ttl=3600)
def email(ctx: corral.JobContext, to: str) -> str:
    """A task of its own queue, as in the README's example."""
    return f"sent to {to} from {ctx.queue}"


class Spawn(msgspec.Struct):
    """What e2e.subprocess starts (``sleep seconds``), where it writes the
    sleep's pid, and what it does then: "hang", "crash" or "wait"."""

    path: str
    then: str
    seconds: float


@corral.task(name="e2e.subprocess")
def run_subprocess(ctx: corral.JobContext, spawn: Spawn) -> int:
    """Starts ``sleep`` and writes its pid to the file ``spawn.path``; then,
    as ``spawn.then`` says: "hang" sleeps as long (past any timeout),
    "crash" ends its own process at once (os._exit(3)), "wait" waits for the
    sleep and returns its exit code (negative: the signal that ended it)."""
    import subprocess

    child = subprocess.Popen(["sleep", f"{spawn.seconds:g}"])
    with open(spawn.path + ".tmp", "w") as file:
        file.write(str(child.pid))
    os.replace(spawn.path + ".tmp", spawn.path)
    if spawn.then == "crash":
        os._exit(3)
    if spawn.then == "hang":
        time.sleep(spawn.seconds)
    return child.wait()


class Nap(msgspec.Struct):
    seconds: float
    path: str


@corral.task(name="e2e.nap_then_note")
def nap_then_note(ctx: corral.JobContext, nap: Nap) -> int:
    """Sleeps ``seconds``, then writes its pid to the file ``path``: the file
    shows the handler ran to its end."""
    time.sleep(nap.seconds)
    with open(nap.path, "w") as file:
        file.write(str(os.getpid()))
    return os.getpid()


class Power(msgspec.Struct):
    exponent: int
    path: str = ""


@corral.task(name="e2e.gil_pow")
def gil_pow(ctx: corral.JobContext, power: Power) -> dict[str, object]:
    """``pow(3, exponent)``: one C call that holds the GIL from start to end
    (no thread of the process runs Python meanwhile). Then writes the file
    ``path``, if given. Returns the seconds the call took, the pid and the
    attempt."""
    start = time.monotonic()
    pow(3, power.exponent).bit_length()
    seconds = time.monotonic() - start
    if power.path:
        with open(power.path, "w") as file:
            file.write(f"{seconds}\n")
    return {"seconds": seconds, "pid": os.getpid(), "attempt": ctx.attempt}


@corral.task(name="e2e.odd_progress")
def odd_progress(ctx: corral.JobContext, note: str) -> str:
    """Reports progress with a note that is not valid UTF-8 (a lone surrogate)."""
    ctx.progress(0.5, note + "\ud800")
    return "done"


@corral.task(name="e2e.retry_in", max_attempts=1)
def retry_in(ctx: corral.JobContext, delay: str) -> None:
    """Asks for a retry ``float(delay)`` seconds from now."""
    raise corral.Retry(delay=float(delay))


@corral.task(name="e2e.odd_result")
def odd_result(ctx: corral.JobContext, kind: str) -> object:
    """A result msgpack holds and JSON does not: bytes, a map keyed by an
    array or nil, NaN."""
    odd: dict[str, object] = {
        "bytes": b"\xff\x00",
        "array_key": {(1, "a"): [b"x"]},
        "nil_key": {None: 1, True: 2},
        "nan": float("nan"),
    }
    return odd[kind]
