"""Summaries of repeated runs (median, min, max per metric), ratios against bare, the markdown
table for docs/BENCHMARKS.md, the JSON file and the PNG plot.

Table columns: Mpx/s = scene pixels / the contender's own seconds (bare: the forward; segment:
its report; MONAI: sliding_window_inference); wall Mpx/s = scene pixels / the process's wall
clock, start included; "vs bare" = Mpx/s / bare Mpx/s (= bare's time for the same pixels /
the contender's time); peak RSS = the kernel's ru_maxrss from wait4 (largest single process);
tree RSS = the sampled sum over the process tree (psutil; Dask workers included).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarise(row: dict, metrics: tuple[str, ...]) -> dict:
    """``row['runs']`` (one dict per repetition) -> ``row['summary'][metric]`` spreads."""
    row["summary"] = {m: s for m in metrics
                      if (s := spread([r.get(m) for r in row["runs"]])) is not None}
    return row


def add_ratios(rows: list[dict], base: str = "bare") -> None:
    """Throughput ratios against bare: bare's time for the same pixels / the contender's time,
    i.e. contender Mpx/s / bare Mpx/s (for the report's seconds and for the wall clock)."""
    ref = next((r for r in rows if r["contender"] == base and "summary" in r), None)
    if ref is None or "mpx_per_s" not in ref["summary"]:
        return
    b = ref["summary"]["mpx_per_s"]["median"]
    for r in rows:
        s = r.get("summary", {})
        r["vs_bare"] = s["mpx_per_s"]["median"] / b if "mpx_per_s" in s else None
        r["wall_vs_bare"] = (s["wall_mpx_per_s"]["median"] / b
                             if "wall_mpx_per_s" in s and r["contender"] != base else None)


def fmt(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "-"
    m, lo, hi = s["median"], s["min"], s["max"]
    if s["n"] == 1 or lo == hi:
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} ({lo:.{digits}g}-{hi:.{digits}g})"


def _num(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def compare_table(rows: list[dict]) -> str:
    head = ("| contender | tile | Mpx/s | wall Mpx/s | vs bare | wall vs bare | peak RSS MB "
            "| tree RSS MB | max abs dev | mean abs dev | label flips | notes |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        s = r.get("summary", {})
        if r.get("skipped"):
            lines.append(f"| {r['contender']} | {r.get('tile') or '-'} | skipped: "
                         f"{r['skipped']} ||||||||||")
            continue
        dev = r.get("deviation") or {}
        lines.append(
            f"| {r['contender']} | {r.get('tile') or '-'} | {fmt(s.get('mpx_per_s'))} | "
            f"{fmt(s.get('wall_mpx_per_s'))} | {_num(r.get('vs_bare'))} | "
            f"{_num(r.get('wall_vs_bare'))} | {fmt(s.get('peak_rss_mb'), 4)} | "
            f"{fmt(s.get('tree_peak_rss_mb'), 4)} | "
            f"{_num(dev.get('max_abs'), '.4g')} | {_num(dev.get('mean_abs'), '.3g')} | "
            f"{dev.get('label_flips', '-')} | {r.get('notes', '')} |")
    return "\n".join(lines)


def io_table(rows: list[dict]) -> str:
    head = ("| scene | contender | Mpx/s | wall Mpx/s | decode Mpx/s | normalise Mpx/s "
            "| write Mpx/s | peak RSS MB | tree RSS MB | tiles run | notes |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        s = r.get("summary", {})
        lines.append(
            f"| {r['scene_kind']} | {r['contender']} | {fmt(s.get('mpx_per_s'))} | "
            f"{fmt(s.get('wall_mpx_per_s'))} | {fmt(s.get('decode_mpx_per_s'))} | "
            f"{fmt(s.get('normalize_mpx_per_s'))} | {fmt(s.get('write_mpx_per_s'))} | "
            f"{fmt(s.get('peak_rss_mb'), 4)} | {fmt(s.get('tree_peak_rss_mb'), 4)} | "
            f"{r.get('tiles_run', '-')} | {r.get('notes', '')} |")
    return "\n".join(lines)


def tag_for(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts if p not in (None, "")))


def result_path(results_dir: Path, comparison: str, tag: str, suffix: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    return results_dir / f"{comparison}-{tag}{suffix}"


def write_json(result: dict, results_dir: Path, comparison: str, tag: str) -> Path:
    path = result_path(results_dir, comparison, tag, ".json")
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def publish(result: dict, results_dir: Path, comparison: str, tag: str, plot_title: str,
            label, header: str) -> Path:
    """The end of every comparison: the PNG plot and the JSON (``result["rows"]``), then the
    header line and the markdown table on stdout. Returns the JSON's path."""
    png = plot(result["rows"], result_path(results_dir, comparison, tag, ".png"), plot_title,
               label)
    result["plot"] = str(png) if png else None
    path = write_json(result, results_dir, comparison, tag)
    print(f"\n{header}\n\n{result['table']}\n")
    print(f"# wrote {path}" + (f" and {png}" if png else ""))
    return path


def plot(rows: list[dict], path: Path, title: str, label) -> Path | None:
    """Bars of median Mpx/s per row (and of wall-clock Mpx/s where measured), min-max error
    bars. ``label(row)`` names a bar. Returns None (with a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install matplotlib, or .[bench])")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "mpx_per_s" in r.get("summary", {})]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    xs = list(range(len(rows)))
    for key, off, name, alpha in (("mpx_per_s", -0.2, "compute / report", 0.9),
                                  ("wall_mpx_per_s", 0.2, "wall clock", 0.45)):
        pts = [(x, r["summary"][key]) for x, r in zip(xs, rows, strict=True)
               if key in r["summary"]]
        if not pts:
            continue
        med = [s["median"] for _, s in pts]
        err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
        ax.bar([x + off for x, _ in pts], med, width=0.4, yerr=err, capsize=3, alpha=alpha,
               label=name)
    ax.set_xticks(xs, [label(r) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Mpx/s (median, min-max)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
