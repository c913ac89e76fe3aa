"""Scene readers: any supported image at any URI -> regions as (h, w, c) numpy arrays.

``open_scene(uri, level=None, mpp=None)`` detects the format from the content (magic bytes; a
directory is a Zarr or a folder of DICOM WSI instances), picks a pyramid level and returns a
``Scene``. ``Scene.read`` reads one
region lazily: a small region of a tiled TIFF or chunked Zarr decodes only what it touches.

Level selection by ``mpp`` (microns per pixel for slides, metres per pixel for geo scenes):
the level whose pixel size is the *finest one that is >= 0.9 * mpp*, i.e. the closest level not
finer than asked (10 % tolerance, so 0.499 counts as 0.5). If every level is finer than asked,
the coarsest level is used. An ``mpp`` finer than the scene's finest level (beyond the same
10 %) is refused with the file's finest pixel size: segcore never upsamples. Scenes in degrees
(EPSG:4326) convert degrees to metres at the scene centre for this choice. Every format with a
pixel size takes part (TIFF family, OME-Zarr scale transforms, Zarr written by ``ingest``,
PNG pHYs / JPEG density); a scene without one refuses ``mpp`` (use ``level``).

Channels: ``SceneInfo.channel_names`` holds the names the format gives (OME-XML channel names,
QPTIFF biomarkers, GeoTIFF band descriptions, OME-Zarr omero labels) or ``channel_names=`` given
by the caller (e.g. Sentinel-2 band names for a file without descriptions). ``channels=`` selects
and orders channels (see :func:`segcore.io.channels.resolve_channels`): the scene then *is* those channels (its
info, its reads), per task and picklable like any scene.

A ``Scene`` pickles as (uri, level, options, info) and reopens itself on its first read, so it
can be shipped to Dask workers; the open file handle and tifffile's Zarr store never travel.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from segcore.errors import ConfigError, InputError
from segcore.io import geo as geomod
from segcore.io.channels import describe_channels, resolve_channels  # noqa: F401  (re-export)
from segcore.io.pixels import Source, SourceMeta, check_scene_size, level_ratio
from segcore.io.uri import get_fs, is_local, reading

FORMATS = ("tiff", "svs", "ome-tiff", "geotiff", "png", "jpeg", "zarr", "ome-zarr", "dicom")
MPP_TOLERANCE = 0.1
UNIT_ABBREV = {"micrometer": "um", "meter": "m", "degree": "m"}  # degrees: metres at the centre
_MAGIC = (
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
)
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


@dataclass(frozen=True)
class SceneInfo:
    uri: str
    height: int  # at the chosen level
    width: int
    channels: int  # after dropping alpha (RGBA -> 3)
    dtype: str  # 'uint8' | 'uint16' | 'float32'
    level: int  # chosen pyramid level (0 = full resolution)
    level_shapes: tuple[tuple[int, int], ...]  # (h, w) of every level
    pixel_size: float | None  # at the chosen level
    pixel_unit: str | None  # 'micrometer' | 'meter' | 'degree' | None
    geo: dict | None  # {'crs': 'EPSG:n' | None, 'transform': [a, b, c, d, e, f]} at the level
    nodata: float | None
    format: str  # one of FORMATS
    channel_names: tuple[str, ...] | None = None  # one per channel (after selection), or None
    notes: tuple[str, ...] = ()  # what the reader inferred or worked around (report warnings)


def detect_format(uri: str) -> str:
    """'tiff' | 'png' | 'jpeg' | 'zarr' | 'dicom' from the content (TIFF flavours are told
    apart later). A directory is a Zarr (zarr.json, .zarray, .zgroup) or a DICOM slide folder
    (*.dcm files, or files with "DICM" at byte 128)."""
    fs, path = get_fs(uri)
    with reading(uri, "is a directory but not a Zarr (no zarr.json, .zarray or .zgroup)"):
        if not is_local(uri):
            fs.invalidate_cache(path)  # another process may have just written it
        if fs.isdir(path):
            if any(fs.exists(f"{path.rstrip('/')}/{m}") for m in _ZARR_MARKERS):
                return "zarr"
            from segcore.io.dicomscene import is_dicom_folder

            if is_dicom_folder(fs, path):
                return "dicom"
            raise InputError(
                f"{uri}: is a directory but not a Zarr (no zarr.json, .zarray or .zgroup) nor a "
                "DICOM slide (no .dcm or DICOM files); point to an image file, a Zarr "
                "array/group or a folder of DICOM whole-slide instances"
            )
        with fs.open(path, "rb") as f:
            head = f.read(132)
    if head[128:132] == b"DICM":  # before TIFF: a dual-personality DICOM-TIFF is read as DICOM
        return "dicom"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if not head:
        raise InputError(f"{uri}: is empty (0 bytes), not an image; copy or export it again")
    raise InputError(
        f"{uri}: not an image: the content starts with {head[:8]!r}, which is not TIFF, PNG, "
        "JPEG or DICOM (and it is not a Zarr directory); check the file"
    )


def _open_source(uri: str) -> Source:
    kind = detect_format(uri)
    if kind == "tiff":
        from segcore.io.tiffscene import TiffSource

        return TiffSource(uri)
    if kind == "zarr":
        from segcore.io.zarrscene import ZarrSource

        return ZarrSource(uri)
    if kind == "dicom":
        from segcore.io.dicomscene import open_dicom

        return open_dicom(uri)
    from segcore.io.pilscene import PilSource

    return PilSource(uri, kind)


def _sizes_for_mpp(meta: SourceMeta) -> list[float]:
    """Pixel size of every level in the unit ``mpp`` is given in (degrees -> metres)."""
    out = []
    for lv in range(len(meta.level_shapes)):
        fy, fx = level_ratio(meta.level_shapes, lv)
        out.append(meta.pixel_size * (fy + fx) / 2)
    if meta.pixel_unit == "degree" and meta.geo is not None:
        h, w = meta.level_shapes[0]
        out = [geomod.degrees_to_metres(s, meta.geo["transform"], h, w) for s in out]
    return out


def choose_level(meta: SourceMeta, level: int | None, mpp: float | None) -> int:
    """The pyramid level for ``level`` or ``mpp`` (see the module docstring); 0 by default."""
    n = len(meta.level_shapes)
    listing = ", ".join(f"{i}: {h}x{w}" for i, (h, w) in enumerate(meta.level_shapes))
    if level is not None and mpp is not None:
        raise ConfigError(f"{meta.uri}: give a pyramid level or a target mpp, not both")
    if level is not None:
        try:
            level = operator.index(level)
        except TypeError as e:
            raise ConfigError(f"{meta.uri}: level must be an integer, got {level!r}") from e
        if not 0 <= level < n:
            raise ConfigError(
                f"{meta.uri}: level {level} does not exist; the levels are {listing} (h x w)"
            )
        return level
    if mpp is None:
        return 0
    if not mpp > 0:
        raise ConfigError(f"{meta.uri}: mpp must be > 0, got {mpp}")
    if meta.pixel_size is None:
        raise ConfigError(
            f"{meta.uri}: the scene has no pixel size, so mpp={mpp} cannot choose a level; "
            f"pass level instead (levels: {listing})"
        )
    sizes = _sizes_for_mpp(meta)
    finest = min(range(n), key=lambda i: sizes[i])
    if mpp < sizes[finest] * (1 - MPP_TOLERANCE):
        unit = UNIT_ABBREV.get(meta.pixel_unit or "", "")
        h, w = meta.level_shapes[finest]
        raise ConfigError(
            f"{meta.uri}: mpp {mpp:g} asks for pixels finer than the scene's finest level "
            f"(level {finest}, {h}x{w}, {sizes[finest]:.4g} {unit}/px); segcore does not "
            f"upsample: pass --mpp {sizes[finest]:.4g} or larger, or a --level"
        )
    ok = [i for i, s in enumerate(sizes) if s >= mpp * (1 - MPP_TOLERANCE)]
    if not ok:
        return max(range(n), key=lambda i: sizes[i])
    return min(ok, key=lambda i: sizes[i])


SCALE_TOLERANCE = 1.3  # a level within 1.3x of a model's pixel size is "its scale"


def level_for_model(meta: SourceMeta, size: float, unit: str | None, model: str
                    ) -> tuple[int, str]:
    """The pyramid level at which a model trained at ``size`` (``unit``/px) sees its own scale,
    and a sentence saying which and why; refused (with the levels and the fix) when no level
    is within SCALE_TOLERANCE of it. A scene without a pixel size, or in another unit family
    (um vs m), uses level 0 and says so."""
    want = UNIT_ABBREV.get(unit or "micrometer", unit)
    if meta.pixel_size is None or UNIT_ABBREV.get(meta.pixel_unit or "") != want:
        what = "no pixel size" if meta.pixel_size is None else f"pixels in {meta.pixel_unit}"
        return 0, (f"the scene records {what}, so level 0 is used as it is; the model {model} "
                   f"was trained at {size:g} {want}/px: if the scene's scale differs, pass "
                   "--mpp or --level (or rescale it)")
    sizes = _sizes_for_mpp(meta)
    best = min(range(len(sizes)), key=lambda i: abs(np.log(sizes[i] / size)))
    ratio = sizes[best] / size
    h, w = meta.level_shapes[best]
    if 1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE:
        why = "the only level" if len(sizes) == 1 else "the level closest to it"
        return best, (f"level {best} ({h}x{w}, {sizes[best]:.4g} {want}/px) chosen: the model "
                      f"{model} was trained at {size:g} {want}/px ({why})")
    listing = ", ".join(f"{i}: {s:.4g} {want}/px" for i, s in enumerate(sizes))
    raise ConfigError(
        f"{meta.uri}: no level is at the scale the model {model} was trained at ({size:g} "
        f"{want}/px; levels {listing}): objects would look {max(ratio, 1 / ratio):.1f}x "
        f"{'smaller' if ratio > 1 else 'larger'} than it learned. Pass --level {best} to run "
        f"at {sizes[best]:.4g} {want}/px anyway, or rescale the scene to {size:g} {want}/px "
        "(e.g. vips resize / gdalwarp -tr)")


def _info(meta: SourceMeta, level: int) -> SceneInfo:
    fy, fx = level_ratio(meta.level_shapes, level)
    h, w = meta.level_shapes[level]
    return SceneInfo(
        uri=meta.uri,
        height=h,
        width=w,
        channels=meta.channels,
        dtype=meta.dtype,
        level=level,
        level_shapes=meta.level_shapes,
        pixel_size=None if meta.pixel_size is None else meta.pixel_size * (fy + fx) / 2,
        pixel_unit=meta.pixel_unit,
        geo=geomod.scale_geo(meta.geo, fy, fx),
        nodata=meta.nodata,
        format=meta.format,
        channel_names=meta.channel_names,
        notes=meta.notes,
    )


class Scene:
    """One image at one pyramid level; ``read`` regions of it. Use as a context manager."""

    def __init__(
        self, info: SceneInfo, options: dict[str, Any], source: Source | None = None
    ) -> None:
        self.info = info
        self.options = dict(options)
        self._source = source
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self.info.uri

    def _get_source(self) -> Source:
        with self._lock:
            if self._source is None:
                src = _open_source(self.info.uri)
                try:
                    if src.meta.level_shapes != self.info.level_shapes:
                        raise InputError(
                            f"{self.info.uri}: the file changed since it was opened (levels "
                            f"{src.meta.level_shapes} != {self.info.level_shapes})"
                        )
                    src.open_level(self.info.level)
                except BaseException:
                    src.close()
                    raise
                self._source = src
            return self._source

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of this level as (y1-y0, x1-x0, channels) in ``info.dtype``."""
        try:
            y0, y1, x0, x1 = (operator.index(v) for v in (y0, y1, x0, x1))
        except TypeError as e:
            raise ConfigError(f"{self.info.uri}: region bounds must be integers ({e})") from e
        h, w = self.info.height, self.info.width
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise ConfigError(
                f"{self.info.uri}: region y {y0}:{y1}, x {x0}:{x1} is not inside the image "
                f"({h} x {w} at level {self.info.level}); clip it to 0 <= y0 <= y1 <= {h}, "
                f"0 <= x0 <= x1 <= {w}"
            )
        if y0 == y1 or x0 == x1:
            return np.zeros((y1 - y0, x1 - x0, self.info.channels), dtype=self.info.dtype)
        out = self._get_source().read(self.info.level, y0, y1, x0, x1)
        n_src = self.options.get("source_channels") or self.info.channels
        if out.shape != (y1 - y0, x1 - x0, n_src):  # never hand on a wrong shape
            raise InputError(
                f"{self.info.uri}: region y {y0}:{y1}, x {x0}:{x1} decoded to shape {out.shape}, "
                f"expected {(y1 - y0, x1 - x0, n_src)}; the file is corrupt"
            )
        sel = self.options.get("channels")
        if sel is not None and tuple(sel) != tuple(range(n_src)):
            out = np.ascontiguousarray(out[..., list(sel)])
        return out

    def with_channels(self, channels: Any) -> Scene:
        """This scene with ``channels`` selected (see :func:`resolve_channels`; applied on top
        of any selection it already has). The new scene takes over this one's open file."""
        sel = resolve_channels(channels, self.info.channel_names, self.info.channels,
                               self.info.uri)
        if sel is None:
            return self
        base = self.options.get("channels")
        n_src = self.options.get("source_channels") or self.info.channels
        full = sel if base is None else tuple(base[i] for i in sel)
        names = self.info.channel_names
        info = replace(self.info, channels=len(sel),
                       channel_names=None if names is None else tuple(names[i] for i in sel))
        with self._lock:
            src, self._source = self._source, None
        return Scene(info, {**self.options, "channels": full, "source_channels": n_src}, src)

    def at_level(self, level: int) -> Scene:
        """The same scene (same channel selection and names) at another pyramid level."""
        o = self.options
        scene = open_scene(self.info.uri, level=level, channel_names=o.get("channel_names"))
        return scene if o.get("channels") is None else scene.with_channels(tuple(o["channels"]))

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_restore, (self.info, self.options))

    def __repr__(self) -> str:
        i = self.info
        return f"Scene({i.uri!r}, {i.format}, level {i.level}, {i.height}x{i.width}x{i.channels} {i.dtype})"


def _restore(info: SceneInfo, options: dict[str, Any]) -> Scene:
    return Scene(info, options)


def open_scene(uri: str, level: int | None = None, mpp: float | None = None,
               channels: Any = None, channel_names: Sequence[str] | None = None,
               model_scale: tuple[float, str | None, str] | None = None) -> Scene:
    """Open ``uri`` at a pyramid ``level`` or the level for a target ``mpp`` (not both).
    ``channel_names`` names the file's channels (one name each; replaces the names the file
    has); ``channels`` then selects and orders them (:func:`resolve_channels`).
    ``model_scale`` = (pixel size, unit, model name): with neither level nor mpp, the level at
    the model's own scale (:func:`level_for_model`; the choice lands in ``info.notes``)."""
    uri = str(uri)
    src = _open_source(uri)
    try:
        note = None
        if level is None and mpp is None and model_scale is not None:
            level, note = level_for_model(src.meta, *model_scale)
        lv = choose_level(src.meta, level, mpp)
        check_scene_size(uri, lv, *src.meta.level_shapes[lv])  # before any read or plan
        src.open_level(lv)
        info = _info(src.meta, lv)
        if note:
            info = replace(info, notes=(*info.notes, note))
        names = None
        if channel_names is not None:
            names = tuple(str(n).strip() for n in channel_names)
            if len(names) != info.channels or not all(names):
                raise ConfigError(
                    f"{uri}: {len(names)} channel name(s) given ({', '.join(names)}) but the "
                    f"scene has {info.channels} channel(s); give one non-empty name per channel"
                )
            info = replace(info, channel_names=names)
    except BaseException:
        src.close()
        raise
    scene = Scene(info, {"level": level, "mpp": mpp, "channel_names": names}, src)
    try:
        return scene.with_channels(channels)
    except BaseException:
        scene.close()
        raise


def scene_info(uri: str, level: int | None = None, mpp: float | None = None,
               channels: Any = None, channel_names: Sequence[str] | None = None) -> SceneInfo:
    """``SceneInfo`` of ``uri`` at the chosen level (opens and closes the scene)."""
    with open_scene(uri, level=level, mpp=mpp, channels=channels,
                    channel_names=channel_names) as scene:
        return scene.info
