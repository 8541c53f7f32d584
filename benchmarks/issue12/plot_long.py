"""Plot and tabulate ``deep.py`` runs that differ in ``--mode``, ``--options`` and ``--seed``: test accuracy and train
loss by epoch (the mean of the seeds, the band spanning their lowest and highest), and a table of the accuracy at
chosen epochs per seed with each variant's lead over DFA on the same seed. A variant is the mode with its options
(``grape {"feedback_target": "jacobian"}``), and ``kernel`` (or the ``--convert`` given) where a run's convolutions do
not have dense feedback. A log may hold several runs; a later run of the same variant and seed replaces an earlier one.

    python benchmarks/issue12/plot_long.py OUT.png LOG [LOG ...] [--at 8,12,16] [--title T] [--skip REGEX]
"""
import argparse
import ast
import re
import statistics
from typing import List, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bands import mean_band  # noqa: E402  (benchmarks/issue12/bands.py)


DENSE = '{"conv_feedback": "dense"}'


class Run(NamedTuple):
    """One deep.py run: its variant label, seed, test accuracy and train loss by epoch, and steps per epoch."""
    mode: str
    seed: int
    acc: List[float]
    loss: List[float]
    steps: int


def read(path):
    """The :class:`Run` s of a deep.py log: one per ``ARGS`` line (a log may hold several runs one after another, as
    the seventh round's does)."""
    runs = []
    for line in open(path):
        if line.startswith("ARGS "):
            args = ast.literal_eval(line[5:].strip())
            opts, shape = args.get("options", "{}"), args.get("convert", "")
            label = args["mode"] + ("" if opts in ("{}", "") else " " + opts)
            if args["mode"] != "bp" and shape != DENSE:  # the rounds since the fifth compare dense runs
                label += " kernel" if shape in ("", "{}") else " " + shape
            runs.append(Run(label, args["seed"], [], [], -(-args.get("n", 6400) // args.get("bs", 64))))
        m = re.match(r"EPOCH (\d+) train_loss ([\d.e+-]+|nan|inf) test_acc ([\d.]+)", line)
        if m and runs:
            runs[-1].loss.append(float(m.group(2)))
            runs[-1].acc.append(float(m.group(3)))
    return runs


def table(runs, at):
    """Markdown rows: per mode and seed the accuracy at each epoch of ``at``, then GrAPE - DFA per seed (accuracy,
    mean ± std; train loss)."""
    by = {(r.mode, r.seed): r.acc for r in runs}
    losses = {(r.mode, r.seed): r.loss for r in runs}
    seeds = sorted({r.seed for r in runs})
    lines = ["| mode | seed | " + " | ".join(f"epoch {e}" for e in at) + " |",
             "|---|---:|" + "---:|" * len(at)]
    for mode, seed in sorted(by):
        acc = by[(mode, seed)]
        lines.append(f"| {mode} | {seed} | " + " | ".join(f"{acc[e - 1]:.1f}" if len(acc) >= e else "-" for e in at)
                     + " |")
    for variant in sorted({mode for mode, _ in by} - {"dfa", "bp"}):
        for e in at:
            both = [s for s in seeds if len(by.get((variant, s), [])) >= e and len(by.get(("dfa", s), [])) >= e]
            gaps = [by[(variant, s)][e - 1] - by[("dfa", s)][e - 1] for s in both]
            if gaps:
                mean = statistics.mean(gaps)
                dl = [losses[(variant, s)][e - 1] - losses[("dfa", s)][e - 1] for s in both]
                lines.append(f"{variant} - dfa at epoch {e}: {', '.join(f'{g:+.1f}' for g in gaps)} (mean {mean:+.2f}"
                             f"{f' ± {statistics.stdev(gaps):.2f}' if len(gaps) > 1 else ''}, {len(gaps)} seeds); "
                             f"train loss {', '.join(f'{d:+.3f}' for d in dl)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("logs", nargs="+")
    p.add_argument("--at", default="8,12,16")
    p.add_argument("--title", default="VGG-16/4, CIFAR-10 (6,400 images), Adam 1e-4")
    p.add_argument("--skip", help="leave out the runs whose variant label matches this regular expression")
    a = p.parse_args(argv)
    latest = {}  # a later run of the same variant and seed replaces an earlier one, in the plot as in the table
    for run in (run for path in a.logs for run in read(path) if not (a.skip and re.search(a.skip, run.mode))):
        latest[run.mode, run.seed] = run
    runs = list(latest.values())
    print(table(runs, [int(e) for e in a.at.split(",")]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = {"dfa": "tab:blue", "grape": "tab:red", "bp": "black"}
    extra = iter(["tab:green", "tab:purple", "tab:orange", "tab:brown"])
    for mode in sorted({r.mode for r in runs}):
        colour = colours.get(mode) or next(extra, None)
        for k, ax in enumerate(axes):
            series = [(r.acc, r.loss)[k] for r in runs if r.mode == mode and (r.acc, r.loss)[k]]
            if not series:
                continue
            label = "backprop" if mode == "bp" else mode if "kernel" in mode else f"{mode}, dense"
            mean_band(ax, series, colour, label)
    steps = {r.steps for r in runs}
    xlabel = f"epoch ({steps.pop()} steps)" if len(steps) == 1 else "epoch (runs of different lengths)"
    axes[0].set(xlabel=xlabel, ylabel="test accuracy % (1,000 images)", title=a.title)
    axes[1].set(xlabel=xlabel, ylabel="train loss (epoch mean)", title="train loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)  # below the axes: long labels hide no curve
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
