"""Soak: the broker's memory levels off under a steady stream of chains.

It did not: every chain, with all its step payloads, stayed in memory for
the broker's lifetime (600 two-step chains with 40 KiB payloads grew it by
about 90 MiB a round). Each round here enqueues the chains, waits for
them to finish and for the last of them to be forgotten (its jobs live
``result_ttl`` = 1 s), then reads the broker process's RSS.

Knobs: CORRAL_SOAK_CHAIN_ROUNDS (8), CORRAL_SOAK_CHAINS (600 a round).
About 2 minutes with the defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Env, broker_processes, wait_for

import corral

from .harness import env_int

PAYLOAD = "x" * 40 * 1024
MIB = 1024 * 1024


@pytest.mark.soak
def test_broker_memory_levels_off_under_a_stream_of_chains(
    env: Env, soak_report: Callable[[str], None]
) -> None:
    rounds = env_int("CORRAL_SOAK_CHAIN_ROUNDS", 8)
    per_round = env_int("CORRAL_SOAK_CHAINS", 600)
    env.write_config(fsync="interval", processes=2, concurrency=4, prefetch=8)
    daemon = env.start("run")
    env.wait_ready(daemon, timeout=60)
    env.wait_workers(2)
    (broker,) = broker_processes(daemon)
    client = env.client()
    rss = []
    for _ in range(rounds):
        ids = [
            client.enqueue_chain(
                [corral.Job("e2e.noop", PAYLOAD, result_ttl=1.0) for _ in range(2)]
            )
            for _ in range(per_round)
        ]

        def drained() -> bool:
            counts = client.status().queues.get("default", {})
            return not any(counts.get(s, 0) for s in ("queued", "scheduled", "running"))

        def forgotten(ids: list[str] = ids) -> bool:
            for chain_id in ids:
                try:
                    client.chain(chain_id)
                    return False
                except corral.JobNotFound:
                    pass
            return True

        wait_for(drained, 120, message="the round's chains to run")
        wait_for(forgotten, 60, message="the round's chains to be forgotten")
        assert client.status().queues.get("default", {}).get("failed", 0) == 0
        rss.append(broker.memory_info().rss)
    payload = per_round * 2 * len(PAYLOAD)
    soak_report(
        f"chains: {rounds} rounds of {per_round} two-step chains "
        f"({payload / MIB:.0f} MiB of payload a round); broker RSS after each, MiB: "
        + ", ".join(f"{r / MIB:.0f}" for r in rss)
    )
    # It levels off: the broker holds at most about one round in flight (the
    # round is enqueued faster than it drains), so its RSS stays within a
    # round and a half of payload above its lowest; a leak adds a round (or,
    # as before the fix, two) every round, and is far past that by the end.
    assert max(rss) - min(rss) < 1.5 * payload, [r // MIB for r in rss]
