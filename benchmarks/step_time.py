"""Time one training step (forward, backward, optimizer) per mode against plain backprop.

Every variant trains a copy of the same model on the same batch in the same
process; timings are interleaved in rounds and the median is kept. Prints the
step time and the ratio to backprop for bio_ext's modes, biotorch's
implementation of the same mode (where biotorch has it) and a "floor": forward
plus weight gradients with no input-gradient products at all.

    python benchmarks/step_time.py                      # all models, all modes
    python benchmarks/step_time.py --models mlp --modes dfa --rounds 20
    python benchmarks/step_time.py --models mlp --modes grape,grape:directions=2,grape:directions=4
    python benchmarks/step_time.py --models cnn,resnet18 --modes dfa,dfa:conv_feedback=dense,dfa:conv_feedback=factored
    python benchmarks/step_time.py --compile --models mlp --modes fa,dfa   # compiled vs eager, per variant
    python benchmarks/step_time.py --models mlp --modes grape --profile 10   # and where each variant's time goes

A variant's ``key=value`` pairs are mode options, except the fields of ``bio_ext.ConvertConfig``
(``conv_feedback``, ``tangential``, ...), which go to ``convert`` itself (the input shape that
``dense``/``factored`` need is the model's benchmark input).

With ``--compile`` every variant (backprop and each mode) is timed eagerly and as ``torch.compile(model)``
(``--compile-backend``, default inductor; warm-up steps include the compilation), and the table adds the
compiled step time and its ratio to the same variant's eager step (below 1: compile helps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bio_ext  # noqa: E402
from _common import INPUTS, MODELS, clone, hardware, interleaved_medians  # noqa: E402

MODES = ["bp", "fa", "dfa", "drtp", "usf", "brsf", "frsf", "grape"]
BIOTORCH_MODES = {"fa", "dfa", "usf", "brsf", "frsf"}


# ---------------------------------------------------------------- the floor: no input-gradient products
class _FloorLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x)
        ctx.shape = x.shape
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gx = g.new_zeros(()).expand(ctx.shape) if ctx.needs_input_grad[0] else None
        return gx, g.t().mm(x), g.sum(0)


class _FloorConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.geom = (stride, padding)
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding = ctx.geom
        _, gw, gb = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], stride, padding, (1, 1), False,
                                                        [0, 0], 1, (False, True, True))
        gx = g.new_zeros(()).expand(x.shape) if ctx.needs_input_grad[0] else None
        return gx, gw, gb, None, None


class _Floor(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        if isinstance(m, nn.Linear):
            return _FloorLinear.apply(x, m.weight, m.bias)
        return _FloorConv.apply(x, m.weight, m.bias, m.stride, m.padding)


def floor_model(model: nn.Module) -> nn.Module:
    model = clone(model)
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if type(child) in (nn.Linear, nn.Conv2d) and (not isinstance(child, nn.Conv2d) or
                                                         (child.groups == 1 and child.bias is not None)):
                setattr(m, cname, _Floor(child))
    return model


# ---------------------------------------------------------------- step functions
def make_step(model: nn.Module, x, y, *, call: Callable = None) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        out = call(model, x, y, loss_fn) if call else model(x)
        loss_fn(out, y).backward()
        opt.step()

    return step


def _has_biotorch() -> bool:
    """biotorch is the ``[compare]`` extra: without it the script times bio_ext against backprop only."""
    import importlib.util
    if importlib.util.find_spec("biotorch") is None:
        logging.warning("biotorch is not installed (pip install '.[compare]'): its columns are left out")
        return False
    return True


def biotorch_model(model: nn.Module, mode: str, out_dim: int):
    import contextlib
    import io

    from biotorch.module.biomodule import BioModule
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # biotorch prints
        warnings.simplefilter("ignore")
        return BioModule(clone(model), mode=mode, output_dim=out_dim,
                         layer_config={"type": mode, "options": {"init": "xavier", "constrain_weights": False,
                                                                 "gradient_clip": False}})


def biotorch_call(mode):
    if mode == "dfa":
        return lambda m, x, y, loss_fn: m(x, targets=y, loss_function=loss_fn)
    return lambda m, x, y, loss_fn: m(x)


def parse_variant(variant: str):
    """``mode`` or ``mode:key=value:key=value`` -> (mode, mode options, convert keywords); values are
    read as YAML scalars, and keys that are ``ConvertConfig`` fields are convert keywords."""
    import dataclasses
    import yaml
    fields = {f.name for f in dataclasses.fields(bio_ext.ConvertConfig)}
    mode, *pairs = variant.split(":")
    options, convert_kw = {}, {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        (convert_kw if key in fields else options)[key] = yaml.safe_load(value)
    return mode, options, convert_kw


def compiled_steps(steps: Dict[str, Callable[[], None]], models: Dict[str, nn.Module], x, y,
                   backend: str) -> Dict[str, Callable[[], None]]:
    """``steps`` plus, for each variant in ``models``, the step of a compiled copy (``name [compiled]``)."""
    out = dict(steps)
    for name, model in models.items():
        out[f"{name} [compiled]"] = make_step(torch.compile(clone(model), backend=backend), x, y)
    return out


def build_steps(model_name: str, modes, *, device: torch.device, with_biotorch: bool, with_floor: bool,
                compile_backend=None) -> Dict[str, Callable[[], None]]:
    """One step function per variant (backprop first), each training its own copy of one model on one batch."""
    torch.manual_seed(0)
    base = MODELS[model_name]().to(device)
    shape, batch = INPUTS[model_name]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps: Dict[str, Callable[[], None]] = {"backprop": make_step(clone(base), x, y)}
    models: Dict[str, nn.Module] = {"backprop": base}
    if with_floor:
        steps["floor"] = make_step(floor_model(base), x, y)
    for variant in modes:
        mode, options, convert_kw = parse_variant(variant)
        if convert_kw.get("conv_feedback", "kernel") != "kernel":
            convert_kw.setdefault("input_shape", shape)
        converted = bio_ext.convert(base, mode, options=options, **convert_kw)
        steps[f"bio_ext {variant}"] = make_step(converted, x, y)
        models[f"bio_ext {variant}"] = converted
        if with_biotorch and mode in BIOTORCH_MODES and not options and not convert_kw:
            try:
                bt = biotorch_model(base, mode, 10).to(device)
                fn = make_step(bt, x, y, call=biotorch_call(mode))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn()
                steps[f"biotorch {mode}"] = fn
            except Exception as exc:  # biotorch is third-party: report, don't die
                logging.warning("biotorch %s on %s failed: %s: %s", mode, model_name, type(exc).__name__, exc)
    if compile_backend is not None:
        steps = compiled_steps(steps, models, x, y, compile_backend)
    return steps


def run(steps: Dict[str, Callable[[], None]], *, rounds: int, per_round: int, warmup: int,
        device: torch.device) -> Dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return interleaved_medians(steps, rounds=rounds, per_round=per_round, warmup=warmup, device=device)


def profile_steps(steps: Dict[str, Callable[[], None]], n: int, top: int = 12) -> None:
    """Print, per variant, the ``top`` ops by self time over ``n`` steps (``torch.profiler``), per step."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, fn in steps.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
            with profile(activities=acts) as prof:
                for _ in range(n):
                    fn()
        events = prof.key_averages()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        rows = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)
        total = sum(getattr(e, key, 0) for e in events) / 1e3 / n
        print(f"\n#### profile: {name} ({n} steps, {key.replace('_', ' ')}: {total:.1f} ms per step)\n")
        print("| op | calls per step | ms per step |\n|---|---:|---:|")
        for e in rows[:top]:
            print(f"| {e.key} | {e.count / n:g} | {getattr(e, key, 0) / 1e3 / n:.2f} |")


def print_table(times: Dict[str, float], compiled: bool) -> None:
    bp = times["backprop"]
    if not compiled:
        print("| variant | ms/step | ratio to backprop |\n|---|---:|---:|")
        for name, t in times.items():
            print(f"| {name} | {t * 1e3:.1f} | {t / bp:.3f} |")
        return
    print("| variant | ms/step eager | ratio to backprop | ms/step compiled | compiled / eager |\n|---|---:|---:|---:|---:|")
    for name, t in times.items():
        if name.endswith(" [compiled]"):
            continue
        c = times.get(f"{name} [compiled]")
        cells = f"{c * 1e3:.1f} | {c / t:.3f}" if c is not None else "- | -"
        print(f"| {name} | {t * 1e3:.1f} | {t / bp:.3f} | {cells} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn,resnet18")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-biotorch", action="store_true")
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) of every variant")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N steps of each variant and print its top ops (torch.profiler)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    results = {}
    print(f"# step_time: {datetime.date.today()} on {hardware()}")
    for model_name in args.models.split(","):
        shape, batch = INPUTS[model_name]
        steps = build_steps(model_name, modes, device=device, with_biotorch=not args.no_biotorch and _has_biotorch(),
                            with_floor=not args.no_floor,
                            compile_backend=args.compile_backend if args.compile else None)
        times = run(steps, rounds=args.rounds, per_round=args.per_round, warmup=args.warmup, device=device)
        print(f"\n## {model_name}, batch {batch}, input {shape}\n")
        print_table(times, args.compile)
        if args.profile:
            profile_steps(steps, args.profile)
        bp = times["backprop"]
        results[model_name] = {k: {"ms": v * 1e3, "ratio": v / bp} for k, v in times.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware(), "date": str(datetime.date.today()),
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
