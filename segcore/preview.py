"""preview.png: the mask (from a coarse pyramid level) over a thumbnail of the scene."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segcore.io.uri import join, write_bytes_atomic

PALETTE = np.array([[0, 0, 0], [255, 64, 64], [64, 160, 255], [64, 255, 64], [255, 200, 0],
                    [200, 0, 255]], np.uint8)


BAND_PIXELS = 4 * 1024 * 1024  # pixels per band read for the thumbnail (bounds its memory)


def _sampled(scene, shape: tuple[int, int]) -> np.ndarray:
    """The whole of ``scene`` sampled at ``shape`` (nearest pixel centres), read in bands of at
    most ``BAND_PIXELS`` so memory stays bounded by the band and the output, not the level."""
    h, w = scene.info.height, scene.info.width
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    out = np.empty((*shape, min(scene.info.channels, 3)), scene.info.dtype)
    band = max(1, BAND_PIXELS // w)
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        sel = np.flatnonzero((rows >= y0) & (rows < y1))
        if sel.size:
            block = scene.read(y0, y1, 0, w)
            out[sel] = block[rows[sel] - y0][:, cols, : out.shape[-1]]
    return out


def _thumbnail(scene_uri: str, shape: tuple[int, int], info_level: int,
               channels: tuple[int, ...] | None = None,
               channel_names: tuple[str, ...] | None = None) -> np.ndarray | None:
    """A grey/RGB thumbnail of the scene (its ``channels``, if selected) at ``shape`` from its
    coarsest level, if small. Memory is bounded (banded reads, sampled at ``shape``)."""
    from segcore.io.readers import open_scene

    try:
        with open_scene(scene_uri, level=info_level, channels=channels,
                        channel_names=channel_names) as s0:
            levels = s0.info.level_shapes
            lv = len(levels) - 1
            h, w = levels[lv]
            if h * w > 4096 * 4096:
                return None
            with s0.at_level(lv) as s:
                img = _sampled(s, shape)
    except Exception:  # noqa: BLE001 - the preview is a convenience; never fail a run for it
        return None
    return _stretch(img)


def _from_tasks(p, results: list[dict] | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The thumbnail the shard tasks sampled from the windows they read anyway (every
    ``p.thumb_stride``-th pixel of each core), or None if any tile did not send one (resumed
    or background tiles): then the scene is read again."""
    thumbs = [r["thumb"] for r in results or () if "thumb" in r]
    if not thumbs or len(thumbs) != len(p.grid.tiles):
        return None
    out = np.zeros((*shape, thumbs[0][2].shape[-1]), thumbs[0][2].dtype)
    for ty, tx, a in thumbs:
        out[ty:ty + a.shape[0], tx:tx + a.shape[1]] = a[: shape[0] - ty, : shape[1] - tx]
    return out


def _stretch(img: np.ndarray) -> np.ndarray:
    """The 1-99 percentile range stretched to 0-255, RGB. Integer images of up to 16 bits go
    through a lookup table (one gather instead of five float passes: 1024^2 RGB in ~10 ms)."""
    img = img if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 65536)))  # ~64k samples suffice
    if img.dtype.kind == "f":  # NaN (nodata) shows as the darkest value
        finite = img[::step, ::step][np.isfinite(img[::step, ::step])]
        lo, hi = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
        img = np.nan_to_num(img, nan=lo, posinf=hi, neginf=lo)
    else:
        lo, hi = np.percentile(img[::step, ::step], (1, 99))
    scale = 255 / max(float(hi - lo), 1e-6)
    if img.dtype in (np.uint8, np.uint16):
        lut = np.arange(np.iinfo(img.dtype).max + 1, dtype=np.float32)
        lut = np.clip((lut - lo) * scale, 0, 255).astype(np.uint8)
        return lut[img]
    return np.clip((img.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)


def from_tasks_alone(p, results: list[dict] | None) -> bool:
    """True if the preview can be made from what the shard tasks returned (mask blocks and
    thumbnails of every tile), without reading the result's pyramid: it may then be made
    while the pyramid is still being built."""
    return bool(p.thumb_stride and 2 ** p.preview_level == p.thumb_stride and results and
                sum("thumb_mask" in r for r in results) == len(p.grid.tiles) and
                sum("thumb" in r for r in results) == len(p.grid.tiles))


def _mask_from_tasks(p, results: list[dict] | None) -> np.ndarray | None:
    """The preview level's mask as the shard tasks returned it (each core's block of that
    level, which they wrote anyway), or None if any tile did not send one."""
    from segcore.io.zarrstore import level_shape

    blocks = [r["thumb_mask"] for r in results or () if "thumb_mask" in r]
    if not blocks or len(blocks) != len(p.grid.tiles):
        return None
    out = np.zeros(level_shape(p.info.height, p.info.width, p.preview_level), np.uint8)
    for y0, x0, a in blocks:
        out[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a
    return out


def write_preview(p, uri: str, results: list[dict] | None = None, max_side: int = 1024) -> None:
    from segcore.io.zarrstore import open_group

    mask, lv, stride = None, p.preview_level, 1
    if p.thumb_stride and 2 ** lv == p.thumb_stride:
        mask = _mask_from_tasks(p, results)
    if mask is None:  # read the mask's pyramid (resumed or background tiles, big scenes)
        root = open_group(join(p.cfg.out, "result.zarr"), mode="r")
        grp = root["labels/mask"]
        levels = sorted(int(k) for k in grp.array_keys() if k.isdigit())
        lv = next((lv for lv in levels if max(grp[str(lv)].shape) <= max_side), levels[-1])
        mask = np.asarray(grp[str(lv)][:])
        stride = max(1, int(np.ceil(max(mask.shape) / max_side)))
        mask = mask[::stride, ::stride]
    colour = PALETTE[mask % len(PALETTE)]
    thumb = None
    if stride == 1 and 2 ** lv == p.thumb_stride:
        thumb = _from_tasks(p, results, mask.shape)
        thumb = None if thumb is None else _stretch(thumb)
    if thumb is None:
        thumb = _thumbnail(p.cfg.src, mask.shape, p.info.level, p.channels,
                           p.cfg.channel_names)
    if thumb is None:
        out = colour
    else:  # 45% class colour over the thumbnail, on labelled pixels only
        out = np.ascontiguousarray(thumb[..., :3])
        on = (mask > 0) & (mask != 255)  # 255: nodata (segcore.inference.NODATA_LABEL)
        out[on] = (out[on] * np.float32(0.55) + colour[on] * np.float32(0.45)).astype(np.uint8)
    image = Image.fromarray(out)
    _legend(image, mask, tuple(getattr(p, "class_names", ()) or ()))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    write_bytes_atomic(uri, buf.getvalue())


LEGEND_MIN_SIDE = 96  # smaller previews get no legend (it would cover them)


def _legend(image: Image.Image, mask: np.ndarray, names: tuple[str, ...]) -> bool:
    """A legend in the bottom-left corner: a swatch of each class colour the preview shows
    and its name (the label number where the model names none). Returns whether drawn."""
    from PIL import ImageDraw, ImageFont

    if min(image.size) < LEGEND_MIN_SIDE:
        return False
    counts = np.bincount(mask.ravel(), minlength=256)
    shown = [k for k in range(1, 255) if counts[k]]
    if not shown:
        return False
    font = ImageFont.load_default()
    labels = [names[k] if k < len(names) else str(k) for k in shown]
    row, pad, box = 14, 4, 10
    width = pad * 3 + box + max(int(font.getlength(t)) for t in labels)
    height = pad * 2 + row * len(labels)
    x0, y0 = 4, image.size[1] - 4 - height
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x0 + width, y0 + height], fill=(0, 0, 0))
    for i, (k, text) in enumerate(zip(shown, labels, strict=True)):
        y = y0 + pad + i * row
        colour = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        draw.rectangle([x0 + pad, y + 1, x0 + pad + box, y + 1 + box], fill=colour)
        draw.text((x0 + 2 * pad + box, y), text, fill=(255, 255, 255), font=font)
    return True
