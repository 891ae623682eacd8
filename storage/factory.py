"""The store a storage URL names: ``file:///abs/path`` (storage/local.py) or ``s3://bucket/prefix``
(storage/s3.py). Kept apart from the seam (storage/objects.py), which both backends import."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from genline.config.errors import ConfigError, StorageError
from genline.storage.local import LocalObjectStore
from genline.storage.objects import ObjectStore, key_problem


def open_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """The store named by ``url``: ``file:///abs/path`` or ``s3://bucket/optional/prefix``.

    ``endpoint_url`` and ``region`` only matter for S3 (an S3-compatible server such as MinIO or
    moto; None for AWS itself). Raises ``ConfigError`` for anything else. No network call is made.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _open_local(parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme == "s3":
        return _open_s3(parts.netloc, parts.path, parts.query, parts.fragment, endpoint_url, region)
    raise ConfigError(f"GENLINE_STORAGE_URL must be file:///path or s3://bucket/prefix (got scheme {scheme!r}).")


def _open_local(netloc: str, path: str, query: str, fragment: str) -> ObjectStore:
    if netloc not in ("", "localhost") or query or fragment:
        raise ConfigError("GENLINE_STORAGE_URL file:// must be a local path like file:///var/genline/objects.")
    root = Path(url2pathname(path))
    if not root.is_absolute():
        raise ConfigError("GENLINE_STORAGE_URL file:// must hold an absolute path, e.g. file:///var/genline/objects.")
    return LocalObjectStore(root)


def _open_s3(netloc: str, path: str, query: str, fragment: str, endpoint_url: str | None, region: str) -> ObjectStore:
    # Late: boto3 is imported only by a process that uses S3, not by every zero-setup command.
    from genline.storage.s3 import S3ObjectStore, make_s3_client, valid_bucket_name

    if "@" in netloc:
        raise ConfigError("GENLINE_STORAGE_URL must not carry credentials; use the AWS credential chain.")
    if not valid_bucket_name(netloc) or query or fragment:
        raise ConfigError("GENLINE_STORAGE_URL s3:// must name a valid bucket, e.g. s3://genline-outputs/videos.")
    prefix = path.strip("/")
    if prefix and key_problem(prefix) is not None:
        raise ConfigError(f"GENLINE_STORAGE_URL has an invalid key prefix {prefix!r}.")
    client = make_s3_client(endpoint_url=endpoint_url or None, region=region)
    return S3ObjectStore(netloc, prefix, client)


# The stable codes of a store genline cannot use (README, "When something is wrong").
BUCKET_MISSING = "bucket_missing"
STORAGE_CREDENTIALS_INVALID = "storage_credentials_invalid"
STORAGE_UNREACHABLE = "storage_unreachable"
# What a StorageError met at run time means for the operator's settings (``storage_config_error``).
_SETTINGS_CODES = {
    "bucket_not_found": BUCKET_MISSING,
    "storage_credentials_rejected": STORAGE_CREDENTIALS_INVALID,
    "storage_no_credentials": STORAGE_CREDENTIALS_INVALID,
}


def check_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> None:
    """Start-up check of the store ``url`` names: for S3, one HEAD of the bucket says whether it
    exists, the endpoint answers and the credentials work; a local folder needs no check (it is
    created on the first write). Raises ``ConfigError`` (``bucket_missing``,
    ``storage_credentials_invalid``, ``storage_unreachable``) naming GENLINE_STORAGE_URL."""
    open_store(url, endpoint_url=endpoint_url, region=region)  # a bad URL is refused the same way
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        return
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    from genline.storage.s3 import make_s3_client

    bucket = parts.netloc
    client = make_s3_client(endpoint_url=endpoint_url or None, region=region, max_attempts=2)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(exc.response.get("Error", {}).get("Code") or status)
        if status == 404 or code in ("NoSuchBucket", "NotFound", "404"):
            raise ConfigError(
                f"The bucket {bucket!r} (GENLINE_STORAGE_URL) does not exist at "
                f"{endpoint_url or 'AWS S3'}: create it, or fix GENLINE_STORAGE_URL or GENLINE_S3_ENDPOINT_URL.",
                code=BUCKET_MISSING,
            ) from exc
        if status in (401, 403):
            raise ConfigError(
                f"The object store refused genline's AWS credentials for the bucket {bucket!r} "
                f"(GENLINE_STORAGE_URL): HTTP {status} {code}; check the credentials and the bucket's policy.",
                code=STORAGE_CREDENTIALS_INVALID,
            ) from exc
        raise ConfigError(
            f"The object store could not look up the bucket {bucket!r} (GENLINE_STORAGE_URL): {code}.",
            code=STORAGE_UNREACHABLE,
        ) from exc
    except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as exc:
        raise ConfigError(
            f"No usable AWS credentials for the bucket {bucket!r} (GENLINE_STORAGE_URL); set them in "
            "boto3's usual places (environment, ~/.aws, an instance role).",
            code=STORAGE_CREDENTIALS_INVALID,
        ) from exc
    except BotoCoreError as exc:
        raise ConfigError(
            f"The object store at {endpoint_url or 'AWS S3'} cannot be reached to look up the bucket "
            f"{bucket!r} (GENLINE_STORAGE_URL, GENLINE_S3_ENDPOINT_URL): {type(exc).__name__}.",
            code=STORAGE_UNREACHABLE,
        ) from exc
    finally:
        client.close()


def storage_config_error(err: StorageError) -> ConfigError | None:
    """The settings' error behind a StorageError met at run time (a bucket that does not exist,
    credentials the store refuses), or None when it is not the settings' fault."""
    code = _SETTINGS_CODES.get(err.code)
    if code is None:
        return None
    return ConfigError(f"{err.message.rstrip('.')} (GENLINE_STORAGE_URL).", code=code)
