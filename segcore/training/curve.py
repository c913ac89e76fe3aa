"""A training-curve PNG drawn with Pillow (no plotting dependency): loss (moving average) on
the left axis, validation Dice as dots on the right axis."""

from __future__ import annotations

import io

import numpy as np


def curve_png(losses: list[float], val: list[tuple[int, float]], w: int = 640,
              h: int = 360) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 50, w - 50, 20, h - 30
    d.rectangle([left, top, right, bottom], outline="black")
    n = len(losses)
    if n:
        a = np.asarray(losses, dtype=np.float64)
        k = max(1, n // 100)
        sm = np.convolve(a, np.ones(k) / k, mode="valid")
        lo, hi = float(sm.min()), float(sm.max()) or 1.0
        span = hi - lo or 1.0
        xs = left + (np.arange(len(sm)) + k - 1) / max(n - 1, 1) * (right - left)
        ys = bottom - (sm - lo) / span * (bottom - top)
        d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=(30, 80, 200), width=2)
        d.text((5, top), f"{hi:.3f}", fill=(30, 80, 200))
        d.text((5, bottom - 10), f"{lo:.3f}", fill=(30, 80, 200))
        d.text((left, bottom + 8), f"step 0 .. {n}   loss (blue)  val Dice (red, 0..1)", fill="black")
        for s, v in val:
            x = left + (s - 1) / max(n - 1, 1) * (right - left)
            y = bottom - v * (bottom - top)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
