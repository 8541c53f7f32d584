"""convert() and revert(): swap layers for feedback-aware ones and back.

Layer types are handled by functions registered with :func:`register_layer`
(one handler per type). Conversion plans everything first and only then swaps,
so a failed conversion leaves the caller's model untouched.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import audit as _audit
from . import output as _output
from . import points as _points
from ._utils.hooks import remove_hooks
from ._utils.probing import example_input, quiet_forward
from .config import ConvertConfig, require_bool
from .errors import (AlreadyConvertedError, BioExtWarning, ConfigError, ConversionError, FeedbackSignalError,
                     NothingToConvertError,
                     UnsupportedModuleError)
from .layers.base import FeedbackLayer
from .modes import grape_norm
from .modes.base import feedback_generator
from .registry import (Handler, ModeSpec, expander_for, get_method, get_mode, handler_for, method_for, methods,
                       output_size, qualname)
from .session import (ROOT_TAP, FeedbackBank, FeedbackSession, activate, input_tap_hook, output_hook, reset,
                      tap_at_root, untapped_traced_inputs)

log = logging.getLogger(__name__)

#: the one attribute bio_ext writes into a module it does not own: the converted root's state
STATE_ATTR = "_bio_ext"


def _refusal(module: nn.Module) -> Optional[str]:
    """Why converting inside ``module`` would silently do nothing (an attention module bio_ext does not know)."""
    t = type(module)
    if expander_for(module) is not None or getattr(t, "bio_ext_expanded", False):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return ("a subclass of nn.MultiheadAttention with its own forward, which runs on its weight tensors "
                "rather than on child layers")
    own = [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    if own and _points.ATTENTION_NAME.search(t.__name__) and handler_for(module) is None:
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
        fn = expander_for(module)
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
    """Kept on the converted root module as ``model._bio_ext`` (:data:`STATE_ATTR`); :func:`state_of` reads it."""

    config: ConvertConfig
    mode: ModeSpec
    output_dim: Optional[int]
    layer_names: List[str]
    output_layer: Optional[str] = None
    points: List[str] = field(default_factory=list)
    #: the output layer convert() guessed without an example input, until a forward has confirmed it
    #: (:mod:`bio_ext.output`); None once confirmed, or when it was given or found by a probe
    expected_output: Optional[str] = None
    #: whether a probe forward has looked for converted layers' weights used outside their forward (:mod:`bio_ext.audit`)
    weights_checked: bool = False
    bank: FeedbackBank = field(default_factory=FeedbackBank)
    stack: List[Any] = field(default_factory=list)
    #: the converted layer modules, looked up once (the error tap takes their inputs under torch.compile)
    layers: Optional[Tuple[nn.Module, ...]] = None
    untapped: Any = None
    #: ``config.radial`` as resolved for this model at convert (what each forward's session applies)
    radial: str = "keep"

    def __deepcopy__(self, memo):
        return BioExtState(self.config, self.mode, self.output_dim, list(self.layer_names), self.output_layer,
                           list(self.points), self.expected_output, radial=self.radial)

    def __getstate__(self):
        return {"config": self.config.to_dict(), "mode": self.mode.name, "output_dim": self.output_dim,
                "layer_names": self.layer_names, "output_layer": self.output_layer, "points": self.points,
                "expected_output": self.expected_output, "radial": self.radial}

    def __setstate__(self, s):
        config = ConvertConfig.from_dict(s["config"])
        self.__init__(config, get_mode(s["mode"]), s["output_dim"], s["layer_names"], s["output_layer"],
                      s.get("points", []), s.get("expected_output"),
                      # pickled before ConvertConfig.radial: what it trained with (the projection, or tangential's)
                      radial=s.get("radial", "drop" if config.resolved_radial() == "drop" else "keep"))


def state_of(model: nn.Module) -> Optional[BioExtState]:
    """The conversion state of a model converted by :func:`convert` (None for any other module)."""
    return model.__dict__.get(STATE_ATTR)


@torch._dynamo.disable
def _first_forward_hook(module: nn.Module, args, kwargs):
    """The first forward with autograd of a model converted without a probe: look for converted layers' weights
    used outside their forward (:mod:`bio_ext.audit`), warn or (``strict``) refuse, before the forward runs."""
    state = state_of(module)
    if state is None or state.weights_checked or not torch.is_grad_enabled():
        return None
    state.weights_checked = True
    remove_hooks(module, (_first_forward_hook,))  # once: later (compiled) forwards do not break on it
    recorder = _audit.WeightUses(module, state.layer_names)
    if state.mode.family == "direct" and state.expected_output is not None:
        _output.settle(module, state, args, kwargs, recorder)  # finds the output layer in the same probe
    else:
        _, _, returned = _output.probe_own_forward(module, state, args, kwargs, recorder)
        if state.mode.family == "direct":
            _output.mark_root_tap(module, state, returned)
    _mark_outside_uses(module, recorder)
    _audit.refuse_or_warn([], recorder.uses(), state.config.strict, state.mode.name, " (found at the first forward)")
    return None


def _mark_outside_uses(root: nn.Module, recorder) -> None:
    for name in state_of(root).layer_names:
        layer = root.get_submodule(name)
        layer.weight_used_outside = tuple(sorted(recorder.found.get(name or "<root>", ())))


@torch._dynamo.disable  # session logic stays out of torch.compile's graphs (ContextVar, forward-AD levels)
def _root_pre_hook(module: nn.Module, args, kwargs):
    """Open the forward's feedback session (and let the mode's rule prepare the forward)."""
    state = state_of(module)
    if state is None:
        return None
    session = None
    if torch.is_grad_enabled():
        if state.expected_output is not None:
            _output.settle(module, state, args, kwargs)
        session = FeedbackSession(state.bank, state.output_dim, state.mode.rule)
        session.radial = state.radial
        session.owner = module
        if state.layers is None:
            state.layers = tuple(module.get_submodule(n) for n in state.layer_names)
        session.traced_layers = state.layers
        state.mode.rule.open_forward(session, module, args, kwargs, state.config.options)
    state.stack.append((activate(session), session))
    return None


@torch._dynamo.disable
def _root_hook(module: nn.Module, args, output):
    """Close the forward's session (always called, also when the forward raised)."""
    state = state_of(module)
    if state is None or not state.stack:
        return None
    token, session = state.stack.pop()
    replaced = None
    try:
        if session is not None:
            if state.mode.rule.traces_under_compile and state.output_layer is not None:
                tapped = tap_at_root(module.get_submodule(state.output_layer), output, session, state.output_dim,
                                     state.config.output_key)
                replaced, output = (tapped if tapped is not output else None), tapped
            session.rule.close_forward(session, module, output)
            late = untapped_traced_inputs(session.traced_layers)
            if late and output is not None:
                raise FeedbackSignalError(
                    f"under torch.compile, converted layer(s) {', '.join(type(m).__name__ for m in late)} ran after "
                    "the model's output layer in this forward, so the output error cannot reach them; run them "
                    "before the output layer, or exclude them (exclude=[...])")
    finally:
        reset(token)
        if session is not None:
            session.close()
            # an untapped session (a reentrant checkpoint segment holding the output layer, whose recompute
            # taps it) has no autograd node holding it: kept until the model's next forward
            state.untapped = None if session.tapped else session
    return replaced


# --------------------------------------------------------------------------- planning


def _matches(name: str, module: nn.Module, patterns: Sequence[str], types: Sequence[str]) -> bool:
    if any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return True
    t = type(module)
    return any(s in (t.__name__, qualname(t)) or isinstance(module, _resolve(s)) for s in types)


def _resolve(name: str) -> Union[type, Tuple[()]]:
    modname, _, attr = name.rpartition(".")
    mod = sys.modules.get(modname) if modname else None
    obj = getattr(mod, attr, None) if mod is not None else getattr(nn, name, None)
    return obj if isinstance(obj, type) else ()


def _plan(model: nn.Module, cfg: ConvertConfig) -> Tuple[List[Tuple[str, Handler]], List[str], Tuple[Optional[str],
                                                                                               Optional[str]]]:
    """The layers to convert, the modules refused, and (the last registered Linear/Conv1D, the last module
    with a handler): the output layer guessed when no probe can tell (:func:`bio_ext.output.choose`)."""
    selected: List[Tuple[str, Handler]] = []
    refused: List[str] = []
    skipped_prefixes: List[str] = []
    last_out: Optional[str] = None
    last_handled: Optional[str] = None
    for name, module in model.named_modules():
        if output_size(module) is not None:
            last_out = name
        if handler_for(module) is not None:
            last_handled = name
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
        handler = handler_for(module)
        if handler is None:
            continue
        if (cfg.include or cfg.include_types) and not _matches(name, module, cfg.include, cfg.include_types):
            continue
        selected.append((name, handler))
    return selected, refused, (last_out, last_handled)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _as_config(mode, kwargs) -> ConvertConfig:
    ConvertConfig.check_keywords(kwargs, ("inplace",), what="convert() keyword arguments")
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
    inc_t = tuple(qualname(t) if isinstance(t, type) else t for t in inc_t)
    exc_t = tuple(qualname(t) if isinstance(t, type) else t for t in exc_t)
    return ConvertConfig(mode=mode, include=include, exclude=exclude, include_types=inc_t,
                         exclude_types=exc_t, **kwargs)


def convert(model: nn.Module, mode: Union[str, ConvertConfig] = "dfa", *, output_dim: Optional[int] = None,
            inplace: bool = False, **options: Any) -> nn.Module:
    """Swap the model's Linear, Conv2d and transformers Conv1D layers for feedback-aware ones.

    Args:
        model: any ``nn.Module``.
        mode: a registered mode name (``bp``, ``fa``, ``dfa``, ``usf``, ``brsf``,
            ``frsf``, ...), a whole-model method (``bwbpf``: :mod:`bio_ext.blockwise`),
            or a full :class:`ConvertConfig` (or a method's config).
        output_dim: size of the output's last dimension, for direct modes
            (default: the ``out_features`` of the output layer, found from the data flow: :mod:`bio_ext.output`).
        inplace: convert ``model`` itself; by default a deep copy is converted and
            ``model`` is left as it was.
        **options: any other field of :class:`ConvertConfig` (``include``,
            ``exclude`` (glob patterns or types), ``init``, ``scale``, ``seed``,
            ``conv_error``, ``conv_feedback`` and ``input_shape`` (the shape of a Conv2d's
            direct feedback: :class:`bio_ext.layers.conv2d.FeedbackConv2d`), ``tangential``,
            ``output_key``, ``options``).

    The converted layers reuse the original parameter tensors. The training loop
    stays unchanged: ``loss_fn(model(x), y).backward()`` delivers the mode's
    gradients. Raises a :class:`~bio_ext.errors.BioExtError` subclass (a
    ``ValueError`` or ``TypeError``) on bad input, leaving ``model`` untouched.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    require_bool("inplace", inplace)
    method = get_method(mode) or method_for(mode)
    if method is not None:  # a whole-model method (block-wise local losses)
        return method.apply(model, config=mode if isinstance(mode, method.config_type) else None, inplace=inplace,
                            **options)
    cfg = _config_of(mode, output_dim, options)
    spec = get_mode(cfg.mode)
    problems = spec.rule.validate_options(cfg.options)
    if problems:
        raise ConfigError(problems, what=f"options of mode {spec.name!r}")
    _warn_inapplicable(cfg, spec)

    converted = [n for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]
    if converted or state_of(model) is not None:
        raise AlreadyConvertedError(
            f"the model is converted already (converted layers: {converted[:5] or ['<root>']}); call "
            "bio_ext.revert(model) (a plain copy) instead, or the original model")

    work = model if inplace else copy.deepcopy(model)
    expanded = _expand(work, cfg)
    try:
        root = _convert_planned(work, cfg, spec)
    except BaseException:
        if inplace:
            _unexpand(work, expanded)
        raise
    log.info("converted %s to mode %r (%s granularity, %d layers, %d feedback points)", type(model).__name__,
             spec.name, cfg.granularity, len(state_of(root).layer_names), len(state_of(root).points))
    return root


#: options that only direct-family modes read (the error's size and where it is taken, how a convolution
#: spreads it): a local or bp mode ignores them
DIRECT_ONLY = ("output_dim", "conv_error", "output_layer", "output_key", "error_at")


def _warn_inapplicable(cfg: ConvertConfig, spec: ModeSpec) -> None:
    """One warning listing the options set away from their defaults that ``spec``'s family ignores.

    A warning, not an error: one benchmark config's convert options are shared by every mode of its
    sweep (``[fa, dfa]`` with ``conv_error: sum``), and refusing would make such sweeps impossible."""
    if spec.family == "direct":
        return
    default = ConvertConfig()
    moot = [f"{k}={getattr(cfg, k)!r}" for k in DIRECT_ONLY if getattr(cfg, k) != getattr(default, k)]
    if moot:
        warnings.warn(f"{', '.join(moot)} has no effect in mode {spec.name!r} ({spec.family} family: the feedback "
                      "is transported layer by layer, no output error is projected); it applies to direct modes "
                      "(dfa, drtp, grape). Leave it unset for this mode.", BioExtWarning, stacklevel=3)


def _config_of(mode, output_dim: Optional[int], options) -> ConvertConfig:
    if not isinstance(mode, ConvertConfig):
        return _as_config(mode, dict(options, output_dim=output_dim))
    if options or output_dim is not None:
        return ConvertConfig.from_dict({**mode.to_dict(), **options,
                                        **({"output_dim": output_dim} if output_dim is not None else {})})
    return mode


def _convert_planned(target: nn.Module, cfg: ConvertConfig, spec: ModeSpec) -> nn.Module:
    """Plan on ``target`` (which may be modified only once nothing can fail), then swap."""
    layered = cfg.granularity == "layer"
    selected, refused, last = _plan(target, cfg)
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
    guess = _output.choose(target, cfg, *last, traced=spec.rule.traces_under_compile) if spec.family == "direct" \
        else None
    out = _output.find(target, cfg, spec, guess) if guess is not None else _output.Output(dim=cfg.output_dim)
    if out.at_input:
        selected = [(n, h) for n, h in selected if n != out.layer]  # trains on the true error
    uses = None
    if layered and spec.family != "bp":
        by_design = {out.layer} if out.at_input else set()
        names = [n for n, _ in selected]
        uses = _audit.probe_outside_uses(target, names, cfg.input_shape) if cfg.input_shape is not None else None
        _audit.report(target, cfg, spec.name, set(names) | by_design, _matches, uses.uses() if uses else ())
    n_points = len(selected) if layered else len(point_plan) + 1
    if spec.rule.forward_gradient and n_points < 2:
        raise NothingToConvertError(
            f"mode {spec.name!r} perturbs the inputs of converted layers after the first, and "
            f"{type(target).__name__} has {len(selected)} layer(s) to convert: there is nothing to perturb. "
            "Use 'dfa' for a single layer, or convert a deeper model.")
    generator = feedback_generator(cfg.seed) if cfg.seed is not None else None
    grids = _conv_input_grids(target, selected, cfg) if spec.family == "direct" and cfg.conv_feedback != "kernel" \
        else {}
    new_layers = []
    for name, handler in selected:
        new = handler(target.get_submodule(name) if name else target, spec)
        new.setup_feedback(output_dim=out.dim, init=cfg.init, scale=cfg.scale, generator=generator,
                           conv_error=cfg.conv_error, conv_feedback=cfg.conv_feedback, input_size=grids.get(name))
        new.mode_options = dict(cfg.options)
        spec.rule.prepare(new, generator)
        new_layers.append((name, new))
    # every layer is built: nothing below can fail, so the model is never half converted
    root = _install(target, cfg, spec, out, new_layers, point_plan, generator, guess)
    if uses is not None:
        state_of(root).weights_checked = True
        remove_hooks(root, (_first_forward_hook,))
        _mark_outside_uses(root, uses)
    return root


#: leaf module types through which the output is positively homogeneous in a layer's input, biases aside:
#: ``radial='auto'`` gives ``output`` only where every leaf is one. BatchNorm is among them although, for one example
#: of a batch, it is affine rather than homogeneous; there, and across operations a forward writes itself (a ResNet's
#: residual additions), ``<e, z>`` approximates the radial part (measured: BENCHMARKS.md, "Deep networks, fourth round")
HOMOGENEOUS_TYPES: Tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)


def not_homogeneous(model: nn.Module) -> List[str]:
    """Names of ``model``'s leaf modules that are neither converted layers nor of :data:`HOMOGENEOUS_TYPES`."""
    return [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
            if not any(True for _ in m.children()) and not isinstance(m, HOMOGENEOUS_TYPES + (FeedbackLayer,))]


def _install(target: nn.Module, cfg: ConvertConfig, spec: ModeSpec, out: _output.Output, new_layers, point_plan,
             generator, guess: Optional[_output.Guess]) -> nn.Module:
    root = target
    for name, new in new_layers:
        if name:
            _set_child(target, name, new)
        else:
            root = new
    point_names = _points.install(root, point_plan, spec, out.dim, cfg.init, cfg.scale, generator,
                                  dict(cfg.options)) if point_plan else []
    expected = guess.expected if guess is not None else None
    root.__dict__[STATE_ATTR] = BioExtState(cfg, spec, out.dim, [n for n, _ in new_layers], out.layer, point_names,
                                            expected)
    if spec.family == "direct":
        state = state_of(root)
        blockers = not_homogeneous(root)
        state.radial = cfg.resolved_radial(blockers)
        log.info("%s: the radial part of each injected signal is %s (radial=%r%s)", spec.name,
                 {"keep": "kept as projected", "drop": "dropped",
                  "output": "the true gradient's, <e, z> (exact above positively homogeneous layers)"}[state.radial],
                 cfg.radial, f"; not positively homogeneous: {', '.join(blockers[:3])}" if blockers else "")
        for _, new in new_layers:
            new.tap_takes_traced = True
        tap_module = root.get_submodule(out.layer)
        if out.at_input:
            tap_module.register_forward_pre_hook(functools.partial(input_tap_hook, (out.dim, cfg.output_key)))
        else:
            tap_module.register_forward_hook(functools.partial(output_hook, (out.dim, cfg.output_key)))
    if cfg.granularity == "layer" and spec.family != "bp":
        root.register_forward_pre_hook(_first_forward_hook, with_kwargs=True)
    if spec.family == "direct":
        root.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
        root.register_forward_hook(_root_hook, always_call=True)
        if guess is not None and guess.returned:
            _output.mark_root_tap(root, state_of(root), {out.layer})
    if spec.rule.forward_gradient:
        grape_norm.hook_modules(root)  # exact tangents of plain layers in fewer passes (modes/grape_norm.py)
    return root


def _conv_input_grids(target: nn.Module, selected, cfg: ConvertConfig) -> Dict[str, Tuple[int, int]]:
    """``{name: (H, W)}`` of the input each selected Conv2d receives, from one probe forward of zeros of
    ``cfg.input_shape`` (batch 2, eval mode, no grad, training flags restored): the grid that the
    ``dense``/``factored`` conv feedback lives on. Empty when ``input_shape`` is None."""
    if cfg.input_shape is None:
        return {}
    grids: Dict[str, Tuple[int, int]] = {}
    handles = []
    for name, _ in selected:
        module = target.get_submodule(name) if name else target
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: grids.setdefault(name, tuple(args[0].shape[-2:])) and None))
    if not handles:
        return grids
    try:
        x = example_input(target, cfg.input_shape)
        with quiet_forward(target, grad=False):
            target(x)
    except Exception as exc:
        raise ConversionError(
            f"conv_feedback={cfg.conv_feedback!r}: the probe forward of zeros of input_shape={cfg.input_shape} "
            f"failed ({type(exc).__name__}: {exc}); pass one example's shape, e.g. (3, 32, 32)") from exc
    finally:
        for h in handles:
            h.remove()
    return grids


def detach_feedback(model: nn.Module) -> None:
    """Remove the feedback session hooks of a converted ``model`` (root and output tap) while keeping its
    converted layers: for a method that opens sessions of its own (block-wise training with a direct
    ``layer_mode`` gives every block a session fed by its local error)."""
    for m in model.modules():
        _remove_session_hooks(m)
        if isinstance(m, FeedbackLayer):
            m.tap_takes_traced = False


#: a key of the ``copy.deepcopy`` memo of :func:`revert`'s copy: state objects that refuse to be deep-copied
#: (a block-wise wrapper's) copy themselves when they find it, since the copy is reverted straight away
REVERT_COPY = "bio_ext.revert-copy"


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Give back plain torch layers: the same contract as :func:`convert`.

    Args:
        model: a module converted by :func:`convert` (or wrapped by a whole-model method such as
            ``bwbpf``); any other module is returned as it is (copied unless ``inplace``).
        inplace: revert ``model`` itself, which is then no longer converted, and hand its parameter
            tensors to the plain layers. By default a deep copy of ``model`` is reverted: ``model`` stays
            converted and keeps training in its mode, and the plain model holds *copies* of its parameters
            (as ``convert``'s copy does of the original's), so training one does not move the other.

    Returns the plain model (with ``inplace=True`` a new object only when the root itself was a converted
    layer). Feedback tensors are dropped; whole-model methods (block-wise heads and hooks) are undone too.
    Raises :class:`~bio_ext.errors.ConfigTypeError` when ``inplace`` is not a bool.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"revert() expects a torch.nn.Module, got {type(model).__name__}")
    require_bool("inplace", inplace)
    root = model if inplace else copy.deepcopy(model, {REVERT_COPY: True})
    for method in methods():
        if method.revert is not None:
            method.revert(root)
    work = root
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
    for m in [work, root, *root.modules()]:
        m.__dict__.pop(STATE_ATTR, None)
        _remove_session_hooks(m)
    return root


def _remove_session_hooks(m: nn.Module) -> None:
    """Take ``convert``'s hooks (first-forward check, session, error tap, GrAPE's BatchNorm tangent) and the
    root-tap mark off ``m``."""
    remove_hooks(m, (_first_forward_hook, _root_pre_hook, _root_hook, output_hook, input_tap_hook,
                     grape_norm.take_tangent, grape_norm.give_tangent))
    m.__dict__.pop(ROOT_TAP, None)


def is_converted(model: nn.Module) -> bool:
    return state_of(model) is not None or any(isinstance(m, FeedbackLayer) for m in model.modules())


def feedback_layers(model: nn.Module) -> List[Tuple[str, FeedbackLayer]]:
    """The converted layers of ``model`` with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]
