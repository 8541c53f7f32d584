"""Block-wise training with local losses (the BWBPF seed), with automatic partitioning.

    model = bio_ext.blockwise(model, blocks=4)          # a wrapped copy; model itself is untouched
    loss = loss_fn(model(x), y); loss.backward()         # unchanged loop
    plain = bio_ext.revert(model)                        # same parameters, auxiliary heads dropped

What it does
------------
The model's *spine* (the modules its forward runs one after the other) is cut into ``K``
contiguous blocks of roughly equal cost. Each block gets an auxiliary head (global average
pooling then a dense layer by default) that predicts the targets from the block's output,
with a local cross-entropy loss. The model's output layer (``fc``, ``classifier[-1]``,
``lm_head``, ...) is trained by the user's (global) loss.

* ``isolate=True`` (default, as DGL/InfoPro/SEDONA): the output of every block is detached
  before the next block and before the output layer, so block ``k``'s parameters get the
  gradient of their own local loss ``L_k`` only and the output layer that of the global loss.
* ``isolate=False``: nothing is detached, as in the BWBPF seed's own code (deep
  supervision): every parameter gets the gradient of ``L_global + sum_k L_k``, so block ``k``
  gets those of ``L_k, ..., L_K`` and of the global loss.
* ``early_backward=True`` (memory option, needs ``isolate=True``): each block's local loss is
  back-propagated inside the forward, right after the block ran, so its activations are
  freed before the next block runs (InfoPro's trick). The local losses then need the targets
  *before* the forward: call :func:`set_targets` before ``model(x)``, or use :func:`train_step`.
  The later ``loss.backward()`` trains the output layer only.

How the local losses get their targets (design choice)
------------------------------------------------------
The user's loop passes only ``x`` to the model; the targets reach the loss, not the model.
So the wrapped model passes its output through an identity autograd function (like the
:class:`~bio_ext.session.ErrorTap` of the feedback modes) whose backward sees the output
error ``e = dL/d(logits)``. For softmax cross-entropy, a row of ``e`` is
``(softmax(z) - onehot(y)) / N``: its only negative entry is at the target class, so
``y = argmin(e_row)``; rows that are all zero (``ignore_index``, padding, the last position
of a shifted language-model loss) get no local loss. The same backward then hands every
auxiliary head the gradient of its local loss, ``(softmax(a_k) - onehot(y)) / N_valid``
(mean over the rows that have a target), so a single ``loss.backward()`` delivers every
gradient, and a loss computed inside the model (transformers' ``labels=``) works too.

This is exact for plain softmax cross-entropy (any reduction, class weights change only the
scale). It is NOT right for other losses (MSE, label smoothing, ...): for those pass the
targets explicitly with :func:`set_targets` (or :func:`train_step`) before the forward;
explicit targets always take precedence. A loss whose error has a row with no negative
entry raises :class:`~bio_ext.errors.FeedbackSignalError` (not cross-entropy).

Partitioning
------------
Known families get their spine automatically: torchvision ResNet (``conv1`` stem, every
residual block, ``fc``), VGG / AlexNet (every parameterised child of ``features`` and
``classifier``, parameter-free ones riding with the preceding unit), MobileNet V2/V3 and
EfficientNet (``features`` children, then ``classifier``), any ``nn.Sequential`` (its
children), and transformers models (everything before the transformer block list as one
unit, each block a unit, the output embedding / classifier as the output layer). Any other
model: pass ``units=[names of the modules its forward runs in sequence]`` and ``head=name``.
A probe forward (no gradients, eval mode) records the order in which the units and every
parameterised module run, assigns each parameter to the unit it is first used in (a weight
tied to the output layer, as GPT-2's ``lm_head``/``wte``, stays with its first unit and
also gets the output layer's gradient) and measures each unit's cost (``flops`` of its
Linear/Conv layers, ``params`` or ``activations``: elements of the outputs its leaf
modules produce). Units are cut into ``K`` contiguous blocks minimising the largest block
cost (exact dynamic programme), or at explicit ``splits=[names of first units of blocks 2..K]``.

The block boundaries are forward pre-hooks on the first module of each block and on the
output layer, so the model's own forward runs unchanged. Whatever passes between blocks
other than that module's first input (attention masks, position ids) must not need a
gradient; a spine with a skip connection across a boundary is not isolated by the hooks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from .errors import ConfigError, ConversionError, FeedbackSignalError, PartitionError, UnsupportedModuleError
from .config import RoundTrip
from .functional import targets_from_error

log = logging.getLogger(__name__)

COSTS = ("flops", "params", "activations")
POOLS = ("auto", "avg", "mean", "token", "flatten")
AUX_NAME = "bio_ext_aux_heads"
_STATE = "_bio_ext_blockwise"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BlockwiseConfig(RoundTrip):
    """Options of :func:`blockwise` (round-trips to dict/YAML; ``mode`` is always ``"bwbpf"``).

    Attributes:
        blocks: number of blocks K (default 4 when ``splits`` is empty).
        splits: names of the units that start blocks 2..K (overrides the cost balancing).
        isolate: detach between blocks (True) or deep supervision as the seed's code (False).
        early_backward: back-propagate each local loss inside the forward to free activations
            (needs ``isolate=True`` and explicit targets: :func:`set_targets` / :func:`train_step`).
        cost: ``flops``, ``params`` or ``activations``: what the partition balances.
        pool: how an auxiliary head reduces a block output: ``auto`` (global average pooling
            for feature maps, mean over tokens for sequences unless the output layer predicts
            per token, then per token), ``avg``, ``mean``, ``token`` or ``flatten``.
        local_weight: multiplies every local loss.
        layer_mode: convert the blocks' layers with a per-layer mode as well: ``bp`` or the local
            family (``fa``, ``usf``, ...), or ``dfa``/``drtp``, whose layers then get the projection of
            their own block's local error ``e_k = dL_k/d(aux_k)`` (``B`` is ``(classes, in)``; the
            block's last layer trains on the true gradient through its auxiliary head). Direct modes
            need ``isolate=True``; ``grape`` is refused (no tangents at the auxiliary heads).
        units / head: the spine (module names in forward order) and output layer, for models
            that are not a known family.
        seed: seeds the auxiliary heads' (and ``layer_mode``'s feedback) initialisation.
    """

    _WHAT = "blockwise configuration"

    mode: str = "bwbpf"
    blocks: Optional[int] = None
    splits: Tuple[str, ...] = ()
    isolate: bool = True
    early_backward: bool = False
    cost: str = "flops"
    pool: str = "auto"
    local_weight: float = 1.0
    layer_mode: Optional[str] = None
    units: Tuple[str, ...] = ()
    head: Optional[str] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("splits", "units"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value) if value is not None else ())
        problems = []
        if self.mode != "bwbpf":
            problems.append(f"mode: a BlockwiseConfig has mode 'bwbpf', got {self.mode!r}")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)
                                        or self.blocks < 1):
            problems.append(f"blocks: must be a positive int, got {self.blocks!r}")
        if self.splits and self.blocks is not None and isinstance(self.blocks, int) \
                and self.blocks != len(self.splits) + 1:
            problems.append(f"blocks: {self.blocks} does not match {len(self.splits)} split point(s) "
                            f"(which make {len(self.splits) + 1} blocks); give one or the other")
        for name in ("splits", "units"):
            bad = [v for v in getattr(self, name) if not isinstance(v, str)]
            if bad:
                problems.append(f"{name}: entries must be module names (str), got {bad!r}")
        if len(set(self.splits)) != len(self.splits):
            problems.append(f"splits: names repeat in {list(self.splits)}")
        for name in ("isolate", "early_backward"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if self.early_backward is True and self.isolate is False:
            problems.append("early_backward: needs isolate=True (with deep supervision a later local loss "
                            "back-propagates through earlier blocks, so their activations cannot be freed early)")
        if self.cost not in COSTS:
            problems.append(f"cost: {self.cost!r} is not one of {', '.join(COSTS)}")
        if self.pool not in POOLS:
            problems.append(f"pool: {self.pool!r} is not one of {', '.join(POOLS)}")
        if isinstance(self.local_weight, bool) or not isinstance(self.local_weight, (int, float)) \
                or not self.local_weight > 0:
            problems.append(f"local_weight: must be a positive number, got {self.local_weight!r}")
        if self.layer_mode is not None:
            from .modes import _MODES
            if not isinstance(self.layer_mode, str) or self.layer_mode not in _MODES:
                problems.append(f"layer_mode: unknown mode {self.layer_mode!r}; valid: {', '.join(sorted(_MODES))}")
            elif _MODES[self.layer_mode].rule.forward_gradient:
                problems.append(
                    f"layer_mode: {self.layer_mode!r} needs forward-mode tangents at every auxiliary head, which "
                    "blockwise does not carry; use layer_mode='dfa' or 'drtp' inside blocks, or train the whole "
                    f"model with convert(model, mode={self.layer_mode!r})")
            elif _MODES[self.layer_mode].family == "direct" and self.isolate is False:
                problems.append(
                    f"layer_mode: {self.layer_mode!r} projects each block's own local error onto its layers, which "
                    "needs isolated blocks: with isolate=False later losses reach the block too. Use isolate=True, "
                    "or a local-family layer_mode (fa, usf, brsf, frsf)")
        if self.units and self.head is None:
            problems.append("head: give the output layer's name with units=[...]")
        if self.head is not None and not isinstance(self.head, str):
            problems.append(f"head: must be a module name (str), got {self.head!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed: must be an int or None, got {self.seed!r}")
        if problems:
            raise ConfigError(problems, what="blockwise configuration")

    @property
    def n_blocks(self) -> Optional[int]:
        return len(self.splits) + 1 if self.splits else (self.blocks if self.blocks is not None else 4)



# --------------------------------------------------------------------------- partition (pure logic)


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
    lists = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 \
                and any(True for _ in m.parameters()):
            lists.append((sum(p.numel() for p in m.parameters()), name, m))
    if not lists:
        raise PartitionError(f"found no list of transformer blocks in {type(model).__name__}; pass "
                             "units=[...module names in forward order...] and head='<output layer>'")
    _, lname, mlist = max(lists, key=lambda t: t[0])
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
    return [None] + [f"{lname}.{i}" for i in range(len(mlist))], head


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


def _first_tensor(args: tuple, kwargs: dict) -> Tuple[Optional[torch.Tensor], Callable]:
    """The first tensor argument of a call and a function putting a replacement in its place."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return a, lambda t, i=i: ((*args[:i], t, *args[i + 1:]), kwargs)
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], lambda t, key=key: (args, {**kwargs, key: t})
    return None, lambda t: None


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


def _run(model: nn.Module, example: Any):
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def _probe(model: nn.Module, entries: List[Optional[str]], head: str, example: Any) -> Tuple[List[Unit], dict]:
    """Run one forward with hooks: unit order, parameter ownership, costs and boundary shapes."""
    modules = dict(model.named_modules())
    missing = [n for n in [*entries, head] if n is not None and n not in modules]
    if missing:
        valid = [n for n in modules if n][:30]
        raise PartitionError(f"{missing} are not submodules of {type(model).__name__}; use names from "
                             f"model.named_modules(), e.g. {valid}")
    units = [Unit(name=e if e is not None else "<input>", entry=e) for e in entries]
    head_info: dict = {"params": [], "calls": 0}
    entry_index = {e: i for i, e in enumerate(entries) if e is not None}
    pos = {"cur": 0, "calls": [0] * len(entries)}
    owner: Dict[int, Tuple[Any, str]] = {}
    shared: List[str] = []
    handles = []

    def pre(name):
        def hook(module, args, kwargs):
            if name == head:
                head_info["calls"] += 1
                pos["cur"] = "head"
                t, _ = _first_tensor(args, kwargs)
                head_info["in_shape"] = tuple(t.shape) if t is not None else None
            elif name in entry_index:
                i = entry_index[name]
                pos["calls"][i] += 1
                if pos["cur"] == "head" or (isinstance(pos["cur"], int) and i < pos["cur"]):
                    pos["order_error"] = name
                pos["cur"] = i
                t, _ = _first_tensor(args, kwargs)
                units[i].in_shape = tuple(t.shape) if t is not None else None
            own = [(pn, p) for pn, p in module._parameters.items() if p is not None]
            for pn, p in own:
                full = f"{name}.{pn}" if name else pn
                if id(p) not in owner:
                    owner[id(p)] = (pos["cur"], full)
                    if pos["cur"] == "head":
                        head_info["params"].append(full)
                    else:
                        units[pos["cur"]].params.append(owner[id(p)][1])
                        units[pos["cur"]].n_params += p.numel()
                elif pos["cur"] == "head" and owner[id(p)][0] != "head":
                    shared.append(owner[id(p)][1])
        return hook

    def post(name):
        def hook(module, args, out):
            t = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) and out
                                                           and isinstance(out[0], torch.Tensor) else None)
            if name == head:
                head_info["out_shape"] = tuple(t.shape) if t is not None else None
            cur = pos["cur"]
            if isinstance(cur, int) and t is not None and not any(True for _ in module.children()):
                units[cur].flops += _flops(module, t)
                units[cur].activations += float(t.numel())
        return hook

    for name, m in modules.items():
        if name in entry_index or name == head or m._parameters:
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _run(model, example)
    except PartitionError:
        raise
    except Exception as exc:
        raise PartitionError(f"the probe forward of {type(model).__name__} failed ({type(exc).__name__}: {exc}); "
                             "pass example_input=<a small batch the model accepts>") from exc
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    never = [e for e, c in zip(entries, pos["calls"]) if e is not None and c == 0]
    twice = [e for e, c in zip(entries, pos["calls"]) if e is not None and c > 1]
    problems = []
    if never:
        problems.append(f"units {never} never ran in the forward")
    if twice:
        problems.append(f"units {twice} ran more than once in one forward")
    if head_info["calls"] != 1:
        problems.append(f"the output layer {head!r} ran {head_info['calls']} times (expected once)")
    if "order_error" in pos:
        problems.append(f"unit {pos['order_error']!r} ran out of the listed order (or after the output layer)")
    if problems:
        raise PartitionError("the model's forward does not run its units one after the other: "
                             + "; ".join(problems) + ". Pass units=[...] listing modules that run once each, in "
                             "order, and head='<output layer>'")
    if head_info.get("out_shape") is None or head_info.get("in_shape") is None:
        raise PartitionError(f"the output layer {head!r} must take and return a tensor; pass head='<name>' of a "
                             "Linear-like output layer")
    all_params = {id(p): n for n, p in model.named_parameters()}
    head_info["unused"] = [n for i, n in all_params.items() if i not in owner]
    head_info["shared"] = shared
    return units, head_info


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


# --------------------------------------------------------------------------- auxiliary heads


class _GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.flatten(2).mean(-1)


class _TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _aux_head(shape: Tuple[int, ...], out_shape: Tuple[int, ...], pool: str) -> Tuple[nn.Module, str]:
    """An auxiliary head for a block output of (probe) ``shape`` predicting like the output layer."""
    n_out = out_shape[-1]
    rank = len(shape)
    if pool == "auto":  # (N, C, H, W...): feature map; (N, T, D): sequence; (N, D): vector
        if rank >= 4:
            pool = "avg"
        elif rank == 3:
            pool = "token" if len(out_shape) == 3 else "mean"
        else:
            pool = "token"
    if pool == "avg":
        if rank < 3:
            raise ConfigError([f"pool: 'avg' needs a feature map (N, C, ...), the block output has shape {shape}"],
                              what="blockwise configuration")
        return nn.Sequential(_GlobalAvgPool(), nn.Linear(shape[1], n_out)), pool
    if pool == "mean":
        if rank != 3:
            raise ConfigError([f"pool: 'mean' needs a sequence (N, T, D), the block output has shape {shape}"],
                              what="blockwise configuration")
        return nn.Sequential(_TokenMean(), nn.Linear(shape[-1], n_out)), pool
    if pool == "flatten":
        return nn.Sequential(nn.Flatten(), nn.Linear(int(math.prod(shape[1:])), n_out)), pool
    return nn.Linear(shape[-1], n_out), pool  # token: a dense layer on the last dimension


# --------------------------------------------------------------------------- the step's autograd plumbing


class _Step:
    """One forward of a wrapped model: the auxiliary outputs waiting for targets."""

    __slots__ = ("targets", "aux", "losses", "sessions")

    def __init__(self, targets: Optional[torch.Tensor]):
        self.targets = targets
        self.aux: List[torch.Tensor] = []
        self.losses: List[Optional[float]] = []
        #: with a direct layer_mode: one feedback session per block, fed that block's local error
        self.sessions: List[Any] = []


def recover_targets(error: torch.Tensor) -> torch.Tensor:
    """Targets from a softmax cross-entropy output error ``(N, C)``: the index of each row's negative entry.

    Rows that are all zero (no loss on them) get ``-100``. Raises
    :class:`~bio_ext.errors.FeedbackSignalError` for a row with no negative entry.
    """
    return targets_from_error(error, "blockwise: the local losses",
                              "Pass the targets before the forward: bio_ext.blockwise.set_targets(model, y)")


def _local_grad(aux: torch.Tensor, targets: torch.Tensor, weight: float) -> Tuple[torch.Tensor, float]:
    """Gradient and value of ``weight * mean cross-entropy(aux, targets)`` over rows with a target (>= 0)."""
    a = aux.detach().reshape(-1, aux.shape[-1])
    t = targets.reshape(-1).to(a.device)
    if t.numel() != a.shape[0]:
        raise FeedbackSignalError(
            f"blockwise: {t.numel()} target(s) for an auxiliary head with {a.shape[0]} row(s); the targets must have "
            "one entry per row of the model output (flattened over tokens for sequence outputs)")
    valid = t >= 0
    n = int(valid.sum())
    logp = torch.log_softmax(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a, dim=1)
    g = logp.exp()
    rows = valid.nonzero().squeeze(1)
    g[rows, t[rows]] -= 1.0
    g[~valid] = 0.0
    value = float(-(logp[rows, t[rows]]).sum()) * weight / max(n, 1)
    g = g * (weight / max(n, 1))
    return g.to(aux.dtype).reshape(aux.shape), value


class _Collect(Function):
    """Identity on the output layer's output that hands every auxiliary head its local-loss gradient."""

    @staticmethod
    def forward(ctx, out, step, weight, *aux):
        ctx.step, ctx.weight = step, weight
        ctx.aux = [a.detach() for a in aux]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        step: _Step = ctx.step
        targets = step.targets if step.targets is not None else recover_targets(grad.reshape(-1, grad.shape[-1]))
        grads = []
        step.losses = []
        for k, a in enumerate(ctx.aux):
            g, v = _local_grad(a, targets, ctx.weight)
            if k < len(step.sessions):  # direct layer_mode: block k's layers get e_k @ B
                step.sessions[k].receive_error(g.reshape(-1, g.shape[-1]))
            grads.append(g)
            step.losses.append(v)
        return (grad, None, None, *grads)


# --------------------------------------------------------------------------- the wrapper


class BlockwiseState:
    """Kept on the wrapped model as ``model._bio_ext_blockwise``."""

    def __init__(self, config: BlockwiseConfig, part: Partition, aux: nn.ModuleList, converted: bool):
        self.config = config
        self.partition = part
        self.aux = aux
        self.converted = converted
        self.handles: List[Any] = []
        self.step: Optional[_Step] = None
        self.pending: Optional[torch.Tensor] = None
        self.last_step: Optional[_Step] = None
        self.aux_prefix = AUX_NAME
        #: with a direct layer_mode: (rule, output_dim, one FeedbackBank per block)
        self.direct: Optional[Tuple[Any, int, List[Any]]] = None
        self.outer_session: Any = None

    def __getstate__(self):
        raise TypeError("a blockwise-wrapped model cannot be deep-copied or pickled: save model.state_dict(), or "
                        "bio_ext.revert(model) first and wrap the copy")


def _state(model: nn.Module) -> Optional[BlockwiseState]:
    return model.__dict__.get(_STATE)


def is_blockwise(model: nn.Module) -> bool:
    return _state(model) is not None


def _open_block_session(state: BlockwiseState, step: "_Step", block: int) -> None:
    """Direct layer_mode: make block ``block``'s feedback session current while the block runs."""
    from .session import FeedbackSession, _set_session
    if state.direct is None:
        return
    rule, output_dim, banks = state.direct
    if block < len(banks):
        session = FeedbackSession(banks[block], output_dim, rule)
        step.sessions.append(session)
        _set_session(session)
    else:  # the output layer: trained by the global loss, no session
        _set_session(None)


def _root_pre(state: BlockwiseState, module, args):
    if torch.is_grad_enabled() and module.training:
        state.step = state.last_step = _Step(state.pending)
        if state.direct is not None:
            from .session import current_session
            state.outer_session = current_session()
            _open_block_session(state, state.step, 0)
    else:
        state.step = None
    state.pending = None
    return None


def _root_post(state: BlockwiseState, module, args, output):
    if state.direct is not None and state.step is not None:
        from .session import _set_session
        _set_session(state.outer_session)
        state.outer_session = None
    state.step = None
    return None


def _boundary(state: BlockwiseState, index: int, module, args, kwargs):
    step = state.step
    if step is None:
        return None
    x, put = _first_tensor(args, kwargs)
    if x is None:
        return None
    a = state.aux[index](x)
    cfg = state.config
    if cfg.early_backward:
        if step.targets is None:
            raise FeedbackSignalError(
                "blockwise(early_backward=True) back-propagates each local loss inside the forward and needs the "
                "targets before it: call bio_ext.blockwise.set_targets(model, y) before model(x), or use "
                "bio_ext.blockwise.train_step(model, x, y, loss_fn, optimizer)")
        g, v = _local_grad(a, step.targets, cfg.local_weight)
        if index < len(step.sessions):
            step.sessions[index].receive_error(g.reshape(-1, g.shape[-1]))
        if a.requires_grad:
            a.backward(g)  # this block's graph (activations) is freed here
        step.losses.append(v)
        _open_block_session(state, step, index + 1)
        return put(x.detach())
    step.aux.append(a)
    _open_block_session(state, step, index + 1)
    return put(x.detach()) if cfg.isolate else None


def _head_post(state: BlockwiseState, module, args, output):
    step = state.step
    if step is None or not step.aux:
        return None
    from .convert import find_output
    tensor, put = find_output(output)
    collected = _Collect.apply(tensor, step, float(state.config.local_weight), *step.aux)
    step.aux = []
    return put(collected)


def set_targets(model: nn.Module, targets: torch.Tensor) -> None:
    """Give the next forward of a wrapped model its targets (class indices, one per output row; -100: none).

    Needed with ``early_backward=True`` and for global losses other than softmax cross-entropy;
    explicit targets always replace the ones recovered from the output error. For a language
    model whose loss shifts the labels (transformers' ``labels=``), pass the shifted targets
    (``labels[:, 1:]`` with ``-100`` appended), one per position of the logits.
    """
    state = _state(model)
    if state is None:
        raise ConversionError("set_targets: the model is not wrapped by bio_ext.blockwise; call blockwise(model) first")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        raise FeedbackSignalError("set_targets: targets must be an integer tensor of class indices (use -100 for "
                                  "rows without a target)")
    state.pending = targets.detach()


def local_losses(model: nn.Module) -> List[Optional[float]]:
    """The local losses (one per block) of the last training step, once its backward ran."""
    state = _state(model)
    if state is None:
        raise ConversionError("local_losses: the model is not wrapped by bio_ext.blockwise")
    return list(state.last_step.losses) if state.last_step is not None else []


def train_step(model: nn.Module, x: Any, y: torch.Tensor, loss_fn: Callable, optimizer=None) -> torch.Tensor:
    """One training step with explicit targets: ``set_targets``, forward, ``loss_fn(out, y).backward()``,
    and ``optimizer.step()`` (zeroing gradients first) when an optimizer is given. Returns the loss."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    state = _state(model)
    if state is not None:
        set_targets(model, y.reshape(-1) if y.dim() > 1 else y)
    out = _run(model, x)
    loss = loss_fn(out, y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


def blockwise(model: nn.Module, blocks: Optional[int] = None, *, config: Optional[BlockwiseConfig] = None,
              example_input: Any = None, aux_factory: Optional[Callable] = None, inplace: bool = False,
              **options: Any) -> nn.Module:
    """Wrap ``model`` for block-wise training with local losses (see the module docstring).

    Args:
        model: a torchvision ResNet/VGG/AlexNet/MobileNet/EfficientNet, an ``nn.Sequential``, a
            transformers model, or any model with ``units=[...]`` and ``head=...``.
        blocks: K, the number of blocks (default 4), or give ``splits=[...]``.
        config: a :class:`BlockwiseConfig` (keyword options override its fields).
        example_input: a small batch for the probe forward (default: guessed for known families).
        aux_factory: ``fn(block_output_shape, output_shape) -> nn.Module`` building custom
            auxiliary heads (shapes of the probe batch); default: :func:`_aux_head` with ``pool``.
        inplace: wrap ``model`` itself instead of a deep copy.
        **options: fields of :class:`BlockwiseConfig` (``isolate``, ``early_backward``, ``cost``,
            ``pool``, ``local_weight``, ``layer_mode``, ``splits``, ``units``, ``head``, ``seed``).

    Returns the wrapped model: its forward returns what the original returned; the auxiliary
    heads are the submodule ``bio_ext_aux_heads`` (so ``model.parameters()`` includes them);
    ``bio_ext.revert(model)`` removes them and every hook. The model is left unchanged on error.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"blockwise() expects a torch.nn.Module, got {type(model).__name__}")
    base = config.to_dict() if config is not None else {}
    if blocks is not None:
        base["blocks"] = blocks
    base.update(options)
    base.pop("mode", None)
    cfg = BlockwiseConfig(**base)
    if is_blockwise(model):
        raise ConversionError("the model is wrapped by bio_ext.blockwise already; call bio_ext.revert(model) first")
    from .convert import is_converted
    if is_converted(model):
        raise ConversionError("the model is converted by bio_ext.convert already; wrap the original model and pass "
                              "layer_mode=<mode> to blockwise() to convert the blocks' layers as well")
    part = partition(model, cfg.n_blocks if not cfg.splits else None, splits=cfg.splits, cost=cfg.cost,
                     units=cfg.units, head=cfg.head, example_input=example_input)
    out_shape = part.head_out_shape
    aux_list = []
    gen_ctx = torch.random.fork_rng(devices=[]) if cfg.seed is not None else _nullcontext()
    with gen_ctx:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for k in range(len(part.blocks)):
            shape = part.head_in_shape if k == len(part.blocks) - 1 else part.units[part.blocks[k + 1][0]].in_shape
            if shape is None:
                raise PartitionError(f"block {k + 2} starts at {part.block_entry(k + 1)!r}, whose input is not a "
                                     "tensor; pass splits=[...] naming other units")
            if aux_factory is not None:
                head = aux_factory(shape, out_shape)
            else:
                head, used = _aux_head(shape, out_shape, cfg.pool)
                rows_aux = (math.prod(shape[:-1]) if used == "token" else shape[0])
                rows_out = math.prod(out_shape[:-1])
                if rows_aux != rows_out:
                    raise ConfigError([f"pool: {used!r} gives {rows_aux} prediction rows for a probe batch whose "
                                       f"output has {rows_out}; use pool='token' for per-token outputs or 'mean'/"
                                       "'avg' for one prediction per example"], what="blockwise configuration")
            aux_list.append(head)
    p0 = next(model.parameters(), None)
    aux = nn.ModuleList(aux_list)
    if p0 is not None:
        aux = aux.to(device=p0.device, dtype=p0.dtype if p0.is_floating_point() else None)
    # everything that can fail has run: now modify (a copy of) the model
    work = model if inplace else copy.deepcopy(model)
    converted = False
    direct = None
    if cfg.layer_mode is not None:
        from .convert import convert
        from .modes import get_mode
        spec = get_mode(cfg.layer_mode)
        if spec.family == "direct":  # each block's layers get the projection of the block's own local error
            from .convert import _root_hook, _root_pre_hook
            from .session import FeedbackBank, input_tap_hook, output_hook, remove_hooks
            work = convert(work, cfg.layer_mode, inplace=True, exclude=[part.head], seed=cfg.seed,
                           output_layer=part.head, output_dim=out_shape[-1], error_at="output")
            remove_hooks(work, (_root_pre_hook, _root_hook))  # the blocks' sessions replace the global one
            head_mod = work.get_submodule(part.head)
            remove_hooks(head_mod, (output_hook, input_tap_hook))
            head_mod.__dict__.pop("_bio_ext_tap", None)
            direct = (spec.rule, out_shape[-1], [FeedbackBank() for _ in part.blocks])
        else:
            work = convert(work, cfg.layer_mode, inplace=True, exclude=[part.head], seed=cfg.seed)
        converted = True
    holder_name = _aux_holder(work, part.head)
    work.get_submodule(holder_name).add_module(AUX_NAME, aux)
    state = BlockwiseState(cfg, part, aux, converted)
    state.direct = direct
    state.aux_prefix = f"{holder_name}.{AUX_NAME}" if holder_name else AUX_NAME
    work.__dict__[_STATE] = state
    import functools
    state.handles.append(work.register_forward_pre_hook(functools.partial(_root_pre, state)))
    state.handles.append(work.register_forward_hook(functools.partial(_root_post, state), always_call=True))
    for k in range(1, len(part.blocks)):
        entry = work.get_submodule(part.block_entry(k))
        state.handles.append(entry.register_forward_pre_hook(functools.partial(_boundary, state, k - 1),
                                                             with_kwargs=True))
    head_mod = work.get_submodule(part.head)
    state.handles.append(head_mod.register_forward_pre_hook(functools.partial(_boundary, state, len(part.blocks) - 1),
                                                            with_kwargs=True))
    state.handles.append(head_mod.register_forward_hook(functools.partial(_head_post, state)))
    log.info("blockwise %s: %d blocks (%s, isolate=%s, early_backward=%s)\n%s", type(model).__name__,
             len(part.blocks), cfg.cost, cfg.isolate, cfg.early_backward, part.describe())
    return work


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _aux_holder(model: nn.Module, head: str) -> str:
    """Where the auxiliary heads are registered: the root, unless its forward runs all its children
    (nn.Sequential), then the output layer (a leaf layer whose forward ignores extra children)."""
    if not isinstance(model, _CONTAINERS):
        return ""
    if not isinstance(model.get_submodule(head), _CONTAINERS) and not list(model.get_submodule(head).children()):
        return head
    raise PartitionError(f"cannot register the auxiliary heads in {type(model).__name__}: its forward runs every "
                         f"child and the output layer {head!r} is a container too. Wrap the model in a module "
                         "whose forward calls it, and pass units=[...] and head=...")


def aux_prefix(model: nn.Module) -> str:
    """The qualified name of the auxiliary heads' ModuleList in a wrapped model (``bio_ext_aux_heads``, or
    ``<output layer>.bio_ext_aux_heads`` for an nn.Sequential)."""
    state = _state(model)
    if state is None:
        raise ConversionError("aux_prefix: the model is not wrapped by bio_ext.blockwise")
    return state.aux_prefix


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the hooks and auxiliary heads of :func:`blockwise` (in place); :func:`bio_ext.revert` calls it."""
    state = _state(model)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    holder = model.get_submodule(state.aux_prefix.rpartition(".")[0])
    if holder._modules.get(AUX_NAME) is state.aux:
        del holder._modules[AUX_NAME]
    model.__dict__.pop(_STATE, None)
    return model


def partition_of(model: nn.Module) -> Partition:
    """The :class:`Partition` a wrapped model was split with."""
    state = _state(model)
    if state is None:
        raise ConversionError("partition_of: the model is not wrapped by bio_ext.blockwise")
    return state.partition


# ``bio_ext.blockwise`` is this function at package level; these make ``bio_ext.blockwise.set_targets(...)`` work too
for _f in (set_targets, train_step, local_losses, partition, partition_of, unwrap, is_blockwise, recover_targets,
           aux_prefix):
    setattr(blockwise, _f.__name__, _f)
blockwise.BlockwiseConfig = BlockwiseConfig
del _f
