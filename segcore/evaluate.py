"""Score a checkpoint on labelled data: per-image and mean Dice, IoU, pixel error, Rand error,
MAE, and maxF (beta^2 = 0.3); overlay PNGs of the worst images.

Images are predicted whole (padded to the model's input multiple; resized first when the
checkpoint was trained with ``resize``, the probabilities resized back to the truth's full
resolution), or, with ``tiled=True``, through the tiled pipeline (``segcore.pipeline.segment``)
exactly as a large scene would be.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcore.config import check_input_dtype
from segcore.errors import ConfigError
from segcore.io.uri import join, read_bytes, write_bytes_atomic
from segcore.models.checkpoint import load_checkpoint
from segcore.training.data import load_folder, select_channels
from segcore.training.metrics import image_metrics, max_f
from segcore.training.predict import predict_image


def overlay_png(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> bytes:
    """Image in grey with false positives red, false negatives blue, true positives green."""
    from PIL import Image

    g = image.astype(np.float32)
    g = g.mean(axis=2) if g.ndim == 3 else g
    if image.dtype != np.uint8:  # 16-bit / float: stretch 1-99 percentiles to 0-255
        finite = g[np.isfinite(g)]
        lo, hi = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
        g = np.nan_to_num((g - lo) * (255.0 / max(float(hi - lo), 1e-12)), nan=0.0)
    rgb = np.repeat(g[..., None], 3, axis=2) * 0.6
    t, p = truth.astype(bool), pred.astype(bool)
    for sel, col in ((t & p, (0, 200, 0)), (~t & p, (255, 0, 0)), (t & ~p, (0, 80, 255))):
        rgb[sel] = rgb[sel] * 0.5 + np.array(col, np.float32) * 0.5
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tiled_predict(model_uri: str, image: np.ndarray, tile: int, device: str) -> np.ndarray:
    try:
        from segcore.pipeline import SegmentConfig, segment
    except ImportError as e:
        raise ConfigError("tiled evaluation needs segcore.pipeline.segment, which is not "
                          f"importable here ({e}); evaluate without --tiled") from e
    import tifffile
    import zarr

    with tempfile.TemporaryDirectory(prefix="segcore-eval-") as tmp:
        src = str(Path(tmp) / "image.tif")
        tifffile.imwrite(src, image, photometric="rgb" if image.ndim == 3 and image.shape[2] == 3
                         else "minisblack")
        out = str(Path(tmp) / "out")
        segment(SegmentConfig(src=src, out=out, model=model_uri, tile=tile, device=device,
                              amp="none", skip_background=False, foreground="all",
                              prob_dtype="float16", pyramid=False), progress=False)
        arr = zarr.open_array(str(Path(out) / "result.zarr" / "0"), mode="r")
        return np.asarray(arr[0], dtype=np.float32)


def evaluate(model_uri: str, data: str, tiled: bool = False, stems: str | None = None,
             class_map: Any = None, rand_regions: str | None = None, out: str | None = None,
             worst: int = 3, device: str = "cpu", tile: int = 512, bf16: bool = False,
             threshold: float = 0.5, tta: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_uri`` on a folder of image/mask pairs; returns (and, with ``out``,
    writes ``metrics.json`` and ``worst_*.png`` under ``out``) a dict with ``mean`` and
    ``images``. ``tta`` ("d8" or "hflip", see predict_image) is for the whole-image path.
    ``class_map`` and the resize default to what the checkpoint was trained with;
    ``rand_regions`` defaults to "background" when class 1 is named membrane/boundary
    (ISBI: the cells are the non-membrane regions), else "foreground"."""
    t0 = time.perf_counter()
    if tta and tiled:
        raise ConfigError("tta is for whole-image evaluation; drop --tta or --tiled")
    model, ckpt = load_checkpoint(model_uri, device)
    extra = ckpt.extra
    cmap = class_map if class_map is not None else extra.get("class_map", "binary")
    if isinstance(cmap, dict):
        cmap = {int(k): int(v) for k, v in cmap.items()}
    if rand_regions is None:
        name = ckpt.contract.class_names[-1].lower()
        rand_regions = "background" if name in ("membrane", "boundary", "border") else "foreground"
    if rand_regions not in ("foreground", "background"):
        raise ConfigError(f"rand_regions {rand_regions!r} must be 'foreground' or 'background'")
    samples = load_folder(data, stems, cmap)
    want = ckpt.contract.channel_names
    if want:  # images that name their channels give the model its own, by name
        samples = [select_channels(s, list(want), s.image_uri) if s.channel_names else s
                   for s in samples]
    resize = extra.get("resize")
    norm = ckpt.contract.normalization
    dev = torch.device(device)
    rows, truths, probs = [], [], []
    for s in samples:
        if s.image.shape[2] != ckpt.contract.channels:
            raise ConfigError(f"{s.image_uri}: {s.image.shape[2]} channels but the model takes "
                              f"{ckpt.contract.channels}")
        check_input_dtype(str(s.image.dtype), ckpt.contract, s.image_uri, model_uri)
        if tiled:
            prob = _tiled_predict(model_uri, s.image[..., 0] if s.image.shape[2] == 1 else s.image,
                                  tile, device)
        else:
            prob = predict_image(model, s.image, norm, dev, resize, bf16, tta=tta,
                                 nodata=s.nodata)
        m = image_metrics(s.mask, prob, rand_regions, threshold)
        rows.append({"stem": s.stem, "image": s.image_uri, **m})
        truths.append(s.mask)
        probs.append(prob)
    mf, thr = max_f(truths, probs)
    keys = ("dice", "iou", "pixel_error", "rand_error", "mae")
    result: dict[str, Any] = {
        "model": model_uri, "data": data, "stems": stems, "n_images": len(rows),
        "tiled": tiled, "tta": tta, "resize": resize, "rand_regions": rand_regions,
        "rand_error_impl": "skimage.metrics.adapted_rand_error on 4-connected components",
        "mean": {**{k: float(np.mean([r[k] for r in rows])) for k in keys},
                 "max_f": mf, "max_f_threshold": thr},
        "seconds": round(time.perf_counter() - t0, 2), "images": rows,
    }
    if out:
        order = np.argsort([r["dice"] for r in rows])[:worst]
        written = []
        for i in order:
            s = samples[int(i)]
            uri = join(out, f"worst_{len(written)}_{s.stem}.png")
            write_bytes_atomic(uri, overlay_png(s.image, s.mask, probs[int(i)] >= threshold))
            written.append(uri)
        result["overlays"] = written
        write_bytes_atomic(join(out, "metrics.json"), json.dumps(result, indent=2).encode())
    return result


def load_metrics(uri: str) -> dict[str, Any]:
    return json.loads(read_bytes(uri))
