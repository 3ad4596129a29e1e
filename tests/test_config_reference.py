"""docs/CONFIG.md is written from config/schema.py by ``make docs``
(:mod:`corral.config.reference`): the committed file never differs from
what the schema gives, and every key has a description."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def test_every_config_key_has_a_description() -> None:
    missing = reference.missing_descriptions()
    assert not missing, (
        "config keys without a description: " + ", ".join(missing) + ". Add a `#:` comment "
        "line right above each field in config/schema.py (what it does, what unset means), "
        "then run make docs"
    )


def test_the_committed_reference_matches_the_schema() -> None:
    committed = DOC.read_text() if DOC.exists() else ""
    if committed != reference.render():
        pytest.fail("docs/CONFIG.md is out of date with config/schema.py: run make docs")


def test_each_row_gives_the_type_the_default_and_the_allowed_values() -> None:
    text = reference.render()
    rows = {
        '| `heartbeat_interval` | duration ≥ 10ms, ≤ 36525d | `"1s"` |',
        '| `segment_size` | size ≥ 4KiB, ≤ 4GiB | `"64MiB"` |',
        '| `fsync` | one of `"always"`, `"interval"`, `"never"` | `"always"` |',
        "| `heartbeat_liveness` | integer: a whole number of heartbeats from 1 to 1000 (",
        "| `max_jobs_per_process` | integer ≥ 0 | `0` |",
        "| `name` | string: a pool name of letters, digits,",
        "| `task` | string: a name of 1 to 200 characters | required |",
        "| `max_memory` | size > 0 | unset |",
        "| `queues` | non-empty array of strings, each a name of 1 to 200 characters"
        ' | `["default"]` |',
    }
    for row in rows:
        assert row in text, row
    for heading in ("## [broker]", "## [[pools]]", "## [[schedules]]", "## [security]"):
        assert heading in text


def test_a_description_is_the_comment_right_above_its_field() -> None:
    source = '''
class Section:
    """A section."""

    #: Said over
    #: two lines.
    described: int = 1

    #: Not this one: a blank line parts it from the field.

    bare: int = 2
    # a plain comment is no description
    plain: int = 3
'''
    assert reference.field_descriptions(source) == {
        "Section": {"described": "Said over two lines."}
    }


def test_the_command_writes_the_file_and_check_compares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "CONFIG.md"
    assert reference.main(["--check", str(path)]) == 1
    assert "run make docs" in capsys.readouterr().err
    assert reference.main([str(path)]) == 0
    assert path.read_text() == reference.render()
    assert reference.main(["--check", str(path)]) == 0


def test_check_without_a_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--check`` alone compared nothing and passed: it is refused, naming the PATH."""
    with pytest.raises(SystemExit) as exit_info:
        reference.main(["--check"])
    assert exit_info.value.code == 2
    assert "give its PATH" in capsys.readouterr().err
