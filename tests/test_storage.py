"""Object storage keeps outputs whole, verified and nowhere half-written.

Local storage runs on real files under tmp_path; S3 runs against moto's S3-compatible server in
its own process over loopback HTTP (workers/moto_server.py). No boto3 mocks.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genline.config.errors import ConfigError, RetryableStorageError, StorageError
from genline.storage.factory import open_store
from genline.storage.local import LocalObjectStore
from genline.storage.objects import ObjectStore
from genline.storage.s3 import S3ObjectStore, make_s3_client
from tests.support.s3_server import free_port

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
ODD_CHUNK = 100_003  # a prime: chunks never line up with part boundaries


def odd_chunks(total: int, *, seed: int = 1, chunk_size: int = ODD_CHUNK) -> Iterator[bytes]:
    """``total`` deterministic pseudo-random bytes in chunks of ``chunk_size`` (the last shorter)."""
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(chunk_size, total - sent)
        yield rng.randbytes(n)
        sent += n


def sha256_of(total: int, *, seed: int = 1) -> str:
    digest = hashlib.sha256()
    for chunk in odd_chunks(total, seed=seed):
        digest.update(chunk)
    return digest.hexdigest()


def failing_after(total: int) -> Iterator[bytes]:
    """A source that breaks mid-stream, like a provider download cut off."""
    yield from odd_chunks(total)
    raise ConnectionResetError("source went away")


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_client(moto_endpoint: str) -> Any:
    return make_s3_client(endpoint_url=moto_endpoint)


@pytest.fixture
def s3_store(s3_client: Any) -> S3ObjectStore:
    """A fresh bucket per test, keys under the ``videos`` prefix."""
    store = S3ObjectStore(f"genline-test-{uuid.uuid4().hex[:12]}", "videos", s3_client)
    store.ensure_bucket()
    return store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def bucket_is_empty(store: S3ObjectStore, client: Any) -> bool:
    objects = client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return not objects and not uploads


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- local -------------------------------------------------------------------------------------
def test_local_round_trip_keeps_bytes_size_sha256_and_content_type(local_store: LocalObjectStore) -> None:
    total = 3 * ODD_CHUNK + 17
    info = local_store.put_stream(
        "videos/pl-1/out.mp4", odd_chunks(total), content_type="video/mp4", expected_size=total
    )

    assert (info.size, info.sha256, info.content_type) == (total, sha256_of(total), "video/mp4")
    assert info.location == str(local_store.root / "videos" / "pl-1" / "out.mp4")
    assert local_store.head("videos/pl-1/out.mp4") == info
    assert local_store.read_bytes("videos/pl-1/out.mp4") == b"".join(odd_chunks(total))
    assert [len(c) for c in local_store.open_stream("videos/pl-1/out.mp4", chunk_size=MiB // 8)][0] == MiB // 8
    assert local_store.presigned_url("videos/pl-1/out.mp4") == Path(info.location).as_uri()


@pytest.mark.parametrize(("sent", "announced"), [(1000, 999), (1000, 2000)], ids=["longer", "shorter"])
def test_local_size_mismatch_leaves_no_file_behind(local_store: LocalObjectStore, sent: int, announced: int) -> None:
    with pytest.raises(StorageError) as caught:
        local_store.put_stream("a/b.mp4", odd_chunks(sent), content_type="video/mp4", expected_size=announced)

    assert caught.value.code == "size_mismatch"
    assert local_store.head("a/b.mp4") is None
    assert files_under(local_store.root) == []


def test_local_broken_source_keeps_previous_version_whole(local_store: LocalObjectStore) -> None:
    first = local_store.put_stream("a/b.mp4", [b"version one"], content_type="video/mp4")

    with pytest.raises(ConnectionResetError):
        local_store.put_stream("a/b.mp4", failing_after(2 * MiB), content_type="video/mp4")

    assert local_store.head("a/b.mp4") == first
    assert local_store.read_bytes("a/b.mp4") == b"version one"
    assert [p.name for p in files_under(local_store.root)] == ["b.mp4", "b.mp4.meta.json"]


def test_local_missing_object_reads_as_absent_and_deletes_quietly(local_store: LocalObjectStore) -> None:
    assert local_store.head("nothing/here.mp4") is None
    local_store.delete("nothing/here.mp4")
    with pytest.raises(StorageError) as caught:
        local_store.open_stream("nothing/here.mp4")
    assert caught.value.code == "object_not_found"

    local_store.put_stream("x.png", [b"png"], content_type="image/png")
    local_store.delete("x.png")
    assert local_store.head("x.png") is None
    assert files_under(local_store.root) == []


# --- S3 ----------------------------------------------------------------------------------------
def test_s3_round_trip_keeps_bytes_size_sha256_and_content_type(s3_store: S3ObjectStore, s3_client: Any) -> None:
    total = 5 * ODD_CHUNK
    info = s3_store.put_stream("pl-1/out.png", odd_chunks(total), content_type="image/png", expected_size=total)

    assert (info.size, info.sha256, info.content_type) == (total, sha256_of(total), "image/png")
    assert info.location == f"s3://{s3_store.bucket}/videos/pl-1/out.png"
    assert s3_store.head("pl-1/out.png") == info  # single-request uploads keep sha256 as metadata
    assert s3_store.read_bytes("pl-1/out.png") == b"".join(odd_chunks(total))
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]]
    assert keys == ["videos/pl-1/out.png"]


def test_s3_20_mib_stream_goes_multipart_and_reads_back_identical(s3_store: S3ObjectStore, s3_client: Any) -> None:
    total = 20 * MiB
    info = s3_store.put_stream("pl-2/out.mp4", odd_chunks(total), content_type="video/mp4", expected_size=total)

    assert (info.size, info.sha256) == (total, sha256_of(total))
    etag = s3_client.head_object(Bucket=s3_store.bucket, Key="videos/pl-2/out.mp4")["ETag"]
    assert etag.strip('"').endswith("-3")  # 8 + 8 + 4 MiB parts
    read_back = hashlib.sha256()
    size = 0
    for chunk in s3_store.open_stream("pl-2/out.mp4"):
        read_back.update(chunk)
        size += len(chunk)
    assert (size, read_back.hexdigest()) == (total, info.sha256)
    head = s3_store.head("pl-2/out.mp4")
    assert head is not None and (head.size, head.content_type, head.sha256) == (total, "video/mp4", "")


@pytest.mark.parametrize("total", [0, 8 * MiB, 16 * MiB], ids=["empty", "one-part", "two-parts"])
def test_s3_objects_on_part_boundaries_round_trip(s3_store: S3ObjectStore, total: int) -> None:
    info = s3_store.put_stream("pl-8/out.mp4", odd_chunks(total), content_type="video/mp4", expected_size=total)

    assert (info.size, info.sha256) == (total, sha256_of(total))
    assert hashlib.sha256(s3_store.read_bytes("pl-8/out.mp4")).hexdigest() == info.sha256


@pytest.mark.parametrize(
    ("sent", "announced"),
    [(1000, 999), (1000, 2000), (20 * MiB, 10 * MiB), (12 * MiB, 20 * MiB)],
    ids=["single-longer", "single-shorter", "multipart-longer", "multipart-shorter"],
)
def test_s3_size_mismatch_leaves_no_object_and_no_pending_upload(
    s3_store: S3ObjectStore, s3_client: Any, sent: int, announced: int
) -> None:
    with pytest.raises(StorageError) as caught:
        s3_store.put_stream("pl-3/out.mp4", odd_chunks(sent), content_type="video/mp4", expected_size=announced)

    assert caught.value.code == "size_mismatch"
    assert s3_store.head("pl-3/out.mp4") is None
    assert bucket_is_empty(s3_store, s3_client)


def test_s3_broken_source_aborts_the_multipart_upload(s3_store: S3ObjectStore, s3_client: Any) -> None:
    with pytest.raises(ConnectionResetError):
        s3_store.put_stream("pl-4/out.mp4", failing_after(10 * MiB), content_type="video/mp4")

    assert bucket_is_empty(s3_store, s3_client)


def test_s3_missing_bucket_is_a_permanent_error_naming_the_bucket(s3_client: Any) -> None:
    store = S3ObjectStore("genline-no-such-bucket", "", s3_client)

    with pytest.raises(StorageError) as caught:
        store.put_stream("a.mp4", [b"data"], content_type="video/mp4")

    assert not isinstance(caught.value, RetryableStorageError)
    assert caught.value.code == "bucket_not_found"
    assert "genline-no-such-bucket" in caught.value.message
    assert "testing" not in caught.value.message  # never the (dummy) credentials


def test_s3_unreachable_store_is_a_retryable_error(moto_endpoint: str) -> None:
    client = make_s3_client(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout_s=1)
    store = S3ObjectStore("genline-outputs", "", client)

    with pytest.raises(RetryableStorageError) as caught:
        store.put_stream("a.mp4", [b"data"], content_type="video/mp4")

    assert caught.value.code == "storage_unreachable"
    assert "genline-outputs" in caught.value.message


def test_s3_presigned_url_downloads_without_credentials(s3_store: S3ObjectStore) -> None:
    s3_store.put_stream("pl-5/out.mp4", [b"frame-1", b"frame-2"], content_type="video/mp4")

    with urllib.request.urlopen(s3_store.presigned_url("pl-5/out.mp4", expires_s=60), timeout=10) as response:
        assert response.read() == b"frame-1frame-2"


def test_s3_streaming_64_mib_keeps_memory_bounded(s3_store: S3ObjectStore) -> None:
    total = 64 * MiB
    block = random.Random(3).randbytes(MiB + 4099)  # made before measuring; sliced into odd chunks

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            n = min(ODD_CHUNK, total - sent)
            start = sent % (len(block) - ODD_CHUNK)
            yield block[start : start + n]
            sent += n

    s3_store.put_stream("warm-up.bin", [b"x"], content_type="application/octet-stream")  # load botocore models
    tracemalloc.start()
    try:
        info = s3_store.put_stream("pl-6/big.mp4", chunks(), content_type="video/mp4", expected_size=total)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert info.size == total
    assert peak < 24 * MiB, f"peak {peak / MiB:.1f} MiB while streaming 64 MiB with 8 MiB parts"


# --- both stores -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../outside.mp4", "a/../../b.mp4", "a//b.mp4", "a/", "./a.mp4", "a\\b.mp4",
     "a\nb.mp4", "x" * 1025, "a.mp4.meta.json"],
    ids=["empty", "absolute", "dotdot", "nested-dotdot", "empty-segment", "trailing-slash", "dot",
         "backslash", "newline", "too-long", "sidecar-suffix"],
)  # fmt: skip
def test_invalid_keys_are_rejected_by_every_store(
    local_store: LocalObjectStore, s3_store: S3ObjectStore, key: str
) -> None:
    store: ObjectStore
    for store in (local_store, s3_store):
        with pytest.raises(StorageError) as caught:
            store.put_stream(key, [b"data"], content_type="video/mp4")
        assert caught.value.code == "invalid_key"
        with pytest.raises(StorageError):
            store.head(key)
    assert files_under(local_store.root) == []
    assert not (local_store.root.parent / "outside.mp4").exists()


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, moto_endpoint: str, s3_client: Any) -> None:
    local = open_store((tmp_path / "objects").as_uri())
    assert isinstance(local, LocalObjectStore) and isinstance(local, ObjectStore)
    assert local.location("a.mp4") == str(tmp_path / "objects" / "a.mp4")

    bucket = f"genline-test-{uuid.uuid4().hex[:12]}"
    s3 = open_store(f"s3://{bucket}/outputs/videos", endpoint_url=moto_endpoint)
    assert isinstance(s3, S3ObjectStore) and isinstance(s3, ObjectStore)
    s3.ensure_bucket()
    info = s3.put_stream("pl-7/out.mp4", [b"abc"], content_type="video/mp4")
    assert info.location == f"s3://{bucket}/outputs/videos/pl-7/out.mp4"
    assert [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]] == ["outputs/videos/pl-7/out.mp4"]


@pytest.mark.parametrize(
    "url",
    ["ftp://host/objects", "/var/objects", "http://bucket/x", "s3:///no-bucket", "s3://Bad_Bucket/x",
     "s3://key:secret@bucket/x", "file://otherhost/objects", "file:relative/objects"],
)  # fmt: skip
def test_open_store_rejects_unknown_or_malformed_urls(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert "secret" not in caught.value.message
