"""Labelled data: folder pairs (images/ + masks/, matched by stem) and Zarr scene/mask pairs,
local or any fsspec URI; class maps; random patch sampling with foreground oversampling.

TIFF images are read by segcore's scene reader, so multi-band uint16/float32 images (GeoTIFF,
OME-TIFF) keep their channel names and nodata value; ``channels`` selects and orders channels
as ``segment --channels`` does. :func:`input_stats` measures the per-channel statistics a
``stats`` normalisation stores in the checkpoint.

Everything is loaded once into memory as tensors (training sets here are small; a Zarr pair is
read lazily, patch by patch). Sampling draws from one ``torch.Generator`` so a run is
reproducible and resumable bit for bit.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segcore.errors import DataError, InputError
from segcore.io.uri import get_fs, join, read_bytes

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_DIRS = ("images", "image", "imgs")
MASK_DIRS = ("masks", "mask", "label", "labels")


def parse_stems(spec: str | None) -> set[str] | None:
    """'0-24' -> {'0'..'24'}; '0001-0250' keeps zero padding; 'a,b' -> {'a','b'}."""
    if spec is None:
        return None
    out: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            a, b = m.groups()
            width = len(a) if a.startswith("0") and len(a) > 1 else 0
            out.update(str(i).zfill(width) for i in range(int(a), int(b) + 1))
        elif part:
            out.add(part)
    return out


def _decode(data: bytes, uri: str) -> np.ndarray:
    try:
        if uri.lower().endswith((".tif", ".tiff")):
            import tifffile

            return tifffile.imread(io.BytesIO(data))
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("P", "CMYK"):
                im = im.convert("RGB")
            elif im.mode == "LA":
                im = im.convert("L")
            return np.array(im)
    except Exception as e:  # noqa: BLE001 - decoders raise many types; we re-raise with the file
        raise DataError(f"{uri}: cannot decode image ({type(e).__name__}: {e}); "
                        "use PNG, JPEG or TIFF") from e


def read_image(uri: str) -> np.ndarray:
    """HxWxC uint8/uint16 (RGBA alpha dropped), or HxW for greyscale."""
    a = _decode(read_bytes(uri), uri)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    return a


def map_mask(mask: np.ndarray, class_map, uri: str) -> np.ndarray:
    """Raw mask -> uint8 target {0,1}; refuses values the map does not name."""
    if mask.ndim == 3:
        if (mask == mask[..., :1]).all():
            mask = mask[..., 0]
        else:
            raise DataError(f"{uri}: mask has {mask.shape[2]} different channels; "
                            "save masks as single-channel images")
    if class_map == "instances":
        return (mask > 0).astype(np.uint8)
    if class_map == "instances-borders":
        return separate_instances(mask)
    values = np.unique(mask)
    if class_map == "binary":
        if set(values.tolist()) <= {0, 1}:
            return mask.astype(np.uint8)
        mapping = {0: 0, 255: 1}
    else:
        mapping = {int(k): int(v) for k, v in class_map.items()}
    bad = sorted(set(values.tolist()) - set(mapping))
    if bad:
        raise DataError(
            f"{uri}: mask has values {bad[:8]} that the class map {mapping} does not name; "
            "fix the mask, pass class_map (e.g. {0: 1, 255: 0}) or 'instances' for id masks")
    lut = np.zeros(int(max(values.max(), max(mapping))) + 1, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[mask]


def separate_instances(labels: np.ndarray) -> np.ndarray:
    """Instance-id mask -> foreground {0,1} with every pixel that touches a *different* instance
    (8-neighbourhood) set to background: touching objects stay apart in the binary target, as
    in the U-Net paper's cell data (and its border weight map then sees them as two objects)."""
    lab = labels.astype(np.int64)
    big = int(lab.max()) + 1  # not the dtype's max: scipy's minimum_filter overflows on it
    hi = ndimage.maximum_filter(lab, size=3, mode="nearest")
    lo = ndimage.minimum_filter(np.where(lab > 0, lab, big), size=3, mode="nearest")
    return ((lab > 0) & (hi == lab) & (lo == lab)).astype(np.uint8)


@dataclass
class Sample:
    stem: str
    image: np.ndarray  # HxWxC uint8 (or uint16 / float32 for statistics normalisation)
    mask: np.ndarray   # HxW uint8 {0,1}
    image_uri: str = ""
    mask_uri: str = ""
    channel_names: tuple[str, ...] | None = None
    nodata: float | None = None


def read_tiff_image(uri: str, channel_names=None) -> tuple[np.ndarray, tuple | None, float | None]:
    """(HxWxC pixels, channel names, nodata) of a TIFF through segcore's scene reader."""
    from segcore.io.readers import open_scene

    try:
        with open_scene(uri, channel_names=channel_names) as sc:
            i = sc.info
            return sc.read(0, i.height, 0, i.width), i.channel_names, i.nodata
    except DataError:
        raise
    except InputError as e:
        raise DataError(f"{e}; use PNG, JPEG or TIFF") from e


def select_channels(s: Sample, channels, uri: str) -> Sample:
    """``s`` with ``channels`` (names or 1-based indices, as ``segment --channels``)."""
    from segcore.io.readers import resolve_channels

    sel = resolve_channels(channels, s.channel_names, s.image.shape[2], uri)
    if sel is None:
        return s
    names = None if s.channel_names is None else tuple(s.channel_names[i] for i in sel)
    return Sample(s.stem, np.ascontiguousarray(s.image[..., list(sel)]), s.mask, s.image_uri,
                  s.mask_uri, names, s.nodata)


def _list(fs, path: str) -> list[str]:
    try:
        return [p for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def find_pairs(data: str, stems: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(stem, image_uri, mask_uri) for a folder with images/ + masks/ sub-folders."""
    fs, root = get_fs(data)
    if not fs.isdir(root):
        raise DataError(f"{data}: not a folder; pass a folder with images/ and masks/ sub-folders")
    subs = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in _list(fs, root)}
    img_dir = next((d for d in IMAGE_DIRS if d in subs), None)
    mask_dir = next((d for d in MASK_DIRS if d in subs), None)
    if img_dir is None or mask_dir is None:
        raise DataError(f"{data}: expected sub-folders images/ and masks/ (or image/ and label/), "
                        f"found {sorted(subs) or 'nothing'}")

    def by_stem(d: str) -> dict[str, str]:
        out = {}
        for p in _list(fs, join(root, d)):
            name = p.rsplit("/", 1)[-1]
            stem, dot, ext = name.rpartition(".")
            if dot and ("." + ext.lower()) in IMAGE_EXT:
                stem = re.sub(r"_(mask|label)$", "", stem)
                out[stem] = p
        return out

    imgs, masks = by_stem(img_dir), by_stem(mask_dir)
    if stems is not None:  # '0-5' also selects zero-padded stems such as 000..005
        nums = {str(int(s)) for s in stems if s.isdigit()}
        imgs = {k: v for k, v in imgs.items()
                if k in stems or (k.isdigit() and str(int(k)) in nums)}
    if not imgs:
        raise DataError(f"{data}/{img_dir}: no images" + (f" with stems {sorted(stems)[:5]}..."
                        if stems else "") + "; add PNG/JPEG/TIFF files or fix the stem selection")
    missing = sorted(set(imgs) - set(masks))
    if missing:
        raise DataError(f"{data}: images without a mask of the same stem: {missing[:5]}; "
                        f"add {mask_dir}/<stem>.png for each")
    proto = data.split("://", 1)[0] + "://" if "://" in data else ""

    def key(s: str):
        return (0, int(s), s) if s.isdigit() else (1, 0, s)

    return [(s, proto + imgs[s], proto + masks[s]) for s in sorted(imgs, key=key)]


def load_folder(data: str, stems: str | set[str] | None = None, class_map="binary",
                channels=None, channel_names=None) -> list[Sample]:
    """Samples of a folder (or Zarr pair). ``channel_names`` names the images' channels (for
    files without names); ``channels`` then selects and orders them (names or 1-based)."""
    if isinstance(stems, str):
        stems = parse_stems(stems)
    if data.rstrip("/").endswith(".zarr"):
        return [select_channels(s, channels, data) for s in load_zarr_pair(data, class_map)]
    out = []
    for stem, iu, mu in find_pairs(data, stems):
        names = nodata = None
        if iu.lower().endswith((".tif", ".tiff")):
            img, names, nodata = read_tiff_image(iu, channel_names)
        else:
            img = read_image(iu)
        mask = read_image(mu)
        if img.shape[:2] != mask.shape[:2]:
            raise DataError(f"{iu}: image is {img.shape[1]}x{img.shape[0]} but its mask {mu} is "
                            f"{mask.shape[1]}x{mask.shape[0]} (WxH); masks must match their image")
        if img.ndim == 2:
            img = img[..., None]
        if channel_names is not None and names is None:
            if len(channel_names) != img.shape[2]:
                raise DataError(f"{iu}: {img.shape[2]} channel(s) but {len(channel_names)} "
                                "channel names given")
            names = tuple(channel_names)
        if img.dtype not in (np.uint8, np.uint16, np.float32):
            raise DataError(f"{iu}: {img.dtype} image; training reads uint8, uint16 or float32")
        smp = Sample(stem, img, map_mask(mask, class_map, mu), iu, mu, names, nodata)
        out.append(select_channels(smp, channels, iu))
    return out


def load_zarr_pair(uri: str, class_map="binary") -> list[Sample]:
    """A Zarr scene and its mask: either a group with arrays ``image`` (HxWxC or HxW) and
    ``mask`` (HxW), or an image array ``<name>.zarr`` with ``<name>_truth.zarr`` beside it (what
    segcore.synthetic.write_scene writes). Read whole: training scenes must fit in memory."""
    import zarr

    def open_node(u: str):
        fs, path = get_fs(u)
        store = path if "://" not in u else zarr.storage.FsspecStore(fs, path=path, read_only=True)
        return zarr.open(store, mode="r")

    mask_uri = uri.rstrip("/") + "/mask"
    try:
        node = open_node(uri)
        if isinstance(node, zarr.Group):
            img, mask = np.asarray(node["image"][...]), np.asarray(node["mask"][...])
        else:
            mask_uri = uri.rstrip("/")[: -len(".zarr")] + "_truth.zarr"
            img, mask = np.asarray(node[...]), np.asarray(open_node(mask_uri)[...])
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise DataError(f"{uri}: expected a Zarr group with arrays 'image' and 'mask', or an "
                        f"image array with <name>_truth.zarr beside it ({e})") from e
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[:2] != mask.shape[:2]:
        raise DataError(f"{uri}: image {img.shape[:2]} and mask {mask.shape[:2]} sizes differ")
    return [Sample("scene", img.astype(np.uint8), map_mask(mask, class_map, mask_uri), uri,
                   mask_uri)]


def resize_sample(s: Sample, size: int) -> Sample:
    """Resize image (bilinear, antialiased) and mask (nearest) to size x size."""
    img = torch.from_numpy(s.image).permute(2, 0, 1)[None].float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.from_numpy(s.mask)[None, None].float()
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) >= 0.5
    img = img[0].permute(1, 2, 0)
    img = img.round().clamp(0, 255).byte() if s.image.dtype == np.uint8 else \
        img.round().clamp(0, 65535).to(torch.int32) if s.image.dtype == np.uint16 else img
    return Sample(s.stem, img.numpy().astype(s.image.dtype), m[0, 0].numpy().astype(np.uint8),
                  s.image_uri, s.mask_uri, s.channel_names, s.nodata)


@dataclass
class PatchSampler:
    """Random patches (float image in [0,1] NCHW, float mask N1HW) from in-memory samples.
    ``unit``: maps a sample's raw (h, w, c) pixels to float32 in [0, 1] (statistics
    normalisation); without it images must be uint8 and are divided by 255."""

    samples: list[Sample]
    patch: int
    fg_fraction: float = 0.0
    unit: Any = None
    _imgs: list[torch.Tensor] = field(default_factory=list, init=False)
    _masks: list[torch.Tensor] = field(default_factory=list, init=False)
    _fg: list[torch.Tensor] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise DataError("no training samples; check the data folder and stem selection")
        p = self.patch
        for s in self.samples:
            raw = s.image if self.unit is None else self.unit(s.image, s.nodata)
            if raw.dtype != np.uint8 and self.unit is None:
                raise DataError(f"{s.image_uri}: {raw.dtype} image; 8-bit images only with "
                                "normalization 'scale' (use 'stats' or 'auto')")
            img = torch.from_numpy(np.ascontiguousarray(raw)).permute(2, 0, 1)
            m = torch.from_numpy(np.ascontiguousarray(s.mask))[None]
            h, w = m.shape[1:]
            if h < p or w < p:  # reflect-pad small images up to the patch size
                ph, pw = max(0, p - h), max(0, p - w)
                pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
                img = F.pad(img[None].float(), pad, mode="reflect")[0].to(img.dtype)
                m = F.pad(m[None].float(), pad, mode="reflect")[0].byte()
            self._imgs.append(img)
            self._masks.append(m)
            fg = torch.nonzero(m[0].flatten()).flatten()
            if fg.numel() > 20000:
                fg = fg[:: fg.numel() // 20000 + 1]
            self._fg.append(fg)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.patch
        idx = torch.randint(len(self._imgs), (n,), generator=gen)
        want_fg = torch.rand(n, generator=gen) < self.fg_fraction
        u = torch.rand(n, 3, generator=gen)
        imgs, masks = [], []
        for i in range(n):
            img, m, fg = self._imgs[idx[i]], self._masks[idx[i]], self._fg[idx[i]]
            h, w = m.shape[1:]
            if want_fg[i] and fg.numel():
                c = int(fg[int(u[i, 2] * fg.numel()) % fg.numel()])
                cy, cx = divmod(c, w)
                y0 = min(max(cy - p // 2, 0), h - p)
                x0 = min(max(cx - p // 2, 0), w - p)
            else:
                y0 = int(u[i, 0] * (h - p + 1))
                x0 = int(u[i, 1] * (w - p + 1))
            imgs.append(img[:, y0:y0 + p, x0:x0 + p])
            masks.append(m[:, y0:y0 + p, x0:x0 + p])
        x = torch.stack(imgs).float()
        return (x / 255.0 if self.unit is None else x), torch.stack(masks).float()


def channel_stats(samples: list[Sample]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the images in [0,1] (for the checkpoint's normalisation)."""
    c = samples[0].image.shape[2]
    s = np.zeros(c)
    s2 = np.zeros(c)
    n = 0
    for smp in samples:
        if smp.image.shape[2] != c:
            raise DataError(f"{smp.image_uri}: {smp.image.shape[2]} channels, others have {c}; "
                            "all images must have the same number of channels")
        x = smp.image.reshape(-1, c).astype(np.float64) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
        n += x.shape[0]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-8))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


STATS_SAMPLES = 1 << 21  # values per channel the statistics are measured on (evenly strided)


def valid_values(s: Sample) -> np.ndarray:
    """(n, c) float64 pixels of ``s`` that hold data (pixels whose every channel is NaN, +-inf
    or the nodata value are left out; such values of other pixels stay as they are, and the
    statistics skip them)."""
    x = s.image.reshape(-1, s.image.shape[2])
    if x.dtype.kind == "f" or s.nodata is not None:
        bad = ~np.isfinite(x) if x.dtype.kind == "f" else np.zeros(x.shape, bool)
        if s.nodata is not None and s.nodata == s.nodata:
            bad |= x == s.nodata
        x = x[~bad.all(axis=1)]
    return x.astype(np.float64)


def input_stats(samples: list[Sample], percentiles: tuple[float, float] = (0.5, 99.5)
                ) -> dict[str, tuple[float, ...]]:
    """Per-channel robust statistics of the training images in raw units: ``low``/``high`` the
    given percentiles, ``mean``/``std`` of the values clipped to them (NaN and nodata pixels
    left out; at most STATS_SAMPLES values per channel, evenly strided, so it stays cheap)."""
    c = samples[0].image.shape[2]
    for smp in samples:
        if smp.image.shape[2] != c:
            raise DataError(f"{smp.image_uri}: {smp.image.shape[2]} channels, others have {c}; "
                            "all images must have the same number of channels")
    total = sum(int(np.prod(smp.image.shape[:2])) for smp in samples)
    step = max(1, total // STATS_SAMPLES)
    parts = [valid_values(smp)[::step] for smp in samples]
    x = np.concatenate(parts) if parts else np.zeros((0, c))
    low, high, mean, std = [], [], [], []
    for k in range(c):
        v = x[:, k]
        v = v[np.isfinite(v)]
        if not v.size:
            raise DataError(f"channel {k + 1} holds no data (all NaN or nodata) in the training "
                            "images; drop it with --channels")
        lo, hi = (float(q) for q in np.percentile(v, percentiles))
        v = np.clip(v, lo, hi)
        m, sd = float(v.mean()), float(v.std())
        sd = max(sd, 1e-6 * max(1.0, abs(m)), 1e-12)  # a constant channel still divides
        low.append(lo), high.append(hi), mean.append(m), std.append(sd)

    def r(vals):
        return tuple(float(f"{v:.7g}") for v in vals)

    return {"low": r(low), "high": r(high), "mean": r(mean), "std": r(std)}


def unit_mapper(norm) -> Any:
    """(raw (h, w, c), nodata) -> float32 in [0, 1] for a stats normalisation: clip to
    low/high and rescale; NaN, +-inf and nodata pixels take the channel mean's value (the
    model then sees 0 there, as at inference)."""
    lo = np.asarray(norm.low, np.float32)
    hi = np.asarray(norm.high, np.float32)
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    fill = ((np.asarray(norm.mean, np.float32) - lo) / span).astype(np.float32)

    def unit(raw: np.ndarray, nodata: float | None = None) -> np.ndarray:
        x = raw.astype(np.float32)
        bad = ~np.isfinite(x)
        if nodata is not None and nodata == nodata:
            bad |= np.broadcast_to((x == nodata).all(axis=-1, keepdims=True), x.shape)
        x = (np.clip(x, lo, hi) - lo) / span
        return np.where(bad, fill, x).astype(np.float32)

    return unit
