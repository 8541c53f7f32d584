"""The GrAPE seed's Table 1 MNIST MLP setting: BP vs DFA vs GrAPE, with alignment angles.

    python benchmarks/grape_mnist.py --data ../shared/data/mnist --epochs 20 --seeds 0,1,2
    python benchmarks/grape_mnist.py --model cnn --epochs 20 --seeds 0,1,2

Setting (seed paper, section 4.1): MLP 784-1024-1024-10 (tanh) or a shallow CNN, Adam lr 1e-4 with
decay 0.95 per epoch, batch 256, cross-entropy, no augmentation. The feedback
learning rate is bio_ext's scale-free ``feedback_lr`` (see bio_ext.modes.grape), not the
paper's unscaled 1e-3. Results are appended to ``--out`` (JSON lines) after each
run, so a crash loses no finished run. At the end of each run the mean angle
(degrees) between each hidden layer's injected signal and the true gradient is
measured on a held-out batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bio_ext  # noqa: E402
from bio_ext.benchmark.models import build_model  # noqa: E402

def load_mnist(root: Path):
    """MNIST as flat (x, y) tensors through the runner's loader (the standard idx files in ``root``)."""
    from bio_ext.benchmark.data import load_dataset
    from bio_ext.errors import DataNotFoundError
    try:
        b = load_dataset("mnist", str(root), val_fraction=0.0, flatten=True)
    except DataNotFoundError as e:
        raise SystemExit(f"{e} (pass --data DIR)") from None
    return (b.train.x, b.train.y), (b.test.x, b.test.y)


def mlp():
    return build_model("mlp", num_classes=10, input_shape=(784,), hidden=[1024, 1024], activation="tanh")


def cnn():
    """The seed's shallow CNN 'following LeNet-4' (see bio_ext.benchmark.models.cnn); input (784,) is unflattened."""
    return build_model("cnn", num_classes=10, input_shape=(784,), activation="tanh")


MODELS = {"mlp": (mlp, "MLP 784-1024-1024-10 tanh"),
          "cnn": (cnn, "CNN conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc10 tanh")}


def alignment_degrees(model, x, y):
    """Degrees between each hidden layer's injected input gradient and backprop's."""
    return [a.signal for a in bio_ext.alignment(model, x, y).values() if a.signal is not None]


def run(mode, seed, train, test, epochs, batch, progress, arch="mlp", options=None):
    torch.manual_seed(seed)
    plain = MODELS[arch][0]()
    options = options if mode == "grape" else {}
    model = plain if mode == "bp" else bio_ext.convert(plain, mode, seed=seed, options=options or {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.95)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
        progress(mode, seed, epoch)
    with torch.no_grad():
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    angles = alignment_degrees(model, test[0][:1024], test[1][:1024])
    return acc, angles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/mnist"))
    p.add_argument("--model", choices=sorted(MODELS), default="mlp")
    p.add_argument("--feedback-lr", type=float, help="GrAPE feedback_lr (default: bio_ext's)")
    p.add_argument("--momentum", type=float, help="GrAPE momentum (default: bio_ext's)")
    p.add_argument("--modes", default="bp,dfa,grape")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default="grape_mnist.jsonl")
    args = p.parse_args(argv)
    train, test = load_mnist(Path(args.data))
    options = {k: v for k, v in (("feedback_lr", args.feedback_lr), ("momentum", args.momentum)) if v is not None}
    from bio_ext.benchmark.progress import cli_progress  # a bar in a terminal, a line every 30 s in a log
    modes, seeds = args.modes.split(","), [int(s) for s in args.seeds.split(",")]
    bar = cli_progress(sys.stderr)(total=len(modes) * len(seeds) * args.epochs, desc="grape_mnist", unit="epoch")
    rows = []
    for seed in seeds:
        for mode in modes:
            t0 = time.perf_counter()
            acc, angles = run(mode, seed, train, test, args.epochs, args.batch,
                              lambda m, s, e: (bar.update(1), bar.set_postfix(mode=m, seed=s)), args.model, options)
            row = {"model": args.model, "mode": mode, "options": options if mode == "grape" else {}, "seed": seed,
                   "epochs": args.epochs, "test_acc": acc,
                   "angles_deg": angles, "seconds": time.perf_counter() - t0}
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    bar.close()
    print(f"\nMNIST {MODELS[args.model][1]}, Adam 1e-4 x0.95/epoch, batch {args.batch}, "
          f"{args.epochs} epochs, seeds {seeds}\n")
    print("| mode | test acc % (mean ± std) | hidden-layer angle to true grad (deg) |\n|---|---:|---|")
    for mode in modes:
        accs = torch.tensor([r["test_acc"] for r in rows if r["mode"] == mode]) * 100
        ang = torch.tensor([r["angles_deg"] for r in rows if r["mode"] == mode]).mean(0).tolist()
        std = accs.std().item() if len(accs) > 1 else 0.0
        print(f"| {mode} | {accs.mean():.2f} ± {std:.2f} | {', '.join(f'{a:.1f}' for a in ang)} |")


if __name__ == "__main__":
    main()
