"""Input images: local paths are read only inside the upload folders (GENLINE_UPLOAD_DIRS), one
error for everything outside; the Python API takes bytes and binary file objects; every image is
decoded and re-encoded before it is stored or sent, so trailing payloads, EXIF (GPS) and polyglots
do not survive, and truncated, oversized or decompression-bomb images are refused.

Every refused case shows its code and that nothing was left behind (``refused``)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from genline.config.settings import Settings, load_settings
from genline.pipelines.api import Genline
from genline.pipelines.images import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, reencode
from genline.pipelines.runtime import Runtime
from genline.pipelines.store import provider_url
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import Pipeline
from tests.support.refusal import refused

RequestFn = Callable[..., dict[str, Any]]
SECRET_LINE = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"


def png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (180, 90, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims ``width`` x ``height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_gps() -> bytes:
    img = Image.new("RGB", (40, 20), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to show upright
    exif[0x010F] = "SellerPhone"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 29.0), "E", (2.0, 17.0, 40.0)
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def submitting(rt: Runtime, fields: dict[str, Any]) -> Callable[[], Any]:
    return lambda: Genline(runtime=rt).submit(fields)


def stored_input(rt: Runtime, pipeline_id: str) -> bytes:
    with rt.db.transaction() as s:
        key = s.get_one(Pipeline, pipeline_id).image_ref
    return rt.store.read_bytes(key)


def sent_to_provider(rt: Runtime, pipeline_id: str) -> bytes:
    """The image as the image step hands it to the provider (inline on local storage)."""
    with rt.db.transaction() as s:
        key = s.get_one(Pipeline, pipeline_id).image_ref
    url = provider_url(rt, key)
    assert url.startswith("data:image/")
    return base64.b64decode(url.split(",", 1)[1])


# --- where a local path may point --------------------------------------------------------------------
def test_a_png_header_followed_by_a_secret_is_refused_and_nothing_is_sent(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, upload_dir: Path
) -> None:
    bait = upload_dir / "photo.png"
    bait.write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET_LINE)
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=str(bait))))
    assert (err.code, err.field) == ("image_invalid", "image")
    assert "AWS_SECRET" not in err.message


def test_a_path_up_and_out_of_the_upload_folder_into_another_tenants_outputs_is_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, upload_dir: Path
) -> None:
    theirs = rt.settings.var_dir / "objects" / "pl_other" / "image.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(png())
    sneaky = upload_dir / ".." / "objects" / "pl_other" / "image.png"
    assert sneaky.resolve() == theirs.resolve()
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=str(sneaky))))
    assert (err.code, err.field) == ("image_path_not_allowed", "image")


@pytest.mark.parametrize(
    "path",
    ["/root/.ssh/id_rsa", "/etc/shadow", "/etc/passwd", "/proc/self/mem", "/proc/self/environ", "/dev/zero", "/"],
)
def test_paths_outside_the_upload_folders_get_one_code_whether_they_exist_or_not(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, path: str
) -> None:
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=path)))
    assert (err.code, err.field) == ("image_path_not_allowed", "image")
    assert err.message == (
        f"image {path!r} is not inside an upload folder (GENLINE_UPLOAD_DIRS); pass an http(s) URL, "
        "or the image's bytes, instead."
    )


def test_a_relative_path_is_resolved_before_it_is_checked(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "outside.png").write_bytes(png())
    monkeypatch.chdir(tmp_path / "var" / "uploads")
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image="../../outside.png")))
    assert err.code == "image_path_not_allowed"
    (tmp_path / "var" / "uploads" / "inside.png").write_bytes(png())
    assert Genline(runtime=rt).submit(request_fields(image="inside.png")).created


def test_a_symlink_out_of_the_upload_folder_is_refused_one_inside_it_is_followed(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, upload_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "private.png"
    outside.write_bytes(png())
    (upload_dir / "escape.png").symlink_to(outside)
    (upload_dir / "etc").symlink_to("/etc")
    for ref in ("escape.png", "etc/passwd"):
        err = refused(rt, sim, submitting(rt, request_fields(image=str(upload_dir / ref))))
        assert err.code == "image_path_not_allowed", ref
    (upload_dir / "2026").mkdir()
    (upload_dir / "2026" / "mug.png").write_bytes(png())
    (upload_dir / "latest.png").symlink_to(upload_dir / "2026" / "mug.png")
    assert Genline(runtime=rt).submit(request_fields(image=str(upload_dir / "latest.png"))).created


def test_inside_the_upload_folder_a_missing_file_a_folder_and_a_fifo_are_not_found(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, upload_dir: Path
) -> None:
    (upload_dir / "folder").mkdir()
    os.mkfifo(upload_dir / "pipe.png")  # opened without blocking, refused as not a file
    for name in ("gone.png", "folder", "pipe.png"):
        err = refused(rt, sim, submitting(rt, request_fields(image=str(upload_dir / name))))
        assert (err.code, err.field) == ("image_not_found", "image"), name


def test_the_upload_folders_come_from_the_setting(
    sim: SimulatorHandle, make_settings: Callable[..., Settings], request_fields: RequestFn, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "p.png").write_bytes(png())
    settings = make_settings(sim.base_url, GENLINE_UPLOAD_DIRS=f"{first}{os.pathsep}{second}")
    assert settings.upload_dirs == (first.resolve(), second.resolve())
    from genline.storage.migrate import upgrade

    upgrade(settings.database_url)
    with Genline(runtime=Runtime.from_settings(settings)) as api:
        assert api.submit(request_fields(image=str(second / "p.png"))).created
        rt = api.runtime
        # the default folder (var/uploads) is no longer one of them
        err = refused(rt, sim, lambda: api.submit(request_fields()))
        assert err.code == "image_path_not_allowed"


def test_the_default_upload_folder_is_the_var_folders_uploads(tmp_path: Path) -> None:
    settings = load_settings({"GENLINE_VAR_DIR": str(tmp_path / "v")})
    assert settings.upload_dirs == ((tmp_path / "v" / "uploads").resolve(),)
    assert load_settings({"GENLINE_VAR_DIR": str(tmp_path / "v"), "GENLINE_UPLOAD_DIRS": ""}).upload_dirs == (
        settings.upload_dirs
    )


# --- bytes and file objects --------------------------------------------------------------------------
def test_the_api_takes_the_image_as_bytes_or_a_binary_file_and_it_is_the_same_request(
    rt: Runtime, request_fields: RequestFn, product_png: Path
) -> None:
    api = Genline(runtime=rt)
    by_path = api.submit(request_fields(idempotency_key="same-photo"))
    by_bytes = api.submit(request_fields(idempotency_key="same-photo", image=product_png.read_bytes()))
    with product_png.open("rb") as f:
        by_file = api.submit(request_fields(idempotency_key="same-photo", image=f))
    assert by_path.created and not by_bytes.created and not by_file.created
    assert by_path.pipeline_id == by_bytes.pipeline_id == by_file.pipeline_id
    other = api.submit(request_fields(image=bytearray(png(color=(1, 2, 3)))))
    assert other.created and stored_input(rt, other.pipeline_id).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (lambda: io.StringIO("not bytes"), "image_invalid"),
        (lambda: 12345, "image_invalid"),
        (lambda: b"", "image_unsupported_type"),
        (lambda: b"GIF89a" + b"\0" * 20, "image_unsupported_type"),
        (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024), "image_too_large"),
        (lambda: io.BytesIO(b"\xff\xd8\xff" + b"\0" * (10 * 1024 * 1024)), "image_too_large"),
    ],
    ids=["text-file", "a-number", "empty", "gif", "bytes-over-10MB", "file-over-10MB"],
)
def test_bad_bytes_and_file_objects_are_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, image: Callable[[], Any], code: str
) -> None:
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=image())))
    assert (err.code, err.field) == (code, "image")


# --- decoded and re-encoded ----------------------------------------------------------------------------
def test_a_payload_after_the_image_does_not_survive(rt: Runtime, request_fields: RequestFn, upload_dir: Path) -> None:
    carrier = upload_dir / "carrier.png"
    carrier.write_bytes(png() + SECRET_LINE + b"PK\x03\x04 a zip would start here")
    pid = Genline(runtime=rt).submit(request_fields(image=str(carrier))).pipeline_id
    kept, sent = stored_input(rt, pid), sent_to_provider(rt, pid)
    assert kept == sent
    assert b"AWS_SECRET" not in kept and b"PK\x03\x04" not in kept
    assert kept.endswith(b"IEND\xaeB`\x82")
    assert Image.open(io.BytesIO(kept)).size == (32, 24)


def test_exif_and_its_gps_position_do_not_survive_and_the_photo_stays_upright(
    rt: Runtime, request_fields: RequestFn
) -> None:
    original = jpeg_with_gps()
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825)  # the test's photo has GPS
    pid = Genline(runtime=rt).submit(request_fields(image=original)).pipeline_id
    kept = stored_input(rt, pid)
    img = Image.open(io.BytesIO(kept))
    assert img.format == "JPEG" and not img.getexif() and "exif" not in img.info
    assert b"SellerPhone" not in kept and b"Exif" not in kept
    assert img.size == (20, 40)  # rotated as its orientation said, before the EXIF was dropped


def test_text_chunks_and_icc_profiles_of_a_polyglot_png_do_not_survive() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "<script>alert(1)</script>")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPSLatitude 48.85</x:xmpmeta>")
    out = io.BytesIO()
    Image.new("RGBA", (16, 16), (1, 2, 3, 128)).save(out, "PNG", pnginfo=info, icc_profile=b"\0" * 200)
    clean = reencode(out.getvalue())
    assert b"<script>" not in clean.data and b"xmpmeta" not in clean.data and b"iCCP" not in clean.data
    assert Image.open(io.BytesIO(clean.data)).mode == "RGBA"  # transparency kept
    assert reencode(out.getvalue()).data == clean.data  # the same input, the same bytes


@pytest.mark.parametrize("cut", [12, 20, 400], ids=["no-IEND", "inside-the-last-chunk", "inside-IDAT"])
def test_a_truncated_png_is_refused(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, upload_dir: Path, cut: int
) -> None:
    out = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(out, "PNG")
    whole = out.getvalue()
    assert len(whole) > 2000
    path = upload_dir / "cut.png"
    path.write_bytes(whole[:-cut])
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=str(path))))
    assert (err.code, err.field) == ("image_invalid", "image")


def test_a_png_with_a_damaged_chunk_is_refused(rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn) -> None:
    data = bytearray(png(64, 64))
    data[60] ^= 0xFF  # inside IDAT: its CRC no longer matches
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=bytes(data))))
    assert err.code == "image_invalid"


def test_truncated_jpeg_and_webp_are_refused(rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn) -> None:
    for fmt in ("JPEG", "WEBP"):
        out = io.BytesIO()
        Image.effect_noise((64, 64), 40).convert("RGB").save(out, fmt)
        data = out.getvalue()[: len(out.getvalue()) // 2]
        err = refused(rt, sim, submitting(rt, request_fields(image=data)))
        assert err.code == "image_invalid", fmt


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (MAX_IMAGE_SIDE + 1, 10),
        (10, MAX_IMAGE_SIDE + 1),
        (6000, 5000),  # each side allowed, 30 megapixels are not
        (100_000, 100_000),  # a decompression bomb's header
        (0, 10),
    ],
)
def test_dimension_and_pixel_limits_are_checked_from_the_header(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, width: int, height: int
) -> None:
    err = refused(rt, sim, lambda: Genline(runtime=rt).submit(request_fields(image=png_claiming(width, height))))
    assert err.code in ("image_dimensions_too_large", "image_invalid")
    if width and height:
        assert err.code == "image_dimensions_too_large"
    assert MAX_IMAGE_PIXELS < 6000 * 5000


def test_a_largest_allowed_image_side_is_accepted() -> None:
    clean = reencode(png(MAX_IMAGE_SIDE, 2))
    assert (clean.width, clean.height) == (MAX_IMAGE_SIDE, 2)


def test_pillow_is_a_version_without_the_known_decompression_bomb_cves() -> None:
    import PIL

    major, minor = (int(part) for part in PIL.__version__.split(".")[:2])
    assert (major, minor) >= (11, 3)
