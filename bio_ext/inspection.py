"""Inspect what a mode feeds each layer: the injected input gradients and their alignment
with backprop's. Inspection runs on copies; the model, its feedback and its gradients are
left as they were."""

from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convert import _handler_for, find_output, revert
from .layers import FeedbackLayer

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
               if isinstance(m, FeedbackLayer) or _handler_for(m) is not None]
    try:
        out, _ = find_output(model(x))
        loss_fn(out, y).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: v.grad.detach() for n, v in seen.items() if v.grad is not None}


def alignment(model: nn.Module, x, y, loss_fn: Optional[LossFn] = None) -> Dict[str, float]:
    """Per-layer cosine between the input gradient the mode injects and backprop's.

    Computed on copies of ``model`` with the same weights, so nothing leaks into training
    (GrAPE's feedback step is switched off in the copy). 1.0 means the layer receives exactly
    backprop's signal; DFA with random feedback starts near 0. For models with dropout, call
    it in ``eval()`` mode so both passes see the same network.
    """
    probe = copy.deepcopy(model)
    for layer in probe.modules():
        if isinstance(layer, FeedbackLayer) and layer._mode.rule.forward_gradient:
            layer.__dict__["_mode_options"] = {**layer.__dict__.get("_mode_options", {}), "feedback_lr": 0.0}
    injected = input_gradients(probe, x, y, loss_fn)
    true = input_gradients(revert(probe), x, y, loss_fn)
    return {n: F.cosine_similarity(g.reshape(-1), true[n].reshape(-1), dim=0).item()
            for n, g in injected.items() if n in true}

