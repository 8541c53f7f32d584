"""The benchmark's figures (issue 13 item 7): one logged step is drawn as points, many layers as a heat map,
few as lines with the legend inside the figure; every figure is wide enough and keeps its title inside."""

import random
from types import SimpleNamespace

import pytest
from PIL import Image

from bio_ext.benchmark import plots

MODES = ("bp", "fa", "dfa", "drtp", "grape", "bwbpf")


def result(mode, layers, steps, seed=0):
    rnd = random.Random(f"{mode}-{seed}")
    rows = [{"step": s, "epoch": 1, "layers": {n: {"update": 90 * rnd.random()} for n in layers}} for s in steps]
    history = [{"epoch": e, "test_accuracy": 50 + 10 * rnd.random()} for e in range(1, max(2, len(steps) // 10))]
    return SimpleNamespace(mode=mode, seed=seed, alignment=rows, history=history)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


def inside(fig, artist):
    renderer = fig.canvas.get_renderer()
    box, page = artist.get_window_extent(renderer), fig.bbox
    return box.x0 >= page.x0 - 1 and box.y0 >= page.y0 - 1 and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1


def check_png(path, min_width=800):
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] >= min_width and 300 <= image.size[1] <= 4000, image.size
    return image.size


def test_one_probe_step_is_drawn_as_points(tmp_path, figures):
    path = plots.plot_alignment([result(m, ["1", "3", "5"], [0]) for m in MODES], tmp_path / "a.png", title="t")
    check_png(path)
    fig = figures[-1]
    drawn = [ax for ax in fig.axes if ax.lines and len(ax.lines[0].get_xdata()) == 3]
    assert len(drawn) == len(MODES) and all(ax.lines[0].get_marker() == "o" for ax in drawn)
    assert inside(fig, fig._suptitle)


def test_sixty_layers_make_a_heat_map_with_a_colour_bar(tmp_path, figures):
    layers = [f"encoder.layer.{i // 6}.proj{i % 6}" for i in range(60)]
    path = plots.plot_alignment([result(m, layers, range(0, 400, 20)) for m in MODES[:4]], tmp_path / "h.png",
                                title="t")
    check_png(path)
    fig = figures[-1]
    heat = [ax for ax in fig.axes if ax.collections and ax.get_title() in MODES]
    assert len(heat) == 4 and heat[0].collections[0].get_array().shape == (60, 20)
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert inside(fig, fig._suptitle) and all(inside(fig, ax) for ax in fig.axes)


def test_few_layers_are_lines_with_one_legend_inside_the_figure(tmp_path, figures):
    path = plots.plot_alignment([result(m, ["1", "3", "5"], range(0, 100, 5), s) for m in MODES for s in (0, 1)],
                                tmp_path / "l.png", title="quickstart_digits")
    check_png(path)
    fig = figures[-1]
    assert all(len(ax.lines) == 4 for ax in fig.axes)  # three layers and the 90-degree line
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["1", "3", "5"] and inside(fig, legend)
    assert inside(fig, fig._suptitle)


def test_accuracy_of_one_epoch_is_a_marker(tmp_path, figures):
    runs = [SimpleNamespace(mode=m, history=[{"epoch": 1, "test_accuracy": 80.0 + k}], alignment=[])
            for k, m in enumerate(MODES)]
    check_png(plots.plot_accuracy(runs, tmp_path / "acc.png", title="t"))
    ax = figures[-1].axes[0]
    assert len(ax.lines) == len(MODES) and all(line.get_marker() == "o" for line in ax.lines)
    assert list(ax.get_xticks()) == [1]
