"""Render a run's metrics as markdown + PNG curves, written into the run folder.

    python stages/report.py runs/tiny/pretrain_s1       # -> runs/tiny/pretrain_s1/report.md + report.png
    make report RUN=runs/tiny/pretrain_s1

Works for any training stage (pre-training, SFT, RL) on any machine: it only reads the run's
metrics.jsonl (and DONE.json). scripts/smoke_report.py draws the smoke chain's curves with
plot_rows() from this file, so the smoke run and a cluster run get the same picture.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Panels in drawing order: (title, keys plotted if present, y label, what it shows). A panel
# appears in a row only when its run logged one of its keys. Meanings: README "Watching a run".
PANELS = [
    ("loss parts", ["loss", "lm_loss", "mtp_loss", "aux_loss"], "loss",
     "total, LM and MTP loss; the balance aux loss (~1e-3) on its own right-hand axis"),
    ("RL rewards (all samples)", ["reward", "accuracy", "format_error_thinking", "format_error_non_thinking",
                                  "clip_frac"], "mean over the rollout batch",
     "reward, accuracy, format errors per mode, share of clipped ratios"),
    ("learning rate", ["lr"], "learning rate", "the schedule"),
    ("throughput", ["tokens_per_s", "mfu"], "tokens/s", "tokens/s, MFU dashed on the right-hand axis"),
    ("step time", ["step_s"], "seconds per step", "wall time of each step"),
    ("memory (max over ranks)", ["mem_peak_reserved_gib", "mem_peak_active_gib", "mem_rss_gib", "mem_rss_peak_gib"],
     "GiB", "peak reserved/active GiB on CUDA, process RSS on CPU"),
    ("expert load max/mean", ["expert_imbalance", "router_max_load"], "max / mean tokens per expert",
     "worst layer thick, each MoE layer thin"),
]
MAX_COLS = 4  # panels side by side before a row wraps
# key -> (axis label, scale, line style): drawn on a right-hand axis of its panel, as its range
# is another (aux loss ~1e-3 beside an LM loss ~5; MFU a fraction beside tokens/s)
SECOND_AXIS = {"aux_loss": ("aux loss (right axis)", 1.0, ":"), "mfu": ("MFU % (right axis)", 100.0, "--")}
COLOURS = matplotlib.colormaps["tab10"].colors  # 10 distinct colours; a panel shows at most ~6 entries
STYLES = ["-", "--", "-.", ":"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl; a step logged twice (before a kill and after the resume) keeps the last."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    by_step = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{p}:{n}: not a JSON record ({e})") from None
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _series(recs: list[dict], key: str, x0: int) -> dict[str, tuple[list, list]]:
    """label -> (xs, ys) for a key; a per-layer dict key gives one series per layer."""
    out: dict[str, tuple[list, list]] = {}
    for r in recs:
        v = r.get(key)
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for layer, y in items:
            if isinstance(y, (int, float)) and math.isfinite(y):
                xs, ys = out.setdefault(key if layer is None else f"layer {layer}", ([], []))
                xs.append(x0 + r["step"])
                ys.append(y)
    return out


def _draw_panel(ax, runs: list[tuple[str, list[dict]]], keys: list[str], concat: bool) -> None:
    """One panel. A single run or a chain (concat): one colour per key, the stages marked by
    dotted lines. Several runs on one step axis: one colour per run, one line style per key.
    Per-layer series are thin and share one legend entry; right-axis keys get their own axis."""
    from matplotlib.lines import Line2D

    main = [k for k in keys if k not in SECOND_AXIS]
    by_run = len(runs) > 1 and not concat
    handles, key_handles, x0, ax2, layered = {}, {}, 0, None, False  # legend: runs first, then keys
    for r, (label, recs) in enumerate(runs):
        for k, key in enumerate(keys):
            right = key in SECOND_AXIS
            axis_label, scale, style = SECOND_AXIS.get(key, (key, 1.0, STYLES[k % len(STYLES)]))
            colour = COLOURS[r % len(COLOURS)] if by_run else ("black" if right else COLOURS[k % len(COLOURS)])
            for s_label, (xs, ys) in _series(recs, key, x0).items():
                if right and ax2 is None:
                    ax2 = ax.twinx()
                per_layer = s_label.startswith("layer")
                layered |= per_layer
                (ax2 if right else ax).plot(xs, [scale * y for y in ys], color=colour,
                                            linestyle=style if (by_run or right) else "-",
                                            linewidth=0.6 if per_layer else 1.3, alpha=0.5 if per_layer else 1.0)
                if right:
                    ax2.set_ylabel(axis_label, fontsize=8)
                if by_run:
                    handles.setdefault(label, Line2D([], [], color=colour))
                    if len(main) > 1 or right:
                        key_handles.setdefault(axis_label if right else key, Line2D([], [], color="0.4", linestyle=style))
                elif not per_layer:
                    handles.setdefault(axis_label, Line2D([], [], color=colour, linestyle=style if right else "-"))
        if concat and recs:
            if x0:
                ax.axvline(x0, color="0.6", linewidth=0.6, linestyle=":")
            ax.text(x0, 1.0, f" {label}", transform=ax.get_xaxis_transform(), fontsize=5, va="top", rotation=90)
            x0 += recs[-1]["step"]
    handles.update(key_handles)
    if layered:
        handles["each MoE layer (thin)"] = Line2D([], [], color="0.4", linewidth=0.6, alpha=0.5)
    if handles:
        ax.legend(list(handles.values()), list(handles), fontsize=6)


def plot_rows(rows: list[tuple[str, list[tuple[str, list[dict]]], bool]], out_png: str | Path) -> list[str]:
    """One figure row per (row title, [(run label, records)], concat): each row draws the panels its
    runs have data for; concat=True puts the runs one after another on the step axis (a chain of
    pre-training stages), otherwise they share it. Returns the titles of the panels drawn."""
    drawn = []
    for title, runs, concat in rows:
        panels = [p for p in PANELS if any(k in r for _, recs in runs for r in recs for k in p[1])]
        if panels:
            drawn.append((title, runs, concat, panels))
    if not drawn:
        raise SystemExit("no metrics to plot: metrics.jsonl missing or empty")
    ncols = min(MAX_COLS, max(len(d[3]) for d in drawn))
    heights = [math.ceil(len(d[3]) / ncols) for d in drawn]  # a row with many panels wraps
    fig, axes = plt.subplots(sum(heights), ncols, figsize=(4.2 * ncols, 3.4 * sum(heights)), squeeze=False)
    titles = []
    for i, (title, runs, concat, panels) in enumerate(drawn):
        cells = [axes[sum(heights[:i]) + k // ncols][k % ncols] for k in range(heights[i] * ncols)]
        for ax in cells[len(panels):]:
            ax.axis("off")
        for ax, (name, keys, ylabel, _) in zip(cells, panels):
            _draw_panel(ax, [(label, recs) for label, recs in runs if recs], keys, concat)
            ax.set_title(f"{title}: {name}", fontsize=9)
            titles.append(ax.get_title())
            ax.set(xlabel="step" + (" (stages one after another)" if concat and len(runs) > 1 else ""), ylabel=ylabel)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return titles


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def bench_results(run_dir: Path) -> list[str]:
    """Lines linking the `make eval-bench` tables written for this run's checkpoints (their default
    folder, <checkpoint>/bench), newest checkpoint first; none when no benchmark was run."""
    found = sorted(run_dir.glob("checkpoints/*/bench/results.md"), reverse=True)
    lines = []
    for md in found:
        rows = json.loads(md.with_name("results.json").read_text())["rows"] if md.with_name("results.json").exists() else []
        scored = sum(r.get("score") is not None for r in rows)
        lines.append(f"- [{md.relative_to(run_dir)}]({md.relative_to(run_dir)}): {len(rows)} (benchmark, mode) rows, "
                     f"{scored} scored, {len(rows) - scored} without data"
                     + (f" ([bar chart]({md.with_name('results.png').relative_to(run_dir)}))"
                        if md.with_name("results.png").exists() else ""))
    return lines


def write_report(run_dir: str | Path) -> Path:
    """<run_dir>/report.md + report.png from <run_dir>/metrics.jsonl."""
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    if not recs:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'}: no metrics (is {run_dir} a training run folder?)")
    titles = plot_rows([(run_dir.name, [(run_dir.name, recs)], False)], run_dir / "report.png")
    meaning = {f"{run_dir.name}: {name}": what for name, _, _, what in PANELS}
    done = run_dir / "DONE.json"
    last = recs[-1]
    status = (f"finished ({done.name}: {done.read_text().strip()[:300]})" if done.exists() else
              f"not finished: last logged step {last['step']}"
              + (f", ETA then {last['eta_s'] / 3600:.2f} h" if "eta_s" in last else ""))
    keys = [k for k in dict.fromkeys(k for r in recs for k in r)
            if k != "step" and all(isinstance(r.get(k), (int, float)) for r in recs if k in r)]
    table = ["| metric | last | min | max | mean |", "|---|---|---|---|---|"]
    for k in keys:
        vals = [float(r[k]) for r in recs if k in r and math.isfinite(float(r[k]))]
        if vals:
            table.append(f"| {k} | {_fmt(vals[-1])} | {_fmt(min(vals))} | {_fmt(max(vals))} | "
                         f"{_fmt(sum(vals) / len(vals))} |")
    wall = sum(r.get("step_s", 0.0) for r in recs)
    text = (f"# Run report: {run_dir}\n\n"
            f"Status: {status}.\n\n"
            f"{len(recs)} steps logged (steps {recs[0]['step']}-{last['step']}), {wall / 60:.1f} min of step time.\n\n"
            "![curves](report.png)\n\n"
            "Panels (README \"Watching a run\"):\n\n"
            + "".join(f"- {t.split(': ', 1)[1]}: {meaning[t]}\n" for t in titles) + "\n"
            + "\n".join(table) + "\n")
    bench = bench_results(run_dir)
    if bench:
        text += "\n## Benchmarks (make eval-bench, paper Tables 4-5)\n\n" + "\n".join(bench) + "\n"
    out = run_dir / "report.md"
    out.write_text(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder holding metrics.jsonl, e.g. runs/tiny/pretrain_s1")
    a = ap.parse_args()
    out = write_report(a.run)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
