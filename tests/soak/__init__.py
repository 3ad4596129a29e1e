"""Long fault tests (``make soak``) and their history checker.

A package, so that its modules are ``soak.*`` (no clash with a module of the
same name elsewhere in tests/) and its conftest.py is ``soak.conftest``
rather than a second top-level ``conftest`` next to tests/conftest.py.
"""
