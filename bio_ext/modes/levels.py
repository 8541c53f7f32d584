"""The forward-mode AD level GrAPE's forwards run under, shared so that they can nest and overlap.

PyTorch supports one forward-AD level at a time, process-wide: ``fwAD.enter_dual_level()`` inside an
open one raises "Nested forward mode AD is not supported". A GrAPE forward therefore does not always
open its own level:

* when GrAPE forwards are already running (another model, or another thread), it joins their level;
  a count kept under a lock makes the last one to finish close it;
* when the user has a level of their own open (``with fwAD.dual_level():``), it runs under that one
  and leaves it open. That is safe when the forward's inputs and the model's parameters carry none of
  the user's tangents: GrAPE's perturbations are then the only tangents in the forward, and the output
  it returns is primal. When they do carry tangents, GrAPE's perturbations would be added to the
  user's and its estimate would mix both, so the forward is refused with a
  :class:`~bio_ext.errors.NestedForwardADError` saying what to do.

Tangents live on the tensors, so forwards sharing a level do not see each other's perturbations.
"Several threads" means several models (one per thread, as in a hyper-parameter sweep run in
threads): one converted model's forward state (its session stack, its feedback bank) is not meant to
be used by two threads at the same time.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Iterable, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ..errors import NestedForwardADError

_LOCK = threading.Lock()
_OURS = {"level": None, "forwards": 0, "decompositions": False}


def _load_decompositions() -> None:
    """Load torch's forward-AD decompositions once, without the ``torch.jit.script`` FutureWarning they emit.

    torch loads them at the first ``fwAD.make_dual`` of the process, and (torch 2.14) that import scripts its
    decompositions with ``torch.jit.script``, which warns that it is deprecated: a warning about torch's own
    internals that every GrAPE user would see at the first forward, with nothing for them to change."""
    if _OURS["decompositions"]:
        return
    _OURS["decompositions"] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        load = getattr(fwAD, "_maybe_load_decompositions", None)  # private: absent from other torch versions
        if load is not None:
            load()


def _tensors(values: Iterable[Any]):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from (t for t in v if isinstance(t, torch.Tensor))
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))


def _carries_tangents(module, args, kwargs) -> bool:
    inputs = (*_tensors(args), *_tensors(kwargs.values()), *module.parameters(), *module.buffers())
    return any(fwAD.unpack_dual(t).tangent is not None for t in inputs)


def enter(module, args, kwargs) -> Tuple[int, bool]:
    """The level for a GrAPE forward of ``module``, and whether GrAPE counts it (to close it in :func:`leave`)."""
    with _LOCK:
        _load_decompositions()
        if _OURS["forwards"]:
            _OURS["forwards"] += 1
            return _OURS["level"], True
        current = fwAD._current_level
        if current < 0:
            level = fwAD.enter_dual_level()
            _OURS["level"], _OURS["forwards"] = level, 1
            return level, True
    if _carries_tangents(module, args, kwargs):
        raise NestedForwardADError(
            "mode 'grape' runs its forward under forward-mode AD (it adds tangent perturbations to the layer "
            "inputs), and this forward runs inside your own torch.autograd.forward_ad.dual_level() on inputs or "
            "parameters that carry your tangents: PyTorch has one forward-AD level at a time, so GrAPE's "
            "perturbations would be added to your tangents and its estimate would mix both. Call the model "
            "outside your dual_level, or on primal tensors (fwAD.unpack_dual(x).primal), or convert with "
            "mode='dfa'")
    return current, False


def leave(level: int, counted: bool) -> None:
    """End a GrAPE forward entered with :func:`enter`; the last counted one closes GrAPE's level."""
    if not counted:
        return
    with _LOCK:
        _OURS["forwards"] -= 1
        if _OURS["forwards"] == 0:
            _OURS["level"] = None
            fwAD.exit_dual_level(level=level)
