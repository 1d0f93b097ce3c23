"""Heatmaps in the style of the ROME paper's figures (token × layer, one per kind) and the by-layer note figure.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state) and written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kedit_ray.io import atomic_write
from kedit_ray.tracing.trace import ROLES, FactTrace

CMAP = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLOR = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
NAME = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}
ROLE_LABELS = ("First subject token", "Middle subject tokens", "Last subject token", "First subsequent token",
               "Further tokens", "Last token")
RC = {"font.family": "serif", "font.size": 7}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _xlabel(kind: str, window: int, model: str) -> str:
    if kind == "hidden":
        return f"single restored layer within {model}"
    return f"center of interval of {window} restored {NAME[kind]} layers"


def heatmap(path: Path, scores: np.ndarray, labels: list[str], kind: str, title: str, xlabel: str,
            cbar: str, vmin: float | None = None) -> Path:
    """scores [rows, layers] as ROME draws them: rows top-down, layer ticks every 5."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(3.5, 0.25 * len(labels) + 0.9), dpi=200)
        ax = fig.subplots()
        h = ax.pcolor(np.ma.masked_invalid(scores), cmap=CMAP[kind], vmin=vmin)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(len(labels))])
        ax.set_yticklabels(labels)
        ax.set_xticks([0.5 + i for i in range(0, scores.shape[1], 5)])
        ax.set_xticklabels(list(range(0, scores.shape[1], 5)))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        fig.colorbar(h).ax.set_title(cbar)
        return _save(fig, path)


def plot_fact(out_dir: Path, trace: FactTrace, model: str, window: int) -> list[Path]:
    """One heatmap per kind of P*_restored (colour floor P*), subject tokens starred."""
    labels = [repr(t)[1:-1] + ("*" if t_i in range(*trace.subject_range) else "")
              for t_i, t in enumerate(trace.tokens)]
    return [heatmap(out_dir / f"fact-{trace.fact}-{kind}.png", scores, labels, kind,
                    f"Impact of restoring {NAME[kind]} after corrupted input", _xlabel(kind, window, model),
                    f"p({trace.answer.strip()})", vmin=trace.p_star)
            for kind, scores in trace.scores.items()]


def plot_averages(out_dir: Path, summary: dict) -> list[Path]:
    """Average indirect effect by token role × layer, one heatmap per kind."""
    paths = []
    for kind, by_role in summary["ie"].items():
        n_layers = len(next(iter(by_role.values())))
        scores = np.array([by_role.get(r, [np.nan] * n_layers) for r in ROLES], dtype=float)
        what = {"hidden": "a single hidden state", "mlp": f"a run of {summary['window']} MLP outputs",
                "attn": f"a run of {summary['window']} Attn outputs"}[kind]
        paths.append(heatmap(out_dir / f"average-{kind}.png", scores, list(ROLE_LABELS), kind,
                             f"Average indirect effect of {what}\n({summary['traced']} facts, {summary['model']})",
                             _xlabel(kind, summary["window"], summary["model"]), "AIE"))
    return paths


def plot_by_layer(path: Path, summary: dict) -> Path:
    """Average IE by layer at the last subject token and at the last token, one line per kind."""
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(6.5, 2.2), dpi=200)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, role, label in zip(axes, ("last_subject", "last"), ("last subject token", "last token")):
            for kind, by_role in summary["ie"].items():
                if role in by_role:
                    ax.plot(by_role[role], color=COLOR[kind], marker=".", label=NAME[kind] if kind != "hidden"
                            else "hidden state")
            ax.set_title(f"Average indirect effect at the {label}")
            ax.set_xlabel(f"layer (MLP / Attn: centre of {summary['window']} restored layers)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("AIE")
        axes[0].legend()
        fig.suptitle(f"{summary['model']}, {summary['traced']} facts, {summary['samples']} noise samples", y=1.02)
        return _save(fig, path)
