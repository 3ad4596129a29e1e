"""Tests for corral.broker.protocol: every wire message round-trips, user
payloads travel as opaque bytes, and decode() turns every malformed frame
into ProtocolError (never anything else: a remote peer must not be able to
crash the broker with one frame)."""

from __future__ import annotations

import typing

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corral.broker import protocol as p
from corral.broker.protocol import (
    NIL,
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    encode_value,
)

DECODERS = {
    "ClientRequest": (p.ClientRequest, p.client_request_decoder),
    "ClientReply": (p.ClientReply, p.client_reply_decoder),
    "WorkerReport": (p.WorkerReport, p.worker_report_decoder),
    "WorkerCommand": (p.WorkerCommand, p.worker_command_decoder),
}
ALL_DECODERS = [dec for _, dec in DECODERS.values()]


def raw(obj: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(obj))


ERR = p.ErrorInfo("ValueError", "bad input: 'x'", "Traceback (most recent call last):\n  ...")
TRY1 = p.TryInfo(1, "worker-7f3a", "web-1", 4242, 1700000000.25, 1700000001.5, ERR)
TRY2 = p.TryInfo(2, "worker-7f3a", "web-1", 4243, 1700000010.0)
JOB_INFO = p.JobInfo(
    id="0b9c1f4e6d2a4c3e9f1a2b3c4d5e6f70",
    task="emails.send",
    queue="emails",
    status="running",
    attempts=2,
    max_attempts=5,
    priority=-3,
    created_at=1699999999.125,
    next_run_at=None,
    started_at=1700000010.0,
    ended_at=None,
    error=ERR,
    tries=[TRY1, TRY2],
    timeout=30.0,
    unique_key="user:42:welcome",
)
WORKER_INFO = p.WorkerInfo(
    worker_id="worker-7f3a",
    host="web-1",
    pid=4243,
    queues=["emails", "default"],
    concurrency=4,
    credit=2,
    running=["0b9c1f4e6d2a4c3e9f1a2b3c4d5e6f70"],
    tasks=["emails.send", "reports.daily"],
    last_seen_ago=0.4,
    processed=1234,
    failed=5,
)
PAYLOAD = raw({"to": "a@b.example", "subject": "Hi ✓", "n": [1, 2.5, None, True], "b": b"\x00\xff"})
RESULT = raw({"receipt": "r-1", "ok": True})

SAMPLES: dict[str, list[p.Msg]] = {
    "ClientRequest": [
        p.Enqueue(
            7,
            [
                p.JobSpec("id-1", "emails.send", PAYLOAD),
                p.JobSpec(
                    "id-2",
                    "reports.daily",
                    NIL,
                    queue="reports",
                    priority=10,
                    delay=2.5,
                    run_at=1700000100.0,
                    max_attempts=3,
                    timeout=12.0,
                    unique_key="daily:2023-11-14",
                    result_ttl=3600.0,
                ),
            ],
        ),
        p.Enqueue(8, []),
        p.GetJob(9, "id-1"),
        p.GetResult(10, "id-2", wait=5.0),
        p.GetResult(11, "id-2"),
        p.GetStatus(12),
        p.Ping(13),
        p.WorkerExited(14, "web-1", 4243, "killed by SIGKILL"),
        p.SupervisorReport(
            15,
            p.SupervisorInfo(
                "web-1/100",
                "web-1",
                100,
                [p.PoolInfo("default", ["default"], 2, 1, False)],
                [p.ProcessInfo("default", 0, 4243, 50_000_000, ["id-1"], 12.5)],
            ),
        ),
        p.Cancel(16, "id-1"),
        p.RetryJobs(17, "id-1"),
        p.RetryJobs(18, all_failed=True, queue="emails"),
        p.Delete(19, "id-1"),
        p.Purge(20, "emails"),
        p.Pause(21, "emails"),
        p.Pause(22, "emails", paused=False),
        p.ListJobs(23, queue="emails", status="failed", task="emails.send", limit=5, cursor="12"),
        p.ListJobs(24),
        p.EnqueueFlow(
            25,
            "flow-1",
            "group",
            [p.JobSpec("g1", "t", PAYLOAD, on_success=p.JobSpec("cb1", "t")), p.JobSpec("g2", "t")],
            callback=p.JobSpec("chord", "sum"),
        ),
        p.EnqueueFlow(26, "flow-2", "chain", [p.JobSpec("c1", "t")]),
        p.GetFlow(27, "flow-1"),
        p.EnqueueEach(28, [p.JobSpec("id-3", "emails.send", PAYLOAD), p.JobSpec("id-4", "t")]),
    ],
    "ClientReply": [
        p.EnqueueOk(7, ["id-1", "id-2"]),
        p.EachReply(28, [p.EnqueueOk(0, ["id-3"]), p.ErrorReply(0, "invalid", "task: empty")]),
        p.JobReply(9, JOB_INFO),
        p.ResultReply(10, "id-2", "succeeded", RESULT),
        p.ResultReply(11, "id-3", "failed", NIL, ERR),
        p.StatusReply(
            12,
            p.StatusInfo(
                queues={"emails": {"queued": 3, "running": 1}, "default": {"failed": 2}},
                workers=[WORKER_INFO],
                stats={"delivered": 10, "late_results": 1},
                broker_id="b-1",
            ),
        ),
        p.Pong(13, "b-1"),
        p.Ack(14, 3),
        p.Ack(15),
        p.Ack(16, 2, ["id-1", "id-2"]),
        p.JobList(23, [JOB_INFO], "12"),
        p.JobList(24, []),
        p.FlowReply(
            27,
            p.FlowInfo(
                "flow-1",
                "group",
                "failed",
                ["g1", "g2"],
                {"g1": "succeeded", "g2": "failed"},
                1700000000.0,
                1,
                "chord",
            ),
        ),
        p.ErrorReply(14, "not_found", "no job with id 'nope' (it may have expired)"),
    ],
    "WorkerReport": [
        p.Ready(
            "worker-7f3a",
            ["emails", "default"],
            8,
            4,
            [p.TaskInfo("emails.send", 5, 30.0, 1.0, 600.0, 86400.0), p.TaskInfo("noop")],
            "web-1",
            4243,
        ),
        p.Report(
            [p.Lease("id-1", 101), p.Lease("id-2", 102)],
            [
                p.Outcome("id-1", 101, "ok", RESULT, None, None, 1700000000.0, 1700000001.0),
                p.Outcome("id-2", 102, "error", NIL, ERR),
                p.Outcome("id-3", 103, "retry", NIL, None, 10.0),
                p.Outcome("id-4", 104, "fail", NIL, ERR, None, 1.0, 2.0),
            ],
        ),
        p.Report([], []),
        p.Report([], [], progress=[p.Progress("id-1", 101, 0.5, "half way")]),
        p.Ready("w", ["a", "b"], 4, 2, [], "h", 1, queue_weights={"a": 3, "b": 1}),
        p.Ready("w", ["a"], 4, 2, [], "h", 1, holding=[p.Holding("id-1", 101, True)]),
        p.Return([p.Lease("id-5", 105)]),
        p.Return([p.Lease("id-6", 106)], ref=7),
        p.WorkerHeartbeat(),
        p.Drain(),
        p.Bye(),
    ],
    "WorkerCommand": [
        p.Deliver(
            [
                p.Delivery(
                    "id-1", 101, "emails.send", PAYLOAD, 1, 5, "emails", 1699999999.5, 30.0, RESULT
                ),
                p.Delivery("id-2", 102, "noop", NIL, 3, 3, "default", 1699999999.5, priority=-3),
            ]
        ),
        p.BrokerHeartbeat("b-1"),
        p.BrokerHeartbeat(),
        p.Reregister(),
        p.Registered([p.Lease("id-1", 101)]),
        p.Registered(),
        p.Farewell(),
        p.CancelJob("id-1", 101),
        p.Withdraw([p.Lease("id-2", 102), p.Lease("id-3", 103)], 7),
        p.Refused("ready", "Ready.tasks[0].timeout: expected a finite number"),
        p.Refused("", "not msgpack"),
    ],
}

ALL_SAMPLES = [(union, msg) for union, msgs in SAMPLES.items() for msg in msgs]


def sample_id(item: tuple[str, p.Msg]) -> str:
    return f"{item[0]}-{type(item[1]).__name__}"


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("union", list(DECODERS))
def test_samples_cover_every_member_of_the_union(union: str) -> None:
    members = set(typing.get_args(DECODERS[union][0]))
    assert members == {type(m) for m in SAMPLES[union]}


@pytest.mark.parametrize("item", ALL_SAMPLES, ids=sample_id)
def test_round_trip(item: tuple[str, p.Msg]) -> None:
    union, msg = item
    frame = encode(msg)
    back = decode(DECODERS[union][1], frame)
    assert type(back) is type(msg)
    assert back == msg
    assert back.v == PROTOCOL_VERSION
    # the frame is one msgpack array whose first element is the tag; the
    # version follows the fields of protocol v1's first cut, and fields
    # added since come after it (old peers ignore trailing fields)
    as_list = msgspec.msgpack.decode(frame)
    assert as_list[0] == type(msg).__name__.lower()
    fields = type(msg).__struct_fields__
    assert as_list[1 + fields.index("v")] == PROTOCOL_VERSION


@pytest.mark.parametrize("item", ALL_SAMPLES, ids=sample_id)
def test_a_message_does_not_decode_as_another_direction(item: tuple[str, p.Msg]) -> None:
    union, msg = item
    frame = encode(msg)
    for other, (_, decoder) in DECODERS.items():
        if other != union:
            with pytest.raises(ProtocolError):
                decode(decoder, frame)


def test_trailing_fields_from_a_newer_peer_are_ignored() -> None:
    frame = msgspec.msgpack.encode(["ping", 5, PROTOCOL_VERSION, "a field added later"])
    assert decode(p.client_request_decoder, frame) == p.Ping(5)


def test_encode_value_and_nil() -> None:
    assert bytes(NIL) == msgspec.msgpack.encode(None)
    value = {"a": [1, 2, {"b": None}], "c": b"\x01"}
    encoded = encode_value(value)
    assert isinstance(encoded, msgspec.Raw)
    assert msgspec.msgpack.decode(encoded) == value


# -- payloads are relayed untouched -----------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=5)
    ),
    max_leaves=30,
)

#: Valid msgpack that msgspec itself would never produce, so a decode and
#: re-encode would change it: 1 as uint64, "a" as str8, a map with a
#: duplicated key, an ext type, a float32, bin8 with a zero length.
NON_CANONICAL = [
    b"\xcf\x00\x00\x00\x00\x00\x00\x00\x01",
    b"\xd9\x01a",
    b"\x82\xa1k\x01\xa1k\x02",
    b"\xd4\x05\x07",
    b"\xca\x3f\x80\x00\x00",
    b"\xc4\x00",
    b"\xdc\x00\x02\xc0\xc3",
]


def relaying_frames(payload: msgspec.Raw) -> list[tuple[msgspec.msgpack.Decoder, bytes]]:
    return [
        (p.client_request_decoder, encode(p.Enqueue(1, [p.JobSpec("j", "t", payload)]))),
        (p.client_reply_decoder, encode(p.ResultReply(1, "j", "succeeded", payload))),
        (p.worker_report_decoder, encode(p.Report([], [p.Outcome("j", 1, "ok", payload)]))),
        (
            p.worker_command_decoder,
            encode(p.Deliver([p.Delivery("j", 1, "t", payload, 1, 5, "q", 1.0, None, payload)])),
        ),
    ]


def carried(msg: p.Msg) -> list[bytes]:
    match msg:
        case p.Enqueue():
            return [bytes(msg.jobs[0].payload)]
        case p.ResultReply():
            return [bytes(msg.result)]
        case p.Report():
            return [bytes(msg.done[0].result)]
        case p.Deliver():
            return [bytes(msg.jobs[0].payload), bytes(msg.jobs[0].prev_result)]
    raise AssertionError(msg)


def assert_relayed(payload_bytes: bytes) -> None:
    for decoder, frame in relaying_frames(msgspec.Raw(payload_bytes)):
        msg = decode(decoder, frame)
        for got in carried(msg):
            assert got == payload_bytes


@given(msgpack_values)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_payloads_are_relayed_byte_identical(value: object) -> None:
    assert_relayed(msgspec.msgpack.encode(value))


@pytest.mark.parametrize("payload", NON_CANONICAL, ids=lambda b: b.hex())
def test_non_canonical_payload_bytes_are_not_reencoded(payload: bytes) -> None:
    assert_relayed(payload)


@pytest.mark.parametrize("depth", [50, 300])
def test_deeply_nested_payload_survives(depth: int) -> None:
    payload = b"\x91" * depth + b"\x81\xa1k" + b"\x92\xc0\x01"
    assert_relayed(payload)


# -- malformed frames -------------------------------------------------------------


@pytest.mark.parametrize("item", ALL_SAMPLES, ids=sample_id)
def test_every_truncation_is_a_protocol_error(item: tuple[str, p.Msg]) -> None:
    union, msg = item
    frame = encode(msg)
    decoder = DECODERS[union][1]
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode(decoder, frame[:cut])


@pytest.mark.parametrize("item", ALL_SAMPLES, ids=sample_id)
def test_wrong_protocol_version_names_both_versions(item: tuple[str, p.Msg]) -> None:
    union, msg = item
    wrong = msgspec.structs.replace(msg, v=PROTOCOL_VERSION + 6)
    with pytest.raises(ProtocolError) as info:
        decode(DECODERS[union][1], encode(wrong))
    text = str(info.value)
    assert "version" in text
    assert f"{PROTOCOL_VERSION + 6}" in text
    assert f"speaks {PROTOCOL_VERSION}" in text


WRONG_TYPES = [
    (p.client_request_decoder, ["getjob", "seven", "id-1", 1]),
    (p.client_request_decoder, ["getjob", 7, 12345, 1]),
    (p.client_request_decoder, ["enqueue", 7, {"id": "x"}, 1]),
    (p.client_request_decoder, ["enqueue", 7, [["id", "t", NIL, "q", "high"]], 1]),
    (p.client_request_decoder, ["getresult", 7, "id", "soon", 1]),
    (p.client_request_decoder, ["ping", 7, "1"]),
    (p.client_request_decoder, ["ping"]),
    (p.client_request_decoder, [7, 1]),
    (p.client_request_decoder, {"op": "ping", "req": 1}),
    (p.client_reply_decoder, ["enqueueok", 7, "id-1", 1]),
    (p.client_reply_decoder, ["jobreply", 7, ["not", "a", "jobinfo"], 1]),
    (p.worker_report_decoder, ["ready", "w", ["q"], 2.5, 1, [], "h", 1, 1]),
    (p.worker_report_decoder, ["ready", "w", "q", 2, 1, [], "h", 1, 1]),
    (p.worker_report_decoder, ["report", [["id", "lease"]], [], 1]),
    (p.worker_report_decoder, ["report", [], [["id", 1, "ok", NIL, "boom"]], 1]),
    (p.worker_command_decoder, ["deliver", [["id", 1, "t", NIL, "1", 5, "q", 1.0]], 1]),
    (p.worker_command_decoder, ["brokerheartbeat", None, 1]),
]


@pytest.mark.parametrize(("decoder", "obj"), WRONG_TYPES, ids=lambda x: repr(x)[:40])
def test_wrong_field_types_are_protocol_errors(
    decoder: msgspec.msgpack.Decoder, obj: object
) -> None:
    with pytest.raises(ProtocolError):
        decode(decoder, msgspec.msgpack.encode(obj))


def test_wrong_type_error_says_where() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(p.client_request_decoder, msgspec.msgpack.encode(["getjob", "seven", "id", 1]))
    assert "int" in str(info.value)
    assert "GetJob.req" in str(info.value)  # the field, by name


@pytest.mark.parametrize("tag", ["frobnicate", "", "PING", "ping ", "msg"])
@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_unknown_tag_is_a_protocol_error(decoder: msgspec.msgpack.Decoder, tag: str) -> None:
    with pytest.raises(ProtocolError):
        decode(decoder, msgspec.msgpack.encode([tag, 1, PROTOCOL_VERSION]))


DEEP = msgspec.Raw(b"\x91" * 100_000 + b"\xc0")

DEEP_FRAMES = {
    "enqueue-payload": (p.client_request_decoder, ["enqueue", 1, [["j", "t", DEEP]], 1]),
    "enqueue-jobs": (p.client_request_decoder, ["enqueue", 1, DEEP, 1]),
    "getjob-job_id": (p.client_request_decoder, ["getjob", 1, DEEP, 1]),
    "getjob-req": (p.client_request_decoder, ["getjob", DEEP, "j", 1]),
    "ping-v": (p.client_request_decoder, ["ping", 1, DEEP]),
    "resultreply-result": (
        p.client_reply_decoder,
        ["resultreply", 1, "j", "succeeded", DEEP, None, 1],
    ),
    "report-result": (p.worker_report_decoder, ["report", [], [["j", 1, "ok", DEEP]], 1]),
    "report-done": (p.worker_report_decoder, ["report", [], DEEP, 1]),
    "deliver-payload": (
        p.worker_command_decoder,
        ["deliver", [["j", 1, "t", DEEP, 1, 5, "q", 1.0, None, NIL]], 1],
    ),
    "deliver-prev_result": (
        p.worker_command_decoder,
        ["deliver", [["j", 1, "t", NIL, 1, 5, "q", 1.0, None, DEEP]], 1],
    ),
    "deep-map-payload": (
        p.client_request_decoder,
        ["enqueue", 1, [["j", "t", msgspec.Raw(b"\x81\xc0" * 100_000 + b"\xc0")]], 1],
    ),
}


@pytest.mark.parametrize("case", list(DEEP_FRAMES))
def test_absurd_nesting_is_a_protocol_error(case: str) -> None:
    decoder, obj = DEEP_FRAMES[case]
    frame = msgspec.msgpack.encode(obj)
    with pytest.raises(ProtocolError):
        decode(decoder, frame)


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_a_deeply_nested_frame_is_a_protocol_error(decoder: msgspec.msgpack.Decoder) -> None:
    with pytest.raises(ProtocolError):
        decode(decoder, bytes(DEEP))


BAD_STR = msgspec.Raw(b"\xa2\xff\xfe")  # a str of two bytes that are not UTF-8

#: (decoder, frame) pairs holding invalid UTF-8 where a str belongs.
INVALID_UTF8 = {
    "tag": (p.client_request_decoder, msgspec.msgpack.encode([BAD_STR, 1, 1])),
    "fuzzed-tag": (p.worker_report_decoder, b"\x92\xa8jobre\x01l\xdd\x01"),
    "getjob-job_id": (p.client_request_decoder, msgspec.msgpack.encode(["getjob", 1, BAD_STR, 1])),
    "errorreply-message": (
        p.client_reply_decoder,
        msgspec.msgpack.encode(["errorreply", 1, "invalid", BAD_STR, 1]),
    ),
    "ready-worker_id": (
        p.worker_report_decoder,
        msgspec.msgpack.encode(["ready", BAD_STR, ["q"], 1, 1, [], "h", 1, 1]),
    ),
    "deliver-task": (
        p.worker_command_decoder,
        msgspec.msgpack.encode(["deliver", [["j", 1, BAD_STR, NIL, 1, 5, "q", 1.0]], 1]),
    ),
}


@pytest.mark.parametrize("case", list(INVALID_UTF8))
def test_invalid_utf8_is_a_protocol_error(case: str) -> None:
    decoder, frame = INVALID_UTF8[case]
    with pytest.raises(ProtocolError):
        decode(decoder, frame)


def _decode_or_protocol_error(frame: bytes) -> None:
    for union, (members, decoder) in DECODERS.items():
        try:
            msg = decode(decoder, frame)
        except ProtocolError:
            continue
        assert isinstance(msg, typing.get_args(members)), union
        assert msg.v == PROTOCOL_VERSION


@given(st.binary(max_size=64))
@example(INVALID_UTF8["tag"][1])
@settings(max_examples=300, deadline=None)
def test_decode_of_arbitrary_bytes_raises_only_protocol_error(frame: bytes) -> None:
    _decode_or_protocol_error(frame)


tags = st.sampled_from(
    [t.__name__.lower() for d in DECODERS.values() for t in typing.get_args(d[0])]
)
fields = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4),
    max_leaves=12,
)


mutated_messages = given(
    st.tuples(tags, st.lists(fields, max_size=9)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
)


def mutated_message_raises_only_protocol_error(
    message: tuple[str, list[object]], flips: list[tuple[int, int]]
) -> None:
    """Near-valid frames: a real tag, random fields, a few bytes overwritten."""
    tag, rest = message
    frame = bytearray(msgspec.msgpack.encode([tag, *rest]))
    for pos, byte in flips:
        if frame:
            frame[pos % len(frame)] = byte
    _decode_or_protocol_error(bytes(frame))


# 100 frames in the fast suite (300 cost it 2 s of CPU), 3,000 in the soak profile.
test_decode_of_mutated_messages_raises_only_protocol_error = settings(
    max_examples=100, deadline=None
)(mutated_messages(mutated_message_raises_only_protocol_error))
test_decode_of_mutated_messages_raises_only_protocol_error_soak = pytest.mark.soak(
    settings(max_examples=3_000, deadline=None)(
        mutated_messages(mutated_message_raises_only_protocol_error)
    )
)
