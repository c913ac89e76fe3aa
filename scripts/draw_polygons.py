"""Draw a result's object polygons (OUT/polygons.parquet, pixel coordinates) over a crop of
its scene, to look at them:

    .venv/bin/python scripts/draw_polygons.py OUT --box X0,Y0,X1,Y1 --png crop.png
        [--truth truth.geojson --truth-crs-transform]  (reference polygons in green)

The scene is read through segcore's own reader (any format segment reads); single-band
scenes are stretched (1-99 percentiles) to grey.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageDraw


def main() -> None:
    import geopandas as gpd
    import shapely

    from segcore.io.readers import open_scene
    from segcore.io.uri import join, read_bytes
    from segcore.io.zarrstore import open_group

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--box", required=True, help="x0,y0,x1,y1 in full-resolution pixels")
    ap.add_argument("--png", required=True)
    ap.add_argument("--truth", help="reference polygons (any GDAL vector file) in the scene's CRS")
    ap.add_argument("--scale", type=int, default=1, help="enlarge the crop by this factor")
    args = ap.parse_args()
    x0, y0, x1, y1 = map(int, args.box.split(","))
    attrs = dict(open_group(join(args.out, "result.zarr")).attrs["segcore"])
    with open_scene(attrs["src"], level=attrs.get("level", 0)) as s:
        img = s.read(y0, y1, x0, x1)
    if img.ndim == 3 and img.shape[-1] >= 3:
        rgb = img[..., :3].astype(np.float32)
    else:
        rgb = np.repeat(img.reshape(img.shape[0], img.shape[1], -1)[..., :1], 3, -1).astype(
            np.float32)
    lo, hi = np.percentile(rgb, (1, 99))
    rgb = np.clip((rgb - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    k = args.scale
    canvas = Image.fromarray(rgb).resize((rgb.shape[1] * k, rgb.shape[0] * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    box = shapely.box(x0, y0, x1, y1)

    def outline(geom, colour):
        for poly in getattr(geom, "geoms", [geom]):
            for ring in [poly.exterior, *poly.interiors]:
                pts = [((x - x0) * k, (y - y0) * k) for x, y in ring.coords]
                draw.line(pts, fill=colour, width=max(1, k))

    frame = gpd.read_parquet(io.BytesIO(read_bytes(join(args.out, "polygons.parquet"))))
    for g in frame.geometry[frame.geometry.intersects(box)]:
        outline(g, (255, 40, 40))
    if args.truth:
        geo = attrs.get("geo") or {}
        a, b, c, d, e, f = geo["transform"]
        inv = np.linalg.inv(np.array([[a, b, c], [d, e, f], [0, 0, 1]]))
        truth = gpd.read_file(args.truth).geometry.affine_transform(
            [inv[0, 0], inv[0, 1], inv[1, 0], inv[1, 1], inv[0, 2], inv[1, 2]])
        for g in truth[truth.intersects(box)]:
            outline(g, (40, 255, 40))
    canvas.save(args.png)
    print(args.png)


if __name__ == "__main__":
    main()
