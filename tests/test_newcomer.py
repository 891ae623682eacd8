"""A newcomer ran `make demo` in the repo, then runs `genline` from another folder (or another
genline than the repo's .venv/bin/genline). The zero-setup state lives in GENLINE_VAR_DIR, by
default var/genline under the current folder, so there is none where they are. Every command that
works on existing state says so in one line (`error [invalid_config]: ...`, exit 2): where it
looked, that GENLINE_VAR_DIR sets that place, which command is the installed one, and how to start
afresh; and it leaves no database file or var folder behind.

Commands run in-process through click's CliRunner, in a temporary folder, with no GENLINE_* or
APIMART_* variable but the ones each test sets, as a newcomer's shell would have.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from genline.cli.main import cli
from genline.config import settings as settings_module
from genline.config.errors import ConfigError
from genline.config.settings import load_settings, source_checkout
from genline.storage.migrate import current, require_current, upgrade

ERROR_LINE = re.compile(r"^error \[(?P<code>[a-z_]+)\]: (?P<message>\S.*\.)$")
SUBMIT = ["submit", "--user-id", "u", "--feature", "f", "--description", "Mug", "--image", "https://x.test/m.png"]
COMMANDS = {
    "status": ["status", "pl_0123"],
    "cancel": ["cancel", "pl_0123"],
    "submit": SUBMIT,
    "batch": ["batch", "requests.jsonl"],
    "worker": ["worker"],
    "poller": ["poller", "--once"],
}


@pytest.fixture(autouse=True)
def a_newcomers_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No genline settings at all, and the current folder is a fresh one that is not the repo."""
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "requests.jsonl").write_text(json.dumps({"user_id": "u", "feature": "f"}) + "\n")
    monkeypatch.chdir(elsewhere)
    return elsewhere


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def genline(*args: str, env: dict[str, str] | None = None) -> Result:
    structlog.reset_defaults()
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False, prog_name="genline")


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def the_error(result: Result) -> str:
    """Exit 2 and exactly one line on stderr, `error [invalid_config]: <one sentence>.`"""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    match = ERROR_LINE.match(lines[0])
    assert match and match["code"] == "invalid_config", lines[0]
    return match["message"]


@pytest.fixture
def repo_with_demo_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout where `make demo` has run: its var/genline holds a migrated database."""
    repo = tmp_path / "repo"
    (repo / "var" / "genline").mkdir(parents=True)
    upgrade(load_settings({"GENLINE_VAR_DIR": str(repo / "var" / "genline")}).database_url)
    monkeypatch.setattr(settings_module, "source_checkout", lambda: repo)
    return repo


@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
def test_a_command_run_from_another_folder_says_where_it_looked_and_creates_nothing(
    command: str, a_newcomers_shell: Path, repo_with_demo_state: Path
) -> None:
    before = tree(a_newcomers_shell)
    message = the_error(genline(*COMMANDS[command]))
    here, demo = a_newcomers_shell / "var" / "genline", repo_with_demo_state / "var" / "genline"
    assert message.startswith(f"No genline state in {here} (there is no database there")
    assert "GENLINE_VAR_DIR sets that folder (default: var/genline under the current folder)" in message
    assert f"`make demo` keeps its state in {demo}" in message
    assert f"the repo's {repo_with_demo_state / '.venv' / 'bin' / 'genline'}, from {repo_with_demo_state}" in message
    assert f"GENLINE_VAR_DIR={demo}" in message
    assert "`genline db upgrade`" in message and "no genline tables" in message
    assert tree(a_newcomers_shell) == before  # no var folder, no empty genline.db


def test_following_the_advice_reaches_the_demos_state(a_newcomers_shell: Path, repo_with_demo_state: Path) -> None:
    demo = repo_with_demo_state / "var" / "genline"
    result = genline("status", "pl_0123", "--json", env={"GENLINE_VAR_DIR": str(demo)})
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["code"] == "pipeline_not_found"  # the state was found
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_with_json_the_same_error_is_the_one_document_on_stdout(
    a_newcomers_shell: Path, repo_with_demo_state: Path
) -> None:
    for command in ("status", "cancel", "submit"):
        result = genline(*COMMANDS[command], "--json")
        assert result.exit_code == 2, result.output
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "invalid_config" and error["field"] is None
        assert error["message"].startswith(f"No genline state in {a_newcomers_shell / 'var' / 'genline'} ")
        assert "GENLINE_VAR_DIR" in error["message"] and ".venv/bin/genline" in error["message"]
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_before_any_demo_it_says_to_run_make_demo_or_db_upgrade_first(
    a_newcomers_shell: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "fresh-clone"
    monkeypatch.setattr(settings_module, "source_checkout", lambda: repo)
    message = the_error(genline(*SUBMIT))
    assert f"the installed command is the repo's {repo / '.venv' / 'bin' / 'genline'}" in message
    assert message.endswith(f"so run `make demo` in {repo}, or `genline db upgrade` here, first.")
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_an_ordinary_install_names_the_repos_venv_command_in_words(
    a_newcomers_shell: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "source_checkout", lambda: None)
    message = the_error(genline("status", "pl_0123"))
    assert "the installed command, the repo's .venv/bin/genline, from the folder where you ran `make demo`" in message
    assert "`genline db upgrade` (or `make demo`) first" in message
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_an_empty_database_file_left_by_an_older_genline_gets_the_same_answer(
    a_newcomers_shell: Path, repo_with_demo_state: Path
) -> None:
    stray = a_newcomers_shell / "var" / "genline" / "genline.db"
    stray.parent.mkdir(parents=True)
    stray.touch()
    message = the_error(genline("status", "pl_0123"))
    assert message.startswith(f"No genline state in {stray.parent} (its database has no genline tables yet)")
    assert f"GENLINE_VAR_DIR={repo_with_demo_state / 'var' / 'genline'}" in message


def test_db_upgrade_still_creates_the_state_here_and_then_status_finds_it(a_newcomers_shell: Path) -> None:
    assert genline("db", "upgrade").exit_code == 0
    assert (a_newcomers_shell / "var" / "genline" / "genline.db").is_file()
    result = genline("status", "pl_0123")
    assert result.exit_code == 2 and "[pipeline_not_found]" in result.stderr


def test_a_database_url_naming_a_missing_file_is_refused_without_creating_it(a_newcomers_shell: Path) -> None:
    missing = a_newcomers_shell / "elsewhere" / "state.db"
    message = the_error(genline("status", "pl_0123", env={"GENLINE_DATABASE_URL": f"sqlite:///{missing}"}))
    assert message.startswith(f"No genline database at {missing}, so no genline tables yet: GENLINE_DATABASE_URL")
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_the_python_api_neither_creates_a_database_nor_the_var_folder(a_newcomers_shell: Path) -> None:
    from genline.pipelines.api import Genline

    with pytest.raises(ConfigError) as info:
        Genline(load_settings({}))
    assert str(a_newcomers_shell / "var" / "genline" / "genline.db") in info.value.message
    assert current(load_settings({}).database_url) is None
    with pytest.raises(ConfigError):
        require_current(load_settings({}).database_url)
    assert tree(a_newcomers_shell) == ["requests.jsonl"]


def test_this_checkout_is_found_as_the_source_of_the_installed_command() -> None:
    repo = source_checkout()
    assert repo is not None and (repo / "Makefile").is_file() and (repo / "config" / "settings.py").is_file()
