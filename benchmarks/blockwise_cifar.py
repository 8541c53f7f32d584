"""CIFAR-10 accuracy: backprop against block-wise local losses (bio_ext.blockwise), isolated and not.

Model: a CIFAR ResNet in the style of He et al. (2016), built as an nn.Sequential so that
bio_ext partitions it automatically: a 3x3 conv stem (16 channels, BN, ReLU), then ``3 * n``
torchvision BasicBlocks (16, 32, 64 channels, stride 2 at each new stage), global average pooling
and a Linear output layer. ``--depth 8`` (n=1, 4 units), ``14`` (n=2), ``20`` (n=3, ResNet-20).

Data: the standard CIFAR-10 python pickles (``data_batch_1..5``, ``test_batch``), read directly
with pickle from ``--cifar-dir`` (default ``../shared/data/cifar-10-batches-py`` relative to the
repository root; build them with ``python ../shared/data/cifar10-jpeg/build_cifar10.py OUT``).
``--train-subset N`` uses the first N training images. Training: SGD momentum 0.9, weight decay
5e-4, cosine learning rate from ``--lr``, batch 128, random crop (pad 4) and horizontal flip.

Each configuration is a ``--runs`` entry: ``bp`` or ``k<K>`` / ``k<K>-noiso`` (bio_ext.blockwise
with K blocks, ``isolate=True`` / ``False``). Prints one line per epoch and a final table;
``--out FILE`` also writes the results as JSON lines.

    nice -n 10 python benchmarks/blockwise_cifar.py --cifar-dir /path/cifar-10-batches-py \\
        --depth 14 --epochs 5 --runs bp,k2,k4,k4-noiso --out runs/cifar.jsonl
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bio_ext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class CifarDataMissingError(bio_ext.errors.BioExtError, FileNotFoundError):
    """The CIFAR-10 python pickles are not where --cifar-dir points."""


def load_cifar(root: Path):
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise CifarDataMissingError(
            f"CIFAR-10 pickles missing in {root}: {missing}. Expected the standard layout "
            "cifar-10-batches-py/{data_batch_1..5,test_batch}; build it with "
            "`python ../shared/data/cifar10-jpeg/build_cifar10.py OUT_DIR` and pass --cifar-dir OUT_DIR/cifar-10-batches-py")

    def read(name):
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return x, torch.tensor(d["labels"], dtype=torch.long)

    parts = [read(f) for f in FILES[:5]]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    xte, yte = read("test_batch")
    return xtr, ytr, xte, yte


def cifar_resnet(depth: int = 14, classes: int = 10) -> nn.Sequential:
    from torchvision.models.resnet import BasicBlock
    if (depth - 2) % 6:
        raise ValueError(f"--depth must be 6n+2 (8, 14, 20, ...), got {depth}")
    n = (depth - 2) // 6
    layers = [nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))]
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            down = None
            if stride != 1 or cin != width:
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(cin, width, stride, down))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=gen)
    j = torch.randint(0, 9, (n,), generator=gen)
    out = torch.stack([padded[k, :, i[k]:i[k] + 32, j[k]:j[k] + 32] for k in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255 - MEAN) / STD


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            correct += (model(normalise(x[s:s + batch])).argmax(1) == y[s:s + batch]).sum().item()
    model.train()
    return 100.0 * correct / len(x)


def build(run: str, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cifar_resnet(depth)
    if run == "bp":
        return model
    k, _, rest = run[1:].partition("-")
    return bio_ext.blockwise(model, int(k), isolate=(rest != "noiso"), seed=seed,
                             example_input=torch.randn(2, 3, 32, 32))


def train(run, data, args):
    xtr, ytr, xte, yte = data
    model = build(run, args.depth, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(xtr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        total, seen = 0.0, 0
        for s in range(0, len(xtr), args.batch):
            idx = perm[s:s + args.batch]
            x = normalise(augment(xtr[idx], gen))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), ytr[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        acc = evaluate(model, xte, yte)
        local = [round(v, 3) for v in bio_ext.local_losses(model)] if run != "bp" else []
        history.append(acc)
        print(f"{run:10s} epoch {epoch + 1}/{args.epochs} train loss {total / seen:.3f} test acc {acc:.2f}% "
              f"local losses {local} ({time.time() - t0:.0f} s)", flush=True)
    return {"run": run, "depth": args.depth, "epochs": args.epochs, "train_subset": len(xtr), "seed": args.seed,
            "lr": args.lr, "test_acc": history[-1], "history": history, "seconds": round(time.time() - t0, 1),
            "partition": None if run == "bp" else bio_ext.blockwise.partition_of(model).describe()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-dir", default=str(REPO / ".." / "shared" / "data" / "cifar-10-batches-py"))
    p.add_argument("--depth", type=int, default=14)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 50,000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="bp,k2,k4,k4-noiso")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar(Path(args.cifar_dir))
    if args.train_subset:
        data = (data[0][:args.train_subset], data[1][:args.train_subset], data[2], data[3])
    print(f"CIFAR-10: {len(data[0])} train / {len(data[2])} test images; ResNet-{args.depth}; {args.epochs} epochs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    results = []
    for run in args.runs.split(","):
        r = train(run.strip(), data, args)
        results.append(r)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print("\n| run | test acc % | error % | seconds |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['run']} | {r['test_acc']:.2f} | {100 - r['test_acc']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
