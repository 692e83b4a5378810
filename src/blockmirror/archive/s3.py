"""The object store of an S3 archive: its URL, its credentials and an asyncio client.

:class:`S3Store` runs boto3 (a blocking library) in a private, bounded thread pool, so a slow or
dead endpoint occupies those threads and never the event loop. Every botocore error leaves this
module as an :class:`ArchiveStoreError` subclass naming the operation, the key and the S3 error
code; callers decide by class (:class:`StoreDenied`, :class:`StoreFull`, :class:`StoreUnavailable`,
:class:`ObjectExists`, :class:`ObjectMissing`) and never see botocore.

boto3 has no type information: ``Any`` stays inside this module.

Why one module: the URL, the credentials and the client are the three halves of "talking to one
S3 store", and this is the one module that imports boto3 or botocore: the error translation,
the multipart logic and the retry settings must all see the same botocore types.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import configparser
import datetime as dt
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import boto3.session
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from blockmirror.errors import ArchiveError

__all__ = [
    "ArchiveStoreError",
    "ArchiveUrl",
    "Credentials",
    "ObjectExists",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectStore",
    "S3Store",
    "StoreDenied",
    "StoreFull",
    "StoreUnavailable",
    "load_credentials",
    "parse_url",
]

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
MIN_PART_SIZE: Final = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS: Final = 10_000  # S3's maximum number of parts of one upload
DELETE_BATCH: Final = 1000  # S3's maximum number of keys of one DeleteObjects

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# -- errors ---------------------------------------------------------------------------------------


class ArchiveStoreError(ArchiveError):
    """The object store refused or failed an operation, or its URL or credentials are unusable.

    ``operation``, ``key`` and ``code`` (the S3 error code, or the botocore exception's name) are
    set when the error comes from a request.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        key: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.key = key
        self.code = code


class ObjectExists(ArchiveStoreError):
    """A conditional put found the key taken (HTTP 412, or 409 ConditionalRequestConflict).

    A put that was retried after its response was lost meets its own first attempt here too: a
    caller that must know compares the stored object with what it meant to write.
    """


class ObjectMissing(ArchiveStoreError):
    """The key does not exist (NoSuchKey)."""


class StoreDenied(ArchiveStoreError):
    """The credentials are not allowed to do this (AccessDenied, or a bare 403)."""


class StoreFull(ArchiveStoreError):
    """The store has no room or the account's quota is used up."""


class StoreUnavailable(ArchiveStoreError):
    """The endpoint cannot be reached, timed out, or answered with a server error (5xx)."""


# -- the URL --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveUrl:
    """``s3://BUCKET/PREFIX``: ``prefix`` has no leading or trailing slash and may be empty."""

    bucket: str
    prefix: str

    def key(self, rel: str) -> str:
        """The full key of ``rel`` (relative to the prefix). ``key("")`` is the prefix itself with
        a trailing slash (empty without a prefix): the list prefix of everything in the archive."""
        if rel.startswith("/"):
            raise ArchiveStoreError(f"relative key {rel!r} must not start with '/'")
        if not self.prefix:
            return rel
        return f"{self.prefix}/{rel}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def check_bucket(bucket: str) -> str:
    """``bucket`` if it is a valid S3 bucket name (3 to 63 of a-z, 0-9, '.', '-', starting and
    ending with a letter or digit), else :class:`ArchiveStoreError`."""
    if not _BUCKET.fullmatch(bucket):
        raise ArchiveStoreError(
            f"bad bucket name {bucket!r}: 3 to 63 characters of a-z, 0-9, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


def parse_url(url: str) -> ArchiveUrl:
    """``s3://bucket/some/prefix`` as an :class:`ArchiveUrl`; anything else raises
    :class:`ArchiveStoreError` saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "s3":
        raise ArchiveStoreError(f"archive URL {url!r} must look like s3://BUCKET/PREFIX")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ArchiveStoreError(f"archive URL {url!r} names no bucket")
    check_bucket(bucket)
    prefix = prefix.strip("/")
    if prefix:
        # Empty, "." and ".." segments are legal in S3 keys but almost always a typo, and they
        # make the same archive reachable under two spellings.
        bad = [s for s in prefix.split("/") if s in ("", ".", "..")]
        if bad:
            raise ArchiveStoreError(
                f"archive URL {url!r}: the prefix has an empty, '.' or '..' segment"
            )
        if any(ord(c) < 0x20 or c == "\x7f" for c in prefix):
            raise ArchiveStoreError(f"archive URL {url!r}: the prefix has a control character")
    return ArchiveUrl(bucket, prefix)


# -- credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An access key. The secret and the session token stay out of ``repr`` (and so out of logs
    and tracebacks that print the object)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def load_credentials(
    path: Path | None,
    *,
    profile: str = "default",
    environ: Mapping[str, str] = os.environ,
) -> Credentials:
    """The credentials from the AWS shared credentials file ``path`` (section ``[profile]``:
    ``aws_access_key_id``, ``aws_secret_access_key``, optional ``aws_session_token``); without a
    path from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, else from
    the file named by ``AWS_SHARED_CREDENTIALS_FILE``. Blocking (it reads a file).

    ``~/.aws/credentials`` is deliberately not a fallback: a daemon must not pick up whatever key
    its user happens to have.
    """
    if path is not None:
        return _read_credentials_file(Path(path), profile)
    key_id = environ.get("AWS_ACCESS_KEY_ID")
    secret = environ.get("AWS_SECRET_ACCESS_KEY")
    if key_id or secret:
        if not key_id or not secret:
            missing = "AWS_ACCESS_KEY_ID" if not key_id else "AWS_SECRET_ACCESS_KEY"
            raise ArchiveStoreError(
                f"{missing} is not set (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together)"
            )
        return Credentials(key_id, secret, environ.get("AWS_SESSION_TOKEN") or None)
    shared = environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if shared:
        return _read_credentials_file(Path(shared), profile)
    raise ArchiveStoreError(
        "no S3 credentials: give a credentials file, or set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE"
    )


def _read_credentials_file(path: Path, profile: str) -> Credentials:
    try:
        # Checked before opening: opening a FIFO by mistake would block until a writer comes.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ArchiveStoreError(f"credentials file {path} is not a regular file")
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except FileNotFoundError:
        raise ArchiveStoreError(f"credentials file {path} does not exist") from None
    except OSError as exc:
        raise ArchiveStoreError(f"credentials file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        # A warning, not a refusal: the key may be read-only or the directory closed off, and
        # refusing would stop an archive over a mode the operator can fix later.
        log.warning(
            "credentials file %s is readable by group or others (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    try:
        text = raw.decode("utf-8-sig")  # editors on other systems may add a BOM
    except UnicodeDecodeError as exc:
        raise ArchiveStoreError(
            f"credentials file {path} is not UTF-8 (byte {exc.start})"
        ) from None
    # No interpolation: a secret may contain '%'.
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    try:
        parser.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as exc:
        # configparser's own messages quote the offending line, which may be the secret: say
        # only where it is.
        raise ArchiveStoreError(
            f"credentials file {path}, line {exc.lineno}: a key before any [section]"
        ) from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(n) for n, _ in exc.errors)
        raise ArchiveStoreError(
            f"credentials file {path}: cannot parse line(s) {lines} (want KEY = VALUE)"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ArchiveStoreError(
            f"credentials file {path}, line {exc.lineno}: section [{exc.section}] twice"
        ) from None
    except configparser.DuplicateOptionError as exc:
        raise ArchiveStoreError(
            f"credentials file {path}, line {exc.lineno}: {exc.option} twice in [{exc.section}]"
        ) from None
    except configparser.Error as exc:
        raise ArchiveStoreError(
            f"credentials file {path} cannot be parsed ({type(exc).__name__})"
        ) from None
    if not parser.has_section(profile):
        raise ArchiveStoreError(f"credentials file {path} has no [{profile}] section")
    section = parser[profile]
    values: dict[str, str] = {}
    for name in ("aws_access_key_id", "aws_secret_access_key"):
        value = section.get(name, "").strip()
        if not value:
            raise ArchiveStoreError(f"credentials file {path}: [{profile}] has no {name}")
        values[name] = value
    token = section.get("aws_session_token", "").strip() or None
    return Credentials(values["aws_access_key_id"], values["aws_secret_access_key"], token)


# -- the store ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its full ``key``, ``size`` in bytes, ``etag`` (without the quotes) and
    the time of its last change in nanoseconds since the epoch."""

    key: str
    size: int
    etag: str
    last_modified_ns: int


class ObjectStore(Protocol):
    """What an archive needs of an object store. Keys are full keys (prefix included)."""

    async def put(self, key: str, data: bytes | memoryview, *, if_none_match: bool = False) -> str:
        """Store ``data`` under ``key``; returns the ETag. ``if_none_match``: only if ``key`` does
        not exist yet, else :class:`ObjectExists`."""
        ...

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The object, or bytes ``[start, end)`` of it; :class:`ObjectMissing` if absent."""
        ...

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in S3's key order."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (absent keys are no error)."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's metadata, or None if absent."""
        ...

    def close(self) -> None:
        """Release the client's threads and connections."""
        ...


def _strip_etag(etag: Any) -> str:
    return str(etag or "").strip('"')


def _ns(when: Any) -> int:
    """botocore's LastModified (an aware datetime) as integer nanoseconds, without float."""
    if not isinstance(when, dt.datetime):
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int((when - _EPOCH) // dt.timedelta(microseconds=1)) * 1000


# S3 error codes by the class they map to (HEAD answers carry no body: only the status, as code).
_DENIED_CODES: Final = frozenset({"AccessDenied", "AllAccessDisabled", "403", "Forbidden"})
_FULL_CODES: Final = frozenset({"QuotaExceeded", "InsufficientStorage", "507"})
_UNAVAILABLE_CODES: Final = frozenset(
    {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout"}
)
_MISSING_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})
_CONDITIONAL_OPS: Final = frozenset({"put_object", "complete_multipart_upload"})


def _client_error(op: str, key: str | None, bucket: str, exc: Any) -> ArchiveStoreError:
    """The ArchiveStoreError for a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = str(error.get("Code") or "Unknown")
    status = int(meta.get("HTTPStatusCode") or 0)
    text = str(error.get("Message") or "").strip()
    where = f"S3 {op}" + (f" of {key!r}" if key is not None else "") + f" in bucket {bucket!r}"
    message = f"{where} failed: {code} (HTTP {status})" + (f": {text}" if text else "")
    cls: type[ArchiveStoreError] = ArchiveStoreError
    if code == "NoSuchBucket":
        message = f"bucket {bucket!r} does not exist ({where}: NoSuchBucket)"
    elif op in _CONDITIONAL_OPS and (
        code == "PreconditionFailed" or status == 412 or code == "ConditionalRequestConflict"
    ):
        cls = ObjectExists
    elif code in _MISSING_CODES:
        cls = ObjectMissing
    elif code in _DENIED_CODES:
        cls = StoreDenied
    elif code in _FULL_CODES or "Quota" in code or status == 507:
        cls = StoreFull
    elif code in _UNAVAILABLE_CODES or status >= 500:
        cls = StoreUnavailable
    return cls(message, operation=op, key=key, code=code)


def _transport_error(op: str, key: str | None, bucket: str, exc: Exception) -> ArchiveStoreError:
    """The ArchiveStoreError for a failure below HTTP (or botocore's own refusal)."""
    where = f"S3 {op}" + (f" of {key!r}" if key is not None else "") + f" in bucket {bucket!r}"
    code = type(exc).__name__
    message = f"{where} failed: {code}: {exc}"
    if isinstance(exc, botocore.exceptions.SSLError):
        # A certificate problem is configuration, not an outage: retrying will not help.
        return ArchiveStoreError(message, operation=op, key=key, code=code)
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError
        | urllib3.exceptions.HTTPError
        | OSError,
    ):
        return StoreUnavailable(message, operation=op, key=key, code=code)
    return ArchiveStoreError(message, operation=op, key=key, code=code)


class S3Store:
    """An :class:`ObjectStore` on one S3 bucket, through boto3 in a private thread pool.

    ``max_workers`` bounds the threads (and the HTTP connections) of this store; a multipart
    upload uses at most ``part_concurrency`` of them, so one large put leaves room for others.
    Objects larger than ``multipart_threshold`` are uploaded in parts of ``part_size``.
    ``connect_timeout`` and ``read_timeout`` (seconds) apply to each attempt; botocore makes up
    to ``max_attempts`` attempts per call (standard retry mode, with backoff).

    Counters (read on the event loop thread, which alone changes them): ``requests`` (S3 calls
    issued; botocore's retries inside one call are not counted), ``errors`` (calls that failed;
    :class:`ObjectMissing` and :class:`ObjectExists` are answers, not failures),
    ``bytes_uploaded`` and ``objects_uploaded`` (completed puts, multipart parts counted as they
    complete).
    """

    def __init__(
        self,
        bucket: str,
        credentials: Credentials,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        path_style: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        max_workers: int = 8,
        part_concurrency: int = 4,
        multipart_threshold: int = 16 * MiB,
        part_size: int = 16 * MiB,
        list_page_size: int = 1000,
    ) -> None:
        self.bucket = check_bucket(bucket)
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        if multipart_threshold < 1 or max_workers < 1 or part_concurrency < 1:
            raise ValueError("multipart_threshold, max_workers and part_concurrency must be >= 1")
        if not 1 <= list_page_size <= 1000:
            raise ValueError("list_page_size must be within 1..1000")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.endpoint = endpoint
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.part_concurrency = min(part_concurrency, max_workers)
        self.list_page_size = list_page_size
        self.bytes_uploaded = 0
        self.objects_uploaded = 0
        self.requests = 0
        self.errors = 0
        config = Config(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # One connection per thread: a smaller pool would make threads wait for one and log
            # "connection pool is full".
            max_pool_connections=max_workers,
            # botocore >= 1.36 adds CRC checksums to every upload by default, which some
            # S3-compatible stores refuse: send and check them only where S3 requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # An own session: boto3's default one is global state shared with anything else in the
        # process. Explicit keys keep botocore's credential chain (instance metadata, ~/.aws)
        # from being consulted.
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
            region_name=region,
        )
        # Created once and shared by the threads: boto3 clients are thread-safe (sessions are
        # not, which is why nothing else touches the session after this).
        self._client: Any = session.client("s3", endpoint_url=endpoint, config=config)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"s3-{bucket}"
        )
        self._closed = False
        self._inflight = 0  # calls submitted and not yet settled on the loop

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint={self.endpoint!r})"

    # -- plumbing: one S3 call in a worker thread, errors translated there ---------------------

    def _invoke(self, op: str, key: str | None, fn: Callable[[], Any]) -> Any:
        """Runs in a worker thread: ``fn`` (one boto3 call and, for a get, reading its body)."""
        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            raise _client_error(op, key, self.bucket, exc) from exc
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _transport_error(op, key, self.bucket, exc) from exc

    def _submit(self, op: str, key: str | None, fn: Callable[[], Any]) -> _Running:
        """``fn`` in the pool; counters change on the loop thread only (in done callbacks)."""
        if self._closed:
            raise ArchiveStoreError(f"S3 {op} on a closed store", operation=op, key=key)
        self.requests += 1
        self._inflight += 1
        thread = self._executor.submit(self._invoke, op, key, fn)
        future = asyncio.wrap_future(thread)

        def settled(done: asyncio.Future[Any]) -> None:
            self._inflight -= 1
            if not done.cancelled() and not isinstance(
                done.exception(), ObjectMissing | ObjectExists | None
            ):
                self.errors += 1
            if self._closed and self._inflight == 0:
                self._client.close()

        future.add_done_callback(settled)
        return _Running(future, thread)

    async def _call(self, op: str, key: str | None, fn: Callable[[], Any]) -> Any:
        return await self._submit(op, key, fn).future

    # -- the operations ---------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | memoryview, *, if_none_match: bool = False) -> str:
        """Store ``data`` under ``key``; returns the ETag (without quotes). ``data`` must not
        change until this returns. With ``if_none_match`` only if ``key`` is free, else
        :class:`ObjectExists`."""
        if not key:
            raise ArchiveStoreError("S3 put of an empty key", operation="put_object", key=key)
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > self.multipart_threshold:
            # Cast to bytes: slicing must count bytes whatever the caller's item format is.
            view = memoryview(data).cast("B")
            return await self._put_multipart(key, view, if_none_match=if_none_match)
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}

        def put() -> Any:
            # botocore takes bytes or a file, not a memoryview; the copy is made here, off the
            # event loop.
            body = data if isinstance(data, bytes) else bytes(data)
            return self._client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)

        response = await self._call("put_object", key, put)
        self.bytes_uploaded += size
        self.objects_uploaded += 1
        return _strip_etag(response.get("ETag"))

    async def _put_multipart(self, key: str, data: memoryview, *, if_none_match: bool) -> str:
        size = data.nbytes
        offsets = range(0, size, self.part_size)
        if len(offsets) > MAX_PARTS:
            raise ArchiveStoreError(
                f"S3 put of {key!r}: {size} bytes need {len(offsets)} parts of {self.part_size}, "
                f"more than S3's {MAX_PARTS}",
                operation="upload_part",
                key=key,
            )
        created = await self._call(
            "create_multipart_upload",
            key,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=key),
        )
        upload_id = str(created["UploadId"])
        etags: dict[int, str] = {}
        pending: dict[asyncio.Future[Any], _Part] = {}
        try:
            for number, offset in enumerate(offsets, 1):
                while len(pending) >= self.part_concurrency:
                    await self._reap(pending, etags)
                length = min(self.part_size, size - offset)
                running = self._submit_part(key, upload_id, number, data, offset, length)
                pending[running.future] = _Part(number, length, running.thread)
            while pending:
                await self._reap(pending, etags)
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
            response = await self._call(
                "complete_multipart_upload",
                key,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **extra,
                ),
            )
        except BaseException:
            await self._abort_multipart(key, upload_id, pending)
            raise
        self.objects_uploaded += 1
        return _strip_etag(response.get("ETag"))

    def _submit_part(
        self, key: str, upload_id: str, number: int, data: memoryview, offset: int, length: int
    ) -> _Running:
        def upload() -> Any:
            body = bytes(data[offset : offset + length])  # copied in the worker, not the loop
            return self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )

        return self._submit("upload_part", key, upload)

    async def _reap(self, pending: dict[asyncio.Future[Any], _Part], etags: dict[int, str]) -> None:
        """Wait for one or more parts; record their ETags, raise the first failure."""
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            part = pending.pop(future)
            response = future.result()
            etags[part.number] = str(response["ETag"])
            self.bytes_uploaded += part.length

    async def _abort_multipart(
        self, key: str, upload_id: str, pending: dict[asyncio.Future[Any], _Part]
    ) -> None:
        # Parts still being sent finish first: a part that lands after the abort would be kept
        # (and billed) by S3 as an orphan of the aborted upload. Cancelling the thread's future
        # stops only parts not started; cancelling the asyncio one would stop nothing and just
        # stop waiting.
        for part in pending.values():
            part.thread.cancel()
        if pending:
            await asyncio.wait(pending)
        for future in pending:
            if not future.cancelled():
                future.exception()  # retrieved: the first failure is the one raised
        try:
            await self._call(
                "abort_multipart_upload",
                key,
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ),
            )
        except ArchiveStoreError as exc:
            log.warning("could not abort the multipart upload of %r: %s", key, exc)

    async def get(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """The object under ``key``, or its bytes ``[start, end)`` (``end`` exclusive, as in a
        slice; a range reaching past the object's end is cut short by S3). Absent:
        :class:`ObjectMissing`."""
        extra: dict[str, Any] = {}
        if start is not None or end is not None:
            first = start or 0
            if first < 0 or (end is not None and end < first):
                raise ValueError(f"bad range [{start}, {end}) of {key!r}")
            if end == first:
                return b""
            extra["Range"] = f"bytes={first}-" if end is None else f"bytes={first}-{end - 1}"

        def get() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=key, **extra)
            # The body is read in the worker too: reading it is where a slow store blocks.
            body: bytes = response["Body"].read()
            return body

        result: bytes = await self._call("get_object", key, get)
        return result

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (full keys), all pages."""
        found: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            extra: dict[str, Any] = {"ContinuationToken": token} if token else {}

            def page(extra: dict[str, Any] = extra) -> Any:
                return self._client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=self.list_page_size, **extra
                )

            response = await self._call("list_objects_v2", prefix, page)
            found.extend(
                ObjectInfo(
                    key=str(item["Key"]),
                    size=int(item.get("Size", 0)),
                    etag=_strip_etag(item.get("ETag")),
                    last_modified_ns=_ns(item.get("LastModified")),
                )
                for item in response.get("Contents", ())
            )
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return found

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys``, 1000 per request; a key S3 refuses raises (after its batch)."""
        for at in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[at : at + DELETE_BATCH]]
            first = batch[0]["Key"]

            def delete(batch: builtins.list[dict[str, str]] = batch) -> Any:
                return self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

            response = await self._call("delete_objects", first, delete)
            errors = response.get("Errors") or []
            if errors:
                self.errors += 1
                raise self._delete_error(errors)

    def _delete_error(self, errors: builtins.list[Any]) -> ArchiveStoreError:
        head = errors[0]
        code = str(head.get("Code") or "Unknown")
        key = str(head.get("Key") or "")
        shown = ", ".join(f"{e.get('Key')!r}: {e.get('Code')}" for e in errors[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        message = (
            f"S3 delete_objects in bucket {self.bucket!r}: {len(errors)} key(s) not deleted "
            f"({shown}{more})"
        )
        cls: type[ArchiveStoreError] = ArchiveStoreError
        if code in _DENIED_CODES:
            cls = StoreDenied
        elif code in _UNAVAILABLE_CODES:
            cls = StoreUnavailable
        return cls(message, operation="delete_objects", key=key, code=code)

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and time, or None when there is no such key."""
        try:
            response = await self._call(
                "head_object", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
            )
        except ObjectMissing:
            return None
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            etag=_strip_etag(response.get("ETag")),
            last_modified_ns=_ns(response.get("LastModified")),
        )

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and tools; a unit never does)."""
        try:
            await self._call(
                "head_bucket", None, lambda: self._client.head_bucket(Bucket=self.bucket)
            )
            return
        except ObjectMissing:
            pass  # HEAD answers 404 without a body: code "404"
        except ArchiveStoreError as exc:
            if exc.code != "NoSuchBucket":
                raise
        extra: dict[str, Any] = {}
        if self.region != "us-east-1":
            # us-east-1 is the one region that refuses an explicit location constraint.
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._call(
                "create_bucket",
                None,
                lambda: self._client.create_bucket(Bucket=self.bucket, **extra),
            )
        except ArchiveStoreError as exc:
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def close(self) -> None:
        """Refuse new calls, drop queued ones and let the threads end; the connections close
        once the calls in progress have settled. Does not block: a call in progress may take up
        to its timeouts, and close() is called from the event loop."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._inflight == 0:
            self._client.close()


@dataclass(frozen=True)
class _Running:
    """A call in the pool: the loop's view of it and the thread's (only the latter can be
    cancelled for real, and only before it starts)."""

    future: asyncio.Future[Any]
    thread: concurrent.futures.Future[Any]


@dataclass(frozen=True)
class _Part:
    number: int
    length: int
    thread: concurrent.futures.Future[Any]
