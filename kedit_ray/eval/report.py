"""`kedit report`: the aggregate table of eval runs and a bar chart of pre- against post-edit scores; for runs
with checkpoints (batch, sequential protocols) also ES / PS / NS (and TRR) against the number of edits, one line
per run (labelled by its method), in lifelong.png beside the chart."""
from __future__ import annotations

import json
from pathlib import Path

from kedit_ray.eval.summary import summarize

COLUMNS = [("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"), ("S", "score")]


def load_summary(run_dir: str | Path) -> dict:
    from kedit_ray.results import read_results   # names and quarantines a damaged part

    results = Path(run_dir) / "results"
    if not results.is_dir():
        raise FileNotFoundError(f"{run_dir} holds no results/ (is it a `kedit eval --out` directory?)")
    config = Path(run_dir) / "config.json"
    dataset = json.loads(config.read_text()).get("dataset") if config.exists() else None
    from kedit_ray.eval import scorer_name

    return summarize(read_results(run_dir), scorer_name(dataset))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(summaries: dict[str, dict]) -> str:
    head = ["run", "method", "cases", "errors"] + [f"{c} pre→post" for c, _ in COLUMNS] + ["s/edit"]
    lines = [head]
    for run, s in summaries.items():
        lines.append([run, str(s.get("method")), str(s["cases"]), str(s["errors"])] +
                     [f"{_fmt(s.get('pre_' + k))}→{_fmt(s.get(k))}" for _, k in COLUMNS] +
                     [_fmt(s.get("seconds_per_edit"))])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def plot(summaries: dict[str, dict], png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.5 * len(summaries), 3.6), squeeze=False)
    for ax, (run, s) in zip(axes[0], summaries.items()):
        x = range(len(COLUMNS))
        pre = [s.get("pre_" + k) or 0 for _, k in COLUMNS]
        post = [s.get(k) or 0 for _, k in COLUMNS]
        ax.bar([i - 0.2 for i in x], pre, 0.4, label="pre-edit", color="#9aa5b1")
        ax.bar([i + 0.2 for i in x], post, 0.4, label="post-edit", color="#d1495b")
        ax.set_xticks(list(x), [c for c, _ in COLUMNS])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{s.get('method')} · {Path(run).name} ({s['cases']} cases)", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def checkpoint_table(summaries: dict[str, dict]) -> str:
    """Per run and checkpoint, in the layout of the GRACE paper's table: TRR, ERR, their average, #keys (GRACE's
    codebook; "-" for the others), then ES / PS / NS / S of the edits so far."""
    head = ["run", "method", "edits", "TRR", "ERR", "Avg", "#keys"] + [c for c, _ in COLUMNS]
    lines = [head]
    for run, s in summaries.items():
        for t, c in sorted(s.get("checkpoints", {}).items(), key=lambda kv: int(kv[0])):
            both = None if c.get("TRR") is None or c.get("ERR") is None else (c["TRR"] + c["ERR"]) / 2
            keys = c.get("ckpt_codebook_keys")
            lines.append([run, str(s.get("method")), t, _fmt(c.get("TRR")), _fmt(c.get("ERR")), _fmt(both),
                          "-" if keys is None else f"{keys:.0f}"] + [_fmt(c.get(key)) for _, key in COLUMNS])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def plot_lifelong(summaries: dict[str, dict], png: str | Path) -> Path:
    """ES / PS / NS / TRR against the number of edits applied, one line per run, and dotted the same cases'
    scores on the unedited model: once in grey where every run scored the same cases, else in each run's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"), ("TRR", "TRR")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]   # one per run, the same in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
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
        ax.set_ylim(0, 1.05)
        if len({int(t) for s in summaries.values() for t in s.get("checkpoints", {})}) > 2:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def report(dirs: list[str], png: str | None = None) -> str:
    summaries = {d: load_summary(d) for d in dirs}
    for d, s in summaries.items():   # the protocol is in the run's summary.json, not in its rows
        written = Path(d) / "summary.json"
        if written.exists():
            s.setdefault("protocol", json.loads(written.read_text()).get("protocol"))
    path = plot(summaries, png or Path(dirs[0]) / "report.png")
    text = f"{table(summaries)}\n\nchart: {path}"
    if any(s.get("checkpoints") for s in summaries.values()):
        lifelong = plot_lifelong(summaries, Path(path).with_name("lifelong.png"))
        text += f"\n\n{checkpoint_table(summaries)}\n\nES/PS/NS vs number of edits: {lifelong}"
    return text
