"""How the output error reaches direct-feedback layers without changing the training loop.

The converted root module gets a forward pre-hook that opens a
:class:`FeedbackSession` and a forward hook that passes the model's output
through :class:`ErrorTap`, an identity whose backward sees ``e = dL/d(output)``
before any converted layer's backward runs (every converted layer is upstream
of the output). On receiving ``e`` the session computes the projections of all
registered layers at once: one matrix product ``e @ [B_1 | B_2 | ...]`` against
the cached concatenation of their feedback matrices, which each layer's backward
then slices. Layers whose input needs no gradient (the first layer) never
register, so they pay nothing.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Tuple

import torch
from torch.autograd import Function

from .errors import FeedbackSignalError

_tls = threading.local()


def current_session() -> Optional["FeedbackSession"]:
    return getattr(_tls, "session", None)


def _set_session(session: Optional["FeedbackSession"]) -> Optional["FeedbackSession"]:
    prev = getattr(_tls, "session", None)
    _tls.session = session
    return prev


class FeedbackBank:
    """Caches the concatenation of the feedback matrices that take part in a step.

    The cache key holds each feedback's storage pointer and version counter, so an
    in-place update of a feedback (as GrAPE does), a ``.to()`` or a
    ``load_state_dict`` invalidates it.
    """

    def __init__(self) -> None:
        self._key: Any = None
        self._cat: Optional[torch.Tensor] = None

    def concat(self, feedbacks: List[torch.Tensor], rows: int) -> torch.Tensor:
        key = tuple((fb.data_ptr(), fb._version, fb.dtype, fb.device, tuple(fb.shape)) for fb in feedbacks)
        if key != self._key:
            flat = [fb.reshape(rows, -1) for fb in feedbacks]
            self._cat = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
            self._key = key
        return self._cat

    def clear(self) -> None:
        self._key, self._cat = None, None


class FeedbackSession:
    """One forward pass of a converted model: the layers waiting for the output error."""

    __slots__ = ("bank", "output_dim", "feedbacks", "widths", "proj", "error", "layers", "infos",
                 "rule", "signal", "perturbations", "out_tangent", "examples", "generator", "replay", "replays",
                 "main", "cursor", "point_outputs", "point_slots", "__weakref__")

    def __init__(self, bank: FeedbackBank, output_dim: int, rule=None) -> None:
        self.bank = bank
        self.output_dim = output_dim
        self.feedbacks: List[torch.Tensor] = []
        self.widths: List[int] = []
        self.layers: List[Any] = []
        self.infos: List[Any] = []
        self.proj: Optional[Tuple[torch.Tensor, ...]] = None
        self.error: Optional[torch.Tensor] = None
        #: the mode's rule when it uses forward gradients (GrAPE), else None
        self.rule = rule if rule is not None and getattr(rule, "forward_gradient", False) else None
        #: the rule's error_signal when the mode projects something other than the error (DRTP), else None
        self.signal = rule.error_signal if rule is not None and getattr(rule, "transforms_error", False) else None
        self.perturbations: List[Optional[torch.Tensor]] = []
        self.out_tangent: Optional[torch.Tensor] = None
        #: number of independent examples in the output (its first dimension); the rows of ``out_tangent``
        #: (e.g. the tokens of a sequence) are grouped by example for the forward gradient
        self.examples: Optional[int] = None
        #: draws the perturbations when set (several tangent directions: the global RNG must replay)
        self.generator: Optional[torch.Generator] = None
        #: (args, kwargs, rng state, directions) of the forward, kept to replay it for more directions
        self.replay: Any = None
        #: (perturbations, output tangent) of each extra tangent direction
        self.replays: List[Tuple[List[torch.Tensor], Optional[torch.Tensor]]] = []
        #: in a tangent-only replay: the session of the real forward, and how many of its slots were seen
        self.main: Optional["FeedbackSession"] = None
        self.cursor = 0
        #: outputs of feedback points (attached to the graph) and their slots, handed to the error tap
        self.point_outputs: List[torch.Tensor] = []
        self.point_slots: List[int] = []

    @classmethod
    def replay_of(cls, main: "FeedbackSession") -> "FeedbackSession":
        """A tangent-only session that perturbs the layers of ``main``, in ``main``'s slot order."""
        s = cls(main.bank, main.output_dim)
        s.main, s.generator = main, main.generator
        return s

    @property
    def tangent_only(self) -> bool:
        return self.main is not None

    def replay_perturb(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """In a tangent-only replay: perturb ``x`` if ``layer`` holds the next slot of the real forward."""
        main = self.main
        if self.cursor >= len(main.layers) or main.layers[self.cursor] is not layer:
            return x
        self.cursor += 1
        self.perturbations.append(None)
        return self.perturb(len(self.perturbations) - 1, x)

    def register(self, feedback: torch.Tensor, layer: Any = None, info: Any = None) -> int:
        """Reserve a slot for a layer whose input needs a gradient; returns the slot."""
        if feedback.shape[0] != self.output_dim:
            raise FeedbackSignalError(
                f"a feedback matrix has {feedback.shape[0]} rows but the model's output_dim is "
                f"{self.output_dim}; convert the model again with the right output_dim")
        self.feedbacks.append(feedback)
        self.widths.append(feedback.numel() // self.output_dim)
        self.layers.append(layer)
        self.infos.append(info)
        self.perturbations.append(None)
        return len(self.feedbacks) - 1

    def perturb(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Add a fresh standard-normal perturbation to the forward-mode tangent of ``x``."""
        import torch.autograd.forward_ad as fwAD
        primal, tangent = fwAD.unpack_dual(x)
        u = torch.randn(primal.shape, dtype=primal.dtype, device=primal.device, generator=self.generator)
        self.perturbations[slot] = u
        return fwAD.make_dual(primal, u if tangent is None else tangent + u)

    def receive_error(self, e: torch.Tensor) -> None:
        """Called by :class:`ErrorTap` with ``e`` of shape ``(N, output_dim)``."""
        self.error = e
        if not self.feedbacks:
            self.proj = ()
            return
        if self.rule is not None and self.out_tangent is not None:
            self.rule.before_projection(self, e)
        if self.signal is not None:
            e = self.signal(e)
        bcat = self.bank.concat(self.feedbacks, self.output_dim)
        if bcat.dtype != e.dtype:
            bcat = bcat.to(e.dtype)
        full = e.mm(bcat)
        self.proj = full.split(self.widths, dim=1) if len(self.widths) > 1 else (full,)

    def take(self, slot: int) -> torch.Tensor:
        if self.proj is None:
            raise FeedbackSignalError(
                "a direct-feedback layer needs the output error, but the gradient did not flow "
                "through the converted model's output. Compute the loss from the model's output "
                "(loss_fn(model(x), y)), or convert with a feedback-free mode such as 'bp' or 'fa'.")
        return self.proj[slot]


class ErrorTap(Function):
    """Identity on the model's output whose backward hands ``e`` to the session.

    The outputs of feedback points (macro/micro granularity) are extra inputs: the model itself
    continues from detached copies of them, so their only gradient is the projection ``e @ B_k``
    this backward returns. Each block's backward then starts from the tap on its own, and no
    gradient is computed into a block's input only to be thrown away at the point below it.
    """

    @staticmethod
    def forward(out: torch.Tensor, session: FeedbackSession, *points: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.session = inputs[1]
        ctx.points = [(p.shape, slot) for p, slot in zip(inputs[2:], inputs[1].point_slots)]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        session: FeedbackSession = ctx.session
        session.receive_error(grad.reshape(-1, grad.shape[-1]))
        from .autograd import fit_rows
        fed = [fit_rows(session.take(slot), shape, "feedback point").to(grad.dtype) for shape, slot in ctx.points]
        return (grad, None, *fed)


# --------------------------------------------------------------------------- hooks installed by convert()


def output_hook(module, args, output):
    """Forward hook on the output layer: passes its output through :class:`ErrorTap`."""
    session = current_session()
    tap = module.__dict__.get("_bio_ext_tap")
    if session is None or tap is None:
        return None
    from .convert import tap_output  # the container logic lives with convert()
    return tap_output(output, session, *tap)


def input_tap_hook(module, args):
    """Forward pre-hook on the output layer for ``error_at='head_input'``: taps its input instead."""
    session = current_session()
    tap = module.__dict__.get("_bio_ext_tap")
    if session is None or tap is None or not args:
        return None
    from .convert import tap_output
    return (tap_output(args[0], session, tap[0]), *args[1:])


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def copy_hooks(src, dst, skip=()) -> None:
    """Copy forward (pre-)hooks from module ``src`` to ``dst``, leaving out the functions in ``skip``."""
    drop = {k for name in ("_forward_hooks", "_forward_pre_hooks")
            for k, fn in getattr(src, name).items() if fn in skip}
    for name in HOOK_DICTS:
        src_d = getattr(src, name, None)
        if src_d is None:
            continue
        new = type(src_d)((k, v) for k, v in src_d.items() if k not in drop)
        dst.__dict__[name] = new


def remove_hooks(module, fns) -> None:
    for name in ("_forward_hooks", "_forward_pre_hooks"):
        d = getattr(module, name)
        for k in [k for k, fn in d.items() if fn in fns]:
            del d[k]
            for extra in HOOK_DICTS:
                getattr(module, extra, {}).pop(k, None)
