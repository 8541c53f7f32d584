"""Where a GrAPE training step's time goes, against what the method must compute (issue 16).

    python benchmarks/grape_budget.py                   # the seed's MLP of step_time.py, batch 256
    python benchmarks/grape_budget.py --model cnn --rounds 10

Prints, from one process (the other variants interleaved with backprop, medians):

1. one training step of backprop, the floor (forward and weight gradients, no input-gradient products), DFA and
   GrAPE, as ratios to backprop (as ``step_time.py``);
2. the forward alone (GrAPE's carries the tangents), and the ops of GrAPE's forward by self time
   (``torch.profiler``): the primal products, the tangent products beside them, the perturbation draws;
3. GrAPE's feedback step in the backward (every layer's cosine statistics and update: ``before_projection``);
4. the fixed cost of a step for each mode on a tiny MLP (8-16-16-16-10, batch 4), where the arithmetic is negligible
   and what is left is Python and the dispatcher: what GrAPE's per-layer bookkeeping costs whatever the model's size.

GrAPE must do, beyond DFA: the tangent product of every layer after the first perturbed one (as many FLOPs as the
primal product), a draw per perturbed layer, and the cosine statistics of every layer. ``floor + tangent products +
draws + statistics`` is the least a GrAPE step can cost with the layers' kernels as they are.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bio_ext  # noqa: E402
from _common import INPUTS, MODELS, clone, hardware, interleaved_medians  # noqa: E402
from bio_ext.modes.grape import GradientAlignedProjectedError  # noqa: E402
from step_time import build_steps, floor_model, make_step  # noqa: E402


def forward_budget(model: nn.Module, x: torch.Tensor, y: torch.Tensor, top: int) -> None:
    """The top ops of ``model``'s forward by self CPU time, per forward (10 forwards, each followed by its backward
    outside the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    total, calls = collections.Counter(), collections.Counter()
    for _ in range(10):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = model(x)
        for e in prof.key_averages(group_by_input_shape=True):
            key = (e.key, str(e.input_shapes)[:70])
            total[key] += e.self_cpu_time_total / 1e4
            calls[key] += e.count / 10
        F.cross_entropy(out, y).backward()
    print(f"\nGrAPE forward, profiled: {sum(total.values()):.1f} ms of self CPU time per forward\n")
    print("| op | input shapes | calls | ms |\n|---|---|---:|---:|")
    for key, ms in total.most_common(top):
        print(f"| {key[0]} | {key[1]} | {calls[key]:g} | {ms:.2f} |")


def feedback_step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median time of GrAPE's feedback step (``before_projection``) in ``steps`` training steps."""
    original = GradientAlignedProjectedError.before_projection
    seen = []

    def timed(self, session, e):
        t0 = time.perf_counter()
        original(self, session, e)
        seen.append(time.perf_counter() - t0)

    GradientAlignedProjectedError.before_projection = timed
    try:
        for _ in range(steps + 3):
            F.cross_entropy(model(x), y).backward()
    finally:
        GradientAlignedProjectedError.before_projection = original
    return statistics.median(seen[3:]) * 1e3


def fixed_costs(rounds: int) -> None:
    """Per-step time of each mode on a tiny MLP: Python and dispatch, no arithmetic to speak of."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 10))
    x, y = torch.randn(4, 8), torch.randint(0, 10, (4,))
    models = {"backprop": clone(base), "floor": floor_model(base)}
    models.update({m: bio_ext.convert(base, m) for m in ("dfa", "grape")})
    steps = {k: make_step(m, x, y) for k, m in models.items()}
    t = interleaved_medians(steps, rounds=rounds * 20, per_round=1, warmup=20, device=torch.device("cpu"))
    print("\nFixed cost of a step, tiny MLP 8-16-16-16-10, batch 4 (us):",
          ", ".join(f"{k} {v * 1e6:.0f}" for k, v in t.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"# grape_budget: {args.model} on {hardware()}")
    steps = build_steps(args.model, ["dfa", "grape"], device=torch.device("cpu"), with_biotorch=False,
                        with_floor=True)
    times = interleaved_medians(steps, rounds=args.rounds, per_round=3, warmup=2, device=torch.device("cpu"))
    bp = times["backprop"]
    print("\nOne training step: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / bp:.3f})" for k, v in times.items()))

    torch.manual_seed(0)
    base = MODELS[args.model]()
    shape, batch = INPUTS[args.model]
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    grape, plain = bio_ext.convert(base, "grape"), clone(base)
    fwd = interleaved_medians({"backprop": lambda: plain(x), "grape": lambda: grape(x)}, rounds=args.rounds * 3,
                              per_round=1, warmup=3, device=torch.device("cpu"))
    print(f"Forward alone: backprop {fwd['backprop'] * 1e3:.1f} ms, GrAPE {fwd['grape'] * 1e3:.1f} ms (with its "
          f"tangents; {(fwd['grape'] - fwd['backprop']) / bp:.3f} of a backprop step more)")
    forward_budget(grape, x, y, args.top)
    ms = feedback_step_ms(grape, x, y, args.rounds * 3)
    print(f"\nGrAPE's feedback step (before_projection): {ms:.2f} ms a step ({ms / 1e3 / bp:.3f} of a backprop step)")
    fixed_costs(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
