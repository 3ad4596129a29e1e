"""The web framework recipes in examples/, served as in production against a
real ``corral run``: examples/django_app under gunicorn, examples/fastapi_app
under gunicorn with uvicorn workers, each with two workers forked from a
master that imported the app (``--preload``), driven over HTTP. Jobs are
enqueued from views and run by the daemon's workers; their status and
result come back through the apps' views, from either web worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Env, Proc, free_port, wait_for, wait_until

EXAMPLES = Path(__file__).parent.parent / "examples"
DJANGO_APP = EXAMPLES / "django_app"
FASTAPI_APP = EXAMPLES / "fastapi_app"
BIN = Path(sys.executable).parent

Response = tuple[int, dict[str, Any]]


class WebServer:
    """A web server (gunicorn, uvicorn) in its own session, listening on
    127.0.0.1 at a free port: ``command(port)`` is its command line.
    ``kill()`` ends its process group and every process under it."""

    def __init__(
        self,
        home: Path,
        command: Callable[[int], list[str]],
        cwd: Path,
        environ: dict[str, str],
    ) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = command(port)
        self.log_path = home / f"{Path(args[0]).name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **environ},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def workers(self) -> set[int]:
        """The process ids under the server's master (its workers)."""
        with contextlib.suppress(psutil.Error):
            return {child.pid for child in psutil.Process(self.popen.pid).children(True)}
        return set()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, path: str, timeout: float = 30.0) -> None:
        """Poll ``path`` until the server answers it (any HTTP status)."""

        def answers() -> bool:
            assert self.popen.poll() is None, f"the web server exited:\n{self.output()}"
            try:
                http("GET", self.url + path, timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
            return True

        wait_for(answers, timeout, interval=0.05, message=f"the web server to answer {path}")

    def kill(self) -> None:
        procs = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(self.popen.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for proc in procs:  # one that left the group
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._log.close()


@pytest.fixture
def servers() -> Iterator[list[WebServer]]:
    started: list[WebServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.kill()


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Response:
    """One request; its status and JSON body (an error status too)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def from_both_workers(server: WebServer, post: Callable[[int], Response]) -> list[Response]:
    """Send ``post(n)`` requests, four at a time, until two of the server's
    workers answered (each answer carries its ``pid``); return the answers."""
    answers: list[Response] = []
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(4) as pool:
        while len({body["pid"] for _, body in answers}) < 2:
            assert time.monotonic() < deadline, f"one web worker served all of {answers}"
            answers += pool.map(post, range(len(answers), len(answers) + 4))
            assert all(status in (201, 202) for status, _ in answers), answers
    assert {body["pid"] for _, body in answers} <= server.workers()
    return answers


def shown_until(url: str, status_at: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
    """GET ``url`` until the job status at ``status_at`` in its JSON body is
    ``succeeded``; return that body. Fails on an answer other than 200, or a
    job that ended otherwise."""

    def fetch() -> dict[str, Any]:
        status, body = http("GET", url)
        assert status == 200, body
        return body

    def status_of(body: Any) -> str:
        for key in status_at:
            body = body[key]
        assert body in ("queued", "running", "succeeded"), f"the job ended {body}"
        return str(body)

    return wait_until(  # type: ignore[no-any-return]
        fetch, lambda body: status_of(body) == "succeeded", timeout, 0.05, f"{url} to succeed"
    )


def corral_daemon(env: Env, plugin: str, app: Path) -> Proc:
    """``corral run`` with the app's directory on python_path and its tasks as the plugin."""
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{app}", "')
    env.config.write_text(text.replace('plugins = ["e2e_tasks"]', f'plugins = ["{plugin}"]'))
    return env.start("run")


# --------------------------------------------------------------------------- Django


def gunicorn(port: int) -> list[str]:
    """gunicorn serving the Django example: two workers, forked after the app
    (URLconf and views included) was imported in the master."""
    args = ["orders_site.wsgi", "--workers", "2", "--preload", "--bind", f"127.0.0.1:{port}"]
    return [str(BIN / "gunicorn"), *args]


@pytest.fixture
def django_site(
    env: Env, servers: list[WebServer], monkeypatch: pytest.MonkeyPatch
) -> tuple[WebServer, Path]:
    """The daemon, the migrated database and gunicorn serving the Django example."""
    database = env.home / "orders.sqlite3"
    environ = {"ORDERS_DB": str(database), "CORRAL_CONFIG": str(env.config)}
    for name, value in environ.items():  # corral's workers read the same database
        monkeypatch.setenv(name, value)
    # All three start at once; gunicorn touches the database only once it serves.
    daemon = corral_daemon(env, "orders.tasks", DJANGO_APP)
    migrate = subprocess.Popen(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=DJANGO_APP,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = WebServer(env.home, gunicorn, DJANGO_APP, environ)
    servers.append(server)
    try:
        output, _ = migrate.communicate(timeout=60)
    finally:
        migrate.kill()
    assert migrate.returncode == 0, output
    env.wait_ready(daemon)
    server.wait_serving("/orders/0/")
    return server, database


def test_django_enqueues_on_commit_only_and_shows_the_job(
    env: Env, django_site: tuple[WebServer, Path]
) -> None:
    server, database = django_site
    client = env.client()
    status, body = http("POST", f"{server.url}/orders/", {"item": "ink", "quantity": 1000})
    assert status == 409, body  # out of stock: raised after the row and on_commit
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM orders_order").fetchone() == (0,)
    assert list(client.jobs()) == []  # the rollback enqueued nothing
    items = ["pen", "ink", "paper"]

    def order(n: int) -> Response:
        body = {"item": items[n % 3], "quantity": n + 1}
        return http("POST", f"{server.url}/orders/", body)

    placed = [body for _, body in from_both_workers(server, order)]
    for n, answer in enumerate(placed):
        body = shown_until(f"{server.url}/orders/{answer['order']}/", ("job", "status"))
        assert body["job"]["id"] == answer["job"]
        assert body["job"]["result"] == {
            "order": answer["order"],
            "item": items[n % 3],
            "quantity": n + 1,
        }
        assert body["fulfilled"] is True  # written by the task, in a corral worker
    with sqlite3.connect(database) as db:
        jobs = dict(db.execute("SELECT id, job_id FROM orders_order").fetchall())
    assert jobs == {answer["order"]: answer["job"] for answer in placed}
    assert sorted(info.id for info in client.jobs()) == sorted(jobs.values())


# -------------------------------------------------------------------------- FastAPI


def gunicorn_uvicorn(port: int) -> list[str]:
    """gunicorn serving the FastAPI example with two uvicorn workers, forked
    after the app was imported in the master. (``uvicorn --workers 2`` starts
    fresh interpreters instead: each imports FastAPI again, seconds of CPU
    on a loaded machine, and nothing is forked from an imported app.)"""
    args = ["jobs_api.app:app", "--worker-class", "uvicorn_worker.UvicornWorker"]
    args += ["--workers", "2", "--preload", "--bind", f"127.0.0.1:{port}"]
    return [str(BIN / "gunicorn"), *args]


def test_fastapi_enqueues_from_async_endpoints_under_uvicorn_workers(
    env: Env, servers: list[WebServer]
) -> None:
    daemon = corral_daemon(env, "jobs_api.tasks", FASTAPI_APP)
    server = WebServer(env.home, gunicorn_uvicorn, FASTAPI_APP, {"CORRAL_CONFIG": str(env.config)})
    servers.append(server)
    env.wait_ready(daemon)
    server.wait_serving("/jobs/none")

    def post(n: int) -> Response:
        return http("POST", f"{server.url}/jobs", {"numbers": list(range(n + 2))})

    answers = from_both_workers(server, post)
    for n, (_, answer) in enumerate(answers):
        body = shown_until(f"{server.url}/jobs/{answer['id']}", ("status",))
        assert (body["id"], body["result"], body["error"]) == (
            answer["id"],
            sum(range(n + 2)),
            None,
        )
    status, body = http("GET", f"{server.url}/jobs/{'0' * 32}")
    assert status == 404, body
    status, body = http("POST", f"{server.url}/jobs", {"numbers": "many"})
    assert status == 422, body  # FastAPI's validation: nothing enqueued
