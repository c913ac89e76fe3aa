"""DICOM whole-slide images that wsidicom refuses: frames and TotalPixelMatrix geometry only.

Real archives hold VL WSI instances written by converters (scripts on pydicom) that leave out
attributes the standard requires: ImageType, PixelSpacing in the shared functional groups,
DimensionOrganizationType, FrameOfReferenceUID. wsidicom refuses such files; OpenSlide 4 and
PathML read them. This reader does what they do: it trusts only what a tiled image needs,

- the pixel matrix: TotalPixelMatrixRows/Columns, Rows/Columns (the tile), NumberOfFrames,
  SamplesPerPixel, 8 bits, one focal plane and optical path;
- the frames in TILED_FULL order (row by row), which a file without DimensionOrganizationType
  must be in when it has exactly one frame per tile; per-frame positions
  (PlanePositionSlideSequence) are used where the file has them;
- the pixel size from PixelSpacing (shared functional groups, else the top level), else
  inferred from ImagedVolumeWidth / TotalPixelMatrixColumns, and says which in the notes the
  report carries;
- the pyramid: the instances with a tiled pixel matrix of the base's aspect ratio, largest
  first (without ImageType, a label or overview image is told apart by its shape).

Frames are located by walking the encapsulated items from the pixel data's offset (never the
whole pixel data in memory) and decoded with imagecodecs. What it cannot read is refused with
the attribute that is missing and the fix.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcore.errors import InputError
from segcore.io.pixels import Source, SourceMeta, to_output
from segcore.io.uri import get_fs, is_local, reading

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
REQUIRED = ("ImageType", "DimensionOrganizationType", "FrameOfReferenceUID")
NOT_PYRAMID = ("LABEL", "OVERVIEW", "THUMBNAIL")
_ITEM, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
_DECODERS = {"1.2.840.10008.1.2.4.50": "jpeg8", "1.2.840.10008.1.2.4.51": "jpeg8",
             "1.2.840.10008.1.2.4.57": "ljpeg", "1.2.840.10008.1.2.4.70": "ljpeg",
             "1.2.840.10008.1.2.4.80": "jpegls", "1.2.840.10008.1.2.4.81": "jpegls",
             "1.2.840.10008.1.2.4.90": "jpeg2k", "1.2.840.10008.1.2.4.91": "jpeg2k",
             "1.2.840.10008.1.2.4.201": "htj2k", "1.2.840.10008.1.2.4.202": "htj2k",
             "1.2.840.10008.1.2.4.203": "htj2k"}


def missing_attributes(ds: Any) -> list[str]:
    """The attributes wsidicom needs that a VL WSI header ``ds`` lacks (PixelSpacing counts
    only where the shared functional groups should hold it)."""
    out = [k for k in REQUIRED if k not in ds]
    shared = ds.get("SharedFunctionalGroupsSequence")
    try:
        spacing = shared[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError, TypeError, KeyError):
        spacing = None
    if not spacing:
        out.append("PixelSpacing (shared functional groups)")
    return out


@dataclass
class _Level:
    name: str
    path: str
    height: int
    width: int
    tile: tuple[int, int]  # rows, columns of a frame
    spp: int
    ts: str
    frames: list[tuple[int, int]]  # (offset, length) in the file, in frame order
    where: dict[tuple[int, int], int]  # (tile row, tile col) -> frame index
    ds: Any


def header(fh: Any, name: str) -> tuple[Any, int | None]:
    """(the header up to the pixel data, the offset of the pixel data's value or None)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(fh, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as e:
        raise InputError(f"{name}: truncated or corrupt DICOM header ({type(e).__name__}: "
                         f"{e}); copy or export the file again") from e
    head = fh.read(12)  # pydicom stops at the pixel data's tag
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return ds, None
    explicit = head[4:6].isalpha()
    return ds, fh.tell() - 12 + (12 if explicit else 8)


def _frame_items(fh: Any, start: int, n: int, name: str) -> list[tuple[int, int]]:
    """(offset, length) of each frame of encapsulated pixel data whose value starts at
    ``start``: the items after the basic offset table, one fragment per frame (several per
    frame are grouped by the basic offset table when it is there)."""
    fh.seek(start)
    items: list[tuple[int, int]] = []
    table: list[int] = []
    first = True
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError(f"{name}: truncated pixel data (the file ends inside it); copy or "
                             "export the file again")
        group, elem, length = struct.unpack("<HHI", head)
        if (group, elem) == _SEQ_END:
            break
        if (group, elem) != _ITEM:
            raise InputError(f"{name}: corrupt encapsulated pixel data (tag {group:04X},"
                             f"{elem:04X} where an item belongs); export the file again")
        pos = fh.tell()
        if first:
            table = list(struct.unpack(f"<{length // 4}I", fh.read(length))) if length else []
            first = False
        else:
            items.append((pos, length))
            fh.seek(pos + length)
    if len(items) == n:
        return items
    if table and len(table) == n:  # several fragments per frame: group them by the table
        base = items[0][0] - 8 if items else 0
        starts = [base + t for t in table] + [math.inf]
        frames = []
        for i in range(n):
            parts = [it for it in items if starts[i] <= it[0] - 8 < starts[i + 1]]
            frames.append((parts[0][0], parts[-1][0] + parts[-1][1] - parts[0][0]))
        return frames
    raise InputError(f"{name}: the pixel data holds {len(items)} fragments for NumberOfFrames "
                     f"{n} and no basic offset table to group them; export the file with one "
                     "fragment per frame")


class DicomFramesSource(Source):
    """A VL WSI pyramid read from its frames (see the module doc)."""

    def __init__(self, uri: str, files: list[str]) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._fhs: dict[str, Any] = {}
        fs, root = get_fs(uri)
        self._fs = fs
        with reading(uri):
            self._folder = fs.isdir(root)
        try:
            self._levels = self._pyramid(files)
            self.meta = self._inspect()
        except BaseException:
            self.close()
            raise

    def _open(self, path: str) -> Any:
        if path not in self._fhs:
            self._fhs[path] = open(path, "rb") if is_local(self.uri) else \
                self._fs.open(path, "rb", block_size=2**20, cache_type="readahead")
        return self._fhs[path]

    def _level(self, path: str) -> _Level | None:
        name = f"{self.uri.rstrip('/')}/{path.rsplit('/', 1)[-1]}" if self._folder \
            else self.uri
        with reading(name):
            fh = self._open(path)
            with self._lock:
                fh.seek(0)
                ds, start = header(fh, name)
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            return None
        if start is None:  # the header ends before the pixel data: a cut file
            raise InputError(f"{name}: truncated DICOM file (the header ends before the pixel "
                             "data); copy or export the file again")
        kinds = [str(v).upper() for v in ds.get("ImageType", [])]
        if any(k in NOT_PYRAMID for k in kinds):
            return None
        need = ("TotalPixelMatrixRows", "TotalPixelMatrixColumns", "Rows", "Columns",
                "NumberOfFrames", "SamplesPerPixel")
        lacking = [k for k in need if k not in ds]
        if lacking:
            if "TotalPixelMatrixRows" in lacking or "NumberOfFrames" in lacking:
                return None  # a single-frame (label, overview) image: not a pyramid level
            raise InputError(f"{name}: a VL WSI instance without {', '.join(lacking)}; segcore "
                             "needs the pixel matrix geometry to place its frames: export the "
                             "slide again with a WSI DICOM converter (e.g. wsidicomizer)")
        h, w = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
        th, tw, n = int(ds.Rows), int(ds.Columns), int(ds.NumberOfFrames)
        if int(ds.get("BitsAllocated", 8)) != 8:
            raise InputError(f"{name}: {ds.BitsAllocated}-bit frames; segcore reads 8-bit "
                             "DICOM whole-slide images")
        for k in ("TotalPixelMatrixFocalPlanes", "NumberOfOpticalPaths"):
            if int(ds.get(k, 1) or 1) != 1:
                raise InputError(f"{name}: {k} is {ds.get(k)} and the file lacks "
                                 f"{', '.join(missing_attributes(ds))}; segcore reads such "
                                 "files only with one focal plane and optical path: export "
                                 "the slide with a WSI DICOM converter (e.g. wsidicomizer)")
        ny, nx = math.ceil(h / th), math.ceil(w / tw)
        where = self._positions(ds, n, ny, nx, th, tw, name)
        ts = str(ds.file_meta.TransferSyntaxUID)
        spp = int(ds.SamplesPerPixel)
        with self._lock:
            if ts in _NATIVE:
                size = th * tw * spp
                frames = [(start + i * size, size) for i in range(n)]
            elif ts in _DECODERS:
                frames = _frame_items(fh, start, n, name)
            else:
                raise InputError(f"{name}: frames in transfer syntax {ts}, which segcore "
                                 "cannot decode; export them as JPEG, JPEG 2000, JPEG-LS or "
                                 "uncompressed")
        return _Level(name, path, h, w, (th, tw), spp, ts, frames, where, ds)

    @staticmethod
    def _positions(ds: Any, n: int, ny: int, nx: int, th: int, tw: int,
                   name: str) -> dict[tuple[int, int], int]:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and len(per_frame) == n:
            where = {}
            for i, item in enumerate(per_frame):
                try:
                    pos = item.PlanePositionSlideSequence[0]
                    r = int(pos.RowPositionInTotalImagePixelMatrix) - 1
                    c = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
                except (AttributeError, IndexError):
                    break
                where[(r // th, c // tw)] = i
            else:
                return where
        if n != ny * nx:
            raise InputError(
                f"{name}: {n} frames for {ny} x {nx} tiles and no per-frame positions "
                "(PlanePositionSlideSequence) or DimensionOrganizationType to say where they "
                "go; export the slide with TILED_FULL frames (one per tile) or with positions")
        return {(i // nx, i % nx): i for i in range(n)}

    def _pyramid(self, files: list[str]) -> list[_Level]:
        self._files = files
        levels = [lv for lv in (self._level(p) for p in files) if lv is not None]
        if not levels:
            raise InputError(f"{self.uri}: no tiled VL Whole Slide Microscopy Image instance "
                             "here; point to the slide's folder or one of its level files")
        levels.sort(key=lambda lv: -lv.height * lv.width)
        base = levels[0]
        aspect = base.width / base.height
        kept = [lv for lv in levels if abs(lv.width / lv.height - aspect) <= 0.02 * aspect
                and lv.spp == base.spp]
        sizes = [(lv.height, lv.width) for lv in kept]
        if len(set(sizes)) != len(sizes):
            raise InputError(f"{self.uri}: two instances of the same size {sizes}; without "
                             "ImageType segcore cannot tell which is the pyramid level: put "
                             "each slide in its own folder")
        return kept

    def _inspect(self) -> SourceMeta:
        base = self._levels[0]
        ds = base.ds
        lacks = missing_attributes(ds)
        why_not = f"the file lacks {', '.join(lacks)}" if lacks else \
            f"wsidicom does not read its header (ImageType {'/'.join(ds.get('ImageType', []))})"
        notes = [f"{self.uri}: read without wsidicom, from the frames and the pixel matrix "
                 f"geometry; {why_not}"]
        size, why = None, None
        for src, holder in (("PixelSpacing (shared functional groups)",
                             _shared_measures(ds)), ("PixelSpacing", ds)):
            spacing = getattr(holder, "PixelSpacing", None) if holder is not None else None
            if spacing:
                size, why = (float(spacing[0]) + float(spacing[1])) / 2 * 1000, f"from {src}"
                break
        if size is None and ds.get("ImagedVolumeWidth"):
            size = float(ds.ImagedVolumeWidth) / base.width * 1000
            why = (f"inferred from ImagedVolumeWidth ({float(ds.ImagedVolumeWidth):g} mm) / "
                   f"TotalPixelMatrixColumns ({base.width})")
        if size is not None and size > 0:
            notes.append(f"{self.uri}: pixel size {size:.4g} um, {why}")
        else:
            size = None
            notes.append(f"{self.uri}: no pixel size (no PixelSpacing, no ImagedVolumeWidth)")
        return SourceMeta(uri=self.uri, format="dicom",
                          level_shapes=tuple((lv.height, lv.width) for lv in self._levels),
                          channels=base.spp, dtype="uint8", pixel_size=size,
                          pixel_unit="micrometer" if size else None, notes=tuple(notes))

    def open_level(self, level: int) -> None:
        lv = self._levels[level]
        with self._lock:
            fh = self._open(lv.path)
            fh.seek(0, 2)
            end = fh.tell()
        bad = sum(1 for off, ln in lv.frames if off + ln > end)
        if bad:
            raise InputError(f"{lv.name}: truncated DICOM: {bad} of {len(lv.frames)} frames of "
                             f"level {level} lie beyond the end of the file ({end} bytes); "
                             "copy or export the file again")

    def _decode(self, lv: _Level, data: bytes) -> np.ndarray:
        th, tw = lv.tile
        if lv.ts in _NATIVE:
            tile = np.frombuffer(data, np.uint8).reshape(th, tw, lv.spp)
        else:
            import imagecodecs

            tile = np.asarray(getattr(imagecodecs, f"{_DECODERS[lv.ts]}_decode")(data))
        tile = tile.reshape(tile.shape[0], tile.shape[1], -1)
        if tile.shape[:2] != (th, tw) or tile.shape[2] != lv.spp:
            raise ValueError(f"a frame decoded to {tile.shape}, expected {(th, tw, lv.spp)}")
        return tile

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        lv = self._levels[level]
        th, tw = lv.tile
        white = 255 if lv.spp == 3 else 0  # absent frames: the slide's background
        out = np.full((y1 - y0, x1 - x0, lv.spp), white, np.uint8)
        where = f"y {y0}:{y1}, x {x0}:{x1} (level {level})"
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                i = lv.where.get((ty, tx))
                if i is None:
                    continue
                off, ln = lv.frames[i]
                with self._lock, reading(lv.name):
                    fh = self._open(lv.path)
                    fh.seek(off)
                    data = fh.read(ln)
                try:
                    tile = self._decode(lv, data)
                except Exception as e:  # decoder errors have many types
                    raise InputError(f"{lv.name}: cannot decode region {where}: "
                                     f"{type(e).__name__}: {e}; the file is corrupt or "
                                     "truncated") from e
                ay, ax = ty * th, tx * tw
                sy0, sy1 = max(y0, ay), min(y1, ay + th)
                sx0, sx1 = max(x0, ax), min(x1, ax + tw)
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = \
                    tile[sy0 - ay:sy1 - ay, sx0 - ax:sx1 - ax]
        return to_output(out, np.dtype("uint8"))

    def close(self) -> None:
        for fh in self._fhs.values():
            try:
                fh.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._fhs.clear()


def _shared_measures(ds: Any) -> Any:
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError, TypeError, KeyError):
        return None
