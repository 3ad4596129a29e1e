"""The Sentry example's hooks (examples/hooks/sentry_hook.py) with the real
sentry-sdk, sending to a transport that appends each event to the file
``$CORRAL_TEST_SENTRY_FILE`` as a JSON line instead of the network."""

from __future__ import annotations

import json
import os
from typing import Any

import sentry_sdk
from sentry_hook import SentryHooks
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

import corral


class FileTransport(Transport):
    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.path = os.environ["CORRAL_TEST_SENTRY_FILE"]

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            event = item.get_event()
            if event is not None:
                with open(self.path, "a") as out:
                    out.write(json.dumps(event, default=str) + "\n")


def corral_hooks() -> corral.Hooks:
    sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=FileTransport)
    return SentryHooks()
