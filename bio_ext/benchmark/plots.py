"""PNG plots of an experiment (matplotlib, Agg backend: no display needed).

``accuracy.png``: test accuracy (validation when evaluation is off) per epoch, one line per mode,
the mean over seeds with the min-max band when there are several; a single epoch is a marker.
``alignment.png``: one panel per mode: the angle between the weight update the mode produced and
the true backprop gradient (``bio_ext.alignment``'s ``update``; for ``bwbpf`` the block's local-loss
gradient against the end-to-end one) per layer over training steps, mean over seeds. 0 degrees is
backprop's direction, 90 orthogonal. The layout follows the data:

* several steps, up to :data:`MAX_LINES` layers: one line per layer (markers up to 30 steps), one
  legend for the whole figure below the panels (a layer has the same colour in every panel);
* several steps, more layers (a ResNet's 21, a transformer's 60): a heat map of angle by layer
  (rows, input to output) and step (columns), one colour bar;
* one logged step: the angle of each layer as a point (layers as rows, as in the heat map).

Figures are at least :data:`MIN_WIDTH` inches wide at :data:`DPI` (1000 px) and laid out by
matplotlib's constrained layout, so titles, tick labels, legends and colour bars stay inside.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
MIN_WIDTH = 10.0
#: more layers than this are drawn as a heat map
MAX_LINES = 10
#: at most this many layer names are written on an axis (every k-th one beyond)
MAX_LABELS = 32
QUANTITY_TEXT = {
    "update": "angle between the mode's weight update and the backprop gradient",
    "signal": "angle between the injected input gradient and backprop's",
    "feedback": "angle between the feedback and the forward weight",
    "estimate": "angle between GrAPE's forward-gradient estimate and backprop's input gradient",
}

Series = Dict[str, Dict[int, List[float]]]  # layer -> step -> values over seeds


def _by_mode(results) -> Dict[str, list]:
    out: Dict[str, list] = defaultdict(list)
    for r in results:
        out[r.mode].append(r)
    return out


def plot_accuracy(results: Sequence, path: Path, *, title: str = "") -> Path:
    """Accuracy per epoch per mode; returns ``path``."""
    fig, ax = plt.subplots(figsize=(MIN_WIDTH, 5.0), dpi=DPI, layout="constrained")
    key_used, seen = "test", set()
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
        seen.update(epochs)
        mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
        line, = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, markersize=4,
                        label=f"{mode} ({mean[-1]:.2f}%)")
        if any(len(per_epoch[e]) > 1 for e in epochs):
            lo, hi = [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs]
            if len(epochs) == 1:
                ax.errorbar(epochs, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], color=line.get_color(),
                            capsize=4)
            else:
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(seen) == 1:  # one epoch: one tick, the markers in the middle
        (e,) = seen
        ax.set_xlim(e - 1, e + 1)
        ax.set_xticks([e])
    ax.set_ylabel(f"{key_used} accuracy (%)")
    ax.set_title(f"{title}: {key_used} accuracy per epoch" if title else f"{key_used} accuracy per epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9, loc="best")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _series(runs, quantity: str) -> Series:
    series: Series = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for row in r.alignment:
            for layer, qs in row["layers"].items():
                if qs.get(quantity) is not None:
                    series[layer][row["step"]].append(qs[quantity])
    return series


def _grid(series: Series, layers: List[str], steps: List[int]) -> np.ndarray:
    """Mean angle, ``(len(layers), len(steps))``, NaN where nothing was logged."""
    out = np.full((len(layers), len(steps)), np.nan)
    col = {s: j for j, s in enumerate(steps)}
    for i, layer in enumerate(layers):
        for s, vs in series.get(layer, {}).items():
            out[i, col[s]] = sum(vs) / len(vs)
    return out


def _layer_axis(ax, layers: List[str]) -> None:
    """Layer names as rows, input at the top; every k-th name when there are many."""
    every = max(1, math.ceil(len(layers) / MAX_LABELS))
    ticks = list(range(0, len(layers), every))
    ax.set_yticks(ticks, [layers[i] for i in ticks], fontsize=8 if len(layers) <= 16 else 7 if len(layers) <= 32 else 6)
    ax.set_ylim(len(layers) - 0.5, -0.5)


def _edges(steps: List[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _draw_lines(ax, grid: np.ndarray, steps: List[int], colors) -> None:
    for i, row in enumerate(grid):
        if not np.isnan(row).all():
            ax.plot(steps, row, color=colors[i], linewidth=1.3, marker="o" if len(steps) <= 30 else None,
                    markersize=3)
    ax.axhline(90, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))


def _draw_heat(ax, grid: np.ndarray, steps: List[int], layers: List[str], vmax: float):
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(grid),
                         cmap="viridis", vmin=0, vmax=vmax, shading="flat")
    _layer_axis(ax, layers)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    return mesh


def _draw_points(ax, grid: np.ndarray, layers: List[str], vmax: float) -> None:
    values = grid[:, 0]
    ok = ~np.isnan(values)
    ax.plot(values[ok], np.arange(len(layers))[ok], color="C0", marker="o", markersize=5, linewidth=0.6, zorder=3)
    ax.axvline(90, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlim(-4, vmax + 5)  # a point at 0 degrees (backprop's direction) is drawn whole
    _layer_axis(ax, layers)


def _layout(n_modes: int, n_layers: int, rows_per_layer: bool) -> Tuple[int, int, Tuple[float, float]]:
    cols = min(max(n_modes, 1), 3)
    rows = math.ceil(max(n_modes, 1) / cols)
    panel_h = max(3.2, 0.12 * n_layers + 1.4) if rows_per_layer else 3.4
    return rows, cols, (max(MIN_WIDTH, 4.6 * cols), rows * panel_h + 1.6)


def plot_alignment(results: Sequence, path: Path, *, title: str = "", quantity: str = "update") -> Path:
    """Per-layer ``quantity`` angle over training, one panel per mode (see the module docstring); returns
    ``path``."""
    data = {mode: _series(runs, quantity) for mode, runs in _by_mode(results).items()}
    layers = list(dict.fromkeys(layer for s in data.values() for layer in s))
    steps = sorted({step for s in data.values() for p in s.values() for step in p})
    style = "points" if len(steps) == 1 else "heat" if len(layers) > MAX_LINES else "lines"
    rows, cols, size = _layout(len(data), len(layers), style != "lines")
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=DPI, squeeze=False, sharey=True, layout="constrained")
    top = max((v for s in data.values() for p in s.values() for vs in p.values() for v in vs), default=0.0)
    vmax = 180.0 if top > 95 else 90.0
    colors = ([plt.colormaps["tab10"](i) for i in range(len(layers))] if len(layers) <= MAX_LINES else
              list(plt.colormaps["turbo"](np.linspace(0.05, 0.95, len(layers)))))
    mesh = None
    for ax, (mode, series) in zip(axes.flat, data.items()):
        ax.set_title(mode, fontsize=11)
        if style != "heat":
            ax.grid(alpha=0.3)
        if not series:
            ax.text(0.5, 0.5, "no alignment logged", ha="center", va="center", transform=ax.transAxes)
            continue
        grid = _grid(series, layers, steps)
        if style == "lines":
            _draw_lines(ax, grid, steps, colors)
        elif style == "heat":
            mesh = _draw_heat(ax, grid, steps, layers, vmax)
        else:
            _draw_points(ax, grid, layers, vmax)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    _finish(fig, axes, style, layers, colors, mesh, vmax, quantity)
    what = QUANTITY_TEXT.get(quantity, f"{quantity} angle vs backprop")
    step_note = f" (step {steps[0]})" if style == "points" else ""
    fig.suptitle(f"{title}: {what}{step_note}" if title else f"{what}{step_note}", fontsize=12)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _finish(fig, axes, style: str, layers: List[str], colors, mesh, vmax: float, quantity: str) -> None:
    """Axis labels, and the figure's one legend (lines) or colour bar (heat map)."""
    label = f"{quantity} angle (deg)"
    if style == "lines":
        axes[0, 0].set_ylim(-4, vmax + 5)
        for ax in axes[:, 0]:
            ax.set_ylabel(label)
        handles = [plt.Line2D([], [], color=colors[i], marker="o", markersize=3, linewidth=1.3)
                   for i in range(len(layers))]
        if handles:
            fig.legend(handles, layers, loc="outside lower center", ncol=min(len(layers), 6), fontsize=8,
                       title="layer", title_fontsize=8)
        return
    for ax in axes[:, 0]:
        ax.set_ylabel("layer (input at the top)")
    if style == "heat" and mesh is not None:
        fig.colorbar(mesh, ax=axes, label=label, shrink=0.6)
    if style == "points":
        for ax in axes.flat:
            if ax.axison:
                ax.set_xlabel(label)
