"""What ``convert`` leaves on plain backprop, said once (issue 17, item 2).

A module that holds parameters of its own and is not converted trains by backprop: its parameters get
their ordinary gradients and it hands ``W^T g`` (or an LSTM's full backward) down to the layers below.
Under a direct mode it receives the projected error at its output and backpropagates inside; under a
local one it transports the true weights. The user's "DFA" is then partly backprop, so ``convert``
reports it:

* **warned** (one :class:`~bio_ext.errors.BioExtWarning`, also logged): every module with parameters of
  its own that is not converted, with why: ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (recurrent weights: no
  feedback rule), ``nn.Conv1d``/``nn.Conv3d``/``nn.ConvTranspose*d`` (convolution types bio_ext does not
  convert: it converts ``nn.Conv2d``), ``nn.Bilinear``, and any other module (its parameter names are
  listed); and every converted layer whose weight is also a parameter of another module that is not
  converted (weight tying: that module's use of the weight, e.g. through ``F.linear``, is backprop),
  except an ``nn.Embedding``, whose lookup passes no gradient to any layer below; and every converted layer
  whose weight a probe forward sees used *outside* that layer's own forward (a module, or the root's
  ``forward``, calling ``F.linear(h, other.weight)`` on a weight it does not register): that use is backprop
  too, and the layer's ``weight_used_outside`` (shown in its repr) names who uses it. The probe
  (:class:`WeightUses`) runs on zeros of ``input_shape`` at conversion, or, without one, on the arguments
  of the converted model's first forward with autograd (once; the user's hooks do not see it);
* **expected, only logged at debug level**: normalisation layers (``BatchNorm``, ``LayerNorm``,
  ``GroupNorm``, ``RMSNorm``, ...) and embeddings (``nn.Embedding``, and classes named ``*Norm*`` or
  ``*Embedding*``, e.g. transformers' own), and modules whose own parameters are all additive or
  elementwise: 0-d/1-d tensors (biases, scales, PReLU's slope) or tensors named ``*bias*``,
  ``*token*``, ``*embed*`` (a ViT's class token and position embedding, attention's ``bias_k``). None
  of these passes a transported weight matrix down: a parameter added to the activity gets the
  gradient arriving there, which under a direct mode is the injected signal. They stay on backprop
  by design;
* **not reported**: modules left out on purpose, by ``exclude``/``exclude_types`` or by not matching
  ``include``/``include_types``; the output layer under ``error_at='head_input'`` (it trains on the
  true error by design); everything in ``bp`` mode and inside the blocks of ``granularity='macro'``/
  ``'micro'`` (backprop there is the method).

``convert(..., strict=True)`` refuses instead of warning (:class:`~bio_ext.errors.StrictConversionError`,
naming the modules and the fix: ``exclude=[...]`` or ``strict=False``); a use outside a layer's forward found
at the first forward is refused there, before that forward runs. An ``exclude`` pattern or type that matches no
module is a typo: warned, naming it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._utils.probing import example_input, quiet_forward
from .config import ConvertConfig
from .errors import BioExtWarning, StrictConversionError

log = logging.getLogger(__name__)

_EXPECTED_NAME = re.compile(r"norm|embed", re.I)
_EXPECTED_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                   nn.Embedding, nn.EmbeddingBag) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _why(module: nn.Module) -> str:
    if isinstance(module, nn.RNNBase):
        return "recurrent weights: bio_ext has no feedback rule for them"
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd)):
        return "a convolution type bio_ext does not convert (it converts nn.Conv2d)"
    if isinstance(module, nn.Bilinear):
        return "bilinear layers have no feedback layer in bio_ext"
    names = [n for n, p in module._parameters.items() if p is not None]
    return f"holds parameters of its own ({', '.join(names)}) and is not a layer type bio_ext converts"


_ADDITIVE_NAME = re.compile(r"bias|token|embed", re.I)


def expected(module: nn.Module) -> bool:
    """Whether a module is expected to stay on backprop: normalisation layers, embeddings, and modules whose
    own parameters are all additive or elementwise (see the module docstring)."""
    if isinstance(module, _EXPECTED_TYPES) or _EXPECTED_NAME.search(type(module).__name__):
        return True
    return all(p.dim() <= 1 or _ADDITIVE_NAME.search(n) for n, p in module._parameters.items() if p is not None)


def left_on_backprop(model: nn.Module, converted: Set[str], excluded: Callable, included: Callable) -> List[str]:
    """``"name (Type: why)"`` of every parameterised module that stays on backprop unexpectedly.
    ``excluded(name, module)``: the user excluded the module's subtree; ``included(name, module)``: it
    matches ``include`` (True when no include is set). Either way the user chose, so it is not reported."""
    found, quiet = [], []
    skipped: List[str] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in skipped):
            continue
        if name in converted or (name and excluded(name, module)):
            skipped.append(name)
            continue
        if not any(p is not None for p in module._parameters.values()) or not included(name, module):
            continue
        (quiet if expected(module) else found).append(f"{name or '<root>'} ({type(module).__name__}: {_why(module)})")
    if quiet:
        log.debug("left on backprop as expected (normalisation layers, embeddings): %s", "; ".join(quiet))
    return found


def tied_weights(model: nn.Module, converted: Set[str]) -> List[str]:
    """Converted layers whose weight is also a parameter of a module that is not converted (nor an Embedding)."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    out = []
    for name in sorted(converted):
        weight = getattr(model.get_submodule(name), "weight", None)
        others = [o for o in owners.get(id(weight), []) if o != name and o not in converted
                  and not isinstance(model.get_submodule(o), nn.Embedding)]
        if weight is not None and others:
            out.append(f"{name or '<root>'} (its weight is also a parameter of {', '.join(others)}, whose use of it "
                       "is backprop)")
    return out


class WeightUses(TorchFunctionMode):
    """Records, while active, every torch call that uses a parameter of the ``layers`` (names in ``model``)
    outside the forward of every module that owns it, in an autograd graph (metadata reads such as
    ``.shape`` and ``.detach()`` make no graph and are not uses).

    "Inside" means a module owning the parameter is ``self`` of a frame on the Python stack: its
    ``__call__``, its hooks and anything its ``forward`` calls. ``found`` maps a layer's name to the uses,
    ``"<caller> (<function>)"`` with the caller the innermost module of ``model`` on the stack."""

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        super().__init__()
        owners: Dict[int, List[nn.Module]] = {}
        for _, module in model.named_modules():
            for p in module._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(module)
        self.names = {id(m): n or "<root>" for n, m in model.named_modules()}
        self.watched: Dict[int, Tuple[str, Tuple[nn.Module, ...]]] = {}
        for name in layers:
            for p in model.get_submodule(name)._parameters.values():
                if p is not None:
                    self.watched[id(p)] = (name or "<root>", tuple(owners[id(p)]))
        self.found: Dict[str, Set[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        hits = [self.watched[id(a)] for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor) and id(a) in self.watched]
        if hits and any(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in tree_leaves(out)):
            for layer, owners in hits:
                caller = self._outside(owners)
                if caller is not None:
                    self.found.setdefault(layer, set()).add(f"{caller} ({getattr(func, '__name__', func)})")
        return out

    def _outside(self, owners: Tuple[nn.Module, ...]) -> Optional[str]:
        """None when an owner is on the stack, else the innermost module of the model on it."""
        caller = None
        frame = sys._getframe(2)
        while frame is not None:
            obj = frame.f_locals.get("self")
            if any(obj is o for o in owners):
                return None
            if caller is None and isinstance(obj, nn.Module) and id(obj) in self.names:
                caller = self.names[id(obj)]
            frame = frame.f_back
        return caller or "code outside the model's modules"

    def uses(self) -> List[str]:
        """``"layer (weight used by ...)"`` for every layer used outside its forward."""
        return [f"{layer} (used by {', '.join(sorted(u))}, outside {layer}'s own forward)"
                for layer, u in sorted(self.found.items())]


def probe_outside_uses(model: nn.Module, layers: Sequence[str], input_shape) -> Optional[WeightUses]:
    """Run one forward of zeros of ``input_shape`` (batch 2, eval mode, autograd on, training flags and random
    number generators restored) under :class:`WeightUses`; None when it cannot run (the first forward checks instead)."""
    recorder = WeightUses(model, layers)
    try:
        x = example_input(model, input_shape)
        with quiet_forward(model), recorder:
            model(x)
    except Exception as exc:  # the check moves to the first forward, with the user's own arguments
        log.debug("weight-use probe of %s failed (%s: %s); the first forward checks instead", type(model).__name__,
                  type(exc).__name__, exc)
        return None
    return recorder


def unmatched_excludes(model: nn.Module, cfg: ConvertConfig, matches: Callable) -> List[str]:
    """The ``exclude`` patterns and ``exclude_types`` that match no module of ``model``."""
    mods = list(model.named_modules())
    out = [f"exclude={p!r}" for p in cfg.exclude if not any(fnmatch.fnmatchcase(n, p) for n, _ in mods)]
    out += [f"exclude_types={t!r}" for t in cfg.exclude_types if not any(matches(n, m, (), (t,)) for n, m in mods)]
    return out


def report(model: nn.Module, cfg: ConvertConfig, mode: str, converted: Iterable[str], matches: Callable,
           outside: Sequence[str] = ()) -> None:
    """Warn (or with ``cfg.strict`` refuse) as the module docstring says. Called before anything is swapped;
    ``outside`` is :meth:`WeightUses.uses` of a probe at conversion."""
    typos = unmatched_excludes(model, cfg, matches)
    if typos:
        _warn(f"{', '.join(typos)} matches no module of {type(model).__name__} (a typo?); names are as in "
              "model.named_modules(), types as 'Linear' or 'torch.nn.modules.linear.Linear'")
    converted = set(converted)
    def excluded(name, module):
        return matches(name, module, cfg.exclude, cfg.exclude_types)

    def included(name, module):
        return not (cfg.include or cfg.include_types) or matches(name, module, cfg.include, cfg.include_types)

    left, tied = left_on_backprop(model, converted, excluded, included), tied_weights(model, converted)
    parts = []
    if left:
        parts.append(f"these modules with parameters stay on plain backprop: {'; '.join(left)}")
    if tied:
        parts.append(f"these converted layers' weights are used elsewhere too: {'; '.join(tied)}")
    refuse_or_warn(parts, outside, cfg.strict, mode)


def refuse_or_warn(parts: List[str], outside: Sequence[str], strict: bool, mode: str, when: str = "") -> None:
    """One warning (or, ``strict``, one :class:`StrictConversionError`) for what :func:`report` found and the
    uses ``outside`` layers' forwards; nothing when both are empty."""
    if outside:
        parts = parts + [f"these converted layers' weights are used outside their own forward: {'; '.join(outside)}"]
    if not parts:
        return
    body = (f"convert(mode={mode!r}){when}: " + ". Also, ".join(parts) + ". That part of the model trains by "
            f"backprop (its parameters get their ordinary gradients, and it passes them to the layers below), not "
            f"by {mode!r}.")
    fix = ("exclude them (exclude=[...names...]), or have the module that uses another layer's weight call that "
           "layer instead")
    if strict:
        raise StrictConversionError(body + f" To keep them so, {fix}; or pass strict=False to convert with a warning")
    _warn(body + f" To keep them so and silence this, {fix}; strict=True refuses.")


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, BioExtWarning, stacklevel=5)
