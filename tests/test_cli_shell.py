"""The `corral` command as the shell uses it: --version, where the config is
found, durations and times as the config writes them, payloads from stdin
or a file, one-line errors with exit code 2 for bad input, and an exit code
of its own (4) for a wait that gave up."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import CORRAL, Env

import corral


def test_version_prints_the_installed_version(env: Env) -> None:
    done = env.run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"corral {corral.__version__}"


def test_the_config_is_found_through_corral_config_then_the_current_directory(
    env: Env,
) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    elsewhere = env.home / "elsewhere"
    elsewhere.mkdir()
    # no -c: $CORRAL_CONFIG names the file
    done = env.run("status", "--json", cwd=elsewhere, environ={"CORRAL_CONFIG": str(env.config)})
    assert done.returncode == 0, done.stderr
    assert "queues" in json.loads(done.stdout)
    # no -c, no $CORRAL_CONFIG: ./corral.toml (the home holds it)
    done = env.run("status", "--json", environ={"CORRAL_CONFIG": ""})
    assert done.returncode == 0, done.stderr
    # -c before the command, as after it; the one after it wins
    done = env.run("-c", str(env.config), "status", "--json", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "queues" in json.loads(done.stdout)
    missing = str(elsewhere / "missing.toml")
    done = env.run("-c", missing, "status", "-c", str(env.config), "--json", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    done = env.run("-c", missing, "status", cwd=elsewhere)
    assert done.returncode == 2 and "missing.toml" in done.stderr, done.stderr


def test_durations_and_times_are_read_as_the_config_writes_them(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    cfg = ["-c", str(env.config)]
    before = time.time()
    delayed = env.run("enqueue", "e2e.noop", "--delay", "5m", "--job-timeout", "1m30s", *cfg)
    after = time.time()
    assert delayed.returncode == 0, delayed.stderr
    info = client.job(delayed.stdout.strip())
    assert info.status == "scheduled"
    assert info.next_run_at is not None and before + 300 <= info.next_run_at <= after + 300
    assert info.timeout == 90.0
    at = env.run("enqueue", "e2e.noop", "--run-at", "2030-01-01T00:00:00Z", *cfg)
    assert at.returncode == 0, at.stderr
    expected = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert client.job(at.stdout.strip()).next_run_at == expected
    # epoch seconds and plain seconds still work
    epoch = env.run("enqueue", "e2e.noop", "--run-at", str(expected + 1), "--delay", "0", *cfg)
    assert epoch.returncode == 0, epoch.stderr
    assert client.job(epoch.stdout.strip()).next_run_at == expected + 1


def test_a_payload_comes_from_stdin_or_a_file_past_the_argument_limit(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    item = "x" * 300_000  # over the ~128 KiB a single shell argument may hold
    path = env.home / "order.json"
    path.write_text(json.dumps({"item": item, "qty": 2}))
    from_file = env.run("enqueue", "e2e.order", f"@{path}", "--wait", "--json", *cfg)
    assert from_file.returncode == 0, from_file.stderr[-500:]
    assert json.loads(from_file.stdout)["result"] == f"2x{item}"
    from_stdin = env.run("enqueue", "e2e.square", "-", "--wait", *cfg, stdin="12\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout.strip() == "144"
    utf8 = env.run("enqueue", "e2e.order", '{"item": "名前", "qty": 1}', "--wait", *cfg)
    assert utf8.stdout.strip() == '"1x名前"', utf8.stdout  # not "1x\\u540d\\u524d"
    chain = env.run(
        "enqueue-chain",
        "-",
        '{"task": "e2e.square", "payload": 5}',
        "--wait",
        *cfg,
        stdin='{"task": "e2e.square", "payload": 3}',
    )
    assert chain.returncode == 0, chain.stderr
    assert chain.stdout.strip() == "25"  # the last step's result


#: Bad input, and what its one-line error must name.
BAD_INPUT = [
    (["enqueue", "e2e.square", "123456789012345678901234567890"], "PAYLOAD_JSON"),
    (["enqueue", "e2e.square", '"\\ud800"'], "PAYLOAD_JSON"),
    (["enqueue", "e2e.square", "@/nonexistent/payload.json"], "/nonexistent/payload.json"),
    (["enqueue", "e2e.square", "--priority", "99999999999999999999"], "priority"),
    (["enqueue", "e2e.square", "--delay", "soon"], "--delay"),
    (["enqueue", "e2e.square", "--run-at", "tomorrow"], "--run-at"),
    (["enqueue", "e2e.square", "--timeout", "-1"], "--timeout"),
    (["status", "--endpoint", "garbage"], "garbage"),
    (["status", "--endpoint", "tcp://"], "tcp://"),
    (["jobs", "--limit", "0"], "--limit"),
    (["jobs", "--limit", "-1"], "--limit"),
    # past 64 bits: a traceback (OverflowError) or an error blaming the payload before
    (["jobs", "--limit", "99999999999999999999"], "--limit"),
    (["enqueue", "e2e.square", "1", "--max-attempts", "99999999999999999999"], "max-attempts"),
    (["enqueue", "e2e.square", "1", "--max-retries", "99999999999999999999"], "--max-retries"),
    (["enqueue", "e2e.square", "1", "--max-retries", "-1"], "max-retries"),
    (["enqueue-chain", "-", "-"], "stdin"),
    (["status", "--timeout", "0"], "--timeout"),  # no wait at all: every call "unavailable"
    (["top", "--interval", "0", "--once"], "--interval"),  # a busy loop on the broker
    # nested past Python's recursion limit: json raises RecursionError, not a syntax error
    (["enqueue", "e2e.square", "[" * 20_000 + "]" * 20_000], "PAYLOAD_JSON"),
    (["enqueue-chain", "[" * 20_000], "JOB_JSON"),
    (["enqueue-group", '{"task": "e2e.square"}', "--callback", "[" * 20_000], "--callback"),
    # refused by the broker as invalid (its checks, not the CLI's): bad input all the same
    (["enqueue", "e2e.square", "1", "--delay", "1e308"], "delay"),
    (["enqueue", "e2e.square", "1", "--max-attempts", "99999999999999999"], "max-attempts"),
    (["enqueue", "e2e.square", "1", "--queue", ""], "queue"),
    (["enqueue", "e2e.square", "1", "--limit-key", ""], "limit_key"),
    (["enqueue", "e2e.square", "1", "--run-at", "99999999999999"], "run_at"),
    # a queue no job could have: paused (and logged) for ever before
    (["pause", ""], "queue"),
    (["pause", "q" * 201], "queue"),
    (["resume", ""], "queue"),
    # a worker the broker would refuse at every READY (or one that takes nothing)
    (["worker", "--concurrency", "200000"], "--concurrency"),
    (["worker", "--concurrency", "0"], "--concurrency"),
    (["worker", "--concurrency", "-5"], "--concurrency"),
]


def test_an_option_of_bytes_that_are_not_utf8_is_named(env: Env) -> None:
    """Such bytes are lone surrogates to Python: msgpack cannot carry them,
    and the error blamed PAYLOAD_JSON. Run directly: the zygote's JSON
    protocol cannot carry such an argv either."""
    broker = env.start("broker")
    env.wait_ready(broker)
    for option, value, named in [
        ("--header", b"k=\xff", "corral: Enqueue.jobs[0].headers['k']"),
        ("--limit-key", b"\xff", "corral: Enqueue.jobs[0].limit_key"),
    ]:
        args = [CORRAL, "enqueue", "e2e.square", "1", option, value, "-c", str(env.config)]
        done = subprocess.run(args, cwd=env.home, capture_output=True, timeout=60, check=False)
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith(named) and "PAYLOAD_JSON" not in err, err


def test_bad_input_gets_one_line_and_exit_two(env: Env) -> None:
    broker = env.start("broker")  # one broker for every case: each is refused before it
    env.wait_ready(broker)
    for args, named in BAD_INPUT:
        done = env.run(*args, "-c", str(env.config), stdin="1")
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        # one line says what was wrong (a warning of its own may come before it)
        lines = [ln for ln in done.stderr.strip().splitlines() if ": warning:" not in ln]
        assert len(lines) == 1 and lines[0].startswith("corral"), (args, done.stderr)
        assert named in lines[0], (args, done.stderr)
    # the same nesting from stdin, from a file and on a --from-file line
    deep = "[" * 100_000 + "]" * 100_000
    path = env.home / "deep.json"
    path.write_text(deep)
    jobs = env.home / "deep.jsonl"
    jobs.write_text('{"task": "e2e.square", "payload": ' + deep + "}\n")
    for args, stdin, named in [
        (["enqueue", "e2e.square", "-"], deep, "stdin"),
        (["enqueue", "e2e.square", f"@{path}"], "", str(path)),
        (["enqueue", "--from-file", str(jobs)], "", f"{jobs}:1"),
    ]:
        done = env.run(*args, "-c", str(env.config), stdin=stdin)
        assert done.returncode == 2, (args, done.stdout, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        assert named in done.stderr.splitlines()[-1], (args, done.stderr[-2000:])
        assert done.stderr.count("PAYLOAD_JSON") <= 1, done.stderr  # named once, not twice
    assert env.client().status().queues == {}, "nothing was enqueued"
    assert env.client().status().paused == [], "nothing was paused"


def test_a_wait_that_gives_up_exits_four_and_the_job_goes_on(env: Env) -> None:
    broker = env.start("broker")  # no workers: the job stays queued
    env.wait_ready(broker)
    cfg = ["-c", str(env.config)]
    job_id = env.run("enqueue", "e2e.square", "3", *cfg).stdout.strip()
    done = env.run("result", job_id, "--wait", "--wait-timeout", "300ms", *cfg)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    waited = env.run("enqueue", "e2e.square", "4", "--wait", "--wait-timeout", "0.3", *cfg)
    assert waited.returncode == 4, waited.stderr
    assert env.client().job(job_id).status == "queued"
    # a failed job is still 1, an unknown one too
    assert env.run("result", "nope", *cfg).returncode == 1


def test_a_queue_or_task_no_worker_knows_gets_a_warning(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    client = env.client()
    # wait for the workers to register their tasks
    deadline = time.monotonic() + 30
    while "e2e.square" not in client.status().registered_tasks:
        assert time.monotonic() < deadline, "the workers never registered"
        time.sleep(0.05)
    typo = env.run("pause", "defualt", *cfg)
    assert typo.returncode == 0, typo.stderr
    assert "warning: no worker serves queue 'defualt'" in typo.stderr
    assert "default" in typo.stderr  # the known queues are listed
    assert "defualt" in client.status().paused  # still done: it may be on purpose
    known = env.run("pause", "default", *cfg)
    assert known.returncode == 0 and "warning" not in known.stderr
    assert env.run("resume", "default", *cfg).returncode == 0
    task = env.run("enqueue", "e2e.sqaure", "3", *cfg)
    assert task.returncode == 0
    assert "warning: no worker has registered task 'e2e.sqaure'" in task.stderr
    fine = env.run("enqueue", "e2e.square", "3", "--wait", *cfg)
    assert fine.returncode == 0 and "warning" not in fine.stderr and fine.stdout.strip() == "9"


def test_jobs_lists_newest_first_with_the_columns_people_look_for(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = [client.enqueue("e2e.noop", i, priority=i, queue="名前") for i in range(5)]
    cfg = ["-c", str(env.config)]
    page = json.loads(env.run("jobs", "--newest", "--limit", "3", "--json", *cfg).stdout)
    assert [job["id"] for job in page["jobs"]] == ids[::-1][:3]
    rest = env.run("jobs", "--newest", "--cursor", page["cursor"], "--json", *cfg)
    assert [job["id"] for job in json.loads(rest.stdout)["jobs"]] == ids[::-1][3:]
    shown = env.run("jobs", "--newest", *cfg).stdout
    header = shown.splitlines()[0].split()
    assert header == ["id", "status", "attempts", "priority", "queue", "task", "created", "error"]
    rows = [line.split() for line in shown.splitlines()[2:] if line.strip()]
    assert [row[0] for row in rows] == ids[::-1]
    assert rows[0][3] == "4" and rows[0][4] == "名前"  # real UTF-8, not \\u540d


def test_enqueue_from_a_jsonl_file_sends_batches_and_names_a_bad_line(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    cfg = ["-c", str(env.config)]
    jobs = env.home / "jobs.jsonl"
    lines = [
        json.dumps({"task": "e2e.square", "payload": i, "priority": i % 3}) for i in range(1200)
    ]
    jobs.write_text("\n".join(lines[:600]) + "\n\n" + "\n".join(lines[600:]) + "\n")
    done = env.run("enqueue", "--from-file", str(jobs), *cfg)
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == len(set(ids)) == 1200
    assert "enqueued 1200 job(s)" in done.stderr
    client = env.client()
    assert client.status().queues["default"]["queued"] == 1200
    assert client.job(ids[7]).priority == 7 % 3
    # a bad line: the batches before it are in, it and the rest are not
    bad = env.home / "bad.jsonl"
    bad.write_text("\n".join([*lines[:700], '{"payload": 1}', *lines[:10]]) + "\n")
    failed = env.run("enqueue", "--from-file", str(bad), *cfg)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"{bad}:701" in failed.stderr and "500 jobs before it were enqueued" in failed.stderr
    assert client.status().queues["default"]["queued"] == 1700
    both = env.run("enqueue", "e2e.square", "--from-file", str(jobs), *cfg)
    assert both.returncode == 2 and "--from-file" in both.stderr


def test_a_wait_on_a_terminal_shows_the_running_jobs_progress(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    release = env.home / "release"
    job_id = env.client().enqueue("e2e.progress", str(release))
    deadline = time.monotonic() + 30
    while env.client().job(job_id).progress is None:
        assert time.monotonic() < deadline, "the job never reported progress"
        time.sleep(0.05)
    leader, follower = os.openpty()  # stderr a terminal: the bar is drawn there
    waiting = subprocess.Popen(
        [CORRAL, "result", job_id, "--wait", "-c", str(env.config)],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    try:
        while b"half way" not in seen:
            assert time.monotonic() < deadline, f"no progress drawn: {seen!r}"
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 4096)
        assert b"50%" in seen
        release.touch()
        out, _ = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
        os.close(leader)
    assert waiting.returncode == 0
    assert out.strip() == '"done"'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("corral enq", {"enqueue", "enqueue-chain", "enqueue-group"}),
        ("corral jobs --sta", {"--status"}),
        ("corral jobs --status fa", {"failed"}),
    ],
)
def test_the_shell_completes_commands_options_and_choices(
    env: Env, line: str, expected: set[str]
) -> None:
    out = env.home / "completions"
    done = env.run(
        environ={
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
        },
    )
    assert done.returncode == 0, done.stderr
    assert set(out.read_text().replace("\x0b", " ").split()) == expected


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_prints_the_script_for_each_shell(env: Env, shell: str) -> None:
    done = env.run("completion", shell)
    assert done.returncode == 0, done.stderr
    assert "_python_argcomplete" in done.stdout and "corral" in done.stdout


def _with_schedule(env: Env, block: str) -> None:
    env.config.write_text(env.config.read_text() + "\n" + block)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            '[[schedules]]\ntask = "e2e.sqaure"\nevery = "1m"\npayload = 3\n',
            "schedules[0] ('e2e.sqaure').task: no pool that serves queue 'default' registers "
            "task 'e2e.sqaure'",
        ),
        (
            '[[schedules]]\ntask = "e2e.square"\nevery = "1m"\npayload = 3\nqueue = "later"\n',
            "pool(s) default register it but do not serve queue 'later'",
        ),
        (
            '[[schedules]]\nname = "sq"\ntask = "e2e.square"\nevery = "1m"\npayload = "abc"\n',
            "schedules[0] ('sq').payload: task 'e2e.square' would refuse it on every run",
        ),
    ],
)
def test_check_config_checks_each_schedule_against_the_pools_plugins(
    env: Env, block: str, expected: str
) -> None:
    _with_schedule(env, block)
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2, done.stdout
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert env.run("check-config", "--no-plugins", "-c", str(env.config)).returncode == 0


def test_check_config_survives_a_plugin_that_exits_at_import(env: Env) -> None:
    plugins = env.home / "plugins"
    plugins.mkdir()
    (plugins / "exiting_tasks.py").write_text("import os\n\nos._exit(7)\n")
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{plugins}", "')
    env.config.write_text(text.replace('plugins = ["e2e_tasks"]', 'plugins = ["exiting_tasks"]'))
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "exit code 7" in done.stderr and "Traceback" not in done.stderr


def test_the_shipped_configs_commented_schedule_passes_when_uncommented(env: Env) -> None:
    shipped = Path(__file__).parent.parent / "config" / "corral.toml"
    text = shipped.read_text()
    start = text.index("# [[schedules]]")
    block = text[start : text.index("\n\n", start)]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    config = env.home / "shipped.toml"
    root = shipped.parent.parent
    config.write_text(
        text.replace('python_path = ["examples"]', f'python_path = ["{root / "examples"}"]')
        .replace('"var/corral', f'"{env.home}/var')
        .replace('"ipc://var/corral', f'"ipc://{env.home}/var')
        .replace(block, uncommented)
    )
    done = env.run("check-config", "-c", str(config))
    assert done.returncode == 0, done.stderr


def test_top_shows_queues_with_latency_workers_with_progress_and_pools(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    release = env.home / "release"
    running = client.enqueue("e2e.progress", str(release))
    client.enqueue("e2e.square", 2, queue="nobody")  # waits: no worker serves it
    deadline = time.monotonic() + 30
    shown = ""
    while "half way" not in shown:
        assert time.monotonic() < deadline, shown
        done = env.run("top", "--once", "-c", str(env.config))
        assert done.returncode == 0, done.stderr
        shown = done.stdout
        time.sleep(0.1)
    rows = {line.split()[0]: line.split() for line in shown.splitlines() if line.strip()}
    assert rows["nobody"][1] == "1"  # queued
    assert rows["nobody"][6].endswith(("s", "m"))  # the oldest job's age, not "-"
    worker_line = next(line for line in shown.splitlines() if running in line)
    assert "50% half way" in worker_line
    assert "default" in rows and rows["default"][3] == "1"  # running
    pool = next(line.split() for line in shown.splitlines() if line.split()[1:2] == ["default"])
    assert pool[3:6] == ["2", "0", "ok"]  # processes, restarts, state
    release.touch()
    assert client.result(running, timeout=30) == "done"


def test_keys_refuses_a_name_that_is_not_a_file_name_and_never_overwrites_a_pair(
    env: Env,
) -> None:
    """`corral keys server` run twice replaced the broker's key pair without
    a word (every host's server_public_key then stops matching); a name
    with a "/" was a traceback, one with ".." wrote outside --directory."""
    keys = env.home / "keys"
    made = env.run("keys", "server", "--directory", str(keys))
    assert made.returncode == 0, made.stderr
    secret = (keys / "server.key_secret").read_bytes()
    again = env.run("keys", "server", "--directory", str(keys))
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert "server.key" in again.stderr.splitlines()[-1] and "exists" in again.stderr
    assert (keys / "server.key_secret").read_bytes() == secret
    for name in ("../evil", "a/b", "", ".hidden", "back\\slash", "server2\n"):
        done = env.run("keys", name, "--directory", str(keys))
        assert done.returncode == 2 and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.stderr.startswith("corral: NAME"), (name, done.stderr)
    assert sorted(p.name for p in keys.iterdir()) == ["server.key", "server.key_secret"]
    assert not (env.home / "evil.key").exists()
