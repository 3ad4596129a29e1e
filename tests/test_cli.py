"""The `corral` command: output, --json and exit codes (0 ok, 1 job failed or
not found, 2 usage or config error, 3 broker unreachable)."""

from __future__ import annotations

import json

import pytest
from conftest import Env, wait_until

import corral


def test_enqueue_wait_prints_the_result(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    done = env.run("enqueue", "e2e.square", "9", "--wait", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "81"
    done = env.run("enqueue", "e2e.square", "5", "--wait", "--json", "-c", str(env.config))
    assert json.loads(done.stdout)["result"] == 25


def test_enqueue_then_job_and_result(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    job_id = env.run("enqueue", "e2e.order", '{"item": "pen", "qty": 3}', *cfg).stdout.strip()
    assert len(job_id) == 32
    done = env.run("result", job_id, "--wait", "--json", *cfg)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"id": job_id, "result": "3xpen"}
    info = json.loads(env.run("job", job_id, "--json", *cfg).stdout)
    assert info["status"] == "succeeded"
    assert info["attempts"] == 1
    assert info["tries"][0]["pid"] > 0
    human = env.run("job", job_id, *cfg).stdout
    assert "status:      succeeded" in human
    status = json.loads(env.run("status", "--json", *cfg).stdout)
    assert status["queues"]["default"]["succeeded"] == 1
    assert len(status["workers"]) == 2


def test_failed_job_exits_one(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    done = env.run("enqueue", "e2e.order", '{"item": 1}', "--wait", "-c", str(env.config))
    assert done.returncode == 1
    assert "ValidationError" in done.stderr


def test_unknown_job_exits_one(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    done = env.run("job", "nope", "-c", str(env.config))
    assert done.returncode == 1
    assert "no job with id 'nope'" in done.stderr


def test_unreachable_broker_exits_three(env: Env) -> None:
    done = env.run("status", "-c", str(env.config), "--timeout", "0.3")
    assert done.returncode == 3
    assert "no answer from the broker" in done.stderr


def test_bad_config_exits_two_naming_the_key(env: Env) -> None:
    bad = env.home / "bad.toml"
    bad.write_text('[[pools]]\nname = "a"\n\n[[pools]]\nname = "b"\nmax_memory = "lots"\n')
    done = env.run("check-config", "-c", str(bad))
    assert done.returncode == 2
    assert "pools[1].max_memory" in done.stderr
    done = env.run("run", "-c", str(bad))
    assert done.returncode == 2
    assert env.run("check-config", "-c", str(env.config)).returncode == 0


def test_check_config_imports_the_plugins_and_names_the_broken_line(env: Env) -> None:
    plugins = env.home / "plugins"
    plugins.mkdir()
    (plugins / "broken_tasks.py").write_text("import corral\n\ndef broken(:\n")
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{plugins}", "')
    env.config.write_text(text.replace('plugins = ["e2e_tasks"]', 'plugins = ["broken_tasks"]'))
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert f"{plugins / 'broken_tasks.py'}:3" in done.stderr and "pools[0].plugins" in done.stderr
    assert env.run("check-config", "--no-plugins", "-c", str(env.config)).returncode == 0


def test_bad_payload_json_exits_two(env: Env) -> None:
    done = env.run("enqueue", "e2e.square", "{not json", "-c", str(env.config))
    assert done.returncode == 2
    assert "PAYLOAD_JSON" in done.stderr


def test_log_verify_reports_corruption(env: Env) -> None:
    # Small segments: the test reads and rewrites one whole segment.
    env.write_config(
        extra_broker='segment_size = "1MiB"\ndisk_reserve = "16KiB"\nmax_message_size = "512KiB"'
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    for n in range(50):
        client.enqueue("e2e.square", n)
    broker.signal(15)
    assert broker.wait(30) == 0
    cfg = ["-c", str(env.config)]
    log_dir = env.home / "state" / "log"
    segments = len(list(log_dir.glob("*.seg")))
    done = env.run("log", "verify", *cfg)
    assert done.returncode == 0, done.stderr
    # the 50 jobs and the broker's start (its lease epoch)
    assert done.stdout == f"{log_dir}: {segments} segments, 51 records; ok\n"
    done = env.run("log", "verify", "--json", *cfg)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "segments": segments,
        "records": 51,
        "ok": True,
        "torn_tail": None,
        "corrupt": None,
        "damaged": [],
        "lost_jobs": [],
        "changed_jobs": [],
    }
    segment = sorted((env.home / "state" / "log").glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    middle = len(bytes(data).rstrip(b"\0")) // 2
    data[middle] ^= 0x01
    segment.write_bytes(bytes(data))
    done = env.run("log", "verify", "--json", *cfg)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False
    broker = env.start("broker", name="broker-corrupt")
    assert broker.wait(30) != 0
    assert "corrupt" in broker.output()
    assert segment.name in broker.output()


def test_chains_and_groups_from_the_cli(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    done = env.run(
        "enqueue-chain",
        '{"task": "e2e.chain_step", "payload": 1}',
        '{"task": "e2e.chain_step", "payload": 2}',
        "--wait",
        *cfg,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    done = env.run(
        "enqueue-group",
        '{"task": "e2e.square", "payload": 2}',
        '{"task": "e2e.square", "payload": 3}',
        "--callback",
        '{"task": "e2e.sum_prev", "payload": 0}',
        *cfg,
    )
    group_id = done.stdout.strip()
    assert env.run("result", group_id, "--wait", *cfg).stdout.strip() == "[4, 9]"
    info = json.loads(env.run("group", group_id, "--json", *cfg).stdout)
    assert info["kind"] == "group" and info["callback"]
    assert env.run("result", info["callback"], "--wait", *cfg).stdout.strip() == "13"
    bad = env.run("enqueue-chain", '{"payload": 1}', *cfg)
    assert bad.returncode == 2 and "task" in bad.stderr


def test_callbacks_and_result_ttl_from_the_cli(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    chain = env.run(
        "enqueue-chain",
        '{"task": "e2e.square", "payload": 6, "on_success": {"task": "e2e.echo_prev"}}',
        "--wait",
        *cfg,
    )
    assert chain.stdout.strip() == "36", chain.stderr
    listed = json.loads(env.run("jobs", "--task", "e2e.echo_prev", "--json", *cfg).stdout)
    callback = listed["jobs"][0]["id"]
    assert env.run("result", callback, "--wait", *cfg).stdout.strip() == "36"
    # Two results kept: one with the default TTL (a day), one with a long one.
    kept = []
    for n, ttl in ((3, []), (5, ["--result-ttl", "3600"])):
        done = env.run("enqueue", "e2e.square", str(n), *ttl, "--wait", "--json", *cfg)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"] == n * n
        kept.append((json.loads(done.stdout)["id"], n * n))
    # A result kept 0.2 s: there when the job ends, gone once the TTL passed.
    short = env.run("enqueue", "e2e.square", "2", "--result-ttl", "0.2", "--wait", "--json", *cfg)
    assert short.returncode == 0, short.stderr
    reply = json.loads(short.stdout)
    assert reply["result"] == 4
    gone = wait_until(
        lambda: env.run("result", reply["id"], *cfg),
        lambda done: done.returncode != 0,
        30,
        interval=0.1,
        message="the 0.2 s result to expire",
    )
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"corral: no job with id {reply['id']!r}")
    done = env.run("job", reply["id"], *cfg)
    assert done.returncode == 1
    assert done.stderr.startswith(f"corral: no job with id {reply['id']!r}")
    # The two others, which ended earlier, are still there.
    for job_id, value in kept:
        done = env.run("result", job_id, "--json", *cfg)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"id": job_id, "result": value}


def test_retry_of_a_failed_job_continues_its_run_numbers(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    cfg = ["-c", str(env.config)]
    # fails on runs 1 and 2 (its budget: 2 attempts), succeeds from run 3
    job_id = client.enqueue("e2e.flaky", 3, max_attempts=2)
    with pytest.raises(corral.JobFailed):
        client.result(job_id, timeout=30)
    assert [t.attempt for t in client.job(job_id).tries] == [1, 2]
    done = env.run("retry", job_id, *cfg)
    assert done.returncode == 0, done.stderr
    assert client.result(job_id, timeout=30) == 3
    info = client.job(job_id)
    assert [t.attempt for t in info.tries] == [1, 2, 3]  # no second "try 1"
    assert (info.status, info.attempts) == ("succeeded", 1)  # a fresh budget
    shown = env.run("job", job_id, *cfg).stdout
    assert "try 3:" in shown and shown.count("try 1:") == 1
