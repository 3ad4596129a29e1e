"""Hooks: before, after, on failure and on retry around every job in the
workers, before every enqueue in a client; registered in the config or in
code; a hook that raises changes nothing but a log line; the job's headers
carry what a client hook adds to the handler. With the Sentry and
OpenTelemetry examples, each through real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import CLI_POLL, PLUGINS, Env, wait_for, wait_until, worker_processes
from structlog.testing import capture_logs

import corral
from corral.broker import protocol as p
from corral.broker.jobspec import InvalidJob, validate_spec
from corral.clientcore import ClientCore
from corral.config import load
from corral.errors import ConfigError, SoftTimeout
from corral.hooks import Enqueuing, HookError, HookSet, JobEnd, load_hooks
from corral.logs import JobLines
from corral.workers.execute import Execution
from corral.workers.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = str(ROOT / "examples" / "hooks")


class Calls(corral.Hooks):
    """Records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def before_enqueue(self, job: Enqueuing) -> None:
        self.calls.append(("before_enqueue", job.task))
        job.headers["seen"] = job.job_id

    def before_job(self, ctx: corral.JobContext) -> None:
        self.calls.append(("before_job", ctx.job_id, ctx.attempt, dict(ctx.headers)))

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        self.calls.append(("on_failure", type(error).__name__))

    def on_retry(self, ctx: corral.JobContext, error: BaseException) -> None:
        self.calls.append(("on_retry", type(error).__name__))

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        self.calls.append(("after_job", end.outcome, end.result, end.error_type))


class Raises(corral.Hooks):
    def before_enqueue(self, job: Enqueuing) -> None:
        raise RuntimeError("bug")

    def before_job(self, ctx: corral.JobContext) -> None:
        raise RuntimeError("bug")

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        raise RuntimeError("bug")

    def on_retry(self, ctx: corral.JobContext, error: BaseException) -> None:
        raise RuntimeError("bug")

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        raise LookupError("bug")


def handler(ctx: corral.JobContext, payload: Any) -> Any:
    if payload == "error":
        raise ValueError("bad")
    if payload == "fail":
        raise corral.Fail("no")
    if payload == "retry":
        raise corral.Retry(delay=1)
    if payload == "unencodable":
        return object()
    return payload


def takes_an_int(ctx: corral.JobContext, n: int) -> int:
    return n


def run_job(payload: Any, hooks: list[corral.Hooks], task: str = "t.h") -> p.Outcome:
    fn = corral.task(name="t.h")(handler)
    registry = Registry([fn.definition])
    headers = {"traceparent": "00-x"}
    d = p.Delivery("job-1", 7, task, p.encode_value(payload), 2, 3, "default", 0.0, headers=headers)
    execution = Execution(d, registry, "w-1", hooks=HookSet(hooks))
    outcome = execution.run(lambda args: execution.call_sync(args, None))
    execution.finish()  # as the worker does, once the outcome is on its way
    return outcome


@pytest.mark.parametrize(
    ("payload", "kind", "calls"),
    [
        (5, "ok", [("after_job", "succeeded", 5, "")]),
        (
            "error",
            "error",
            [("on_failure", "ValueError"), ("after_job", "errored", None, "ValueError")],
        ),
        ("fail", "fail", [("on_failure", "Fail"), ("after_job", "failed", None, "Fail")]),
        ("retry", "retry", [("on_retry", "Retry"), ("after_job", "retry_asked", None, "Retry")]),
        (
            "unencodable",
            "fail",
            [
                ("on_failure", "ResultInvalid"),
                ("after_job", "failed", None, "ResultNotSerializable"),
            ],
        ),
    ],
)
def test_each_end_of_a_try_calls_its_hooks_in_order(
    payload: Any, kind: str, calls: list[tuple[Any, ...]]
) -> None:
    seen = Calls()
    outcome = run_job(payload, [seen])
    assert outcome.kind == kind
    assert seen.calls == [("before_job", "job-1", 2, {"traceparent": "00-x"}), *calls]


def test_a_job_that_cannot_run_still_has_its_hooks() -> None:
    seen = Calls()
    assert run_job(5, [seen], task="t.unknown").kind == "error"
    assert seen.calls[1:] == [
        ("on_failure", "UnknownTask"),
        ("after_job", "errored", None, "UnknownTask"),
    ]
    seen.calls.clear()
    typed = Registry([corral.task(name="t.typed")(takes_an_int).definition])
    d = p.Delivery("job-2", 1, "t.typed", p.encode_value("x"), 1, 3, "default", 0.0)
    execution = Execution(d, typed, "w-1", hooks=HookSet([seen]))
    assert execution.run(lambda args: execution.call_sync(args, None)).kind == "fail"
    assert seen.calls[1:] == []  # the end hooks run once the outcome is on its way
    execution.finish()
    execution.finish()  # (once)
    assert seen.calls[1:] == [
        ("on_failure", "PayloadInvalid"),
        ("after_job", "failed", None, "ValidationError"),
    ]


def test_a_hook_that_raises_changes_no_outcome_and_is_logged() -> None:
    seen = Calls()
    with capture_logs() as logs:
        for payload, kind in ((5, "ok"), ("error", "error"), ("retry", "retry")):
            outcome = run_job(payload, [Raises(), seen])
            assert outcome.kind == kind
            assert seen.calls[0][0] == "before_job" and seen.calls[-1][0] == "after_job"
            seen.calls.clear()
    failed = [line for line in logs if line["event"] == "hook.failed"]
    points = {line["point"] for line in failed}
    assert points == {"before_job", "on_failure", "on_retry", "after_job"}
    assert all(line["hook"] == "Raises" and line["job_id"] == "job-1" for line in failed)
    assert any("LookupError" in line["error"] for line in failed)


EXITS = [KeyboardInterrupt(), SystemExit(3), GeneratorExit()]


class Exits(corral.Hooks):
    """Raises ``exc`` at every point (Ctrl-C, sys.exit, a closed generator)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def before_enqueue(self, job: Enqueuing) -> None:
        raise self.exc

    def before_job(self, ctx: corral.JobContext) -> None:
        raise self.exc

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        raise self.exc


@pytest.mark.parametrize("exc", EXITS, ids=lambda e: type(e).__name__)
def test_ctrl_c_and_exits_go_through_a_client_hook(exc: BaseException) -> None:
    """A hook never swallows what asks the process to stop: the client's
    call raises it (nothing is sent), and no hook.failed is logged."""
    client = corral.Client("ipc:///nonexistent/corral.sock", timeout=5, hooks=[Exits(exc)])
    try:
        with capture_logs() as logs, pytest.raises(type(exc)):
            client.enqueue("t.x", 1)
    finally:
        client.close()
    assert not [line for line in logs if line["event"] == "hook.failed"]


@pytest.mark.parametrize("exc", EXITS, ids=lambda e: type(e).__name__)
def test_an_exit_in_a_worker_hook_ends_the_try_and_stops_the_worker(exc: BaseException) -> None:
    """In a worker, a hook's exit ends its try with that error (the job is
    tried again) and is kept for the worker, which stops (see the runtime);
    an end hook's exit leaves the outcome as it was."""
    fn = corral.task(name="t.h")(handler)
    registry = Registry([fn.definition])
    d = p.Delivery("job-1", 7, "t.h", p.encode_value(5), 1, 3, "default", 0.0)
    execution = Execution(d, registry, "w-1", hooks=HookSet([Exits(exc)]))
    outcome = execution.run(lambda args: execution.call_sync(args, None))
    assert outcome.kind == "error" and outcome.error is not None
    assert outcome.error.type == type(exc).__name__
    assert execution.exit is exc
    ended = Execution(d, registry, "w-1", hooks=HookSet([EndExits(exc)]))
    assert ended.run(lambda args: ended.call_sync(args, None)).kind == "ok"
    ended.finish()
    assert ended.exit is exc


class EndExits(Exits):
    def before_job(self, ctx: corral.JobContext) -> None:
        pass


CTRL_C_CLIENT = """
import sys, time
import corral

class Slow(corral.Hooks):
    def before_enqueue(self, job):
        print("in hook", flush=True)
        time.sleep(60)

client = corral.Client(sys.argv[1], timeout=120, hooks=[Slow()])
client.enqueue("e2e.square", 3)
print("enqueued", flush=True)
"""


def test_ctrl_c_during_a_client_hook_stops_the_program(env: Env) -> None:
    """Ctrl-C (SIGINT) while a client's before_enqueue runs ends the
    program with KeyboardInterrupt; nothing is enqueued."""
    broker = env.start("broker")
    env.wait_ready(broker)
    script = env.home / "ctrl_c_client.py"
    script.write_text(CTRL_C_CLIENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), env.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "in hook"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, (out, err)
    assert "enqueued" not in out and "hook.failed" not in err
    assert env.client().jobs() == []


def test_a_soft_timeout_in_before_job_is_the_jobs() -> None:
    class Slow(corral.Hooks):
        def before_job(self, ctx: corral.JobContext) -> None:
            raise SoftTimeout("the job ran past its soft timeout")

    with pytest.raises(SoftTimeout):
        HookSet([Slow()]).before_job(corral.JobContext("j", 1, "t", "q", 0.0))


def test_the_job_lines_are_a_hook_and_come_first() -> None:
    structlog.reset_defaults()
    with capture_logs() as logs:
        outcome = run_job("error", [JobLines()])
    assert outcome.kind == "error"
    assert [line["event"] for line in logs] == ["job.received", "job.errored"]
    assert logs[1]["error"] == "ValueError: bad" and logs[1]["log_level"] == "warning"
    from corral.workers.runtime import Worker, WorkerOptions

    worker = Worker(WorkerOptions("ipc:///nowhere", ["q"]), Registry(), hooks=[Calls()])
    try:
        assert [type(h) for h in worker.hooks.hooks] == [JobLines, Calls]
    finally:
        worker._ctx.term()
        os.close(worker._wake_fd)


def test_a_client_hook_adds_headers_to_every_job_it_sends() -> None:
    seen = Calls()
    core = ClientCore(hooks=HookSet([Raises(), seen]))
    step = core.enqueue("t.a", 1, headers={"mine": "yes"}, on_success=corral.Job("t.b"))
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert spec.headers == {"mine": "yes", "seen": spec.id}
    assert spec.on_success is not None and spec.on_success.headers == {"seen": spec.on_success.id}
    step = core.enqueue_chain([corral.Job("t.c"), corral.Job("t.d")])
    specs = step.request.jobs  # type: ignore[union-attr]
    assert [s.headers for s in specs] == [{"seen": s.id} for s in specs]
    assert [c[1] for c in seen.calls] == ["t.a", "t.b", "t.c", "t.d"]

    class BadHeader(corral.Hooks):
        def before_enqueue(self, job: Enqueuing) -> None:
            job.headers["n"] = 5  # type: ignore[assignment]

    step = ClientCore(hooks=HookSet([BadHeader()])).enqueue("t.a")
    assert step.request.jobs[0].headers is None  # type: ignore[union-attr]

    class Overflowing(corral.Hooks):
        """Adds what the broker would refuse the job for: a hook's entries
        over the limits are dropped (and logged); the job goes."""

        def before_enqueue(self, job: Enqueuing) -> None:
            job.headers["baggage"] = "x" * 9000
            job.headers[""] = "empty key"
            job.headers["k" * 201] = "long key"
            job.headers["kept"] = "yes"
            job.headers["odd"] = "\ud800"  # not valid UTF-8: no request could carry it
            for n in range(70):
                job.headers[f"h{n}"] = "v"

    with capture_logs() as logs:
        step = ClientCore(hooks=HookSet([Overflowing()])).enqueue("t.a", headers={"mine": "1"})
    headers = step.request.jobs[0].headers  # type: ignore[union-attr]
    assert headers is not None and len(headers) == 64
    assert list(headers)[:3] == ["mine", "kept", "h0"] and "odd" not in headers
    validate_spec(step.request.jobs[0])  # type: ignore[union-attr]
    dropped = [line for line in logs if line["event"] == "hook.bad_header"]
    assert len(dropped) == 4 + 70 - 62
    assert "at most 8192 characters" in dropped[0]["why"]
    # the caller's own headers are the caller's: the broker names what is wrong
    step = ClientCore(hooks=HookSet([seen])).enqueue("t.a", headers={"": "x"})
    with pytest.raises(InvalidJob, match="a key must be a non-empty string"):
        validate_spec(step.request.jobs[0])  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"corral\.Hooks"):
        HookSet([object()])  # type: ignore[list-item]


def test_each_jobs_headers_survive_batching_restart_and_compaction(tmp_path: Path) -> None:
    """Jobs alike but for their headers share no template: each keeps its
    own headers in a batch, across a restart, in a compaction's snapshot,
    and in its delivery."""
    from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

    from corral.broker.state import JobState

    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    specs = [
        p.JobSpec(f"j{i}", "t.x", p.encode_value(i), headers={"traceparent": f"00-{i}"})
        for i in range(3)
    ] + [p.JobSpec("plain", "t.x", p.encode_value(3))]
    assert isinstance(broker.request(p.Enqueue(broker.next_req(), specs)), p.EnqueueOk)
    want = {"j0": {"traceparent": "00-0"}, "j1": {"traceparent": "00-1"}}
    want |= {"j2": {"traceparent": "00-2"}, "plain": None}

    def kept(state: JobState) -> dict[str, Any]:
        return {job_id: state.jobs[job_id].headers for job_id in want}

    assert kept(broker.core.state) == want
    broker.close()
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)  # replayed from the log
    assert kept(broker.core.state) == want
    again = JobState(broker.core.compactor.defaults)
    for record in broker.core.state.snapshot():  # what a compaction writes
        again.apply(record)
    assert kept(again) == want
    worker = FakeWorker(broker, credit=4)
    got = {d.job_id: d.headers for d in deliveries(worker.send(p.WorkerHeartbeat()))}
    got |= {d.job_id: d.headers for d in worker.ready()}
    assert got == want


class Sleepy(corral.Hooks):
    """A before_enqueue that takes ``seconds`` (a tracer's exporter, say)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seen: list[str] = []

    def before_enqueue(self, job: Enqueuing) -> None:
        self.seen.append(job.job_id)
        time.sleep(self.seconds)


def test_before_enqueue_runs_under_the_calls_timeout(env: Env) -> None:
    """The hooks run in the caller's thread (they see its context), under
    the call's deadline: a hook that returns past the client's timeout
    raises HookTimeout naming it, the hooks after it do not run and
    nothing is sent. Hooks that return in time leave the request the rest
    of the timeout, and a broker that does not answer in it is reported
    with the hooks' share. The same with the AsyncClient."""
    broker = env.start("broker")
    env.wait_ready(broker)
    slow, after = Sleepy(0.5), Calls()
    client = corral.Client(env.endpoint, timeout=0.25, hooks=[slow, after])
    env.clients.append(client)
    with pytest.raises(corral.HookTimeout) as raised:
        client.enqueue("e2e.square", 3)
    text = str(raised.value)
    assert "Sleepy.before_enqueue" in text and "timeout=0.25s" in text, text
    assert "nothing was enqueued" in text and "e2e.square" in text
    assert isinstance(raised.value, corral.CorralError) and isinstance(raised.value, TimeoutError)
    assert after.calls == []
    with pytest.raises(corral.HookTimeout):
        client.enqueue_many([corral.Job("e2e.square", n) for n in range(3)])
    assert len(slow.seen) == 2  # the batch stopped at its first job's hook
    plain = env.client()
    for job_id in slow.seen:
        with pytest.raises(corral.JobNotFound):
            plain.job(job_id)

    async def enqueue_async() -> None:
        async with corral.AsyncClient(env.endpoint, timeout=0.25, hooks=[slow]) as aclient:
            await aclient.enqueue("e2e.square", 3)

    with pytest.raises(corral.HookTimeout, match=r"Sleepy\.before_enqueue"):
        asyncio.run(enqueue_async())
    broker.signal(signal.SIGSTOP)  # it answers nothing now
    try:
        quick = corral.Client(env.endpoint, timeout=1.0, hooks=[Sleepy(0.3)])
        env.clients.append(quick)
        with pytest.raises(corral.BrokerUnavailable, match=r"within 1s.*hooks took 0\.\d+s"):
            quick.enqueue("e2e.square", 3)
    finally:
        broker.signal(signal.SIGCONT)
    assert plain.jobs() == []


def test_a_client_with_hooks_loads_no_logging_stack() -> None:
    """structlog (and rich under it) costs a client's import a third of a
    second: the hooks and the client import it only to log a hook's fault."""
    code = (
        "import sys, corral\n"
        "from corral.clientcore import ClientCore\n"
        "from corral.hooks import HookSet\n"
        "class H(corral.Hooks):\n"
        "    def before_enqueue(self, job): job.headers['k'] = 'v'\n"
        "ClientCore(hooks=HookSet([H()])).enqueue('t.x', 1)\n"
        "assert 'structlog' not in sys.modules and 'rich' not in sys.modules, sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- loading -----------------------------------------------------------------------


@pytest.fixture
def plugins_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(PLUGINS)
    monkeypatch.setenv("CORRAL_TEST_HOOKS_FILE", "/dev/null")
    yield
    sys.modules.pop("recorder_hooks", None)


def test_load_hooks_calls_each_modules_function(plugins_path: None) -> None:
    loaded = load_hooks(["recorder_hooks", "recorder_hooks:headers_hooks"])
    assert [type(h).__name__ for h in loaded] == ["Broken", "Recorder", "Stamp"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_hooks_module", "hooks module 'no_such_hooks_module' could not be imported"),
        ("recorder_hooks:missing", r"has no function missing\(\)"),
        ("hook_tasks", r"has no function corral_hooks\(\): define `def corral_hooks\(\)"),
        ("recorder_hooks:json", r"has no function json\(\)"),
        ("recorder_hooks:raising", r"raising\(\) raised RuntimeError: SENTRY_DSN is not set"),
        ("recorder_hooks:wrong", r"wrong\(\) returned 42, not a corral.Hooks"),
        # text is a sequence too: it was named by its first letter ('S')
        ("recorder_hooks:wrong_text", r"wrong_text\(\) returned 'Sentry', not a corral.Hooks"),
    ],
)
def test_a_bad_hooks_entry_is_a_clear_error(plugins_path: None, spec: str, message: str) -> None:
    with pytest.raises(HookError, match=message):
        load_hooks([spec])


def test_hooks_keys_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'hooks = ["app.hooks", "app.hooks:make"]\n[[pools]]\nname = "p"\nhooks = ["x"]\n'
    )
    config = load(path)
    assert config.hooks == ["app.hooks", "app.hooks:make"]
    assert config.pools[0].hooks == ["x"]
    assert config.pools[0].hook_timeout == 30.0
    path.write_text('hooks = ["app hooks"]\n')
    with pytest.raises(ConfigError, match=r'hooks\[0\]: .*"myapp\.hooks"'):
        load(path)
    for bad in ('"0s"', '"soon"', "-1"):
        path.write_text(f'[[pools]]\nname = "p"\nhook_timeout = {bad}\n')
        with pytest.raises(ConfigError, match=r"pools\[0\]\.hook_timeout: "):
            load(path)
    path.write_text('[[pools]]\nname = "p"\nhook_timeout = "2m"\n')
    assert load(path).pools[0].hook_timeout == 120.0


def test_a_reload_rolls_a_pool_whose_hooks_changed(tmp_path: Path) -> None:
    """The pool's fingerprint covers its hooks entries and their code."""
    from corral.supervisor.reload import plugin_fingerprint

    module = tmp_path / f"reload_hooks_{tmp_path.name}.py"
    module.write_text("def corral_hooks(): return []\n")
    name = module.stem
    path = tmp_path / "c.toml"

    def fingerprint(top: str, pool: str = "[]") -> str:
        path.write_text(
            f'python_path = ["{tmp_path}"]\nhooks = {top}\n[[pools]]\nname = "p"\nhooks = {pool}\n'
        )
        config = load(path)
        return plugin_fingerprint(config, config.pools[0])

    none = fingerprint("[]")
    top = fingerprint(f'["{name}"]')
    assert none != top
    assert fingerprint("[]", f'["{name}"]') == top  # the same hooks for the pool's workers
    assert fingerprint("[]", f'["{name}:corral_hooks"]') not in (none, top)
    module.write_text("def corral_hooks(): return ()\n")
    assert fingerprint(f'["{name}"]') != top
    assert fingerprint("[]") == none


def test_check_config_names_a_bad_hooks_module(env: Env) -> None:
    text = env.config.read_text()
    env.config.write_text(text.replace("\n[broker]", 'hooks = ["no_such_hooks"]\n\n[broker]', 1))
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "hooks: hooks module 'no_such_hooks' could not be imported" in done.stderr
    env.config.write_text(text.replace("\n[[pools]]", '\n[[pools]]\nhooks = ["hook_tasks"]', 1))
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "pools[0].hooks (pool 'default'): hooks module 'hook_tasks' has no function" in (
        done.stderr
    )
    # the function is called, as each worker will after its fork
    env.config.write_text(
        text.replace(
            "\n[[pools]]",
            '\n[[pools]]\nhooks = ["recorder_hooks:raising", "recorder_hooks:wrong"]',
            1,
        )
    )
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "recorder_hooks:raising': raising() raised RuntimeError: SENTRY_DSN is not set" in (
        done.stderr
    )
    assert "recorder_hooks:wrong': wrong() returned 42, not a corral.Hooks" in done.stderr


# -- through real processes --------------------------------------------------------


def configure(env: Env, hooks: str, pool_hooks: str = "", processes: int = 1) -> None:
    env.write_config(
        processes=processes,
        plugins='["e2e_tasks", "hook_tasks"]',
        extra_pool=f"hooks = {pool_hooks}" if pool_hooks else "",
        extra_broker='retry_backoff = "50ms"\nretry_backoff_max = "50ms"',
    )
    text = env.config.read_text().replace(
        f'python_path = ["{PLUGINS}"]',
        f'python_path = ["{PLUGINS}", "{EXAMPLES}"]\nhooks = {hooks}',
    )
    env.config.write_text(text)


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hooks_run_around_every_job_in_real_workers(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-level hooks (a broken one first) and a pool's, registered in the
    config; a client from the same config adds a header; every outcome
    stands and the worker lives on; close runs as the worker stops. A hook
    slower to see a job end than the job's timeout neither times it out nor
    runs it again: the outcome is reported before the end hooks run."""
    record = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("CORRAL_TEST_HOOKS_FILE", str(record))
    configure(
        env,
        '["recorder_hooks", "recorder_hooks:headers_hooks"]',
        pool_hooks='["recorder_hooks:pool_hooks", "recorder_hooks:slow_hooks"]',
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    (worker,) = worker_processes(daemon)
    client = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(client)
    jobs = {
        "square": client.enqueue("e2e.square", 7),
        "flaky": client.enqueue("e2e.flaky", 2),
        "release": client.enqueue("e2e.release", 1),
        "give_up": client.enqueue("e2e.give_up", "no"),
        "headers": client.enqueue("hooks.headers"),
        "quick": client.enqueue("hooks.quick"),
    }
    assert client.result(jobs["square"], timeout=30) == 49
    assert client.result(jobs["flaky"], timeout=30) == 2
    assert client.result(jobs["release"], timeout=30) == 1
    with pytest.raises(corral.JobFailed):
        client.result(jobs["give_up"], timeout=30)
    headers = client.result(jobs["headers"], timeout=30)
    assert headers == {"stamped-by": f"hooks.headers:{jobs['headers']}"}
    assert client.result(jobs["quick"], timeout=30) == 1  # its first try, not timed out
    quick = client.job(jobs["quick"])
    assert (quick.status, quick.attempts, len(quick.tries)) == ("succeeded", 1, 1)
    assert [w.pid for w in worker_processes(daemon)] == [worker.pid]  # never restarted
    # a reload to hooks whose function raises is refused: its workers could
    # not start, and the ones running stay
    good = env.config.read_text()
    env.config.write_text(good.replace("\nhooks = [", '\nhooks = ["recorder_hooks:raising", ', 1))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reload_failed" in daemon.output(), 60, message="the reload")
    assert "raising() raised RuntimeError" in daemon.output()
    assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9
    assert [w.pid for w in worker_processes(daemon)] == [worker.pid]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    calls = lines(record)

    def of(job: str, label: str = "top") -> list[tuple[Any, ...]]:
        return [
            (c["point"], c["attempt"], c.get("outcome") or c.get("error"))
            for c in calls
            if c.get("job_id") == jobs[job] and c["label"] == label
        ]

    assert of("square") == [("before_job", 1, None), ("after_job", 1, "succeeded")]
    assert of("quick") == [("before_job", 1, None), ("after_job", 1, "succeeded")]
    assert of("square", "pool") == of("square")
    assert of("flaky") == [
        ("before_job", 1, None),
        ("on_failure", 1, "ValueError"),
        ("after_job", 1, "errored"),
        ("before_job", 2, None),
        ("after_job", 2, "succeeded"),
    ]
    assert of("release") == [
        ("before_job", 1, None),
        ("on_retry", 1, "Retry"),
        ("after_job", 1, "retry_asked"),
        ("before_job", 2, None),
        ("after_job", 2, "succeeded"),
    ]
    assert of("give_up") == [
        ("before_job", 1, None),
        ("on_failure", 1, "Fail"),
        ("after_job", 1, "failed"),
    ]
    assert {c["pid"] for c in calls} == {worker.pid}
    assert [c["label"] for c in calls if c["point"] == "close"] == ["top", "pool"]
    failed = [
        e for e in map(_json, daemon.output().splitlines()) if e.get("event") == "hook.failed"
    ]
    assert {e["point"] for e in failed} >= {"before_job", "on_failure", "on_retry", "after_job"}
    assert any(e["point"] == "close" for e in failed)


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def test_a_daemon_whose_hooks_cannot_load_does_not_start(env: Env) -> None:
    """As with a plugin that cannot load: a preloading pool's supervisor
    imports its hooks modules (their functions run in each worker, after
    its fork), so ``corral run`` stops at once, naming the module, rather
    than start workers that cannot."""
    configure(env, '["no_such_hooks"]')
    daemon = env.start("run")
    assert daemon.wait(60) == 2
    assert "hooks module 'no_such_hooks' could not be imported" in daemon.output()
    assert not worker_processes(daemon)


def test_a_worker_whose_hooks_cannot_load_says_why(env: Env) -> None:
    configure(env, '["no_such_hooks"]', processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    worker = env.start("worker")
    assert worker.wait(30) == 2
    assert "hooks module 'no_such_hooks' could not be imported" in worker.output()
    assert "worker.cannot_start" in worker.output()


def test_a_hook_past_hook_timeout_costs_its_worker_and_no_job(env: Env) -> None:
    """An end hook that never returns holds its thread, and the jobs its
    worker prefetched for that thread: past the pool's hook_timeout the
    supervisor kills the worker (``hook.timeout``, naming the hook and the
    job). The job whose hook hung keeps its outcome; the prefetched jobs run
    on the new worker, no attempt counted. A before_job that never returns
    is part of its try: that try is charged, the next one runs."""
    configure(env, "[]", pool_hooks='["recorder_hooks:hang_hooks"]')
    env.config.write_text(
        env.config.read_text().replace("[[pools]]\n", '[[pools]]\nhook_timeout = "2s"\n', 1)
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    (first,) = worker_processes(daemon)
    client = env.client()
    hung = client.enqueue("hooks.hang_after")
    assert client.result(hung, timeout=30) == 1  # reported before its hook hung
    waiting = [client.enqueue("e2e.square", n) for n in (2, 3)]  # prefetched by that worker
    assert [client.result(job, timeout=30) for job in waiting] == [4, 9]
    for job in waiting:
        info = client.job(job)
        assert (info.attempts, [t.attempt for t in info.tries]) == (1, [1])
        assert info.tries[0].pid != first.pid
    info = client.job(hung)
    assert (info.status, info.attempts, len(info.tries)) == ("succeeded", 1, 1)
    assert info.tries[0].error is None
    before = client.enqueue("hooks.hang_before")
    assert client.result(before, timeout=30) == 2
    info = client.job(before)
    assert [t.attempt for t in info.tries] == [1, 2]
    lost = info.tries[0].error
    assert lost is not None and lost.type == "WorkerLost" and "hook_timeout" in lost.message
    timeouts = [
        (e["hook"], e["job_id"])
        for e in map(_json, daemon.output().splitlines())
        if e.get("event") == "hook.timeout"
    ]
    assert timeouts == [("Hang.after_job", hung), ("Hang.before_job", before)]
    assert daemon.alive()


def test_a_hooks_sys_exit_stops_its_real_worker_and_the_job_runs_again(env: Env) -> None:
    """sys.exit(5) in a pool's before_job hook (on a handler thread:
    concurrency 2) is not swallowed: that try ends with SystemExit, the
    worker drains and exits with code 5, its successor runs the job."""
    configure(env, "[]", pool_hooks='["recorder_hooks:exit_hooks"]')
    env.config.write_text(env.config.read_text().replace("concurrency = 1", "concurrency = 2"))
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    job = client.enqueue("hooks.quick")
    assert client.result(job, timeout=30) == 2
    info = client.job(job)
    first = info.tries[0].error
    assert first is not None and first.type == "SystemExit", info.tries
    events = [_json(line) for line in daemon.output().splitlines()]
    assert any(e.get("event") == "worker.hook_exit" and e["exit_code"] == 5 for e in events)
    exits = [e["how"] for e in events if e.get("event") == "supervisor.worker_exited"]
    assert "exited with code 5" in exits, exits
    assert daemon.alive()


def test_the_cli_runs_the_configs_client_hooks_when_it_enqueues(env: Env) -> None:
    """`corral enqueue` (one job, --from-file, a chain, a group) is a client
    of its config: the config's top-level hooks run before each job goes,
    as for Client.from_config. A hooks module that cannot load is one line,
    exit 2; commands that enqueue nothing do not load the hooks."""
    configure(env, '["recorder_hooks:headers_hooks"]')
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    done = env.run("enqueue", "hooks.headers", "--wait", "--json", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    stamped = json.loads(done.stdout)
    assert stamped["result"]["stamped-by"].startswith("hooks.headers:"), stamped
    jobs = env.home / "jobs.jsonl"
    jobs.write_text('{"task": "hooks.headers"}\n')
    done = env.run("enqueue", "--from-file", str(jobs), "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    done = env.run("enqueue-chain", '{"task": "hooks.headers"}', "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    client = env.client()
    for job in client.jobs():
        assert client.job(job.id).headers.get("stamped-by", "").startswith("hooks.headers:")
    broken = env.config.read_text().replace("recorder_hooks:headers_hooks", "no_such_hooks_mod")
    (env.home / "broken.toml").write_text(broken)
    done = env.run("enqueue", "hooks.headers", "-c", str(env.home / "broken.toml"))
    assert done.returncode == 2 and "no_such_hooks_mod" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert env.run("status", "-c", str(env.home / "broken.toml")).returncode == 0


def test_workers_that_cannot_load_their_modules_back_their_pool_off(env: Env) -> None:
    """With preload = false each worker imports its plugins and hooks
    modules: one that cannot be loaded makes each worker exit at once, saying
    why (no traceback), and its pool back off after max_restarts such
    failures, as for any crash, with the module and the error in the log
    line and in `corral status`. The daemon stays up; once the module is
    there, a reload starts the pool at once."""
    late = env.home / "late"
    late.mkdir()
    touchy = 'preload = false\nmax_restarts = 1\npool_backoff = "10m"'
    env.write_config(
        processes=1,
        plugins='["e2e_tasks", "late_tasks"]',
        extra_pool=f'{touchy}\n\n[[pools]]\nname = "hooked"\nqueues = ["hooked"]\n'
        f'plugins = ["e2e_tasks"]\nhooks = ["late_hooks"]\n{touchy}',
    )
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{late}", "')
    env.config.write_text(text)
    daemon = env.start("run")
    env.wait_ready(daemon)

    def pools() -> dict[str, str]:
        done = env.run("status", "-c", str(env.config))
        assert done.returncode == 0, done.stderr
        return {
            line.split()[1].rstrip(":"): line
            for line in done.stdout.splitlines()
            if line.strip().startswith("pool ")
        }

    lines = wait_until(
        pools,
        lambda found: len(found) == 2 and all("backing off until" in v for v in found.values()),
        60,
        CLI_POLL,
        message="both pools to back off",
    )
    assert "plugin 'late_tasks' could not be imported" in lines["default"]
    assert "hooks module 'late_hooks' could not be imported" in lines["hooked"]
    backing_off = {
        e["pool"]: e["error"]
        for e in map(_json, daemon.output().splitlines())
        if e.get("event") == "supervisor.pool_backing_off"
    }
    assert "plugin 'late_tasks' could not be imported" in backing_off["default"]
    assert "No module named 'late_hooks'" in backing_off["hooked"]
    assert "Traceback" not in daemon.output()
    assert daemon.alive() and not worker_processes(daemon)
    (late / "late_tasks.py").write_text(
        "import corral\n\n\n@corral.task(name='late.ok')\ndef ok(ctx: corral.JobContext) -> int:\n"
        "    return 1\n"
    )
    (late / "late_hooks.py").write_text("def corral_hooks():\n    return []\n")
    done = env.run("reload", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    env.wait_workers(2, timeout=60)  # at once, not after pool_backoff
    client = env.client()
    assert client.result(client.enqueue("late.ok"), timeout=30) == 1
    assert client.result(client.enqueue("e2e.square", 5, queue="hooked"), timeout=30) == 25


def test_sentry_example_reports_a_failed_try_with_its_job(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/hooks/sentry_hook.py with the real sentry-sdk in a real
    worker; the test's transport writes each event to a file."""
    events_file = tmp_path / "sentry.jsonl"
    monkeypatch.setenv("CORRAL_TEST_SENTRY_FILE", str(events_file))
    configure(env, '["sentry_test_hooks"]')
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    job_id = client.enqueue("hooks.boom", "kaboom")  # two tries: max_attempts=2
    with pytest.raises(corral.JobFailed):
        client.result(job_id, timeout=30)
    events = wait_for(
        lambda: len(lines(events_file)) >= 2 and lines(events_file), 20, message="2 events"
    )
    assert [e["tags"]["corral.attempt"] for e in events] == ["1", "2"]
    for event in events:
        assert event["tags"]["corral.job_id"] == job_id
        assert event["tags"]["corral.task"] == "hooks.boom"
        assert event["tags"]["corral.queue"] == "default"
        (exception,) = event["exception"]["values"]
        assert (exception["type"], exception["value"]) == ("ValueError", "kaboom")
        assert event["contexts"]["corral job"]["job_id"] == job_id
        assert event["contexts"]["corral job"]["max_attempts"] == 2


def test_otel_example_continues_the_enqueuers_trace_in_the_worker(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client (this process, its own tracer provider) enqueues inside a
    span; the worker process (examples/hooks/otel_hook.py with the real SDK,
    spans to a file) continues that trace: same trace id, the enqueue span
    its parent."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.syspath_prepend(EXAMPLES)
    from otel_hook import OpenTelemetryHooks

    spans_file = tmp_path / "spans.jsonl"
    monkeypatch.setenv("CORRAL_TEST_OTEL_FILE", str(spans_file))
    configure(env, '["otel_test_hooks"]')
    daemon = env.start("run")
    env.wait_ready(daemon)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    client = corral.Client(env.endpoint, timeout=10, hooks=[OpenTelemetryHooks(provider)])
    env.clients.append(client)
    with tracer.start_as_current_span("enqueue square"):
        ok = client.enqueue("e2e.square", 7)
    with tracer.start_as_current_span("enqueue boom"):
        bad = client.enqueue("hooks.boom", "kaboom", max_attempts=1)
    assert client.result(ok, timeout=30) == 49
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    sent = {span.name: span.get_span_context() for span in exporter.get_finished_spans()}
    spans = wait_for(lambda: len(lines(spans_file)) >= 2 and lines(spans_file), 20, message="spans")
    by_job = {s["attributes"]["messaging.message.id"]: s for s in spans}
    for job_id, enqueue_span, status in (
        (ok, "enqueue square", "UNSET"),
        (bad, "enqueue boom", "ERROR"),
    ):
        span = by_job[job_id]
        assert span["trace_id"] == f"{sent[enqueue_span].trace_id:032x}"
        assert span["parent_id"] == f"{sent[enqueue_span].span_id:016x}"
        assert span["kind"] == "CONSUMER" and span["status"] == status
        assert span["attributes"]["corral.attempt"] == 1
    assert by_job[ok]["name"] == "process e2e.square"
    assert by_job[ok]["attributes"]["corral.outcome"] == "succeeded"
    assert by_job[bad]["events"] == ["exception"]


def test_each_hook_call_is_announced_to_a_watch_and_the_builtins_are_not() -> None:
    """The worker's HookSet tells its watch (the status pipe) each call of
    a hook of yours before it runs, and when the point's hooks are done,
    even when one raises; corral's own lines per job are not watched."""

    class Watch:
        def __init__(self) -> None:
            self.calls: list[tuple[str, ...]] = []

        def hook_started(self, job_id: str, hook: str) -> None:
            self.calls.append(("started", job_id, hook))

        def hooks_done(self, job_id: str) -> None:
            self.calls.append(("done", job_id))

    watch = Watch()
    fn = corral.task(name="t.h")(handler)
    d = p.Delivery("job-1", 7, "t.h", p.encode_value("error"), 1, 3, "default", 0.0)
    hooks = HookSet([JobLines(), Calls(), Raises()], watch=watch, builtin=1)
    execution = Execution(d, Registry([fn.definition]), "w-1", hooks=hooks)
    execution.run(lambda args: execution.call_sync(args, None))
    execution.finish()
    assert watch.calls == [
        ("started", "job-1", "Calls.before_job"),
        ("started", "job-1", "Raises.before_job"),
        ("done", "job-1"),
        ("started", "job-1", "Calls.on_failure"),
        ("started", "job-1", "Raises.on_failure"),
        ("done", "job-1"),
        ("started", "job-1", "Calls.after_job"),
        ("started", "job-1", "Raises.after_job"),
        ("done", "job-1"),
    ]
    soft = HookSet([SoftInBefore()], watch=watch)
    watch.calls.clear()
    with pytest.raises(SoftTimeout):
        soft.before_job(execution.ctx)
    assert watch.calls == [("started", "job-1", "SoftInBefore.before_job"), ("done", "job-1")]


class SoftInBefore(corral.Hooks):
    def before_job(self, ctx: corral.JobContext) -> None:
        raise SoftTimeout("the job ran past its soft timeout")


class _AsyncHooks(corral.Hooks):
    """An OpenTelemetry-style exporter written with ``async def``: corral
    calls hooks as plain functions, so such a hook never ran (a coroutine
    made and dropped, a RuntimeWarning on stderr at best)."""

    async def before_job(self, ctx: corral.JobContext) -> None:  # type: ignore[override]
        raise AssertionError("never awaited")


def test_an_async_hook_is_refused_where_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TypeError, match=r"_AsyncHooks\.before_job.*async def"):
        HookSet([_AsyncHooks()])
    with pytest.raises(TypeError, match=r"_AsyncHooks\.before_job"):
        corral.Client("ipc:///nonexistent/client.sock", hooks=[_AsyncHooks()])
    (tmp_path / "async_hooks_mod.py").write_text(
        "import corral\n\n"
        "class H(corral.Hooks):\n"
        "    async def after_job(self, ctx, end):\n"
        "        pass\n\n"
        "def corral_hooks():\n"
        "    return H()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HookError, match=r"async_hooks_mod.*H\.after_job.*async def"):
        load_hooks(["async_hooks_mod"])


def test_a_hook_that_returns_something_is_logged_once() -> None:
    """A hook's return value is ignored: one that returns an awaitable (a
    sync method returning a coroutine, a future) did nothing; it is said."""

    class Returns(corral.Hooks):
        def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
            return asyncio.sleep(0)  # type: ignore[return-value]

    hooks = HookSet([Returns()])
    ctx = corral.JobContext("j1", 1, "t.task", "default", 0.0)
    end = JobEnd("succeeded", 0.1, None, None, "", "")
    with capture_logs() as logs:
        hooks.job_ended(ctx, end)
        hooks.job_ended(ctx, end)
    said = [e for e in logs if e["event"] == "hook.returned"]
    assert len(said) == 1 and "Returns.after_job" in said[0]["hook"], logs
    assert "coroutine" in said[0]["returned"], said
