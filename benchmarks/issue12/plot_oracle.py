"""Plot what ``oracle.py`` printed: test accuracy by epoch, and the cosine between each layer's projected error and the
true gradient (mean over the convolutions, and the last hidden Linear), one line per run.

    python benchmarks/issue12/plot_oracle.py OUT.png LOG [LOG ...]   # a LOG holds one or more runs ("=== " headers)
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def runs(path):
    """[(label, [test acc by epoch], [mean conv cosine by epoch], [classifier.3 cosine by epoch])] of one log."""
    out, cur = [], None
    for line in open(path):
        if line.startswith("=== "):
            cur = (line[4:].strip() or "run", [], [], [])
            out.append(cur)
        elif line.startswith("EPOCH") and cur is not None:
            cur[1].append(float(re.search(r"test_acc ([\d.]+)", line).group(1)))
        elif line.strip().startswith("cos(eB") and cur is not None:
            cos = json.loads(line.split("layer", 1)[1])
            conv = [v for k, v in cos.items() if k.startswith("features")]
            cur[2].append(sum(conv) / len(conv) if conv else float("nan"))
            cur[3].append(cos.get("classifier.3", float("nan")))
    return out


def main(out_png, *logs):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every = [run for path in logs for run in runs(path)]
    for i, (label, acc, conv, lin) in enumerate(every):  # one colour per run in every panel
        style = dict(marker="o", color=colours[i % len(colours)], linestyle="-" if i < len(colours) else "--")
        axes[0].plot(range(1, len(acc) + 1), acc, label=label, **style)
        axes[1].plot(range(1, len(conv) + 1), conv, **style)
        axes[2].plot(range(1, len(lin) + 1), lin, **style)
    axes[0].set(xlabel="epoch (100 steps)", ylabel="test accuracy % (1,000 images)", title="VGG-16/4, CIFAR-10 subset")
    axes[1].set(xlabel="epoch", ylabel="cosine", title="cos(e B, true gradient), mean over the 12 convolutions")
    axes[2].set(xlabel="epoch", ylabel="cosine", title="cos(e B, true gradient), classifier.3's input")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
