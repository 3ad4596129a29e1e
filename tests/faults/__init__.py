"""The fault suite: processes, logs and sockets broken at the wrong moment,
and the history checker that says what every acknowledged job became.

Two profiles: the fast one runs in ``make test`` (tests not marked
``soak``); the full one runs under ``make soak`` (tests marked ``soak``,
with larger counts). A package, so that its modules are ``faults.*`` (no
clash with a module of the same name elsewhere in tests/) and its
conftest.py is ``faults.conftest`` rather than a second top-level
``conftest`` next to tests/conftest.py.
"""
