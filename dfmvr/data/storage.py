"""One storage API for shard roots: local directories and ``s3://bucket/prefix``.

Everything that reads or writes shards and manifests goes through these functions, so the same
code runs on a laptop (local directory) and on a cluster (any S3 API: AWS, MinIO, Ceph, moto).

S3 access is plain boto3:

- endpoint: the ``endpoint`` argument (``DataConfig.s3_endpoint``), else ``AWS_ENDPOINT_URL``,
  else the AWS default;
- credentials: the standard boto3 chain (environment, shared files, instance roles). They are
  never passed through this module and never logged;
- uploads (:func:`put_file`) are multipart above :attr:`TransferSettings.multipart_threshold`,
  retried by botocore (``standard`` mode) and again, whole, by our own loop with exponential
  backoff, then verified with ``head_object`` (size) before the caller may list the object;
- reads (:func:`open_read`) stream ``get_object(...)["Body"]``: nothing is downloaded to disk.

Importing this module registers :func:`gopen_s3` as ``webdataset.gopen_schemes["s3"]``. The
loader imports this module, so DataLoader worker processes (forked or spawned) have the scheme
too.

Local writes go to a temporary name in the destination directory and are renamed into place,
so a reader never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import webdataset

from dfmvr.config import check_at_least

_logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"


class StorageError(OSError):
    """A storage operation failed; the message names the URL and what was expected."""


@dataclass(kw_only=True, slots=True)
class TransferSettings:
    """How uploads to S3 are made and retried."""

    multipart_threshold: int = 64 << 20
    """Files at least this large (bytes) are uploaded in parts."""
    multipart_chunksize: int = 16 << 20
    """Part size in bytes (S3 needs >= 5 MiB for every part but the last)."""
    max_concurrency: int = 4
    """Parts uploaded at once."""
    attempts: int = 4
    """Whole-upload attempts by our own loop (botocore retries each request as well)."""
    backoff_s: float = 1.0
    """First wait between whole-upload attempts; doubles each time."""
    botocore_max_attempts: int = 5
    """Per-request attempts by botocore's ``standard`` retry mode."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for a TCP connection."""
    read_timeout_s: float = 60.0
    """Seconds to wait for a response."""

    def __post_init__(self) -> None:
        check_at_least("multipart_threshold", self.multipart_threshold, 1, " byte")
        if self.multipart_chunksize < 5 << 20:
            raise ValueError(f"multipart_chunksize: expected >= 5 MiB (S3 minimum part), got {self.multipart_chunksize}")
        if self.attempts < 1 or self.botocore_max_attempts < 1:
            raise ValueError(
                f"attempts/botocore_max_attempts: expected >= 1, got {self.attempts}, {self.botocore_max_attempts}"
            )
        check_at_least("backoff_s", self.backoff_s, 0)


def is_s3(url: str) -> bool:
    """Whether ``url`` is an ``s3://bucket/key`` URL."""
    return url.startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``.

    Raises:
        ValueError: when ``url`` is not an S3 URL or has no bucket.
    """
    if not is_s3(url):
        raise ValueError(f"{url!r}: expected an s3://bucket/key URL")
    bucket, _, key = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: expected a bucket name after s3://")
    return bucket, key


def join(root: str, name: str) -> str:
    """Join a root (local directory or ``s3://bucket/prefix``) and a relative name."""
    if is_s3(root):
        return root.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(root) / name)


def basename(url: str) -> str:
    """The file or object name of ``url`` (its last path part)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    """The directory or prefix holding ``url``."""
    if is_s3(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return str(Path(url).parent)


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint to use: ``endpoint`` if given, else ``AWS_ENDPOINT_URL``, else the AWS default."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


_clients: dict[tuple[int, str | None, int, float, float], object] = {}
_clients_lock = threading.Lock()
_session = None


def _boto3_session():
    """One boto3 session per process tree: its loaded service models survive a fork, which
    makes a DataLoader worker's first client about 5x cheaper (no sockets live in a session)."""
    global _session
    if _session is None:
        import boto3

        _session = boto3.session.Session()
    return _session


def s3_client(endpoint: str | None = None, *, settings: TransferSettings | None = None):
    """A boto3 S3 client for ``endpoint`` (cached per process: clients must not cross a fork).

    Credentials come from boto3's own chain; nothing here reads or logs them.
    """
    from botocore.config import Config

    settings = settings or TransferSettings()
    endpoint = resolve_endpoint(endpoint)
    cache_key = (
        os.getpid(),
        endpoint,
        settings.botocore_max_attempts,
        settings.connect_timeout_s,
        settings.read_timeout_s,
    )
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"max_attempts": settings.botocore_max_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                max_pool_connections=max(10, settings.max_concurrency * 2),
            )
            client = _boto3_session().client("s3", endpoint_url=endpoint, config=config)
            _clients[cache_key] = client
            _logger.debug("S3 client for endpoint %s (pid %d)", endpoint or "<aws default>", os.getpid())
    return client


def _error_code(exn: Exception) -> str:
    response = getattr(exn, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _describe(exn: Exception) -> str:
    """A one-line description of a boto/IO error (botocore messages carry no credentials)."""
    return f"{type(exn).__name__}: {exn}"


# --------------------------------------------------------------------------- reading

READ_BUFFER_BYTES = 1 << 20
"""Read-ahead of S3 streams: tarfile reads 10 KiB at a time, each a call into urllib3 otherwise."""


class _StreamingRaw(io.RawIOBase):
    """A botocore ``StreamingBody`` as a raw stream, so ``io.BufferedReader`` can read ahead."""

    def __init__(self, body) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_read(url: str, *, endpoint: str | None = None) -> BinaryIO:
    """Open ``url`` for streaming reads.

    For S3 this is ``get_object(...)["Body"]`` (a streaming body: bytes arrive as they are read,
    nothing touches the disk) behind a 1 MiB read-ahead buffer.

    Raises:
        FileNotFoundError: when the file or object does not exist (the message names the URL).
        StorageError: for any other failure, naming the URL.
    """
    if not is_s3(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
    bucket, key = split_s3(url)
    try:
        response = s3_client(endpoint).get_object(Bucket=bucket, Key=key)
    except Exception as exn:
        if _error_code(exn) in ("NoSuchKey", "404", "NoSuchBucket"):
            raise FileNotFoundError(f"{url}: no such object ({_error_code(exn)})") from None
        raise StorageError(f"{url}: read failed: {_describe(exn)}") from exn
    return io.BufferedReader(_StreamingRaw(response["Body"]), buffer_size=READ_BUFFER_BYTES)


def read_bytes(url: str, *, endpoint: str | None = None) -> bytes:
    """The whole content of ``url`` (for small files such as ``manifest.json``)."""
    stream = open_read(url, endpoint=endpoint)
    try:
        return stream.read()
    finally:
        stream.close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> BinaryIO:
    """webdataset opener for ``s3://`` URLs (registered in ``webdataset.gopen_schemes``).

    The endpoint comes from ``AWS_ENDPOINT_URL`` (webdataset passes no options through).
    """
    if not mode.startswith("r"):
        raise ValueError(f"{url}: the s3 gopen scheme only reads (mode {mode!r}); write with dfmvr.data.storage.put_file")
    return open_read(url)


webdataset.gopen_schemes["s3"] = gopen_s3


def exists(url: str, *, endpoint: str | None = None) -> bool:
    """Whether the file or object ``url`` exists."""
    if not is_s3(url):
        return Path(url).exists()
    bucket, key = split_s3(url)
    try:
        s3_client(endpoint).head_object(Bucket=bucket, Key=key)
    except Exception as exn:
        if _error_code(exn) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"{url}: head_object failed: {_describe(exn)}") from exn
    return True


def size(url: str, *, endpoint: str | None = None) -> int:
    """Size in bytes of the file or object ``url``."""
    if not is_s3(url):
        try:
            return Path(url).stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: no such file") from None
    bucket, key = split_s3(url)
    try:
        return int(s3_client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as exn:
        if _error_code(exn) in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{url}: no such object") from None
        raise StorageError(f"{url}: head_object failed: {_describe(exn)}") from exn


def list_urls(prefix: str, *, endpoint: str | None = None, recursive: bool = False) -> list[str]:
    """Every file or object directly under a directory / prefix (at any depth with ``recursive``),
    sorted, as full URLs."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file())
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    urls: list[str] = []
    try:
        paginator = s3_client(endpoint).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, **({} if recursive else {"Delimiter": "/"})):
            urls.extend(f"{S3_SCHEME}{bucket}/{item['Key']}" for item in page.get("Contents", []))
    except Exception as exn:
        raise StorageError(f"{prefix}: listing failed: {_describe(exn)}") from exn
    return sorted(urls)


# --------------------------------------------------------------------------- writing


def _local_put(local_path: str, url: str) -> None:
    destination = Path(url)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_file(
    local_path: str | os.PathLike,
    url: str,
    *,
    endpoint: str | None = None,
    settings: TransferSettings | None = None,
) -> int:
    """Copy a local file to ``url`` and verify it arrived whole.

    Local destinations: copied to a temporary name beside the destination, then renamed.
    S3: ``upload_file`` with a ``TransferConfig`` (multipart above the threshold), retried
    whole with exponential backoff, then ``head_object`` must report the local size.

    Args:
        local_path: the finished file.
        url: destination path or ``s3://bucket/key``.
        endpoint: S3 endpoint (see :func:`resolve_endpoint`).
        settings: multipart and retry settings.

    Returns:
        The number of bytes stored.

    Raises:
        StorageError: when every attempt failed or the stored size differs; names the URL and
            the last error, never credentials.
    """
    local_path = str(local_path)
    expected = os.path.getsize(local_path)
    if not is_s3(url):
        _local_put(local_path, url)
        return expected

    from boto3.s3.transfer import TransferConfig

    settings = settings or TransferSettings()
    bucket, key = split_s3(url)
    transfer = TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
    )
    last_error: Exception | None = None
    for attempt in range(1, settings.attempts + 1):
        try:
            client = s3_client(endpoint, settings=settings)
            client.upload_file(local_path, bucket, key, Config=transfer)
            stored = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            if stored != expected:
                raise StorageError(f"{url}: stored size {stored} bytes, expected {expected} bytes")
            if attempt > 1:
                _logger.info("uploaded %s on attempt %d", url, attempt)
            return expected
        except Exception as exn:
            last_error = exn
            if attempt < settings.attempts:
                wait = settings.backoff_s * 2 ** (attempt - 1)
                _logger.warning(
                    "upload of %s failed (attempt %d/%d): %s; retrying in %.1f s",
                    url, attempt, settings.attempts, _describe(exn), wait,
                )
                time.sleep(wait)
    assert last_error is not None
    raise StorageError(
        f"{url}: upload failed after {settings.attempts} attempts: {_describe(last_error)}"
    ) from last_error


def write_bytes(
    url: str,
    data: bytes,
    *,
    endpoint: str | None = None,
    settings: TransferSettings | None = None,
) -> None:
    """Write ``data`` to ``url`` atomically (temp file + rename locally, verified upload on S3)."""
    with tempfile.NamedTemporaryFile(prefix="dfmvr-", suffix=".tmp", delete=False) as handle:
        handle.write(data)
        tmp = handle.name
    try:
        put_file(tmp, url, endpoint=endpoint, settings=settings)
    finally:
        Path(tmp).unlink(missing_ok=True)


def delete(url: str, *, endpoint: str | None = None) -> None:
    """Remove a file or object (missing is not an error)."""
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_s3(url)
    try:
        s3_client(endpoint).delete_object(Bucket=bucket, Key=key)
    except Exception as exn:
        raise StorageError(f"{url}: delete failed: {_describe(exn)}") from exn


def iter_chunks(stream: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Read a stream in chunks (for hashing shards without holding them whole)."""
    while True:
        block = stream.read(chunk)
        if not block:
            return
        yield block


def sha256_and_size(url: str, *, endpoint: str | None = None) -> tuple[str, int]:
    """sha256 hex digest and byte count of ``url``, streamed (never held whole).

    Raises:
        FileNotFoundError / StorageError: as :func:`open_read`.
    """
    digest, size = hashlib.sha256(), 0
    with open_read(url, endpoint=endpoint) as stream:
        for block in iter_chunks(stream):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


__all__ = [
    "basename",
    "StorageError",
    "TransferSettings",
    "delete",
    "exists",
    "gopen_s3",
    "is_s3",
    "iter_chunks",
    "join",
    "list_urls",
    "open_read",
    "parent",
    "put_file",
    "read_bytes",
    "resolve_endpoint",
    "s3_client",
    "sha256_and_size",
    "size",
    "split_s3",
    "write_bytes",
]
