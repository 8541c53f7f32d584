"""What the 2-rank DistributedDataParallel tests run on every rank (tests/test_distributed.py), and the same
training in one process for the references. Importable by spawned children: tests/ is on their sys.path."""

import contextlib
import os
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

import bio_ext
from bio_ext import distributed
from bio_ext.modes import grape as grape_mode

WORLD = 2
BATCH = 8  # the whole batch; each rank trains on BATCH // WORLD rows
STEPS = 3


def mlp():
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def deep_mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 4)).double()


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 4)).double()


FACTORIES = {"mlp": (mlp, (6,)), "deep_mlp": (deep_mlp, (6,)), "cnn": (cnn, (2, 5, 5))}

#: (factory, mode, convert options): the gradient cases (dfa on the all-ReLU cnn: radial="output" under auto)
GRADIENT_CASES = [("mlp", m, {}) for m in ("bp", "fa", "usf", "brsf", "frsf", "dfa", "drtp")] + [
    ("cnn", "fa", {}), ("cnn", "dfa", {}), ("cnn", "dfa", {"radial": "keep"}), ("cnn", "drtp", {}),
    ("cnn", "dfa", {"conv_feedback": "dense"}),
    ("deep_mlp", "bwbpf", {"blocks": 2}), ("cnn", "bwbpf", {"blocks": 2}),
    ("deep_mlp", "bwbpf", {"blocks": 2, "layer_mode": "dfa"}), ("mlp", "pepita", {}),
]
#: (factory, mode, convert options): the other modes whose feedback learns, under DDP with broadcast_buffers=False
LEARNED_CASES = [("mlp", "dkp", {"options": {"feedback_lr": 0.05}}), ("mlp", "fdfa", {}),
                 ("cnn", "fdfa", {"conv_feedback": "dense"})]

GRAPE_OPTIONS = {"feedback_lr": 0.3, "momentum": 0.5}
JACOBIAN = {"options": {**GRAPE_OPTIONS, "feedback_target": "jacobian", "directions": 2}}
#: (factory, convert options, how the model is trained on each rank, bio_ext.distributed.sync_feedback's group):
#: the GrAPE cases. "ddp": DDP with broadcast_buffers=True (its default), "ddp-local": broadcast_buffers=False,
#: "plain": no DDP (each rank trains its own copy on its shard)
GRAPE_CASES = [
    ("mlp", {}, "ddp", "auto"), ("mlp", {}, "ddp-local", "auto"), ("mlp", JACOBIAN, "ddp-local", "auto"),
    ("cnn", {"conv_feedback": "dense"}, "ddp", "auto"), ("cnn", {"conv_feedback": "factored"}, "ddp-local", "auto"),
    ("mlp", {}, "ddp-local", "off"), ("mlp", {}, "ddp", "off"), ("mlp", {}, "plain", "auto"),
    ("mlp", {}, "plain", "world"),
]


def case_name(factory, mode, opts, *extra):
    flat = {**{k: v for k, v in opts.items() if k != "options"}, **opts.get("options", {})}
    tail = "-".join(f"{k}={v}" for k, v in sorted(flat.items()))
    return "_".join(str(p) for p in (factory, mode, tail, *extra) if p != "")


def build(factory, mode, opts):
    torch.manual_seed(0)
    fn, shape = FACTORIES[factory]
    model = fn()
    if mode == "bwbpf":
        return bio_ext.blockwise(model, example_input=torch.zeros(2, *shape, dtype=torch.float64), **opts)
    if mode == "grape":
        opts = {**opts, "options": {**GRAPE_OPTIONS, **opts.get("options", {})}}
    if opts.get("conv_feedback", "kernel") != "kernel":
        opts = {**opts, "input_shape": shape}
    return bio_ext.convert(model, mode, seed=0, **opts)


def data(factory):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, *FACTORIES[factory][1], generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (STEPS, BATCH), generator=g)
    return x, y


def train(model, xs, ys, lr=0.1):
    """``STEPS`` SGD steps; the gradients of every step, the parameters and buffers after them."""
    torch.manual_seed(2)
    inner = getattr(model, "module", model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None})
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in inner.named_buffers()}}


def shard(t, rank):
    n = t.shape[1] // WORLD
    return t[:, rank * n:(rank + 1) * n]


def run_rank(rank, init_file, out_dir, runner_argv=None, port=None):
    """Every case on this rank (DDP over a gloo group of WORLD ranks); one file of results per rank. Then, with
    ``runner_argv``, the YAML runner's command line as torchrun starts it (its environment: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the runner starting its own process group."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers is deprecated in newer torch
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    DDP = torch.nn.parallel.DistributedDataParallel
    out = {}
    try:
        for factory, mode, opts in GRADIENT_CASES:
            model = DDP(build(factory, mode, opts))
            x, y = data(factory)
            out[case_name(factory, mode, opts)] = train(model, shard(x, rank), shard(y, rank))
        for factory, opts, how, sync in GRAPE_CASES:
            model = build(factory, "grape", opts)
            if how != "plain":
                model = DDP(model, broadcast_buffers=how == "ddp")
            group = {"auto": "auto", "off": None, "world": torch.distributed.group.WORLD}[sync]
            distributed.sync_feedback(model, group)
            x, y = data(factory)
            out[case_name(factory, "grape", opts, how, sync)] = train(model, shard(x, rank), shard(y, rank))
        for factory, mode, opts in LEARNED_CASES:
            model = DDP(build(factory, mode, opts), broadcast_buffers=False)
            x, y = data(factory)
            out[case_name(factory, mode, opts)] = train(model, shard(x, rank), shard(y, rank))
        out["nonfinite"] = nonfinite(rank)
        out["early_backward"] = early_backward()
        world = torch.distributed.group.WORLD
        out["reduced"] = distributed.reduce_tensors([torch.tensor(float(rank)), torch.tensor([rank, 1])], world) + \
            distributed.reduce_tensors([torch.tensor([2.0 * rank])], world, mean=True)
    finally:
        torch.distributed.destroy_process_group()
    if runner_argv is not None:
        from bio_ext.benchmark.__main__ import main
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        out["runner_exit"] = main(list(runner_argv))
        out["runner_group_left"] = torch.distributed.is_initialized()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def early_backward():
    """bwbpf with early_backward=True under DDP: refused at the forward (the message)."""
    model = torch.nn.parallel.DistributedDataParallel(build("deep_mlp", "bwbpf", {"blocks": 2,
                                                                                 "early_backward": True}))
    bio_ext.set_targets(model.module, torch.zeros(2, dtype=torch.long))
    try:
        model(torch.zeros(2, 6, dtype=torch.float64))
    except bio_ext.ConfigError as e:
        return str(e)
    return None


def nonfinite(rank):
    """GrAPE under DDP, 2 steps; in the second, rank 1's shard has a NaN: no rank steps its feedback."""
    model = torch.nn.parallel.DistributedDataParallel(build("mlp", "grape", {}), broadcast_buffers=False)
    x, y = data("mlp")
    x, y = shard(x, rank)[:2].clone(), shard(y, rank)[:2]
    if rank == 1:
        x[1, 0, 0] = float("nan")
    inner = model.module
    seen = []
    for xb, yb in zip(x, y):
        nn.functional.cross_entropy(model(xb), yb).backward()
        seen.append({n: b.detach().clone() for n, b in inner.named_buffers()})
    return seen


@contextlib.contextmanager
def rank_perturbations(world=WORLD):
    """In one process: GrAPE draws the perturbation of every shard's rows as the rank holding them does (the
    forward's seed mixed with the rank, :func:`bio_ext.distributed.rank_seed`), so the concatenated batch sees
    the same perturbations as the ranks together."""
    streams = {}  # per forward (its seed): one generator per rank
    original = grape_mode.GradientAlignedProjectedError.perturb

    def perturb(self, session, slot, x):
        fwd = session.rule_state
        main = fwd.main.rule_state if fwd.main is not None else fwd  # a replay continues the forward's streams
        gens = streams.setdefault(main.seed, [torch.Generator().manual_seed(distributed.rank_seed(main.seed, r))
                                             for r in range(world)])
        primal, tangent = fwAD.unpack_dual(x)
        rows = primal.shape[0] // world
        u = torch.cat([torch.randn((rows,) + primal.shape[1:], dtype=primal.dtype, generator=g) for g in gens])
        while len(fwd.perturbations) <= slot:
            fwd.perturbations.append(None)
        fwd.perturbations[slot] = u
        return fwAD.make_dual(primal, u if tangent is None else tangent + u)

    grape_mode.GradientAlignedProjectedError.perturb = perturb
    try:
        yield
    finally:
        grape_mode.GradientAlignedProjectedError.perturb = original
