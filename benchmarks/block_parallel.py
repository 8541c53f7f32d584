"""Throughput of block-parallel training against backprop and pipelined backprop (issue 14, part 2).

For each model, in one run of this script:

* ``backprop``: one process, ``--threads`` torch threads (default 2), plain training steps;
* ``blockwise K=2``: the same process and threads, ``bio_ext.blockwise`` (isolated blocks), one step per
  micro-batch (``--micro-batches``) as the block-parallel run takes;
* ``block-parallel``: 2 processes x 1 thread (gloo), ``bio_ext.blockwise.parallel``, block k on rank k;
* ``pipelined backprop``: 2 processes x 1 thread, ``torch.distributed.pipelining`` (``--schedule`` GPipe or
  1F1B) on the same model cut at the same place, ``--pipe-micro-batches``, one optimizer step per batch.

Images per second over ``--steps`` batches after ``--warmup``; ratios to backprop. Rank 0 reports.

    python benchmarks/block_parallel.py --models cnn,resnet18 --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bio_ext  # noqa: E402
from _common import INPUTS, MODELS, hardware  # noqa: E402


def _batch(name: str, step: int):
    shape, batch = INPUTS[name]
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def _example(name: str) -> torch.Tensor:
    return _batch(name, 0)[0][:2]


def _images_per_s(run, name: str, steps: int, warmup: int, barrier=None) -> float:
    batch = INPUTS[name][1]
    for s in range(warmup):
        run(s)
    if barrier:
        barrier()
    t0 = time.perf_counter()
    for s in range(steps):
        run(warmup + s)
    if barrier:
        barrier()
    return steps * batch / (time.perf_counter() - t0)


def single_process(name: str, args) -> Dict[str, float]:
    torch.set_num_threads(args.threads)
    out = {}
    model = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def bp(s):
        x, y = _batch(name, s)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out["backprop"] = _images_per_s(bp, name, args.steps, args.warmup)
    splits = dict(kv.split("=") for kv in args.splits.split(",") if kv).get(name)
    wrapped = bio_ext.blockwise(_model(name), 2, example_input=_example(name), **({"splits": [splits]} if splits else {}))
    opt2 = torch.optim.SGD(wrapped.parameters(), lr=0.01)

    def bw(s):
        x, y = _batch(name, s)
        for xm, ym in zip(x.chunk(args.micro_batches), y.chunk(args.micro_batches)):
            opt2.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(xm), ym).backward()
            opt2.step()
    out["blockwise K=2 (1 process)"] = _images_per_s(bw, name, args.steps, args.warmup)
    return out


def _halves(model: nn.Module, entry: str) -> List[nn.Module]:
    """``model`` cut before module ``entry`` into two sequential halves (nn.Sequential or torchvision ResNet)."""
    if isinstance(model, nn.Sequential):
        names = list(model._modules)
        cut = names.index(entry)
        return [nn.Sequential(*[model._modules[n] for n in names[:cut]]),
                nn.Sequential(*[model._modules[n] for n in names[cut:]])]
    import torchvision
    if isinstance(model, torchvision.models.ResNet):
        seq = [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)]
        names = ["conv1"]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, stage)):
                seq.append(block)
                names.append(f"{stage}.{i}")
        seq.append(nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))
        names.append("fc")
        cut = names.index(entry)
        return [nn.Sequential(*seq[:cut]), nn.Sequential(*seq[cut:])]
    raise ValueError(f"no pipeline cut for {type(model).__name__}")


def _worker(rank: int, world: int, store: str, name: str, args, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        splits = dict(kv.split("=") for kv in args.splits.split(",") if kv).get(name)
        options = {"splits": [splits]} if splits else {}
        stage = bio_ext.blockwise.parallel(_model(name), _example(name), micro_batches=args.micro_batches,
                                           **options)
        opt = torch.optim.SGD(stage.parameters(), lr=0.01)

        def bpar(s):
            x, y = _batch(name, s) if rank == 0 else (None, None)
            stage.train_step(x, y, opt)
        def barrier():
            stage.flush()
            dist.barrier()
        results["block-parallel (2 processes)"] = _images_per_s(bpar, name, args.steps, args.warmup, barrier)
        entry = splits or bio_ext.blockwise.partition_of(
            bio_ext.blockwise(_model(name), 2, example_input=_example(name))).block_entry(1)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        half = _halves(_model(name), entry)[rank]
        pstage = PipelineStage(half, rank, world, torch.device("cpu"))
        schedule_cls = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
        schedule = schedule_cls(pstage, args.pipe_micro_batches, loss_fn=F.cross_entropy)
        popt = torch.optim.SGD(half.parameters(), lr=0.01)

        def pipe(s):
            x, y = _batch(name, s)
            popt.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=y, losses=[])
            popt.step()
        results[f"pipelined backprop ({args.schedule}, 2 processes)"] = _images_per_s(pipe, name, args.steps,
                                                                                      args.warmup, dist.barrier)
        results["cut before"] = entry
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=1,
                   help="of block-parallel training and single-process blockwise (a step each); 1: the blocks still "
                        "overlap, across batches, since no gradient comes back")
    p.add_argument("--pipe-micro-batches", type=int, default=4, help="of pipelined backprop (one step per batch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single-process runs")
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe")
    p.add_argument("--splits", default="", help="model=unit pairs: where to cut instead of the flops-balanced "
                                                "default (e.g. resnet18=layer4.0), for both 2-process runs")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"# block-parallel throughput, {datetime.date.today()}, {hardware()}")
    print(f"# steps {args.steps} (after {args.warmup} warm-up); micro-batches per batch: {args.micro_batches} "
          f"(block-parallel, blockwise), {args.pipe_micro_batches} (pipelined backprop)")
    everything = {}
    for name in args.models.split(","):
        res = single_process(name, args)
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "out.json")
            mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), name, args, out_file), nprocs=2,
                               start_method="spawn")
            res.update(json.loads(Path(out_file).read_text()))
        cut = res.pop("cut before")
        shape, batch = INPUTS[name]
        print(f"\n### {name}, batch {batch}, input {shape}, cut before {cut}\n")
        print("| variant | images/s | ratio to backprop |\n|---|---:|---:|")
        for variant, ips in res.items():
            print(f"| {variant} | {ips:.1f} | {ips / res['backprop']:.2f} |")
        everything[name] = dict(res, cut=cut)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
