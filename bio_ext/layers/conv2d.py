"""``nn.Conv2d`` with feedback: the autograd Functions, then the thin module, then its registration.

As for Linear, weight and bias gradients are the ordinary ones; the input gradient is the
transposed convolution with a weight-shaped feedback (FA family) or the kernel-shaped DFA
projection of the output error spread over the output grid (direct family).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from ..errors import FeedbackSignalError
from ..functional import (conv2d_input_grad, conv2d_param_grads, conv_padding, coverage_matrix, pad_input,
                          project_flat, spread_projection)
from ..modes.base import FeedbackSpec
from ..registry import ModeSpec, register_layer
from ..session import current_session
from .base import FeedbackLayer, feedback_path


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


class FeedbackConv2d(FeedbackLayer):
    """``nn.Conv2d`` with feedback. All of stride, padding (ints, 'same', 'valid'),
    dilation, groups, bias=False and every padding_mode are supported.

    Direct family: ``feedback`` has shape ``(output_dim, C_in, kh, kw)``. The input
    gradient is the transposed convolution, with ``feedback`` as kernel, of the
    output error spread uniformly over the output grid: ``e / sqrt(H_out W_out)`` at
    every output position by default (``conv_error="norm"``: the spread error has the
    norm of ``e``, whatever the grid size), ``e / (H_out W_out)`` with ``"mean"`` (the
    adjoint of global average pooling) or ``e`` with ``"sum"`` (biotorch's broadcast,
    whose gradients grow with the grid size).
    """

    def __init__(self, original: nn.Conv2d, mode: ModeSpec) -> None:
        super().__init__(original, mode, original.weight, original.bias)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode", "_reversed_padding_repeated_twice", "output_padding"):
            setattr(self, attr, getattr(original, attr))
        self._pad, self._pad_mode, self._conv_pad = conv_padding(original)
        self._spread_cache: Dict[Tuple, Tuple] = {}
        self.conv_error = "norm"

    def setup_feedback(self, *, output_dim: Optional[int], init: str, scale: float,
                       generator: Optional[torch.Generator], conv_error: str = "norm", **_) -> None:
        kh, kw = self.kernel_size
        self.conv_error = conv_error
        if self.mode_spec.family == "direct":
            k = self.in_channels * kh * kw
            spec = FeedbackSpec((output_dim, self.in_channels, kh, kw), k, output_dim, init, scale)
        else:
            fan_in = self.in_channels // self.groups * kh * kw
            spec = FeedbackSpec(tuple(self.weight.shape), fan_in, self.out_channels // self.groups * kh * kw,
                                init, scale)
        self._install_feedback(spec, generator)

    def _layer_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, padding_mode={self.padding_mode}")

    def _spread(self, xp: torch.Tensor):
        h, w = xp.shape[-2:]
        key = (h, w, xp.device)
        hit = self._spread_cache.get(key)
        if hit is None:
            (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel_size, self.stride, self.dilation, self._conv_pad
            ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            my = coverage_matrix(h, ho, kh, sh, ph, dh, device=xp.device, dtype=torch.float32)
            mx = coverage_matrix(w, wo, kw, sw, pw, dw, device=xp.device, dtype=torch.float32)
            scale = {"norm": (ho * wo) ** -0.5, "mean": 1.0 / (ho * wo), "sum": 1.0}[self.conv_error]
            hit = (self.in_channels, kh, kw, my, mx, scale)
            self._spread_cache[key] = hit
        return hit

    def _apply(self, fn, recurse=True):
        self._spread_cache = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        family = self.mode_spec.family
        session = current_session() if family == "direct" else None
        if family == "bp" or not (torch.is_grad_enabled() if family == "local" else feedback_path(session)):
            return nn.Conv2d._conv_forward(self, x, self.weight, self.bias)
        xp = pad_input(x, self._pad, self._pad_mode)
        geom = (self.stride, self._conv_pad, self.dilation, self.groups)
        if family == "local":
            return Conv2dLocalFn.apply(xp, self.weight, self.bias, self._local_feedback(), *geom)
        spread = self._spread(xp) if xp.requires_grad else None
        slot, xp = self._direct_slot(session, xp, spread)
        return Conv2dDirectFn.apply(xp, self.weight, self.bias, session, slot, *geom, spread)

    def project_error(self, e: torch.Tensor, feedback: torch.Tensor, info=None) -> torch.Tensor:
        return spread_projection(project_flat(e, feedback), info)


@register_layer(nn.Conv2d)
def _convert_conv2d(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackConv2d(module, mode)
