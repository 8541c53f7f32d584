"""How the output error reaches direct-feedback layers without changing the training loop.

The converted root module gets a forward pre-hook that opens a
:class:`FeedbackSession` (made current with :func:`activate`) and a forward hook
that passes the model's output through :class:`ErrorTap`, an identity whose
backward sees ``e = dL/d(output)`` before any converted layer's backward runs
(every converted layer is upstream of the output). On receiving ``e`` the session
computes the projections of all registered layers at once: one matrix product
``e @ [B_1 | B_2 | ...]`` against the concatenation of their feedback
matrices, which each layer's backward then slices. Layers whose input needs no
gradient (the first layer) never register, so they pay nothing.

The session is generic: what a mode does besides projecting (GrAPE's tangents,
DRTP's target signal) it does through its rule's hooks (:class:`bio_ext.modes.FeedbackRule`),
with its per-forward state in ``session.rule_state``.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.autograd import Function

from ._utils.outputs import find_output, output_tensors
from .errors import FeedbackSignalError, OutputDimError
from .functional import fit_rows, output_radial, radial_statistics, tangential

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("bio_ext_session", default=None)


#: sessions whose forward has closed and whose backward may still recompute part of it (activation
#: checkpointing); weak, so a session leaves when its autograd graph is freed
_CLOSED: "weakref.WeakSet[FeedbackSession]" = weakref.WeakSet()
_CLOSED_LOCK = threading.Lock()


def current_session(module: Any = None) -> Optional["FeedbackSession"]:
    """The session of the converted model whose forward is running (None outside one).

    During a backward (``torch.utils.checkpoint`` recomputing a segment of the forward, either
    ``use_reentrant``), where no forward is running, it is the closed session that this backward is serving:
    see :func:`recomputing_session`. ``module`` (the converted layer or output layer asking) tells the
    sessions of several models apart."""
    session = _CURRENT.get()
    if session is None and len(_CLOSED) and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
        return recomputing_session(module)
    return session


def recomputing_session(module: Any = None) -> Optional["FeedbackSession"]:
    """The session whose forward activation checkpointing is recomputing, during the backward.

    The recompute runs in the backward's graph task, after the error tap's backward has handed the session the
    output error (non-reentrant checkpointing, and reentrant segments below the output layer): the session that
    received its error in this graph task. A reentrant segment that holds the output layer recomputes before
    the error arrives: then the one closed session still waiting for its error. Several candidates are told
    apart by ``module`` (the converted model that holds it); if they still cannot be, a
    :class:`~bio_ext.errors.FeedbackSignalError`: a silently wrong pairing would misroute gradients.
    """
    task = torch._C._current_graph_task_id()
    with _CLOSED_LOCK:
        live = list(_CLOSED)
    found = [s for s in live if s.graph_task == task] or [s for s in live if s.error is None]
    if len(found) > 1 and module is not None:
        found = [s for s in found if s.owns(module)]
    if len(found) > 1:
        raise FeedbackSignalError(
            f"activation checkpointing recomputed a converted layer during a backward that {len(found)} forwards "
            "of converted models are waiting for, and bio_ext cannot tell which forward it belongs to; call "
            "backward() after each forward (or checkpoint each model's forward separately)")
    return found[0] if found else None


def activate(session: Optional["FeedbackSession"]) -> contextvars.Token:
    """Make ``session`` current; returns the token that :func:`reset` takes to put the previous one back."""
    return _CURRENT.set(session)


def reset(token: contextvars.Token) -> None:
    """Make current again the session that was current before the :func:`activate` that gave ``token``."""
    _CURRENT.reset(token)


class FeedbackBank:
    """Holds the concatenation ``[B_1 | B_2 | ...]`` of the feedback matrices that take part in a step.

    The concatenation is not a cached copy but the feedbacks' own storage: after building it, the bank
    moves each feedback tensor (the same tensor object, with ``Tensor.set_``) onto its columns of the
    concatenated matrix. A write to a feedback by any route (an in-place update as GrAPE's,
    ``fb.data.copy_(...)``, ``load_state_dict``) is then a write into the matrix the next product uses,
    so nothing can go stale; a version counter (which ``.data`` writes do not bump) is not needed.
    :meth:`concat` checks that every feedback still lies where the bank put it (same storage, offset
    and strides) and rebuilds otherwise (a buffer replaced by another tensor, ``.data = ...``,
    ``.to()``). The check reads only tensor metadata: no copy per step, and GrAPE's in-place feedback
    steps no longer force a re-concatenation either. The feedbacks then take no memory beyond the
    matrix (the old cache held a second copy).

    One feedback needs no concatenation: its ``(rows, K)`` view is returned, nothing is moved. Feedbacks
    that cannot share one matrix (different dtypes or devices, a tensor registered twice, tensors that
    require grad) are concatenated afresh at every call.
    """

    def __init__(self) -> None:
        self._cat: Optional[torch.Tensor] = None
        self._layout: List[Tuple[Any, int, Tuple[int, ...]]] = []

    def _fresh(self, feedbacks: List[torch.Tensor]) -> bool:
        cat = self._cat
        if cat is None or len(feedbacks) != len(self._layout):
            return False
        ptr = cat.untyped_storage().data_ptr()
        for fb, (shape, offset, stride) in zip(feedbacks, self._layout):
            if (fb.untyped_storage().data_ptr() != ptr or fb.storage_offset() != offset
                    or fb.stride() != stride or tuple(fb.shape) != shape):
                return False
        return True

    def concat(self, feedbacks: List[torch.Tensor], rows: int) -> torch.Tensor:
        if len(feedbacks) == 1:
            return feedbacks[0].reshape(rows, -1)
        if self._fresh(feedbacks):
            return self._cat
        flat = [fb.detach().reshape(rows, -1) for fb in feedbacks]
        cat = torch.cat(flat, dim=1)
        shareable = (len({fb.data_ptr() for fb in feedbacks}) == len(feedbacks)
                     and len({(fb.dtype, fb.device) for fb in feedbacks}) == 1
                     and not any(fb.requires_grad for fb in feedbacks))
        if not shareable:
            self.clear()
            return cat
        self._cat, self._layout = cat, []
        storage, col = cat.untyped_storage(), 0
        with torch.no_grad():
            for fb, f in zip(feedbacks, flat):
                view = cat[:, col:col + f.shape[1]].view(fb.shape)
                fb.set_(storage, view.storage_offset(), view.shape, view.stride())
                self._layout.append((tuple(fb.shape), fb.storage_offset(), fb.stride()))
                col += f.shape[1]
        return cat

    def clear(self) -> None:
        self._cat, self._layout = None, []


class FeedbackSession:
    """One forward pass of a converted model: the layers waiting for the output error."""

    __slots__ = ("bank", "output_dim", "feedbacks", "widths", "proj", "error", "layers", "infos", "rule",
                 "tangent_only", "rule_state", "point_outputs", "point_slots", "radial", "output", "_radial_stats",
                 "closed", "tapped",
                 "signal", "late", "graph_task", "owner", "traced_layers", "traced", "__weakref__")

    def __init__(self, bank: FeedbackBank, output_dim: int, rule=None, *, tangent_only: bool = False) -> None:
        self.bank = bank
        self.output_dim = output_dim
        self.feedbacks: List[torch.Tensor] = []
        self.widths: List[int] = []
        self.layers: List[Any] = []
        self.infos: List[Any] = []
        self.proj: Optional[Tuple[torch.Tensor, ...]] = None
        self.error: Optional[torch.Tensor] = None
        #: the mode's rule (its hooks run at every stage of the step)
        self.rule = rule
        #: a forward that only carries tangents, under no_grad (GrAPE's extra directions): the layers still
        #: take their feedback path, and nothing is registered
        self.tangent_only = tangent_only
        #: whatever the rule keeps for this forward (GrAPE: perturbations and output tangents)
        self.rule_state: Any = None
        #: outputs of feedback points (attached to the graph) and their slots, handed to the error tap
        self.point_outputs: List[torch.Tensor] = []
        self.point_slots: List[int] = []
        #: ConvertConfig.radial, resolved: what layers do with the component of their injected signal along
        #: their input ("keep", "drop" or "output"; :meth:`shape_signal`)
        self.radial = "keep"
        #: the model's output, handed over by the error tap with its error for ``radial="output"``
        self.output: Optional[torch.Tensor] = None
        self._radial_stats: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None
        #: the forward has ended (:meth:`close`): a layer that enters now is recomputed by activation
        #: checkpointing during the backward (see :meth:`enter`)
        self.closed = False
        #: the output went through the error tap
        self.tapped = False
        #: the signal the feedback projects (the error, or the rule's ``error_signal`` of it), once it arrived
        self.signal: Optional[torch.Tensor] = None
        #: projections of slots registered after the error arrived, computed when taken
        self.late: Dict[int, torch.Tensor] = {}
        #: the autograd graph task whose backward handed the session its error
        self.graph_task = -1
        #: the converted root module whose forward opened the session (None: a method's own session)
        self.owner: Any = None
        #: the model's converted layers, whose ``traced_inputs`` (``torch.compile``'s traceable path, see
        #: :meth:`bio_ext.layers.FeedbackLayer.traces_direct`) the error tap registers
        self.traced_layers: Tuple[Any, ...] = ()
        #: ``(layer, slot, info)`` of the inputs registered so, in the order they are the error tap's inputs
        self.traced: List[Tuple[Any, int, Any]] = []

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
        return len(self.feedbacks) - 1

    def enter(self, layer: Any, x: torch.Tensor, info: Any = None) -> Tuple[int, torch.Tensor]:
        """A converted layer (or feedback point) is about to use ``x``, the tensor its feedback is injected
        at: returns its slot (-1: none, e.g. the first layer) and ``x`` as the rule wants it (GrAPE adds a
        tangent perturbation)."""
        if self.closed:  # recomputed by activation checkpointing: a slot of its own, no rule (see close())
            return (-1 if self.tangent_only or not x.requires_grad else self.register_layer(layer, info)), x
        if self.rule is not None:
            return self.rule.enter(self, layer, x, info)
        if self.tangent_only or not x.requires_grad:
            return -1, x
        return self.register_layer(layer, info), x

    def close(self) -> None:
        """The forward has ended. The session stays findable (:func:`current_session`) while its backward may
        recompute part of the forward (``torch.utils.checkpoint``). A layer that enters a closed session gets
        a new slot, with no rule hook (no GrAPE perturbation, nothing drawn from any generator); its
        projection ``signal @ B`` is computed only if its backward takes it:

        * non-reentrant checkpointing recomputes only the tensors that the forward's own autograd nodes saved;
          those nodes, with their slots, compute the gradient, and the recomputed slots are never taken;
        * reentrant checkpointing ran the segment under ``no_grad`` (its layers never entered) and runs the
          backward on the recomputed graph: its layers take their new slots, projected with the feedback
          as it is after this step's update.

        With ``granularity='macro'``/``'micro'`` a block's input is the detached output of the point below it,
        so a reentrant segment around a block has no input that requires grad, and torch's reentrant
        checkpointing then gives its parameters no gradient (torch warns "None of the inputs have
        requires_grad=True"): use ``use_reentrant=False`` there (transformers' default). GrAPE: see
        :mod:`bio_ext.modes.grape` ("Activation checkpointing").
        """
        self.closed = True
        with _CLOSED_LOCK:
            _CLOSED.add(self)

    def owns(self, module: Any) -> bool:
        """Whether ``module`` is part of the model whose forward opened this session."""
        return self.owner is not None and any(m is module for m in self.owner.modules())

    def register_layer(self, layer: Any, info: Any = None) -> int:
        """Reserve a slot for ``layer`` with the matrix it adds to the one product (its ``bank_matrix()``
        where it has one, e.g. a factored convolution's identity; else its feedback)."""
        matrix = layer.bank_matrix() if hasattr(layer, "bank_matrix") else layer.feedback
        return self.register(matrix, layer, info)

    def receive_error(self, e: torch.Tensor) -> None:
        """Called by :class:`ErrorTap` with ``e`` of shape ``(N, output_dim)``."""
        self.error = e
        self.graph_task = torch._C._current_graph_task_id()
        if not self.feedbacks:
            self.proj = ()
            return
        if self.rule is not None:
            self.rule.before_projection(self, e)
            e = self.rule.error_signal(e)
        self.signal = e
        bcat = self.bank.concat(self.feedbacks, self.output_dim)
        if bcat.dtype != e.dtype:
            bcat = bcat.to(e.dtype)
        full = e.mm(bcat)
        self.proj = full.split(self.widths, dim=1) if len(self.widths) > 1 else (full,)
        if self.rule is not None:
            self.rule.after_projection(self, self.error)

    def shape_signal(self, g: torch.Tensor, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """A layer's injected input gradient ``g`` at its input ``x`` after the session's ``radial`` rule:
        ``keep`` returns it as it is, ``drop`` without its component along ``x`` (per row of the first ``lead``
        dims: :func:`~bio_ext.functional.tangential`), ``output`` with the true gradient's radial component
        per example (:func:`~bio_ext.functional.output_radial`)."""
        if self.radial == "drop":
            return tangential(g, x, lead)
        if self.radial != "output":
            return g
        if self.output is None:
            raise FeedbackSignalError(
                "radial='output' needs the model's output beside its error, and this backward handed the "
                "session only the error (a block-wise local loss or a custom tap); use radial='drop' or 'keep'")
        n = x.shape[0]
        if self._radial_stats is None or self._radial_stats[0] != n:
            self._radial_stats = (n, *radial_statistics(self.error, self.output, n))
        return output_radial(g, x, self._radial_stats[1], self._radial_stats[2])

    def take(self, slot: int) -> torch.Tensor:
        if self.proj is None:
            raise FeedbackSignalError(
                "a direct-feedback layer needs the output error, but the gradient did not flow "
                "through the converted model's output. Compute the loss from the model's output "
                "(loss_fn(model(x), y)), or convert with a feedback-free mode such as 'bp' or 'fa'.")
        if slot < len(self.proj):
            return self.proj[slot]
        hit = self.late.get(slot)
        if hit is None:  # registered by a recompute after the error arrived (see close())
            if self.signal is None:
                self.signal = self.rule.error_signal(self.error) if self.rule is not None else self.error
            matrix = self.feedbacks[slot].detach().reshape(self.output_dim, -1)
            hit = self.late[slot] = self.signal.mm(matrix.to(self.signal.dtype))
        return hit


class ErrorTap(Function):
    """Identity on the model's output whose backward hands ``e`` to the session.

    The outputs of feedback points (macro/micro granularity) are extra inputs: the model itself
    continues from detached copies of them, so their only gradient is the projection ``e @ B_k``
    this backward returns. Each block's backward then starts from the tap on its own, and no
    gradient is computed into a block's input only to be thrown away at the point below it.
    Under ``torch.compile`` the inputs of converted layers are extra inputs too, after the points
    (``session.traced``): the layers computed from detached copies, and this backward gives each
    the layer's own injected gradient.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, session: FeedbackSession, *points: torch.Tensor) -> torch.Tensor:
        n = len(session.point_slots)
        ctx.session = session
        ctx.points = [(p.shape, slot) for p, slot in zip(points[:n], session.point_slots)]
        ctx.traced = list(session.traced)
        ctx.output = out.detach() if session.radial == "output" else None
        ctx.save_for_backward(*points[n:])
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        session: FeedbackSession = ctx.session
        session.output = ctx.output  # what radial="output" needs beside the error
        session.receive_error(grad.reshape(-1, grad.shape[-1]))
        fed = [fit_rows(session.take(slot), shape, "feedback point").to(grad.dtype) for shape, slot in ctx.points]
        fed += [layer.injected_gradient(session.take(slot), x, info, session).to(x.dtype)
                for (layer, slot, info), x in zip(ctx.traced, ctx.saved_tensors)]
        return (grad, None, *fed)


class LateInjection(Function):
    """Identity whose backward gives its input the slot's projection instead of the incoming gradient: a feedback
    point recomputed by reentrant activation checkpointing, which the error tap never saw."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, session: FeedbackSession, slot: int) -> torch.Tensor:
        ctx.session, ctx.slot, ctx.shape = session, slot, out.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return fit_rows(ctx.session.take(ctx.slot), ctx.shape, "feedback point").to(grad.dtype), None, None


# --------------------------------------------------------------------------- the error tap on the output layer


def tap_output(output: Any, session: FeedbackSession, output_dim: int, key=None) -> Any:
    """Pass the output tensor inside ``output`` through :class:`ErrorTap` (after the rule has seen it)."""
    tensor, put = find_output(output, key)
    if tensor.dim() == 0 or tensor.shape[-1] != output_dim:
        raise OutputDimError(
            f"the model's output has shape {tuple(tensor.shape)} but the feedback was built for "
            f"output_dim={output_dim} (the last dimension); convert with output_dim={tensor.shape[-1] if tensor.dim() else '?'}")
    if session.closed and session.tapped:  # recomputed by activation checkpointing: tapped already
        return output
    if session.tangent_only:
        if session.rule is not None:
            session.rule.on_output(session, tensor)
        return output
    if not tensor.requires_grad:  # tapped even with no layer registered yet: a reentrant checkpoint segment
        return output             # (run under no_grad) registers its layers when it is recomputed
    if session.rule is not None and not session.closed:
        tensor = session.rule.on_output(session, tensor)
    session.tapped = True
    return put(ErrorTap.apply(tensor, session, *session.point_outputs, *take_traced_inputs(session)))


def take_traced_inputs(session: FeedbackSession) -> List[torch.Tensor]:
    """Register the inputs the model's converted layers recorded on ``torch.compile``'s traceable path (one
    slot each, in the order they ran) and hand them over (the layers' lists are emptied)."""
    out = []
    for layer in session.traced_layers:
        inputs = getattr(layer, "traced_inputs", None)
        if not inputs:
            continue
        for x in inputs:
            info = layer.projection_info(x)
            session.traced.append((layer, session.register_layer(layer, info), info))
            out.append(x)
        inputs.clear()
    return out


def untapped_traced_inputs(layers) -> List[Any]:
    """The layers whose traced inputs no error tap took (they ran after the output layer); their lists are
    emptied."""
    late = [layer for layer in layers if getattr(layer, "traced_inputs", None)]
    for layer in late:
        layer.traced_inputs.clear()
    return late


#: attribute of an output layer whose output is the converted model's return value, in a mode whose layers trace
#: (:meth:`bio_ext.layers.FeedbackLayer.traces_direct`): under ``torch.compile`` its hook only records the output
#: here, and the root's closing hook taps it (a break at the output layer, often inside ``nn.Sequential``'s loop,
#: would make dynamo run the whole frame eagerly)
ROOT_TAP = "_bio_ext_root_tap"


def output_hook(tap: Tuple[int, Any], module, args, output):
    """Forward hook on the output layer (bound to ``(output_dim, output_key)``): taps its output."""
    pending = getattr(module, ROOT_TAP, None)
    if pending is not None and torch.compiler.is_compiling():
        pending.append(find_output(output, tap[1])[0])
        return None
    return _tap_now(tap, module, output)


@torch._dynamo.disable  # the tap runs eagerly, also inside a compiled forward
def _tap_now(tap: Tuple[int, Any], module, output):
    session = current_session(module)
    if session is None:
        return None
    return tap_output(output, session, *tap)


def tap_at_root(tap_module, output, session: FeedbackSession, output_dim: int, key) -> Any:
    """The root's closing hook, eagerly after a compiled forward: tap the return value when the output layer's
    hook recorded its output there (see :data:`ROOT_TAP`); ``output`` unchanged otherwise. On an eager forward
    whose return value is the tapped output, mark the output layer so that compiled forwards need no break."""
    pending = getattr(tap_module, ROOT_TAP, None)
    if pending:  # a compiled forward: the output layer's hook only recorded its output
        recorded = pending[-1]
        pending.clear()
    elif pending is None and session.tapped and output is not None:  # eager, not marked yet
        if any(isinstance(t.grad_fn, ErrorTap._backward_cls) for _, t in output_tensors(output, key)):
            setattr(tap_module, ROOT_TAP, [])
        return output
    else:
        return output
    same = [k for k, t in output_tensors(output, key)
            if t.grad_fn is recorded.grad_fn and t.output_nr == recorded.output_nr]
    if len(same) != 1:
        raise FeedbackSignalError(
            "under torch.compile the output layer's output was expected to be the model's return value (as in "
            "the forwards before), but this forward returned another tensor, so the output error cannot be taken "
            "there; return the output layer's output, or run this model eagerly")
    return tap_output(output, session, output_dim, same[0])


def direct_sources(tensors, names: dict) -> dict:
    """``{layer name: [indices]}``: the layers (autograd nodes in ``names``) each tensor of ``tensors``
    (``(index, tensor)`` pairs) depends on directly, i.e. through no other such layer. The walk goes down
    the autograd graph and stops at those nodes; through an :class:`ErrorTap` it follows only the tapped
    tensor (its other inputs are feedback points' outputs, not part of the output's computation)."""
    found: dict = {}
    for index, tensor in tensors:
        stack, seen = [tensor.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            name = names.get(node)
            if name is not None:
                found.setdefault(name, []).append(index)
                continue
            nexts = node.next_functions
            stack.extend(n for n, _ in (nexts[:1] if isinstance(node, ErrorTap._backward_cls) else nexts))
    return found


@torch._dynamo.disable
def input_tap_hook(tap: Tuple[int, Any], module, args):
    """Forward pre-hook on the output layer for ``error_at='head_input'``: taps its input instead."""
    session = current_session(module)
    if session is None or not args:
        return None
    return (tap_output(args[0], session, tap[0]), *args[1:])
