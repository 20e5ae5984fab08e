"""Tables and plots from pytest-benchmark JSON files whose records carry normops.bench.extra_info.

    python benchmarks/report.py RESULTS.json [more.json ...] [--out DIR]

Writes DIR/report.md (a summary of geometric-mean speedups, then one table per op and pass:
rows (shape, dtype), normops / torch.nn / torch.compile medians, speedups, normops GB/s and % of
the measured copy bandwidth) and, when matplotlib is installed, DIR/<op>-<pass>.png ('+' -> '_').
DIR defaults to benchmarks/results/<device-slug>-<date>/. Speedup = other median / normops median,
so > 1 means normops is faster. GB/s = the record's minimum bytes / its pytest-benchmark median.
Exit status 2 when a file cannot be read or holds no usable record.
"""
import argparse
import json
import math
import pathlib
import re
import statistics
import sys

PROVIDERS = ("normops", "torch", "compile")  # as in normops.bench (not imported: no torch needed)
PASSES = ("fwd", "bwd", "fwd+bwd")
REQUIRED = ("op", "provider", "pass", "shape", "dtype")
ENV_KEYS = ("device", "device_type", "torch", "triton", "normops", "python")
ROW_NORMS = ("layer_norm", "rms_norm", "add_rms_norm")  # plotted against the normalized width
DASH = "—"


class ReportError(Exception):
    """A problem with the input files, reported with exit status 2."""


def load_records(path):
    """The usable records of one pytest-benchmark JSON file: extra_info plus median/q1/q3 in ms."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read pytest-benchmark JSON ({e})") from None
    records = []
    for bench in data.get("benchmarks", []) if isinstance(data, dict) else []:
        info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
        if any(k not in info for k in REQUIRED) or not stats.get("median"):
            continue
        layout = info.get("layout", "contiguous")  # channels_last rows must not overwrite NCHW ones
        shape = tuple(info["shape"]) + (() if layout == "contiguous" else (layout,))
        rec = dict(info, shape=shape, median_ms=1e3 * stats["median"])
        rec["q1_ms"], rec["q3_ms"] = 1e3 * stats.get("q1", stats["median"]), 1e3 * stats.get("q3", stats["median"])
        records.append(rec)
    if not records:
        raise ReportError(f"{path}: no usable benchmark records (each needs stats.median and extra_info "
                          f"with {', '.join(REQUIRED)}, as normops.bench.extra_info writes)")
    return records


def group(records):
    """{(op, pass): {(shape, dtype): {provider: record}}}, in order of first appearance (later files win)."""
    tables = {}
    for rec in records:
        rows = tables.setdefault((rec["op"], rec["pass"]), {})
        rows.setdefault((rec["shape"], rec["dtype"]), {})[rec["provider"]] = rec
    order = {p: i for i, p in enumerate(PASSES)}
    ops = list(dict.fromkeys(op for op, _ in tables))
    return dict(sorted(tables.items(), key=lambda kv: (ops.index(kv[0][0]), order.get(kv[0][1], len(order)))))


def median_ms(cell, provider):
    rec = cell.get(provider)
    return rec["median_ms"] if rec else None


def speedup(cell, other):
    ours, theirs = median_ms(cell, "normops"), median_ms(cell, other)
    return theirs / ours if ours and theirs else None


def gbps(cell):
    rec = cell.get("normops")
    if not rec:
        return None
    if rec.get("bytes"):
        return rec["bytes"] / (rec["median_ms"] * 1e-3) / 1e9
    return rec.get("gbps")


def pct_of_peak(cell):
    bw, peak = gbps(cell), (cell.get("normops") or {}).get("peak_gbps")
    return 100 * bw / peak if bw and peak else None


def geomean(values):
    values = [v for v in values if v]
    return (statistics.geometric_mean(values), len(values)) if values else (None, 0)


def fmt(value, spec):
    return DASH if value is None else format(value, spec)


def fmt_ms(value):
    return fmt(value, ".1f" if value and value >= 100 else ".3f")


def shape_label(shape):
    dims = [str(d) for d in shape if not isinstance(d, str)]
    return "x".join(dims) + "".join(f" {tag}" for tag in shape if isinstance(tag, str))


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def summary_rows(tables):
    rows = []
    for (op, pas), cells in tables.items():
        nn, n_nn = geomean(speedup(c, "torch") for c in cells.values())
        co, n_co = geomean(speedup(c, "compile") for c in cells.values())
        rows.append(f"| {op} | {pas} | {fmt(nn, '.2f')} ({n_nn}) | {fmt(co, '.2f')} ({n_co}) |")
    return ["| op | pass | vs torch.nn | vs torch.compile |", "|---|---|---:|---:|", *rows]


def op_table(cells):
    lines = ["| shape | dtype | normops ms | torch.nn ms | torch.compile ms | vs torch.nn | vs compile "
             "| normops GB/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (shape, dtype), cell in cells.items():
        lines.append(f"| {shape_label(shape)} | {dtype} | {fmt_ms(median_ms(cell, 'normops'))} "
                     f"| {fmt_ms(median_ms(cell, 'torch'))} | {fmt_ms(median_ms(cell, 'compile'))} "
                     f"| {fmt(speedup(cell, 'torch'), '.2f')} | {fmt(speedup(cell, 'compile'), '.2f')} "
                     f"| {fmt(gbps(cell), '.1f')} | {fmt(pct_of_peak(cell), '.1f')} |")
    return lines


def distinct(records, key):
    return ", ".join(dict.fromkeys(str(r.get(key)) for r in records if r.get(key) is not None)) or DASH


def header(records):
    peaks = sorted({round(r["peak_gbps"], 1) for r in records if r.get("peak_gbps")})
    bw = DASH if not peaks else f"{peaks[0]:.1f}" if len(peaks) == 1 else f"{peaks[0]:.1f}–{peaks[-1]:.1f}"
    env = ", ".join(f"{k} {distinct(records, k)}" for k in ENV_KEYS[1:])
    return [f"# normops benchmarks: {distinct(records, 'device')}", "",
            f"- versions: {env}", f"- date: {distinct(records, 'date')}",
            f"- measured copy bandwidth: {bw} GB/s (read + write; the roofline for % of peak)",
            "- times are pytest-benchmark medians; speedup = other / normops (> 1: normops faster); "
            "GB/s = minimum bytes moved / normops median; — = not measured"]


def render(records, tables):
    lines = header(records) + ["", "## Summary: geometric-mean speedup (rows compared)", "", *summary_rows(tables)]
    for (op, pas), cells in tables.items():
        lines += ["", f"## {op} — {pas}", "", *op_table(cells)]
    return "\n".join(lines) + "\n"


def x_axis(op, cells):
    """Positions and labels for a plot: the width for row norms when widths are distinct, else shapes."""
    shapes = list(dict.fromkeys(shape for shape, _ in cells))
    widths = [s[-1] for s in shapes]
    if op in ROW_NORMS and len(set(widths)) == len(widths):
        labels = [f"N={w}" for w in widths]
    else:
        labels = [shape_label(s) for s in shapes]
    return {s: i for i, s in enumerate(shapes)}, labels


def plot_one(new_figure, op, pas, cells, path):
    pos, labels = x_axis(op, cells)
    fig = new_figure(figsize=(max(6, 0.8 * len(labels) + 3), 7), layout="constrained")
    ax_s, ax_g = fig.subplots(2, 1, sharex=True)
    for dtype in dict.fromkeys(d for _, d in cells):
        rows = [(pos[s], c) for (s, d), c in cells.items() if d == dtype]
        ax_s.plot([x for x, _ in rows], [speedup(c, "torch") or math.nan for _, c in rows], "o-", label=dtype)
        ax_g.plot([x for x, _ in rows], [gbps(c) or math.nan for _, c in rows], "o-", label=dtype)
    ax_s.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax_s.set_ylabel("speedup vs torch.nn")
    ax_g.set_ylabel("normops GB/s")
    ax_g.set_ylim(bottom=0)
    ax_g.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax_s.set_title(f"{op} {pas}")
    ax_s.legend()
    fig.savefig(path, dpi=100)


def plot(tables, out):
    """One PNG per op and pass; returns the paths, or [] with a note when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    def new_figure(**kwargs):  # the Agg canvas, without pyplot's global backend state
        return FigureCanvasAgg(Figure(**kwargs)).figure

    paths = []
    for (op, pas), cells in tables.items():
        path = out / f"{op}-{pas}.png".replace("+", "_")
        plot_one(new_figure, op, pas, cells, path)
        paths.append(path)
    return paths


def default_out(records):
    dates = sorted(str(r["date"])[:10] for r in records if r.get("date"))
    device = next((r["device"] for r in records if r.get("device")), "unknown")
    return pathlib.Path(__file__).resolve().parent / "results" / f"{slug(device)}-{dates[-1] if dates else 'undated'}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=pathlib.Path, help="pytest-benchmark JSON files")
    p.add_argument("--out", type=pathlib.Path, help="output folder (default benchmarks/results/<device>-<date>)")
    args = p.parse_args(argv)
    try:
        records = [rec for path in args.results for rec in load_records(path)]
    except ReportError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    tables = group(records)
    out = args.out or default_out(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render(records, tables), encoding="utf-8")
    pngs = plot(tables, out)
    print(out / "report.md")
    if pngs:
        print(f"{len(pngs)} plots in {out}")
    print("\n".join(summary_rows(tables)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
