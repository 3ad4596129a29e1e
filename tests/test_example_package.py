"""examples/corral-example-shop, a plugin package, installed as a user would
(pip), reaches the workers through the ``corral.tasks`` entry point group
alone: no pool names it in its plugins."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Env

import corral

PACKAGE = Path(__file__).parent.parent / "examples" / "corral-example-shop"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The package installed by pip into a directory of its own (not into
    the test venv, where every other test's workers would load it too)."""
    target = tmp_path / "site"
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info in it
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return target


def test_the_installed_package_brings_its_tasks_through_the_entry_point(
    env: Env, site: Path
) -> None:
    (dist,) = site.glob("corral_example_shop-*.dist-info")
    assert "[corral.tasks]" in (dist / "entry_points.txt").read_text()
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{site}", "')
    env.config.write_text(text.replace('plugins = ["e2e_tasks"]', "plugins = []"))
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    order = {"customer": "ana", "lines": [{"sku": "pen", "qty": 2}, {"sku": "ink"}]}
    placed = client.enqueue("shop.place_order", order)
    assert client.result(placed, timeout=30) == {"customer": "ana", "items": 3}
    bad = client.enqueue("shop.place_order", {"customer": "bo", "lines": [{"sku": "x", "qty": 0}]})
    with pytest.raises(corral.JobFailed, match="qty must be at least 1"):
        client.result(bad, timeout=30)
    assert client.job(bad).attempts == 1  # corral.Fail: not retried
    typo = client.enqueue("shop.place_order", {"customer": "cy"}, max_attempts=1)
    with pytest.raises(corral.JobFailed, match="ValidationError"):
        client.result(typo, timeout=30)
    restocked = client.enqueue("shop.restock", "pen")
    assert client.result(restocked, timeout=30) == "restocked pen"
    assert len(client.job(restocked).tries) == 2  # a corral.Retry, then the run that worked
    assert "shop.place_order" in client.status().registered_tasks
