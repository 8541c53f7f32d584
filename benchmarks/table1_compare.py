"""Print a benchmark-runner experiment's table beside the GrAPE seed paper's Table 1.

    python -m bio_ext.benchmark configs/table1_mnist_mlp.yaml --override training.hyperparameters.epochs=5
    python benchmarks/table1_compare.py runs/table1_mnist_mlp [--column mnist_mlp]
    python benchmarks/table1_compare.py runs/table1_cifar10_cnn_dfa_s0 runs/table1_cifar10_cnn_grape_s0  # merged
    python benchmarks/table1_compare.py runs/a runs/b --plot docs/img/name  # also name_accuracy.png, _alignment.png

The column of the paper's table is read from the experiment's ``config.yaml`` (``data.dataset`` and
``model.architecture``); ``--column`` names it where the config does not tell (another dataset or model) and
is refused where it contradicts the config, so a CIFAR-10 run is never printed beside MNIST's numbers.

Reads ``<experiment>/<mode>/seed_<k>/results.json`` and ``alignment.json`` (written by the runner) of one experiment
or of several, merged by mode (a column run piece by piece, one process per mode or seed, each in a folder of its own;
they must be the same column, and a mode's seed found twice is refused), and prints, per mode: final test accuracy
(mean ± sample std over the seeds found, and each seed), the per-layer angle between the mode's weight update and the
backprop gradient at the last probe (mean over seeds), and the seed paper's number for that mode (100 epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from bio_ext.benchmark.results import read_alignment  # the runner's own reader of alignment.json
from bio_ext.benchmark.yamlio import yaml_load  # how the runner's config files are read

# GrAPE seed paper, Table 1 (test accuracy %, 100 epochs, Adam 1e-4 x0.95/epoch, batch 256)
SEED_TABLE1 = {
    "mnist_mlp": {"bp": 98.73, "fa": 98.36, "drtp": 95.7, "dfa": 98.21, "pepita": 98.01, "grape": 98.35},
    "mnist_cnn": {"bp": 99.03, "dfa": 98.6, "grape": 98.7},
    "cifar10_mlp": {"bp": 54.09, "dfa": 51.32, "grape": 52.8},
    "cifar10_cnn": {"bp": 74.66, "dfa": 69.34, "grape": 72.07},
}


def config_column(root: Path) -> Optional[str]:
    """The Table 1 column of the experiment in ``root`` from its ``config.yaml`` (dataset and architecture), None
    when there is no config or it is not one of the table's four settings."""
    path = root / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml_load(path.read_text()) or {}
    column = f"{(cfg.get('data') or {}).get('dataset')}_{(cfg.get('model') or {}).get('architecture')}"
    return column if column in SEED_TABLE1 else None


def finished_runs(root: Path, mode: str):
    """``{seed: (results, alignment, run folder)}`` of the finished runs of ``mode`` in the experiment folder
    ``root`` (``seed``: the k of ``seed_<k>``)."""
    runs = {}
    for run in (root / mode).glob("seed_*"):
        res = run / "results.json"
        if res.is_file():
            data = json.loads(res.read_text())
            if data.get("status") == "finished":
                runs[int(run.name.split("_")[1])] = (data, read_alignment(run), run)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="+",
                   help="the experiment folder, <output_dir>/<experiment.name>; several are merged by mode")
    p.add_argument("--column", choices=sorted(SEED_TABLE1),
                   help="the paper's column (default: from the experiments' config.yaml)")
    p.add_argument("--plot", metavar="PREFIX",
                   help="also draw the runs' test accuracy per epoch and their per-layer update angles, as the runner "
                        "draws one experiment's, to PREFIX_accuracy.png and PREFIX_alignment.png")
    args = p.parse_args(argv)
    roots = [Path(e) for e in args.experiment]
    for root in roots:
        if not root.is_dir():
            print(f"error: {root} is not a folder (run the benchmark first)", file=sys.stderr)
            return 2
    found = {root: config_column(root) for root in roots}
    columns = sorted({c for c in found.values() if c})
    if len(columns) > 1:
        print("error: these experiments are different Table 1 settings ("
              + ", ".join(f"{root}: {c}" for root, c in found.items() if c) + "); compare one column at a time",
              file=sys.stderr)
        return 2
    column = columns[0] if columns else None
    if args.column and column and args.column != column:
        where = ", ".join(str(root / "config.yaml") for root, c in found.items() if c)
        print(f"error: --column {args.column}, but {where} is the {column} setting; drop --column", file=sys.stderr)
        return 2
    if not (args.column or column):
        print(f"error: {roots[0] / 'config.yaml'} is missing or does not say which Table 1 column this is (dataset "
              f"mnist or cifar10, architecture mlp or cnn): pass --column", file=sys.stderr)
        return 2
    seed_numbers = SEED_TABLE1[args.column or column]
    modes = {d.name for root in roots for d in root.iterdir() if d.is_dir()}
    rows = ["| mode | seeds | epochs | test accuracy % (mean ± std) | per seed | update angle per layer (deg) "
            "| seed paper, 100 epochs |", "|---|---:|---:|---:|---|---|---:|"]
    plotted = []
    for mode in sorted(modes, key=lambda m: (list(seed_numbers).index(m) if m in seed_numbers else 99, m)):
        merged, origin = {}, {}
        for root in roots:
            for seed, run in finished_runs(root, mode).items():
                if seed in merged:
                    print(f"error: {mode}/seed_{seed} is in both {origin[seed]} and {root}: pass one of them",
                          file=sys.stderr)
                    return 2
                merged[seed], origin[seed] = run, root
        runs = [merged[seed][:2] for seed in sorted(merged)]
        if not runs:
            continue
        plotted += [(mode, seed, run) for seed, run in merged.items()]
        accs = [d["final"]["test_accuracy"] for d, _ in runs]
        epochs = sorted({len(d["history"]) for d, _ in runs})
        angles = {}
        for _, al in runs:
            if al:
                for layer, qs in al[-1]["layers"].items():
                    if "update" in qs:
                        angles.setdefault(layer, []).append(qs["update"])
        spread = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
        rows.append(f"| {mode} | {len(runs)} | {'/'.join(map(str, epochs))} | {spread} | "
                    f"{', '.join(f'{a:.2f}' for a in accs)} | "
                    f"{' / '.join(f'{statistics.mean(v):.1f}' for v in angles.values()) or '-'} | "
                    f"{seed_numbers.get(mode, '-')} |")
    print("\n".join(rows))
    if args.plot:
        draw(plotted, args.plot, roots[0].name if len(roots) == 1 else f"{args.column or column}, {len(roots)} folders")
    return 0


def draw(runs, prefix: str, title: str) -> None:
    """The runner's two figures (:mod:`bio_ext.benchmark.plots`) of ``runs``, ``(mode, seed, (results, alignment,
    folder))`` each, to ``<prefix>_accuracy.png`` and ``<prefix>_alignment.png``."""
    from bio_ext.benchmark.plots import plot_accuracy, plot_alignment
    from bio_ext.benchmark.results import RunResult
    results = [RunResult(mode, seed, folder, data["status"], data["history"], data["final"], al)
               for mode, seed, (data, al, folder) in runs]
    for name, plot in (("accuracy", plot_accuracy), ("alignment", plot_alignment)):
        path = Path(f"{prefix}_{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        plot(results, path, title=title)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
