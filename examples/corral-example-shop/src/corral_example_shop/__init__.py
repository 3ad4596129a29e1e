"""An example corral plugin package (see its pyproject.toml): the tasks are
in :mod:`corral_example_shop.tasks`."""
