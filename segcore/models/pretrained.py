"""Pretrained models shipped inside the package, found by name (``--model nuclei-he``).

The weights lie in ``segcore/models/shipped/`` as segcore checkpoints (safetensors: loading
parses JSON and raw tensor bytes, never code), each beside its model card (``NAME.md``).
``index.json`` lists them: file, card, the file's sha256, task, pixel size and the test figure.
Nothing is downloaded: a name resolves to a file of this installation, and the file's sha256
is checked against the index before its bytes are used (a damaged install is refused by
name, with the fix).

A value that is a shipped name resolves to the shipped file unless a file of that exact name
exists where it is given (write ``./nuclei-he`` for a local file named like a shipped model).
Any other value is a checkpoint URI and passes through unchanged. Names, not paths, travel in
configs and reports, so a flow planned on one host resolves on each worker's own install.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from segcore.errors import CheckpointError, UnknownModelError

PACKAGE_DIR = "shipped"


@dataclass(frozen=True)
class Shipped:
    name: str
    file: str
    card: str
    sha256: str
    arch: str
    task: str
    pixel_size: float | None
    pixel_unit: str | None
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    score: str  # the test figure, as the card states it
    status: str  # 'ok' | 'weak' (shipped, but below its target: the card says by how much)
    licence: str  # of the training data

    @property
    def path(self) -> Path:
        return shipped_dir() / self.file

    @property
    def card_path(self) -> Path:
        return shipped_dir() / self.card


def shipped_dir() -> Path:
    return Path(str(resources.files("segcore.models") / PACKAGE_DIR))


@cache
def shipped() -> dict[str, Shipped]:
    """Every shipped model, by name (read once from index.json)."""
    index = shipped_dir() / "index.json"
    if not index.exists():
        return {}
    data = json.loads(index.read_text())
    out = {}
    for name, e in data["models"].items():
        out[name] = Shipped(name=name, file=e["file"], card=e["card"], sha256=e["sha256"],
                            arch=e["arch"], task=e["task"], pixel_size=e.get("pixel_size"),
                            pixel_unit=e.get("pixel_unit"),
                            channels=tuple(e.get("channels", ())),
                            classes=tuple(e.get("classes", ())), score=e["score"],
                            status=e.get("status", "ok"), licence=e["licence"])
    return out


def is_name(value: str) -> bool:
    """True when ``value`` names a shipped model (and no file of that name is where it is
    given)."""
    return value in shipped() and not os.path.exists(value)


_checked: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _verify(m: Shipped) -> Path:
    path = m.path
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(
            f"shipped model {m.name!r}: {path} is missing from this installation; reinstall "
            "segcore (pip install --force-reinstall segcore, or make install in a clone)"
        ) from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _checked:
            return path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != m.sha256:
        raise CheckpointError(
            f"shipped model {m.name!r}: {path} has sha256 {digest[:16]}..., the package index "
            f"says {m.sha256[:16]}...: the file is damaged or was replaced; reinstall segcore"
        )
    with _lock:
        _checked[key] = digest
    return path


def resolve(value: str) -> str:
    """The checkpoint URI for ``value``: a shipped model's verified file, or ``value`` itself.

    A bare word (no path separator, no extension, no scheme) that is neither a shipped name nor
    an existing file is refused with the shipped names and the closest match."""
    value = str(value)
    if is_name(value):
        return str(_verify(shipped()[value]))
    bare = "/" not in value and "." not in value and ":" not in value and os.sep not in value
    if bare and not os.path.exists(value):
        names = sorted(shipped())
        close = difflib.get_close_matches(value, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"model {value!r} is neither a checkpoint file nor a shipped model (shipped: "
            f"{', '.join(names) or 'none'}; `segcore models` lists them){hint}")
    return value


def card(name: str) -> str:
    if name not in shipped():
        resolve(name)  # raises with the listing
    return shipped()[name].card_path.read_text()
