"""The quality benchmark's summary: mean ± std over seeds, paper-style markdown tables, metric-vs-sparsity plots.

`summarise` turns the run records of `mflightning.bench.quality` into one entry per (model, task,
method, sparsity); `markdown_tables` and `plot_quality` lay those entries out.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .quality_settings import METHODS, METRICS, TASK_TITLES, QualitySettings


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of every metric, per (model, task, method, sparsity)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["task"], r["method"], r["sparsity"]), []).append(r)
    out = []
    for (model, task, method, sparsity), rs in groups.items():
        metrics = {}
        for key, _ in METRICS[task]:
            values = [r["metrics"][key] for r in rs if key in r["metrics"]]
            if values:
                metrics[key] = {"mean": statistics.fmean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        realised = [r["realised_sparsity"]["total"] for r in rs if r["realised_sparsity"].get("total") is not None]
        out.append({"model": model, "task": task, "method": method, "sparsity": sparsity, "metrics": metrics,
                    "realised_sparsity": statistics.fmean(realised) if realised else 0.0, "seeds": len(rs)})
    return out


def _cell(stat: dict | None, mark: str = "") -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean']:.2f}" + (f"±{stat['std']:.2f}" if stat["n"] > 1 else "")
    return {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(mark, text)


def markdown_tables(summary: list[dict], s: QualitySettings) -> str:
    """One table per (task, model): rows = methods, column groups = sparsity x the task's metrics."""
    by = {(e["model"], e["task"], e["method"], e["sparsity"]): e for e in summary}
    seeds = f"{len(s.seeds)} fine-tuning seed{'s' if len(s.seeds) > 1 else ''}"
    lines = [f"Mean{'±std' if len(s.seeds) > 1 else ''} over {seeds} ({', '.join(map(str, s.seeds))}). "
             "Best pruned value per column in **bold**, second <u>underlined</u> (ties share the mark); Dense is the unpruned upper "
             "bound (the same model in every sparsity group)."]
    for task in s.tasks:
        metrics = METRICS[task]
        for model in s.models:
            lines += ["", f"### {TASK_TITLES[task]}: {model.upper()}", ""]
            header = ["Method"] + [f"{lab} {sp:.0%}" for sp in s.sparsities for _, lab in metrics]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            marks: dict[tuple, str] = {}
            for sp in s.sparsities:
                for key, _ in metrics:
                    shown = {m: round(by[(model, task, m, sp)]["metrics"][key]["mean"], 2) for m in s.methods
                             if METHODS[m].method and key in by.get((model, task, m, sp), {}).get("metrics", {})}
                    top = sorted(set(shown.values()), reverse=True)[:2]  # ties (as displayed) share a mark
                    for m, value in shown.items():
                        if value in top:
                            marks[(m, sp, key)] = ("best", "second")[top.index(value)]
            for m in s.methods:
                cells = [METHODS[m].label]
                for sp in s.sparsities:
                    entry = by.get((model, task, m, None if METHODS[m].method is None else sp))
                    for key, _ in metrics:
                        stat = entry["metrics"].get(key) if entry else None
                        cells.append(_cell(stat, marks.get((m, sp, key), "")))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality(summary: list[dict], s: QualitySettings, out: Path) -> list[Path]:
    """Per task: metric against sparsity (rows = models, columns = metrics), one line per method (Agg PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(e["model"], e["task"], e["method"], e["sparsity"]): e for e in summary}
    paths = []
    for task in s.tasks:
        metrics = METRICS[task]
        fig, axes = plt.subplots(len(s.models), len(metrics), figsize=(3.6 * len(metrics), 3.0 * len(s.models)),
                                 squeeze=False)
        for i, model in enumerate(s.models):
            for j, (key, label) in enumerate(metrics):
                ax = axes[i][j]
                for m in s.methods:
                    if METHODS[m].method is None:
                        entry = by.get((model, task, m, None))
                        if entry and key in entry["metrics"]:
                            ax.axhline(entry["metrics"][key]["mean"], color="black", ls="--", lw=1, label="Dense")
                        continue
                    xs, ys, es = [], [], []
                    for sp in s.sparsities:
                        stat = by.get((model, task, m, sp), {}).get("metrics", {}).get(key)
                        if stat is not None:
                            xs.append(100 * sp)
                            ys.append(stat["mean"])
                            es.append(stat["std"])
                    if xs:
                        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, lw=1.2 if m != "multiflow" else 2.2,
                                    capsize=2, label=METHODS[m].label)
                ax.set_title(f"{model.upper()} {label}", fontsize=9)
                ax.set_xlabel("sparsity (%)", fontsize=8)
                ax.tick_params(labelsize=7)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=7)
        fig.tight_layout(rect=(0, 0.12 if len(labels) > 5 else 0.07, 1, 1))
        path = out / f"quality_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


