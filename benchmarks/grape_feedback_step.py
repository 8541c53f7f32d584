"""Time GrAPE's feedback step alone: the work its backward adds to DFA's (the cosine's statistics and the feedback
update of every layer, ``GradientAlignedProjectedError.before_projection``), in wall-clock ms per training step.

    python benchmarks/grape_feedback_step.py                       # mlp, cnn, resnet18
    python benchmarks/grape_feedback_step.py --models resnet18 --steps 30

The whole step against backprop is ``benchmarks/step_time.py``'s; this isolates the part that grows with the number
of converted layers, which the whole step's run-to-run spread on a busy CPU hides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bio_ext  # noqa: E402
from _common import INPUTS, MODELS, hardware  # noqa: E402
from bio_ext.modes.grape import GradientAlignedProjectedError as Grape  # noqa: E402


def feedback_step_times(model_name: str, steps: int, warmup: int = 3):
    """Seconds spent in the feedback step of each of ``steps`` training steps (after ``warmup``)."""
    torch.manual_seed(0)
    shape, batch = INPUTS[model_name]
    model = bio_ext.convert(MODELS[model_name](), "grape")
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    times = []
    original = Grape.before_projection

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    Grape.before_projection = timed
    try:
        for _ in range(warmup + steps):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    finally:
        Grape.before_projection = original
    return times[warmup:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn,resnet18")
    p.add_argument("--steps", type=int, default=17)
    a = p.parse_args(argv)
    print(f"# GrAPE feedback step: {hardware()}")
    print("| model | feedback step, median ms | min ms |\n|---|---:|---:|")
    for name in a.models.split(","):
        t = feedback_step_times(name, a.steps)
        print(f"| {name} | {statistics.median(t) * 1e3:.2f} | {min(t) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
