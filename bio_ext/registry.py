"""Every table bio_ext looks things up in, filled by decorators where the things are defined.

* **layer handlers**: module type -> function building its feedback-aware replacement, plus the
  type's output size (how a Linear-like output layer tells ``output_dim``). Types are keys, or
  qualified names (``"transformers.pytorch_utils.Conv1D"``) resolved lazily at lookup, so a
  library that is not imported (or not installed) costs nothing and is still found first time;
* **expanders**: module types whose forward does not call their children (``nn.MultiheadAttention``)
  -> function rebuilding them as an equivalent module that does;
* **tangent rules**: module type -> the exact forward-mode tangent of its output, in fewer passes than torch's
  own formulas (GrAPE's plain layers: :mod:`bio_ext.modes.grape_norm`);
* **modes**: name -> :class:`ModeSpec` (a rule converting layer by layer, see :mod:`bio_ext.modes`);
* **methods**: name -> a whole-model method (``bwbpf``: block-wise local losses) that ``convert``
  hands the model to instead of converting its layers.

This module imports nothing of bio_ext but its exceptions, so every other module may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

from .errors import ConfigError, UnknownModeError

Handler = Callable[[Any, "ModeSpec"], Any]
TypeKey = Union[type, str]

FAMILIES = ("bp", "local", "direct")
#: feedback initialisation schemes (:func:`bio_ext.modes.base.random_feedback` draws them)
INIT_SCHEMES = ("kaiming", "xavier", "normal")

_HANDLERS: Dict[TypeKey, Handler] = {}
_OUTPUT_SIZE: Dict[TypeKey, Callable[[Any], int]] = {}
_EXPANDERS: Dict[TypeKey, Callable[[Any], Any]] = {}
_TANGENT_RULES: Dict[TypeKey, Callable[..., Any]] = {}
_MODES: Dict[str, "ModeSpec"] = {}
_METHODS: Dict[str, "MethodSpec"] = {}


def qualname(t: type) -> str:
    """``module.QualifiedName`` of a class: how types are named in configs and lazy registrations."""
    return f"{t.__module__}.{t.__qualname__}"


def _lookup(table: Dict[TypeKey, Any], t: type):
    if t in table:
        return table[t]
    return table.get(qualname(t))


# --------------------------------------------------------------------------- layer handlers


def register_layer(*types: TypeKey, output_size: Optional[Callable[[Any], int]] = None):
    """Decorator registering the handler that converts modules of exactly these types (classes, or
    qualified class names for libraries bio_ext does not import)."""

    def deco(fn: Handler) -> Handler:
        for t in types:
            _HANDLERS[t] = fn
            if output_size is not None:
                _OUTPUT_SIZE[t] = output_size
        return fn

    return deco


def handler_for(module: Any) -> Optional[Handler]:
    """The handler of the module's exact type, or of a base type whose forward it does not override."""
    t = type(module)
    found = _lookup(_HANDLERS, t)
    if found is not None:
        return found
    for base in t.__mro__[1:]:
        found = _lookup(_HANDLERS, base)
        if found is not None:
            return found if t.forward is base.forward else None
    return None


def output_size(module: Any) -> Optional[int]:
    """Size of the output's last dimension of a registered Linear-like layer, else None."""
    for t in type(module).__mro__:
        fn = _lookup(_OUTPUT_SIZE, t)
        if fn is not None:
            return fn(module)
    return None


# --------------------------------------------------------------------------- expanders


def register_expander(*types: TypeKey):
    """Decorator registering a function that rebuilds modules of exactly these types as equivalent
    modules whose projections are child layers. The rebuilt module's class sets
    ``bio_ext_expanded = True`` and has ``to_original()``, which :func:`bio_ext.revert` calls."""

    def deco(fn):
        for t in types:
            _EXPANDERS[t] = fn
        return fn

    return deco


def expander_for(module: Any) -> Optional[Callable[[Any], Any]]:
    return _lookup(_EXPANDERS, type(module))


# --------------------------------------------------------------------------- tangent rules


def register_tangent_rule(*types: TypeKey):
    """Decorator registering ``rule(module, x, t, output) -> tangent of output`` (``x`` the module's primal input,
    ``t`` its tangent) for modules of exactly these types (classes, or qualified class names)."""

    def deco(fn):
        for t in types:
            _TANGENT_RULES[t] = fn
        return fn

    return deco


def tangent_rule_for(module: Any) -> Optional[Callable[..., Any]]:
    """The tangent rule of the module's exact type (a subclass may do anything in its forward), or None."""
    return _lookup(_TANGENT_RULES, type(module))


# --------------------------------------------------------------------------- modes and methods


@dataclass(frozen=True)
class ModeSpec:
    """A registered mode: its name, family (``bp``, ``local``, ``direct``), rule and one-line description."""

    name: str
    family: str
    rule: Any
    description: str


@dataclass(frozen=True)
class MethodSpec:
    """A registered whole-model method: ``apply(model, config=config_or_None, inplace=..., **options)``
    builds it, ``revert(model)`` (in place) undoes it; :func:`bio_ext.revert` calls every method's (on
    its own copy unless ``inplace=True``). ``alignment(model, x, y, loss_fn)`` (optional) gives
    ``{layer: {quantity: degrees}}`` for a model the method built and None for any other:
    :func:`bio_ext.alignment` asks it first."""

    name: str
    apply: Callable[..., Any]
    config_type: type
    description: str
    revert: Optional[Callable[[Any], Any]] = None
    alignment: Optional[Callable[..., Any]] = None


def add_mode(spec: ModeSpec, *, overwrite: bool = False) -> None:
    if spec.family not in FAMILIES:
        raise ConfigError([f"family {spec.family!r} is not one of {', '.join(FAMILIES)}"], what="mode registration")
    if (spec.name in _MODES or spec.name in _METHODS) and not overwrite:
        raise ConfigError([f"mode {spec.name!r} is registered already; pass overwrite=True to replace it"],
                          what="mode registration")
    _MODES[spec.name] = spec


def remove_mode(name: str) -> None:
    """Unregister a mode (tests that register their own modes clean up with it)."""
    _MODES.pop(name, None)


def register_method(name: str, *, config_type: type, description: str,
                    revert: Optional[Callable[[Any], Any]] = None, alignment: Optional[Callable[..., Any]] = None):
    """Decorator registering a whole-model method under ``name`` (``convert(model, name)`` calls it)."""

    def deco(fn):
        _METHODS[name] = MethodSpec(name, fn, config_type, description, revert, alignment)
        return fn

    return deco


def methods() -> list:
    """The registered whole-model methods."""
    return list(_METHODS.values())


def mode_names() -> list:
    """Names of the registered layer-by-layer modes."""
    return sorted(_MODES)


def all_names() -> list:
    """Names of every registered mode and whole-model method."""
    return sorted({*_MODES, *_METHODS})


def get_mode(name: object) -> ModeSpec:
    """The registered layer-by-layer mode ``name``; :class:`UnknownModeError` (listing every valid name) otherwise."""
    if not isinstance(name, str) or name not in _MODES:
        raise UnknownModeError(name, all_names())
    return _MODES[name]


def get_method(name: object) -> Optional[MethodSpec]:
    """The whole-model method registered as ``name`` (``bwbpf``), or None."""
    return _METHODS.get(name) if isinstance(name, str) else None


def method_for(config: object) -> Optional[MethodSpec]:
    """The method whose config type ``config`` is an instance of, or None."""
    return next((m for m in _METHODS.values() if isinstance(config, m.config_type)), None)


def available_modes() -> Dict[str, str]:
    """Registered modes and whole-model methods, with their one-line descriptions."""
    out = {k: v.description for k, v in _MODES.items()}
    out.update({k: v.description for k, v in _METHODS.items()})
    return dict(sorted(out.items()))


def check_mode(name: object) -> None:
    """Raise :class:`UnknownModeError` unless ``name`` is a registered mode or method."""
    if not isinstance(name, str) or (name not in _MODES and name not in _METHODS):
        raise UnknownModeError(name, all_names())
