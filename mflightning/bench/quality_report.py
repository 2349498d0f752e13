"""The quality benchmark's summary: mean ± std over seeds, paper-style markdown tables, metric-vs-sparsity plots.

`summarise` turns the run records of `mflightning.bench.quality` into one entry per (model, task,
method, sparsity); `markdown_tables` and `plot_quality` lay those entries out. `cross_task` answers
the paper's question (which method transfers best over tasks): each method's headline metric over
dense, averaged over tasks, with its spread over seeds and its mean rank; `cross_task_table` and
`plot_cross_task` (the paper's Figure 3) show it. Best/second marks are given only to values
separated from the next ones by more than their seed spread.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .quality_settings import HEADLINE, HEADLINE_LABELS, METHODS, METRICS, TASK_TITLES, QualitySettings


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


def separated_marks(values: dict[str, tuple[float, float]], digits: int = 2) -> dict[str, str]:
    """"best" / "second" for the methods whose (mean, std) are ahead of the rest by more than the spread.

    The best tier holds the top method and every method whose gap to it is at most the larger of
    the two standard deviations (or that ties it as displayed); the second tier is the best tier of
    the rest. A tier that would hold every remaining method (more than one) is not marked, nor is
    anything after it: those values cannot be told apart at this number of seeds.
    """
    marks: dict[str, str] = {}
    rest = dict(values)
    for mark in ("best", "second"):
        if not rest:
            break
        top = max(rest, key=lambda m: rest[m][0])
        mean, std = rest[top]
        tier = {m for m, (v, sd) in rest.items()
                if mean - v <= max(std, sd) or round(v, digits) == round(mean, digits)}
        if len(tier) == len(rest) and len(rest) > 1:
            break
        marks.update({m: mark for m in tier})
        rest = {m: v for m, v in rest.items() if m not in tier}
    return marks


def _cell(stat: dict | None, mark: str = "") -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean']:.2f}" + (f"±{stat['std']:.2f}" if stat["n"] > 1 else "")
    return {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(mark, text)


# How far above its image-blind level a dense model must be for its column to say anything: retrieval R@1
# at least 5x the random ranking's, every other headline metric 5 points above the blind guess (issue 13).
RETRIEVAL_FACTOR, BLIND_MARGIN = 5.0, 5.0


def dense_check(summary: list[dict], blind: dict[str, dict[str, float]], s: QualitySettings) -> str:
    """A markdown table: each model's dense headline metrics against the image-blind level (and whether it is
    clear of it: R@1 >= 5x the random ranking, other metrics >= 5 points above the blind guess)."""
    by = {(e["model"], e["task"], e["method"]): e for e in summary if e["sparsity"] is None}
    lines = ["| Model | Task | Metric | Dense model | Image-blind | Clear of it |", "|---|---|---|---|---|---|"]
    for model in s.models:
        for task in s.tasks:
            entry = by.get((model, task, "dense"))
            for key in HEADLINE[task]:
                level = blind.get(task, {}).get(key)
                if entry is None or level is None or key not in entry["metrics"]:
                    continue
                dense = entry["metrics"][key]["mean"]
                if task == "retrieval":
                    ok, need = dense >= RETRIEVAL_FACTOR * level, f">= {RETRIEVAL_FACTOR:g}x: {dense / level:.1f}x"
                else:
                    ok, need = dense >= level + BLIND_MARGIN, f">= +{BLIND_MARGIN:g}: {dense - level:+.1f}"
                label = dict(METRICS[task]).get(key, key)
                lines.append(f"| {model.upper()} | {task} | {label} | {_cell(entry['metrics'][key])} | {level:.2f} | "
                             f"{'yes' if ok else '**no**'} ({need}) |")
    return "\n".join(lines)


def markdown_tables(summary: list[dict], s: QualitySettings) -> str:
    """One table per (task, model): rows = methods, column groups = sparsity x the task's metrics."""
    by = {(e["model"], e["task"], e["method"], e["sparsity"]): e for e in summary}
    seeds = f"{len(s.seeds)} fine-tuning seed{'s' if len(s.seeds) > 1 else ''}"
    lines = [f"Mean{'±std' if len(s.seeds) > 1 else ''} over {seeds} ({', '.join(map(str, s.seeds))}). "
             "Best pruned value per column in **bold**, second <u>underlined</u>, only where it is ahead of the next "
             "value by more than both seed spreads (values within the spread share the mark; no mark when all do); "
             "Dense is the unpruned reference (the same model in every sparsity group)."]
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
                    shown = {m: by[(model, task, m, sp)]["metrics"][key] for m in s.methods
                             if METHODS[m].method and key in by.get((model, task, m, sp), {}).get("metrics", {})}
                    for m, mark in separated_marks({m: (st["mean"], st["std"]) for m, st in shown.items()}).items():
                        marks[(m, sp, key)] = mark
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




# ---------------------------------------------------------------------------------------- across tasks
def _headline(metrics: dict[str, float], task: str) -> float | None:
    keys = HEADLINE[task]
    if not all(k in metrics for k in keys):
        return None
    return statistics.fmean(metrics[k] for k in keys)


def cross_task(runs: list[dict], s: QualitySettings) -> list[dict]:
    """Per (model, pruned method, sparsity): the normalised score and the mean rank over tasks.

    Normalised score of one seed: the mean over tasks of the task's headline metric (``HEADLINE``)
    divided by the dense model's at the same seed (the dense mean over seeds when that seed is
    missing); reported as mean and sample std over seeds. Mean rank: the method's rank among the
    pruned methods by its seed-mean headline metric, per task (ties share the mean of their
    ranks), averaged over tasks; 1 is best.
    """
    head: dict[tuple, float] = {}
    for r in runs:
        value = _headline(r["metrics"], r["task"])
        if value is not None:
            head[(r["model"], r["task"], r["method"], r["sparsity"], r["seed"])] = value
    dense_methods = [m for m in s.methods if METHODS[m].method is None]
    pruned = [m for m in s.methods if METHODS[m].method is not None]
    out = []
    for model in s.models:
        dense: dict[tuple[str, int], float] = {}
        for task in s.tasks:
            values = {seed: head[(model, task, d, None, seed)] for d in dense_methods for seed in s.seeds
                      if (model, task, d, None, seed) in head}
            for seed in s.seeds:
                if seed in values:
                    dense[(task, seed)] = values[seed]
                elif values:
                    dense[(task, seed)] = statistics.fmean(values.values())
        for sp in s.sparsities:
            means = {(task, m): [head[(model, task, m, sp, seed)] for seed in s.seeds
                                 if (model, task, m, sp, seed) in head] for task in s.tasks for m in pruned}
            ranks: dict[str, list[float]] = {m: [] for m in pruned}
            for task in s.tasks:
                scored = {m: statistics.fmean(means[(task, m)]) for m in pruned if means[(task, m)]}
                for m, value in scored.items():
                    better = sum(v > value for v in scored.values())
                    equal = sum(v == value for v in scored.values())
                    ranks[m].append(better + (equal + 1) / 2)
            for m in pruned:
                per_seed = []
                for seed in s.seeds:
                    ratios = [head[(model, task, m, sp, seed)] / dense[(task, seed)] for task in s.tasks
                              if (model, task, m, sp, seed) in head and dense.get((task, seed))]
                    if len(ratios) == len(s.tasks):
                        per_seed.append(statistics.fmean(ratios))
                if not per_seed:
                    continue
                out.append({"model": model, "method": m, "sparsity": sp,
                            "score": {"mean": statistics.fmean(per_seed),
                                      "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                                      "n": len(per_seed)},
                            "mean_rank": statistics.fmean(ranks[m]) if ranks[m] else None})
    return out


def cross_task_table(entries: list[dict], s: QualitySettings) -> str:
    """Markdown: per model, rows = pruned methods, columns = sparsity x (normalised score, mean rank), and
    one sentence per model and sparsity saying where MultiFlow stands."""
    headline = ", ".join(f"{TASK_TITLES[t]}: {HEADLINE_LABELS[t]}" for t in s.tasks)
    lines = ["Normalised score: each task's headline metric over the dense model's (" + headline + "), "
             f"averaged over the {len(s.tasks)} tasks; mean±std over fine-tuning seeds (1.00 = dense). Mean rank "
             "among the pruned methods, averaged over tasks (1 = best). Marks as in the tables below."]
    by = {(e["model"], e["method"], e["sparsity"]): e for e in entries}
    pruned = [m for m in s.methods if METHODS[m].method is not None]
    for model in s.models:
        lines += ["", f"### Across tasks: {model.upper()}", ""]
        header = ["Method"] + [f"{col} {sp:.0%}" for sp in s.sparsities for col in ("score", "rank")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        marks = {sp: separated_marks({m: (by[(model, m, sp)]["score"]["mean"], by[(model, m, sp)]["score"]["std"])
                                      for m in pruned if (model, m, sp) in by}, digits=3) for sp in s.sparsities}
        for m in pruned:
            cells = [METHODS[m].label]
            for sp in s.sparsities:
                e = by.get((model, m, sp))
                if e is None:
                    cells += ["-", "-"]
                    continue
                st = e["score"]
                text = f"{st['mean']:.3f}" + (f"±{st['std']:.3f}" if st["n"] > 1 else "")
                cells.append({"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(marks[sp].get(m, ""), text))
                cells.append("-" if e["mean_rank"] is None else f"{e['mean_rank']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        if "multiflow" in pruned:
            lines.append("")
            for sp in s.sparsities:
                lines.append(f"- {sp:.0%}: " + _standing(marks[sp], by, model, sp))
    return "\n".join(lines)


def _standing(marks: dict[str, str], by: dict, model: str, sp: float) -> str:
    """One plain sentence: is MultiFlow the best method at this sparsity, tied, or behind whom."""
    if (model, "multiflow", sp) not in by:
        return "MultiFlow not run."
    mine = marks.get("multiflow")
    best = sorted(METHODS[m].label for m, mark in marks.items() if mark == "best")
    if mine == "best" and len(best) == 1:
        return "MultiFlow is the best method, ahead of the others by more than the seed spread."
    if mine == "best":
        return "MultiFlow shares the best tier with " + ", ".join(b for b in best if b != "MultiFlow") + "."
    if not marks:
        return "no method is ahead of the others by more than the seed spread."
    return ("MultiFlow is not the best: " + ", ".join(best) + (" (MultiFlow second)." if mine == "second" else "."))


def plot_cross_task(entries: list[dict], s: QualitySettings, out: Path) -> Path:
    """The paper's Figure 3: normalised score against sparsity, one panel per model, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(e["model"], e["method"], e["sparsity"]): e for e in entries}
    fig, axes = plt.subplots(1, len(s.models), figsize=(4.2 * len(s.models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], s.models):
        ax.axhline(1.0, color="black", ls="--", lw=1, label="Dense")
        for m in s.methods:
            if METHODS[m].method is None:
                continue
            points = [(100 * sp, by[(model, m, sp)]["score"]) for sp in s.sparsities if (model, m, sp) in by]
            if points:
                ax.errorbar([x for x, _ in points], [p["mean"] for _, p in points], yerr=[p["std"] for _, p in points],
                            marker="o", ms=3, capsize=2, lw=2.2 if m == "multiflow" else 1.2, label=METHODS[m].label)
        ax.set_title(f"{model.upper()}: mean normalised score over tasks", fontsize=9)
        ax.set_xlabel("sparsity (%)", fontsize=8)
        ax.set_ylabel("metric / dense", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=7)
    fig.tight_layout(rect=(0, 0.16 if len(labels) > 5 else 0.09, 1, 1))
    path = out / "quality_cross_task.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
