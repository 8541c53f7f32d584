"""PNG plots of an experiment (matplotlib, Agg backend: no display needed).

``accuracy.png``: test accuracy (validation when evaluation is off) per epoch, one line per mode,
the mean over seeds with the min-max band when there are several.
``alignment.png``: one panel per mode, one line per layer: the angle between the weight update
the mode produced and the true backprop gradient (``bio_ext.alignment``'s ``update``) over
training steps, mean over seeds. 0 degrees is backprop's direction, 90 orthogonal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _by_mode(results) -> Dict[str, list]:
    out: Dict[str, list] = defaultdict(list)
    for r in results:
        out[r.mode].append(r)
    return out


def plot_accuracy(results: Sequence, path: Path, *, title: str = "") -> Path:
    """Accuracy per epoch per mode; returns ``path``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    key_used = "test"
    for mode, runs in _by_mode(results).items():
        key = "test_accuracy" if any(h.get("test_accuracy") is not None for r in runs for h in r.history) \
            else "val_accuracy"
        key_used = key.split("_")[0]
        per_epoch: Dict[int, List[float]] = defaultdict(list)
        for r in runs:
            for h in r.history:
                if h.get(key) is not None:
                    per_epoch[h["epoch"]].append(h[key])
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
        line, = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, markersize=3,
                        label=f"{mode} ({mean[-1]:.2f}%)")
        if any(len(per_epoch[e]) > 1 for e in epochs):
            ax.fill_between(epochs, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{key_used} accuracy (%)")
    ax.set_title(f"{title}: {key_used} accuracy per epoch" if title else f"{key_used} accuracy per epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_alignment(results: Sequence, path: Path, *, title: str = "", quantity: str = "update") -> Path:
    """Per-layer ``quantity`` angle over training, one panel per mode; returns ``path``."""
    modes = _by_mode(results)
    n = max(len(modes), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), dpi=100, squeeze=False, sharey=True)
    top = 0.0
    for ax, (mode, runs) in zip(axes.flat, modes.items()):
        series: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        for r in runs:
            for row in r.alignment:
                for layer, qs in row["layers"].items():
                    if qs.get(quantity) is not None:
                        series[layer][row["step"]].append(qs[quantity])
        for layer, points in series.items():
            steps = sorted(points)
            ax.plot(steps, [sum(points[s]) / len(points[s]) for s in steps], label=layer, linewidth=1.2)
        ax.set_title(mode, fontsize=10)
        ax.set_xlabel("step")
        top = max(top, max((v for p in series.values() for vs in p.values() for v in vs), default=0.0))
        ax.axhline(90, color="grey", linewidth=0.6, linestyle="--")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, title="layer", title_fontsize=6)
        else:
            ax.text(0.5, 0.5, "no alignment logged", ha="center", va="center", transform=ax.transAxes)
    axes[0, 0].set_ylim(0, 180 if top > 95 else 95)  # shared by every panel
    for ax in list(axes.flat)[len(modes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{quantity} angle vs backprop (deg)")
    fig.suptitle(f"{title}: angle between the mode's weight update and the backprop gradient" if title else
                 "angle between the mode's weight update and the backprop gradient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
