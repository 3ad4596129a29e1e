"""The corral client of this process (and thread), made on first use.

Why not one ``client = corral.Client(...)`` at module level:

- gunicorn forks its workers, after importing the app when run with
  ``--preload``. A ZeroMQ context or socket made before a fork does not work
  in the child (a client used before the fork hangs there), so each process
  makes its own client, after it started: on first use, never at import.
- A ``corral.Client`` is not thread-safe (one per thread, says its
  docstring), and a Django process may serve requests on several threads
  (gunicorn's ``--threads``, ``runserver``). So each thread gets its own.

The client opens its socket on its first request and keeps it, so a request
after the first costs no connect.
"""

from __future__ import annotations

import os
import threading

from django.conf import settings

import corral

_local = threading.local()


def client() -> corral.Client:
    """This thread's client of the broker named by ``settings.CORRAL_CONFIG``
    (made on the first call in each process and thread). Raises
    corral.ConfigError for a config that cannot be read."""
    held: corral.Client | None = getattr(_local, "client", None)
    if held is None or getattr(_local, "pid", None) != os.getpid():
        # A forked child inherits the forking thread's locals: a client from
        # before the fork is dropped (not closed: its socket is the parent's).
        held = corral.Client.from_config(settings.CORRAL_CONFIG)
        _local.client, _local.pid = held, os.getpid()
    return held
