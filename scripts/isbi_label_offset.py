"""How far the ISBI 2012 membrane labels sit from the membranes in the image, to a tenth of a
pixel, measured on the training slices only.

Membranes are dark in these EM slices, so the contrast "mean intensity under the label's
membrane pixels minus the mean elsewhere" is most negative when label and image line up. The
script compares the labels with the image shifted by -2..2 px in each axis, prints the contrast
per shift, and places the best shift to a fraction of a pixel with a parabola through the best
integer shift and its two neighbours (per axis).

    python scripts/isbi_label_offset.py [STEMS]        # default 0-24 (the training slices)

Result used in docs/RESULTS.md: the labels sit about half a pixel *above* the image membranes
(label row y lines up with image row y + ~0.5). A model trained with vertical
flips or 90-degree rotations sees that offset in both directions and can only learn a centred
membrane, which costs it the half pixel on every horizontal edge.
"""

from __future__ import annotations

import sys

import numpy as np

from segcore.training.data import load_folder

DATA = "/work/shared/datasets/isbi2012-em-membrane/train"


def contrast(samples, dy: int, dx: int) -> float:
    """Membrane-minus-rest intensity when label pixel (y, x) is compared with image pixel
    (y + dy, x + dx)."""
    vals = []
    for s in samples:
        im = np.roll(s.image[..., 0].astype(np.float64), (-dy, -dx), (0, 1))[4:-4, 4:-4]
        y = s.mask[4:-4, 4:-4] > 0
        vals.append(im[y].mean() - im[~y].mean())
    return float(np.mean(vals))


def vertex(c_minus: float, c0: float, c_plus: float) -> float:
    """Sub-pixel position of the extremum of the parabola through (-1, c-), (0, c0), (1, c+)."""
    den = c_minus - 2 * c0 + c_plus
    return 0.0 if den == 0 else 0.5 * (c_minus - c_plus) / den


def main() -> None:
    stems = sys.argv[1] if len(sys.argv) > 1 else "0-24"
    samples = load_folder(DATA, stems, {0: 1, 255: 0})
    r = range(-2, 3)
    table = {(dy, dx): contrast(samples, dy, dx) for dy in r for dx in r}
    print(f"slices {stems}: membrane-minus-rest intensity, label (y, x) vs image (y+dy, x+dx)")
    print("dy \\ dx " + " ".join(f"{dx:>7}" for dx in r))
    for dy in r:
        print(f"{dy:>7} " + " ".join(f"{table[dy, dx]:7.2f}" for dx in r))
    by, bx = min(table, key=table.get)
    fy = by + vertex(table[by - 1, bx], table[by, bx], table[by + 1, bx]) if abs(by) < 2 else by
    fx = bx + vertex(table[by, bx - 1], table[by, bx], table[by, bx + 1]) if abs(bx) < 2 else bx
    print(f"best integer shift dy={by:+d}, dx={bx:+d}; parabola peak dy={fy:+.2f}, dx={fx:+.2f} px: "
          f"label row y lines up with image row y{fy:+.2f}")


if __name__ == "__main__":
    main()
