"""The docs stay true: every ``corral ...`` command in a code block of
README.md and docs/*.md parses with the real CLI parser, and every config
key a code block names (a TOML block's keys, a ``section.key`` elsewhere)
is in the schema."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.cli import build_parser
from corral.config import reference

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Code blocks whose text is not shell-like: no commands are looked for in them.
NOT_SHELL = {"python", "toml"}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: A shell redirection (``> /dev/null``, ``2>&1``): dropped before splitting.
_REDIRECT = re.compile(r"\s\d?>>?\s*(&\d|\S+)")
#: Options after which the word ``corral`` is a user or a unit, not the command.
_NOT_THE_COMMAND = {"-u", "--user", "-g", "--group", "-o", "--owner", "--unit"}
#: ``client.key``, ``log.py``: file names, not ``section.key`` config keys.
_FILE_SUFFIXES = {"py", "key", "key_secret", "toml", "md", "sock", "lock", "json", "service"}


def code_blocks() -> Iterator[tuple[str, str, str]]:
    """(page name, language, text) of every fenced code block."""
    for page in PAGES:
        for match in _FENCE.finditer(page.read_text()):
            yield page.name, match.group(1), match.group(2)


def commands(text: str) -> Iterator[list[str]]:
    """The arguments of each ``corral`` command in a shell-like block:
    continuation lines joined, comments and redirections dropped, split at
    ``|``, ``;``, ``&&``, ``$(``; ``/usr/local/bin/corral``,
    ``ExecStart=/usr/bin/corral`` and a JSON array (``["corral", "run"]``)
    count too."""
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(_REDIRECT.sub(" ", line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = [token.strip('[],"') for token in lexer]
        except ValueError:  # unbalanced quotes: not a shell line
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token and set(token) <= set("|&;()$<>"):
                yield from _corral_in(segment)
                segment = []
            else:
                segment.append(token)


def _corral_in(segment: list[str]) -> Iterator[list[str]]:
    for index, token in enumerate(segment):
        program = token.rpartition("=")[2]
        if program != "corral" and not program.endswith("/bin/corral"):
            continue  # /src/corral, /var/lib/corral are directories
        if index and segment[index - 1] in _NOT_THE_COMMAND:
            return
        if index + 1 < len(segment):  # `systemctl restart corral` names a unit
            yield segment[index + 1 :]
        return


def schema_keys() -> set[str]:
    """``python_path``, ``broker``, ``broker.state_dir``, ``pools.name`` ..."""
    known = set()
    for _, kind, prefix in reference.sections():
        known.update(prefix + field.encode_name for field in kind.fields)
    return known


def toml_keys(data: dict[str, Any]) -> Iterator[str]:
    """The key paths of a parsed TOML block (``pools.name`` for each
    ``[[pools]]`` entry's ``name``); tables that are values (a pool's
    ``queue_weights``) are not looked into."""
    sections = {prefix.rstrip(".") for _, _, prefix in reference.sections() if prefix}
    for key, value in data.items():
        yield key
        if key not in sections:
            continue
        for table in value if isinstance(value, list) else [value]:
            if isinstance(table, dict):
                yield from (f"{key}.{inner}" for inner in table)


SHELL_COMMANDS = [
    pytest.param(args, id=f"{page}: corral {' '.join(args)}"[:90])
    for page, language, text in code_blocks()
    if language not in NOT_SHELL
    for args in commands(text)
]


def test_the_docs_have_commands_to_check() -> None:
    pages = {page for page, language, text in code_blocks() if language not in NOT_SHELL}
    assert {"DEPLOYMENT.md", "MANY-HOSTS.md", "README.md"} <= pages
    assert len(SHELL_COMMANDS) > 20


@pytest.mark.parametrize("args", SHELL_COMMANDS)
def test_every_corral_command_in_the_docs_parses(args: list[str]) -> None:
    parser = build_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        assert exc.code == 0, f"`corral {shlex.join(args)}` does not parse: {errors.getvalue()}"


def test_every_config_key_in_the_docs_is_in_the_schema() -> None:
    known = schema_keys()
    dotted = re.compile(r"(?<![\w./-])(" + "|".join(sorted(_section_names())) + r")\.(\w+)")
    unknown = []
    for page, language, text in code_blocks():
        if language == "toml":
            try:
                keys = set(toml_keys(tomllib.loads(text)))
            except tomllib.TOMLDecodeError as exc:
                unknown.append(f"{page}: a TOML block that does not parse: {exc}")
                continue
        elif language == "python":
            continue
        else:
            found = dotted.findall(text)
            keys = {f"{section}.{key}" for section, key in found if key not in _FILE_SUFFIXES}
        unknown.extend(f"{page}: {key}" for key in sorted(keys - known))
    assert not unknown, "keys not in config/schema.py: " + ", ".join(unknown)


def _section_names() -> set[str]:
    return {prefix.rstrip(".") for _, _, prefix in reference.sections() if prefix}


def test_the_command_finder_finds_commands_where_shells_have_them() -> None:
    text = (
        'ID=$(corral enqueue demo.add "[1, 2]") && corral job "$ID" > /dev/null 2>&1\n'
        "journalctl -u corral -o cat | jq   # not corral's\n"
        "systemctl restart corral\n"
        "pip install /src/corral && sudo install -o corral -g corral -m 0600 a b\n"
        "ExecStart=/usr/local/bin/corral supervisor -c /etc/corral/w.toml\n"
        'test: ["CMD", "corral", "status", "--timeout", "2s"]\n'
        "corral keys server \\\n  --directory /etc/corral/keys\n"
    )
    assert list(commands(text)) == [
        ["enqueue", "demo.add", "1, 2"],
        ["job", "$ID"],
        ["supervisor", "-c", "/etc/corral/w.toml"],
        ["status", "--timeout", "2s"],
        ["keys", "server", "--directory", "/etc/corral/keys"],
    ]
