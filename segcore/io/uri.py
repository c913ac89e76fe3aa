"""URIs: every input and output is a local path, file://, s3:// or any fsspec protocol.

S3 settings come from the standard AWS environment/profile; ``SEGCORE_S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL``) points s3:// at MinIO, Ceph or a test server.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from segcore.errors import InputError, StorageError


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri`` taken from the environment (endpoint for s3)."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("SEGCORE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for a URI."""
    try:
        return url_to_fs(uri, **storage_options(uri))
    except (ImportError, ValueError) as e:
        raise InputError(f"{uri}: unsupported URI ({e})") from e


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
    except OSError as e:
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
    except OSError as e:
        raise StorageError(f"{uri}: read failed: {e}") from e


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with reading(uri), fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that a reader never sees half a file: temp name + rename locally; one PUT on
    object stores (an object appears whole or not at all)."""
    fs, path = get_fs(uri)
    try:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if is_local(uri):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except OSError as e:
        raise StorageError(f"{uri}: write failed: {e}") from e
