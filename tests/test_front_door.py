"""The front door's own limits: control characters, NUL and bidi overrides in text fields; JSON
bombs in a request file and in batch lines; batch files and lines over their limits, streamed with
bounded memory; local paths inside requests only in an upload folder (the CLI's own --image is the
operator's); a broker URL that passes the start-up check works or is refused there.

Every refused case shows its code and that nothing was left behind: ``refused`` for the Python
API; for the CLI, exit 2, one error line (or the --json error document), no row and no message."""

from __future__ import annotations

import json
import os
import tracemalloc
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genline.cli.batch import MAX_BATCH_BYTES, MAX_BATCH_LINES, MAX_LINE_BYTES
from genline.config.errors import ConfigError, ValidationError
from genline.config.settings import KNOWN_ENV, load_settings
from genline.pipelines import request
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from tests.conftest import TEST_KEY
from tests.support.cli import GenlineCli, count_rows, one_error_line
from tests.support.refusal import refused

RequestFn = Callable[..., dict[str, Any]]
JSON_BOMB = "[" * 100_000


# --- text fields ----------------------------------------------------------------------------------
BAD_CHARACTERS = {
    "nul": "\x00",
    "escape-sequence": "\x1b[2J",
    "carriage-return": "a\rb",
    "bell": "\x07",
    "c1-csi": "\x9b31m",
    "right-to-left-override": "\u202e",
    "first-strong-isolate": "\u2068",
    "lone-surrogate": "\ud800",
}
TEXT_FIELDS = ["description", "user_id", "feature", "idempotency_key", "profile", "priority", "copy_model", "image"]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("char", list(BAD_CHARACTERS.values()), ids=list(BAD_CHARACTERS))
def test_control_characters_nul_and_bidi_overrides_are_a_field_error(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, field: str, char: str
) -> None:
    value = {"description": "A mug", "image": "https://cdn.example.com/m"}.get(field, "standard")
    fields = request_fields(**{field: f"{value}{char}x"})
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(fields))
    assert (err.code, err.field) == (f"{field}_invalid_character", field)
    assert "U+" in err.message and err.message.endswith(".")


def test_every_control_character_surrogate_and_bidi_control_of_unicode_is_refused_and_nothing_else() -> None:
    """The whole of Unicode against the rule the text fields follow: categories Cc and Cs and the
    bidi controls are refused (tab and line feed allowed in a description); every other character
    is allowed, and a refusal names the first bad character and where it is."""
    everything = "".join(map(chr, range(0x110000)))
    rule = {c for c in everything if unicodedata.category(c) in ("Cc", "Cs")} | set(request._BIDI_CONTROLS)
    assert set(request._REFUSED_CHAR.findall(everything)) == rule
    assert set(request._REFUSED_CHAR_MULTILINE.findall(everything)) == rule - set(request._LINE_BREAKS)
    with pytest.raises(ValidationError) as info:
        request._check_characters("Mug\t350 ml\u202e, \x07", "description", multiline=True)
    assert "U+202E at position 11" in info.value.message


def test_a_description_may_hold_line_breaks_and_tabs_and_right_to_left_marks(
    rt: Runtime, request_fields: RequestFn
) -> None:
    description = "Stoneware mug.\r\n\tSpeckled glaze\n\u200fכוס קרמיקה"
    api = Genline(runtime=rt)
    pid = api.submit(request_fields(description=description)).pipeline_id
    assert api.status(pid)["status"] == "pending"


def test_nul_in_a_description_is_refused_on_postgresql_too_not_a_data_error(
    either_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    err = refused(either_rt, sim, lambda: Genline(runtime=either_rt).submit(request_fields(description="Mug\x00")))
    assert err.code == "description_invalid_character"


# --- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("GENLINE_", "APIMART_")):
            monkeypatch.delenv(name)


@pytest.fixture
def genline(sim: SimulatorHandle, tmp_path: Path) -> GenlineCli:
    var = tmp_path / "var"
    env = {"GENLINE_VAR_DIR": str(var), "APIMART_BASE_URL": sim.base_url, "APIMART_API_KEY": TEST_KEY}
    if "GENLINE_ALLOW_PRIVATE_HOSTS" in KNOWN_ENV:  # the simulator listens on loopback
        env["GENLINE_ALLOW_PRIVATE_HOSTS"] = "127.0.0.1"
    g = GenlineCli(env, var, TEST_KEY)
    result = g("db", "upgrade")
    assert result.exit_code == 0, result.output
    return g


def nothing_created(g: GenlineCli) -> bool:
    return count_rows(g.db, "pipelines") == 0 and count_rows(g.broker, "kombu_message") == 0


def refused_by_cli(g: GenlineCli, *args: str) -> tuple[str, str | None, dict[str, Any]]:
    """Exit 2, one line, no traceback; then the same with --json: one error document. Nothing made."""
    plain = g(*args)
    assert plain.exit_code == 2, plain.output
    assert plain.exception is None or isinstance(plain.exception, SystemExit), plain.exception
    assert "Traceback" not in plain.output and plain.stdout == ""
    line = one_error_line(plain)
    as_json = g(*args, "--json")
    assert as_json.exit_code == 2, as_json.output
    doc = json.loads(as_json.stdout)
    assert set(doc) == {"error"} and doc["error"]["code"] == line["code"]
    assert nothing_created(g)
    return line["code"], line["field"], doc["error"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_json_bomb_in_a_request_file_is_invalid_json(genline: GenlineCli, tmp_path: Path) -> None:
    code, field, _ = refused_by_cli(genline, "submit", "--file", str(write(tmp_path / "r.json", JSON_BOMB)))
    assert (code, field) == ("invalid_json", "file")


def test_a_number_too_long_to_convert_is_invalid_json(genline: GenlineCli, tmp_path: Path) -> None:
    path = write(tmp_path / "r.json", '{"user_id": ' + "9" * 5000 + "}")
    assert refused_by_cli(genline, "submit", "--file", str(path))[0] == "invalid_json"


def test_a_request_file_over_its_limit_is_refused_before_it_is_read(genline: GenlineCli, tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: nothing is written
    assert refused_by_cli(genline, "submit", "--file", str(path))[:2] == ("file_too_large", "file")


def test_a_path_outside_the_upload_folder_in_a_request_file_is_refused(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside, "PNG")
    for image in (str(outside), "/etc/shadow", "/root/.ssh/id_rsa", "/proc/self/mem"):
        path = write(tmp_path / "r.json", json.dumps(request_fields(image=image)))
        code, field, _ = refused_by_cli(genline, "submit", "--file", str(path))
        assert (code, field) == ("image_path_not_allowed", "image"), image


def test_the_clis_own_image_option_reads_the_operators_file_from_anywhere(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    outside = tmp_path / "desk" / "photo.jpg"
    outside.parent.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside, "JPEG")
    fields = request_fields(image=None)
    args = [a for name, value in fields.items() for a in (f"--{name.replace('_', '-')}", str(value))]
    result = genline("submit", *args, "--image", str(outside), "--json")
    assert result.exit_code == 0, result.output
    assert count_rows(genline.db, "pipelines") == 1
    # ... and overrides a path in a request file, which would be refused
    path = write(tmp_path / "r.json", json.dumps(request_fields(image="/etc/passwd")))
    again = genline("submit", "--file", str(path), "--image", str(outside), "--json")
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda d: "/proc/self/mem", "image_unreadable"),
        (lambda d: str(d), "image_not_found"),
        (lambda d: str(d / "gone.png"), "image_not_found"),
        (lambda d: write_bytes(d / "secret.png", b"\x89PNG\r\n\x1a\nAWS_SECRET_ACCESS_KEY=abc\n"), "image_invalid"),
    ],
    ids=["proc-self-mem", "a-folder", "missing", "png-header-then-a-secret"],
)
def test_the_clis_own_image_option_still_refuses_what_is_not_an_image(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path, make: Callable[[Path], str], code: str
) -> None:
    fields = request_fields(image=make(tmp_path))
    args = ["submit"] + [a for name, value in fields.items() for a in (f"--{name.replace('_', '-')}", str(value))]
    assert refused_by_cli(genline, *args)[:2] == (code, "image")


# --- batch ----------------------------------------------------------------------------------------
def batch_doc(g: GenlineCli, path: Path) -> dict[str, Any]:
    result = g("batch", str(path), "--json")
    assert "Traceback" not in result.output
    return dict(json.loads(result.stdout)) | {"exit_code": result.exit_code}


def lines(path: Path, items: list[Any]) -> Path:
    return write(path, "\n".join(x if isinstance(x, str) else json.dumps(x) for x in items) + "\n")


def test_a_json_bomb_fails_only_its_own_line_of_a_batch(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = lines(tmp_path / "b.jsonl", [request_fields(), JSON_BOMB, request_fields(), '{"a": ' + "1" * 5000 + "}"])
    doc = batch_doc(genline, path)
    assert doc["exit_code"] == 2
    assert [s["line"] for s in doc["submitted"]] == [1, 3]
    assert [(e["line"], e["error"]["code"]) for e in doc["errors"]] == [(2, "invalid_json"), (4, "invalid_json")]
    plain = genline("batch", str(path))
    assert "line 2: error [invalid_json]: this line is not valid JSON (nested too deeply)." in plain.stderr


def test_a_line_over_its_limit_fails_alone_and_is_never_held_whole(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    long_line = json.dumps(request_fields(description="x" * (MAX_LINE_BYTES + 10)))
    path = lines(tmp_path / "b.jsonl", [request_fields(), long_line, request_fields()])
    doc = batch_doc(genline, path)
    assert [s["line"] for s in doc["submitted"]] == [1, 3]
    assert [(e["line"], e["error"]["code"]) for e in doc["errors"]] == [(2, "line_too_long")]


def test_a_batch_file_over_its_size_is_refused_before_any_line_is_submitted(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = lines(tmp_path / "big.jsonl", [request_fields()])
    with path.open("r+b") as f:
        f.truncate(MAX_BATCH_BYTES + 1)
    assert refused_by_cli(genline, "batch", str(path))[:2] == ("batch_too_large", "file")


def test_a_batch_file_over_its_line_count_is_refused_before_any_line_is_submitted(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = lines(tmp_path / "long.jsonl", [request_fields()] + ["#"] * MAX_BATCH_LINES)
    assert refused_by_cli(genline, "batch", str(path))[:2] == ("batch_too_large", "file")


def test_a_batch_line_naming_a_path_outside_the_upload_folder_fails_alone(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    path = lines(tmp_path / "b.jsonl", [request_fields(image="/etc/shadow"), request_fields()])
    doc = batch_doc(genline, path)
    assert [(e["line"], e["error"]["code"]) for e in doc["errors"]] == [(1, "image_path_not_allowed")]
    assert [s["line"] for s in doc["submitted"]] == [2]


def test_a_batch_streams_its_lines_with_bounded_memory(
    genline: GenlineCli, request_fields: RequestFn, upload_dir: Path, tmp_path: Path
) -> None:
    """Sixteen lines naming a ~3 MB photo each: the old batch held every line's bytes at once (16
    photos); this one holds one or two at a time. Measured with tracemalloc (the bytes objects;
    Pillow's pixel buffers are its own, and freed with each image)."""
    photo = upload_dir / "noise.png"
    Image.frombytes("RGB", (1000, 1000), os.urandom(3_000_000)).save(photo, "PNG")
    size = photo.stat().st_size
    path = lines(tmp_path / "b.jsonl", [request_fields(image=str(photo)) for _ in range(16)])
    tracemalloc.start()
    try:
        result = genline("batch", str(path), "--json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["submitted"]) == 16
    assert peak < 9 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.1f} MB photo"


def test_a_strict_batch_checks_every_line_then_submits_streaming(
    genline: GenlineCli, request_fields: RequestFn, tmp_path: Path
) -> None:
    bad = lines(tmp_path / "bad.jsonl", [request_fields(), JSON_BOMB])
    result = genline("batch", str(bad), "--strict")
    assert result.exit_code == 2 and nothing_created(genline)
    good = lines(tmp_path / "good.jsonl", [request_fields(), "# a comment", request_fields()])
    result = genline("batch", str(good), "--strict", "--json")
    assert result.exit_code == 0, result.output
    assert [s["line"] for s in json.loads(result.stdout)["submitted"]] == [1, 3]
    assert count_rows(genline.db, "pipelines") == 2


# --- the broker URL -------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["sqla+sqlite:////tmp/genline-broker.sqlite", "sqla+postgresql://u@h/db"])
def test_a_sqlalchemy_broker_url_is_refused_at_start_up_not_at_every_nudge(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"GENLINE_VAR_DIR": str(tmp_path), "GENLINE_BROKER_URL": url})
    assert info.value.code == "invalid_config" and "GENLINE_BROKER_URL=embedded" in info.value.message


def test_genline_config_refuses_a_sqlalchemy_broker_url_with_exit_2(genline: GenlineCli) -> None:
    result = genline("config", env={"GENLINE_BROKER_URL": "sqla+sqlite:////tmp/b.sqlite"})
    assert result.exit_code == 2 and one_error_line(result)["code"] == "invalid_config"


def test_every_broker_scheme_the_check_accepts_reaches_the_broker(tmp_path: Path) -> None:
    """The embedded broker takes a nudge; amqp:// gets as far as connecting (no TypeError)."""
    from kombu.exceptions import OperationalError

    from genline.tasks.app import CeleryDispatcher, make_celery

    settings = load_settings({"GENLINE_VAR_DIR": str(tmp_path)})
    dispatcher = CeleryDispatcher(make_celery(settings))
    dispatcher.send("st_check", "genline.copy")
    dispatcher.close()
    settings = load_settings({"GENLINE_VAR_DIR": str(tmp_path), "GENLINE_BROKER_URL": "amqp://guest@127.0.0.1:1//"})
    app = make_celery(settings)
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_connection_timeout = 1
    with pytest.raises(OperationalError):
        CeleryDispatcher(app).send("st_check", "genline.copy")
