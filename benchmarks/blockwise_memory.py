"""Peak memory of one training step: backprop against bio_ext.blockwise with K blocks.

Model: torchvision resnet18 (10 classes), batch ``--batch`` (128) of ``--size`` x ``--size``
(32 x 32) random images, cross-entropy, ``zero_grad(set_to_none=True)`` before the step so the
gradients are allocated inside it. Configurations: ``bp`` (plain model), and for each K:
``isolated`` (blockwise, one ``loss.backward()``), ``early`` (``early_backward=True``: each block's
local backward runs inside the forward, via ``bio_ext.blockwise.train_step``), and
``early/act`` (the same with ``cost="activations"``: blocks balanced by activation size
instead of FLOPs).

How memory is measured
----------------------
* What is counted: the memory allocated during the step on top of what existed before it
  (parameters, the batch, the model). Main column: after ``zero_grad(set_to_none=True)``
  (torch's default), so the gradients are allocated inside the step and counted. Second
  column: after ``zero_grad(set_to_none=False)``: the gradient buffers exist before the step
  and each new gradient is a temporary accumulated into them.
* On a GPU: ``torch.cuda.max_memory_allocated()`` during the step minus the allocation
  before it (the caching allocator's statistics).
* On a CPU there are no allocator statistics, so a ``TorchDispatchMode`` sees every tensor
  every ATen op returns (forward and backward) and, when its storage is new (not the storage of
  one of the op's inputs, as in-place ops, ``out=`` and views return), tracks it until it is
  freed (``weakref.finalize`` on the storage): the peak of the live bytes of the
  tensors created during the step, i.e. activations saved for backward, gradients and
  temporaries at op granularity (a kernel's internal scratch buffers are not seen). This is
  the CPU analogue of ``max_memory_allocated`` minus the baseline.
* ``--rss`` adds a cross-check (Linux): each configuration runs once in a fresh subprocess, the
  peak resident set size is reset just before the step (``/proc/self/clear_refs``), and the
  peak (``VmHWM``) minus the RSS before the step is reported. This first step also pays
  one-time library buffers and allocator slack, so it is noisier.

Ratios are to backprop's peak. Target of issue 6: at most 0.5x backprop at K=4 with the
memory option on.

    python benchmarks/blockwise_memory.py --blocks 2,4,8 --rss
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bio_ext  # noqa: E402
from _common import hardware  # noqa: E402


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created by ATen ops while the mode is active and not yet freed."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _free(self, key, n):
        if self.live.pop(key, None) is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                # an output sharing an input's storage (in-place, out=, views) is not a new allocation
                if n and key not in self.live and key not in seen:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key, n)
        return out


CONFIGS = {
    "bp": {},
    "isolated": {},
    "early": {"early_backward": True},
    "early/act": {"early_backward": True, "cost": "activations"},
}


def build(name: str, k: int):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if name == "bp":
        return model
    return bio_ext.blockwise(model, k, example_input=torch.randn(2, 3, 32, 32), **CONFIGS[name])


def step(model, name, x, y, loss_fn, set_to_none=True):
    model.zero_grad(set_to_none=set_to_none)
    if name.startswith("early"):
        bio_ext.blockwise.train_step(model, x, y, loss_fn)
    else:
        loss_fn(model(x), y).backward()


def measure(name: str, k: int, batch: int, size: int, device: torch.device, warm: bool = True) -> dict:
    model = build(name, k).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    if warm:
        step(model, name, x, y, loss_fn)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = {}
    for label, set_to_none in (("peak_bytes", True), ("peak_kept_grads_bytes", False)):
        if device.type == "cuda":
            model.zero_grad(set_to_none=set_to_none)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(model, name, x, y, loss_fn, set_to_none)
            torch.cuda.synchronize()
            peaks[label] = torch.cuda.max_memory_allocated() - base
        else:
            model.zero_grad(set_to_none=set_to_none)
            with LiveTensorBytes() as mode:
                step(model, name, x, y, loss_fn, set_to_none)
            peaks[label] = mode.peak
    blocks = None if name == "bp" else [len(b) for b in bio_ext.blockwise.partition_of(model).blocks]
    return {"config": name, "k": k, **peaks, "param_bytes": params, "units_per_block": blocks}


def rss_child(name: str, k: int, batch: int, size: int) -> dict:
    model = build(name, k)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))  # kB

    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    step(model, name, x, y, loss_fn)
    return {"config": name, "k": k, "rss_delta_bytes": (status("VmHWM") - base) * 1024}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--blocks", default="2,4,8")
    p.add_argument("--configs", default="isolated,early,early/act")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rss", action="store_true", help="also peak RSS per configuration in fresh subprocesses (CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        name, k = args.child.rsplit(":", 1)
        print(json.dumps(rss_child(name, int(k), args.batch, args.size)))
        return
    device = torch.device(args.device)
    runs = [("bp", 0)] + [(c, int(k)) for k in args.blocks.split(",") for c in args.configs.split(",")]
    print(f"resnet18, batch {args.batch}, {args.size}x{args.size}, {hardware()}, device {device}")
    print("peak: tensor memory allocated during one training step on top of the parameters, after "
          "zero_grad(set_to_none=True) (torch's default: the gradients are allocated inside the step); "
          "gradient buffers kept: the same after zero_grad(set_to_none=False) (new gradients are "
          "temporaries accumulated into the kept buffers)"
          + (" (CUDA max_memory_allocated)" if device.type == "cuda" else " (live ATen storages, CPU)"))
    results = [measure(n, k, args.batch, args.size, device) for n, k in runs]
    print(f"parameter bytes (backprop model): {results[0]['param_bytes'] / 2 ** 20:.1f} MiB")
    if args.rss:
        for r in results:
            cmd = [sys.executable, __file__, "--child", f"{r['config']}:{r['k']}", "--batch", str(args.batch),
                   "--size", str(args.size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
            r.update({k: v for k, v in json.loads(out.strip().splitlines()[-1]).items() if k == "rss_delta_bytes"})
    bp, bp_rss = results[0]["peak_bytes"], results[0].get("rss_delta_bytes")
    mb = 2 ** 20
    bpg = results[0]["peak_kept_grads_bytes"]
    head = ("| config | K | units per block | peak MiB | x backprop | peak, gradient buffers kept MiB "
            "| x backprop |")
    sep = "|---|---:|---|---:|---:|---:|---:|"
    if args.rss:
        head += " RSS delta MiB | RSS x backprop |"
        sep += "---:|---:|"
    print(head + "\n" + sep)
    for r in results:
        line = (f"| {r['config']} | {r['k'] or '-'} | {r['units_per_block'] or '-'} | {r['peak_bytes'] / mb:.1f} | "
                f"{r['peak_bytes'] / bp:.3f} | {r['peak_kept_grads_bytes'] / mb:.1f} | "
                f"{r['peak_kept_grads_bytes'] / bpg:.3f} |")
        if args.rss:
            line += f" {r['rss_delta_bytes'] / mb:.1f} | {r['rss_delta_bytes'] / bp_rss:.3f} |"
        print(line)


if __name__ == "__main__":
    main()
