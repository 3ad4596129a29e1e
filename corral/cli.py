"""The ``corral`` command: its arguments, and the exit code of each outcome.

Exit codes: 0 ok; 1 the job failed, was cancelled or is not known, or the
broker refused the request (a full disk); 2 usage or config error (bad
input, whether the CLI or the broker found it, code ``invalid``: a one-line
message, never a traceback); 3 the broker did not answer; 4 ``--wait`` gave
up before the job ended (the job goes on); 130 interrupted (Ctrl-C); 141
the reader of its output went (``corral events | head``), quietly.
``corral events`` waits for the broker however long it takes (see its
``--help``). What
each subcommand does is in :mod:`corral.clicommands`, what it prints in
:mod:`corral.cliformat`, how its arguments are read in :mod:`corral.cliargs`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from corral.broker.protocol import STATUSES
from corral.cliargs import (
    HeaderAction,
    count_arg,
    duration_arg,
    expires_arg,
    moment_arg,
    positive_duration_arg,
    priority_arg,
    retries_arg,
)
from corral.clicommands import (
    EXIT_JOB,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
    cmd_broker,
    cmd_cancel,
    cmd_check_config,
    cmd_completion,
    cmd_dashboard,
    cmd_delete,
    cmd_enqueue,
    cmd_enqueue_flow,
    cmd_events,
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
    cmd_systemd_unit,
    cmd_top,
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
        sub.add_argument(
            "--timeout",
            type=positive_duration_arg,
            help='how long to wait for the broker ("5s", "500ms")',
        )


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (which argument, why,
    where the help is) instead of the whole usage block before it; exit 2
    as argparse's. Its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(prog="corral", description="a durable job queue")
    parser.add_argument("--version", action=_VersionAction, help="show corral's version and exit")
    # before the command as well as after it: `corral -c FILE status`
    parser.add_argument(
        "-c", "--config", dest="global_config", metavar="CONFIG", help="config file (TOML)"
    )
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
    _add_completion(subs)
    _add_systemd_unit(subs)
    _add_top(subs)
    _add_events(subs)
    _add_dashboard(subs)
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
    worker.add_argument(
        "--concurrency", type=count_arg, help="jobs run at once (default: the first pool's)"
    )
    worker.set_defaults(fn=cmd_worker)


def _add_enqueue(subs: Subparsers) -> None:
    enqueue = subs.add_parser("enqueue", help="enqueue a job; prints its id")
    _common(enqueue)
    enqueue.add_argument("task", nargs="?", help="the task's name (not with --from-file)")
    enqueue.add_argument(
        "--from-file",
        metavar="JOBS_JSONL",
        type=Path,
        help='one job per line, as JOB_JSON ({"task": ..., "payload": ...}); '
        "shows the count and rate, prints the ids",
    )
    enqueue.add_argument(
        "payload",
        nargs="?",
        metavar="PAYLOAD_JSON",
        help="the payload as JSON; - reads it from stdin, @FILE from a file",
    )
    enqueue.add_argument("--queue")
    enqueue.add_argument("--delay", type=duration_arg, help='run after this long ("30s", "5m")')
    enqueue.add_argument("--priority", type=priority_arg, default=0, help="higher runs first")
    enqueue.add_argument("--max-attempts", type=count_arg)
    enqueue.add_argument(
        "--job-timeout", type=duration_arg, help='how long one attempt may run ("30s")'
    )
    enqueue.add_argument("--unique-key")
    enqueue.add_argument(
        "--unique-for", type=duration_arg, help="how long the key stays taken after the job"
    )
    enqueue.add_argument(
        "--run-at", type=moment_arg, help="when to run: ISO 8601 (2030-01-01T09:00Z) or epoch"
    )
    enqueue.add_argument("--result-ttl", type=duration_arg, help="how long to keep the result")
    enqueue.add_argument(
        "--max-retries", type=retries_arg, help="corral.Retry requests before it fails"
    )
    enqueue.add_argument(
        "--expires",
        type=expires_arg,
        help='never run unless started by then: a duration after it is due ("5m") '
        "or an ISO 8601 time; it ends cancelled, reason expired",
    )
    enqueue.add_argument(
        "--limit-key", help="the key its task's key_concurrency/key_rate count by (a customer id)"
    )
    enqueue.add_argument(
        "--header",
        dest="headers",
        metavar="KEY=VALUE",
        action=HeaderAction,
        help="the job's metadata, for ctx.headers (repeatable)",
    )
    enqueue.add_argument("--wait", action="store_true", help="wait and print the result")
    enqueue.add_argument(
        "--wait-timeout", type=duration_arg, help="give up waiting after this (exit code 4)"
    )
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
            help='e.g. \'{"task": "demo.add", "payload": [1, 2]}\'; - reads stdin, @FILE a file',
        )
        if name == "enqueue-group":
            flow.add_argument(
                "--callback",
                metavar="JOB_JSON",
                help="run once all succeeded, with their results (a chord)",
            )
        flow.add_argument("--wait", action="store_true", help="wait and print the result")
        flow.add_argument("--wait-timeout", type=duration_arg)
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
    result.add_argument(
        "--wait-timeout", type=duration_arg, help="give up waiting after this (exit code 4)"
    )
    result.set_defaults(fn=cmd_result)


def _add_keys(subs: Subparsers) -> None:
    keys = subs.add_parser("keys", help="create a CURVE key pair for tcp endpoints")
    keys.add_argument("name", help="file name stem, e.g. server or worker1")
    keys.add_argument("--directory", default=".", help="where to write NAME.key(_secret)")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(fn=cmd_keys)


def _add_jobs(subs: Subparsers) -> None:
    jobs = subs.add_parser("jobs", help="list jobs in creation order (--newest: newest first)")
    _common(jobs)
    jobs.add_argument("--queue")
    jobs.add_argument("--status", choices=STATUSES)
    jobs.add_argument("--task")
    jobs.add_argument("--limit", type=count_arg, default=100, help="jobs per page (1 or more)")
    jobs.add_argument("--cursor", help="from a previous page's output")
    jobs.add_argument("--newest", action="store_true", help="newest first")
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


def _add_dashboard(subs: Subparsers) -> None:
    dash = subs.add_parser("dashboard", help="serve the web dashboard")
    _common(dash)
    dash.add_argument(
        "--listen", help="HOST:PORT (default: [dashboard] listen, else 127.0.0.1:9465)"
    )
    dash.add_argument(
        "--allow-actions",
        action="store_true",
        help="let it pause, resume, retry and delete (default: [dashboard] allow_actions)",
    )
    dash.set_defaults(fn=cmd_dashboard)


#: What ``corral events --help`` says about waiting, notices and exit codes.
EVENTS_EPILOG = """\
Events are printed on stdout as they happen; it waits for them however long
it takes. When none can come it says why on stderr, once, and keeps trying:
the broker refused this host's CURVE key (its public key must be in the
broker's security.authorized_keys_dir; after a SIGHUP to the broker it
subscribes again by itself), the handshake failed (security.server_public_key
is not the broker's key, or the endpoint is not the events endpoint), or no
connection was accepted within 5 seconds (is the broker running?).
Exit codes: 0 after --count events, 130 on Ctrl-C, 2 for a bad config,
141 when the reader of its output goes (corral events | head -5)."""


def _add_events(subs: Subparsers) -> None:
    events = subs.add_parser(
        "events",
        help="print job and worker events as they happen",
        epilog=EVENTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    events.add_argument("-c", "--config", help="config file (TOML)")
    events.add_argument("--json", action="store_true", help="one JSON object a line")
    events.add_argument("--endpoint", help="the events endpoint (default: from the config)")
    events.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="PREFIX",
        help="only events whose name starts with it: job., job.failed, worker. (repeatable)",
    )
    events.add_argument("--count", type=count_arg, help="exit after this many events")
    events.set_defaults(fn=cmd_events)


def _add_top(subs: Subparsers) -> None:
    top = subs.add_parser("top", help="a live view of queues, workers and pools")
    _common(top)
    top.add_argument(
        "--interval", type=positive_duration_arg, default=1.0, help='refresh every ("1s", "500ms")'
    )
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(fn=cmd_top)


def _add_systemd_unit(subs: Subparsers) -> None:
    unit = subs.add_parser(
        "systemd-unit",
        help="print the systemd unit for this install (its corral executable and config)",
    )
    unit.add_argument("-c", "--config", help="the config the service runs (absolute in the unit)")
    unit.set_defaults(fn=cmd_systemd_unit)


def _add_completion(subs: Subparsers) -> None:
    completion = subs.add_parser(
        "completion",
        help='print the shell completion script: eval "$(corral completion bash)"',
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(fn=cmd_completion)


def _add_log(subs: Subparsers) -> None:
    logp = subs.add_parser("log", help="offline log tools")
    logp.add_argument("action", choices=["verify", "repair", "compact"])
    _common(logp, broker=False)
    logp.add_argument("--state-dir", help="the broker's state_dir (default: from the config)")
    logp.set_defaults(fn=cmd_log)


def _import_structlog_without_rich() -> None:
    """Import structlog before anything else does, with rich hidden from it.
    structlog imports rich (and rich attrs) only for its optional pretty
    tracebacks, which corral's log set-up never uses (it formats exceptions
    as plain text before rendering, see :mod:`corral.logs`); that import was
    a third of every daemon's and command's start-up CPU. rich itself stays
    importable for the CLI's tables. A process that imported either already
    is left as it is."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # an ImportError for structlog
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


#: The commands that log through structlog (the daemons and the offline
#: tools); the others (a client's requests) never import it, nor the asyncio
#: it imports: a third of such a command's start-up CPU.
_LOGGING_COMMANDS = frozenset(
    {cmd_run, cmd_broker, cmd_supervisor, cmd_worker, cmd_dashboard, cmd_log, cmd_check_config}
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (argcomplete)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.fn in _LOGGING_COMMANDS:
        _import_structlog_without_rich()
    if args.global_config is not None and getattr(args, "config", None) is None:
        args.config = args.global_config  # the one after the command wins
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `corral events | head`: the reader is gone
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except CorralError as exc:
        return _report(args, exc)


#: The exit code of a command whose output's reader went (as a shell's 128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit
    does not fail on the closed pipe again (and print that it did)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


#: The exit code, and the message's prefix, of each kind of error (the first
#: that matches; see the module docstring).
_OUTCOMES: tuple[tuple[tuple[type[CorralError], ...], int, str], ...] = (
    ((ConfigError, UsageError), EXIT_USAGE, ""),
    ((BrokerUnavailable,), EXIT_UNREACHABLE, ""),
    ((ResultTimeout,), EXIT_TIMEOUT, ""),
    ((JobNotFound, JobCancelled), EXIT_JOB, ""),
    ((BrokerError,), EXIT_JOB, "the broker refused: "),
    ((CorralError,), EXIT_USAGE, ""),
)


def _report(args: argparse.Namespace, exc: CorralError) -> int:
    """Print ``exc`` in one line (a failed job's error as JSON too, with
    --json) and return its exit code."""
    if isinstance(exc, JobFailed):
        _print_failure(args, exc)
        return EXIT_JOB
    if isinstance(exc, BrokerError) and exc.code == "invalid":  # a value the user gave
        print(f"corral: the broker refused: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for kinds, code, prefix in _OUTCOMES:
        if isinstance(exc, kinds):
            print(f"corral: {prefix}{exc}", file=sys.stderr)
            return code
    return EXIT_USAGE  # unreachable: CorralError is the last kind


class _VersionAction(argparse.Action):
    """``--version``: looks the version up only when asked (the package
    metadata lookup costs tens of milliseconds on every command otherwise)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"corral {_version()}")
        parser.exit()


def _version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("corral")
    except metadata.PackageNotFoundError:
        from corral import __version__

        return __version__


def _print_failure(args: argparse.Namespace, exc: JobFailed) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(
            msgspec.json.encode({"id": exc.job_id, "error": plain(exc.error)}).decode() + "\n"
        )
    print(f"corral: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
