"""The ``corral`` command. Exit codes: 0 ok, 1 job failed or not found,
2 usage or config error, 3 broker unreachable."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from corral.broker.state import STATUSES
from corral.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    CorralError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ResultTimeout,
)

if TYPE_CHECKING:
    from corral.broker.log import VerifyReport

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONFIG_SEARCH = ("corral.toml", "/etc/corral/corral.toml")


# ------------------------------------------------------------------ config


def config_path(path: str | None) -> str | None:
    """The config file named by -c, $CORRAL_CONFIG, ./corral.toml or
    /etc/corral/corral.toml; None means the defaults."""
    path = path or os.environ.get("CORRAL_CONFIG")
    if path:
        return path
    return next((c for c in CONFIG_SEARCH if Path(c).is_file()), None)


def load_config(path: str | None) -> Any:
    from corral.config import Config, load

    found = config_path(path)
    return load(found) if found else Config.default()


def make_client(args: argparse.Namespace) -> Any:
    from corral.client import Client

    config = load_config(args.config)
    return Client(args.endpoint, config=config, timeout=args.timeout or config.client.timeout)


# ---------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str] | None = None) -> None:
    if args.json or human is None:
        sys.stdout.write(msgspec.json.encode(_plain(value)).decode() + "\n")
    else:
        sys.stdout.write(human(value) + "\n")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def human_job(info: Any) -> str:
    lines = [
        f"id:          {info.id}",
        f"task:        {info.task}",
        f"queue:       {info.queue}",
        f"status:      {info.status}",
        f"attempts:    {info.attempts}/{info.max_attempts}",
        f"created:     {_when(info.created_at)}",
        f"next run:    {_when(info.next_run_at)}",
    ]
    if info.error is not None:
        lines.append(f"error:       {info.error.type}: {info.error.message}")
    for t in info.tries:
        outcome = f"{t.error.type}: {t.error.message}" if t.error else "ok"
        if t.ended_at is None:
            outcome = "running"
        lines.append(
            f"  try {t.attempt}: {t.worker} pid {t.pid} on {t.host}, "
            f"{_when(t.started_at)} -> {_when(t.ended_at)}: {outcome}"
        )
    return "\n".join(lines)


def human_status(status: Any) -> str:
    lines = ["queue".ljust(20) + "".join(s.rjust(11) for s in STATUSES)]
    for queue, counts in status.queues.items():
        lines.append(queue.ljust(20) + "".join(str(counts.get(s, 0)).rjust(11) for s in STATUSES))
    if not status.queues:
        lines.append("(no jobs)")
    if status.paused:
        lines.append(f"paused: {', '.join(status.paused)}")
    if status.rates:
        lines.append(
            f"last minute: {status.rates.get('processed_per_minute', 0):.0f} processed, "
            f"{status.rates.get('failed_per_minute', 0):.0f} failed"
        )
    if status.registered_tasks:
        lines.append(f"tasks: {', '.join(status.registered_tasks)}")
    for sup in status.supervisors:
        lines.append("")
        lines.append(f"supervisor {sup.supervisor_id} (pid {sup.pid} on {sup.host})")
        for pool in sup.pools:
            state = "FAILED" if pool.failed else "ok"
            lines.append(
                f"  pool {pool.name}: {pool.processes} processes, queues={','.join(pool.queues)}"
                f", restarts={pool.restarts}, {state}"
            )
        for w in sup.workers:
            jobs = ",".join(w.jobs) or "-"
            extra = f" retiring ({w.retiring})" if w.retiring else ""
            lines.append(
                f"    {w.pool}#{w.index} pid {w.pid} rss {w.rss / 2**20:.1f}MiB "
                f"up {w.uptime:.0f}s job {jobs}{extra}"
            )
    lines.append("")
    lines.append(f"workers: {len(status.workers)}")
    for w in status.workers:
        lines.append(
            f"  {w.worker_id}  queues={','.join(w.queues)} running={len(w.running)} "
            f"credit={w.credit} processed={w.processed} failed={w.failed}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from corral.supervisor.supervisor import Supervisor

    path = config_path(args.config)
    return Supervisor(load_config(path), with_broker=True, config_path=path).run()


def cmd_supervisor(args: argparse.Namespace) -> int:
    from corral.supervisor.supervisor import Supervisor

    path = config_path(args.config)
    return Supervisor(load_config(path), with_broker=False, config_path=path).run()


def cmd_broker(args: argparse.Namespace) -> int:
    from corral.supervisor.process import set_title
    from corral.supervisor.roles import run_broker

    config = load_config(args.config)
    set_title("corral: broker")
    return run_broker(config)


def cmd_worker(args: argparse.Namespace) -> int:
    from corral.config import PoolConfig
    from corral.supervisor.process import set_title
    from corral.supervisor.roles import run_worker

    config = load_config(args.config)
    base = config.pools[0] if config.pools else PoolConfig(name="cli")
    pool = msgspec.structs.replace(
        base,
        queues=args.queue or list(base.queues),
        plugins=args.plugin or list(base.plugins),
        concurrency=args.concurrency or base.concurrency,
    )
    set_title(f"corral: worker {pool.name}#0")
    return run_worker(config, pool, 0)


def cmd_enqueue(args: argparse.Namespace) -> int:
    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            raise UsageError(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
    options = {
        "queue": args.queue,
        "priority": args.priority,
        "delay": args.delay,
        "max_attempts": args.max_attempts,
        "timeout": args.job_timeout,
        "unique_key": args.unique_key,
        "unique_for": args.unique_for,
        "run_at": args.run_at,
        "result_ttl": args.result_ttl,
    }
    with make_client(args) as client:
        job_id = client.enqueue(args.task, payload, **options)
        if not args.wait:
            emit(args, {"id": job_id}, lambda v: v["id"])
            return EXIT_OK
        value = client.result(job_id, timeout=args.wait_timeout)
        emit(args, {"id": job_id, "result": value}, lambda v: json.dumps(v["result"]))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, client.status(), human_status)
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, client.job(args.id), human_job)
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        timeout = args.wait_timeout if args.wait else 0.0
        value = client.result(args.id, timeout=timeout)
        emit(args, {"id": args.id, "result": value}, lambda v: json.dumps(v["result"]))
    return EXIT_OK


def human_jobs(page: Any) -> str:
    lines = [f"{'id':32}  {'status':10} {'attempts':>8}  {'queue':12} task"]
    for info in page:
        lines.append(
            f"{info.id:32}  {info.status:10} {info.attempts:>8}  {info.queue:12} {info.task}"
        )
    if page.cursor:
        lines.append(f"(more: --cursor {page.cursor})")
    return "\n".join(lines)


def cmd_jobs(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        page = client.jobs(args.queue, args.status, args.limit, task=args.task, cursor=args.cursor)
        if args.json:
            emit(args, {"jobs": list(page), "cursor": page.cursor})
        else:
            emit(args, page, human_jobs)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        cancelled = client.cancel(args.id)
        emit(
            args,
            {"id": args.id, "cancelled": cancelled},
            lambda v: "cancelled" if v["cancelled"] else "not cancelled: the job had ended",
        )
    return EXIT_OK if cancelled else EXIT_JOB


def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.failed):
        raise UsageError("give a job ID or --failed (optionally with --queue), not both")
    with make_client(args) as client:
        ids = client.retry_failed(args.queue) if args.failed else [client.retry(args.id)]
        emit(args, {"retried": ids}, lambda v: f"retried {len(v['retried'])} job(s)")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        client.delete(args.id)
        emit(args, {"deleted": args.id}, lambda v: f"deleted {v['deleted']}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        count = client.purge(args.queue)
        emit(
            args,
            {"queue": args.queue, "purged": count},
            lambda v: f"purged {v['purged']} queued job(s) from {v['queue']}",
        )
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        (client.pause if args.command == "pause" else client.resume)(args.queue)
        emit(
            args,
            {"queue": args.queue, "paused": args.command == "pause"},
            lambda v: f"{v['queue']}: {'paused' if v['paused'] else 'resumed'}",
        )
    return EXIT_OK


def human_flow(info: Any) -> str:
    lines = [f"{info.kind} {info.id}: {info.status}"]
    if info.failed_step is not None:
        lines.append(f"stopped at step {info.failed_step}")
    for index, job_id in enumerate(info.jobs):
        lines.append(f"  {index}: {job_id} {info.statuses.get(job_id, 'not created')}")
    if info.callback:
        lines.append(f"  callback: {info.callback}")
    return "\n".join(lines)


def _job_arg(text: str) -> Any:
    """A job given as JSON: {"task": ..., "payload": ..., "queue": ..., ...},
    callbacks nested as {"on_success": {"task": ...}}."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{text!r} is not valid JSON: {exc}") from None
    return _job_from(fields, text)


def _job_from(fields: Any, text: str) -> Any:
    from corral.client import Job

    if not isinstance(fields, dict) or "task" not in fields:
        raise UsageError(f'{text!r}: a job is a JSON object like {{"task": "x.y", "payload": 1}}')
    for callback in ("on_success", "on_failure"):
        if fields.get(callback) is not None:
            fields[callback] = _job_from(fields[callback], text)
    try:
        return Job(**fields)
    except TypeError as exc:
        raise UsageError(f"{text!r}: {exc}") from None


def cmd_enqueue_flow(args: argparse.Namespace) -> int:
    jobs = [_job_arg(text) for text in args.jobs]
    with make_client(args) as client:
        if args.command == "enqueue-chain":
            flow_id = client.enqueue_chain(jobs)
        else:
            callback = _job_arg(args.callback) if args.callback else None
            flow_id = client.enqueue_group(jobs, callback=callback)
        if not args.wait:
            emit(args, {"id": flow_id}, lambda v: v["id"])
            return EXIT_OK
        value = client.result(flow_id, timeout=args.wait_timeout)
        emit(args, {"id": flow_id, "result": value}, lambda v: json.dumps(v["result"]))
    return EXIT_OK


def cmd_flow(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, getattr(client, args.command)(args.id), human_flow)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from corral.broker.schedules import ScheduleError, Scheduler

    config = load_config(args.config)
    try:
        Scheduler.from_configs(config.schedules)
    except ScheduleError as exc:
        raise ConfigError(f"schedules: {exc}") from None
    source = args.config or os.environ.get("CORRAL_CONFIG") or "defaults"
    pools = ", ".join(f"{p.name}({p.processes})" for p in config.pools) or "none"
    emit(
        args,
        {"ok": True, "config": source, "pools": [p.name for p in config.pools]},
        lambda v: f"{source}: ok (pools: {pools})",
    )
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from corral.transport import write_keypair

    public, secret = write_keypair(args.directory, args.name)
    emit(
        args,
        {"public": str(public), "secret": str(secret)},
        lambda v: f"public key: {v['public']}\nsecret key: {v['secret']} (mode 0600)",
    )
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    from corral.broker import log as corral_log

    state_dir = Path(args.state_dir or load_config(args.config).broker.state_dir)
    directory = state_dir / "log"
    if args.action == "verify":
        verified = corral_log.verify(directory)
        emit(args, verified, lambda r: _describe_verify(directory, r))
        return EXIT_OK if verified.ok else EXIT_JOB
    if args.action == "repair":
        repaired = corral_log.repair(directory)
        emit(args, repaired, lambda r: f"{directory}: {_plain(r)}")
        return EXIT_OK
    return _compact_offline(args, state_dir)


def _describe_verify(directory: Path, report: VerifyReport) -> str:
    text = f"{directory}: {report.segments} segments, {report.records} records"
    if report.corrupt:
        seg, offset, reason = report.corrupt
        return f"{text}; CORRUPT at {seg} offset {offset}: {reason} (run `corral log repair`)"
    if report.torn_tail:
        seg, offset = report.torn_tail
        return f"{text}; torn tail at {seg} offset {offset} (truncated on next start)"
    return f"{text}; ok"


def _compact_offline(args: argparse.Namespace, state_dir: Path) -> int:
    from corral.broker.core import BrokerCore
    from corral.broker.lockfile import StateDirLock

    config = load_config(args.config)
    config = msgspec.structs.replace(
        config, broker=msgspec.structs.replace(config.broker, state_dir=str(state_dir))
    )
    core = BrokerCore(config)
    lock = StateDirLock(core.state_dir)
    lock.acquire()
    try:
        for record in core.log.replay():
            core.state.apply(record)
        before = core.log.stats()
        core.log.compact(core.state.snapshot())
        after = core.log.stats()
        core.log.close()
    finally:
        lock.release()
    emit(
        args,
        {"jobs": len(core.state.jobs), "before": before, "after": after},
        lambda v: (
            f"compacted: {v['jobs']} live jobs; "
            f"{v['before'].get('used_bytes')} -> {v['after'].get('used_bytes')} bytes"
        ),
    )
    return EXIT_OK


# ------------------------------------------------------------------ parser


class UsageError(CorralError):
    """Bad command-line input."""


def _common(sub: argparse.ArgumentParser, broker: bool = True) -> None:
    sub.add_argument("-c", "--config", help="config file (TOML)")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    if broker:
        sub.add_argument(
            "--endpoint", help="broker client endpoint, e.g. ipc://var/corral/client.sock"
        )
        sub.add_argument("--timeout", type=float, help="seconds to wait for the broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description="a durable job queue")
    subs = parser.add_subparsers(dest="command", required=True)
    _add_processes(subs)
    _add_enqueue(subs)
    _add_flows(subs)
    _add_lookups(subs)
    _add_keys(subs)
    _add_jobs(subs)
    _add_single_argument(subs)
    _add_retry(subs)
    _add_log(subs)
    return parser


def _add_processes(subs: Subparsers) -> None:
    """The daemons, check-config and status; then one worker in the foreground."""
    for name, fn, text in (
        ("run", cmd_run, "broker + supervisor + worker pools in one daemon"),
        ("broker", cmd_broker, "the broker alone"),
        ("supervisor", cmd_supervisor, "worker pools alone, against a remote broker"),
        ("check-config", cmd_check_config, "validate a config file"),
        ("status", cmd_status, "queues, counts per status, workers"),
    ):
        sub = subs.add_parser(name, help=text)
        _common(sub, broker=name == "status")
        sub.set_defaults(fn=fn)
    worker = subs.add_parser("worker", help="one worker in the foreground")
    _common(worker, broker=False)
    worker.add_argument("--queue", action="append", help="queue to serve (repeatable)")
    worker.add_argument("--plugin", action="append", help="module with tasks (repeatable)")
    worker.add_argument("--concurrency", type=int)
    worker.set_defaults(fn=cmd_worker)


def _add_enqueue(subs: Subparsers) -> None:
    enqueue = subs.add_parser("enqueue", help="enqueue a job; prints its id")
    _common(enqueue)
    enqueue.add_argument("task")
    enqueue.add_argument("payload", nargs="?", metavar="PAYLOAD_JSON")
    enqueue.add_argument("--queue")
    enqueue.add_argument("--delay", type=float)
    enqueue.add_argument("--priority", type=int, default=0)
    enqueue.add_argument("--max-attempts", type=int)
    enqueue.add_argument("--job-timeout", type=float, help="seconds one attempt may run")
    enqueue.add_argument("--unique-key")
    enqueue.add_argument("--unique-for", type=float, help="seconds the key stays taken after")
    enqueue.add_argument("--run-at", type=float, help="epoch seconds to run at")
    enqueue.add_argument("--result-ttl", type=float, help="seconds to keep the result")
    enqueue.add_argument("--wait", action="store_true", help="wait and print the result")
    enqueue.add_argument("--wait-timeout", type=float, help="give up waiting after this")
    enqueue.set_defaults(fn=cmd_enqueue)


def _add_flows(subs: Subparsers) -> None:
    for name, text in (
        ("enqueue-chain", "run jobs one after another; prints the chain id"),
        ("enqueue-group", "run jobs in parallel; prints the group id"),
    ):
        flow = subs.add_parser(name, help=text)
        _common(flow)
        flow.add_argument(
            "jobs",
            nargs="+",
            metavar="JOB_JSON",
            help='e.g. \'{"task": "demo.add", "payload": [1, 2]}\'',
        )
        if name == "enqueue-group":
            flow.add_argument(
                "--callback",
                metavar="JOB_JSON",
                help="run once all succeeded, with their results (a chord)",
            )
        flow.add_argument("--wait", action="store_true", help="wait and print the result")
        flow.add_argument("--wait-timeout", type=float)
        flow.set_defaults(fn=cmd_enqueue_flow)


def _add_lookups(subs: Subparsers) -> None:
    """``job`` and ``result``: one job by id."""
    job = subs.add_parser("job", help="one job's info")
    _common(job)
    job.add_argument("id")
    job.set_defaults(fn=cmd_job)
    result = subs.add_parser("result", help="one job's result")
    _common(result)
    result.add_argument("id")
    result.add_argument("--wait", action="store_true")
    result.add_argument("--wait-timeout", type=float)
    result.set_defaults(fn=cmd_result)


def _add_keys(subs: Subparsers) -> None:
    keys = subs.add_parser("keys", help="create a CURVE key pair for tcp endpoints")
    keys.add_argument("name", help="file name stem, e.g. server or worker1")
    keys.add_argument("--directory", default=".", help="where to write NAME.key(_secret)")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(fn=cmd_keys)


def _add_jobs(subs: Subparsers) -> None:
    jobs = subs.add_parser("jobs", help="list jobs in creation order")
    _common(jobs)
    jobs.add_argument("--queue")
    jobs.add_argument("--status", choices=STATUSES)
    jobs.add_argument("--task")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.add_argument("--cursor", help="from a previous page's output")
    jobs.set_defaults(fn=cmd_jobs)


def _add_single_argument(subs: Subparsers) -> None:
    """The subcommands that take one id or one queue name."""
    for name, fn, arg, text in (
        ("chain", cmd_flow, "id", "a chain's info: its steps and where it stopped"),
        ("group", cmd_flow, "id", "a group's info: its jobs and their statuses"),
        ("cancel", cmd_cancel, "id", "cancel a job, chain or group"),
        ("delete", cmd_delete, "id", "remove a finished job and its result"),
        ("purge", cmd_purge, "queue", "remove a queue's queued jobs"),
        ("pause", cmd_pause, "queue", "stop handing out a queue's jobs"),
        ("resume", cmd_pause, "queue", "hand out a paused queue's jobs again"),
    ):
        sub = subs.add_parser(name, help=text)
        _common(sub)
        sub.add_argument(arg)
        sub.set_defaults(fn=fn)


def _add_retry(subs: Subparsers) -> None:
    retry = subs.add_parser("retry", help="put a failed job (or all, with --failed) back")
    _common(retry)
    retry.add_argument("id", nargs="?")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--queue", help="with --failed: only this queue's")
    retry.set_defaults(fn=cmd_retry)


def _add_log(subs: Subparsers) -> None:
    logp = subs.add_parser("log", help="offline log tools")
    logp.add_argument("action", choices=["verify", "repair", "compact"])
    _common(logp, broker=False)
    logp.add_argument("--state-dir", help="the broker's state_dir (default: from the config)")
    logp.set_defaults(fn=cmd_log)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except JobFailed as exc:
        _print_failure(args, exc)
        return EXIT_JOB
    except (JobNotFound, JobCancelled, ResultTimeout) as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_JOB
    except BrokerError as exc:
        print(f"corral: the broker refused: {exc}", file=sys.stderr)
        return EXIT_JOB
    except CorralError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _print_failure(args: argparse.Namespace, exc: JobFailed) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(
            msgspec.json.encode({"id": exc.job_id, "error": _plain(exc.error)}).decode() + "\n"
        )
    print(f"corral: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
