"""Typed enqueue: ``client.enqueue(send, Email(...))`` with the task function
takes the task's name, queue and options from its decorator, through real
processes; mypy rejects a payload of the wrong type; a call of the function
still runs it inline."""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import PLUGINS, Env

import corral
from corral.clientcore import ClientCore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def typed_tasks() -> Iterator[ModuleType]:
    """tests/plugins/typed_tasks.py, imported here as the workers import it."""
    sys.path.insert(0, PLUGINS)
    try:
        yield importlib.import_module("typed_tasks")
    finally:
        sys.path.remove(PLUGINS)


def test_a_task_is_still_its_function_when_called(typed_tasks: ModuleType) -> None:
    ctx = corral.JobContext("job-1", 3, "typed_tasks.send", "typed", 0.0)
    email = typed_tasks.Email(to="a@b", subject="hi")
    assert isinstance(typed_tasks.send, corral.Task)
    assert typed_tasks.send(ctx, email) == {
        "to": "a@b",
        "subject": "hi",
        "queue": "typed",
        "attempt": 3,
    }
    assert typed_tasks.shout("hey") == "HEY"
    assert asyncio.run(typed_tasks.send_later(ctx, email)) == "a@b"
    assert typed_tasks.send.__name__ == "send" and typed_tasks.send.__doc__ is None
    assert (typed_tasks.send.name, typed_tasks.send.queue) == ("typed_tasks.send", "typed")


def test_enqueue_by_function_takes_the_decorators_name_queue_and_options(
    typed_tasks: ModuleType,
) -> None:
    core = ClientCore()
    step = core.enqueue(typed_tasks.send, typed_tasks.Email(to="a@b", subject="hi"))
    assert not isinstance(step, str)
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert (spec.task, spec.queue) == ("typed_tasks.send", "typed")
    assert (spec.max_attempts, spec.timeout, spec.result_ttl, spec.max_retries) == (2, 20, 600, 3)
    # an option given to enqueue wins over the decorator's
    email = typed_tasks.Email(to="a@b", subject="hi")
    step = core.enqueue(typed_tasks.send, email, queue="other", max_attempts=9, timeout=1.5)
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert (spec.queue, spec.max_attempts, spec.timeout, spec.result_ttl) == ("other", 9, 1.5, 600)
    with pytest.raises(TypeError, match=r"a task name or a @corral\.task function"):
        core.enqueue(print, 1)  # type: ignore[arg-type]


def test_a_job_spec_takes_the_task_function_too(typed_tasks: ModuleType) -> None:
    """``corral.Job(send, Email(...))``, in a batch, a chain, a group's
    callback and a job's callbacks, takes what ``enqueue(send, ...)`` takes."""
    core = ClientCore()
    email = typed_tasks.Email(to="a@b", subject="hi")
    job = corral.Job(typed_tasks.send, email, on_success=corral.Job(typed_tasks.shout, "ok"))
    step = core.enqueue_many([job, corral.Job(typed_tasks.send, email, max_attempts=9)])
    assert not isinstance(step, list)
    first, second = step.request.jobs  # type: ignore[union-attr]
    assert (first.task, first.queue, first.max_attempts, first.timeout) == (
        "typed_tasks.send",
        "typed",
        2,
        20,
    )
    assert first.on_success is not None
    assert (first.on_success.task, first.on_success.queue) == ("typed_tasks.shout", "typed")
    assert (second.max_attempts, second.result_ttl) == (9, 600)
    step = core.enqueue_group([job], callback=corral.Job(typed_tasks.tick))
    assert not isinstance(step, str)
    assert step.request.callback.task == "typed_tasks.tick"  # type: ignore[union-attr]
    step = core.enqueue_chain([corral.Job(typed_tasks.shout, "a"), corral.Job("x.y", 1)])
    assert [s.task for s in step.request.jobs] == ["typed_tasks.shout", "x.y"]  # type: ignore[union-attr]


def test_a_payload_the_task_would_refuse_is_refused_before_it_is_sent(
    typed_tasks: ModuleType,
) -> None:
    """With the task function in hand the client checks the payload as the
    worker will, and sends nothing when it does not fit (by name, it cannot)."""
    core = ClientCore()
    with pytest.raises(ValueError, match=r"typed_tasks\.send: payload: expected object, got int"):
        core.enqueue(typed_tasks.send, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"payload\.to: expected str, got int"):
        core.enqueue_many([corral.Job(typed_tasks.send, {"to": 1, "subject": "s"})])
    with pytest.raises(ValueError, match="nothing was enqueued"):
        core.enqueue(typed_tasks.send)
    # a dict of the Struct's shape is what the worker will decode: it goes
    core.enqueue(typed_tasks.send, {"to": "a@b", "subject": "hi"})  # type: ignore[arg-type]
    core.enqueue("typed_tasks.send", 42)


def test_typed_enqueue_through_real_processes(env: Env, typed_tasks: ModuleType) -> None:
    """The broker alone first: the job carries the decorator's queue and
    options before any worker registered the task; then a worker on that
    queue runs it, with the Struct payload decoded."""
    env.write_config(processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    email = typed_tasks.Email(to="a@b", subject="hi")
    job_id = client.enqueue(typed_tasks.send, email)
    info = client.job(job_id)
    assert (info.task, info.queue, info.status) == ("typed_tasks.send", "typed", "queued")
    assert (info.max_attempts, info.timeout) == (2, 20)
    shouted = client.enqueue(typed_tasks.shout, "quiet")
    by_name = client.enqueue("typed_tasks.shout", "named", queue="typed")
    batch = client.enqueue_many(
        [corral.Job(typed_tasks.send, email), corral.Job(typed_tasks.shout, "batched")]
    )
    chain = client.enqueue_chain([corral.Job(typed_tasks.shout, "a"), corral.Job(typed_tasks.tick)])
    env.start("worker", "--queue", "typed", "--plugin", "typed_tasks")
    result = client.result(job_id, timeout=30)
    assert result == {"to": "a@b", "subject": "hi", "queue": "typed", "attempt": 1}
    assert client.result(shouted, timeout=30) == "QUIET"
    assert client.result(by_name, timeout=30) == "NAMED"
    assert [client.result(i, timeout=30) for i in batch] == [result, "BATCHED"]
    assert client.result(chain, timeout=30) == 1


#: Checked by mypy; each line marked "# wrong" must be an error, no other.
SNIPPET = """
from __future__ import annotations

import corral
from typed_tasks import Email, anything, echo, invoice, ping, send, send_later, shout, tick


def blocking(client: corral.Client) -> None:
    client.enqueue(send, Email(to="a@b", subject="hi"))
    client.enqueue(send, Email(to="a@b", subject="hi"), queue="q", delay=5)
    client.enqueue(send, 42)  # wrong
    client.enqueue(send, {"to": "a@b"})  # wrong
    client.enqueue(shout, "x")
    client.enqueue(shout, Email(to="a", subject="b"))  # wrong
    client.enqueue(tick)
    client.enqueue(tick, 1)  # wrong
    client.enqueue("typed_tasks.send", 42)  # by name: not checked
    client.enqueue(send, Email(to="a@b", subject="hi"), queue=3)  # wrong
    ctx = corral.JobContext("j", 1, "t", "q", 0.0)
    receipt: dict[str, object] = send(ctx, Email(to="a", subject="b"))
    send(ctx, 42)  # wrong
    job_id: str = client.enqueue(shout, "x")
    client.enqueue_many([corral.Job(send, Email(to="a@b", subject="hi")), corral.Job(shout, "x")])
    client.enqueue_many([corral.Job(send, 42)])  # wrong
    corral.Job(shout, Email(to="a", subject="b"))  # wrong
    corral.Job("typed_tasks.send", 42, on_success=corral.Job(tick))  # by name: not checked
    client.enqueue_chain([corral.Job(shout, "x", queue="q"), corral.Job(send, "x")])  # wrong
    client.enqueue(invoice, Email(to="a@b", subject="hi"))
    client.enqueue(invoice, 42)  # wrong
    corral.Job(invoice, "x")  # wrong
    client.enqueue(anything, 3)
    client.enqueue(anything, "3")  # wrong
    anything(ctx, 3, dry_run=True)
    anything(ctx, 3, dry_run=3)  # wrong
    client.enqueue(ping)
    client.enqueue(ping, 1)  # wrong
    client.enqueue(echo, "x")
    client.enqueue(echo, 1)  # wrong
    client.enqueue(send)  # wrong
    client.enqueue(send, queue="q")  # wrong
    client.enqueue(shout)  # wrong
    client.enqueue(anything)  # wrong
    client.enqueue(invoice, delay=5)  # wrong
    client.enqueue(tick, queue="q", delay=5)
    client.enqueue(ping, priority=3)
    client.enqueue("typed_tasks.send")  # by name: not checked
    client.enqueue("typed_tasks.send", queue="q")
    client.enqueue(tick, None)
    client.enqueue(send, payload=Email(to="a@b", subject="hi"))
    client.enqueue(tick, bogus_option=1)  # wrong
    corral.Job(send)  # wrong
    corral.Job(shout, queue="q")  # wrong
    corral.Job(tick, 1)  # wrong
    corral.Job(tick, bogus_option=1)  # wrong
    corral.Job(tick, queue="q", delay=5)
    corral.Job(ping)
    corral.Job("typed_tasks.send")
    corral.Job(send, payload=Email(to="a@b", subject="hi"), max_attempts=3)
    client.enqueue_many([corral.Job(tick), corral.Job(send)])  # wrong


async def awaited(client: corral.AsyncClient) -> None:
    await client.enqueue(send_later, Email(to="a@b", subject="hi"))
    await client.enqueue(send_later, 42)  # wrong
    await client.enqueue(send_later)  # wrong
    await client.enqueue(tick)
    job_id: str = await client.enqueue(send, Email(to="a@b", subject="hi"))
"""


def test_mypy_rejects_a_payload_of_the_wrong_type(tmp_path: Path) -> None:
    # mypy reads corral through the tree `make typecheck` lays out (it cannot
    # follow the editable install), and shares its cache: with the same
    # options, so the modules `make typecheck` checked are not checked again
    # (--follow-imports=silent here made every cached module stale, for this
    # run and for the next `make typecheck`: 2.5 s and 4 s of CPU, not 0.3).
    # Only the snippet's lines are read from the output below.
    subprocess.run(
        ["make", "--no-print-directory", "-s", "typecheck-tree"], cwd=ROOT, check=True, timeout=60
    )
    snippet = tmp_path / "typed_enqueue_snippet.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--hide-error-context",
            "--no-error-summary",
            str(snippet),
        ],
        cwd=ROOT,
        env={"MYPYPATH": PLUGINS, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = snippet.read_text().splitlines()
    wrong = {n for n, line in enumerate(lines, 1) if line.endswith("# wrong")}
    # (by the file's name: mypy may repeat what it cached for the same
    # module at an earlier test's path)
    flagged = {
        int(m.group(1))
        for m in re.finditer(r"^\S*typed_enqueue_snippet\.py:(\d+): error", done.stdout, re.M)
    }
    assert flagged == wrong, done.stdout + done.stderr


#: What a user writes against an installed corral: README's own task shape.
INSTALLED_SNIPPET = """
import msgspec
import corral


class Email(msgspec.Struct):
    to: str
    subject: str


@corral.task(queue="emails")
def send(ctx: corral.JobContext, msg: Email) -> dict:
    return {"sent_to": msg.to}


def use(client: corral.Client) -> None:
    client.enqueue(send, Email(to="a@b", subject="hi"))
    client.enqueue(send, 42)  # wrong
"""


def test_mypy_checks_payloads_against_corral_installed_by_pip(tmp_path: Path) -> None:
    """corral installed as a user installs it (a wheel in site-packages, not
    the repository's tree) is typed for mypy (its py.typed marker): without
    it mypy skips the package and checks no payload."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = tmp_path / "source"  # a copy: a build leaves build/ and *.egg-info behind
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "var", "tests", "bench", "docs", "*.egg-info", "__pycache__"
        ),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # corral's dependencies (msgspec, pyzmq ...) from the test venv, after corral itself
    deps = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz_deps.pth").write_text(deps + "\n")
    snippet = tmp_path / "installed_snippet.py"
    snippet.write_text(INSTALLED_SNIPPET)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-executable",
            str(python),
            "--no-incremental",
            "--follow-imports=silent",
            "--no-error-summary",
            "--hide-error-context",
            str(snippet),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = INSTALLED_SNIPPET.splitlines()
    wrong = {n for n, line in enumerate(lines, 1) if line.endswith("# wrong")}
    flagged = {
        int(m) for m in re.findall(r"^\S*installed_snippet\.py:(\d+): error", checked.stdout, re.M)
    }
    assert flagged == wrong, checked.stdout + checked.stderr
