"""``nn.Conv2d`` with feedback: the autograd Functions, then the thin module, then its registration.

As for Linear, weight and bias gradients are the ordinary ones; the input gradient is the
transposed convolution with a weight-shaped feedback (FA family) or the kernel-shaped DFA
projection of the output error spread over the output grid (direct family).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from ..errors import ConversionError, FeedbackSignalError
from ..functional import (CONV_FEEDBACK, autocast_inputs, conv2d_input_grad, conv2d_param_grads,
                          conv_feedback_elements, conv_padding, conv_projection, coverage_matrix, factored_projection,
                          pad_input, project_flat)
from ..modes.base import FeedbackSpec, init_bound
from ..registry import ModeSpec, register_layer
from ..session import current_session
from .base import FeedbackLayer, feedback_path

#: most entries of a ``conv_feedback='dense'`` feedback per layer (2**26: 256 MiB in float32); beyond
#: it convert() refuses and names ``'factored'`` (see :class:`FeedbackConv2d`)
DENSE_MAX_ELEMENTS = 2 ** 26


class Conv2dLocalFn(Function):
    """``F.conv2d`` whose input gradient is the transposed convolution with ``feedback``."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.geom = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, feedback)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w, fb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need = ctx.needs_input_grad
        gx = conv2d_input_grad(g, x, fb.to(g.dtype), stride, padding, dilation, groups) if need[0] else None
        gw, gb = conv2d_param_grads(g, x, w, stride, padding, dilation, groups, need[1],
                                    ctx.has_bias and need[2])
        return gx, gw, gb, None, None, None, None, None


def direct_input_grad(p: torch.Tensor, x: torch.Tensor, spread, session) -> torch.Tensor:
    """A Conv2d's DFA input gradient (at its padded input ``x``) from its share ``p`` of the projection and what
    it registered (``spread``: see :func:`bio_ext.functional.conv_projection`), after the session's radial rule
    (:meth:`~bio_ext.session.FeedbackSession.shape_signal`, per example)."""
    if p.shape[0] != x.shape[0]:
        raise FeedbackSignalError(
            f"Conv2d: the output error has {p.shape[0]} rows but the layer's input has batch "
            f"{x.shape[0]}; direct feedback to a convolution needs one error row per example. "
            "Exclude this layer or use a local mode such as 'fa'.")
    gx = conv_projection(p, spread)  # kernel: spread_projection; dense/factored: see there
    return session.shape_signal(gx, x)


class Conv2dDirectFn(Function):
    """``F.conv2d`` whose input gradient is the layer's DFA projection.

    ``spread`` is ``(C_in, kh, kw, my, mx, scale)`` for the kernel shape (see
    :func:`bio_ext.functional.spread_projection`), or a tagged tuple for the dense and factored
    shapes (see :func:`bio_ext.functional.conv_projection`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, session, slot, stride, padding, dilation, groups, spread):
        ctx.geom = (stride, padding, dilation, groups)
        ctx.session, ctx.slot, ctx.spread, ctx.x_shape = session, slot, spread, x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need = ctx.needs_input_grad
        gx = direct_input_grad(ctx.session.take(ctx.slot), x, ctx.spread, ctx.session) if need[0] else None
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

    ``conv_feedback`` (direct family; :class:`~bio_ext.config.ConvertConfig`) picks the shape of
    ``B``. ``D`` is ``output_dim``, ``C`` the input channels, ``H x W`` the (padded) input grid
    the layer sees, ``kh x kw`` the kernel; memory per layer, in entries of ``B`` (GrAPE keeps a
    velocity of the same size, and the session's concatenation of the feedback a second copy of
    the matrix-shaped ones):

    * ``"kernel"`` (default): ``(D, C, kh, kw)``, ``D C kh kw`` entries, the error spread over the
      output grid as above (biotorch's design). Its projection is (nearly) constant over the grid,
      so it cannot represent a spatially varying gradient.
    * ``"dense"``: ``(D, C, H, W)``, ``D C H W`` entries: Nokland's DFA on the flattened activity,
      ``dx = (e @ B.reshape(D, -1)).reshape(N, C, H, W)``, in the session's one concatenated
      product like a Linear layer's feedback. Refused beyond :data:`DENSE_MAX_ELEMENTS` entries per
      layer (:class:`~bio_ext.errors.ConversionError` naming ``"factored"``).
    * ``"factored"``: ``B[d, c, h, w] = Bc[d, c] Bs[d, h, w]`` stored as one ``(D, C + H W)``
      buffer ``[Bc | Bs]``, ``D (C + H W)`` entries. ``dx`` is
      :func:`~bio_ext.functional.factored_projection` of the error (the layer's share of the
      session's product is the error itself, through a ``D x D`` identity), never forming ``B``;
      GrAPE's cosine step differentiates through the product, so it turns both factors. At
      initialisation ``Bc`` and ``Bs`` have equal norms and their product has the entry std of
      the dense shape's initialisation.

    ``dense`` and ``factored`` need the input grid when they are created: ``convert`` runs one
    probe forward of zeros of ``input_shape`` (a ConvertConfig field; the benchmark runner passes
    the dataset's) and creates the buffers then, so they are in ``state_dict`` before the first
    step and checkpoints load as for any other shape. A later input of another size is a
    :class:`~bio_ext.errors.FeedbackSignalError`. Only the direct family uses the option.
    """

    def __init__(self, original: nn.Conv2d, mode: ModeSpec) -> None:
        super().__init__(original, mode, original.weight, original.bias)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode", "_reversed_padding_repeated_twice", "output_padding"):
            setattr(self, attr, getattr(original, attr))
        self._pad, self._pad_mode, self._conv_pad = conv_padding(original)
        self._spread_cache: Dict[Tuple, Tuple] = {}
        self.conv_error = "norm"
        self.conv_feedback = "kernel"
        self.input_size: Optional[Tuple[int, int]] = None  # (H, W) of the padded input, dense/factored

    def setup_feedback(self, *, output_dim: Optional[int], init: str, scale: float,
                       generator: Optional[torch.Generator], conv_error: str = "norm",
                       conv_feedback: str = "kernel", input_size: Optional[Tuple[int, int]] = None, **_) -> None:
        kh, kw = self.kernel_size
        self.conv_error = conv_error
        if self.mode_spec.family == "direct" and conv_feedback != "kernel":
            self._setup_grid_feedback(output_dim, init, scale, generator, conv_feedback, input_size)
            return
        if self.mode_spec.family == "direct":
            k = self.in_channels * kh * kw
            spec = FeedbackSpec((output_dim, self.in_channels, kh, kw), k, output_dim, init, scale)
        else:
            fan_in = self.in_channels // self.groups * kh * kw
            spec = FeedbackSpec(tuple(self.weight.shape), fan_in, self.out_channels // self.groups * kh * kw,
                                init, scale)
        self._install_feedback(spec, generator)

    def _setup_grid_feedback(self, output_dim, init, scale, generator, shape, input_size) -> None:
        """Direct feedback of shape ``dense`` or ``factored`` on the padded input grid ``input_size``."""
        if shape not in CONV_FEEDBACK:
            raise ConversionError(f"conv_feedback={shape!r}: valid shapes are {', '.join(CONV_FEEDBACK)}")
        if input_size is None:
            raise ConversionError(
                f"conv_feedback={shape!r} needs the input grid of every Conv2d: pass input_shape=(C, H, W) "
                "(one example's shape) to convert(), or use conv_feedback='kernel'")
        h, w = (int(v) for v in input_size)
        if self._pad is not None:  # the layer pads explicitly: its feedback lives on the padded grid
            h, w = h + self._pad[2] + self._pad[3], w + self._pad[0] + self._pad[1]
        c, (kh, kw) = self.in_channels, self.kernel_size
        n = conv_feedback_elements(shape, output_dim, c, kh, kw, h, w)
        if shape == "dense" and n > DENSE_MAX_ELEMENTS:
            raise ConversionError(
                f"conv_feedback='dense' needs {n:,} feedback entries for a Conv2d on a {c}x{h}x{w} input "
                f"({n * 4 / 2 ** 20:.0f} MiB in float32, more than the {DENSE_MAX_ELEMENTS:,}-entry budget per "
                f"layer); use conv_feedback='factored' ({conv_feedback_elements('factored', output_dim, c, kh, kw, h, w):,} "
                "entries) or 'kernel', or exclude this layer")
        self.conv_feedback, self.input_size = shape, (h, w)
        fan_in = c * h * w
        if shape == "dense":
            spec = FeedbackSpec((output_dim, c, h, w), fan_in, output_dim, init, scale)
            self._install_feedback(spec, generator)
            return
        # factored: draw [Bc | Bs] with the dense entry std s, then rescale the factors so that their
        # norms are equal and their product has entry std s: std(Bc) = sqrt(s) (HW/C)^(1/4), std(Bs) = sqrt(s) (C/HW)^(1/4)
        spec = FeedbackSpec((output_dim, c + h * w), fan_in, output_dim, init, scale)
        self._install_feedback(spec, generator)
        s = init_bound(init, fan_in, output_dim) * scale
        ratio = (h * w / c) ** 0.25
        with torch.no_grad():
            fb = self.feedback
            fb[:, :c].mul_(ratio / s ** 0.5)
            fb[:, c:].mul_(1.0 / (ratio * s ** 0.5))
            for name in ("feedback_norm",):  # a rule's buffer that records the initial norm (GrAPE)
                if name in self._buffers:
                    self._buffers[name].copy_(fb.norm())

    def injected_gradient(self, p: torch.Tensor, x: torch.Tensor, info, session) -> torch.Tensor:
        return direct_input_grad(p, x, info, session)

    def projection_info(self, xp: torch.Tensor):
        """What this layer registers with the session (see :func:`bio_ext.functional.conv_projection`)."""
        if not xp.requires_grad:
            return None
        if self.conv_feedback == "kernel":
            return self._spread(xp)
        if tuple(xp.shape[-2:]) != self.input_size:
            raise FeedbackSignalError(
                f"Conv2d with conv_feedback={self.conv_feedback!r}: its feedback was built for a "
                f"{self.input_size[0]}x{self.input_size[1]} (padded) input grid but got "
                f"{xp.shape[-2]}x{xp.shape[-1]}; convert again with the right input_shape, or use "
                "conv_feedback='kernel', which takes any size")
        h, w = self.input_size
        if self.conv_feedback == "dense":
            return ("dense", self.in_channels, h, w)
        return ("factored", self.in_channels, h, w, self.feedback)

    def bank_matrix(self) -> torch.Tensor:
        if self.conv_feedback != "factored":
            return self.feedback
        fb = self.feedback  # the layer's share of the product is the error itself: e @ I
        eye = self.__dict__.get("_eye")
        if eye is None or eye.device != fb.device or eye.dtype != fb.dtype:
            eye = torch.eye(fb.shape[0], dtype=fb.dtype, device=fb.device)
            self.__dict__["_eye"] = eye
        return eye

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
        if family == "direct" and self.traces_direct() and torch.is_grad_enabled():  # torch.compile: see there
            xp = pad_input(x, self._pad, self._pad_mode)
            return F.conv2d(self.traced_input(xp), self.weight, self.bias, self.stride, self._conv_pad,
                            self.dilation, self.groups)
        session = current_session(self) if family == "direct" else None
        if family == "bp" or not (torch.is_grad_enabled() if family == "local" else feedback_path(session)):
            return nn.Conv2d._conv_forward(self, x, self.weight, self.bias)
        xp = pad_input(x, self._pad, self._pad_mode)
        geom = (self.stride, self._conv_pad, self.dilation, self.groups)
        if family == "local":
            xp, w, b = autocast_inputs(xp, self.weight, self.bias)
            return Conv2dLocalFn.apply(xp, w, b, self._local_feedback(), *geom)
        spread = self.projection_info(xp)
        slot, xp = self._direct_slot(session, xp, spread)
        xp, w, b = autocast_inputs(xp, self.weight, self.bias)
        if self.mode_spec.rule.forward_gradient:
            xp, tangent = fwAD.unpack_dual(xp)
            out = self.mode_spec.rule.primal_output(
                session, self, xp, lambda: Conv2dDirectFn.apply(xp, w, b, session, slot, *geom, spread))
            # the tangent computed here rather than by a custom Function's jvp (see FeedbackLinear.forward)
            return out if tangent is None else fwAD.make_dual(out, F.conv2d(tangent, w.detach(), None, *geom))
        return Conv2dDirectFn.apply(xp, w, b, session, slot, *geom, spread)

    def projection_kind(self, info=None) -> Optional[str]:
        if type(self).project_error is not FeedbackConv2d.project_error:
            return None
        if self.conv_feedback == "kernel":
            return "kernel" if isinstance(info, tuple) and len(info) == 6 else None
        if self.conv_feedback == "dense":
            return "flat"
        return "factored" if isinstance(info, tuple) and info and info[0] == "factored" else None

    def project_error(self, e: torch.Tensor, feedback: torch.Tensor, info=None) -> torch.Tensor:
        if self.conv_feedback == "factored":
            h, w = self.input_size
            return factored_projection(e, feedback, self.in_channels, h, w)
        return conv_projection(project_flat(e, feedback), info)


@register_layer(nn.Conv2d)
def _convert_conv2d(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackConv2d(module, mode)
