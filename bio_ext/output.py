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
* Without one, it guesses as before (the last registered Linear/Conv1D; with none, the last Conv2d
  with the error taken at the return value) and checks the guess on the first forward that builds a
  graph: a forward whose output comes from another layer raises :class:`~bio_ext.errors.OutputLayerError`
  naming it, before any backward could train on the wrong error.

Which returned tensors are looked at: the one ``output_key`` names; for a dict or ``ModelOutput``, its
``logits`` (else every tensor in it); for a tuple or list, every tensor in it. When they depend
directly on several layers (a model returning ``(fc(h2), aux(h1))``), ``convert`` refuses and lists
them (:class:`~bio_ext.errors.AmbiguousOutputError`): pass ``output_layer=`` (and ``output_key=``).
An explicit ``output_layer`` is used as given, with no probe and no check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ._utils.hooks import remove_hooks
from .config import ConvertConfig
from .errors import AmbiguousOutputError, ConversionError, OutputDimError, OutputLayerError
from .layers.base import FeedbackLayer
from .registry import ModeSpec, handler_for, output_size
from .session import direct_sources, trace_hook

log = logging.getLogger(__name__)


def candidates(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules that can be an output layer: converted layers, and the layers bio_ext converts or knows
    the output size of (converted or not: an excluded head is still the head)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, FeedbackLayer) or handler_for(m) is not None or output_size(m) is not None}


def output_tensors(output: Any, key) -> List[Tuple[Any, torch.Tensor]]:
    """``(index or key, tensor)`` of the returned tensors the output layer is looked for in (see the module)."""
    if isinstance(output, torch.Tensor):
        return [(0, output)]
    if isinstance(output, Mapping):
        if key is not None or "logits" in output:
            k = "logits" if key is None else key
            return [(k, output[k])] if isinstance(output.get(k), torch.Tensor) else []
        return [(k, v) for k, v in output.items() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        if key is not None:
            ok = isinstance(key, int) and -len(output) <= key < len(output) and isinstance(output[key], torch.Tensor)
            return [(key, output[key])] if ok else []
        return [(i, v) for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
    return []


def _ambiguous(model: nn.Module, found: Dict[str, list]) -> AmbiguousOutputError:
    listed = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__}, output {sorted(set(map(str, i)))})"
                       for n, i in found.items())
    return AmbiguousOutputError(
        f"the output of {type(model).__name__} depends directly on several layers: {listed}; bio_ext takes the "
        "error of direct modes at one of them. Pass output_layer='<its name>' (and output_key=<index or key> "
        "of the tensor the loss is computed from)")


def probe(target: nn.Module, cfg: ConvertConfig) -> Tuple[Dict[str, list], Dict[Any, torch.Tensor]]:
    """One probe forward of zeros of ``cfg.input_shape`` with autograd on: the layers the returned tensors
    depend on directly, and those tensors. ``({}, {})`` when the probe cannot run (an input that is not a
    float tensor, e.g. token ids): the caller then guesses and checks on the first forward."""
    trace: Dict[Any, str] = {}

    def record(name, module, args, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            trace[out.grad_fn] = name

    handles = [m.register_forward_hook(lambda m, a, o, n=n: record(n, m, a, o)) for n, m in candidates(target).items()]
    flags = [(m, m.training) for m in target.modules()]
    param = next(iter(target.parameters()), None)
    try:
        x = torch.zeros(2, *cfg.input_shape, dtype=param.dtype if param is not None else None,
                        device=param.device if param is not None else None)
        target.eval()
        with torch.enable_grad():
            out = target(x)
    except Exception as exc:  # the probe is an optimisation: the first forward checks instead
        log.debug("output-layer probe of %s failed (%s: %s); checking on the first forward", type(target).__name__,
                  type(exc).__name__, exc)
        return {}, {}
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    tensors = output_tensors(out, cfg.output_key)
    return direct_sources(tensors, trace), dict(tensors)


@dataclass
class Guess:
    """The tap point chosen before the conversion: ``layer`` (``""``: the return value), the layer the data
    flow must show on the first forward (``expected``; None: nothing to check) and an output size hint."""

    layer: Optional[str] = None
    expected: Optional[str] = None
    dim: Optional[int] = None


def choose(target: nn.Module, cfg: ConvertConfig, last_out: Optional[str], last_conv: Optional[str]) -> Guess:
    """Where to tap (see the module): the explicit ``output_layer``, else the probe's answer, else a guess."""
    if cfg.output_layer is not None:
        return Guess(cfg.output_layer)
    if cfg.input_shape is not None:
        found, tensors = probe(target, cfg)
        if len(found) > 1:
            raise _ambiguous(target, found)
        if found:
            ((name, where),) = found.items()
            if output_size(target.get_submodule(name)) is not None:
                return Guess(name)
            t = tensors[where[0]]
            return Guess("", dim=int(t.shape[-1]) if t.dim() else None)
    if last_out is not None:
        return Guess(last_out, expected=last_out)
    if last_conv is not None:
        return Guess("", expected=last_conv, dim=getattr(target.get_submodule(last_conv), "out_channels", None))
    return Guess()


def install_check(root: nn.Module) -> None:
    """Record the candidates' outputs during forwards until :func:`check` has seen one (see the module)."""
    import functools
    for name, m in candidates(root).items():
        m.register_forward_hook(functools.partial(trace_hook, name))


def uninstall_check(root: nn.Module) -> None:
    for m in root.modules():
        remove_hooks(m, (trace_hook,))


def check(root: nn.Module, expected: str, tap: str, output: Any, key, trace: Dict[Any, str]) -> bool:
    """After a forward: whether the guess ``expected`` is settled (True: stop checking). Raises
    :class:`OutputLayerError` when the output comes from another layer, or from several."""
    tensors = [(i, t) for i, t in output_tensors(output, key) if t.grad_fn is not None]
    if not tensors:
        return False  # no graph (no_grad, frozen parameters): check on a later forward
    found = direct_sources(tensors, trace)
    if not found or set(found) == {expected}:
        return True
    if len(found) > 1:
        raise OutputLayerError(str(_ambiguous(root, found)))
    (name,) = found
    kind = "the last registered Linear/Conv1D" if tap else "the last Conv2d, with the error at the return value"
    raise OutputLayerError(
        f"convert() had no example input and took {expected!r} ({kind}) as the output layer of "
        f"{type(root).__name__}, but this forward's output comes from {name!r}; the error would be taken at the "
        f"wrong layer. Convert the original model again with output_layer={name!r}, or with "
        "input_shape=<one example's shape> so that convert() finds it from a probe forward")
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


