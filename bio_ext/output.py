"""Which layer's output is the model's output: where a direct mode takes the error ``e``.

The output layer is found from the data flow, not from the order in which layers are registered:
it is the layer whose output the returned tensor depends on *directly*, i.e. the returned tensor is
that layer's output or is computed from it without passing through another layer bio_ext converts
or knows (Linear, Conv2d, transformers Conv1D, converted layers). An auxiliary head registered after
the classifier is then not taken for it, and a model whose output comes from a Conv2d (torchvision's
SqueezeNet: a 1x1 convolution, ReLU, pooling, flatten) needs no ``output_layer=``.

* With an example input (``input_shape``, one example's shape), ``convert`` runs one probe forward of
  zeros (batch 2, eval mode, training flags restored) and walks the autograd graph from the returned
  tensor(s) down to the first such layers.
* Without one, it guesses as before (the last registered Linear/Conv1D; with none, the last Conv2d,
  with the error taken at the return value) and builds the feedback for it. The first forward with
  autograd on then probes itself first (its own arguments, eval mode, a session in which converted
  layers build the graph but register nothing) and, when the output comes from another layer, moves
  the error tap there and rebuilds every feedback for the new output size, exactly as
  ``convert(output_layer=...)`` would have built it (same seed, same draws), before the real forward
  runs. So no step ever trains on the wrong error; the cost is one extra forward, once. The feedback
  buffers' shapes can change at that forward (a ``state_dict`` taken before it has the guessed ones).
  What cannot be switched after the conversion (feedback points, an error taken at a vocabulary
  head's input) raises :class:`~bio_ext.errors.OutputLayerError` naming the layer and ``output_layer=``.

Which returned tensors are looked at: the one ``output_key`` names; for a dict or ``ModelOutput``, its
``logits`` (else every tensor in it); for a tuple or list, every tensor in it. When they depend
directly on several layers (a model returning ``(fc(h2), aux(h1))``), ``convert`` refuses and lists
them (:class:`~bio_ext.errors.AmbiguousOutputError`): pass ``output_layer=`` (and ``output_key=``).
An explicit ``output_layer`` is used as given, with no check (under ``dfa``/``drtp`` with ``input_shape``, one
probe only sees whether its output is returned as it is: :func:`mark_root_tap`, for ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
import torch.nn as nn

from ._utils.hooks import HOOK_DICTS, hook_function, remove_hooks
from ._utils.outputs import output_tensors
from ._utils.probing import example_input, quiet_forward
from .config import ConvertConfig
from .errors import AmbiguousOutputError, ConversionError, OutputDimError, OutputLayerError
from .layers.base import FeedbackLayer
from .registry import ModeSpec, handler_for, output_size
from .modes.base import feedback_generator
from .session import (ROOT_TAP, FeedbackBank, FeedbackSession, activate, direct_sources, input_tap_hook, output_hook,
                      reset)

log = logging.getLogger(__name__)


def candidates(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules that can be an output layer: converted layers, and the layers bio_ext converts or knows
    the output size of (converted or not: an excluded head is still the head)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, FeedbackLayer) or handler_for(m) is not None or output_size(m) is not None}


def _ambiguous(model: nn.Module, found: Dict[str, list]) -> AmbiguousOutputError:
    listed = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__}, output {sorted(set(map(str, i)))})"
                       for n, i in found.items())
    return AmbiguousOutputError(
        f"the output of {type(model).__name__} depends directly on several layers: {listed}; bio_ext takes the "
        "error of direct modes at one of them. Pass output_layer='<its name>' (and output_key=<index or key> "
        "of the tensor the loss is computed from)")


Probed = Tuple[Dict[str, list], Dict[Any, torch.Tensor], Set[str]]


def probe(target: nn.Module, run: Callable[[], Any], key) -> Probed:
    """Run ``run()`` (a forward of ``target``) in eval mode with autograd on, training flags and the random
    number generators restored (a mode that draws at every forward, ``brsf``, and the user's own draws see the
    same stream as without the probe): the layers the returned tensors depend on directly, those tensors, and
    the layers whose output *is* a returned tensor (no op in between)."""
    trace: Dict[Any, str] = {}

    def record(name, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            trace[out.grad_fn] = name

    handles = [m.register_forward_hook(lambda m, a, o, n=n: record(n, o)) for n, m in candidates(target).items()]
    try:
        with quiet_forward(target):
            out = run()
    finally:
        for h in handles:
            h.remove()
    tensors = output_tensors(out, key)
    returned = {trace[t.grad_fn] for _, t in tensors if t.grad_fn in trace}
    return direct_sources(tensors, trace), dict(tensors), returned


def probe_example(target: nn.Module, cfg: ConvertConfig) -> Probed:
    """:func:`probe` with zeros of ``cfg.input_shape`` (batch 2). ``({}, {})`` when it cannot run (an input
    that is not a float tensor, e.g. token ids): the first forward probes instead."""
    try:
        x = example_input(target, cfg.input_shape)
        return probe(target, lambda: target(x), cfg.output_key)
    except Exception as exc:  # an optimisation: the first forward finds the output layer instead
        log.debug("output-layer probe of %s failed (%s: %s); the first forward probes instead", type(target).__name__,
                  type(exc).__name__, exc)
        return {}, {}, set()


@dataclass
class Guess:
    """The tap point chosen before the conversion: ``layer`` (``""``: the return value), the layer the data
    flow must show on the first forward (``expected``; None: nothing to check) and an output size hint."""

    layer: Optional[str] = None
    expected: Optional[str] = None
    dim: Optional[int] = None
    #: the probe saw the layer's output returned as it is (see :func:`mark_root_tap`)
    returned: bool = False


def choose(target: nn.Module, cfg: ConvertConfig, last_out: Optional[str], last_handled: Optional[str],
           traced: bool = False) -> Guess:
    """Where to tap (see the module): the explicit ``output_layer``, else the probe's answer, else a guess.
    ``traced``: the mode's layers trace under ``torch.compile``; an explicit ``output_layer`` is then probed
    too (with ``input_shape``), only to see whether its output is returned as it is (:func:`mark_root_tap`)."""
    if cfg.output_layer is not None:
        returned = traced and cfg.input_shape is not None and cfg.output_layer in probe_example(target, cfg)[2]
        return Guess(cfg.output_layer, returned=returned)
    if cfg.input_shape is not None:
        found, tensors, returned = probe_example(target, cfg)
        if len(found) > 1:
            raise _ambiguous(target, found)
        if found:
            ((name, where),) = found.items()
            if output_size(target.get_submodule(name)) is not None:
                return Guess(name, returned=name in returned)
            t = tensors[where[0]]
            return Guess("", dim=int(t.shape[-1]) if t.dim() else None)
    if last_out is not None:
        return Guess(last_out, expected=last_out)
    if last_handled is not None:
        return Guess("", expected=last_handled, dim=getattr(target.get_submodule(last_handled), "out_channels", None))
    return Guess()


def probe_own_forward(root: nn.Module, state, args, kwargs, recorder=None):
    """:func:`probe` of the converted ``root``'s own forward with the arguments of its first forward: in a
    tangent-only session (converted layers build the graph, nothing registers), with only the tap and point
    hooks (the user's hooks do not see it), under ``recorder`` (a torch function mode, e.g.
    :class:`~bio_ext.audit.WeightUses`) when given. ``state`` is the root's :class:`~bio_ext.convert.BioExtState`."""
    token = activate(FeedbackSession(FeedbackBank(), state.output_dim, None, tangent_only=True))
    saved = _only_own_hooks(root)
    try:
        with recorder if recorder is not None else contextlib.nullcontext():
            return probe(root, lambda: root.forward(*args, **kwargs), state.config.output_key)
    finally:
        reset(token)
        for m, dicts in saved:
            m.__dict__.update(dicts)


def settle(root: nn.Module, state, args, kwargs, recorder=None) -> None:
    """The first forward with autograd of a model converted without an example input: probe the forward
    with its own arguments (:func:`probe_own_forward`) and, when the output comes from another layer than the
    guess, move the error tap there (and rebuild the feedback when its size changes) before the real forward
    runs."""
    expected, state.expected_output = state.expected_output, None
    found, tensors, returned = probe_own_forward(root, state, args, kwargs, recorder)
    if len(found) > 1:
        state.expected_output = expected  # refused at every forward until converted again
        raise _ambiguous(root, found)
    if found and set(found) != {expected}:
        ((name, where),) = found.items()
        _retarget(root, state, name, tensors[where[0]], expected)
    mark_root_tap(root, state, returned)


def mark_root_tap(root: nn.Module, state, returned: Set[str]) -> None:
    """Mark the output layer (:data:`~bio_ext.session.ROOT_TAP`) when a probe saw its output returned as it is
    (``returned``: layer names) and the mode's layers trace under ``torch.compile``: compiled forwards then tap
    the error at the root, after the compiled region, instead of breaking the graph at the output layer."""
    if not (state.mode.rule.traces_under_compile and state.output_layer and state.output_layer in returned):
        return
    tap = root.get_submodule(state.output_layer)
    if any(hook_function(h) is output_hook for h in tap._forward_hooks.values()):  # not a head-input tap
        tap.__dict__.setdefault(ROOT_TAP, [])


#: the hooks that shape the forward (the error tap, feedback points): the only ones the first forward's probe keeps
_TAP_HOOKS = {"bio_ext.session.output_hook", "bio_ext.session.input_tap_hook", "bio_ext.points.point_hook"}


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def _only_own_hooks(root: nn.Module):
    """Leave only the tap and point hooks on every module (the user's hooks, and bio_ext's inspection hooks,
    do not see the probe); returns what puts the others back."""
    saved = []
    for m in root.modules():
        dicts = {name: getattr(m, name) for name in HOOK_DICTS if getattr(m, name, None) is not None}
        saved.append((m, dicts))
        own = {k for name in ("_forward_hooks", "_forward_pre_hooks") for k, h in dicts.get(name, {}).items()
               if _qualname(hook_function(h)) in _TAP_HOOKS}
        for name, d in dicts.items():  # the flag dicts (with_kwargs, always_call) share the hooks' keys
            m.__dict__[name] = type(d)((k, h) for k, h in d.items() if k in own)
    return saved


def _retarget(root: nn.Module, state, name: str, tensor: torch.Tensor, guessed: str) -> None:
    module, cfg = root.get_submodule(name), state.config
    width = getattr(module, "out_features", None) if getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 else None
    tap, dim = (name, int(width)) if width is not None else ("", int(tensor.shape[-1]))
    head_like = width is not None and (name.rsplit(".", 1)[-1] == "lm_head" or width >= 8 * module.in_features)
    if state.points or cfg.error_at == "head_input" or (cfg.error_at == "auto" and head_like):
        state.expected_output = guessed
        raise OutputLayerError(
            f"convert() had no example input and took {guessed!r} as the output layer of {type(root).__name__}, "
            f"but the output comes from {name!r}, which it cannot switch to after the conversion (feedback points, "
            f"or an error taken at the head's input); convert the original model again with output_layer={name!r}, "
            "or with input_shape=<one example's shape>")
    if dim != state.output_dim:  # rebuilt as convert(output_layer=name) would have built it
        generator = feedback_generator(cfg.seed) if cfg.seed is not None else None
        for layer_name in state.layer_names:
            layer = root.get_submodule(layer_name)
            layer.setup_feedback(
                output_dim=dim, init=cfg.init, scale=cfg.scale, generator=generator, conv_error=cfg.conv_error,
                conv_feedback=cfg.conv_feedback, input_size=None)
            layer.mode_spec.rule.prepare(layer, generator)
        state.bank.clear()
    for m in root.modules():
        remove_hooks(m, (output_hook, input_tap_hook))
        m.__dict__.pop(ROOT_TAP, None)
    root.get_submodule(tap).register_forward_hook(functools.partial(output_hook, (dim, cfg.output_key)),
                                                  prepend=True)  # before the root's closing hook
    state.output_layer, state.output_dim = tap, dim
    log.info("output layer of %s found from the data flow: %r (guessed %r)", type(root).__name__, name, guessed)


def head_sizes(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) sizes of an output layer, when it is a Linear/Conv1D."""
    out = output_size(module)
    if out is None:
        return None
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return None
    return (w.shape[1], out) if w.shape[0] == out else (w.shape[0], out)


def is_lm_head(model: nn.Module, name: str, sizes: Tuple[int, int]) -> bool:
    """Whether an output layer looks like a language model's vocabulary head: named ``lm_head``, tied to
    an embedding of the model, or at least 8x wider than its input."""
    if name.rsplit(".", 1)[-1] == "lm_head" or sizes[1] >= 8 * sizes[0]:
        return True
    weight = model.get_submodule(name).weight
    return any(isinstance(m, nn.Embedding) and m.weight is weight for m in model.modules())


@dataclass
class Output:
    """Where a direct mode takes the error: the output layer, the error's size, and whether it is taken at
    that layer's input (``error_at='head_input'``) rather than its output."""

    layer: Optional[str] = None
    dim: Optional[int] = None
    at_input: bool = False


def find(target: nn.Module, cfg: ConvertConfig, spec: ModeSpec, guess: Guess) -> Output:
    """The output layer and error size of a direct mode (checks every way the user's choice can be wrong)."""
    out_layer = guess.layer
    if out_layer is None:
        raise OutputDimError(
            f"cannot find the output layer of {type(target).__name__} (it has no nn.Linear nor nn.Conv2d): pass "
            "output_layer='' to take the error at the model's return value, with "
            "output_dim=<size of the output's last dimension>")
    try:
        out_module = target.get_submodule(out_layer)
    except AttributeError:
        raise ConversionError(
            f"output_layer={out_layer!r} is not a submodule of {type(target).__name__}; pass the qualified "
            "name of the layer that produces the output (as in model.named_modules())") from None
    sizes = head_sizes(out_module) if out_layer else None
    if cfg.error_at == "head_input" and sizes is None:
        raise ConversionError(
            f"error_at='head_input' needs an output layer that is a Linear/Conv1D, but "
            f"{out_layer or '<root>'!r} is a {type(out_module).__name__}; pass output_layer=<its name> or "
            "use error_at='output'")
    if cfg.error_at == "head_input" and spec.rule.transforms_error:
        raise ConversionError(
            f"mode {spec.name!r} projects the class target recovered from the output error, which "
            "error_at='head_input' does not see; use error_at='output' (or 'auto')")
    at_input = sizes is not None and not spec.rule.transforms_error and (
        cfg.error_at == "head_input" or (cfg.error_at == "auto" and is_lm_head(target, out_layer, sizes)))
    out_dim = cfg.output_dim
    if at_input:
        if out_dim is not None and out_dim != sizes[0]:
            raise OutputDimError(
                f"error_at='head_input' takes the error at the input of {out_layer!r}, of size {sizes[0]}, "
                f"but output_dim={out_dim}; leave output_dim unset")
        out_dim = sizes[0]
    elif out_dim is None:
        out_dim = output_size(out_module)
        out_dim = guess.dim if out_dim is None else out_dim
        if out_dim is None:
            raise OutputDimError(
                f"cannot infer the output size of {type(target).__name__} from {out_layer or '<root>'!r}; "
                "pass output_dim=<size of the output's last dimension>")
    return Output(out_layer, out_dim, at_input)


