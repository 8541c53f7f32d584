"""Plot what ``oracle.py`` printed: test accuracy by epoch, and the cosine between each layer's projected error and the
true gradient (mean over the convolutions, and the last hidden Linear's input). Runs that differ only in ``--seed``
are one line (their mean; the band spans their lowest and highest), labelled with the number of seeds; of each such
group only the runs with the most epochs are drawn (the finished ones). Runs made with ``--ceiling`` add the held-out
cosine of the least-squares fit, dashed, in their colour.

    python benchmarks/issue12/plot_oracle.py OUT.png LOG [LOG ...]   # a LOG holds one or more runs ("=== " headers)
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bands import mean_band  # noqa: E402  (benchmarks/issue12/bands.py)


def pretty(label: str) -> str:
    """oracle.py's arguments as words: 'grape, dense, jacobian target', 'dfa, dense, B = oracle fit', ..."""
    if "--feedback bp" in label:
        return "backprop"
    mode = re.search(r"--mode (\w+)", label)
    words = [mode.group(1) if mode else "dfa"]
    shape = re.search(r"--conv-feedback (\w+)", label)
    words.append(shape.group(1) if shape else "dense")
    if "--feedback oracle" in label:
        frozen = re.search(r"--freeze-after (\d+)", label)
        words.append(f"B = least-squares fit{f' (frozen after {frozen.group(1)} steps)' if frozen else ''}")
    if "jacobian" in label:
        words.append("jacobian target")
    radial = re.search(r"--radial (\w+)", label)
    if radial:
        words.append(f"radial {radial.group(1)}")
    return ", ".join(words)


def runs(path):
    """{label without the seed: [(test acc by epoch, mean conv cosine by epoch, classifier.3 cosine by epoch, and the
    same two of the least-squares fit where the run printed them)]}."""
    out, cur = {}, None
    for line in open(path):
        if line.startswith("=== "):
            label = pretty(re.sub(r"\s*--seed \d+", "", line[4:].strip()))
            cur = ([], [], [], [], [])
            out.setdefault(label, []).append(cur)
        elif line.startswith("EPOCH") and cur is not None:
            cur[0].append(float(re.search(r"test_acc ([\d.]+)", line).group(1)))
        elif line.strip().startswith("cos(eB") and cur is not None:
            cos = json.loads(line[line.index("{"):])
            conv = [v for k, v in cos.items() if k.startswith("features")]
            at = 3 if line.strip().startswith("cos(eB*") else 1  # the least-squares fit's (--ceiling)
            cur[at].append(sum(conv) / len(conv) if conv else float("nan"))
            cur[at + 1].append(cos.get("classifier.3", float("nan")))
    return out


def main(out_png, *logs):
    groups = {}
    for path in logs:
        for label, rs in runs(path).items():
            groups.setdefault(label, []).extend(rs)
    for label, rs in groups.items():  # finished runs only: those with the most epochs
        longest = max(len(r[0]) for r in rs)
        groups[label] = [r for r in rs if len(r[0]) == longest]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rs) in enumerate(sorted((k, v) for k, v in groups.items() if v)):
        colour = colours[i % len(colours)]
        for k, ax in enumerate(axes):
            series = [r[k] for r in rs if r[k]]
            if not series:
                continue
            mean_band(ax, series, colour, label, alpha=0.12)
            fits = [r[k + 2] for r in rs if k and r[k + 2]]
            if fits:
                mean_band(ax, fits, colour, None, alpha=0.06, linestyle="--")
    if any(r[3] for rs in groups.values() for r in rs):  # a legend entry for the dashed lines
        axes[0].plot([], [], color="grey", linestyle="--", label="dashed: the least-squares fit (--ceiling), held out")
    axes[0].set(xlabel="epoch (100 steps)", ylabel="test accuracy % (1,000 images)",
                title="VGG-16/4, CIFAR-10 (6,400 images), Adam 1e-4")
    axes[1].set(xlabel="epoch", ylabel="cosine", title="cos(e B, true gradient), mean over the 12 convolutions")
    axes[2].set(xlabel="epoch", ylabel="cosine", title="cos(e B, true gradient), classifier.3's input")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
