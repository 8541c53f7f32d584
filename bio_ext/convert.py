"""convert() and revert(): swap layers for feedback-aware ones and back.

Layer types are handled by functions registered with :func:`register_layer`
(one handler per type). Conversion plans everything first and only then swaps,
so a failed conversion leaves the caller's model untouched.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from . import points as _points
from .attention import ExplicitMultiheadAttention
from .config import ConvertConfig
from .errors import ConfigError
from .errors import (AlreadyConvertedError, ConversionError, NothingToConvertError, OutputDimError, OutputTypeError,
                     UnsupportedModuleError)
from .layers import FeedbackConv2d, FeedbackLayer, FeedbackLinear
from .modes import ModeSpec, feedback_generator, get_mode
from .session import (ErrorTap, FeedbackBank, FeedbackSession, _set_session, input_tap_hook, output_hook,
                      remove_hooks)

log = logging.getLogger(__name__)

Handler = Callable[[nn.Module, ModeSpec], FeedbackLayer]
_HANDLERS: Dict[type, Handler] = {}
_OUTPUT_SIZE: Dict[type, Callable[[nn.Module], int]] = {}

#: modules whose forward does not call their children are replaced by an equivalent module that does
#: (type -> function building it; the replacement's ``to_original()`` gives the original back)
_EXPANDERS: Dict[type, Callable[[nn.Module], nn.Module]] = {}
_ATTENTION_NAME = re.compile(r"attention|attn", re.I)


def register_expander(*types: type):
    """Decorator registering a function that rebuilds modules of exactly these types as equivalent
    modules whose projections are child layers. The rebuilt module's class sets
    ``bio_ext_expanded = True`` and has ``to_original()``, which :func:`revert` calls."""

    def deco(fn):
        for t in types:
            _EXPANDERS[t] = fn
        return fn

    return deco


register_expander(nn.MultiheadAttention)(ExplicitMultiheadAttention)


def register_layer(*types: type, output_size: Optional[Callable[[nn.Module], int]] = None):
    """Decorator registering the handler that converts modules of exactly these types."""

    def deco(fn: Handler) -> Handler:
        for t in types:
            _HANDLERS[t] = fn
            if output_size is not None:
                _OUTPUT_SIZE[t] = output_size
        return fn

    return deco


@register_layer(nn.Linear, output_size=lambda m: m.out_features)
def _convert_linear(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackLinear(module, mode)


@register_layer(nn.Conv2d)
def _convert_conv2d(module: nn.Module, mode: ModeSpec) -> FeedbackLayer:
    return FeedbackConv2d(module, mode)


def _register_transformers() -> None:
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None) if mod is not None else None
    if conv1d is not None and conv1d not in _HANDLERS:
        register_layer(conv1d, output_size=lambda m: m.weight.shape[1])(
            lambda module, mode: FeedbackLinear(module, mode, transposed=True))


def _handler_for(module: nn.Module) -> Optional[Handler]:
    """The handler of the module's exact type, or of a base type whose forward it does not override."""
    t = type(module)
    if t in _HANDLERS:
        return _HANDLERS[t]
    for base in t.__mro__[1:]:
        if base in _HANDLERS:
            return _HANDLERS[base] if t.forward is base.forward else None
    return None


def _refusal(module: nn.Module) -> Optional[str]:
    """Why converting inside ``module`` would silently do nothing (an attention module bio_ext does not know)."""
    t = type(module)
    if t in _EXPANDERS or getattr(t, "bio_ext_expanded", False):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return ("a subclass of nn.MultiheadAttention with its own forward, which runs on its weight tensors "
                "rather than on child layers")
    own = [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    if own and _ATTENTION_NAME.search(t.__name__) and _handler_for(module) is None:
        return (f"an attention module bio_ext does not know: its forward uses its own weight tensors {own} "
                "rather than child layers, so no feedback would reach them. Register an equivalent module "
                "with bio_ext.register_expander")
    return None


def _expand(model: nn.Module, cfg: ConvertConfig) -> List[Tuple[str, nn.Module, nn.Module]]:
    """Replace (in ``model``) the modules that have an expander; returns what to undo."""
    done: List[Tuple[str, nn.Module, nn.Module]] = []
    skipped: List[str] = []
    for name, module in list(model.named_modules()):
        if any(name == p or name.startswith(p + ".") for p in skipped):
            continue
        if name and _matches(name, module, cfg.exclude, cfg.exclude_types):
            skipped.append(name)
            continue
        fn = _EXPANDERS.get(type(module))
        if fn is None or not name:
            continue
        new = fn(module)
        _set_child(model, name, new)
        done.append((name, module, new))
    return done


def _unexpand(model: nn.Module, done) -> None:
    for name, original, _ in reversed(done):
        _set_child(model, name, original)


# --------------------------------------------------------------------------- root state and hooks


@dataclass
class BioExtState:
    """Kept on the converted root module as ``model._bio_ext``."""

    config: ConvertConfig
    mode: ModeSpec
    output_dim: Optional[int]
    layer_names: List[str]
    output_layer: Optional[str] = None
    points: List[str] = field(default_factory=list)
    bank: FeedbackBank = field(default_factory=FeedbackBank)
    stack: List[Any] = field(default_factory=list)

    def __deepcopy__(self, memo):
        return BioExtState(self.config, self.mode, self.output_dim, list(self.layer_names), self.output_layer,
                           list(self.points))

    def __getstate__(self):
        return {"config": self.config.to_dict(), "mode": self.mode.name, "output_dim": self.output_dim,
                "layer_names": self.layer_names, "output_layer": self.output_layer, "points": self.points}

    def __setstate__(self, s):
        self.__init__(ConvertConfig.from_dict(s["config"]), get_mode(s["mode"]), s["output_dim"],
                      s["layer_names"], s["output_layer"], s.get("points", []))


def _state(model: nn.Module) -> Optional[BioExtState]:
    return model.__dict__.get("_bio_ext")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _root_pre_hook(module: nn.Module, args, kwargs):
    state = _state(module)
    if state is None:
        return None
    session = FeedbackSession(state.bank, state.output_dim, state.mode.rule) if torch.is_grad_enabled() else None
    level = None
    if session is not None and session.rule is not None:
        directions = state.config.options.get("directions", 1)
        if directions > 1:  # more tangent directions are replayed after the forward (see bio_ext.grape)
            device = next(module.parameters()).device
            seed = int(torch.randint(0, 2 ** 62, (1,)))
            session.generator = torch.Generator(device=device).manual_seed(seed)
            session.replay = (args, kwargs, _rng_state(device), directions, device)
        import torch.autograd.forward_ad as fwAD
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # forward-mode AD: only the math SDPA backend has tangent formulas (flash/efficient kernels do not)
        math_only = sdpa_kernel([SDPBackend.MATH])
        math_only.__enter__()
        level = (fwAD.enter_dual_level(), math_only)
    state.stack.append(_set_session(session))
    state.stack.append((session, level))
    return None


def _replay_directions(module: nn.Module, session: FeedbackSession) -> None:
    """GrAPE with ``directions`` K > 1: K - 1 more forwards under no_grad that carry tangents only.

    Each replays the forward with the global RNG state it started from (the same dropout masks) and
    fresh perturbations from the session's own generator; BatchNorm running statistics are restored
    afterwards, and so is the global RNG, so the model and the user's random stream see one forward.
    """
    args, kwargs, rng, directions, device = session.replay
    after = _rng_state(device)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [dict(m._buffers) for m in norms]
    for m in norms:  # replays update copies: the originals are saved for the real backward, untouched
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()
    try:
        with torch.no_grad():
            for _ in range(directions - 1):
                _set_rng_state(rng, device)
                replay = FeedbackSession.replay_of(session)
                _set_session(replay)
                try:
                    module.forward(*args, **kwargs)
                finally:
                    _set_session(session)
                session.replays.append((replay.perturbations, replay.out_tangent))
    finally:
        for m, bufs in zip(norms, saved):
            m._buffers.update(bufs)
        _set_rng_state(after, device)


def _root_hook(module: nn.Module, args, output):
    state = _state(module)
    if state is None or not state.stack:
        return None
    session, level = state.stack.pop()
    if session is not None and session.replay is not None and output is not None and session.out_tangent is not None:
        _replay_directions(module, session)  # still inside this forward's session and dual level
    _set_session(state.stack.pop())
    if level is not None:
        import torch.autograd.forward_ad as fwAD
        fwAD.exit_dual_level(level=level[0])
        level[1].__exit__(None, None, None)
    return None


def find_output(output: Any, key: Optional[Union[str, int]] = None) -> Tuple[torch.Tensor, Callable]:
    """Locate the output tensor in a model's return value.

    Returns the tensor and a function that puts a replacement back in its place.
    Tensors are used as they are; tuples/lists use ``key`` (an index, default the
    first tensor); mappings and transformers ``ModelOutput`` use ``key`` (default
    ``"logits"``).
    """
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, Mapping):
        k = "logits" if key is None else key
        value = output.get(k) if isinstance(k, str) else None
        if not isinstance(value, torch.Tensor):
            raise OutputTypeError(
                f"the model returned a {type(output).__name__} without a tensor under {k!r} (keys: "
                f"{list(output.keys())}); pass output_key='<key of the output tensor>' to convert()")

        def put(t, output=output, k=k):
            if hasattr(output, "__dataclass_fields__") and hasattr(output, k):  # transformers ModelOutput
                setattr(output, k, t)
            else:
                output[k] = t
            return output

        return value, put
    if isinstance(output, (tuple, list)):
        if key is None:
            idx = next((i for i, v in enumerate(output) if isinstance(v, torch.Tensor)), None)
        else:
            idx = key if isinstance(key, int) and -len(output) <= key < len(output) else None
        if idx is None or not isinstance(output[idx], torch.Tensor):
            raise OutputTypeError(
                f"the model returned a {type(output).__name__} with no tensor at {key!r}; pass "
                "output_key=<index of the output tensor> to convert()")

        def put(t, output=output, idx=idx):
            items = list(output)
            items[idx] = t
            if isinstance(output, list):
                return items
            return type(output)(*items) if hasattr(output, "_fields") else tuple(items)

        return output[idx], put
    raise OutputTypeError(
        f"the model returned {type(output).__name__}; bio_ext finds the output error on a tensor, a "
        "tuple/list, a dict or a transformers ModelOutput. Return one of those from forward().")


def tap_output(output: Any, session: FeedbackSession, output_dim: int, key=None) -> Any:
    tensor, put = find_output(output, key)
    if tensor.dim() == 0 or tensor.shape[-1] != output_dim:
        raise OutputDimError(
            f"the model's output has shape {tuple(tensor.shape)} but the feedback was built for "
            f"output_dim={output_dim} (the last dimension); convert with output_dim={tensor.shape[-1] if tensor.dim() else '?'}")
    if session.tangent_only:  # a replay for another tangent direction: keep the output tangent only
        import torch.autograd.forward_ad as fwAD
        tangent = fwAD.unpack_dual(tensor).tangent
        session.out_tangent = None if tangent is None else tangent.detach().reshape(-1, output_dim).clone()
        return output
    if not tensor.requires_grad or not session.feedbacks:
        return output
    if session.rule is not None:  # forward gradients: keep the output's tangent, go on without tangents
        import torch.autograd.forward_ad as fwAD
        primal, tangent = fwAD.unpack_dual(tensor)
        if tangent is not None:
            session.out_tangent = tangent.detach().reshape(-1, output_dim).clone()
            session.examples = tensor.shape[0] if tensor.dim() >= 2 else 1
            tensor = primal
    return put(ErrorTap.apply(tensor, session, *session.point_outputs))


# --------------------------------------------------------------------------- planning


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _matches(name: str, module: nn.Module, patterns: Sequence[str], types: Sequence[str]) -> bool:
    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return True
    t = type(module)
    return any(s in (t.__name__, _qualname(t)) or isinstance(module, _resolve(s)) for s in types)


def _resolve(name: str) -> Union[type, Tuple[()]]:
    modname, _, attr = name.rpartition(".")
    mod = sys.modules.get(modname) if modname else None
    obj = getattr(mod, attr, None) if mod is not None else getattr(nn, name, None)
    return obj if isinstance(obj, type) else ()


def _plan(model: nn.Module, cfg: ConvertConfig) -> Tuple[List[Tuple[str, Handler]], List[str], Optional[str]]:
    _register_transformers()
    selected: List[Tuple[str, Handler]] = []
    refused: List[str] = []
    skipped_prefixes: List[str] = []
    last_out: Optional[str] = None
    for name, module in model.named_modules():
        if _output_size(module) is not None:
            last_out = name
        if any(name == p or name.startswith(p + ".") for p in skipped_prefixes):
            continue
        if name and _matches(name, module, cfg.exclude, cfg.exclude_types):
            skipped_prefixes.append(name)
            continue
        why = _refusal(module)
        if why is not None:
            refused.append(f"{name or '<root>'} ({type(module).__name__}: {why})")
            skipped_prefixes.append(name)
            continue
        handler = _handler_for(module)
        if handler is None:
            continue
        if (cfg.include or cfg.include_types) and not _matches(name, module, cfg.include, cfg.include_types):
            continue
        selected.append((name, handler))
    return selected, refused, last_out


def _output_size(module: nn.Module) -> Optional[int]:
    for t in type(module).__mro__:
        if t in _OUTPUT_SIZE:
            return _OUTPUT_SIZE[t](module)
    return None


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _as_config(mode, kwargs) -> ConvertConfig:
    include, exclude = kwargs.pop("include", ()), kwargs.pop("exclude", ())
    inc_t, exc_t = list(kwargs.pop("include_types", ())), list(kwargs.pop("exclude_types", ()))

    def split(values, types_out):
        if values is None:
            return ()
        if isinstance(values, (str, type)):
            values = [values]
        names = []
        for v in values:
            (types_out if isinstance(v, type) else names).append(v)
        return tuple(names)

    include, exclude = split(include, inc_t), split(exclude, exc_t)
    inc_t = tuple(_qualname(t) if isinstance(t, type) else t for t in inc_t)
    exc_t = tuple(_qualname(t) if isinstance(t, type) else t for t in exc_t)
    return ConvertConfig(mode=mode, include=include, exclude=exclude, include_types=inc_t,
                         exclude_types=exc_t, **kwargs)


def convert(model: nn.Module, mode: Union[str, ConvertConfig] = "dfa", *, output_dim: Optional[int] = None,
            inplace: bool = False, **options: Any) -> nn.Module:
    """Swap the model's Linear, Conv2d and transformers Conv1D layers for feedback-aware ones.

    Args:
        model: any ``nn.Module``.
        mode: a registered mode name (``bp``, ``fa``, ``dfa``, ``usf``, ``brsf``,
            ``frsf``, ...) or a full :class:`ConvertConfig`.
        output_dim: size of the output's last dimension, for direct modes
            (default: the ``out_features`` of the model's last Linear/Conv1D).
        inplace: convert ``model`` itself; by default a deep copy is converted and
            ``model`` is left as it was.
        **options: any other field of :class:`ConvertConfig` (``include``,
            ``exclude`` (glob patterns or types), ``init``, ``scale``, ``seed``,
            ``conv_error``, ``output_key``, ``options``).

    The converted layers reuse the original parameter tensors. The training loop
    stays unchanged: ``loss_fn(model(x), y).backward()`` delivers the mode's
    gradients. Raises a :class:`~bio_ext.errors.BioExtError` subclass (a
    ``ValueError`` or ``TypeError``) on bad input, leaving ``model`` untouched.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    if mode == "bwbpf" or getattr(mode, "mode", None) == "bwbpf":  # block-wise local losses: bio_ext.blockwise
        from .blockwise import BlockwiseConfig, blockwise
        return blockwise(model, config=mode if isinstance(mode, BlockwiseConfig) else None, inplace=inplace,
                         **options)
    if isinstance(mode, ConvertConfig):
        if options or output_dim is not None:
            cfg = ConvertConfig.from_dict({**mode.to_dict(), **options,
                                           **({"output_dim": output_dim} if output_dim is not None else {})})
        else:
            cfg = mode
    else:
        cfg = _as_config(mode, dict(options, output_dim=output_dim))
    spec = get_mode(cfg.mode)
    problems = spec.rule.validate_options(cfg.options)
    if problems:
        raise ConfigError(problems, what=f"options of mode {spec.name!r}")

    converted = [n for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]
    if converted or _state(model) is not None:
        raise AlreadyConvertedError(
            f"the model is converted already (converted layers: {converted[:5] or ['<root>']}); call "
            "bio_ext.revert(model) first, or convert the original model")

    work = model if inplace else copy.deepcopy(model)
    expanded = _expand(work, cfg)
    try:
        root = _convert_planned(work, cfg, spec)
    except BaseException:
        if inplace:
            _unexpand(work, expanded)
        raise
    log.info("converted %s to mode %r (%s granularity, %d layers, %d feedback points)", type(model).__name__,
             spec.name, cfg.granularity, len(_state(root).layer_names), len(_state(root).points))
    return root


def _head_sizes(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) sizes of an output layer, when it is a Linear/Conv1D."""
    out = _output_size(module)
    if out is None:
        return None
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return None
    return (w.shape[1], out) if w.shape[0] == out else (w.shape[0], out)


def _is_lm_head(model: nn.Module, name: str, sizes: Tuple[int, int]) -> bool:
    """Whether an output layer looks like a language model's vocabulary head: named ``lm_head``, tied to
    an embedding of the model, or at least 8x wider than its input."""
    if name.rsplit(".", 1)[-1] == "lm_head" or sizes[1] >= 8 * sizes[0]:
        return True
    weight = model.get_submodule(name).weight
    return any(isinstance(m, nn.Embedding) and m.weight is weight for m in model.modules())


def _convert_planned(target: nn.Module, cfg: ConvertConfig, spec: ModeSpec) -> nn.Module:
    """Plan on ``target`` (which may be modified only once nothing can fail), then swap."""
    layered = cfg.granularity == "layer"
    selected, refused, last_out = _plan(target, cfg)
    if refused and layered:
        raise UnsupportedModuleError(
            "cannot convert: " + "; ".join(refused) + ". Skip these modules with "
            "exclude=[...names...] (they then train with plain backprop), or replace them with modules "
            "that call nn.Linear layers.")
    point_plan: List[Tuple[str, int]] = []
    if not layered:
        point_plan = _points.plan_points(target, cfg.granularity, cfg.points)
        selected = []  # ordinary backprop inside blocks and sub-layers
    elif not selected:
        raise NothingToConvertError(
            f"no layer to convert in {type(target).__name__}: bio_ext converts nn.Linear, nn.Conv2d and "
            "transformers Conv1D (check include/exclude if you set them)")
    out_dim, out_layer, at_input = cfg.output_dim, None, False
    if spec.family == "direct":
        out_layer = cfg.output_layer if cfg.output_layer is not None else last_out
        if out_layer is None:
            raise OutputDimError(
                f"cannot find the output layer of {type(target).__name__} (it has no nn.Linear): pass "
                "output_layer='' to take the error at the model's return value, with "
                "output_dim=<size of the output's last dimension>")
        try:
            out_module = target.get_submodule(out_layer)
        except AttributeError:
            raise ConversionError(
                f"output_layer={out_layer!r} is not a submodule of {type(target).__name__}; pass the qualified "
                "name of the layer that produces the output (as in model.named_modules())") from None
        sizes = _head_sizes(out_module) if out_layer else None
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
            cfg.error_at == "head_input" or (cfg.error_at == "auto" and _is_lm_head(target, out_layer, sizes)))
        if at_input:
            if out_dim is not None and out_dim != sizes[0]:
                raise OutputDimError(
                    f"error_at='head_input' takes the error at the input of {out_layer!r}, of size {sizes[0]}, "
                    f"but output_dim={out_dim}; leave output_dim unset")
            out_dim = sizes[0]
            selected = [(n, h) for n, h in selected if n != out_layer]  # trains on the true error
        elif out_dim is None:
            out_dim = _output_size(out_module)
            if out_dim is None:
                raise OutputDimError(
                    f"cannot infer the output size of {type(target).__name__} from {out_layer or '<root>'!r}; "
                    "pass output_dim=<size of the output's last dimension>")

    n_points = len(selected) if layered else len(point_plan) + 1
    if spec.rule.forward_gradient and n_points < 2:
        raise NothingToConvertError(
            f"mode {spec.name!r} perturbs the inputs of converted layers after the first, and "
            f"{type(target).__name__} has {len(selected)} layer(s) to convert: there is nothing to perturb. "
            "Use 'dfa' for a single layer, or convert a deeper model.")
    generator = None
    if cfg.seed is not None:
        generator = feedback_generator(cfg.seed)
    new_layers = []
    for name, handler in selected:
        old = target.get_submodule(name) if name else target
        new = handler(old, spec)
        new.setup_feedback(output_dim=out_dim, init=cfg.init, scale=cfg.scale, generator=generator,
                           conv_error=cfg.conv_error)
        new.__dict__["_mode_options"] = dict(cfg.options)
        new_layers.append((name, new))
    # every layer is built: nothing below can fail, so the model is never half converted
    root = target
    for name, new in new_layers:
        if name:
            _set_child(target, name, new)
        else:
            root = new
    point_names = _points.install(root, point_plan, spec, out_dim, cfg.init, cfg.scale, generator,
                                  dict(cfg.options)) if point_plan else []
    state = BioExtState(cfg, spec, out_dim, [n for n, _ in new_layers], out_layer, point_names)
    root.__dict__["_bio_ext"] = state
    if spec.family == "direct":
        tap_module = root.get_submodule(out_layer)
        tap_module.__dict__["_bio_ext_tap"] = (out_dim, cfg.output_key)
        if at_input:
            tap_module.register_forward_pre_hook(input_tap_hook)
        else:
            tap_module.register_forward_hook(output_hook)
        root.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
        root.register_forward_hook(_root_hook, always_call=True)
    return root


def revert(model: nn.Module) -> nn.Module:
    """Give back plain torch layers holding the same parameter tensors (in place).

    Returns the model (a new object only when the root itself was a converted layer).
    Feedback tensors are dropped.
    """
    from .blockwise import unwrap as _unwrap_blockwise
    _unwrap_blockwise(model)  # hooks and auxiliary heads of bio_ext.blockwise
    root = model
    for pick in (lambda m: isinstance(m, FeedbackLayer),  # layers first, then the modules holding them
                 lambda m: getattr(type(m), "bio_ext_expanded", False)):
        for name, module in list(root.named_modules()):
            if pick(module):
                original = module.to_original()
                if name:
                    _set_child(root, name, original)
                else:
                    root = original
    _points.uninstall(root)
    for m in [model, root, *root.modules()]:
        m.__dict__.pop("_bio_ext", None)
        m.__dict__.pop("_bio_ext_tap", None)
        remove_hooks(m, (_root_pre_hook, _root_hook, output_hook, input_tap_hook))
    return root


def is_converted(model: nn.Module) -> bool:
    return _state(model) is not None or any(isinstance(m, FeedbackLayer) for m in model.modules())


def feedback_layers(model: nn.Module) -> List[Tuple[str, FeedbackLayer]]:
    """The converted layers of ``model`` with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]
