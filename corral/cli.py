"""The ``corral`` command: its arguments, and the exit code of each outcome.
Exit codes: 0 ok, 1 job failed or not found, 2 usage or config error, 3 broker
unreachable. What each subcommand does is in :mod:`corral.clicommands`, what
it prints in :mod:`corral.cliformat`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import msgspec

from corral.broker.protocol import STATUSES
from corral.clicommands import (
    EXIT_JOB,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    cmd_broker,
    cmd_cancel,
    cmd_check_config,
    cmd_delete,
    cmd_enqueue,
    cmd_enqueue_flow,
    cmd_flow,
    cmd_job,
    cmd_jobs,
    cmd_keys,
    cmd_log,
    cmd_pause,
    cmd_purge,
    cmd_reload,
    cmd_result,
    cmd_retry,
    cmd_run,
    cmd_status,
    cmd_supervisor,
    cmd_worker,
)
from corral.cliformat import plain
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
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


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
        ("reload", cmd_reload, "reload the supervisors on this host (as SIGHUP does)"),
    ):
        sub = subs.add_parser(name, help=text)
        _common(sub, broker=name in ("status", "reload"))
        sub.set_defaults(fn=fn)
        if name == "check-config":
            sub.add_argument(
                "--no-plugins",
                action="store_true",
                help="do not import the pools' plugin modules (they are imported by default)",
            )
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
    enqueue.add_argument("--max-retries", type=int, help="corral.Retry requests before it fails")
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
            msgspec.json.encode({"id": exc.job_id, "error": plain(exc.error)}).decode() + "\n"
        )
    print(f"corral: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
