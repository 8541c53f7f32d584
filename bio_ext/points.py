"""Feedback points: direct feedback injected at a module's output (macro/micro granularity).

The per-layer granularity (``convert``'s default) injects the projected error at
the input of every converted layer. The coarser granularities of the DFA-at-scale
work on Transformers (Launay et al. 2020, used by the GrAPE seed's Table 3) keep
ordinary backprop *inside* a unit and inject ``B_k e`` at its output instead:

``macro``
    one point at the output of every transformer block (the repeated modules of
    the model's main stack: ``transformer.h``, ``encoder.layer``, ``model.layers``,
    ``encoder.layers``, ...).
``micro``
    a point at the output of each block's attention sub-layer and MLP sub-layer,
    and at the block output, so no gradient travels from one block to the
    previous one along the residual stream either. Backprop still runs through the
    attention mechanism itself, as in Launay et al. (their Appendix D).

At a point, the module's output gets the projection ``e @ B_k`` as its gradient
(broadcast over tokens when ``e`` has one row per example) instead of the gradient
from above: the model continues from a detached copy of the output, and the output
itself is an extra input of the error tap, whose backward hands it ``e @ B_k``
(:class:`bio_ext.session.ErrorTap`). So every block's backward starts from the tap
on its own (no backward locking between blocks), and no gradient is computed into a
block's input only to be discarded. The loss must be computed from the model's
output, through the tapped layer, as for every direct mode. In GrAPE mode the
forward adds the perturbation to the tangent at that
same tensor, so the forward-gradient estimate is of the gradient the feedback
stands for. The feedback tensors are buffers of the module named
``bio_ext_feedback`` (and, for GrAPE, ``bio_ext_feedback_velocity`` etc.), so
``state_dict`` carries them; ``revert`` removes them. The point itself is bound to the host's
forward hook (no attribute is written into the host module).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from ._utils.hooks import remove_hooks
from ._utils.outputs import find_output
from .errors import ConfigError, FeedbackSignalError
from .functional import project_flat
from .modes.base import FeedbackSpec
from .registry import ModeSpec, handler_for, output_size
from .session import LateInjection, current_session

#: class names of attention modules (a block's attention sub-layer; convert refuses unknown ones)
ATTENTION_NAME = re.compile(r"attention|attn", re.I)
_MLP = re.compile(r"mlp|feedforward|feed_forward|ffn", re.I)


class FeedbackPoint:
    """The feedback of one point. Its tensors are buffers of the host module named ``bio_ext_<name>``
    (``bio_ext_feedback`` is ``(output_dim, width)``), so ``state_dict``, ``.to()`` and deep copies
    carry them; the point itself is bound to the host's forward hook, not a child module, so
    containers such as ``nn.Sequential`` that call their children are not changed."""

    PREFIX = "bio_ext_"

    def __init__(self, host: nn.Module, mode: ModeSpec, width: int, output_dim: int, init: str, scale: float,
                 generator: Optional[torch.Generator], options: Dict[str, Any], like: torch.Tensor) -> None:
        d = self.__dict__
        d["host"], d["mode_spec"], d["mode_options"], d["width"] = host, mode, dict(options), width
        spec = FeedbackSpec((output_dim, width), width, output_dim, init, scale)
        for name, t in mode.rule.create(like.detach(), spec, generator).items():
            host.register_buffer(self.PREFIX + name, t, persistent=name not in mode.rule.transient_buffers)

    def __getattr__(self, name: str):
        host = self.__dict__.get("host")
        buffers = host._buffers if host is not None else {}
        if self.PREFIX + name in buffers:
            return buffers[self.PREFIX + name]
        raise AttributeError(f"feedback point has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        buffers = self.__dict__["host"]._buffers
        if self.PREFIX + name in buffers:
            buffers[self.PREFIX + name] = value
        else:
            self.__dict__[name] = value

    @property
    def mode(self) -> str:
        return self.mode_spec.name

    #: ``e @ B_k``: a point's feedback acts on the output's last dimension
    project_error = staticmethod(project_flat)

    def inject(self, out: torch.Tensor) -> torch.Tensor:
        session = current_session(self.host)
        if session is None or not (out.requires_grad or session.tangent_only):
            return out
        if session.closed:
            return self._recomputed(session, out)
        if out.shape[-1] != self.width:
            raise FeedbackSignalError(
                f"a feedback point was built for outputs of width {self.width} but its module returned "
                f"{tuple(out.shape)}; pass points=[...] naming modules whose output's last dimension is the "
                "hidden size")
        slot, out = session.enter(self, out)
        if slot < 0:
            return out
        primal, tangent = fwAD.unpack_dual(out)
        session.point_outputs.append(primal)  # fed e @ B_k by the error tap's backward
        session.point_slots.append(slot)
        cut = primal.detach()  # the model goes on from here: nothing flows back into the point
        return cut if tangent is None else fwAD.make_dual(cut, tangent)

    def _recomputed(self, session, out: torch.Tensor) -> torch.Tensor:
        """The point's tensor recomputed by activation checkpointing during the backward (see
        :meth:`bio_ext.session.FeedbackSession.close`). Injected in the forward (non-reentrant): the model goes
        on from a detached copy, as it did then, so the recompute saves what the forward saved. Never injected
        (a reentrant segment ran under no_grad): the recomputed graph gets the projection here."""
        if any(p is self for p in session.layers):
            return out.detach()
        return LateInjection.apply(out, session, session.register_layer(self))

    def __repr__(self) -> str:
        return f"FeedbackPoint(width={self.width}, mode={self.mode})"


def point_hook(point: FeedbackPoint, module: nn.Module, args, output):
    """Forward hook of a point's host (bound to the point): injects at the host's output."""
    if current_session(module) is None:
        return None
    tensor, put = find_output(output)
    return put(point.inject(tensor))


def point_of(module: nn.Module) -> Optional[FeedbackPoint]:
    """The feedback point whose hook is on ``module``, if any."""
    for hook in module._forward_hooks.values():
        if isinstance(hook, functools.partial) and hook.func is point_hook:
            return hook.args[0]
    return None


# --------------------------------------------------------------------------- discovery


def _last_layer_width(module: nn.Module) -> Optional[int]:
    """Out size of the last Linear/Conv1D registered in ``module`` (a transformer unit's output width)."""
    width = None
    for m in module.modules():
        size = output_size(m)
        if size is not None:
            width = size
    return width


def find_blocks(model: nn.Module, min_blocks: int = 2) -> List[str]:
    """The repeated blocks of the model's main stack: the children of the ModuleList/Sequential
    with at least ``min_blocks`` children of one class holding layers, the one with most parameters
    (``transformer.h.0``, ``transformer.h.1``, ...). Block-wise training finds its spine with it too."""
    best: Tuple[int, List[str]] = (0, [])
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < max(min_blocks, 1):
            continue
        kids = list(mod.named_children())
        if len({type(m) for _, m in kids}) != 1 or handler_for(kids[0][1]) is not None:
            continue
        if _last_layer_width(kids[0][1]) is None:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best[0]:
            best = (size, [f"{name}.{k}" if name else k for k, _ in kids])
    return best[1]


def sublayers(block: nn.Module, prefix: str) -> List[str]:
    """The attention and MLP sub-layers of a transformer block (direct children)."""
    kids = [(n, m) for n, m in block.named_children() if _last_layer_width(m) is not None]
    attn = next((n for n, m in kids if ATTENTION_NAME.search(type(m).__name__)
                 or isinstance(m, nn.MultiheadAttention)), None)
    mlp = next((n for n, m in kids if n != attn and _MLP.search(type(m).__name__)), None)
    if mlp is None:  # e.g. BERT's intermediate/output, nn.TransformerEncoderLayer's linear2
        rest = [n for n, _ in kids if n != attn]
        mlp = rest[-1] if rest else None
    return [f"{prefix}.{n}" for n in (attn, mlp) if n is not None]


def plan_points(model: nn.Module, granularity: str, explicit: Sequence[str]) -> List[Tuple[str, int]]:
    """``(module name, output width)`` of every feedback point, in forward order of the model's modules."""
    if explicit:
        names = list(explicit)
        missing = [n for n in names if not _has(model, n)]
        if missing:
            raise ConfigError([f"points: {n!r} is not a submodule of {type(model).__name__}" for n in missing],
                              what="feedback points")
    else:
        blocks = find_blocks(model)
        if not blocks:
            raise ConfigError(
                [f"granularity={granularity!r}: found no repeated transformer blocks in {type(model).__name__} "
                 "(a ModuleList/Sequential of identical modules holding Linear layers); pass points=[...] with the "
                 "names of the modules whose outputs get feedback"], what="feedback points")
        names = []
        for b in blocks:
            if granularity == "micro":
                names += sublayers(model.get_submodule(b), b)
            names.append(b)
    out, problems = [], []
    for n in names:
        width = _last_layer_width(model.get_submodule(n))
        if width is None:
            problems.append(f"points: {n!r} holds no Linear/Conv1D layer, so its output width is unknown")
        out.append((n, width))
    if problems:
        raise ConfigError(problems, what="feedback points")
    return out


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def install(model: nn.Module, plan: Sequence[Tuple[str, int]], mode: ModeSpec, output_dim: int, init: str,
            scale: float, generator: Optional[torch.Generator], options: Dict[str, Any]) -> List[str]:
    like = next(model.parameters())
    for name, width in plan:
        mod = model.get_submodule(name)
        point = FeedbackPoint(mod, mode, width, output_dim, init, scale, generator, options, like)
        mod.register_forward_hook(functools.partial(point_hook, point))
    return [n for n, _ in plan]


def uninstall(model: nn.Module) -> None:
    for mod in model.modules():
        if point_of(mod) is not None:
            for k in [k for k in mod._buffers if k.startswith(FeedbackPoint.PREFIX)]:
                del mod._buffers[k]
            remove_hooks(mod, (point_hook,))


def feedback_points(model: nn.Module) -> List[Tuple[str, FeedbackPoint]]:
    """The feedback points of a model converted with granularity macro/micro, by host module name."""
    return [(n, point_of(m)) for n, m in model.named_modules() if point_of(m) is not None]
