"""DICOM whole-slide images: VL Whole Slide Microscopy Image pyramids, read with wsidicom.

A scene URI is a folder (or s3:// prefix) of DICOM instances, one per pyramid level (label,
overview and thumbnail instances and other DICOM files in the folder are ignored), or a single
instance file. Every instance is opened through segcore's own fsspec file objects, so s3:// uses
the same endpoint settings as every other input, and handed to wsidicom as a stream.

- Levels are the VOLUME instances of the slide's pyramid, finest first; the pixel size comes
  from the DICOM PixelSpacing (shared functional groups), in micrometres.
- Frames: JPEG, JPEG 2000, JPEG-LS, RLE, uncompressed (whatever wsidicom decodes).
  TILED_FULL and TILED_SPARSE; a frame absent from a sparse level reads as the slide's
  background: RecommendedAbsentPixelCIELabValue when the instance gives one, else white (RGB)
  or black (MONOCHROME2), as wsidicom fills it.
- A region read decodes only the frames it touches (wsidicom keeps a small frame cache).
- Several optical paths of single-sample (fluorescence) instances are served as channels, in
  the order of the optical path identifiers; z-stacks are read at wsidicom's default focal
  plane (the middle one).

Opening validates what a DICOM tool would find only late: a file that is not a VL WSI (a CT
slice), a folder without a VOLUME instance or with instances of several slides, truncated
headers, and (per level, when the level is opened) frames that lie beyond the end of the file
or are fewer than the level needs. Each error names the file and says what to change.

Instances that lack attributes wsidicom needs (as converters built on pydicom write them) are
read from their frames instead: :func:`open_dicom` and :mod:`segcore.io.dicomframes`.

The wsidicom objects (streams, frame caches) never leave the process: ``Scene`` pickles its URI.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcore.errors import InputError, StorageError
from segcore.io.pixels import Source, SourceMeta, clean_names, output_dtype, to_output
from segcore.io.uri import get_fs, is_local, reading, storage_options

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
MAGIC_OFFSET = 128  # "DICM" follows the 128-byte preamble
SUFFIX = ".dcm"
PROBE_FILES = 32  # files without the .dcm suffix whose first bytes a folder probe reads
_ABSENT_LAB = (0x0048, 0x0015)  # RecommendedAbsentPixelCIELabValue
READABLE_TS = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
               "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_CACHE_BYTES = 32 * 2**20  # decoded-frame cache per open scene (wsidicom's default: 100 MiB)


def is_dicom_head(head: bytes) -> bool:
    """Whether the first bytes of a file are a DICOM Part 10 preamble + "DICM"."""
    return head[MAGIC_OFFSET : MAGIC_OFFSET + 4] == b"DICM"


def _name(p: str) -> str:
    return p.rstrip("/").rsplit("/", 1)[-1]


def _candidates(fs: Any, path: str) -> list[str]:
    """The plain, non-hidden, non-empty files directly in a folder, sorted."""
    out = []
    for e in fs.ls(path, detail=True):
        name = e["name"].rstrip("/")
        if e.get("type") != "file" or _name(name).startswith(".") or e.get("size") == 0:
            continue
        out.append(name)
    return sorted(out)


def _head(fs: Any, path: str) -> bytes:
    return fs.cat_file(path, start=0, end=MAGIC_OFFSET + 4)


def is_dicom_folder(fs: Any, path: str) -> bool:
    """A folder holding ``*.dcm`` files, or files that start like DICOM (the first
    ``PROBE_FILES`` files without the suffix are probed)."""
    files = _candidates(fs, path)
    if any(p.lower().endswith(SUFFIX) for p in files):
        return True
    return any(is_dicom_head(_head(fs, p)) for p in files[:PROBE_FILES])


def dicom_files(fs: Any, path: str) -> list[str]:
    """The DICOM files of a folder: every ``*.dcm`` file (checked when opened) and every
    other file that starts with the DICOM preamble."""
    return [p for p in _candidates(fs, path)
            if p.lower().endswith(SUFFIX) or is_dicom_head(_head(fs, p))]


def lab_to_rgb(lab: tuple[int, int, int]) -> tuple[int, int, int]:
    """A DICOM CIELab triplet (0..65535 each, PS3.3 C.10.7.1.1) -> 8-bit sRGB (D65 white,
    so L*=100, a*=b*=0 is exactly white)."""
    lum = lab[0] / 65535 * 100
    a = lab[1] / 65535 * 255 - 128
    b = lab[2] / 65535 * 255 - 128
    fy = (lum + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def finv(t: float) -> float:
        return t**3 if t > 6 / 29 else 3 * (6 / 29) ** 2 * (t - 4 / 29)

    x, y, z = 0.95047 * finv(fx), finv(fy), 1.08883 * finv(fz)
    lin = (3.2406 * x - 1.5372 * y - 0.4986 * z,
           -0.9689 * x + 1.8758 * y + 0.0415 * z,
           0.0557 * x - 0.2040 * y + 1.0570 * z)
    out = []
    for c in lin:
        c = min(max(c, 0.0), 1.0)
        c = 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055
        out.append(int(round(c * 255)))
    return out[0], out[1], out[2]


@dataclass
class _Instance:
    name: str  # what error messages call the file (the scene URI, or URI/file in a folder)
    reader: Any  # wsidicom WsiDicomReader (header read; frames indexed when first asked)
    stream: Any  # its WsiDicomReadIO
    size: int  # file size in bytes


def _check_tiled_full(instances: list[_Instance]) -> None:
    """A TILED_FULL instance (all its concatenation parts) has a frame for every tile, focal
    plane and optical path (a TILED_SPARSE one may leave tiles out: they read as background)."""
    from wsidicom.errors import WsiDicomError

    groups: dict[str, list[_Instance]] = {}
    for inst in instances:
        uids = inst.reader.dataset.uids
        groups.setdefault(str(uids.concatenation or uids.instance), []).append(inst)
    for parts in groups.values():
        ds = parts[0].reader.dataset
        if not ds.states_tiled_full:
            continue
        try:  # wsidicom checks the count of an instance that is not concatenated here
            size, tile = ds.image_size, ds.tile_size
        except WsiDicomError as e:
            raise InputError(
                f"{parts[0].name}: missing frames: NumberOfFrames {ds.frame_count} does not "
                f"fill the TILED_FULL level ({e}); export the slide again (or as TILED_SPARSE "
                "with frame positions)") from e
        tiles = math.ceil(size.width / tile.width) * math.ceil(size.height / tile.height)
        need = tiles * int(ds.number_of_focal_planes) * max(1, len(ds.optical_path_identifiers))
        have = sum(p.reader.frame_count for p in parts)
        if have < need:
            raise InputError(
                f"{parts[0].name}: missing frames: NumberOfFrames {have} does not fill the "
                f"TILED_FULL level ({size.height} x {size.width} px in {tiles} tiles of "
                f"{tile.height} x {tile.width} need {need} frames); export the slide again (or "
                "as TILED_SPARSE with frame positions)")


def open_dicom(uri: str) -> Source:
    """The slide at ``uri``: through wsidicom, or, when its instances lack attributes wsidicom
    needs (ImageType, DimensionOrganizationType, FrameOfReferenceUID, shared PixelSpacing; as
    converters built on pydicom write them), from its frames (:mod:`segcore.io.dicomframes`).
    A header that cannot be read at all is left to wsidicom's path, whose errors name it."""
    from segcore.io.dicomframes import NOT_PYRAMID, DicomFramesSource, header, missing_attributes

    fs, path = get_fs(uri)
    with reading(uri):
        files = dicom_files(fs, path) if fs.isdir(path) else [path]
    lacking = False
    for fpath in files:
        try:
            with fs.open(fpath, "rb") as fh:
                ds, pixels_at = header(fh, fpath)
        except Exception:  # noqa: BLE001 - the wsidicom path reports unreadable files
            continue
        if pixels_at is None:  # a header cut before the pixel data: wsidicom's path says so
            continue
        kinds = [str(v).upper() for v in ds.get("ImageType", [])]
        if str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS and \
                not any(k in NOT_PYRAMID for k in kinds) and missing_attributes(ds):
            lacking = True
            break
    if lacking:
        return DicomFramesSource(uri, files)
    try:
        return DicomSource(uri)
    except InputError as e:  # a header wsidicom does not support: its frames may still read
        if not getattr(e, "frames_may_read", False):
            raise
        try:
            return DicomFramesSource(uri, files)
        except InputError:
            raise e from None


class DicomSource(Source):
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fhs: list[Any] = []
        self._wsi: Any = None
        self._checked: set[int] = set()
        self._instances: list[_Instance] = []
        fs, path = get_fs(uri)
        try:
            self._instances = self._open_instances(fs, path)
            self._open_wsi()
            self.meta = self._inspect()
        except BaseException:
            self.close()
            raise

    # --- opening ----------------------------------------------------------------------------
    def _open_instances(self, fs: Any, path: str) -> list[_Instance]:
        """Every VOLUME instance of the slide, its header read and checked."""
        from pydicom.uid import UID
        from wsidicom.errors import WsiDicomFileError, WsiDicomNotSupportedError
        from wsidicom.file.io import WsiDicomReader
        from wsidicom.file.io.wsidicom_io import WsiDicomReadIO
        from wsidicom.metadata import ImageType

        uri = self.uri
        with reading(uri):
            if not is_local(uri):
                fs.invalidate_cache(path)
            folder = fs.isdir(path)
            files = dicom_files(fs, path) if folder else [path]
        if folder and not files:
            raise InputError(f"{uri}: the folder holds no DICOM files (*.dcm or files starting "
                             "with the DICOM preamble); point to a folder of slide instances")
        found: list[_Instance] = []
        skipped: Counter[str] = Counter()
        for fpath in files:
            name = f"{uri.rstrip('/')}/{_name(fpath)}" if folder else uri
            with reading(name):  # OS errors: InputError (missing, forbidden) or StorageError
                fh, size = self._open_file(fs, fpath)
                try:
                    stream = WsiDicomReadIO(fh, self._upath(fpath))
                except WsiDicomFileError as e:
                    raise InputError(f"{name}: not a DICOM file (no preamble and file meta "
                                     f"information: {e}); remove it from the slide folder or "
                                     "export it again") from e
                except (EOFError, ValueError, KeyError, AttributeError, struct.error) as e:
                    raise InputError(f"{name}: truncated or corrupt DICOM file meta information"
                                     f" ({type(e).__name__}: {e}); copy or export the file "
                                     "again") from e
                sop = UID(str(stream.media_storage_sop_class_uid or ""))
                if sop != WSI_SOP_CLASS:
                    skipped[f"{sop.name or sop or 'no SOP class'}"] += 1
                    if not folder:
                        raise InputError(
                            f"{name}: a DICOM {sop.name or sop} instance, not a VL Whole Slide "
                            "Microscopy Image; segcore reads DICOM whole-slide images (convert "
                            "the slide with a WSI DICOM converter such as wsidicomizer)")
                    continue
                try:
                    reader = WsiDicomReader(stream)
                except WsiDicomNotSupportedError as e:
                    if not folder or "not a whole slide image" not in str(e):
                        ts = stream.transfer_syntax
                        fix = ("the frames are already in a syntax segcore decodes, so it is "
                               "the header wsidicom refuses: export the slide again with a WSI "
                               "DICOM converter (e.g. wsidicomizer)" if str(ts) in READABLE_TS
                               else "export it with JPEG, JPEG 2000 or uncompressed 8-bit "
                               "frames")
                        err = InputError(f"{name}: a VL Whole Slide Microscopy Image that "
                                         f"cannot be read ({e}; transfer syntax {ts.name}); "
                                         f"{fix}")
                        err.frames_may_read = True  # open_dicom tries the frames reader
                        raise err from e
                    skipped["VL WSI of another image type"] += 1
                    continue
                except (EOFError, WsiDicomFileError, ValueError, KeyError, IndexError,
                        struct.error) as e:
                    raise InputError(f"{name}: truncated or corrupt DICOM header "
                                     f"({type(e).__name__}: {e}); copy or export the file "
                                     "again") from e
            if reader.image_type != ImageType.VOLUME:
                skipped[f"{reader.image_type.value} image"] += 1
                continue
            found.append(_Instance(name, reader, stream, size))
        if not found:
            kinds = ", ".join(f"{n} x {k}" for k, n in sorted(skipped.items())) or "nothing"
            err = InputError(f"{uri}: no VL Whole Slide Microscopy Image pyramid level (VOLUME "
                             f"instance) here; found {kinds}; point to the slide's folder or "
                             "one of its VOLUME instances")
            # VL WSI instances whose ImageType wsidicom does not know: their frames may read
            err.frames_may_read = "VL WSI of another image type" in skipped
            raise err
        _check_tiled_full(found)
        series = sorted({str(i.reader.uids.slide.series_instance) for i in found})
        if len(series) > 1:
            raise InputError(f"{uri}: holds instances of {len(series)} slides (series "
                             f"{', '.join(series)}); put each slide in its own folder")
        return found

    def _upath(self, fpath: str) -> Any:
        from upath import UPath

        if is_local(self.uri):
            return UPath(fpath)
        protocol = self.uri.split("://", 1)[0]
        return UPath(f"{protocol}://{fpath}", **storage_options(self.uri))

    def _open_file(self, fs: Any, fpath: str) -> tuple[Any, int]:
        """(file object, size); closed in ``close``."""
        if is_local(self.uri):
            fh = open(fpath, "rb")  # noqa: SIM115
            size = os.fstat(fh.fileno()).st_size
        else:
            fh = fs.open(fpath, "rb", block_size=2**20, cache_type="readahead")
            size = int(fh.size)
        self._fhs.append(fh)
        return fh, size

    def _open_wsi(self) -> None:
        from wsidicom import Settings, WsiDicom, use_settings
        from wsidicom.errors import (
            WsiDicomError,
            WsiDicomMatchError,
            WsiDicomNoResolutionError,
            WsiDicomNotFoundError,
            WsiDicomUidDuplicateError,
        )
        from wsidicom.file import WsiDicomFileSource

        settings = Settings(strict_tile_size_check=False, decoded_frame_cache_size=_CACHE_BYTES,
                            encoded_frame_cache_size=_CACHE_BYTES // 4)
        try:
            with use_settings(settings):
                source = WsiDicomFileSource([i.stream for i in self._instances])
                self._wsi = WsiDicom(source, True, settings=settings)
        except WsiDicomNoResolutionError as e:
            raise InputError(f"{self.uri}: the slide has no PixelSpacing (shared functional "
                             "groups, Pixel Measures); export it with its pixel spacing") from e
        except (WsiDicomError, WsiDicomMatchError, WsiDicomNotFoundError,
                WsiDicomUidDuplicateError, NotImplementedError, ValueError, KeyError) as e:
            raise InputError(f"{self.uri}: the DICOM instances do not form a readable slide "
                             f"pyramid ({type(e).__name__}: {e})") from e

    # --- metadata ---------------------------------------------------------------------------
    def _inspect(self) -> SourceMeta:
        wsi, uri = self._wsi, self.uri
        pyramids = list(wsi.pyramids)
        self._pyramid = max(range(len(pyramids)), key=lambda i: pyramids[i].size.area)
        self._levels = list(pyramids[self._pyramid].levels)
        base = self._levels[0]
        data = base.default_instance.image_data
        spp = int(data.samples_per_pixel)
        self._dtype = output_dtype(data.dtype, uri)
        paths = list(base.optical_paths)
        if spp == 1 and len(paths) > 1:  # fluorescence: one optical path per channel
            for i, lv in enumerate(self._levels[1:], 1):
                if sorted(lv.optical_paths) != sorted(paths):
                    raise InputError(
                        f"{uri}: level {i} has optical paths {sorted(lv.optical_paths)}, "
                        f"level 0 has {sorted(paths)}; every level needs every channel")
            paths.sort(key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0, p))
            self._paths: list[str | None] = paths
        else:
            self._paths = [None]
        channels = spp * len(self._paths)
        mpp = base.mpp  # micrometres per pixel (width, height) from PixelSpacing
        self._set_background()
        return SourceMeta(
            uri=uri,
            format="dicom",
            level_shapes=tuple((int(lv.size.height), int(lv.size.width)) for lv in self._levels),
            channels=channels,
            dtype=self._dtype.name,
            pixel_size=(float(mpp.width) + float(mpp.height)) / 2,
            pixel_unit="micrometer",
            # several optical paths: the channels are named by their identifiers
            channel_names=clean_names(paths, channels) if len(self._paths) > 1 else None,
        )

    def _set_background(self) -> None:
        """Absent frames of a sparse level read as RecommendedAbsentPixelCIELabValue when the
        base instance states one (wsidicom's own fill is white for colour, black for grey)."""
        lab = self._absent_lab()
        if lab is None:
            return
        rgb = lab_to_rgb(lab)
        for lv in self._levels:
            for inst in lv.instances.values():
                data = inst.image_data
                spp, th, tw = data.samples_per_pixel, data.tile_size.height, data.tile_size.width
                if spp == 3:
                    fill: Any = rgb
                else:  # grey: the lightness, scaled to the pixel type
                    fill = round(lab[0] / 65535 * np.iinfo(data.dtype).max)
                shape = (th, tw, spp) if spp != 1 else (th, tw)
                # blank_tile is a functools.cached_property: assigning replaces the cache
                data.blank_tile = np.full(shape, fill, data.dtype)

    def _absent_lab(self) -> tuple[int, int, int] | None:
        from pydicom.filereader import read_partial

        base = max(self._instances, key=lambda i: i.reader.dataset.image_size.area)
        stream, fh = base.stream, base.stream.stream
        with stream.exclusive():
            pos = fh.tell()
            try:
                fh.seek(0)
                ds = read_partial(fh, stop_when=lambda tag, vr, length: tag > 0x00480015,
                                  defer_size=4096)
            except Exception:  # noqa: BLE001 - the header was read once already; no fill then
                return None
            finally:
                fh.seek(pos)
        value = ds.get(_ABSENT_LAB)
        if value is None or value.value is None or len(value.value) != 3:
            return None
        return tuple(int(v) for v in value.value)  # type: ignore[return-value]

    # --- reading ----------------------------------------------------------------------------
    def open_level(self, level: int) -> None:
        if level in self._checked:
            return
        lv = self._levels[level]
        shape = (lv.size.width, lv.size.height)
        for inst in self._instances:
            ds = inst.reader.dataset
            if (ds.image_size.width, ds.image_size.height) == shape:
                self._check_frames(inst, level)
        self._checked.add(level)

    def _check_frames(self, inst: _Instance, level: int) -> None:
        """Every frame of an instance file lies inside the file and the pixel data holds as
        many frames as NumberOfFrames says (the frame index is read: the basic or extended
        offset table, or the item headers when the file has no table)."""
        from wsidicom.errors import WsiDicomError, WsiDicomFileError

        name, reader, size = inst.name, inst.reader, inst.size
        try:
            index = reader.frame_index
        except OSError as e:
            raise StorageError(f"{name}: read failed: {e}") from e
        except (EOFError, WsiDicomFileError, WsiDicomError, ValueError, KeyError,
                IndexError, struct.error) as e:
            raise InputError(
                f"{name}: truncated or corrupt pixel data of level {level} "
                f"({type(e).__name__}: {e}); copy or export the file again") from e
        n = reader.frame_count
        if len(index) < n:
            raise InputError(
                f"{name}: missing frames: NumberOfFrames is {n} but the pixel data holds "
                f"{len(index)} (level {level}); the file is truncated or was written "
                "incompletely: export it again")
        ends = [p + ln for p, ln in index]
        bad = sum(1 for e in ends if e > size)
        if bad:
            raise InputError(
                f"{name}: truncated DICOM: {bad} of {len(ends)} frames of level {level} lie "
                f"beyond the end of the file ({size} bytes); copy or export the file again")

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from wsidicom.errors import WsiDicomFileError, WsiDicomNotFoundError

        lv = self._levels[level]
        where = f"y {y0}:{y1}, x {x0}:{x1} (level {level})"
        planes = []
        for path in self._paths:
            try:
                arr = self._wsi.read_region((x0, y0), lv.level, (x1 - x0, y1 - y0), path=path,
                                            pyramid=self._pyramid, threads=1, as_array=True)
            except FileNotFoundError as e:
                raise InputError(f"{self.uri}: file vanished while reading {where}: {e}") from e
            except OSError as e:
                raise StorageError(f"{self.uri}: I/O error reading {where}: {e}") from e
            except (WsiDicomFileError, WsiDicomNotFoundError, EOFError, ValueError,
                    RuntimeError, struct.error) as e:  # decoder errors (imagecodecs: RuntimeError)
                raise InputError(
                    f"{self.uri}: cannot decode region {where}: {type(e).__name__}: {e}; the "
                    "file is corrupt or truncated") from e
            planes.append(arr[..., None] if arr.ndim == 2 else arr)
        out = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
        # a one-frame region can be a view of wsidicom's cached frame: never hand that out
        return to_output(np.array(out, order="C", copy=True), self._dtype)

    def close(self) -> None:
        wsi, self._wsi = self._wsi, None
        if wsi is not None:
            try:
                wsi.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        for fh in self._fhs:
            try:
                fh.close()
            except Exception:  # noqa: BLE001
                pass
        self._fhs.clear()
        self._instances = []
