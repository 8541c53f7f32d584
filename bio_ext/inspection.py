"""Inspect what a mode feeds each layer: the injected input gradients and their alignment
with backprop's. Inspection runs on copies; the model, its feedback and its gradients are
left as they were."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import rng
from ._utils.outputs import find_output
from .convert import revert
from .layers.base import FeedbackLayer
from .registry import handler_for, methods

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _default_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def input_gradients(model: nn.Module, x, y, loss_fn: Optional[LossFn] = None) -> Dict[str, torch.Tensor]:
    """The gradient each Linear/Conv2d/Conv1D layer (plain or converted) hands to its input.

    For a plain model that is the gradient backprop transports through the layer's weights;
    for a converted model it is what the mode injects instead (``grad_output @ feedback``, or
    the projection of the output error). Layers whose input needs no gradient (the first) are
    left out. Keyed by qualified module name; only a layer's first call in the forward is kept.
    Runs one forward and backward on ``model`` itself (its ``.grad`` accumulate): pass a copy.
    """
    loss_fn = loss_fn or _default_loss
    seen: Dict[str, torch.Tensor] = {}

    def pre_hook(name):
        def hook(module, args):
            if name in seen or not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
                return None
            view = args[0].view_as(args[0])  # a node of its own: its grad is this layer's alone
            view.retain_grad()
            seen[name] = view
            return (view, *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in model.named_modules()
               if isinstance(m, FeedbackLayer) or handler_for(m) is not None]
    try:
        out, _ = find_output(model(x))
        loss_fn(out, y).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: v.grad.detach() for n, v in seen.items() if v.grad is not None}


@dataclass(frozen=True)
class LayerAlignment:
    """How one layer's learning signal compares with backprop's, on one batch. Angles in degrees
    (0: same direction, 90: orthogonal); ``None`` where the quantity does not apply.

    Attributes:
        update: angle between the weight gradient the mode produces (the ``.grad`` the
            optimizer steps on) and the true backprop gradient of that weight.
        signal: angle between the gradient the mode hands to the layer's *input* (what it
            injects instead of transporting it through the weights) and backprop's; ``None``
            for layers whose input needs no gradient (the first layer).
        cosine: the cosine of ``signal`` (what ``alignment`` returned before it returned angles).
        feedback: angle between the feedback tensor and the forward weight (biotorch's
            layer alignment); local family (``fa``, ``usf``, ...) and ``bp`` (always 0) only.
        norm_ratio: ``||feedback|| / ||weight||`` (biotorch's weight ratio); same layers.
        estimate: GrAPE only: angle between the layer's forward-gradient estimate (one
            activity-perturbed directional derivative) and backprop's input gradient.
    """

    update: Optional[float]
    signal: Optional[float] = None
    cosine: Optional[float] = None
    feedback: Optional[float] = None
    norm_ratio: Optional[float] = None
    estimate: Optional[float] = None

    def as_dict(self) -> Dict[str, float]:
        """The quantities that apply, by name (for logging)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _cos(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    if a.numel() != b.numel():
        return None
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return max(-1.0, min(1.0, float((a @ b) / (na * nb))))


def _deg(c: Optional[float]) -> Optional[float]:
    return None if c is None else math.degrees(math.acos(c))


def _layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FeedbackLayer) or handler_for(m) is not None}


def alignment(model: nn.Module, x, y, loss_fn: Optional[LossFn] = None) -> Dict[str, LayerAlignment]:
    """Per-layer alignment of what the mode trains with against true backprop, on batch ``(x, y)``.

    Returns ``{qualified layer name: LayerAlignment}`` (angles in degrees, see
    :class:`LayerAlignment`) for every converted layer (or every Linear/Conv2d/Conv1D of a plain
    model). Everything runs on deep copies of ``model``: one forward/backward of the converted copy
    (the mode's gradients; GrAPE's feedback step is switched off there and its estimate kept) and
    one of a reverted copy (backprop's gradients). The global torch RNG state (CPU and CUDA) is
    restored afterwards, so the modes that draw random numbers in their forward or backward (GrAPE's
    perturbations, brsf's feedback) leave training exactly as it would have been without the call;
    the model, its feedback buffers and its ``.grad`` are untouched. Dropout draws differ between
    the two passes: call it in ``eval()`` mode for models with dropout.

    For a model wrapped by a whole-model method that measures itself (``bwbpf``:
    :func:`bio_ext.blockwise.local_alignment`), that measure: ``update`` only, the angle between a layer's
    local-loss gradient and the end-to-end backprop gradient of ``loss_fn``.
    """
    state = rng.capture(all_cuda=True)
    try:
        for method in methods():  # a whole-model method's own measure (block-wise: local vs global gradient)
            own = method.alignment(model, x, y, loss_fn or _default_loss) if method.alignment else None
            if own is not None:
                return {n: LayerAlignment(**{"update": None, **qs}) for n, qs in own.items()}
        probe = copy.deepcopy(model)
        for p in probe.parameters():
            p.grad = None
        for layer in probe.modules():
            if isinstance(layer, FeedbackLayer):
                layer.mode_options = layer.mode_spec.rule.probe_options(layer.mode_options)
                layer.__dict__.pop("forward_gradient", None)
        injected = input_gradients(probe, x, y, loss_fn)
        layers = _layers(probe)
        mode_grads = {n: (m.weight.grad.detach().clone() if m.weight.grad is not None else None)
                      for n, m in layers.items()}
        extra = {}
        for n, m in layers.items():
            if not isinstance(m, FeedbackLayer):
                continue
            fb = m.feedback if m.mode_spec.family != "direct" else None
            if fb is not None and fb.shape == m.weight.shape:
                extra[n] = {"feedback": _deg(_cos(fb, m.weight)),
                            "norm_ratio": float(fb.detach().norm() / m.weight.detach().norm())}
            est = m.__dict__.get("forward_gradient")
            if est is not None:
                extra.setdefault(n, {})["_est"] = est
        plain = revert(probe)  # a reverted copy
        for p in plain.parameters():
            p.grad = None
        true_in = input_gradients(plain, x, y, loss_fn)
        plain_layers = _layers(plain)
    finally:
        rng.restore(state)
    out: Dict[str, LayerAlignment] = {}
    for n, m in layers.items():
        tw = plain_layers[n].weight.grad if n in plain_layers else None
        g = mode_grads.get(n)
        update = _deg(_cos(g, tw)) if g is not None and tw is not None else None
        cos = _cos(injected[n], true_in[n]) if n in injected and n in true_in else None
        e = extra.get(n, {})
        est = e.get("_est")
        out[n] = LayerAlignment(update=update, signal=_deg(cos), cosine=cos, feedback=e.get("feedback"),
                                norm_ratio=e.get("norm_ratio"),
                                estimate=_deg(_cos(est, true_in[n])) if est is not None and n in true_in else None)
    return out
