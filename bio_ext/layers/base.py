"""The part every feedback-aware layer shares: it holds the original parameter tensors, the
feedback buffers its mode's rule creates, and gives the original module back on revert.

Layers are thin: the maths is in :mod:`bio_ext.functional`, the gradients in each layer type's
``torch.autograd.Function`` (:mod:`bio_ext.layers.linear`, :mod:`bio_ext.layers.conv2d`), and
each layer type registers its handler with :func:`bio_ext.registry.register_layer`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._utils.hooks import copy_hooks
from ..errors import ConfigError, FeedbackSignalError, Problem
from ..functional import project_flat
from ..modes.base import FeedbackSpec
from ..registry import ModeSpec
from ..session import FeedbackSession, output_hook


def _shell(module: nn.Module) -> nn.Module:
    """A parameter-free shallow copy of ``module``, kept to rebuild it on revert."""
    shell = copy.copy(module)
    shell._parameters = OrderedDict()
    shell._buffers = OrderedDict(module._buffers)
    shell._modules = OrderedDict()
    return shell


def feedback_path(session: Optional[FeedbackSession]) -> bool:
    """Whether a converted layer runs its feedback Function (else the plain op): when autograd records,
    or in a tangent-only replay (GrAPE's extra directions, which run under no_grad)."""
    return torch.is_grad_enabled() or (session is not None and session.tangent_only)


def no_session_error() -> FeedbackSignalError:
    return FeedbackSignalError(
        "a direct-feedback layer was called outside the forward of the model that was converted, so "
        "it cannot receive the output error. Call the converted model itself, or convert the "
        "submodule you call.")


class FeedbackLayer(nn.Module):
    """Common part of the converted layers.

    ``feedback`` is the tensor the backward uses in place of the transported
    weights (in ``bp`` mode it is the weight itself). ``mode`` is the mode's name,
    ``mode_spec`` the registered mode, ``feedback_spec`` what the rule was told when it
    created the feedback, ``mode_options`` the mode's options.
    """

    #: modules that a probe forward saw using this layer's parameters outside its forward (``"<module>
    #: (<function>)"``, :mod:`bio_ext.audit`): that use trains by backprop, whatever the mode
    weight_used_outside: Tuple[str, ...] = ()
    #: whether the error tap of this layer's model takes its traced inputs (:meth:`traces_direct`): set by
    #: ``convert`` for the direct family, cleared where a method opens sessions of its own (block-wise)
    tap_takes_traced: bool = False

    def __init__(self, original: nn.Module, mode: ModeSpec, weight: nn.Parameter,
                 bias: Optional[nn.Parameter]) -> None:
        super().__init__()
        self.__dict__["_shell"] = _shell(original)  # a module, kept out of the children
        self.mode_spec = mode
        self.feedback_spec: Optional[FeedbackSpec] = None
        self.mode_options: Dict[str, Any] = {}
        self.weight = weight
        self.bias = bias
        #: inputs this layer used in the current forward under ``torch.compile`` (see :meth:`traced_input`)
        self.traced_inputs: List[torch.Tensor] = []
        self.training = original.training
        copy_hooks(original, self)  # keep the user's forward hooks (feature extraction etc.)

    @property
    def mode(self) -> str:
        return self.mode_spec.name

    def __getattr__(self, name: str):
        if name == "feedback" and self.__dict__["mode_spec"].family == "bp":
            return self.weight
        return super().__getattr__(name)

    def _install_feedback(self, spec: FeedbackSpec, generator: Optional[torch.Generator]) -> None:
        self.feedback_spec = spec
        rule = self.mode_spec.rule
        for name, t in rule.create(self.weight.detach(), spec, generator).items():
            self.register_buffer(name, t, persistent=name not in rule.transient_buffers)
        if rule.dynamic:  # valid before the first forward too
            with torch.no_grad():
                self.feedback = rule.effective(self)
        for name, t in self._buffers.items():
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ConfigError([Problem("scale", f"the {name} of this {type(self).__name__} is not finite with "
                                           f"scale={spec.scale!r} in {t.dtype}: use a smaller scale")])

    def _local_feedback(self) -> torch.Tensor:
        rule = self.mode_spec.rule
        if rule.dynamic:
            with torch.no_grad():
                fb = rule.effective(self)
            self.feedback = fb
            return fb
        return rule.effective(self)

    def traces_direct(self) -> bool:
        """Whether this forward takes the direct family's traceable path: under ``torch.compile`` (dynamo
        tracing), in a mode whose rule declares itself ``traceable`` (dfa, drtp; not GrAPE, whose tangents
        and feedback step need the session in the forward).

        The eager path is a custom Function whose backward reads the session's projection, made during the
        backward: dynamo cannot trace it and would run every frame holding a converted layer eagerly. The
        traceable path is plain ops: the layer computes its output from ``x.detach()`` (weight and bias get
        autograd's own gradients) and appends ``x`` to :attr:`traced_inputs`; the error tap, which runs
        eagerly at the output, registers those inputs with the session and hands each its projection
        ``e @ B`` in its backward (:func:`bio_ext.session.tap_output`). The gradients are the eager path's.
        """
        return self.tap_takes_traced and self.mode_spec.rule.traces_under_compile and torch.compiler.is_compiling()

    def traced_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached, recorded for the error tap when it needs a gradient (see :meth:`traces_direct`)."""
        if x.requires_grad:
            self.traced_inputs.append(x)
        return x.detach()

    def injected_gradient(self, p: torch.Tensor, x: torch.Tensor, info: Any, session: Any) -> torch.Tensor:
        """The input gradient this layer's direct backward gives ``x``, from its share ``p`` of the session's
        projection (``info``: what it registered with the session), after the session's radial rule."""
        raise NotImplementedError

    def projection_info(self, x: torch.Tensor) -> Any:
        """What this layer registers with the session for input ``x`` (None for a Linear)."""
        return None

    def _direct_slot(self, session: Optional[FeedbackSession], x: torch.Tensor, info=None):
        """Enter the current session: returns ``(slot, x)``, ``x`` as the mode wants it (GrAPE: with a
        tangent perturbation). Raises when the input needs a gradient but no session is open."""
        if session is None:
            if x.requires_grad:
                raise no_session_error()
            return -1, x
        return session.enter(self, x, info)

    #: the error projected onto this layer's input, ``(N, ...)``, with ``feedback`` as B (GrAPE's cosine
    #: step differentiates it with respect to B)
    project_error = staticmethod(project_flat)

    def projection_kind(self, info: Any = None) -> Optional[str]:
        """Which closed form of GrAPE's cosine step (:func:`bio_ext.functional.cosine_statistics`) fits this
        layer's :meth:`project_error` (``info``: what it registered); None: none, the step uses autograd."""
        return "flat" if type(self).project_error is project_flat else None

    def to_original(self) -> nn.Module:
        """The original torch module, holding this layer's current parameters."""
        mod = copy.copy(self._shell)
        mod._parameters = OrderedDict(weight=self.weight, bias=self.bias)
        mod._buffers = OrderedDict(mod._buffers)
        mod._modules = OrderedDict()
        copy_hooks(self, mod, skip=(output_hook,))
        mod.training = self.training
        return mod

    def extra_repr(self) -> str:
        fb = self.__dict__["_buffers"].get("feedback")
        shape = tuple(fb.shape) if fb is not None else "weight"
        shared = f", weight also used outside this layer by {', '.join(self.weight_used_outside)} (backprop there)" \
            if self.weight_used_outside else ""
        return f"{self._layer_repr()}, mode={self.mode}, feedback={shape}{shared}"
