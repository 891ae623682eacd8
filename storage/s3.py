"""S3 (and S3-compatible: MinIO, moto) object storage behind the ObjectStore seam.

Uploads stream in constant memory. A stream shorter than one part (8 MiB by default, at least 5 MiB)
is sent with one ``PutObject``; a longer one as a multipart upload through two reused part buffers:
one part uploads (in a thread of the upload's own) while the next fills from the stream, so reading
and sending overlap and at most two parts are ever held. Every part (or the single body) carries its
``ChecksumSHA256`` so S3 rejects bytes damaged in transit; a size mismatch or any failure aborts the
multipart upload, so no object and no pending upload is left behind. Afterwards ``HeadObject``
checks size, content type and, where the store reports one, the SHA-256 checksum.

Where sha256 is kept: S3 object metadata is fixed when an upload starts, before the digest of a
stream is known, and S3's own SHA-256 checksum of a multipart object is a checksum *of the part
checksums*, not of the content. So the whole-object sha256 is stored as user metadata
(``x-amz-meta-sha256``) for single-request uploads only; ``head`` reports ``sha256=""`` for
multipart objects. ``put_stream`` always returns the real sha256 for the caller to record.

Errors are translated here: 5xx, throttling, timeouts and broken connections become
``RetryableStorageError``; a missing bucket, refused access or other 4xx become ``StorageError``
naming the bucket (never credentials or the endpoint).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from genline.config.errors import RetryableStorageError, StorageError
from genline.config.logging import get_logger
from genline.storage.objects import StoredObjectInfo, check_size, validate_content_type, validate_key

log = get_logger("genline.storage")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RETRYABLE_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "Throttling", "ThrottlingException", "RequestThrottled", "OperationAborted", "NoSuchUpload",
    "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "IncompleteBody",
}  # fmt: skip
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_Boto = (ClientError, BotoCoreError)


def valid_bucket_name(name: str) -> bool:
    """True for a DNS-style S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."""
    return bool(_BUCKET_RE.match(name)) and ".." not in name


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
    max_attempts: int = 5,
) -> Any:
    """A boto3 S3 client with standard retries and bounded timeouts.

    Credentials come from boto3's usual chain. With ``endpoint_url`` (MinIO, moto) path-style
    addressing is used, since such servers rarely resolve ``bucket.host`` names.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        tcp_keepalive=True,
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    session = boto3.session.Session(region_name=region)
    return session.client("s3", endpoint_url=endpoint_url, config=config)


class S3ObjectStore:
    """Objects in ``bucket``, each key placed under ``prefix`` (``""`` for the bucket's root)."""

    def __init__(self, bucket: str, prefix: str, client: Any, *, part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self._client = client

    # --- writing -------------------------------------------------------------------------------
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        expected_size: int | None = None,
    ) -> StoredObjectInfo:
        """Stream ``chunks`` into ``key``; see ``ObjectStore.put_stream`` and the module docstring."""
        validate_key(key)
        validate_content_type(content_type)
        name = self._name(key)
        digest = hashlib.sha256()
        buffers = [bytearray(self.part_size)]  # the part filling; a second once a part is uploading
        buffer = buffers[0]
        filled = size = 0
        upload: _MultipartUpload | None = None
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                size += len(view)
                check_size(key, expected_size, size, final=False)
                digest.update(view)
                while len(view):
                    take = min(self.part_size - filled, len(view))
                    buffer[filled : filled + take] = view[:take]  # same-length slice: copied in place
                    filled += take
                    view = view[take:]
                    if filled == self.part_size:
                        if upload is None:
                            upload = self._start_multipart(key, name, content_type)
                            buffers.append(bytearray(self.part_size))
                        upload.send_part(buffer)  # returns once the part before it has gone
                        buffer = buffers[1] if buffer is buffers[0] else buffers[0]
                        filled = 0
            check_size(key, expected_size, size, final=True)
            del buffer[filled:]  # shrink in place to the bytes of the last (or only) part
            if upload is None:
                checksum = self._put_single(key, name, buffer, content_type, digest.digest())
            else:
                if filled:
                    upload.send_part(buffer)
                checksum = upload.complete()
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return self._verify(key, size, digest.hexdigest(), content_type, checksum)

    def _put_single(self, key: str, name: str, body: bytearray, content_type: str, sha256: bytes) -> str:
        checksum = _b64(sha256)
        with self._boundary("store", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=body,  # a bytearray: botocore sends it as is (bytes would be copied once more)
                ContentType=content_type,
                Metadata={"sha256": sha256.hex()},
                ChecksumSHA256=checksum,
            )
        return checksum

    def _start_multipart(self, key: str, name: str, content_type: str) -> _MultipartUpload:
        with self._boundary("start an upload of", key):
            response = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=name, ContentType=content_type, ChecksumAlgorithm="SHA256"
            )
        return _MultipartUpload(self, key, name, response["UploadId"])

    def _verify(self, key: str, size: int, sha256: str, content_type: str, checksum: str) -> StoredObjectInfo:
        """Check what the store holds against what was sent; delete it if it is wrong."""
        with self._boundary("check", key):
            response = self._client.head_object(Bucket=self.bucket, Key=self._name(key), ChecksumMode="ENABLED")
        problem = None
        stored_checksum = response.get("ChecksumSHA256")
        if response.get("ContentLength") != size:
            problem = f"size {response.get('ContentLength')} instead of {size}"
        elif stored_checksum and stored_checksum.split("-")[0] != checksum.split("-")[0]:
            problem = "a different SHA-256 checksum"  # S3 adds "-<parts>" to multipart checksums
        elif response.get("ContentType") != content_type:
            self.delete(key)
            raise StorageError(
                f"Bucket {self.bucket!r} stored object {key!r} as {response.get('ContentType')!r} "
                f"instead of {content_type!r}; it was removed.",
                code="verify_failed",
            )
        if problem is not None:
            self.delete(key)
            raise RetryableStorageError(
                f"Bucket {self.bucket!r} holds object {key!r} with {problem}; it was removed. Try again.",
                code="verify_failed",
            )
        return StoredObjectInfo(
            key=key, size=size, sha256=sha256, content_type=content_type, location=self.location(key)
        )

    # --- reading -------------------------------------------------------------------------------
    def head(self, key: str) -> StoredObjectInfo | None:
        """Size, content type and (single-request uploads only) sha256, or None when missing.

        A HEAD answer has no body, so a missing bucket also reads as None here.
        """
        validate_key(key)
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise self._translate(exc, "look up", key) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "look up", key) from exc
        return StoredObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            sha256=str(response.get("Metadata", {}).get("sha256", "")),
            content_type=str(response.get("ContentType", "")),
            location=self.location(key),
        )

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks; the request is made now, so a missing key raises here."""
        validate_key(key)
        with self._boundary("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
        return self._chunks(response["Body"], key, chunk_size)

    def _chunks(self, body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._boundary("read", key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory."""
        return b"".join(self.open_stream(key))

    # --- other ---------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Remove the object; S3 answers success for a missing one too."""
        validate_key(key)
        with self._boundary("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def location(self, key: str) -> str:
        """``s3://bucket/prefix/key``."""
        return f"s3://{self.bucket}/{self._name(validate_key(key))}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A SigV4 GET URL valid for ``expires_s`` seconds (at most a week). No request is made."""
        validate_key(key)
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise StorageError(
                f"A presigned URL must expire within 1 s to 7 days, not {expires_s} s.", code="invalid_expiry"
            )
        with self._boundary("sign a URL for", key):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_s
            )
        return url

    def abort_stale_uploads(self, older_than_s: float, *, dry_run: bool = False) -> int:
        """Abort the multipart uploads under this store's prefix started more than ``older_than_s``
        seconds ago; returns how many (``dry_run``: how many would be). A copy that failed in a
        way its own abort could not clean up (the process killed, the abort refused) leaves its
        parts stored, and billed, until then; servers without lifecycle rules keep them forever."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        prefix = f"{self.prefix}/" if self.prefix else ""
        stale: list[tuple[str, str]] = []
        with self._boundary("list the unfinished uploads of"):
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        stale.append((upload["Key"], upload["UploadId"]))
        if dry_run:
            return len(stale)
        aborted = 0
        for name, upload_id in stale:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            except ClientError as exc:
                if _error_code(exc) != "NoSuchUpload":  # finished or aborted meanwhile: nothing to do
                    raise self._translate(exc, "abort an unfinished upload in") from exc
                continue
            except BotoCoreError as exc:
                raise self._translate(exc, "abort an unfinished upload in") from exc
            aborted += 1
        if aborted:
            log.info("multipart_uploads_aborted", bucket=self.bucket, count=aborted)
        return aborted

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (demo and tests; production buckets are provisioned)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise self._translate(exc, "look up") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "look up") from exc
        region = self._client.meta.region_name
        extra = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            self._client.create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise self._translate(exc, "create") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "create") from exc

    # --- helpers -------------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _boundary(self, action: str, key: str | None = None) -> Iterator[None]:
        """Translate botocore exceptions raised inside into genline's StorageErrors."""
        try:
            yield
        except _Boto as exc:
            raise self._translate(exc, action, key) from exc

    def _translate(self, exc: Exception, action: str, key: str | None = None) -> StorageError:
        """The StorageError for ``exc``; messages name the bucket and key, never credentials."""
        where = f"bucket {self.bucket!r}" + (f", object {key!r}" if key else "")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            label = code or f"HTTP {status}"
            if status >= 500 or code in _RETRYABLE_CODES:
                return RetryableStorageError(
                    f"The object store failed to {action} ({where}): {label}. Try again.", code="storage_unavailable"
                )
            if code == "NoSuchBucket":
                return StorageError(
                    f"The bucket {self.bucket!r} does not exist; create it or fix GENLINE_STORAGE_URL.",
                    code="bucket_not_found",
                )
            if code in _NOT_FOUND_CODES:
                return StorageError(f"No object {key!r} in bucket {self.bucket!r}.", code="object_not_found")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"The object store rejected the credentials while trying to {action} ({where}); "
                    "check the AWS credentials genline runs with.",
                    code="storage_credentials_rejected",
                )
            if code == "AccessDenied" or status == 403:
                return StorageError(
                    f"Access denied while trying to {action} ({where}); check the bucket's policy and "
                    "the credentials' permissions.",
                    code="storage_access_denied",
                )
            return StorageError(f"The object store refused to {action} ({where}): {label}.", code="storage_rejected")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return StorageError(
                f"No usable AWS credentials to {action} ({where}); set them in boto3's usual places.",
                code="storage_no_credentials",
            )
        if isinstance(
            exc, (HTTPClientError, BotoConnectionError, IncompleteReadError, ChecksumError, FlexibleChecksumError)
        ):
            return RetryableStorageError(
                f"Could not reach the object store to {action} ({where}): {type(exc).__name__}. Try again.",
                code="storage_unreachable",
            )
        return StorageError(f"Could not {action} ({where}): {type(exc).__name__}.", code="storage_error")


class _MultipartUpload:
    """One multipart upload in progress: its parts' ETags and SHA-256 digests."""

    def __init__(self, store: S3ObjectStore, key: str, name: str, upload_id: str) -> None:
        self._store, self._key, self._name, self._upload_id = store, key, name, upload_id
        self._parts: list[dict[str, Any]] = []
        self._digests: list[bytes] = []
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-part")
        self._sending: Future[None] | None = None

    def send_part(self, body: bytearray) -> None:
        """Start uploading ``body`` as the next part and return once the part before it has been
        uploaded (its error, if any, is raised here): the caller may then reuse that part's buffer,
        never this one's until the next call returns."""
        self._wait()
        self._sending = self._sender.submit(self.add_part, body)

    def _wait(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.result()

    def add_part(self, body: bytearray) -> None:
        """Upload ``body`` as the next part; the buffer may be reused once this returns."""
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"Object {self._key!r} needs more than {MAX_PARTS} parts; raise the part size.", code="object_too_large"
            )
        digest = hashlib.sha256(body).digest()
        with self._store._boundary("upload a part of", self._key):
            response = self._store._client.upload_part(
                Bucket=self._store.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ChecksumSHA256=_b64(digest),
            )
        self._parts.append({"ETag": response["ETag"], "PartNumber": number, "ChecksumSHA256": _b64(digest)})
        self._digests.append(digest)

    def complete(self) -> str:
        """Finish the upload; returns the composite checksum S3 should report (``<b64>-<parts>``)."""
        try:
            self._wait()
        finally:
            self._sender.shutdown(wait=True)
        with self._store._boundary("finish the upload of", self._key):
            self._store._client.complete_multipart_upload(
                Bucket=self._store.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        return f"{_b64(hashlib.sha256(b''.join(self._digests)).digest())}-{len(self._digests)}"

    def abort(self) -> None:
        """Best effort: a failure is logged, never raised over the error that caused the abort.

        A bucket lifecycle rule (AbortIncompleteMultipartUpload) sweeps any upload left behind.
        """
        with suppress(Exception):  # the error that caused the abort is the one raised
            self._wait()  # a part still on its way would otherwise land after the abort
        self._sender.shutdown(wait=True)
        try:
            self._store._client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._name, UploadId=self._upload_id
            )
        except _Boto as exc:
            log.warning("multipart_abort_failed", bucket=self._store.bucket, key=self._key, error=type(exc).__name__)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
