"""Print a benchmark-runner experiment's table beside the GrAPE seed paper's Table 1.

    python -m bio_ext.benchmark configs/table1_mnist_mlp.yaml --override training.hyperparameters.epochs=5
    python benchmarks/table1_compare.py runs/table1_mnist_mlp [--column mnist_mlp]

The column of the paper's table is read from the experiment's ``config.yaml`` (``data.dataset`` and
``model.architecture``); ``--column`` names it where the config does not tell (another dataset or model) and
is refused where it contradicts the config, so a CIFAR-10 run is never printed beside MNIST's numbers.

Reads ``<experiment>/<mode>/seed_<k>/results.json`` and ``alignment.json`` (written by the runner)
and prints, per mode: final test accuracy (mean ± sample std over the seeds found, and each seed),
the per-layer angle between the mode's weight update and the backprop gradient at the last probe
(mean over seeds), and the seed paper's number for that mode (100 epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="the experiment folder, <output_dir>/<experiment.name>")
    p.add_argument("--column", choices=sorted(SEED_TABLE1),
                   help="the paper's column (default: from the experiment's config.yaml)")
    args = p.parse_args(argv)
    root = Path(args.experiment)
    if not root.is_dir():
        print(f"error: {root} is not a folder (run the benchmark first)", file=sys.stderr)
        return 2
    found = config_column(root)
    if args.column and found and args.column != found:
        print(f"error: --column {args.column}, but {root / 'config.yaml'} is the {found} setting; drop --column",
              file=sys.stderr)
        return 2
    if not (args.column or found):
        print(f"error: {root / 'config.yaml'} is missing or does not say which Table 1 column this is (dataset mnist "
              f"or cifar10, architecture mlp or cnn): pass --column", file=sys.stderr)
        return 2
    seed_numbers = SEED_TABLE1[args.column or found]
    print("| mode | seeds | epochs | test accuracy % (mean ± std) | per seed | update angle per layer (deg) "
          "| seed paper, 100 epochs |")
    print("|---|---:|---:|---:|---|---|---:|")
    for mode_dir in sorted((d for d in root.iterdir() if d.is_dir()),
                           key=lambda d: list(seed_numbers).index(d.name) if d.name in seed_numbers else 99):
        runs = []
        for run in sorted(mode_dir.glob("seed_*")):
            res = run / "results.json"
            if res.is_file():
                data = json.loads(res.read_text())
                if data.get("status") == "finished":
                    al = json.loads((run / "alignment.json").read_text()) if (run / "alignment.json").is_file() else []
                    runs.append((data, al))
        if not runs:
            continue
        accs = [d["final"]["test_accuracy"] for d, _ in runs]
        epochs = sorted({len(d["history"]) for d, _ in runs})
        angles = {}
        for _, al in runs:
            if al:
                for layer, qs in al[-1]["layers"].items():
                    if "update" in qs:
                        angles.setdefault(layer, []).append(qs["update"])
        spread = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
        print(f"| {mode_dir.name} | {len(runs)} | {'/'.join(map(str, epochs))} | {spread} | "
              f"{', '.join(f'{a:.2f}' for a in accs)} | "
              f"{' / '.join(f'{statistics.mean(v):.1f}' for v in angles.values()) or '-'} | "
              f"{seed_numbers.get(mode_dir.name, '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
