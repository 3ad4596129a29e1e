"""The broker child of ``corral run``: the exit code of a first start that
failed is the broker's own, whether or not the loop has reaped it yet."""

from __future__ import annotations

import os
import select
import time

import pytest

from corral.supervisor import broker_child
from corral.supervisor.broker_child import BrokerChild


def test_a_broker_that_refused_its_config_gives_exit_2_before_it_is_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load the ready pipe's end (the broker exited) came before the
    loop reaped the broker, and ``corral run`` exited 1 instead of the
    broker's 2."""
    monkeypatch.setattr(broker_child, "run_broker", lambda config, ready_w, **_: 2)
    child = BrokerChild()
    child.start(None, 0.0)  # type: ignore[arg-type]
    try:
        readable, _, _ = select.select(child.fds(), [], [], 30.0)
        assert readable, "the broker child never closed its ready pipe"
        # The pipe ends when the child exits; nothing has reaped it here.
        assert child.poll(None, 1.0) == "failed"  # type: ignore[arg-type]
        assert child.start_failure() == 2
    finally:
        if child.child is not None and child.child.alive and child.child.pid:
            child.signal(9)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(child.child.pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.01)
