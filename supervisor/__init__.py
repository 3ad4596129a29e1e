"""corral.supervisor: forks, watches and restarts worker processes."""
