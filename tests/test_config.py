"""Settings are read once, typed, and a bad one stops start-up with a sentence naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from genline.config.catalog import load_catalog, parse_catalog
from genline.config.errors import ConfigError
from genline.config.settings import SETTINGS, Secret, load_settings, settings_table_markdown


def test_defaults_are_the_zero_setup_footprint(tmp_path: Path) -> None:
    s = load_settings({"GENLINE_VAR_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'genline.db'}"
    assert s.embedded_broker
    assert s.storage_url == (tmp_path / "objects").as_uri()
    assert s.poll_interval_s == 2.0
    assert s.provider_base_url == "https://api.apimart.ai"


def test_a_misspelled_setting_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"GENLINE_POLL_INTERVAL": "3"})
    assert "GENLINE_POLL_INTERVAL is not a genline setting" in info.value.message
    assert "Did you mean GENLINE_POLL_INTERVAL_S?" in info.value.message
    assert info.value.code == "invalid_config"


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("GENLINE_POLL_INTERVAL_S", "0", "greater than zero"),
        ("GENLINE_WORKER_CONCURRENCY", "many", "invalid"),
        ("APIMART_BASE_URL", "ftp://x", "http(s) URL"),
        ("GENLINE_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("GENLINE_DATABASE_URL", "mysql://x/y", "sqlite"),
        ("GENLINE_STORAGE_URL", "s3://", "bucket"),
        ("GENLINE_BROKER_URL", "kafka://x", "embedded"),
        ("GENLINE_BROKER_URL", "redis://localhost:6379/0?visibility_timeout=3600", "visibility_timeout"),
        ("GENLINE_BROKER_URL", "rediss://localhost:6380/0?ssl_cert_reqs=required&socket_timeout=5", "socket_timeout"),
    ],
)
def test_invalid_values_fail_loudly(name: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert words in info.value.message


def test_api_key_comes_from_a_file_and_never_shows(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-test-not-real-123\n")
    s = load_settings({"APIMART_API_KEY_FILE": str(key_file)})
    assert s.provider_api_key == Secret("sk-test-not-real-123")
    assert "sk-test" not in repr(s) and "sk-test" not in str(s.provider_api_key)


def test_both_key_sources_at_once_is_an_error(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("a")
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"APIMART_API_KEY": "x", "APIMART_API_KEY_FILE": str(key_file)})


def test_missing_key_file_is_an_error_without_the_path_contents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({"APIMART_API_KEY_FILE": str(tmp_path / "nope")})


def test_settings_table_lists_every_setting() -> None:
    table = settings_table_markdown()
    for s in SETTINGS:
        assert f"`{s.env}`" in table


def test_builtin_catalog_has_the_contract_prices() -> None:
    catalog = load_catalog()
    assert str(catalog.model("gpt-4o-mini").input_per_million_usd) == "0.15"
    assert str(catalog.model("kling-v3-omni").per_second_usd) == "0.0672"
    assert catalog.model("kling-v3-omni").max_duration_s == 15
    assert {"standard", "premium", "draft"} <= set(catalog.profiles)


def test_a_profile_naming_an_unknown_model_fails_at_start_up() -> None:
    raw = {
        "models": {"m": {"kind": "chat", "input_per_million_usd": 1, "output_per_million_usd": 1}},
        "profiles": {
            "p": {
                "copy_models": ["m"],
                "image_models": ["nope"],
                "video_models": ["m"],
                "copy_max_tokens": 1,
                "image_size": "1:1",
                "video_duration_s": 1,
                "video_aspect_ratio": "1:1",
                "video_resolution": "x",
            }
        },
    }
    with pytest.raises(ConfigError, match="'nope'"):
        parse_catalog(raw)


def test_a_rediss_broker_url_may_carry_its_tls_options() -> None:
    url = "rediss://:secret@localhost:6380/0?ssl_cert_reqs=required"
    assert load_settings({"GENLINE_BROKER_URL": url}).broker_url == url
