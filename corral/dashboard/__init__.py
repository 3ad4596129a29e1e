"""The web dashboard: see :mod:`corral.dashboard.app` (the pages) and
:mod:`corral.dashboard.serve` (running it)."""
