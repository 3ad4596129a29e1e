"""What each ``corral`` subcommand does, given its parsed arguments; each
returns the exit code (see :mod:`corral.cli` for every code). The daemons
(``run``, ``broker``, ``supervisor``, ``worker``) run in the foreground, the
client commands ask the broker, and ``log`` works on a stopped broker's log.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from corral.broker.jobspec import OPTION_NAMES
from corral.cliargs import json_arg
from corral.cliformat import (
    describe_repair,
    describe_verify,
    emit,
    human_flow,
    human_job,
    human_jobs,
    human_status,
    result_text,
)
from corral.cliprogress import wait_result
from corral.errors import ConfigError, CorralError

#: Job options whose flag is not ``--`` plus the option's name: ``--timeout``
#: would read as the client's own timeout.
_OPTION_FLAGS = {"timeout": "job_timeout"}

if TYPE_CHECKING:
    from corral.client import Client

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
CONFIG_SEARCH = ("corral.toml", "/etc/corral/corral.toml")


T = TypeVar("T")


class UsageError(CorralError):
    """Bad command-line input."""


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


def make_client(args: argparse.Namespace, *, hooks: bool = False) -> Any:
    """A client of the broker that --endpoint, else the config, names;
    ``hooks``: with the config's top-level client hooks, as
    ``Client.from_config`` has them (for the commands that enqueue).
    Raises UsageError for an endpoint ZeroMQ cannot connect to, HookError
    for a hooks module that cannot be loaded."""
    import zmq

    from corral.client import Client

    config = load_config(args.config)
    endpoint = checked_endpoint(args.endpoint, "the broker's client_endpoint")
    loaded = _client_hooks(config) if hooks else []
    try:
        return Client(
            endpoint,
            config=config,
            timeout=args.timeout or config.client.timeout,
            hooks=loaded,
        )
    except zmq.ZMQError as exc:
        shown = endpoint or config.client.endpoint or config.broker.client_endpoint
        raise UsageError(f"cannot connect to {shown!r}: {exc}") from None


def _client_hooks(config: Any) -> list[Any]:
    """The config's top-level hooks, loaded (HookError if one cannot be)."""
    if not config.hooks:
        return []
    from corral.hooks import load_hooks
    from corral.workers.registry import add_python_path

    add_python_path(config.python_path)
    return load_hooks(config.hooks)


def checked_endpoint(endpoint: str | None, what: str) -> str | None:
    """``--endpoint``'s value (None if not given), or UsageError naming it,
    what it should be (``what``) and the forms accepted."""
    from corral.config.endpoints import endpoint_problem

    problem = None if endpoint is None else endpoint_problem(endpoint, connect=True)
    if problem is not None:
        raise UsageError(f"--endpoint: {problem} ({what})")
    return endpoint


def _user_value(what: str, call: Callable[[], T]) -> T:
    """``call()``, with an error from a value the user typed (a payload
    msgpack cannot hold: an integer past 64 bits, a lone surrogate) as a
    UsageError naming ``what``."""
    from corral.clientcore import UnsendableValue

    try:
        return call()
    except UnsendableValue as exc:  # an option's value: the message names its field
        raise UsageError(str(exc)) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"{what}: {exc}") from None


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
    from corral.supervisor.roles import run_broker
    from corral.supervisor.title import set_title  # (not psutil's import)

    config = load_config(args.config)
    set_title("corral: broker")
    return run_broker(config)


def cmd_worker(args: argparse.Namespace) -> int:
    from corral.config import PoolConfig
    from corral.config.schema import MAX_WORKER_CREDIT
    from corral.supervisor.roles import run_worker
    from corral.supervisor.title import set_title  # (not psutil's import)

    config = load_config(args.config)
    base = config.pools[0] if config.pools else PoolConfig(name="cli")
    pool = msgspec.structs.replace(
        base,
        queues=args.queue or list(base.queues),
        plugins=args.plugin or list(base.plugins),
        concurrency=args.concurrency or base.concurrency,
    )
    if (credit := pool.concurrency + pool.prefetch) > MAX_WORKER_CREDIT:
        raise UsageError(
            f"--concurrency: {pool.concurrency} + the pool's prefetch ({pool.prefetch}) is "
            f"{credit}: a worker may hold at most {MAX_WORKER_CREDIT} jobs"
            " (the broker refuses more)"
        )
    set_title(f"corral: worker {pool.name}#0")
    return run_worker(config, pool, 0)


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.from_file is not None:
        return _enqueue_file(args)
    if args.task is None:
        raise UsageError("give a TASK (and its PAYLOAD_JSON), or --from-file JOBS_JSONL")
    payload = None
    if args.payload is not None:
        payload = _json_arg(args.payload, "PAYLOAD_JSON")
    # One flag per job option: --max-attempts sets max_attempts (and so on).
    options = {name: getattr(args, _OPTION_FLAGS.get(name, name)) for name in OPTION_NAMES}
    with make_client(args, hooks=True) as client:
        warn_unknown_task(client, args.task, args.queue)  # before: the job makes its queue known
        job_id = _user_value("PAYLOAD_JSON", lambda: client.enqueue(args.task, payload, **options))
        _emit_id_or_result(args, client, job_id)
    return EXIT_OK


def _enqueue_file(args: argparse.Namespace) -> int:
    """``enqueue --from-file``: every line's job, in batches; the ids on
    stdout, one a line (a JSON list with --json)."""
    from corral.cliprogress import enqueue_file

    if args.task is not None or args.payload is not None:
        raise UsageError("--from-file takes its jobs from the file: give no TASK or PAYLOAD_JSON")
    if args.wait:
        raise UsageError("--from-file does not --wait; use `corral result ID --wait` on an id")
    with make_client(args, hooks=True) as client:
        try:
            ids = enqueue_file(client, args.from_file, _job_from)
        except OSError as exc:
            raise UsageError(f"--from-file: cannot read {args.from_file}: {exc.strerror}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(f"--from-file: {exc}") from None
    emit(args, {"ids": ids}, lambda v: "\n".join(v["ids"]) if v["ids"] else "(no jobs)")
    print(f"corral: enqueued {len(ids)} job(s) from {args.from_file}", file=sys.stderr)
    return EXIT_OK


def _known_queues(status: Any) -> set[str]:
    """Queues that hold jobs, or that a connected worker or a reporting
    supervisor's pool serves."""
    known = set(status.queues) | set(status.paused)
    known.update(q for worker in status.workers for q in worker.queues)
    known.update(q for sup in status.supervisors for pool in sup.pools for q in pool.queues)
    return known


def _warn(text: str) -> None:
    print(f"corral: warning: {text}", file=sys.stderr)


def warn_unknown_queue(client: Client, queue: str, doing: str) -> None:
    """Warn on stderr (exit code unchanged) when no worker or pool serves
    ``queue`` and it holds no jobs: most likely a typo."""
    known = _known_queues(client.status())
    if queue not in known:
        listed = ", ".join(sorted(known)) or "none yet"
        _warn(f"no worker serves queue {queue!r} and it holds no jobs (known: {listed}); {doing}")


def warn_unknown_task(client: Client, task: str, queue: str | None) -> None:
    """Warn on stderr when no worker has registered ``task`` (the job waits
    until one does), or when ``queue`` is unknown."""
    status = client.status()
    registered = set(status.registered_tasks)
    registered.update(t for worker in status.workers for t in worker.tasks)
    if task not in registered:
        _warn(f"no worker has registered task {task!r} (a typo?); the job waits until one does")
    if queue is not None and queue not in _known_queues(status):
        _warn(f"no worker serves queue {queue!r}; the job waits until one does")


def _emit_id_or_result(args: argparse.Namespace, client: Client, job_id: str) -> None:
    """Print a new job's or flow's id, or with ``--wait`` its result."""
    if not args.wait:
        emit(args, {"id": job_id}, lambda v: v["id"])
        return
    value = wait_result(client, job_id, args.wait_timeout)
    emit(args, {"id": job_id, "result": value}, lambda v: result_text(v["result"]))


def cmd_status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, client.status(), human_status)
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to each supervisor on this host that reports to the broker:
    its config is checked and reloaded, and pools backing off restart at
    once. How it went shows in `corral status` ("last reload")."""
    import socket

    with make_client(args) as client:
        status = client.status()
    host = socket.gethostname()
    pids = [sup.pid for sup in status.supervisors if sup.host == host]
    if not pids:
        raise CorralError(
            f"no supervisor on this host ({host}) reports to the broker; is `corral run` "
            "or `corral supervisor` running with this config?"
        )
    signalled, problems = [], []
    for pid in pids:
        problem = _hup_supervisor(pid)
        if problem:
            problems.append(problem)
        else:
            signalled.append(pid)
    if not signalled:
        raise CorralError("; ".join(problems))
    pids = signalled
    emit(
        args,
        {"reloading": pids},
        lambda v: (
            f"reload asked of supervisor pid {', '.join(map(str, pids))}; "
            "`corral status` shows how it went"
        ),
    )
    return EXIT_OK


def _hup_supervisor(pid: int) -> str:
    """SIGHUP to ``pid`` if it is a corral supervisor (a pid the broker
    still lists may be gone, or reused); why not, or ""."""
    import signal

    import psutil

    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return f"the supervisor pid {pid} is gone (the broker lists it for a few seconds more)"
    except psutil.Error as exc:
        return f"cannot look at pid {pid}: {exc}"
    if "corral" not in title or ("supervisor" not in title and " run" not in title):
        return f"pid {pid} is not a corral supervisor any more ({title[:60]!r})"
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        return f"not allowed to signal the supervisor (pid {pid}): run this as corral's user"
    except ProcessLookupError:
        return f"the supervisor pid {pid} is gone"
    return ""


def cmd_job(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, client.job(args.id), human_job)
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        if args.wait:
            value = wait_result(client, args.id, args.wait_timeout)
        else:
            value = client.result(args.id, timeout=0.0)
        emit(args, {"id": args.id, "result": value}, lambda v: result_text(v["result"]))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        page = client.jobs(
            args.queue,
            args.status,
            args.limit,
            task=args.task,
            cursor=args.cursor,
            newest=args.newest,
        )
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
        warn_unknown_queue(client, args.queue, "nothing to purge")
        count = client.purge(args.queue)
        emit(
            args,
            {"queue": args.queue, "purged": count},
            lambda v: f"purged {v['purged']} queued job(s) from {v['queue']}",
        )
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        warn_unknown_queue(client, args.queue, f"{args.command}d anyway")
        (client.pause if args.command == "pause" else client.resume)(args.queue)
        emit(
            args,
            {"queue": args.queue, "paused": args.command == "pause"},
            lambda v: f"{v['queue']}: {'paused' if v['paused'] else 'resumed'}",
        )
    return EXIT_OK


def _json_arg(source: str, what: str) -> Any:
    """:func:`json_arg`, its errors (which name ``what``) as UsageError."""
    try:
        return json_arg(source, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _job_arg(text: str, what: str = "JOB_JSON") -> Any:
    """A job given as JSON: {"task": ..., "payload": ..., "queue": ..., ...},
    callbacks nested as {"on_success": {"task": ...}}; ``-`` reads it from
    stdin, ``@FILE`` from a file."""
    fields = _json_arg(text, f"{what} {_shown(text)}")
    return _job_from(fields, text)


def _shown(text: str) -> str:
    """``text`` as an error message quotes it: its first 60 characters."""
    return repr(text) if len(text) <= 60 else f"{text[:60]!r}..."


def _job_from(fields: Any, text: str) -> Any:
    from corral.client import Job

    if not isinstance(fields, dict) or "task" not in fields:
        raise UsageError(
            f'{_shown(text)}: a job is a JSON object like {{"task": "x.y", "payload": 1}}'
        )
    for callback in ("on_success", "on_failure"):
        if fields.get(callback) is not None:
            fields[callback] = _job_from(fields[callback], text)
    try:
        return Job(**fields)
    except TypeError as exc:
        raise UsageError(f"{_shown(text)}: {exc}") from None


def cmd_enqueue_flow(args: argparse.Namespace) -> int:
    if sum(text == "-" for text in [*args.jobs, args.__dict__.get("callback")]) > 1:
        raise UsageError("JOB_JSON: only one job can be read from stdin (-)")
    jobs = [_job_arg(text) for text in args.jobs]
    callback = _job_arg(args.callback, "--callback") if getattr(args, "callback", None) else None
    with make_client(args, hooks=True) as client:
        if args.command == "enqueue-chain":
            flow_id = _user_value("JOB_JSON", lambda: client.enqueue_chain(jobs))
        else:
            flow_id = _user_value("JOB_JSON", lambda: client.enqueue_group(jobs, callback=callback))
        _emit_id_or_result(args, client, flow_id)
    return EXIT_OK


def cmd_flow(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        emit(args, getattr(client, args.command)(args.id), human_flow)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config; open the key files it uses and try the
    addresses a broker binds (see :mod:`corral.hostcheck`); unless
    --no-plugins, also import every pool's plugins and check the schedules
    against them, in a child process (see :mod:`corral.workers.plugincheck`).
    Every problem is printed, one a line."""
    from corral.broker.schedules import ScheduleError, Scheduler
    from corral.hostcheck import host_problems

    path = config_path(args.config)
    config = load_config(path)
    source = path or "defaults"
    try:
        Scheduler.from_configs(config.schedules)
    except ScheduleError as exc:
        raise ConfigError(f"schedules: {exc}") from None
    problems = [f"{source}: {problem}" for problem in host_problems(config)]
    if not args.no_plugins and path is not None:
        problems += _check_plugins(path)
    if problems:
        raise ConfigError("\n".join(problems))
    pools = ", ".join(f"{p.name}({p.processes})" for p in config.pools) or "none"
    emit(
        args,
        {"ok": True, "config": source, "pools": [p.name for p in config.pools]},
        lambda v: f"{source}: ok (pools: {pools})",
    )
    return EXIT_OK


#: How long the plugin check may take to import every pool's plugins (seconds).
PLUGIN_CHECK_TIMEOUT = 120.0


def _check_plugins(path: str) -> list[str]:
    """The problems :mod:`corral.workers.plugincheck` finds, run in a child
    process on the config at ``path``; a child that crashes, exits or hangs
    at import is itself the problem reported."""
    import subprocess

    command = [sys.executable, "-m", "corral.workers.plugincheck", str(Path(path).resolve())]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PLUGIN_CHECK_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return [
            f"plugins: importing the pools' plugins did not finish within "
            f"{PLUGIN_CHECK_TIMEOUT:g}s: does a plugin block at import (a network call, input())?"
        ]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"problems"')]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [
            f"plugins: the plugin check ended with exit code {done.returncode} before it "
            f"reported (a plugin that exits or crashes the interpreter at import?): {tail}"
        ]
    return list(msgspec.json.decode(lines[-1])["problems"])


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``corral dashboard``: see :mod:`corral.dashboard.app`. An address
    that cannot be bound is a ConfigError naming its setting (``--listen``
    or ``dashboard.listen``) and the fix."""
    import asyncio

    from corral import logs
    from corral.dashboard.serve import DEFAULT_LISTEN, serve
    from corral.supervisor.dashboard_child import listening_socket

    checked_endpoint(args.endpoint, "the broker's client_endpoint")
    config = load_config(args.config)
    logs.configure("dashboard", config.log.level, config.log.format)
    listen = args.listen or config.dashboard.listen or DEFAULT_LISTEN
    setting = "--listen" if args.listen else "dashboard.listen"
    allow = args.allow_actions or config.dashboard.allow_actions
    if args.timeout:
        config = msgspec.structs.replace(
            config, client=msgspec.structs.replace(config.client, timeout=args.timeout)
        )
    try:
        sock = listening_socket(listen, setting)
    except ValueError as exc:
        raise UsageError(f"{setting} {listen!r}: {exc}") from None
    with sock:
        asyncio.run(serve(config, sock, allow, args.endpoint, listen))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """``corral events``: see :mod:`corral.eventstail`."""
    from corral.config import connect_endpoint
    from corral.eventstail import tail

    config = load_config(args.config)
    endpoint = args.endpoint or config.broker.events_endpoint
    if not endpoint:
        raise UsageError(
            "no events endpoint: set [broker] events_endpoint in the config "
            '(e.g. "ipc://var/corral/events.sock"), or give --endpoint'
        )
    if not _subscribable(endpoint):
        raise UsageError(
            f"cannot subscribe to {endpoint!r}: expected ipc://PATH or tcp://HOST:PORT "
            "(a port from 1 to 65535): the broker's events_endpoint"
        )
    import zmq

    try:
        tail(connect_endpoint(endpoint), args.filter, args.count, args.json, config)
    except zmq.ZMQError as exc:
        raise UsageError(
            f"cannot subscribe to {endpoint!r}: {exc}; expected ipc://PATH or tcp://HOST:PORT"
        ) from None
    return EXIT_OK


def _subscribable(endpoint: str) -> bool:
    """Whether ``endpoint`` is one a broker in another process can publish
    on: ipc://PATH or tcp://HOST:PORT."""
    scheme, _, address = endpoint.partition("://")
    if scheme == "ipc":
        return bool(address)
    host, _, port = address.rpartition(":")
    return scheme == "tcp" and bool(host) and port.isdigit() and 0 < int(port) < 65536


def cmd_top(args: argparse.Namespace) -> int:
    """``corral top``: see :mod:`corral.top`."""
    from corral import top

    with make_client(args) as client:
        top.run(client, args.interval, args.once)
    return EXIT_OK


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    """Print the systemd unit (config/corral.service) for this install: its
    ExecStartPre and ExecStart run this corral executable on this config
    (absolute paths), and Documentation names the README when there is one.
    Warns on stderr when the unit's sandbox would hide the executable."""
    from corral.systemdunit import render_unit

    path = config_path(args.config) or "/etc/corral/corral.toml"
    unit, warnings = render_unit(Path(path).resolve())
    for text in warnings:
        _warn(text)
    sys.stdout.write(unit)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    """The completion script of ``corral`` for bash or zsh (argcomplete's)."""
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["corral"], shell=args.shell))
    return EXIT_OK


#: A key pair's name: the stem of NAME.key and NAME.key_secret, in --directory.
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def cmd_keys(args: argparse.Namespace) -> int:
    from corral.transport import write_keypair

    if not _KEY_NAME.fullmatch(args.name):
        raise UsageError(
            f"NAME {args.name!r}: expected a file name stem of letters, digits, '_', '-' and '.'"
            " (not starting with '.'), like server or worker1"
        )
    directory = Path(args.directory)
    for made in (directory / f"{args.name}.key", directory / f"{args.name}.key_secret"):
        if made.exists() or made.is_symlink():
            raise UsageError(
                f"NAME {args.name!r}: {made} exists: a key pair is never replaced (hosts that"
                " trust it would stop matching); remove both files first, or pick another name"
            )
    try:
        public, secret = write_keypair(directory, args.name)
    except OSError as exc:
        raise UsageError(f"--directory {args.directory}: {exc.strerror or exc}") from None
    emit(
        args,
        {"public": str(public), "secret": str(secret)},
        lambda v: f"public key: {v['public']}\nsecret key: {v['secret']} (mode 0600)",
    )
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    """``corral log verify|repair|compact``: each holds the state directory's
    lock while it works, so none runs beside a live broker (StateDirBusy
    names the broker's pid) and no broker starts meanwhile."""
    from corral import logs
    from corral.broker import logtools
    from corral.broker.framing import LogError
    from corral.broker.lockfile import StateDirLock

    logs.configure(f"log {args.action}", "warning")  # to stderr: stdout is the report
    state_dir = Path(args.state_dir or load_config(args.config).broker.state_dir)
    directory = state_dir / "log"
    if not directory.is_dir():  # checked before the lock, which would create state_dir
        raise CorralError(
            f"no log at {directory}: check broker.state_dir in the config, or --state-dir"
        )
    lock = StateDirLock(state_dir, owner=f"corral log {args.action}")
    try:
        lock.acquire()
    except PermissionError as exc:
        raise CorralError(f"cannot lock {lock.path}: {exc}; run as the broker's user") from None
    try:
        if args.action == "verify":
            verified = logtools.verify(directory)
            emit(args, verified, lambda r: describe_verify(directory, r))
            return EXIT_OK if verified.ok else EXIT_JOB
        if args.action == "repair":
            repaired = logtools.repair(directory)
            emit(args, repaired, lambda r: describe_repair(directory, r))
            return EXIT_OK
        return _compact_offline(args, state_dir)
    except (LogError, OSError) as exc:  # e.g. the disk filled while repair saved the damage
        raise CorralError(f"corral log {args.action}: {exc}") from None
    finally:
        lock.release()


def _compact_offline(args: argparse.Namespace, state_dir: Path) -> int:
    """The broker's compaction, run in this process on a stopped broker's
    log; the caller holds the state dir's lock."""
    from corral.broker.compaction import remove_segments
    from corral.broker.compactor import rewrite
    from corral.broker.core import BrokerCore
    from corral.broker.log import LogError

    config = load_config(args.config)
    config = msgspec.structs.replace(
        config, broker=msgspec.structs.replace(config.broker, state_dir=str(state_dir))
    )
    core = BrokerCore(config)
    try:
        for _ in core.log.replay():
            pass
        before = core.log.stats()
        cut = core.log.seal(time.monotonic())
        try:
            outcome = rewrite(cut, core.compactor.defaults)
        except (OSError, LogError) as exc:
            core.log.abandon(cut)
            raise LogError(f"failed, the log is unchanged: {exc}") from None
        remove_segments(core.log.install(cut))
        after = core.log.stats()
    finally:
        core.log.close()
    emit(
        args,
        {"jobs": outcome.jobs, "before": before, "after": after},
        lambda v: (
            f"compacted: {v['jobs']} live jobs; "
            f"{v['before'].get('used_bytes')} -> {v['after'].get('used_bytes')} bytes"
        ),
    )
    return EXIT_OK
