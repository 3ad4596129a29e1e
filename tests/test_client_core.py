"""The clients' sans-I/O core, driven with canned replies (no sockets), and
the proof that Client and AsyncClient cannot drift apart."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

import corral
from corral.broker import protocol as p
from corral.broker.jobspec import OPTION_NAMES
from corral.client import AsyncClient, Client
from corral.clientcore import (
    MAX_WAIT_SLICE,
    ClientCore,
    Job,
    JobPage,
    Plan,
    Step,
    encode_request,
)
from corral.errors import (
    BrokerError,
    DiskFull,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestTooLarge,
    ResultTimeout,
)

ENDPOINT = "ipc:///nonexistent/corral-test.sock"


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: value for name, value in inspect.getmembers(cls, callable) if not name.startswith("_")
    }


def operations() -> dict[str, Any]:
    """Every public method of the core: the operations both clients offer."""
    return public_methods(ClientCore)


def drive(plan: Plan[Any], *replies: p.ClientReply) -> tuple[Any, list[p.ClientRequest]]:
    """Run an operation against canned replies: its value, and the requests sent."""
    sent: list[p.ClientRequest] = []
    answers = iter(replies)
    while isinstance(plan, Step):
        sent.append(plan.request)
        plan = plan.answer(next(answers))
    assert next(answers, None) is None, "a canned reply was left over"
    return plan, sent


# ------------------------------------------------------------- no drift


def test_both_clients_offer_every_operation_and_nothing_else() -> None:
    blocking, awaiting = public_methods(Client), public_methods(AsyncClient)
    assert blocking.keys() == awaiting.keys()
    assert blocking.keys() - {"close", "from_config"} == operations().keys()


@pytest.mark.parametrize("name", sorted(operations()))
def test_each_method_is_the_core_operation(name: str) -> None:
    op = getattr(ClientCore, name)
    blocking, awaiting = getattr(Client, name), getattr(AsyncClient, name)
    assert blocking.__wrapped__ is op and awaiting.__wrapped__ is op
    assert inspect.signature(blocking) == inspect.signature(awaiting)
    assert list(inspect.signature(blocking).parameters) == list(inspect.signature(op).parameters)
    assert inspect.iscoroutinefunction(awaiting) and not inspect.iscoroutinefunction(blocking)
    assert "Plan" not in str(inspect.signature(blocking).return_annotation)


def test_every_public_method_of_both_clients_has_a_docstring() -> None:
    for cls in (Client, AsyncClient):
        for name, method in public_methods(cls).items():
            doc = inspect.getdoc(method) or ""
            assert len(doc) > 40, f"{cls.__name__}.{name} needs a docstring"
    for name, op in operations().items():
        assert "Raises" in (op.__doc__ or ""), f"{name}: say what it raises"


def test_enqueue_takes_the_options_of_a_job() -> None:
    """enqueue's keywords are Job's (the JobOptions, then id and the callbacks),
    with the same defaults: the option list is checked, not copied."""
    params = inspect.signature(ClientCore.enqueue).parameters
    keywords = {
        name: param.default
        for name, param in params.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    job_fields = [f for f in Job.__struct_fields__ if f not in ("task", "payload")]
    assert list(keywords) == job_fields
    assert list(keywords)[: len(OPTION_NAMES)] == list(OPTION_NAMES)
    assert keywords == {name: getattr(Job("t"), name) for name in job_fields}
    assert list(params)[:3] == ["self", "task", "payload"]


def test_enqueue_puts_every_option_on_the_wire() -> None:
    values: dict[str, Any] = {
        "queue": "q",
        "priority": 7,
        "delay": 1.5,
        "run_at": 2e9,
        "max_attempts": 3,
        "timeout": 4.5,
        "unique_key": "k",
        "result_ttl": 60.0,
        "unique_for": 9.0,
        "max_retries": 2,
        "expires": 30.0,
        "limit_key": "customer-7",
        "headers": {"traceparent": "00-ab-cd-01"},
    }
    assert set(values) == set(OPTION_NAMES), "a new option needs a value here"
    job_id, (request,) = drive(
        ClientCore().enqueue("t.x", [1], id="my-id", **values),
        p.EnqueueOk(1, ["my-id"]),
    )
    assert job_id == "my-id"
    assert isinstance(request, p.Enqueue)
    (spec,) = request.jobs
    assert (spec.id, spec.task, msgspec.msgpack.decode(spec.payload)) == ("my-id", "t.x", [1])
    assert {name: getattr(spec, name) for name in OPTION_NAMES} == values


def test_enqueue_many_and_enqueue_build_the_same_spec() -> None:
    core = ClientCore()
    options: dict[str, Any] = {"queue": "q", "delay": 3.0, "unique_key": "u", "id": "a"}
    callback = Job("t.done", "ok", priority=2)
    one = core.enqueue("t.x", {"n": 1}, on_success=callback, **options)
    many = core.enqueue_many([Job("t.x", {"n": 1}, on_success=callback, **options)])
    assert isinstance(one, Step) and isinstance(many, Step)
    assert isinstance(one.request, p.Enqueue) and isinstance(many.request, p.Enqueue)
    first, second = one.request.jobs[0], many.request.jobs[0]
    assert first.on_success is not None and second.on_success is not None
    assert first.on_success.id != second.on_success.id  # fresh ids for each callback
    assert msgspec.structs.replace(first, on_success=None) == msgspec.structs.replace(
        second, on_success=None
    )


def test_enqueue_takes_the_task_function() -> None:
    @corral.task(name="mail.send")
    def send(ctx: corral.JobContext, to: str) -> None: ...

    step = ClientCore().enqueue(send, "a@b")
    assert isinstance(step, Step) and isinstance(step.request, p.Enqueue)
    assert step.request.jobs[0].task == "mail.send"
    with pytest.raises(TypeError, match=r"@corral\.task"):
        ClientCore().enqueue(print)


# --------------------------------------------------- canned replies


def test_new_ids_are_32_hex_digits_and_requests_are_numbered() -> None:
    core = ClientCore()
    first, second = core.enqueue("t"), core.ping()
    assert isinstance(first, Step) and isinstance(second, Step)
    assert isinstance(first.request, p.Enqueue)
    job_id = first.request.jobs[0].id
    assert len(job_id) == 32 and int(job_id, 16) >= 0
    assert (first.request.req, second.request.req) == (1, 2)


def test_an_empty_batch_sends_nothing() -> None:
    assert drive(ClientCore().enqueue_many([])) == ([], [])


def test_a_flow_needs_a_job() -> None:
    with pytest.raises(ValueError, match="chain needs at least one job"):
        ClientCore().enqueue_chain([])
    with pytest.raises(ValueError, match="group needs at least one job"):
        ClientCore().enqueue_group(iter([]))


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("not_found", JobNotFound),
        ("disk_full", DiskFull),
        ("invalid", BrokerError),
        ("version", BrokerError),
    ],
)
def test_error_replies_raise(code: str, error: type[Exception]) -> None:
    with pytest.raises(error, match="what went wrong") as raised:
        drive(ClientCore().job("j"), p.ErrorReply(1, code, "what went wrong"))
    if isinstance(raised.value, BrokerError):
        assert raised.value.code == code


def test_a_request_over_the_size_limit_is_refused() -> None:
    step = ClientCore().enqueue("t", "x" * 1000)
    assert isinstance(step, Step)
    with pytest.raises(RequestTooLarge, match="max_message_size of 100"):
        encode_request(step.request, 100)
    assert p.decode(p.client_request_decoder, encode_request(step.request, 10_000)) == step.request


class FakeClock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def result_reply(
    status: str, result: Any = None, error: p.ErrorInfo | None = None
) -> p.ResultReply:
    return p.ResultReply(1, "j", status, p.encode_value(result), error)


def test_result_returns_the_decoded_value() -> None:
    core = ClientCore(FakeClock())
    value, (request,) = drive(core.result("j", timeout=5), result_reply("succeeded", [1]))
    assert value == [1]
    assert isinstance(request, p.GetResult) and request.wait == 5


def test_result_raises_for_a_failed_or_cancelled_job() -> None:
    error = p.ErrorInfo("ValueError", "bad")
    with pytest.raises(JobFailed, match="ValueError: bad") as failed:
        drive(ClientCore().result("j"), result_reply("failed", error=error))
    assert failed.value.error == error and failed.value.job_id == "j"
    with pytest.raises(JobCancelled):
        drive(ClientCore().result("j"), result_reply("cancelled"))


def test_result_times_out_when_the_job_is_still_running() -> None:
    with pytest.raises(ResultTimeout, match="still running"):
        drive(ClientCore().result("j", timeout=0), result_reply("running"))


def test_result_polls_again_in_slices_until_the_job_ends() -> None:
    clock = FakeClock()
    core = ClientCore(clock)
    plan = core.result("j")  # no timeout: polls of MAX_WAIT_SLICE for ever
    waits = []
    for _ in range(3):
        assert isinstance(plan, Step) and isinstance(plan.request, p.GetResult)
        waits.append((plan.request.wait, plan.wait))
        clock.now += MAX_WAIT_SLICE
        plan = plan.answer(result_reply("queued"))
    assert waits == [(MAX_WAIT_SLICE, MAX_WAIT_SLICE)] * 3
    assert isinstance(plan, Step)
    assert plan.answer(result_reply("succeeded", "done")) == "done"


def test_result_waits_no_longer_than_its_timeout() -> None:
    clock = FakeClock()
    plan = ClientCore(clock).result("j", timeout=45)
    assert isinstance(plan, Step) and plan.wait == MAX_WAIT_SLICE
    clock.now += MAX_WAIT_SLICE
    plan = plan.answer(result_reply("running"))
    assert isinstance(plan, Step) and plan.wait == pytest.approx(15)
    clock.now += 15
    with pytest.raises(ResultTimeout):
        plan.answer(result_reply("running"))


# The info structs some replies carry.
JOB_INFO = p.JobInfo("j", "t", "default", "queued", 0, 5, 0, 1.0, None, None, None, None, [])
FLOW_INFO = p.FlowInfo("f", "chain", "running", ["a", "b"], {"a": "succeeded"}, 1.0)
STATUS_INFO = p.StatusInfo({"default": {"queued": 1}}, [], {"enqueued": 1})
SUPERVISOR_INFO = p.SupervisorInfo("s", "host", 1, [], [])
PAGE = JobPage([JOB_INFO])
PAGE.cursor = "next"

#: Each operation: its arguments, the request it sends, a canned reply, its value.
CASES: dict[str, tuple[tuple[Any, ...], dict[str, Any], type[p.Msg], p.ClientReply, Any]] = {
    "enqueue": (("t",), {"id": "a"}, p.Enqueue, p.EnqueueOk(1, ["a"]), "a"),
    "enqueue_many": (
        ([Job("t"), Job("t")],),
        {},
        p.Enqueue,
        p.EnqueueOk(1, ["a", "b"]),
        ["a", "b"],
    ),
    "enqueue_chain": (([Job("t")],), {}, p.EnqueueFlow, p.EnqueueOk(1, ["f", "a"]), "f"),
    "enqueue_group": (([Job("t")], Job("cb")), {}, p.EnqueueFlow, p.EnqueueOk(1, ["g"]), "g"),
    "job": (("j",), {}, p.GetJob, p.JobReply(1, JOB_INFO), JOB_INFO),
    "result": (("j",), {}, p.GetResult, result_reply("succeeded", 4), 4),
    "status": ((), {}, p.GetStatus, p.StatusReply(1, STATUS_INFO), STATUS_INFO),
    "ping": ((), {}, p.Ping, p.Pong(1, "broker-1"), "broker-1"),
    "chain": (("f",), {}, p.GetFlow, p.FlowReply(1, FLOW_INFO), FLOW_INFO),
    "group": (("f",), {}, p.GetFlow, p.FlowReply(1, FLOW_INFO), FLOW_INFO),
    "jobs": (("default",), {"cursor": "c"}, p.ListJobs, p.JobList(1, [JOB_INFO], "next"), PAGE),
    "cancel": (("j",), {}, p.Cancel, p.Ack(1, 0), False),
    "retry": (("j",), {}, p.RetryJobs, p.Ack(1, 1, ["j"]), "j"),
    "retry_failed": ((), {"queue": "q"}, p.RetryJobs, p.Ack(1, 2, ["a", "b"]), ["a", "b"]),
    "delete": (("j",), {}, p.Delete, p.Ack(1, 1, ["j"]), None),
    "purge": (("q",), {}, p.Purge, p.Ack(1, 3), 3),
    "pause": (("q",), {}, p.Pause, p.Ack(1, 1), None),
    "resume": (("q",), {}, p.Pause, p.Ack(1, 1), None),
    "report_supervisor": ((SUPERVISOR_INFO,), {}, p.SupervisorReport, p.Ack(1, 7), 7),
    "worker_exited": (("host", 1, "killed"), {}, p.WorkerExited, p.Ack(1, 1), 1),
}


def test_every_operation_has_a_case() -> None:
    assert CASES.keys() == operations().keys()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_core_reads_each_reply(name: str) -> None:
    args, kwargs, request_type, reply, expected = CASES[name]
    value, (request,) = drive(getattr(ClientCore(), name)(*args, **kwargs), reply)
    assert type(request) is request_type
    assert value == expected
    if name == "jobs":
        assert value.cursor == "next"


Sent = list[tuple[p.ClientRequest, float]]


def canned(replies: Iterator[p.ClientReply], sent: Sent) -> Callable[..., p.ClientReply]:
    def call(request: p.ClientRequest, wait: float, *budget: object) -> p.ClientReply:
        sent.append((request, wait))
        return next(replies)

    return call


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_clients_drive_the_core_alike(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each client, its socket replaced by canned replies, sends the same
    requests and returns the same value."""
    args, kwargs, _, reply, expected = CASES[name]
    blocking_sent: Sent = []
    awaiting_sent: Sent = []
    blocking = Client(ENDPOINT)
    awaiting = AsyncClient(ENDPOINT)
    monkeypatch.setattr(blocking, "_call", canned(iter([reply]), blocking_sent))
    call = canned(iter([reply]), awaiting_sent)

    async def call_async(request: p.ClientRequest, wait: float, *budget: object) -> p.ClientReply:
        return call(request, wait)

    monkeypatch.setattr(awaiting, "_call", call_async)
    assert getattr(blocking, name)(*args, **kwargs) == expected
    assert asyncio.run(getattr(awaiting, name)(*args, **kwargs)) == expected
    assert [(type(r), r.req, wait) for r, wait in blocking_sent] == [
        (type(r), r.req, wait) for r, wait in awaiting_sent
    ]


def test_both_clients_raise_the_same_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = p.ErrorReply(1, "not_found", "no job with id 'j'")
    blocking, awaiting = Client(ENDPOINT), AsyncClient(ENDPOINT)
    monkeypatch.setattr(blocking, "_call", lambda request, wait, *budget: reply)

    async def call_async(request: p.ClientRequest, wait: float, *budget: object) -> p.ClientReply:
        return reply

    monkeypatch.setattr(awaiting, "_call", call_async)
    with pytest.raises(JobNotFound):
        blocking.cancel("j")
    with pytest.raises(JobNotFound):
        asyncio.run(awaiting.cancel("j"))


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda c: c.enqueue("t.task", 1, priority=2**70), "priority"),
        (lambda c: c.enqueue("t.task", 1, max_retries=2**70), "max_retries"),
        (lambda c: c.enqueue_many([Job("t.task", 1, max_attempts=-(2**70))]), "max_attempts"),
        (lambda c: c.jobs(limit=2**70), "limit"),
        # text that is not valid UTF-8: a UnicodeEncodeError the CLI blamed on PAYLOAD_JSON
        (lambda c: c.enqueue("t.task", 1, headers={"k": "\ud800"}), r"headers\['k'\]"),
        (lambda c: c.enqueue("t.task", 1, queue="q\udcff"), "queue"),
        (lambda c: c.enqueue("t.task", 1, limit_key="\ud800"), "limit_key"),
    ],
)
def test_what_msgpack_cannot_carry_is_a_value_error_naming_its_field(
    call: Callable[[ClientCore], Any], named: str
) -> None:
    """It was msgspec's OverflowError or UnicodeEncodeError, naming nothing."""
    with pytest.raises(ValueError, match=named):
        encode_request(call(ClientCore()).request, 1 << 20)
