"""The web dashboard end to end: a real daemon, a real `corral dashboard`,
driven in headless Chromium (Debian's chromium and chromium-driver, through
Selenium). Screenshots go to build/screenshots/."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Env, free_port, kill_broker, titled, wait_for

import corral

SHOTS = Path(__file__).parent.parent / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "no Chromium here: install Debian's chromium and chromium-driver "
            "(`apt-get install chromium chromium-driver`; .ci/run does it where it can)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1400,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def dashboard_env(env: Env, allow_actions: bool) -> str:
    port = free_port()
    text = env.config.read_text()
    allow = str(allow_actions).lower()
    text += f'\n[dashboard]\nlisten = "127.0.0.1:{port}"\nallow_actions = {allow}\n'
    text += '\n[[schedules]]\nname = "nightly"\ntask = "e2e.noop"\ncron = "0 3 * * *"\n'
    env.config.write_text(text)
    return f"http://127.0.0.1:{port}"


def start(env: Env, url: str, *, standalone: bool = False) -> None:
    """``corral run``, which serves the dashboard itself ([dashboard] listen);
    ``standalone``: a bare broker and ``corral dashboard`` beside it."""
    if standalone:
        broker = env.start("broker")
        env.wait_ready(broker)
        dash = env.start("dashboard")
    else:
        dash = env.start("run")
        env.wait_ready(dash)
        env.wait_workers(2)
        # the pools table shows the supervisor's report, sent every few
        # seconds: the page is looked at after the first one arrived
        client = env.client()
        wait_for(lambda: client.status().supervisors, 30, message="a supervisor report")

    def up() -> bool:
        assert dash.alive(), dash.output()
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    wait_for(up, 30, message="the dashboard")


def _fresh(driver: Any, css: str, act: Any) -> Any:
    """``act(element)`` on the element ``css`` finds, found again if the
    live update replaced it in between (every 2 s), or waited for while the
    page that has it loads (up to 20 s)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 20  # a page still loading has not got it yet
    while True:
        try:
            return act(driver.find_element(By.CSS_SELECTOR, css))
        except (StaleElementReferenceException, NoSuchElementException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def text_of(driver: Any, css: str) -> str:
    return str(_fresh(driver, css, lambda element: element.text))


def click(driver: Any, css: str) -> None:
    _fresh(driver, css, lambda element: element.click())


def test_the_dashboard_shows_and_acts_on_a_running_daemon(env: Env, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    SHOTS.mkdir(parents=True, exist_ok=True)
    url = dashboard_env(env, allow_actions=True)
    start(env, url)
    client = env.client()
    for i in range(3):  # fail in the handler: with a traceback
        bad = client.enqueue("e2e.flaky", 5 + i, max_attempts=1)
        with pytest.raises(corral.JobFailed):
            client.result(bad, timeout=30)
    assert client.result(client.enqueue("e2e.square", 7), timeout=30) == 49
    release = env.home / "release"
    running = client.enqueue("e2e.progress", str(release))
    wait_for(lambda: client.job(running).progress is not None, 30, message="progress")

    # the overview: queues, workers, pools, schedules
    browser.get(url + "/")
    cell = '#queues tr[data-queue="default"] td[data-status="failed"]'
    assert text_of(browser, cell) == "3"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#workers tr")) == 3  # header + 2
    assert "default" in text_of(browser, "#pools") and "ok" in text_of(browser, "#pools")
    assert "nightly" in text_of(browser, "#schedules") and "0 3 * * *" in text_of(
        browser, "#schedules"
    )
    browser.save_screenshot(str(SHOTS / "overview.png"))

    # live updates: a job that ends shows up without a reload
    succeeded = '#queues tr[data-queue="default"] td[data-status="succeeded"]'
    before = int(text_of(browser, succeeded))
    client.result(client.enqueue("e2e.square", 2), timeout=30)
    wait_for(lambda: int(text_of(browser, succeeded)) > before, 20, message="a live update")

    # one job: its progress, and a failed one's error, traceback and tries
    browser.get(f"{url}/jobs/{running}")
    assert "50%" in text_of(browser, "#job") and "half way" in text_of(browser, "#job")
    browser.save_screenshot(str(SHOTS / "job-progress.png"))
    release.touch()
    wait_for(lambda: text_of(browser, "#status") == "succeeded", 20, message="the job's end")

    retry_one_then_delete_all(browser, url, client)

    # pause and resume a queue (each click loads a new page: wait for it)
    browser.get(url + "/")
    button = '#queues tr[data-queue="default"] button'
    click(browser, button)
    wait_for(lambda: text_of(browser, button) == "resume", 20, message="the paused page")
    assert "default" in client.status().paused
    click(browser, button)
    wait_for(lambda: text_of(browser, button) == "pause", 20, message="the resumed page")
    assert "default" not in client.status().paused


def retry_one_then_delete_all(browser: Any, url: str, client: corral.Client) -> None:
    """Failed jobs: one retried (it fails again), then all deleted at once."""
    from selenium.webdriver.common.by import By

    browser.get(url + "/jobs?status=failed")
    rows = browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job]")
    assert len(rows) == 3
    first = _fresh(browser, "#jobs tr[data-job]", lambda row: row.get_attribute("data-job"))
    browser.get(f"{url}/jobs/{first}")
    assert text_of(browser, "#error").startswith("ValueError: attempt 1 fails")
    assert "Traceback" in text_of(browser, "#traceback")
    assert "ValueError" in text_of(browser, "#tries")
    browser.get(url + "/jobs?status=failed")
    browser.save_screenshot(str(SHOTS / "failed.png"))
    click(browser, f'#jobs tr[data-job="{first}"] button.retry')
    assert "retried" in text_of(browser, "#notice")
    wait_for(lambda: len(client.job(first).tries) == 2, 30, message="the retried run")
    wait_for(lambda: client.job(first).status == "failed", 30, message="it fails again")
    browser.get(url + "/jobs?status=failed")
    click(browser, "#delete-all")
    assert "3 failed job(s) deleted" in text_of(browser, "#notice")
    assert client.jobs(status="failed") == []


def test_a_read_only_dashboard_shows_no_actions_and_refuses_them(env: Env, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    url = dashboard_env(env, allow_actions=False)
    start(env, url)
    client = env.client()
    bad = client.enqueue("e2e.order", {"item": 1}, max_attempts=1)
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    browser.get(url + "/jobs?status=failed")
    assert browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job]")
    assert not browser.find_elements(By.CSS_SELECTOR, "button.retry, #delete-all")
    assert "read-only" in text_of(browser, "nav")
    request = urllib.request.Request(url + "/actions/pause", data=b"queue=default", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert client.status().paused == []


def test_an_action_from_another_origin_is_refused(env: Env) -> None:
    url = dashboard_env(env, allow_actions=True)
    start(env, url, standalone=True)
    request = urllib.request.Request(
        url + "/actions/pause",
        data=b"queue=default",
        method="POST",
        headers={"Origin": "http://evil.example"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert env.client().status().paused == []
    # DNS rebinding: a page of evil.example, its name now resolving to
    # 127.0.0.1, is the dashboard's own origin as far as Origin and Host go
    port = url.rsplit(":", 1)[1]
    rebound = f"evil.example:{port}"
    request = urllib.request.Request(
        url + "/actions/pause",
        data=b"queue=default",
        method="POST",
        headers={"Host": rebound, "Origin": f"http://{rebound}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and b"evil.example" in refused.value.read()
    assert env.client().status().paused == []
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):  # as a browser here names it
        request = urllib.request.Request(
            url + "/actions/resume",
            data=b"queue=default",
            method="POST",
            headers={"Host": host, "Origin": f"http://{host}"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200  # (the 303 followed)
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "/jobs/nope", timeout=10)
    assert missing.value.code == 404 and time.monotonic() - started < 10


def _get(url: str, host: str) -> tuple[int, str]:
    """GET ``url`` with the Host header ``host``: (status, body)."""
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("standalone", [False, True], ids=["run", "dashboard"])
def test_pages_are_served_only_under_the_allowed_host_names(env: Env, standalone: bool) -> None:
    """DNS rebinding reads too: a page of evil.example whose name now
    resolves to 127.0.0.1 could read every page. Any request whose Host is
    not an allowed name (default: the loopback names and the listen host;
    an address is always allowed, as no rebinding names one) is refused
    with 400 and why; [dashboard] allowed_hosts replaces the names."""
    url = dashboard_env(env, allow_actions=False)
    port = url.rsplit(":", 1)[1]
    start(env, url, standalone=standalone)
    for path in ("/", "/jobs", "/jobs/nope", "/static/live.js", "/nowhere"):
        code, body = _get(url + path, f"evil.example:{port}")
        assert code == 400, (path, code, body)
        assert "evil.example" in body and "allowed_hosts" in body, body
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"app.localhost:{port}"):
        assert _get(url + "/", host)[0] == 200, host
    env.close()
    env.procs.clear()
    hosts = 'allowed_hosts = ["dash.test", ".corp.test"]\n'
    text = env.config.read_text().replace("allow_actions = false", hosts + "allow_actions = false")
    env.config.write_text(text)
    start(env, url, standalone=standalone)
    for host, code in (
        ("dash.test", 200),
        (f"a.corp.test:{port}", 200),
        ("corp.test", 200),
        ("[::1]", 200),
        (f"localhost:{port}", 400),  # the list replaces the default names
        ("dash.test.evil.example", 400),
    ):
        assert _get(url + "/", host)[0] == code, host


@pytest.mark.parametrize("entry", ["", "host:80", "a b", "http://x", "*.", "..x"])
def test_a_bad_allowed_hosts_entry_is_named(env: Env, entry: str) -> None:
    env.config.write_text(
        env.config.read_text() + f'\n[dashboard]\nallowed_hosts = ["ok.test", "{entry}"]\n'
    )
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2 and "dashboard.allowed_hosts[1]" in done.stderr, done.stderr


def serves_again(url: str, found: list[Any], old_pid: int) -> bool:
    """A dashboard process other than ``old_pid`` is ``found`` and answers ``url``."""
    if not found or found[0].pid == old_pid:
        return False
    try:
        with urllib.request.urlopen(url + "/", timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def test_corral_run_starts_the_dashboard_again_when_it_dies(env: Env) -> None:
    url = dashboard_env(env, allow_actions=False)
    start(env, url)
    daemon = env.procs[0]

    def dashboards() -> list[Any]:
        found = []
        for proc in daemon.descendants():
            try:
                if "dashboard" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:  # gone, or a zombie not reaped yet
                continue
        return found

    (first,) = wait_for(dashboards, 30, message="the dashboard child")
    first.kill()

    wait_for(lambda: serves_again(url, dashboards(), first.pid), 30, message="a new dashboard")
    assert "supervisor.dashboard_exited" in daemon.output()


@pytest.mark.parametrize("listen", ["garbage", "127.0.0.1:99999", "127.0.0.1:0", ":9465", "h:x"])
def test_a_listen_address_that_is_not_one_is_a_usage_error(
    env: Env, listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line and exit code 2 (a port past 65535 was an OverflowError
    traceback, exit code 1)."""
    from corral.cli import main

    assert main(["dashboard", "--listen", listen, "-c", str(env.config)]) == 2
    err = capsys.readouterr().err
    assert listen in err and "HOST:PORT" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "dashboard"])
def test_a_dashboard_port_in_use_stops_the_start_with_exit_2(env: Env, command: str) -> None:
    """As the events endpoint and the metrics: the setting, the address and
    the fix (``corral run`` only logged it, and tried again for ever)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env.config.write_text(env.config.read_text() + f'\n[dashboard]\nlisten = "{listen}"\n')
        proc = env.start(command)
        assert proc.wait(60) == 2, proc.output()
    line = next(ln for ln in proc.output().splitlines() if "dashboard.listen" in ln)
    assert listen in line and "port" in line and "Traceback" not in proc.output(), line


def test_a_reload_keeps_the_dashboard_it_runs_and_its_restart_too(env: Env) -> None:
    """[dashboard] changed in the file (to a port another process holds):
    the reload says "restart to apply", and a dashboard that dies is
    started again as it ran, on its own port, never down for the reload."""
    url = dashboard_env(env, allow_actions=False)
    start(env, url)
    daemon = env.procs[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        text = env.config.read_text()
        port = url.rpartition(":")[2]
        env.config.write_text(text.replace(f":{port}", f":{taken.getsockname()[1]}"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "supervisor.reloaded" in daemon.output(), 30, message="the reload")
        line = next(
            ln for ln in daemon.output().splitlines() if "supervisor.reload_needs_restart" in ln
        )
        assert "dashboard.listen" in line, line
        (first,) = wait_for(lambda: titled(daemon, "corral: dashboard"), 30, message="dashboard")
        first.kill()

        wait_for(
            lambda: serves_again(url, titled(daemon, "corral: dashboard"), first.pid),
            30,
            message="the dashboard again, on its port",
        )
        assert daemon.alive()


def test_the_dashboard_and_metrics_come_through_a_broker_restart_under_load(env: Env) -> None:
    """The broker SIGKILLed twice while jobs are enqueued and the dashboard
    and metrics are read all along: every page is answered (none hangs
    past its client's timeout), the metrics endpoint (the broker's) serves
    again after each restart, and every job enqueued ends succeeded."""
    url = dashboard_env(env, allow_actions=False)
    metrics = free_port()
    env.config.write_text(env.config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
    start(env, url)
    daemon = env.procs[-1]
    done = threading.Event()
    ids: list[str] = []
    pages: list[object] = []

    def produce() -> None:
        client = corral.Client(env.endpoint, timeout=30)
        try:
            while not done.is_set():
                ids.append(client.enqueue("e2e.square", 3))
        finally:
            client.close()

    def read_pages() -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(url + "/", timeout=20) as reply:
                    pages.append(reply.status)
            except urllib.error.HTTPError as exc:
                pages.append(exc.code)
            except OSError as exc:
                pages.append(repr(exc))
            time.sleep(0.05)

    threads = [threading.Thread(target=produce), threading.Thread(target=read_pages)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            wait_for(lambda: len(ids) > 20, 30, message="jobs enqueued")
            kill_broker(env, daemon)
            wait_for(lambda: _answers(f"http://127.0.0.1:{metrics}/metrics"), 30, message="metrics")
            wait_for(_more_than(ids, len(ids) + 20), 30, message="enqueues after the restart")
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert pages and all(page in (200, 503) for page in pages), sorted(set(map(str, pages)))
    client = env.client(timeout=30)
    for job_id in ids:
        assert client.result(job_id, timeout=60) == 9


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _more_than(items: list[str], count: int) -> Callable[[], bool]:
    return lambda: len(items) > count
