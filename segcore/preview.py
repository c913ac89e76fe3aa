"""preview.png: the mask (from a coarse pyramid level) over a thumbnail of the scene."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segcore.io.uri import join, write_bytes_atomic

PALETTE = np.array([[0, 0, 0], [255, 64, 64], [64, 160, 255], [64, 255, 64], [255, 200, 0],
                    [200, 0, 255]], np.uint8)


def _thumbnail(scene_uri: str, shape: tuple[int, int], info_level: int) -> np.ndarray | None:
    """A grey/RGB thumbnail of the scene at ``shape`` from its coarsest level, if small."""
    from segcore.io.readers import open_scene

    try:
        with open_scene(scene_uri, level=info_level) as s0:
            levels = s0.info.level_shapes
        lv = len(levels) - 1
        h, w = levels[lv]
        if h * w > 4096 * 4096:
            return None
        with open_scene(scene_uri, level=lv) as s:
            img = s.read(0, h, 0, w)
    except Exception:  # noqa: BLE001 - the preview is a convenience; never fail a run for it
        return None
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, 1), np.percentile(img, 99)
    img = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.BILINEAR))


def write_preview(p, uri: str, max_side: int = 1024) -> None:
    from segcore.io.zarrstore import open_group

    root = open_group(join(p.cfg.out, "result.zarr"), mode="r")
    grp = root["labels/mask"]
    levels = sorted(int(k) for k in grp.array_keys() if k.isdigit())
    lv = next((lv for lv in levels if max(grp[str(lv)].shape) <= max_side), levels[-1])
    mask = np.asarray(grp[str(lv)][:])
    stride = max(1, int(np.ceil(max(mask.shape) / max_side)))
    mask = mask[::stride, ::stride]
    colour = PALETTE[mask % len(PALETTE)]
    thumb = _thumbnail(p.cfg.src, mask.shape, p.info.level)
    if thumb is None:
        out = colour
    else:
        a = (mask > 0)[..., None] * 0.45
        out = (thumb * (1 - a) + colour * a).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    write_bytes_atomic(uri, buf.getvalue())
