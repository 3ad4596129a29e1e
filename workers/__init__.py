"""corral.workers: the worker runtime, the task registry and plugin loading."""
