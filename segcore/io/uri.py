"""URIs: every input and output is a local path, file://, s3:// or any fsspec protocol.

S3 settings come from the standard AWS environment/profile; ``SEGCORE_S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL``) points s3:// at MinIO, Ceph or a test server.

Retries on S3 are bounded and explicit (docs/RELIABILITY.md): botocore retries each request
(5xx, SlowDown, connection errors) up to ``S3_MAX_ATTEMPTS`` attempts in all, in its
"standard" mode (jittered exponential back-off, and a retry quota that stops retrying when
most requests fail); s3fs adds ``S3FS_RETRIES`` tries of its own around each call (SlowDown
and connection errors once botocore gave up, and bodies cut short, which botocore does not
retry). Left at the libraries' defaults, one request to a dead endpoint took up to 250
attempts and 3 minutes. Each retry is logged at DEBUG by ``botocore.retries.standard``
("Retry needed") and ``s3fs`` ("Retryable error"); what still fails is a StorageError.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from segcore.errors import ConfigError, InputError, StorageError

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
    """(filesystem, path-within-it) for a URI."""
    try:
        fs, path = url_to_fs(uri, **storage_options(uri))
    except (ImportError, ValueError) as e:
        raise InputError(f"{uri}: unsupported URI ({e})") from e
    return bound_retries(fs), path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


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
        raise StorageError(f"{uri}: cannot check existence: {e}") from e


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
        raise StorageError(f"{uri}: read failed: {e}") from e


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
    except storage_error_types() as e:
        raise StorageError(f"{uri}: write failed: {e}") from e
