"""IoU of predicted object polygons against reference polygons (any two GDAL vector files in
the same CRS), inside an optional clip box: the area IoU of the two unions, and object F1 at
polygon IoU 0.5 (one-to-one matches; above 0.5 a match is unique).

    .venv/bin/python scripts/vector_iou.py PRED.gpkg TRUTH.geojson [--clip X0,Y0,X1,Y1]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import geopandas as gpd
    import shapely

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pred")
    ap.add_argument("truth")
    ap.add_argument("--clip", help="x0,y0,x1,y1 in the files' CRS")
    args = ap.parse_args()
    pred, truth = gpd.read_file(args.pred), gpd.read_file(args.truth)
    if pred.crs != truth.crs:
        truth = truth.to_crs(pred.crs)
    p, t = pred.geometry.values, truth.geometry.values
    if args.clip:
        box = shapely.box(*map(float, args.clip.split(",")))
        p = shapely.intersection(p[shapely.intersects(p, box)], box)
        t = shapely.intersection(t[shapely.intersects(t, box)], box)
    up, ut = shapely.union_all(p), shapely.union_all(t)
    area_iou = shapely.area(shapely.intersection(up, ut)) / shapely.area(shapely.union(up, ut))
    tree = shapely.STRtree(p)
    tp = 0
    for g in t:
        for j in tree.query(g, predicate="intersects"):
            inter = shapely.area(shapely.intersection(g, p[j]))
            if inter / (g.area + p[j].area - inter) > 0.5:
                tp += 1
                break
    fp, fn = len(p) - tp, len(t) - tp
    out = {"area_iou": round(float(area_iou), 4), "f1@0.5": round(2 * tp / max(1, 2 * tp + fp + fn), 4),
           "true_objects": len(t), "pred_objects": len(p), "tp": tp, "crs": str(pred.crs)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
