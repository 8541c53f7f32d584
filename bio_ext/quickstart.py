"""Quick start: train a small MLP on scikit-learn's bundled digits with every mode.

    python -m bio_ext.quickstart [--modes bp,fa,dfa] [--epochs 40] [--seed 0]

Needs no data files: ``sklearn.datasets.load_digits`` (1,797 real 8x8 digits)
ships with scikit-learn. Prints test accuracy per mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.nn as nn

from .convert import convert
from .errors import BioExtError
from .registry import check_mode

log = logging.getLogger("bio_ext.quickstart")

#: options a mode needs on the digits MLP (two hidden layers: block-wise training cuts it in two blocks)
MODE_OPTIONS = {"bwbpf": {"blocks": 2}}


def load_digits_split():
    """The benchmark runner's ``digits`` set (fixed stratified 80/20 split), flattened: ((x, y), (x, y))."""
    from .benchmark.data import load_dataset
    bundle = load_dataset("digits", val_fraction=0.0, flatten=True)
    return (bundle.train.x, bundle.train.y), (bundle.test.x, bundle.test.y)


def digits_mlp(hidden: int = 256) -> nn.Module:
    """The runner's ``mlp``: 64-hidden-hidden-10, tanh."""
    from .benchmark.models import build_model
    return build_model("mlp", num_classes=10, input_shape=(64,), hidden=[hidden, hidden], activation="tanh")


def train_one(mode: str, train, test, *, epochs: int, seed: int, batch: int = 64, lr: float = 1e-3,
              progress=None) -> float:
    torch.manual_seed(seed)
    model = convert(digits_mlp(), mode, seed=seed, **MODE_OPTIONS.get(mode, {}))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x, y = train
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(mode=mode, loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    with torch.no_grad():
        return (model(test[0]).argmax(1) == test[1]).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="bp,fa,dfa,drtp,grape,usf,brsf,frsf",
                   help="comma-separated modes (any of bio_ext.available_modes(), bwbpf included)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        check_mode(m)  # fail fast, with the list of valid modes
    from .benchmark.progress import cli_progress
    train, test = load_digits_split()
    results = {}
    with cli_progress(sys.stderr)(total=args.epochs * len(modes), desc="digits", unit="epoch") as bar:
        for mode in modes:
            t0 = time.perf_counter()
            acc = train_one(mode, train, test, epochs=args.epochs, seed=args.seed, progress=bar)
            results[mode] = (acc, time.perf_counter() - t0)
    print(f"\nscikit-learn digits, MLP 64-256-256-10 (tanh), Adam 1e-3, {args.epochs} epochs, seed {args.seed}")
    print(f"{len(train[0])} train / {len(test[0])} test images\n")
    print("| mode | test accuracy | seconds |\n|---|---:|---:|")
    for mode, (acc, secs) in results.items():
        print(f"| {mode} | {100 * acc:.2f}% | {secs:.1f} |")
    return 0


def cli(argv=None) -> int:
    """The command line: :func:`main`, with a bio_ext error reported as one line (exit status 2)."""
    try:
        return main(argv)
    except BioExtError as e:
        print(f"bio_ext.quickstart: {str(e).splitlines()[-1].strip(' -')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
