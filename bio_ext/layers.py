"""Thin feedback-aware modules. They hold the original parameter tensors, the
feedback buffers of their mode, and call the autograd Functions."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .autograd import Conv2dDirectFn, Conv2dLocalFn, LinearDirectFn, LinearLocalFn, linear
from .errors import FeedbackSignalError
from .functional import conv_padding, coverage_matrix, pad_input, spread_projection
from .modes import FeedbackSpec, ModeSpec
from .session import copy_hooks, current_session, output_hook


def _shell(module: nn.Module) -> nn.Module:
    """A parameter-free shallow copy of ``module``, kept to rebuild it on revert."""
    shell = copy.copy(module)
    shell._parameters = OrderedDict()
    shell._buffers = OrderedDict(module._buffers)
    shell._modules = OrderedDict()
    return shell


class FeedbackLayer(nn.Module):
    """Common part of the converted layers.

    ``feedback`` is the tensor the backward uses in place of the transported
    weights (in ``bp`` mode it is the weight itself). ``mode`` is the mode's name.
    """

    def __init__(self, original: nn.Module, mode: ModeSpec, weight: nn.Parameter,
                 bias: Optional[nn.Parameter]) -> None:
        super().__init__()
        self.__dict__["_shell"] = _shell(original)
        self.__dict__["_mode"] = mode
        self.weight = weight
        self.bias = bias
        self.training = original.training
        copy_hooks(original, self)  # keep the user's forward hooks (feature extraction etc.)

    @property
    def mode(self) -> str:
        return self._mode.name

    def __getattr__(self, name: str):
        if name == "feedback" and self.__dict__["_mode"].family == "bp":
            return self.weight
        return super().__getattr__(name)

    def _install_feedback(self, spec: FeedbackSpec, generator: Optional[torch.Generator]) -> None:
        self.__dict__["_feedback_spec"] = spec
        rule = self._mode.rule
        for name, t in rule.create(self.weight.detach(), spec, generator).items():
            self.register_buffer(name, t)
        if rule.dynamic:  # valid before the first forward too
            with torch.no_grad():
                self.feedback = rule.effective(self)

    def _local_feedback(self) -> torch.Tensor:
        rule = self._mode.rule
        if rule.dynamic:
            with torch.no_grad():
                fb = rule.effective(self)
            self.feedback = fb
            return fb
        return rule.effective(self)

    def _direct_slot(self, x: torch.Tensor, info=None):
        """Register with the current session; returns ``(session, slot, x)`` where ``x`` carries a
        fresh tangent perturbation when the mode uses forward gradients."""
        session = current_session()
        if session is not None and session.tangent_only:
            return session, -1, session.replay_perturb(self, x)
        if session is None or not x.requires_grad:
            return session, -1, x
        slot = session.register(self.feedback, self, info)
        if session.rule is not None:
            x = session.perturb(slot, x)
        return session, slot, x

    def project_error(self, e: torch.Tensor, feedback: torch.Tensor, info=None) -> torch.Tensor:
        """The error projected onto this layer's input, ``(N, ...)``, with ``feedback`` as B."""
        return e.mm(feedback.reshape(feedback.shape[0], -1))

    def to_original(self) -> nn.Module:
        """The original torch module, holding this layer's current parameters."""
        mod = copy.copy(self._shell)
        mod._parameters = OrderedDict(weight=self.weight, bias=self.bias)
        mod._buffers = OrderedDict(mod._buffers)
        mod._modules = OrderedDict()
        mod.__dict__.pop("_bio_ext_tap", None)
        copy_hooks(self, mod, skip=(output_hook,))
        mod.training = self.training
        return mod

    def extra_repr(self) -> str:
        fb = self.__dict__["_buffers"].get("feedback")
        shape = tuple(fb.shape) if fb is not None else "weight"
        return f"{self._layer_repr()}, mode={self.mode}, feedback={shape}"


def _replaying() -> bool:
    """Whether a tangent-only replay (GrAPE with several directions, run under no_grad) is running."""
    session = current_session()
    return session is not None and session.tangent_only


def _no_session_error():
    return FeedbackSignalError(
        "a direct-feedback layer was called outside the forward of the model that was converted, so "
        "it cannot receive the output error. Call the converted model itself, or convert the "
        "submodule you call.")


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
        if self._mode.family == "direct":
            spec = FeedbackSpec((output_dim, self.in_features), self.in_features, output_dim, init, scale)
        else:
            spec = FeedbackSpec(tuple(self.weight.shape), self.in_features, self.out_features, init, scale)
        self._install_feedback(spec, generator)

    def _layer_repr(self) -> str:
        kind = "Conv1D, " if self.transposed else ""
        return f"{kind}in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        family = self._mode.family
        if family == "bp" or not (torch.is_grad_enabled() or _replaying()):
            return linear(x, self.weight, self.bias, self.transposed)  # Conv1D: exactly transformers' forward
        if family == "local":
            fb = self._local_feedback()
            w = self.weight.t() if self.transposed else self.weight
            return LinearLocalFn.apply(x, w, self.bias, fb.t() if self.transposed else fb)
        session, slot, x = self._direct_slot(x)
        if session is None and x.requires_grad:
            raise _no_session_error()
        return LinearDirectFn.apply(x, self.weight, self.bias, session, slot, self.transposed)


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
        if self._mode.family == "direct":
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
        family = self._mode.family
        if family == "bp" or not (torch.is_grad_enabled() or _replaying()):
            return nn.Conv2d._conv_forward(self, x, self.weight, self.bias)
        xp = pad_input(x, self._pad, self._pad_mode)
        geom = (self.stride, self._conv_pad, self.dilation, self.groups)
        if family == "local":
            return Conv2dLocalFn.apply(xp, self.weight, self.bias, self._local_feedback(), *geom)
        spread = self._spread(xp) if xp.requires_grad else None
        session, slot, xp = self._direct_slot(xp, spread)
        if session is None and xp.requires_grad:
            raise _no_session_error()
        return Conv2dDirectFn.apply(xp, self.weight, self.bias, session, slot, *geom, spread)

    def project_error(self, e: torch.Tensor, feedback: torch.Tensor, info=None) -> torch.Tensor:
        return spread_projection(super().project_error(e, feedback), info)
