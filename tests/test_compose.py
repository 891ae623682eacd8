"""docker-compose.yml describes the production footprint with the settings the code knows."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from genline.cli.main import cli
from genline.config.settings import KNOWN_ENV

ROOT = Path(__file__).resolve().parents[1]
# their env vars are their images' own settings
THIRD_PARTY_IMAGES = {"redis", "postgres", "minio", "prometheus", "grafana"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_footprint_has_every_part() -> None:
    services = compose()["services"]
    for name in (
        "redis",
        "postgres",
        "minio",
        "simulator",
        "worker-copy",
        "worker-media",
        "worker-store",
        "worker-batch",
        "poller",
        "flower",
    ):
        assert name in services, name


def test_every_genline_command_is_a_real_entry_point() -> None:
    runner = CliRunner()
    for name, service in compose()["services"].items():
        if name in THIRD_PARTY_IMAGES:
            continue
        command = service["command"]
        argv = command if isinstance(command, list) else shlex.split(command)
        assert argv[0] == "genline", name
        # Walk the subcommands and check each option is one the command accepts, via --help.
        group: Any = cli
        words = argv[1:]
        while words and words[0] in getattr(group, "commands", {}):
            group = group.commands[words.pop(0)]
        assert group is not cli, f"{name}: {argv[1]} is not a genline command"
        accepted = {opt for param in group.params for opt in getattr(param, "opts", [])}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in accepted, f"{name}: {word} is not an option of {argv[:3]}"
        result = runner.invoke(cli, [*argv[1 : len(argv) - len(words)], "--help"])
        assert result.exit_code == 0, result.output


def test_every_variable_set_for_genline_is_a_known_setting() -> None:
    doc = compose()
    for name, service in doc["services"].items():
        if name in THIRD_PARTY_IMAGES:
            continue
        for var in service.get("environment", {}):
            assert var in KNOWN_ENV or var.startswith("AWS_"), f"{name} sets unknown {var}"


def test_the_api_key_is_a_secret_file_not_a_variable() -> None:
    doc = compose()
    for service in doc["services"].values():
        assert "APIMART_API_KEY" not in service.get("environment", {})
    assert "apimart_api_key" in doc["secrets"]


def test_readme_lists_every_setting_as_the_code_defines_it() -> None:
    from genline.config.settings import settings_table_markdown

    assert settings_table_markdown() in (ROOT / "README.md").read_text()
