"""Input images: read only where genline may read, decoded, and re-encoded before anything is kept
or sent.

- **Where from.** A local path inside a request (Python API, ``submit --file``, batch lines) is read
  only inside the folders of ``GENLINE_UPLOAD_DIRS``: the path is resolved (symlinks followed),
  must then lie inside one of them, and the resolved path is opened one component at a time with
  ``O_NOFOLLOW``, so a symlink swapped in after the check is refused too. Everything outside,
  whether it exists or not, is one error, ``image_path_not_allowed``: the answer tells nothing about
  the rest of the machine. Only regular files are read, and never more than ``MAX_IMAGE_BYTES``.
- **What.** PNG, JPEG or WebP by their bytes, decoded by Pillow with only that format's decoder.
  Each side is at most ``MAX_IMAGE_SIDE`` pixels and the picture at most ``MAX_IMAGE_PIXELS``,
  checked from the header before anything is decoded. A PNG is walked chunk by chunk first (every
  CRC, up to ``IEND``): Pillow itself decodes a PNG whose tail is cut off.
- **What is kept.** The pixels only, re-encoded in the same format into a fresh image: metadata
  (EXIF and its GPS position, XMP, ICC profiles, text chunks), bytes after the image's end, and
  whatever else a polyglot file carried do not survive. EXIF's orientation is applied first, so the
  photo stays upright without it. The same input gives the same bytes (and so the same sha256).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genline.config.errors import ValidationError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 25_000_000  # a 24-megapixel camera's photo; decoded as RGBA, about 100 MB
JPEG_QUALITY = 95

_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CleanImage:
    """An image as genline keeps and sends it: re-encoded pixels, nothing else."""

    data: bytes
    content_type: str
    width: int
    height: int


def sniff_image_type(head: bytes) -> str | None:
    """The image type by its first bytes, whatever the file is called."""
    if head.startswith(_PNG_SIGNATURE):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _error(message: str, code: str) -> ValidationError:
    return ValidationError(message, code=code, field="image")


def _too_large(size: int) -> ValidationError:
    return _error(
        f"image is {size / 1048576:.1f} MB; the most allowed is {MAX_IMAGE_BYTES // 1048576} MB.", "image_too_large"
    )


def _invalid(why: str) -> ValidationError:
    return _error(f"image cannot be decoded ({why}); send a complete PNG, JPEG or WebP file.", "image_invalid")


# --- reading ----------------------------------------------------------------------------------------
def read_bounded(fileobj: Any) -> bytes:
    """At most ``MAX_IMAGE_BYTES`` from a binary file object; ``image_too_large`` past that."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = fileobj.read(min(1024 * 1024, MAX_IMAGE_BYTES + 1 - size))
        except OSError as exc:
            raise _error(f"image cannot be read ({exc.strerror or type(exc).__name__}).", "image_unreadable") from None
        if isinstance(chunk, str):
            raise _error("image must be bytes or a file opened in binary mode ('rb').", "image_invalid")
        if not chunk:
            return b"".join(chunks)
        chunks.append(bytes(chunk))
        size += len(chunk)
        if size > MAX_IMAGE_BYTES:
            raise _error(
                f"image is over {MAX_IMAGE_BYTES // 1048576} MB, the most allowed.",
                "image_too_large",
            )


def _read_fd(fd: int, missing: ValidationError) -> bytes:
    """A regular file's bytes from an open descriptor (which this closes)."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise missing
        if info.st_size > MAX_IMAGE_BYTES:
            raise _too_large(info.st_size)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return read_bounded(f)


def read_operator_file(path: Path) -> bytes:
    """The CLI's own ``--image PATH``: the operator's argument, read by the CLI, whose bytes are
    then passed on like any other image. Still a regular file only, and at most 10 MB."""
    missing = _error(f"image file {str(path)!r} does not exist or is not a regular file.", "image_not_found")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hang the CLI
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise missing from None
    except OSError as exc:
        raise _error(
            f"image file {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__}).", "image_unreadable"
        ) from None
    return _read_fd(fd, missing)


def _not_allowed(ref: str) -> ValidationError:
    return _error(
        f"image {ref[:80]!r} is not inside an upload folder (GENLINE_UPLOAD_DIRS); pass an http(s) URL, "
        "or the image's bytes, instead.",
        "image_path_not_allowed",
    )


def _open_below(root: Path, parts: Sequence[str]) -> int:
    """Open ``root/parts...`` one component at a time, following no symlink: the path was resolved
    already, so a symlink met now was put there after the check."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in parts[:-1]:
            step = os.open(part, flags | getattr(os, "O_DIRECTORY", 0), dir_fd=fd)
            os.close(fd)
            fd = step
        return os.open(parts[-1], flags | getattr(os, "O_NONBLOCK", 0), dir_fd=fd)
    finally:
        os.close(fd)


def read_upload(ref: str, upload_dirs: Sequence[Path]) -> bytes:
    """A local path named inside a request: read only inside an upload folder."""
    try:
        resolved = Path(ref).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL, ...
        raise _not_allowed(ref) from None
    for folder in upload_dirs:
        try:
            root = folder.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved != root and resolved.is_relative_to(root):
            break
    else:
        raise _not_allowed(ref)
    missing = _error(f"image {ref[:80]!r} is not a file in the upload folder.", "image_not_found")
    parts = resolved.relative_to(root).parts
    try:
        if os.open in os.supports_dir_fd:
            fd = _open_below(root, parts)
        else:  # pragma: no cover - every platform genline runs on has dir_fd
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            raise missing from None
        if exc.errno == errno.ELOOP:  # a symlink appeared after the path was resolved
            raise _not_allowed(ref) from None
        raise _error(
            f"image {ref[:80]!r} cannot be read ({exc.strerror or type(exc).__name__}).", "image_unreadable"
        ) from None
    return _read_fd(fd, missing)


# --- decoding and re-encoding ------------------------------------------------------------------------
def _check_png_structure(data: bytes) -> None:
    """Every chunk whole and its CRC right, up to IEND; what follows IEND is ignored (and dropped)."""
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise _invalid("the PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > len(data):
            raise _invalid("the PNG is cut off inside a chunk")
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise _invalid(f"a {kind.decode('latin-1')!r} chunk of the PNG is damaged")
        if kind == b"IEND":
            return
        pos = end


def _check_dimensions(width: int, height: int) -> None:
    if width < 1 or height < 1 or width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise _error(
            f"image is {width}x{height} pixels; each side may be at most {MAX_IMAGE_SIDE}.",
            "image_dimensions_too_large",
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise _error(
            f"image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); the most allowed is "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels.",
            "image_dimensions_too_large",
        )


def reencode(data: bytes) -> CleanImage:
    """Decode ``data`` and encode its pixels afresh in the same format, nothing else kept."""
    from PIL import Image, ImageOps

    if len(data) > MAX_IMAGE_BYTES:
        raise _too_large(len(data))
    content_type = sniff_image_type(data[:16])
    if content_type is None:
        raise _error(
            "image is not a PNG, JPEG or WebP image (judged by its contents, not its name).",
            "image_unsupported_type",
        )
    fmt = _FORMATS[content_type]
    if fmt == "PNG":
        _check_png_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                _check_dimensions(*img.size)  # from the header, before any pixel is decoded
                img.load()  # a truncated image raises here (LOAD_TRUNCATED_IMAGES is never set)
                upright = ImageOps.exif_transpose(img)
    except ValidationError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _error("image has too many pixels to decode safely.", "image_dimensions_too_large") from None
    except Exception as exc:  # noqa: BLE001  # any decoder failure is the image's fault, said plainly
        raise _invalid(str(exc).split("\n")[0][:80] or type(exc).__name__) from None
    has_alpha = upright.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in upright.info
    mode = "RGBA" if has_alpha and fmt != "JPEG" else "RGB"
    pixels = upright.convert(mode)
    clean = Image.new(mode, pixels.size)  # a fresh image: no info, EXIF, ICC or text carried over
    clean.paste(pixels)
    out = io.BytesIO()
    if fmt == "JPEG":
        clean.save(out, "JPEG", quality=JPEG_QUALITY)
    elif fmt == "WEBP":
        clean.save(out, "WEBP", quality=JPEG_QUALITY, method=4)
    else:
        clean.save(out, "PNG")
    return CleanImage(out.getvalue(), content_type, clean.width, clean.height)
