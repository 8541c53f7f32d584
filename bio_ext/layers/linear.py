"""``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``(in, out)``) with feedback: the
autograd Functions, then the thin module, then their registration.

Weight and bias gradients are always the ordinary ones, computed from the layer's own
``grad_output``; only the input gradient changes:

* :class:`LinearLocalFn` (FA family): ``grad_output @ feedback`` instead of ``grad_output @ W``;
* :class:`LinearDirectFn` (DFA family): the session's projection ``e @ B`` of the output error.

The input gradient is computed only when autograd asks for it, so the first layer (whose
input is data) pays for no projection.

The Functions of bio_ext take ``ctx`` in ``forward`` rather than defining ``setup_context``: torch binds the
arguments of a ``setup_context`` Function with ``inspect.signature`` on every call, which cost 55 µs per layer per
step on the 2-core CPU (BENCHMARKS.md, "GrAPE's speed, second round"); tests/test_architecture.py keeps it so.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from ..functional import autocast_inputs, fit_rows, linear_param_grads
from ..modes.base import FeedbackSpec
from ..registry import ModeSpec, register_layer
from ..session import current_session
from .base import FeedbackLayer, feedback_path


class LinearLocalFn(Function):
    """``F.linear`` whose input gradient is ``grad_output @ feedback``."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, fb = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = g.matmul(fb.to(g.dtype)) if need[0] else None
        gw, gb = linear_param_grads(g, x, need[1], ctx.has_bias and need[2])
        return gx, gw, gb, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    """``x @ W^T + b``, or for a weight stored ``(in, out)`` (transformers Conv1D) ``x @ W + b``."""
    if not transposed:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, x2, weight) if bias is not None else x2.mm(weight)
    return out.view(x.shape[:-1] + (weight.shape[1],))


def direct_input_grad(p: torch.Tensor, x: torch.Tensor, session) -> torch.Tensor:
    """A Linear's DFA input gradient from its share ``p`` of the projection, after the session's radial rule
    (:meth:`~bio_ext.session.FeedbackSession.shape_signal`; ``drop`` works per row, example or token)."""
    return session.shape_signal(fit_rows(p, x.shape, "Linear"), x, lead=x.dim() - 1)


class LinearDirectFn(Function):
    """``F.linear`` whose input gradient is the session's projection of the output error."""

    @staticmethod
    def forward(ctx, x, weight, bias, session, slot, transposed=False):
        ctx.transposed = transposed
        ctx.has_bias = bias is not None
        ctx.session, ctx.slot, ctx.x_shape = session, slot, x.shape
        ctx.save_for_backward(x)
        return linear(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = direct_input_grad(ctx.session.take(ctx.slot), x, ctx.session) if need[0] else None
        gw, gb = linear_param_grads(g, x, need[1], ctx.has_bias and need[2], ctx.transposed)
        return gx, gw, gb, None, None, None


class FeedbackLinear(FeedbackLayer):
    """``nn.Linear`` (or transformers' ``Conv1D`` when ``transposed``) with feedback.

    For Conv1D the weight is stored ``(in, out)``; ``feedback`` in the local family
    has that same shape.
    """

    def __init__(self, original: nn.Module, mode: ModeSpec, *, transposed: bool = False) -> None:
        super().__init__(original, mode, original.weight, original.bias)
        self.transposed = transposed
        if transposed:
            self.in_features, self.out_features = original.weight.shape
        else:
            self.in_features, self.out_features = original.in_features, original.out_features

    def setup_feedback(self, *, output_dim: Optional[int], init: str, scale: float,
                       generator: Optional[torch.Generator], **_) -> None:
        if self.mode_spec.family == "direct":
            spec = FeedbackSpec((output_dim, self.in_features), self.in_features, output_dim, init, scale)
        else:
            spec = FeedbackSpec(tuple(self.weight.shape), self.in_features, self.out_features, init, scale)
        self._install_feedback(spec, generator)

    def _layer_repr(self) -> str:
        kind = "Conv1D, " if self.transposed else ""
        return f"{kind}in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def injected_gradient(self, p: torch.Tensor, x: torch.Tensor, info, session) -> torch.Tensor:
        return direct_input_grad(p, x, session)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        family = self.mode_spec.family
        if family == "direct" and self.traces_direct():  # torch.compile: plain ops, the tap injects e @ B
            return linear(self.traced_input(x) if torch.is_grad_enabled() else x, self.weight, self.bias,
                          self.transposed)
        if family == "local" and torch.is_grad_enabled():
            fb = self._local_feedback()
            x, w, b = autocast_inputs(x, self.weight.t() if self.transposed else self.weight, self.bias)
            return LinearLocalFn.apply(x, w, b, fb.t() if self.transposed else fb)
        session = current_session(self) if family == "direct" else None
        if family != "direct" or not feedback_path(session):
            return linear(x, self.weight, self.bias, self.transposed)  # Conv1D: exactly transformers' forward
        slot, x = self._direct_slot(session, x)
        x, w, b = autocast_inputs(x, self.weight, self.bias)
        if self.mode_spec.rule.forward_gradient:
            x, tangent = fwAD.unpack_dual(x)
            out = self.mode_spec.rule.primal_output(
                session, self, x, lambda: LinearDirectFn.apply(x, w, b, session, slot, self.transposed))
            # the forward-mode tangent of the layer (the weights carry none: activity perturbation), computed here
            # rather than by a custom Function's jvp: forward AD would materialise zero tangents for the weight
            # and bias of every layer it runs through
            return out if tangent is None else fwAD.make_dual(out, linear(tangent, w.detach(), None, self.transposed))
        return LinearDirectFn.apply(x, w, b, session, slot, self.transposed)


@register_layer(nn.Linear, output_size=lambda m: m.out_features)
def _convert_linear(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackLinear(module, mode)


@register_layer("transformers.pytorch_utils.Conv1D", output_size=lambda m: m.weight.shape[1])
def _convert_conv1d(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackLinear(module, mode, transposed=True)
