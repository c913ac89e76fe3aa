"""URIs: every input and output is a local path, file://, s3:// or any fsspec protocol.

S3 settings come from the standard AWS environment/profile; ``SEGCORE_S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL``) points s3:// at MinIO, Ceph or a test server.

Retries on S3 are bounded and explicit (docs/RELIABILITY.md): botocore retries each request
(5xx, SlowDown, connection errors) up to ``S3_MAX_ATTEMPTS`` attempts in all, in its
"standard" mode (jittered exponential back-off, and a retry quota that stops retrying when
most requests fail); s3fs adds ``S3FS_RETRIES`` tries of its own around each call (SlowDown
and connection errors once botocore gave up, and bodies cut short, which botocore does not
retry). Left at the libraries' defaults, one request to a dead endpoint took up to 250
attempts and 3 minutes. Each retry is logged as a WARNING ("S3 retry: ...", from
``botocore.retries.standard`` and ``s3fs``, which log them at DEBUG: :func:`report_retries`);
what still fails is a StorageError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from segcore.errors import ConfigError, InputError, SegcoreError, StorageError

S3_MAX_ATTEMPTS = 3  # botocore: attempts per request, first included (SEGCORE_S3_MAX_ATTEMPTS)
S3FS_RETRIES = 2  # s3fs: tries around each call and each body read (its default is 5)


def s3_max_attempts() -> int:
    env = os.environ.get("SEGCORE_S3_MAX_ATTEMPTS")
    if not env:
        return S3_MAX_ATTEMPTS
    if not env.strip().isdigit() or int(env) < 1:
        raise ConfigError(f"SEGCORE_S3_MAX_ATTEMPTS={env!r} must be a whole number >= 1 "
                          f"(attempts per S3 request; default {S3_MAX_ATTEMPTS})")
    return int(env)


# Credentials never reach a log (docs/RELIABILITY.md, secrets). At DEBUG botocore logs each
# request's headers ("botocore.endpoint": Authorization with the access key id, and
# X-Amz-Security-Token), the canonical request ("botocore.auth": the session token) and error
# bodies ("botocore.parsers"): the loggers one enables to see retries, and the ones Prefect
# ships to its API when listed in PREFECT_LOGGING_EXTRA_LOGGERS. Their records are redacted.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
REDACTED = "***"
_CREDENTIAL_PATTERNS = (
    re.compile(r"(?i)((?:x-amz-)?credential=)([^/%\s,'\"&]+)"),  # access key id, then /date/...
    re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)([^\s,'\"&]+)"),
)
_REDACTED_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.parsers",
                     "aiobotocore.endpoint")


def redact(text: str) -> str:
    """``text`` without the AWS credentials of this process's environment, and without any
    access key id or session token in the forms botocore prints (headers, canonical request)."""
    for name in CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    for pattern in _CREDENTIAL_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactCredentials(logging.Filter):
    """A logger filter that rewrites a record's message with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def guard_credential_logs() -> None:
    """Install :class:`RedactCredentials` on botocore's request loggers (once; cheap: a
    logger's filters run only for records it emits, and these emit only at DEBUG). Done when
    this module is imported, so in every process that imports segcore's I/O (CLI, flows, Dask
    workers), before any S3 client exists; importing botocore is not needed for it."""
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactCredentials) for f in logger.filters):
            logger.addFilter(RedactCredentials())


guard_credential_logs()

# Retries are worth a warning: a scene that completes through storage faults should say so.
# botocore and s3fs log their retries at DEBUG only, beside a record of every request.
_RETRY_LOGGERS = {
    "botocore.retries.standard": ("Retry needed",),
    "s3fs": ("Retryable error", "Client error (maybe retryable)"),
}


class RetriesAsWarnings(logging.Filter):
    """On a storage client's logger: its retry records become WARNINGs ("S3 retry: ...",
    credentials redacted); with ``quiet``, its other DEBUG/INFO records are dropped, as they
    were before the logger's level was lowered to see the retries. s3fs's "maybe retryable"
    client errors count only for SlowDown (a missing key is not a retry). ``quiet``: the
    logger whose level segcore lowered, whose other records pass only at the level it would
    have inherited."""

    def __init__(self, prefixes: tuple[str, ...], quiet: logging.Logger | None):
        super().__init__()
        self.prefixes, self.quiet = prefixes, quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = str(record.msg)
        if msg.startswith(self.prefixes):
            text = redact(record.getMessage())
            if not msg.startswith("Client error") or "SlowDown" in text:
                record.msg, record.args = f"S3 retry: {text}", None
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                return True
        # a record the logger would not have emitted at its inherited level stays dropped
        return self.quiet is None or record.levelno >= self.quiet.parent.getEffectiveLevel()


def report_retries() -> None:
    """Install :class:`RetriesAsWarnings` on botocore's retry logger and s3fs's logger (once).
    A logger the user left unset is lowered to DEBUG so that its retry records exist, and its
    other low-level records are dropped; a logger the user set keeps its level and records."""
    for name, prefixes in _RETRY_LOGGERS.items():
        logger = logging.getLogger(name)
        if any(isinstance(f, RetriesAsWarnings) for f in logger.filters):
            continue
        quiet = logger.level == logging.NOTSET
        if quiet:
            logger.setLevel(logging.DEBUG)
        logger.addFilter(RetriesAsWarnings(prefixes, logger if quiet else None))


report_retries()


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` taken from the environment (endpoint for s3), with bounded
    retries for s3."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("SEGCORE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"config_kwargs": {"retries": {
            "mode": "standard", "total_max_attempts": s3_max_attempts()}}}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def bound_retries(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """Set s3fs's own retry count on ``fs`` (an instance attribute: s3fs takes no option for
    it); other filesystems are returned unchanged."""
    protocol = getattr(fs, "protocol", ())
    if "s3" in (protocol if isinstance(protocol, tuple) else (protocol,)) and \
            hasattr(fs, "retries"):
        fs.retries = S3FS_RETRIES
    return fs


def storage_error_types() -> tuple[type[BaseException], ...]:
    """What a storage client raises when the storage failed: OSError, and the S3 client's own
    transport errors, which are not OSErrors (botocore's ConnectionClosedError after its
    retries, aiohttp's ClientPayloadError for a body cut short). Those libraries are only
    looked up if already loaded: if they are not, nothing can have raised their errors."""
    types: list[type[BaseException]] = [OSError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError")):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            types.append(getattr(mod, name))
    return tuple(types)


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a URI. An object-store URI with '.' or '..' segments
    is refused: object keys are not paths, nothing resolves them consistently (S3 stores the
    key 'out/../x' as it is, a local mirror of the bucket resolves it outside the prefix)."""
    if not is_local(uri) and any(seg in (".", "..") for seg in uri.split("://", 1)[1].split("/")):
        raise InputError(f"{uri}: '.' and '..' segments are not allowed in an object-store URI "
                         "(keys are not paths: it would escape its prefix in some tools and "
                         "not in others); write the prefix out without them")
    try:
        fs, path = url_to_fs(uri, **storage_options(uri))
    except (ImportError, ValueError) as e:
        raise InputError(f"{uri}: unsupported URI ({e}); use a local path, file:// or s3:// "
                         "(or install the fsspec backend for this scheme)") from e
    return bound_retries(fs), path


def storage_failure(uri: str, what: str, e: BaseException) -> SegcoreError:
    """The segcore error for a storage client's failure ``e`` while doing ``what`` on ``uri``:
    missing credentials are the caller's to fix (ConfigError, not retried), anything else is a
    StorageError. Messages carry the client's text, never a credential (docs/RELIABILITY.md)."""
    mod = sys.modules.get("botocore.exceptions")
    names = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
    creds = tuple(t for n in names if isinstance(t := getattr(mod, n, None), type))
    if creds and isinstance(e, creds):
        return ConfigError(f"{uri}: {what}: no usable S3 credentials ({e}); set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give "
                           "the flow an AwsCredentials block (aws_block)")
    return StorageError(f"{uri}: {what}: {e}")


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def scene_key(uri: str) -> str:
    """A scene URI for comparison: local paths resolved (./a.tif is a.tif)."""
    if not is_local(uri):
        return uri
    return os.path.realpath(uri[len("file://"):] if uri.startswith("file://") else uri)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    try:
        return fs.exists(path)
    except storage_error_types() as e:
        raise storage_failure(uri, "cannot check existence", e) from e


@contextlib.contextmanager
def reading(uri: str, directory: str = "is a directory, expected a file") -> Iterator[None]:
    """Turn OS errors while reading ``uri`` into segcore errors that name it: a missing,
    misplaced or forbidden input is the caller's to fix (InputError); anything else is
    storage trouble, possibly transient (StorageError)."""
    try:
        yield
    except FileNotFoundError as e:
        raise InputError(f"{uri}: no such file; check the path") from e
    except IsADirectoryError as e:
        raise InputError(f"{uri}: {directory}") from e
    except PermissionError as e:
        raise InputError(f"{uri}: permission denied") from e
    except StorageError:
        raise
    except storage_error_types() as e:
        raise storage_failure(uri, "read failed", e) from e


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with reading(uri), fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that a reader never sees half a file: temp name + rename locally; one PUT on
    object stores (an object appears whole or not at all). Object stores have no folders to
    make: no request before the PUT (s3fs's makedirs probed the bucket, and created a missing
    one)."""
    fs, path = get_fs(uri)
    try:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and is_local(uri):
            fs.makedirs(parent, exist_ok=True)
        if is_local(uri):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except FileNotFoundError as e:  # on an object store: the bucket is missing
        raise InputError(f"{uri}: cannot write ({e}); create the bucket (or folder) or fix the "
                         "output URI") from e
    except storage_error_types() as e:
        raise storage_failure(uri, "write failed", e) from e


def publish_file(local: str, dst: str) -> None:
    """Move a finished local file to ``dst`` so that it appears whole or not at all: copy to a
    temp name beside it and rename, locally; one upload (s3fs: one PUT, or a multipart upload
    completed at the end) on object stores."""
    import shutil

    if is_local(dst):
        path = dst[len("file://"):] if dst.startswith("file://") else dst
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
        return
    fs, rpath = get_fs(dst)
    try:
        fs.put_file(local, rpath)
    except FileNotFoundError as e:
        raise InputError(f"{dst}: cannot write ({e}); create the bucket (or folder) or fix the "
                         "output URI") from e
    except storage_error_types() as e:
        raise storage_failure(dst, "upload failed", e) from e


def remove_tree(uri: str) -> None:
    """Delete ``uri`` and everything under it, if it exists."""
    fs, path = get_fs(uri)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except storage_error_types() as e:
        raise storage_failure(uri, "delete failed", e) from e
