"""PNG/JPEG source (Pillow). These files are small: decoded whole once on the first read.

Modes: 1/L/LA/P -> grey or RGB (alpha dropped), RGB/RGBA/CMYK/YCbCr -> RGB, I;16 -> uint16,
I -> uint16 (16-bit grey PNG), F -> float32. 16-bit RGB(A) PNGs, which Pillow reduces to 8 bits,
are decoded with imagecodecs instead. EXIF orientation is not applied (pixels as stored).
The pixel size comes from the file's density, as TIFF's XResolution does: PNG ``pHYs`` in
pixels per metre, JPEG JFIF (or EXIF) dots per inch or per cm; none when the file gives only
an aspect ratio.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segcore.errors import InputError
from segcore.io.pixels import Source, SourceMeta
from segcore.io.uri import read_bytes

_MODES = {  # mode -> (channels, dtype)
    "1": (1, "uint8"),
    "L": (1, "uint8"),
    "LA": (1, "uint8"),
    "La": (1, "uint8"),
    "P": (3, "uint8"),
    "PA": (3, "uint8"),
    "RGB": (3, "uint8"),
    "RGBA": (3, "uint8"),
    "RGBa": (3, "uint8"),
    "RGBX": (3, "uint8"),
    "CMYK": (3, "uint8"),
    "YCbCr": (3, "uint8"),
    "I;16": (1, "uint16"),
    "I;16B": (1, "uint16"),
    "I;16L": (1, "uint16"),
    "I": (1, "uint16"),
    "F": (1, "float32"),
}


class PilSource(Source):
    def __init__(self, uri: str, fmt: str) -> None:
        self.uri = uri
        self._data: bytes | None = read_bytes(uri)
        self._pixels: np.ndarray | None = None
        self._png16 = (
            fmt == "png"
            and len(self._data) > 25
            and self._data[24] == 16
            and (
                self._data[25] in (2, 6)  # 16-bit RGB / RGBA
            )
        )
        try:
            with Image.open(io.BytesIO(self._data)) as im:
                mode, (w, h) = im.mode, im.size
                dpi = im.info.get("dpi")
        except Image.DecompressionBombError as e:  # a tiny file that declares a huge image
            raise InputError(
                f"{uri}: refused, a possible decompression bomb ({e}); PNG/JPEG are decoded "
                "whole: if the image is real, convert it to a tiled TIFF or a chunked Zarr "
                "(e.g. vips tiffsave --tile) and segment that") from e
        except (OSError, ValueError) as e:
            raise InputError(f"{uri}: not a readable {fmt.upper()} ({e})") from e
        if self._png16:
            channels, dtype = 3, "uint16"
        elif mode in _MODES:
            channels, dtype = _MODES[mode]
        else:
            raise InputError(f"{uri}: image mode {mode!r} is not supported; save it as RGB or grey")
        self._mode = mode
        self.meta = SourceMeta(
            uri=uri, format=fmt, level_shapes=((h, w),), channels=channels, dtype=dtype
        )
        try:
            dx = float(dpi[0]) if dpi else 0.0
        except (TypeError, ValueError, IndexError):
            dx = 0.0
        if dx > 0 and dx == dx:  # Pillow gives dots per inch for pHYs (metres) and JFIF units
            self.meta.pixel_size, self.meta.pixel_unit = 25400.0 / dx, "micrometer"

    def _decode(self) -> np.ndarray:
        if self._data is None:
            raise InputError(f"{self.uri}: scene is closed")
        try:
            if self._png16:
                import imagecodecs

                arr = imagecodecs.png_decode(self._data)[..., :3]
            else:
                arr = self._decode_pil()
        except InputError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, RuntimeError) as e:
            raise InputError(f"{self.uri}: cannot decode image: {e}; the file is corrupt") from e
        if arr.ndim == 2:
            arr = arr[..., None]
        return np.ascontiguousarray(arr.astype(self.meta.dtype, copy=False))

    def _decode_pil(self) -> np.ndarray:
        with Image.open(io.BytesIO(self._data)) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "LA", "La"):
                im = im.convert("L")
            elif mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            arr = np.asarray(im)
        if mode == "I":
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise InputError(f"{self.uri}: 32-bit integer pixels outside 0..65535")
            arr = arr.astype(np.uint16)
        return arr

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._decode()
        return self._pixels[y0:y1, x0:x1].copy()

    def close(self) -> None:
        self._data = None
        self._pixels = None
