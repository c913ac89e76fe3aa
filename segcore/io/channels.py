"""Channels by name or band number: resolving a selection, and picking a model's channels.

Text selections follow GDAL and QGIS: a token of digits is a **1-based** band number
(``4,3,2``); any other token is a channel name (``B04,B03,B02``, ``DAPI``), matched exactly,
else case-insensitively. Python ints are **0-based** indices. Anything the scene does not have
is refused with the list of what it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segcore.errors import ConfigError, InputError


def describe_channels(names: tuple[str, ...] | None, n: int) -> str:
    """'1 B01, 2 B02, ...' (or '1-3, no names') for messages."""
    if names is None:
        return f"{n} unnamed channel(s), 1-{n}" if n > 1 else "1 unnamed channel"
    return ", ".join(f"{i + 1} {name}" for i, name in enumerate(names))


def resolve_channels(spec: Any, names: tuple[str, ...] | None, n: int,
                     uri: str) -> tuple[int, ...] | None:
    """0-based indices for a channel selection, or None for no selection.

    ``spec``: text such as ``'4,3,2'``, ``'B04,B03,B02'`` or ``'DAPI'`` (a token of digits is a
    **1-based** band index, as GDAL and QGIS count bands; any other token is a channel name,
    matched exactly, else case-insensitively); a sequence of such tokens; or a sequence of
    Python ints, which are **0-based** indices. A name or index the scene does not have is
    refused with the list of its channels."""
    if spec is None:
        return None
    if isinstance(spec, str):
        tokens: list[Any] = [t.strip() for t in spec.split(",")]
    elif isinstance(spec, Sequence):
        tokens = list(spec)
    else:
        raise ConfigError(f"channels {spec!r}: give text like '4,3,2' or 'B04,B03,B02'")
    if not tokens:
        raise ConfigError("channels: the selection is empty; name at least one channel")
    listing = describe_channels(names, n)
    out = []
    for t in tokens:
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            if not 0 <= int(t) < n:
                raise InputError(f"{uri}: channel index {int(t)} (0-based) does not exist; the "
                                 f"scene has {listing}")
            out.append(int(t))
            continue
        t = str(t).strip()
        if not t:
            raise ConfigError(f"channels {spec!r}: an empty entry; separate names or 1-based "
                              "indices by single commas, e.g. 4,3,2")
        if t.isdigit():
            i = int(t)
            if not 1 <= i <= n:
                raise InputError(f"{uri}: band {i} does not exist (bands count from 1); the "
                                 f"scene has {listing}")
            out.append(i - 1)
            continue
        if names is None:
            raise InputError(f"{uri}: has no channel names, so {t!r} cannot be found; the scene "
                             f"has {listing}: select by 1-based index (e.g. --channels 3,2,1) or "
                             "name its channels with --channel-names")
        if t in names:
            out.append(names.index(t))
            continue
        folded = [i for i, nm in enumerate(names) if nm.casefold() == t.casefold()]
        if len(folded) != 1:
            raise InputError(f"{uri}: has no channel named {t!r}; its channels are {listing}")
        out.append(folded[0])
    return tuple(out)


def channels_for_model(scene: Any, channels: Any, contract: Any,
                       model: str) -> tuple[Any, list[str]]:
    """(the scene with the channels the model gets, notes for the report). ``--channels``
    wins; otherwise a checkpoint that names its channels picks them from a scene that names
    its own (refusing, with the scene's list, when one is missing); otherwise all channels in
    file order (the channel count is checked by the caller)."""
    info, want = scene.info, contract.channel_names
    if channels is not None:
        scene = scene.with_channels(channels)
        got = scene.info.channel_names
        if want and got and [g.casefold() for g in got] != [w.casefold() for w in want]:
            return scene, [f"--channels gives the model {', '.join(got)} but it was trained on "
                           f"{', '.join(want)}"]
        return scene, []
    if want is None:
        return scene, []
    if info.channel_names is None:
        if info.channels != len(want):
            return scene, []
        return scene, [f"the scene does not name its channels: its {info.channels} channels are "
                       f"taken as the model's {', '.join(want)}, in file order (name them with "
                       "--channel-names or pick them with --channels)"]
    if tuple(info.channel_names) == tuple(want):
        return scene, []
    missing = []
    for name in want:
        try:
            resolve_channels([name], info.channel_names, info.channels, info.uri)
        except InputError:
            missing.append(name)
    if missing:
        raise InputError(
            f"{info.uri}: the model {model} was trained on channels {', '.join(want)}, but "
            f"the scene has no {', '.join(missing)}; its channels are "
            f"{describe_channels(info.channel_names, info.channels)}; pick the model's input "
            "with --channels (names or 1-based band indices)")
    return scene.with_channels(list(want)), []
