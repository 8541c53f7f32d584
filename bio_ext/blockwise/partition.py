"""Where to cut a model into blocks: its spine (the modules its forward runs one after the
other), a probe forward that measures each unit, and the exact balanced partition."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.outputs import call, first_tensor
from ..errors import ConfigError, PartitionError
from ..points import find_blocks
from .config import COSTS


def balanced_cuts(costs: Sequence[float], k: int) -> List[int]:
    """Start indices of ``k`` contiguous non-empty groups of ``costs`` minimising the largest group sum.

    Exact dynamic programme (ties: the earliest cut). ``balanced_cuts([1, 1, 1, 1], 2) == [0, 2]``.
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise PartitionError(f"cannot cut {n} unit(s) into {k} non-empty blocks; use blocks between 1 and {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[g][i]: smallest max-group cost splitting costs[:i] into g groups; arg[g][i]: start of the last group
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                v = max(best[g - 1][j], prefix[i] - prefix[j])
                if v < best[g][i] - 1e-12 * max(1.0, abs(v)):
                    best[g][i], arg[g][i] = v, j
    cuts, i = [], n
    for g in range(k, 0, -1):
        j = arg[g][i]
        cuts.append(j)
        i = j
    return cuts[::-1]


@dataclass
class Unit:
    """One splittable unit of the spine: the module that starts it and the parameters first used in it."""

    name: str
    entry: Optional[str]  # module whose pre-hook is the boundary before this unit (None for unit 0)
    params: List[str] = field(default_factory=list)
    flops: float = 0.0
    n_params: int = 0
    activations: float = 0.0
    in_shape: Optional[Tuple[int, ...]] = None  # probe shape of the entry's input

    def cost(self, kind: str) -> float:
        return {"flops": self.flops, "params": float(self.n_params), "activations": self.activations}[kind]


@dataclass
class Partition:
    """The result of :func:`partition`: units, blocks (lists of unit indices), the output layer."""

    units: List[Unit]
    blocks: List[List[int]]
    head: str
    head_params: List[str]
    head_in_shape: Tuple[int, ...]
    head_out_shape: Tuple[int, ...]
    shared: List[str]  # parameters used both in a block and in the output layer (tied weights)
    unused: List[str]  # parameters the probe forward did not use (left untouched, no gradient)
    cost: str

    def block_params(self, k: int) -> List[str]:
        return [p for u in self.blocks[k] for p in self.units[u].params]

    def block_entry(self, k: int) -> Optional[str]:
        """The module whose pre-hook starts block ``k`` (None for the first block)."""
        return self.units[self.blocks[k][0]].entry

    def block_costs(self) -> List[float]:
        return [sum(self.units[u].cost(self.cost) for u in b) for b in self.blocks]

    def describe(self) -> str:
        lines = []
        costs = self.block_costs()
        total = sum(costs) or 1.0
        for k, b in enumerate(self.blocks):
            names = [self.units[u].name for u in b]
            shown = names if len(names) <= 4 else names[:2] + ["..."] + names[-1:]
            lines.append(f"block {k + 1}: {', '.join(shown)} ({len(self.block_params(k))} tensors, "
                         f"{100 * costs[k] / total:.0f}% of {self.cost})")
        lines.append(f"output layer: {self.head}")
        return "\n".join(lines)


def _param_children(module: nn.Module, prefix: str) -> List[str]:
    return [f"{prefix}.{n}" if prefix else n for n, c in module.named_children()
            if any(True for _ in c.parameters())]


def _transformers_spine(model: nn.Module) -> Tuple[List[Optional[str]], str]:
    blocks = find_blocks(model, min_blocks=1)
    if not blocks:
        raise PartitionError(f"found no list of transformer blocks in {type(model).__name__}; pass "
                             "units=[...module names in forward order...] and head='<output layer>'")
    lname = blocks[0].rpartition(".")[0]
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Module):
        head = next((n for n, m in model.named_modules() if m is out_emb), None)
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and not (n == lname or n.startswith(lname + "."))]
        if not linears:
            raise PartitionError(f"cannot find the output layer of {type(model).__name__}; pass head='<name>'")
        head = linears[-1]
    return [None, *blocks], head


def default_spine(model: nn.Module) -> Tuple[List[Optional[str]], str]:
    """Entry module names of the spine's units (the first may be None) and the output layer's name."""
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover
        tvm = None
    if tvm is not None and isinstance(model, tvm.ResNet):
        entries: List[Optional[str]] = ["conv1"]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            entries += [f"{stage}.{i}" for i in range(len(getattr(model, stage)))]
        return entries, "fc"
    if tvm is not None and isinstance(model, (tvm.VGG, tvm.AlexNet, tvm.MobileNetV2, tvm.MobileNetV3,
                                              tvm.EfficientNet)):
        feats = _param_children(model.features, "features")
        cls = _param_children(model.classifier, "classifier") if isinstance(model.classifier, nn.Sequential) \
            else ["classifier"]
        return feats + cls[:-1], cls[-1]
    if isinstance(model, nn.Sequential):
        children = _param_children(model, "")
        if len(children) < 2:
            raise PartitionError(f"the nn.Sequential has {len(children)} child with parameters; block-wise "
                                 "training needs at least one block before the output layer")
        return children[:-1], children[-1]
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if PreTrainedModel and isinstance(model, PreTrainedModel):
        return _transformers_spine(model)
    raise PartitionError(
        f"bio_ext does not know how to split a {type(model).__name__} (known: torchvision ResNet, VGG, AlexNet, "
        "MobileNet V2/V3, EfficientNet, nn.Sequential, transformers models). Pass units=[names of the modules "
        "its forward runs one after the other, e.g. 'stem', 'stage1', ...] and head='<output layer name>'; then "
        "blocks=K or splits=[...names of the units that start blocks 2..K...]")


def _flops(module: nn.Module, out: torch.Tensor) -> float:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not isinstance(out, torch.Tensor):
        return 0.0
    if isinstance(module, nn.modules.conv._ConvNd):
        return float(out.numel()) * w[0].numel()
    if isinstance(module, nn.Linear):
        return float(out.numel()) * module.in_features
    if type(module).__name__ == "Conv1D" and w.dim() == 2:  # transformers Conv1D: weight (in, out)
        return float(out.numel()) * w.shape[0]
    return 0.0


def default_example(model: nn.Module) -> Any:
    """A small probe input for the known families (pass ``example_input`` for anything else)."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return torch.randint(0, int(config.vocab_size), (2, 8), device=device)
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    try:
        import torchvision.models as tvm
        if isinstance(model, (tvm.ResNet, tvm.VGG, tvm.AlexNet, tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet)):
            return torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, device=device, dtype=dtype)
    if isinstance(first, nn.Conv2d):
        return torch.randn(2, first.in_channels, 32, 32, device=device, dtype=dtype)
    if isinstance(first, nn.Conv1d):
        return torch.randn(2, first.in_channels, 32, device=device, dtype=dtype)
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (2, 8), device=device)
    raise PartitionError(f"cannot guess an input for {type(model).__name__} to probe its spine; pass "
                         "example_input=<a small batch the model accepts>")


class _Probe:
    """One forward with hooks on every module: the order in which the units run, which unit first uses
    each parameter, each unit's cost, and the shapes at the boundaries."""

    def __init__(self, model: nn.Module, entries: List[Optional[str]], head: str) -> None:
        self.model, self.entries, self.head = model, entries, head
        self.units = [Unit(name=e if e is not None else "<input>", entry=e) for e in entries]
        self.head_info: dict = {"params": [], "calls": 0}
        self.entry_index = {e: i for i, e in enumerate(entries) if e is not None}
        self.cur: Any = 0
        self.calls = [0] * len(entries)
        self.order_error: Optional[str] = None
        self.owner: Dict[int, Tuple[Any, str]] = {}
        self.shared: List[str] = []

    def pre(self, name: str, module: nn.Module, args, kwargs) -> None:
        if name == self.head:
            self.head_info["calls"] += 1
            self.cur = "head"
            t, _ = first_tensor(args, kwargs)
            self.head_info["in_shape"] = tuple(t.shape) if t is not None else None
        elif name in self.entry_index:
            i = self.entry_index[name]
            self.calls[i] += 1
            if self.cur == "head" or (isinstance(self.cur, int) and i < self.cur):
                self.order_error = name
            self.cur = i
            t, _ = first_tensor(args, kwargs)
            self.units[i].in_shape = tuple(t.shape) if t is not None else None
        for pn, p in [(pn, p) for pn, p in module._parameters.items() if p is not None]:
            full = f"{name}.{pn}" if name else pn
            if id(p) not in self.owner:
                self.owner[id(p)] = (self.cur, full)
                if self.cur == "head":
                    self.head_info["params"].append(full)
                else:
                    self.units[self.cur].params.append(full)
                    self.units[self.cur].n_params += p.numel()
            elif self.cur == "head" and self.owner[id(p)][0] != "head":
                self.shared.append(self.owner[id(p)][1])

    def post(self, name: str, module: nn.Module, args, out) -> None:
        t = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) and out
                                                       and isinstance(out[0], torch.Tensor) else None)
        if name == self.head:
            self.head_info["out_shape"] = tuple(t.shape) if t is not None else None
        if isinstance(self.cur, int) and t is not None and not any(True for _ in module.children()):
            self.units[self.cur].flops += _flops(module, t)
            self.units[self.cur].activations += float(t.numel())

    def run(self, example: Any) -> None:
        model = self.model
        handles = []
        for name, m in model.named_modules():
            if name in self.entry_index or name == self.head or m._parameters:
                handles.append(m.register_forward_pre_hook(functools.partial(self.pre, name), with_kwargs=True))
            handles.append(m.register_forward_hook(functools.partial(self.post, name)))
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                call(model, example)
        except PartitionError:
            raise
        except Exception as exc:
            raise PartitionError(f"the probe forward of {type(model).__name__} failed ({type(exc).__name__}: "
                                 f"{exc}); pass example_input=<a small batch the model accepts>") from exc
        finally:
            for h in handles:
                h.remove()
            for m, t in modes.items():
                m.train(t)

    def check(self) -> None:
        never = [e for e, c in zip(self.entries, self.calls) if e is not None and c == 0]
        twice = [e for e, c in zip(self.entries, self.calls) if e is not None and c > 1]
        problems = []
        if never:
            problems.append(f"units {never} never ran in the forward")
        if twice:
            problems.append(f"units {twice} ran more than once in one forward")
        if self.head_info["calls"] != 1:
            problems.append(f"the output layer {self.head!r} ran {self.head_info['calls']} times (expected once)")
        if self.order_error is not None:
            problems.append(f"unit {self.order_error!r} ran out of the listed order (or after the output layer)")
        if problems:
            raise PartitionError("the model's forward does not run its units one after the other: "
                                 + "; ".join(problems) + ". Pass units=[...] listing modules that run once each, "
                                 "in order, and head='<output layer>'")
        if self.head_info.get("out_shape") is None or self.head_info.get("in_shape") is None:
            raise PartitionError(f"the output layer {self.head!r} must take and return a tensor; pass "
                                 "head='<name>' of a Linear-like output layer")


def _probe(model: nn.Module, entries: List[Optional[str]], head: str, example: Any) -> Tuple[List[Unit], dict]:
    """Run one forward with hooks: unit order, parameter ownership, costs and boundary shapes."""
    modules = dict(model.named_modules())
    missing = [n for n in [*entries, head] if n is not None and n not in modules]
    if missing:
        valid = [n for n in modules if n][:30]
        raise PartitionError(f"{missing} are not submodules of {type(model).__name__}; use names from "
                             f"model.named_modules(), e.g. {valid}")
    probe = _Probe(model, entries, head)
    probe.run(example)
    probe.check()
    info = probe.head_info
    info["unused"] = [n for n, p in model.named_parameters() if id(p) not in probe.owner]
    info["shared"] = probe.shared
    return probe.units, info


def partition(model: nn.Module, blocks: Optional[int] = None, *, splits: Sequence[str] = (), cost: str = "flops",
              units: Sequence[str] = (), head: Optional[str] = None, example_input: Any = None) -> Partition:
    """Split ``model``'s spine into contiguous blocks (see the module docstring). Does not modify ``model``.

    Raises :class:`~bio_ext.errors.PartitionError` when K exceeds the number of splittable units
    (the message names the maximum), for unknown split names and for unknown architectures.
    """
    if cost not in COSTS:
        raise ConfigError([f"cost: {cost!r} is not one of {', '.join(COSTS)}"], what="blockwise configuration")
    if units:
        if head is None:
            raise ConfigError(["head: give the output layer's name with units=[...]"], what="blockwise configuration")
        entries: List[Optional[str]] = list(units)
    else:
        entries, auto_head = default_spine(model)
        head = head if head is not None else auto_head
    example = example_input if example_input is not None else default_example(model)
    unit_list, info = _probe(model, entries, head, example)
    n = len(unit_list)
    empty = [u.name for u in unit_list if not u.params]
    if empty:  # a unit without parameters of its own rides with its neighbour
        merged: List[Unit] = []
        for u in unit_list:
            if merged and not u.params and u.entry is not None:
                prev = merged[-1]
                prev.flops += u.flops
                prev.activations += u.activations
                continue
            merged.append(u)
        unit_list, n = merged, len(merged)
    if splits:
        names = {u.name: i for i, u in enumerate(unit_list)}
        bad = [s for s in splits if s not in names or names[s] == 0]
        if bad:
            raise PartitionError(f"split points {bad} are not units that can start a block; valid: "
                                 f"{[u.name for u in unit_list[1:]]}")
        starts = [0] + [names[s] for s in splits]
        if starts != sorted(starts):
            raise PartitionError(f"split points {list(splits)} are not in forward order; order them as "
                                 f"{[u.name for u in unit_list if u.name in set(splits)]}")
        k = len(starts)
    else:
        k = 4 if blocks is None else blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError([f"blocks: must be a positive int, got {k!r}"], what="blockwise configuration")
        if k > n:
            raise PartitionError(f"blocks={k} but {type(model).__name__} has only {n} splittable units "
                                 f"({', '.join(u.name for u in unit_list[:12])}{', ...' if n > 12 else ''}); "
                                 f"use blocks <= {n}")
        costs = [u.cost(cost) for u in unit_list]
        if not any(costs):
            costs = [float(u.n_params) for u in unit_list]
        starts = balanced_cuts(costs, k)
    bounds = starts + [n]
    groups = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
    return Partition(units=unit_list, blocks=groups, head=head, head_params=info["params"],
                     head_in_shape=info["in_shape"], head_out_shape=info["out_shape"], shared=info["shared"],
                     unused=info["unused"], cost=cost)
