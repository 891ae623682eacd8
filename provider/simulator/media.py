"""What the simulated provider generates: media jobs and their deterministic content.

Standard library only, and pure: nothing here reads the clock or holds a socket. The same seed always
gives the same bytes, so a test can compare checksums across runs and a client's copy can be verified
end to end.

- ``media_seed`` turns a request's inputs into a 32-byte seed.
- ``png_bytes`` draws a small, valid RGB PNG whose colours come from the seed.
- ``mp4_chunks`` streams a structurally valid ISO-BMFF file (``ftyp`` + ``moov/mvhd`` + ``mdat``) of
  exactly the asked size, in chunks, never holding it whole: 1 GiB streams at memory-copy speed,
  because the ``mdat`` payload repeats one SHAKE-256 block per seed with a per-block SHA-256 header.
- ``sha256_of`` measures a stream of chunks.
- ``marketing_copy`` writes a few sentences of product copy from a chat conversation.
- ``media_params`` checks the parameters that shape a result.
- ``Job``: one image or video job, whose status is a function of its submit time and ``now``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any

CHUNK = 256 * 1024
BLOCK = 1 << 20  # the repeated mdat block
_BLOCK_HEAD = 32  # bytes of each block replaced by sha256(seed || block number)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FTYP = struct.pack(">I4s4sI4s4s4s4s", 32, b"ftyp", b"isom", 0x200, b"isom", b"iso2", b"avc1", b"mp41")
MP4_MIN_SIZE = len(_FTYP) + 116 + 8  # ftyp + moov(mvhd) + an empty mdat


def media_seed(kind: str, model: str, prompt: str, params: dict[str, Any], index: int = 0) -> bytes:
    """A 32-byte seed from everything that shapes a result (canonical JSON, so key order is moot)."""
    blob = json.dumps([kind, model, prompt, params, index], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).digest()


# --- PNG -------------------------------------------------------------------------------------------

_SHIFT_TABLES = [bytes((v + k) & 255 for v in range(256)) for k in range(256)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(seed: bytes, px: int) -> bytes:
    """A ``px`` x ``px`` 8-bit RGB PNG: a seed-coloured gradient whose rows shift by a seed-chosen step."""
    if px < 1:
        raise ValueError("px must be at least 1")
    digest = hashlib.sha256(b"png" + seed).digest()
    c0, c1 = digest[0:3], digest[3:6]
    step = digest[6] | 1
    span = max(1, px - 1)
    row = bytearray()
    for x in range(px):
        noise = digest[8 + x % 24] & 15
        row.extend((c0[c] + (c1[c] - c0[c]) * x // span + noise) & 255 for c in range(3))
    base = bytes(row)
    raw = b"".join(b"\x00" + base.translate(_SHIFT_TABLES[(y * step) & 255]) for y in range(px))
    header = struct.pack(">IIBBBBB", px, px, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


# --- MP4 -------------------------------------------------------------------------------------------


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _mvhd(duration_ms: int) -> bytes:
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    payload = (
        struct.pack(">IIIII", 0, 0, 0, 1000, max(0, duration_ms) & 0xFFFFFFFF)  # version/flags, times, scale
        + struct.pack(">IH", 0x00010000, 0x0100)  # rate 1.0, volume 1.0
        + bytes(10)
        + matrix
        + bytes(24)
        + struct.pack(">I", 2)  # next_track_ID
    )
    return _box(b"mvhd", payload)


def _mp4_head(size: int, duration_ms: int) -> bytes:
    """``ftyp`` + ``moov`` + the ``mdat`` header for a file of exactly ``size`` bytes."""
    moov = _box(b"moov", _mvhd(duration_ms))
    mdat_total = size - len(_FTYP) - len(moov)
    if mdat_total <= 0xFFFFFFFF:
        mdat_head = struct.pack(">I4s", mdat_total, b"mdat")
    else:  # 64-bit "largesize" box header
        mdat_head = struct.pack(">I4sQ", 1, b"mdat", mdat_total)
    return _FTYP + moov + mdat_head


@lru_cache(maxsize=16)
def _base_block(seed: bytes) -> memoryview:
    return memoryview(hashlib.shake_256(b"mdat" + seed).digest(BLOCK))


def _block_head(seed: bytes, number: int) -> bytes:
    return hashlib.sha256(seed + number.to_bytes(8, "big")).digest()


def _payload(seed: bytes, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the endless deterministic payload for ``seed``."""
    base = _base_block(seed)
    parts: list[bytes | memoryview] = []
    pos = start
    while pos < end:
        number, offset = divmod(pos, BLOCK)
        take = min(BLOCK - offset, end - pos)
        if offset < _BLOCK_HEAD:
            head_end = min(_BLOCK_HEAD, offset + take)
            parts.append(_block_head(seed, number)[offset:head_end])
            if offset + take > _BLOCK_HEAD:
                parts.append(base[_BLOCK_HEAD : offset + take])
        else:
            parts.append(base[offset : offset + take])
        pos += take
    return b"".join(parts)


def mp4_chunks(seed: bytes, size: int, chunk: int = CHUNK, *, duration_ms: int = 0) -> Iterator[bytes]:
    """Stream an MP4 of exactly ``size`` bytes in chunks of ``chunk`` bytes (the last may be shorter).

    The first chunk also carries the ~156-byte header, so it is never shorter than that.
    """
    if size < MP4_MIN_SIZE:
        raise ValueError(f"an MP4 needs at least {MP4_MIN_SIZE} bytes, not {size}")
    if chunk < 1:
        raise ValueError("chunk must be positive")
    head = _mp4_head(size, duration_ms)
    payload_len = size - len(head)
    first = min(payload_len, max(0, chunk - len(head)))
    yield head + _payload(seed, 0, first)
    pos = first
    while pos < payload_len:
        end = min(payload_len, pos + chunk)
        yield _payload(seed, pos, end)
        pos = end


def sha256_of(chunks: Iterable[bytes]) -> tuple[int, str]:
    """``(size, sha256 hex digest)`` of a stream of chunks."""
    digest = hashlib.sha256()
    size = 0
    for part in chunks:
        digest.update(part)
        size += len(part)
    return size, digest.hexdigest()


# --- chat copy -------------------------------------------------------------------------------------

_OPENERS = ("Meet", "Say hello to", "Introducing", "Discover", "Here is")
_CLAIMS = (
    "It is built for people who want more from every day.",
    "Every detail was designed to feel effortless.",
    "It turns an ordinary moment into something worth sharing.",
    "Quality you can see, comfort you can feel.",
    "Made to last, priced to love.",
    "It fits your life instead of asking you to fit it.",
)
_CALLS = ("Try it today.", "Order yours now.", "See it in action.", "Find out why everyone is talking about it.")


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def marketing_copy(messages: Sequence[dict[str, Any]], max_tokens: int | None = None) -> tuple[str, bool]:
    """Deterministic copy about the last user message; ``(text, truncated_by_max_tokens)``."""
    users = [m for m in messages if m.get("role") == "user"] or list(messages)
    subject = " ".join(message_text(users[-1].get("content")).split()[:8]).rstrip(".!?,;:") or "our product"
    digest = hashlib.sha256(json.dumps(list(messages), sort_keys=True, default=str).encode()).digest()
    claims = [_CLAIMS[(digest[i] + i) % len(_CLAIMS)] for i in range(1, 4)]
    text = " ".join(
        [f"{_OPENERS[digest[0] % len(_OPENERS)]} {subject}.", *dict.fromkeys(claims), _CALLS[digest[5] % len(_CALLS)]]
    )
    if max_tokens is not None and len(text) > max_tokens * 4:
        cut = text[: max(1, max_tokens * 4)]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
        return text, True
    return text, False


def approx_tokens(text: str) -> int:
    """Roughly four characters a token, and never zero."""
    return max(1, (len(text) + 3) // 4)


# --- request parameters ---------------------------------------------------------------------------

ASPECTS = {"1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21"}
_PIXELS = re.compile(r"\d{2,4}x\d{2,4}")
_RESOLUTION = re.compile(r"(\d{3,4}p|[1-8]k)", re.IGNORECASE)


class BadParam(ValueError):
    """One request parameter is wrong; ``param`` names it."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


_DATA_URL = re.compile(r"data:(image/[\w.+-]+);base64,([A-Za-z0-9+/=\s]*)", re.DOTALL)
MAX_INLINE_IMAGE = 10 * 1024 * 1024


def image_urls(body: dict[str, Any]) -> list[str]:
    """Up to 8 http(s) URLs or ``data:image/...;base64,`` URLs (at most 10 MB each).

    An inline image is kept as its type and digest, so a job never holds the photo itself.
    """
    urls = body.get("image_urls") or []
    if not isinstance(urls, list) or len(urls) > 8:
        raise BadParam("'image_urls' must be a list of up to 8 image URLs.", param="image_urls")
    kept = []
    for url in urls:
        inline = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
        if inline is not None:
            if len(inline[2]) * 3 // 4 > MAX_INLINE_IMAGE:
                raise BadParam("An inline image in 'image_urls' is over 10 MB.", param="image_urls")
            kept.append(f"data:{inline[1]};sha256={hashlib.sha256(inline[2].encode()).hexdigest()}")
        elif isinstance(url, str) and url.startswith(("http://", "https://")):
            kept.append(url)
        else:
            raise BadParam("'image_urls' items must be http(s) URLs or data:image/...;base64 URLs.", param="image_urls")
    return kept


def resolution(body: dict[str, Any], default: str | None) -> str | None:
    value = body.get("resolution", default)
    if value is not None and (not isinstance(value, str) or not _RESOLUTION.fullmatch(value)):
        raise BadParam(f"'resolution' {value!r} is not supported (e.g. 720p, 1080p, 2K).", param="resolution")
    return value


def media_params(body: dict[str, Any], kind: str, limit: float | None) -> tuple[dict[str, Any], int]:
    """The checked parameters that shape a result (a ``BadParam`` names the wrong one), and its item count."""
    if kind == "image":
        n, size = body.get("n", 1), body.get("size", "1:1")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4:
            raise BadParam("'n' must be an integer from 1 to 4.", param="n")
        if not isinstance(size, str) or not (size in ASPECTS or _PIXELS.fullmatch(size)):
            raise BadParam(f"'size' {size!r} is not supported; use an aspect ratio such as 1:1 or 16:9.", param="size")
        return {"size": size, "resolution": resolution(body, None), "image_urls": image_urls(body)}, n
    duration, aspect = body.get("duration", min(5, limit or 5)), body.get("aspect_ratio", "16:9")
    if not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0:
        raise BadParam("'duration' must be a positive number of seconds.", param="duration")
    if limit is not None and duration > limit:
        raise BadParam(f"'duration' {duration} s is above this model's maximum of {limit} s.", param="duration")
    if aspect not in ASPECTS:
        raise BadParam(f"'aspect_ratio' {aspect!r} is not supported; use e.g. 16:9 or 9:16.", param="aspect_ratio")
    params = {
        "duration": duration,
        "aspect_ratio": aspect,
        "resolution": resolution(body, "720p"),
        "image_urls": image_urls(body),
    }
    return params, 1


# --- jobs ------------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def cached_png(seed: bytes, px: int) -> bytes:
    """``png_bytes``, remembered: a PNG is served and hashed more than once."""
    return png_bytes(seed, px)


POISONED_ORIGIN = "http://127.0.0.1:9"  # the discard port: a connection there is refused, every time


@dataclass
class Job:
    """One provider-side generation job; everything that decides its future is fixed at submit.

    Pending for the first 10% of ``duration_s``, then processing with progress rising to 99, then
    completed; a ``fail`` outcome ends failed at 60%; a ``stall`` one sits at 99% for ``stall_s`` more.
    """

    id: str
    kind: str  # image | video
    model: str
    prompt: str
    params: dict[str, Any]
    seeds: list[bytes]  # one per result item
    created: float  # unix seconds
    duration_s: float  # submit -> done, before any stall
    outcome: str  # complete | fail | stall
    stall_s: float
    url_ttl_s: float
    url_shape: str  # string | list
    file_size: int  # MP4 bytes, or the PNG side in pixels
    cost_usd: Decimal
    idempotency_key: str | None
    polls: int = 0
    digests: dict[int, tuple[int, str]] = field(default_factory=dict)
    cancelled_at: float | None = None  # set by POST /v1/tasks/{id}/cancel
    poisoned: bool = False  # its result link points where nothing answers (SimConfig.poisoned_link_every)
    estimate_factor: float = 1.0  # its ``estimated_time`` is ``duration_s`` times this (render jitter)

    @property
    def ext(self) -> str:
        return "png" if self.kind == "image" else "mp4"

    @property
    def content_type(self) -> str:
        return "image/png" if self.kind == "image" else "video/mp4"

    @property
    def done_at(self) -> float:
        return self.created + self.duration_s + (self.stall_s if self.outcome == "stall" else 0.0)

    @property
    def expires_at(self) -> float:
        return self.done_at + self.url_ttl_s

    @property
    def estimated_time(self) -> int:
        """Whole seconds, at least 1, except for a job that renders at once (0)."""
        estimate = self.duration_s * self.estimate_factor
        return max(1, math.ceil(estimate)) if estimate > 0 else 0

    def phase(self, now: float) -> tuple[str, int]:
        """``(status, progress)`` at ``now``."""
        elapsed = now - self.created
        if self.cancelled_at is not None and now >= self.cancelled_at:
            return "cancelled", min(99, max(0, int(100 * (self.cancelled_at - self.created) / (self.duration_s or 1))))
        if self.outcome == "fail" and elapsed >= 0.6 * self.duration_s:
            return "failed", 60 if self.duration_s else 0
        if now >= self.done_at:
            return "completed", 100
        if elapsed < 0.1 * self.duration_s:
            return "pending", 0
        if elapsed >= self.duration_s:
            return "processing", 99  # stalled beyond its estimate
        return "processing", min(99, max(1, int(100 * elapsed / self.duration_s)))

    def chunks(self, index: int) -> Iterator[bytes]:
        """The bytes of result item ``index``, in chunks."""
        if self.kind == "image":
            yield cached_png(self.seeds[index], self.file_size)
        else:
            duration_ms = int(float(self.params["duration"]) * 1000)
            yield from mp4_chunks(self.seeds[index], self.file_size, duration_ms=duration_ms)

    def view(self, now: float, origin: str) -> dict[str, Any]:
        """The task object of ``GET /v1/tasks/{id}``; result URLs are absolute, under ``origin``."""
        status, progress = self.phase(now)
        data: dict[str, Any] = {
            "id": self.id,
            "status": status,
            "progress": progress,
            "created": int(self.created),
            "estimated_time": self.estimated_time,
            "type": self.kind,
            "model": self.model,
            "object": f"{self.kind}.generation.task",
        }
        if status == "completed":
            data["completed"] = int(self.done_at)
            data["actual_time"] = max(0, round(self.done_at - self.created))
            base = POISONED_ORIGIN if self.poisoned else origin
            urls = [f"{base}/files/{self.id}/{i}.{self.ext}" for i in range(len(self.seeds))]
            data["result"] = {
                f"{self.kind}s": [
                    {"url": url if self.url_shape == "string" else [url], "expires_at": int(self.expires_at)}
                    for url in urls
                ]
            }
        elif status == "failed":
            data["actual_time"] = max(0, round(0.6 * self.duration_s))
            data["error"] = {
                "code": "generation_failed",
                "message": "The model could not generate this request; please try again.",
            }
        return data
