"""Fixtures of the soak tests: a seeded random source and a report of the
counts each test measured, shown at the end of the run (pass or fail)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

_REPORT = pytest.StashKey[list[str]]()


@pytest.fixture
def soak_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``soak_report(text)`` prints ``text`` and lists it under "soak results"."""
    lines = request.config.stash.setdefault(_REPORT, [])

    def report(text: str) -> None:
        print(text)
        lines.append(f"{request.node.name}: {text}")

    return report


@pytest.fixture
def soak_rng(soak_report: Callable[[str], None]) -> random.Random:
    """A random source seeded from CORRAL_SOAK_SEED (random when unset); the
    seed is reported, so a run's kill timings can be replayed."""
    seed = int(os.environ.get("CORRAL_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    soak_report(f"seed={seed}")
    return random.Random(seed)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("soak results")
        for line in lines:
            terminalreporter.write_line(line)
