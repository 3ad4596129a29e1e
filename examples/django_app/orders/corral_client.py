"""The corral client of this process, made on first use.

One ``corral.Client`` serves every thread of the process (gunicorn's
``--threads``, ``runserver``): it is safe to share between threads, and a
client made before a fork (gunicorn ``--preload`` imports the app in the
master) notices the fork and opens its own socket in the child. It is made
on first use rather than at import so that importing the app reads no
config and opens nothing. It opens its socket on its first request and keeps
it, so a request after the first costs no connect.
"""

from __future__ import annotations

import threading

from django.conf import settings

import corral

_lock = threading.Lock()
_client: corral.Client | None = None


def client() -> corral.Client:
    """The process's client of the broker named by ``settings.CORRAL_CONFIG``
    (made on the first call). Raises corral.ConfigError for a config that
    cannot be read."""
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = corral.Client.from_config(settings.CORRAL_CONFIG)
    return _client
