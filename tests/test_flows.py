"""Chains, groups, chords and callbacks, end to end, also across a broker
crash."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import Env, broker_processes, wait_for
from inproc import InProcessBroker

import corral
from corral.broker import flows
from corral.broker.protocol import JobSpec, encode_value
from corral.broker.records import FlowCreated, Leased, Removed

J = corral.Job
KINDS = ("chain", "chord", "ok", "failure")


@pytest.fixture
def daemon(env: Env):  # type: ignore[no-untyped-def]
    proc = env.start("run")
    env.wait_ready(proc)
    return proc


def test_chain_passes_each_result_on(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    chain_id = client.enqueue_chain(
        [J("e2e.chain_step", 1), J("e2e.chain_step", 2), J("e2e.chain_step", 3)]
    )
    assert client.result(chain_id, timeout=30) == 6
    info = client.chain(chain_id)
    assert info.kind == "chain" and info.status == "succeeded"
    assert [info.statuses[i] for i in info.jobs] == ["succeeded"] * 3
    assert [client.result(i, timeout=5) for i in info.jobs] == [1, 3, 6]


def test_a_failure_stops_the_chain_and_says_where(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    chain_id = client.enqueue_chain(
        [J("e2e.chain_step", 1), J("e2e.give_up", "broken"), J("e2e.chain_step", 3)]
    )
    with pytest.raises(corral.JobFailed, match="step 1"):
        client.result(chain_id, timeout=30)
    info = client.chain(chain_id)
    assert info.status == "failed" and info.failed_step == 1
    assert info.jobs[2] not in info.statuses  # the third step was never created
    with pytest.raises(corral.JobNotFound):
        client.job(info.jobs[2])


def test_group_and_chord(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    group_id = client.enqueue_group([J("e2e.square", n) for n in (1, 2, 3)])
    assert client.result(group_id, timeout=30) == [1, 4, 9]
    info = client.group(group_id)
    assert info.status == "succeeded" and len(info.statuses) == 3
    chord = client.enqueue_group(
        [J("e2e.square", n) for n in (1, 2, 3)], callback=J("e2e.sum_prev", 100)
    )
    assert client.result(chord, timeout=30) == [1, 4, 9]
    callback = client.group(chord).callback
    assert client.result(callback, timeout=30) == 114
    info = client.group(chord)
    assert info.statuses[callback] == "succeeded"
    shown = env.run("group", chord, "-c", str(env.config)).stdout
    assert f"  callback: {callback} succeeded" in shown


def test_group_with_a_failure(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    group_id = client.enqueue_group(
        [J("e2e.square", 2), J("e2e.give_up", "x")], callback=J("e2e.sum_prev", 0)
    )
    with pytest.raises(corral.JobFailed):
        client.result(group_id, timeout=30)
    info = client.group(group_id)
    assert info.status == "failed" and info.failed_step == 1
    assert info.statuses[info.jobs[0]] == "succeeded"
    with pytest.raises(corral.JobNotFound):
        client.job(info.callback)  # a chord's callback runs only if all succeeded
    assert info.callback not in info.statuses
    cfg = ["-c", str(env.config)]
    shown = env.run("group", group_id, *cfg).stdout
    assert "  callback: not created" in shown and info.callback not in shown
    # the group's id given to `corral job`: it says what it is and where to look
    done = env.run("job", group_id, *cfg)
    assert done.returncode == 1
    assert f"{group_id!r} is a group, not a job: see `corral group {group_id}`" in done.stderr


def test_on_success_and_on_failure_callbacks(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    ok_cb, bad_cb = J("e2e.echo_prev"), J("e2e.echo_prev")
    good = client.enqueue_many([J("e2e.square", 5, on_success=ok_cb, on_failure=J("e2e.noop"))])[0]
    bad = client.enqueue_many([J("e2e.give_up", "why", on_failure=bad_cb)])[0]
    client.result(good, timeout=30)
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)

    def both_done() -> list[corral.JobInfo] | None:
        done = client.jobs(task="e2e.echo_prev", status="succeeded")
        return list(done) if len(done) == 2 else None

    succeeded_cb = wait_for(both_done, 30, message="both callbacks")
    results = sorted((client.result(j.id, timeout=5) for j in succeeded_cb), key=str)
    assert 25 in results
    failure = next(r for r in results if isinstance(r, dict))
    assert failure["job_id"] == bad and failure["type"] == "Fail"
    assert not client.jobs(task="e2e.noop")  # on_failure of the good job never ran


def test_broker_crash_mid_chain_and_mid_delay_loses_nothing(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    chain_id = client.enqueue_chain([J("e2e.slow_step", n) for n in (1, 2, 3, 4)])
    delayed = client.enqueue("e2e.stamp", "delayed", delay=2.0)
    wait_for(
        lambda: len(client.chain(chain_id).statuses) >= 2, 30, message="the chain to be under way"
    )
    (broker,) = broker_processes(daemon)
    broker.send_signal(signal.SIGKILL)  # the supervisor restarts it; the log replays
    client = env.client()
    assert client.result(chain_id, timeout=60) == 10
    info = client.chain(chain_id)
    assert [info.statuses[i] for i in info.jobs] == ["succeeded"] * 4
    label, ran_at = client.result(delayed, timeout=60)
    assert label == "delayed"
    assert ran_at >= client.job(delayed).enqueued_at + 2.0
    assert len(client.job(delayed).tries) == 1


def test_followup_owed_after_a_crash_is_created_on_replay(tmp_path: Path) -> None:
    """The broker logged step 0's result but stopped before step 1's
    creation: replay creates it, once."""
    broker = InProcessBroker(tmp_path / "state")
    state, record = broker.core.state, broker.core.journal.record
    followups = broker.core.followups
    steps = [JobSpec(f"s{i}", "t", encode_value(i)) for i in range(2)]
    record(FlowCreated("f", "chain", steps, 0.0))
    record(flows.create(state, steps[0], 0.0, flow="f"))  # type: ignore[arg-type]
    job = state.jobs["s0"]
    record(Leased("s0", 1, 1, "w", "h", 1, 1.0))
    record(state.policy.decide_finish(job, "ok", 2.0, result=encode_value(41)))
    assert "s1" not in state.jobs
    assert followups.catch_up(3.0) == 1
    assert state.jobs["s1"].prev_result == encode_value(41)
    assert followups.catch_up(4.0) == 0  # once
    # and never again, even once the follow-up is gone (expired, deleted)
    record(Removed("s1"))
    assert followups.catch_up(5.0) == 0
    assert "s1" not in state.jobs


def test_group_survives_a_broker_crash(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    group_id = client.enqueue_group(
        [J("e2e.slow_step", n) for n in range(4)], callback=J("e2e.sum_prev", 0)
    )
    wait_for(
        lambda: "succeeded" in client.group(group_id).statuses.values(),
        30,
        message="the group under way",
    )
    (broker,) = broker_processes(daemon)
    broker.send_signal(signal.SIGKILL)
    client = env.client()
    assert client.result(group_id, timeout=60) == [0, 1, 2, 3]
    assert client.result(client.group(group_id).callback, timeout=60) == 6
    human = env.run("group", group_id, "-c", str(env.config)).stdout
    assert f"group {group_id}: succeeded" in human


def test_async_client_management_and_flows(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    async def main() -> None:
        async with corral.AsyncClient(env.endpoint, timeout=10) as client:
            chain_id = await client.enqueue_chain([J("e2e.chain_step", 2), J("e2e.chain_step", 3)])
            group_id = await client.enqueue_group([J("e2e.square", 3), J("e2e.square", 4)])
            assert await client.result(chain_id, timeout=30) == 5
            assert await client.result(group_id, timeout=30) == [9, 16]
            assert (await client.chain(chain_id)).status == "succeeded"
            assert (await client.group(group_id)).kind == "group"
            later = await client.enqueue("e2e.square", 5, delay=30)
            assert await client.cancel(later) is True
            bad = await client.enqueue("e2e.give_up", "no")
            with pytest.raises(corral.JobFailed):
                await client.result(bad, timeout=30)
            assert await client.retry_failed() == [bad]
            page = await client.jobs(status="cancelled")
            assert [j.id for j in page] == [later]
            await client.pause("spare")
            assert (await client.status()).paused == ["spare"]
            await client.resume("spare")
            assert await client.purge("spare") == 0
            done = await client.enqueue("e2e.square", 1)
            await client.result(done, timeout=30)
            await client.delete(done)
            with pytest.raises(corral.JobNotFound):
                await client.job(done)

    asyncio.run(main())


def test_an_expired_follow_up_never_runs_again_after_restarts(env: Env) -> None:
    """Every kind of follow-up (a chain's next step, a chord's callback,
    on_success, on_failure) expires long before its parent; two restarts
    of `corral run` must not make any of them again (they did, once per
    restart). The failed parent of on_failure is kept the default 30 days."""
    env.write_config(processes=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    marks = {kind: str(env.home / f"marks-{kind}") for kind in KINDS}

    def follow(kind: str) -> corral.Job:
        return J("e2e.mark", marks[kind], result_ttl=0.3)

    chain = client.enqueue_chain([J("e2e.square", 1, result_ttl=600), follow("chain")])
    chord = client.enqueue_group([J("e2e.square", 2, result_ttl=600)], callback=follow("chord"))
    (ok,) = client.enqueue_many([J("e2e.square", 3, result_ttl=600, on_success=follow("ok"))])
    (bad,) = client.enqueue_many([J("e2e.flaky", 99, max_attempts=1, on_failure=follow("failure"))])
    client.result(chain, timeout=30)
    client.result(chord, timeout=30)
    client.result(ok, timeout=30)
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    ids = [client.chain(chain).jobs[1], client.group(chord).callback]

    def all_ran_and_expired() -> bool:
        if not all(Path(m).exists() for m in marks.values()):
            return False
        for job_id in ids:
            try:
                client.job(job_id)
                return False
            except corral.JobNotFound:
                pass
        return True

    wait_for(all_ran_and_expired, 30, message="every follow-up to run and expire")
    for n in range(2):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        daemon = env.start("run", name=f"run-again-{n}")
        env.wait_ready(daemon)
        env.wait_workers(1)
        client = env.client()
        assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9  # it serves
    runs = {kind: len(Path(m).read_text().splitlines()) for kind, m in marks.items()}
    assert runs == dict.fromkeys(KINDS, 1)
    assert client.job(bad).status == "failed"  # the parent is still there


def test_a_flow_finishes_whatever_its_members_ttls(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    chain_id = client.enqueue_chain(
        [J("e2e.square", 20, result_ttl=0), J("e2e.chain_step", 1, result_ttl=3600)]
    )
    assert client.result(chain_id, timeout=30) == 401  # 20**2 + 1
    assert client.chain(chain_id).status == "succeeded"
    chord = client.enqueue_group(
        [J("e2e.square", n, result_ttl=0) for n in (1, 2, 3)], callback=J("e2e.sum_prev", 100)
    )
    assert client.result(chord, timeout=30) == [1, 4, 9]
    assert client.result(client.group(chord).callback, timeout=30) == 114


def test_a_chain_with_its_own_result_ttl_is_forgotten_before_its_jobs(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    chain_id = client.enqueue_chain([J("e2e.square", 2), J("e2e.chain_step", 1)], result_ttl=0.3)
    assert client.result(chain_id, timeout=30) == 5
    step = client.chain(chain_id).jobs[1]

    def forgotten() -> bool:
        try:
            client.chain(chain_id)
        except corral.JobNotFound:
            return True
        return False

    wait_for(forgotten, 30, message="the chain to be forgotten")
    assert client.result(step, timeout=5) == 5  # its jobs keep their own TTL
