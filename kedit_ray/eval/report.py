"""`kedit report`: the aggregate table of eval runs and a figure of their scores; for runs with checkpoints (batch,
sequential protocols) also ES / PS / NS (and TRR, portability and perplexity where measured) against the number of
edits, one line per run scored at two checkpoints or more (labelled by its method), in lifelong.png beside the figure.

Each run's results are read once (`Run`); the table, the figure and the bootstrap intervals come from those rows.
The figure: ES, PS, NS and S as groups of bars, one bar per run after the edit and its unedited value hatched (once,
in grey, when every run scored the same cases on the same model), with 95% intervals from a bootstrap over cases,
n per run in the legend and runs whose every case failed named under the axes, not drawn; with more than MANY runs,
a panel per metric and a row per run instead.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kedit_ray.datasets.registry import lookup
from kedit_ray.eval.summary import SCORES, summarize

COLUMNS = [("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"), ("S", "score")]
# shown when some run has it: zsRE with portability questions, --ppl-docs, --generate (beside ES and PS)
OPTIONAL = [("ES gen", "efficacy_generated"), ("PS gen", "paraphrase_generated"), ("Port", "portability_score"),
            ("PPL", "perplexity")]
MANY = 4   # more runs than this: `plot` draws a row per run instead of grouped bars


@dataclass
class Run:
    """One `kedit eval --out` directory, read once: its result columns and their summary."""
    path: str
    cols: dict[str, list]
    summary: dict
    dataset: str   # a registered dataset's name

    @property
    def label(self) -> str:
        return str(self.summary.get("method"))

    def _col(self, name: str) -> list:
        return self.cols.get(name) or [None] * len(self.cols.get("case_id", []))

    @property
    def last_checkpoint(self) -> int | None:
        """The number of edits applied at the last checkpoint (batch, sequential protocols), else None."""
        return max((t for t in self._col("checkpoint") if t is not None), default=None)

    def final_rows(self) -> list[int]:
        """Indices of the rows the summary's top-level figures describe: error-free edit rows (at the last
        checkpoint, when there are checkpoints)."""
        last = self.last_checkpoint
        return [i for i, (e, t, role) in enumerate(zip(self._col("error"), self._col("checkpoint"), self._col("role")))
                if e is None and t == last and role != "held_out"]

    def scores(self, prefix: str = "") -> np.ndarray:
        """[n, 3] ES, PS, NS per case (`prefix` "pre_": of the unedited model); NaN where not measured."""
        rows = self.final_rows()
        cols = [self._col(prefix + m) for m in SCORES]
        return np.array([[np.nan if c[i] is None else c[i] for c in cols] for i in rows], dtype=float).reshape(-1, 3)

    def errors(self) -> Counter:
        """Error messages (first line) and how many rows have each."""
        return Counter(str(e).splitlines()[0] for e in self.cols.get("error", []) if e is not None)


def load_run(run_dir: str | Path) -> Run:
    from kedit_ray.results import read_results   # names and quarantines a damaged part
    from kedit_ray.eval.resume import CheckpointLog

    if not (Path(run_dir) / "results").is_dir():
        raise FileNotFoundError(f"{run_dir} holds no results/ (is it a `kedit eval --out` directory?)")
    config = Path(run_dir) / "config.json"   # a run that does not name its dataset is CounterFact
    dataset = json.loads(config.read_text()).get("dataset", "counterfact") if config.exists() else "counterfact"
    table = read_results(run_dir)
    summary = summarize(table, dataset)
    written = Path(run_dir) / "summary.json"
    if written.exists():   # the protocol is in the run's summary.json, not in its rows
        summary.setdefault("protocol", json.loads(written.read_text()).get("protocol"))
    summary["checkpoint_log"] = CheckpointLog(run_dir).read()   # a sequential run's seconds and memory
    return Run(str(run_dir), table.to_pydict(), summary, dataset)


def load_summary(run_dir: str | Path) -> dict:
    return load_run(run_dir).summary


def bootstrap(scores: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap over cases: `scores` [n, 3] holds ES, PS, NS per case (NaN: not measured). Resamples the
    n case rows with replacement `n_boot` times (fixed seed) and returns [4, 2]: the `level` interval of the mean
    of ES, PS and NS, and of S, their harmonic mean, recomputed on each resample. NaN where there is nothing."""
    n = len(scores)
    if n == 0:
        return np.full((4, 2), np.nan)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, n_boot, 100):                              # 100 resamples at a time: [100, n, 3]
        sample = scores[rng.integers(0, n, size=(min(100, n_boot - start), n))]
        counts = (~np.isnan(sample)).sum(1)
        means.append(np.where(counts > 0, np.nansum(sample, 1) / np.maximum(counts, 1), np.nan))
    means = np.concatenate(means)                                    # [n_boot, 3]
    with np.errstate(divide="ignore"):
        s = np.where((means > 0).all(1), 3 / (1 / means).sum(1), 0.0)
    s[np.isnan(means).any(1)] = np.nan                               # S needs all three
    stats = np.column_stack([means, s])                              # [n_boot, 4]
    tail = (1 - level) / 2 * 100
    out = np.full((4, 2), np.nan)
    for j in range(4):
        ok = stats[:, j][~np.isnan(stats[:, j])]
        if len(ok):
            out[j] = np.percentile(ok, [tail, 100 - tail])
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def columns(summaries: Iterable[dict]) -> list[tuple[str, str]]:
    """COLUMNS, then the OPTIONAL ones some summary (or one of its checkpoints) has a value for."""
    found = [c for s in summaries for c in [s, *s.get("checkpoints", {}).values()]]
    return COLUMNS + [(c, k) for c, k in OPTIONAL if any(f.get(k) is not None for f in found)]


def table(summaries: dict[str, dict]) -> str:
    shown = columns(summaries.values())
    head = ["run", "method", "cases", "errors"] + [f"{c} pre→post" for c, _ in shown] + ["s/edit", "C"]
    lines = [head]
    for run, s in summaries.items():
        cov = s.get("cov")    # a stats file, several, or "identity" (--no-cov)
        lines.append([run, str(s.get("method")), str(s["cases"]), str(s["errors"])] +
                     [f"{_fmt(s.get('pre_' + k))}→{_fmt(s.get(k))}" for _, k in shown] +
                     [_fmt(s.get("seconds_per_edit")), "-" if cov is None else "C = identity" if cov == "identity"
                      else "layer stats"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def _point(scores: np.ndarray) -> np.ndarray:
    """ES, PS, NS means over cases and S, as the summary computes them (NaN where not measured)."""
    counts = (~np.isnan(scores)).sum(0)
    means = np.where(counts > 0, np.nansum(scores, 0) / np.maximum(counts, 1), np.nan)
    s = np.nan if np.isnan(means).any() else 0.0 if (means <= 0).any() else 3 / (1 / means).sum()
    return np.append(means, s)


def _labels(runs: list[Run]) -> list[str]:
    """The method, with the folder where two runs share a method, and "C = I" for runs that edited without stats."""
    methods = Counter(r.label for r in runs)
    out = []
    for r in runs:
        label = r.label if methods[r.label] == 1 else f"{r.label} ({Path(r.path).name})"
        cov = {c for c in r.cols.get("cov", []) if c is not None}
        out.append(label + (" (C = I)" if cov == {"identity"} else ""))
    return out


def _counts(run: Run) -> str:
    n, errors = len(run.final_rows()), sum(run.errors().values())
    return f"n={n}" + (f", {errors} error{'s' * (errors != 1)}" if errors else "")


def _shared_pre(runs: list[Run]) -> bool:
    """Whether every run scored the same cases on the same model, with the same unedited scores (then drawn once)."""
    if len(runs) < 2 or len({str(r.summary.get("model")) for r in runs}) != 1:
        return False
    by_case = [dict(zip((r.cols["case_id"][i] for i in r.final_rows()), r.scores("pre_"))) for r in runs]
    ids = sorted(by_case[0])
    first = np.array([by_case[0][i] for i in ids])
    return not np.isnan(first).all() and all(
        sorted(b) == ids and np.allclose([b[i] for i in ids], first, equal_nan=True) for b in by_case[1:])


def plot(runs: list[Run], png: str | Path) -> Path:
    """Grouped bars: per metric, each run after the edit (solid) and before it (hatched), with 95% bootstrap
    intervals over cases. Runs with no successful case are listed under the axes instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labelled = list(zip(runs, _labels(runs)))
    drawn = [(r, lab) for r, lab in labelled if r.final_rows()]
    failed = [(r, lab) for r, lab in labelled if not r.final_rows()]
    if len(drawn) > MANY:
        return _plot_rows(drawn, failed, png)
    shared = _shared_pre([r for r, _ in drawn])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = []                                           # (values [n, 3], colour, hatched, legend label)
    if shared:
        first = drawn[0][0].scores("pre_")
        bars.append((first, "#9aa5b1", True, f"unedited (the same {len(first)} cases)"))
    for i, (r, lab) in enumerate(drawn):
        color, pre = colors[i % len(colors)], r.scores("pre_")
        if not shared and not np.isnan(pre).all():
            bars.append((pre, color, True, f"{lab}: unedited"))
        edited = "edited" if r.last_checkpoint is None else f"after {r.last_checkpoint} edits"
        bars.append((r.scores(), color, False, f"{lab}: {edited}, {_counts(r)}"))

    fig, ax = plt.subplots(figsize=(7.2, 4.0), layout="constrained")
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(COLUMNS))
    for j, (values, color, hatched, label) in enumerate(bars):
        point, ci = _point(values), bootstrap(values)
        shown = ~np.isnan(point)
        err = np.abs(ci - point[:, None]).T                         # [2, 4]: below, above
        at = x[shown] + (j - (len(bars) - 1) / 2) * width
        ax.bar(at, point[shown], width * 0.92, label=label, color="white" if hatched else color, edgecolor=color,
               hatch="///" if hatched else None, linewidth=1.0, yerr=err[:, shown], capsize=2.5,
               error_kw={"elinewidth": 0.9, "ecolor": "#333333"})
        for xi, top, v in zip(at, ci[shown, 1], point[shown]):     # the value above its interval
            ax.text(xi, max(top, v) + 0.015, f"{v:.2f}", ha="center", va="bottom", fontsize=6.5, color="#333333")
    ax.set_xticks(x, ["ES\nefficacy", "PS\nparaphrase", "NS\nneighbourhood", "S\nharmonic mean"])
    ax.set_ylim(0, 1.12)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (mean over cases)")
    ax.yaxis.grid(True, linewidth=0.5, alpha=0.5)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(_title(runs), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if drawn:
        handles.append(Patch(facecolor="none", edgecolor="none"))
        labels.append("error bars: 95% bootstrap CI over cases")
    notes = _not_drawn(failed)
    handles += [Patch(facecolor="none", edgecolor="none")] * len(notes)
    labels += notes
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return Path(png)


def _title(runs: list[Run]) -> str:
    models = sorted({str(r.summary.get("model")) for r in runs})
    return f"{', '.join(models)} · {', '.join(sorted({lookup(r.dataset).title for r in runs}))}"


def _not_drawn(failed: list[tuple[Run, str]]) -> list[str]:
    return [f"not drawn: {lab}: all {len(set(r.cols['case_id']))} cases failed ({_first_error(r)})"
            if r.cols.get("case_id") else f"not drawn: {lab}: no results" for r, lab in failed]


def _plot_rows(drawn: list[tuple[Run, str]], failed: list[tuple[Run, str]], png: str | Path) -> Path:
    """`plot` for many runs: a panel per metric, a row per run (its bar after the edit with its 95% interval, its
    value in a column at the right, a tick at its unedited value): labels never overlap, however many runs."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    y = np.arange(len(drawn))[::-1]                                   # the first run on top
    fig, axes = plt.subplots(1, len(COLUMNS), sharey=True, figsize=(10, 1.4 + 0.3 * len(drawn)),
                             layout="constrained")
    points = [(_point(r.scores()), bootstrap(r.scores()), _point(r.scores("pre_"))) for r, _ in drawn]
    for m, (ax, name) in enumerate(zip(axes, ["ES efficacy", "PS paraphrase", "NS neighbourhood", "S harmonic mean"])):
        for yi, (post, ci, pre) in zip(y, points):
            if np.isnan(post[m]):
                continue
            err = np.abs(ci[m] - post[m])[:, None]
            ax.barh(yi, post[m], 0.7, color="#4c72b0", xerr=err, capsize=2,
                    error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
            ax.plot(pre[m], yi, marker="|", markersize=11, markeredgewidth=2, color="#d62728")
            ax.text(1.05, yi, f"{post[m]:.2f}", va="center", fontsize=7, color="#333333")   # a column of values
        ax.set_xlim(0, 1.22)
        ax.set_xticks([0, 0.5, 1])
        ax.set_title(name, fontsize=9)
        ax.xaxis.grid(True, linewidth=0.5, alpha=0.5)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    edited = ["edited" if r.last_checkpoint is None else f"after {r.last_checkpoint} edits" for r, _ in drawn]
    axes[0].set_yticks(y, [f"{lab} ({what}, {_counts(r)})" for (r, lab), what in zip(drawn, edited)], fontsize=8)
    fig.suptitle(_title([r for r, _ in drawn + failed]), fontsize=10)
    handles = [Patch(color="#4c72b0"), Line2D([], [], marker="|", linestyle="none", markersize=11,
                                               markeredgewidth=2, color="#d62728"),
               Patch(facecolor="none", edgecolor="none")]
    labels = ["after the edits (mean over cases)", "unedited model, the same cases", "error bars: 95% bootstrap CI"]
    notes = _not_drawn(failed)
    fig.legend(handles + [handles[-1]] * len(notes), labels + notes, loc="outside lower center", ncols=3, fontsize=8,
               frameon=False)
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return Path(png)


def _first_error(run: Run, width: int = 60) -> str:
    message, _ = run.errors().most_common(1)[0]
    return message if len(message) <= width else message[:width - 1] + "…"


def error_lines(runs: list[Run]) -> str:
    """One line per run with error rows: how many, and the most common message."""
    lines = []
    for r in runs:
        errors = r.errors()
        if errors:
            total = sum(errors.values())
            message, count = errors.most_common(1)[0]
            lines.append(f"errors in {r.path}: {total} of {len(r.cols['case_id'])} rows"
                         f"{' (every case failed, not drawn)' if not r.final_rows() else ''}; "
                         f"{count}× {message}")
    return "\n".join(lines)


def checkpoint_table(summaries: dict[str, dict]) -> str:
    """Per run and checkpoint, in the layout of the GRACE paper's table: TRR, ERR, their average, #keys (GRACE's
    codebook; "-" for the others), then ES / PS / NS / S of the edits so far (of their sample, with
    --checkpoint-sample), and where the run logged them the seconds spent editing up to the checkpoint and scoring
    it, and the workers' largest resident memory then."""
    shown = columns(summaries.values())
    logged = any(s.get("checkpoint_log") for s in summaries.values())
    head = ["run", "method", "edits", "TRR", "ERR", "Avg", "#keys"] + [c for c, _ in shown] + \
        ["edit s", "score s", "RSS GB"] * logged
    lines = [head]
    for run, s in summaries.items():
        log = {str(e["edits"]): e for e in s.get("checkpoint_log") or []}
        for t, c in sorted(s.get("checkpoints", {}).items(), key=lambda kv: int(kv[0])):
            both = None if c.get("TRR") is None or c.get("ERR") is None else (c["TRR"] + c["ERR"]) / 2
            keys = c.get("ckpt_codebook_keys")
            e = log.get(t, {})
            lines.append([run, str(s.get("method")), t, _fmt(c.get("TRR")), _fmt(c.get("ERR")), _fmt(both),
                          "-" if keys is None else f"{keys:.0f}"] + [_fmt(c.get(key)) for _, key in shown] +
                         [f"{e['edit_s']:.0f}" if e else "-", f"{e['score_s']:.0f}" if e else "-",
                          f"{e['rss'] / 2**30:.2f}" if e else "-"] * logged)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def plot_lifelong(summaries: dict[str, dict], png: str | Path) -> Path:
    """ES / PS / NS / TRR against the number of edits applied, one line per run, and dotted the same cases'
    scores on the unedited model: once in grey where every run scored the same cases, else in each run's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = COLUMNS[:3] + [("TRR", "TRR")] + columns(summaries.values())[len(COLUMNS):]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]   # one per run, the same in every panel
    if len(summaries) > len(colors):
        colors = list(plt.get_cmap("tab20").colors)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), layout="constrained")
    for ax, (name, key) in zip(axes, panels):
        curves = {run: [sorted((int(t), c[k]) for t, c in s.get("checkpoints", {}).items() if c.get(k) is not None)
                        for k in (key, f"pre_{key}")] for run, s in summaries.items()}
        pres = [pre for post, pre in curves.values() if post and pre]
        shared = len(pres) > 1 and all(pre == pres[0] for pre in pres)
        for i, (run, (post, pre)) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            label = f"{summaries[run].get('method')} ({summaries[run].get('protocol', Path(run).name)})"
            if post:
                ax.plot(*zip(*post), marker="o", color=color, label=label)
                if pre and not shared:
                    ax.plot(*zip(*pre), linestyle=":", color=color, label=f"{label}, unedited")
        if shared:
            ax.plot(*zip(*pres[0]), linestyle=":", color="grey", label="unedited (the same cases)")
        ax.set_xlabel("edits applied")
        ax.set_title(name)
        if key != "perplexity":   # the scores are shares; perplexity has no upper bound
            ax.set_ylim(0, 1.05)
        if len({int(t) for s in summaries.values() for t in s.get("checkpoints", {})}) > 2:
            ax.set_xscale("log")
    if len(summaries) > MANY:   # a legend under the panels, not over the first one's curves
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8,
                   frameon=False)
    else:
        axes[0].legend(fontsize=8, loc="center right")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def report(dirs: list[str], png: str | None = None) -> str:
    return render([load_run(d) for d in dirs], png or Path(dirs[0]) / "report.png")


def render(runs: list[Run], png: str | Path) -> str:
    """`report` over runs already read: the table, the figure at `png`, lifelong.png beside it."""
    summaries = {r.path: r.summary for r in runs}
    path = plot(runs, png)
    errors = error_lines(runs)
    text = f"{table(summaries)}\n" + (f"\n{errors}\n" if errors else "") + f"\nchart: {path}"
    if any(s.get("checkpoints") for s in summaries.values()):
        # the curves: runs scored at two checkpoints or more (a run in one batch is a point), else every run
        curves = {p: s for p, s in summaries.items() if len(s.get("checkpoints") or {}) > 1} or summaries
        lifelong = plot_lifelong(curves, Path(path).with_name("lifelong.png"))
        text += f"\n\n{checkpoint_table(summaries)}\n\nES/PS/NS vs number of edits: {lifelong}"
    return text
