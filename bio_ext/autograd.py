"""Custom autograd Functions: forward is the ordinary op, backward injects feedback.

Weight and bias gradients are always the ordinary ones, computed from the
layer's own ``grad_output``. Only the input gradient changes:

* ``*LocalFn`` (FA family): ``grad_output`` times a weight-shaped feedback.
* ``*DirectFn`` (DFA family): the session's projection ``e @ B`` of the output error.

The input gradient is computed only when autograd asks for it, so the first
layer (whose input is data) pays for no projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .errors import FeedbackSignalError
from .functional import (conv2d_input_grad, conv2d_param_grads, linear_param_grads,
                         spread_projection)


def fit_rows(p: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """Reshape a ``(N, K)`` projection onto a layer input of ``shape`` (last dim K).

    Exact when the input has N rows; when the input has more positions per example
    than the output (e.g. tokens before a pooled classifier), the projection is
    spread evenly over them (the adjoint of mean pooling).
    """
    n = p.shape[0]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    if rows == n:
        return p.reshape(shape)
    if len(shape) >= 3 and shape[0] == n and rows % n == 0:
        r = rows // n
        view = p.reshape((n,) + (1,) * (len(shape) - 2) + (shape[-1],))
        return (view / r).expand(shape)
    raise FeedbackSignalError(
        f"{what}: the output error has {n} rows but this layer's input {tuple(shape)} has {rows}; "
        "direct feedback needs one error row per input row (or per example, with the batch as the "
        "first dimension). Exclude this layer from conversion or use a local mode such as 'fa'.")


class LinearLocalFn(Function):
    """``F.linear`` whose input gradient is ``grad_output @ feedback``."""

    @staticmethod
    def forward(x, weight, bias, feedback):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, feedback)

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


class LinearDirectFn(Function):
    """``F.linear`` whose input gradient is the session's projection of the output error."""

    @staticmethod
    def forward(x, weight, bias, session, slot, transposed=False):
        return linear(x, weight, bias, transposed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, session, slot = inputs[:5]
        ctx.transposed = len(inputs) > 5 and inputs[5]
        ctx.has_bias = bias is not None
        ctx.session, ctx.slot, ctx.x_shape = session, slot, x.shape
        ctx.w_fwd = weight
        ctx.save_for_backward(x)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _session, _slot, _transposed=None):
        # forward-mode tangents flow through the layer (weights carry none: activity perturbation)
        return linear(x_t, ctx.w_fwd.detach(), None, ctx.transposed)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = None
        if need[0]:
            gx = fit_rows(ctx.session.take(ctx.slot), ctx.x_shape, "Linear")
        gw, gb = linear_param_grads(g, x, need[1], ctx.has_bias and need[2], ctx.transposed)
        return gx, gw, gb, None, None, None


class Conv2dLocalFn(Function):
    """``F.conv2d`` whose input gradient is the transposed convolution with ``feedback``."""

    @staticmethod
    def forward(x, weight, bias, feedback, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, stride, padding, dilation, groups = inputs
        ctx.geom = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, feedback)

    @staticmethod
    def backward(ctx, g):
        x, w, fb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need = ctx.needs_input_grad
        gx = conv2d_input_grad(g, x, fb.to(g.dtype), stride, padding, dilation, groups) if need[0] else None
        gw, gb = conv2d_param_grads(g, x, w, stride, padding, dilation, groups, need[1],
                                    ctx.has_bias and need[2])
        return gx, gw, gb, None, None, None, None, None


class Conv2dDirectFn(Function):
    """``F.conv2d`` whose input gradient is the kernel-shaped DFA projection.

    ``spread`` is ``(C_in, kh, kw, my, mx, scale)``: see
    :func:`bio_ext.functional.spread_projection`.
    """

    @staticmethod
    def forward(x, weight, bias, session, slot, stride, padding, dilation, groups, spread):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, session, slot, stride, padding, dilation, groups, spread = inputs
        ctx.geom = (stride, padding, dilation, groups)
        ctx.session, ctx.slot, ctx.spread, ctx.x_shape = session, slot, spread, x.shape
        ctx.has_bias = bias is not None
        ctx.w_fwd = weight
        ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, _session, _slot, _stride, _padding, _dilation, _groups, _spread):
        stride, padding, dilation, groups = ctx.geom
        return F.conv2d(x_t, ctx.w_fwd.detach(), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need = ctx.needs_input_grad
        gx = None
        if need[0]:
            p = ctx.session.take(ctx.slot)
            if p.shape[0] != ctx.x_shape[0]:
                raise FeedbackSignalError(
                    f"Conv2d: the output error has {p.shape[0]} rows but the layer's input has batch "
                    f"{ctx.x_shape[0]}; direct feedback to a convolution needs one error row per example. "
                    "Exclude this layer or use a local mode such as 'fa'.")
            gx = spread_projection(p, ctx.spread)
        gw, gb = conv2d_param_grads(g, x, w, stride, padding, dilation, groups, need[1],
                                    ctx.has_bias and need[2])
        return gx, gw, gb, None, None, None, None, None, None, None
