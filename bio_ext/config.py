"""Frozen, validated configuration of a conversion; round-trips to dicts and YAML."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError, ConfigTypeError, Problem, UnknownModeError
from .registry import INIT_SCHEMES, get_mode, mode_names

CONV_ERROR = ("norm", "mean", "sum")
CONV_FEEDBACK = ("kernel", "dense", "factored")  # = bio_ext.functional.CONV_FEEDBACK
GRANULARITY = ("layer", "macro", "micro")
ERROR_AT = ("auto", "output", "head_input")
RADIAL = ("auto", "keep", "drop", "output")  # ConvertConfig.radial; bio_ext.session.FeedbackSession.shape_signal


def unknown_keys(given: Iterable[str], valid: Iterable[str], *, kind: str = "key") -> List[Problem]:
    """A :class:`Problem` per name of ``given`` not in ``valid``, naming the closest valid one (when one is
    close) and listing them all."""
    valid = sorted(valid)
    problems = []
    for k in sorted(set(given) - set(valid), key=str):
        close = difflib.get_close_matches(str(k), valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(Problem(str(k), f"unknown {kind}; {hint}valid {kind}s are {', '.join(valid)}"))
    return problems


def require_bool(name: str, value: Any) -> None:
    """Refuse a flag that is not True or False (``inplace="yes"`` is not taken as True)."""
    if not isinstance(value, bool):
        raise ConfigTypeError([Problem(name, f"must be True or False, got {value!r}")])


class RoundTrip:
    """Dict and YAML round trips of a frozen dataclass config (tuples become lists, mappings dicts);
    ``from_dict`` reports every unknown key at once. ``_WHAT`` names the config in messages."""

    _WHAT = "configuration"

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ConfigError([f"expected a mapping, got {type(data).__name__}"], what=cls._WHAT)
        problems = unknown_keys(data, (f.name for f in dataclasses.fields(cls)))
        if problems:
            raise ConfigError(problems, what=cls._WHAT)
        return cls(**dict(data))

    @classmethod
    def check_keywords(cls, given: Iterable[str], extra: Iterable[str] = (), *, what: str) -> None:
        """Refuse keyword arguments that are not fields of the config (nor ``extra``) with a
        :class:`~bio_ext.errors.ConfigTypeError` naming the closest valid one, instead of Python's bare
        ``TypeError``."""
        problems = unknown_keys(given, {f.name for f in dataclasses.fields(cls)} - {"mode"} | set(extra),
                                kind="keyword argument")
        if problems:
            raise ConfigTypeError(problems, what=what)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str):
        import yaml
        return cls.from_dict(yaml.safe_load(text) or {})


@dataclass(frozen=True)
class ConvertConfig(RoundTrip):
    """Everything :func:`bio_ext.convert` needs besides the model.

    Attributes:
        mode: a registered mode (see :func:`bio_ext.available_modes`).
        output_dim: size of the model output's last dimension, for direct modes;
            inferred from the output layer when None.
        init: feedback initialisation: ``kaiming`` (PyTorch's own default for the
            layer type), ``xavier`` or ``normal`` (std ``1/sqrt(fan_in)``).
        scale: multiplies the feedback's initial standard deviation.
        conv_error: how direct feedback spreads the error over a convolution's output
            grid: ``norm`` (``e / sqrt(H_out W_out)`` at every position, so the spread
            error keeps the norm of ``e``), ``mean`` (``e / (H_out W_out)``, the adjoint of
            global average pooling) or ``sum`` (``e`` everywhere, as biotorch does).
        output_layer: qualified name of the layer whose output is the model output the
            error ``e`` is taken at (default: found from the data flow, the layer the returned
            tensor comes from, e.g. ``fc`` or ``lm_head``: see :mod:`bio_ext.output`); ``""`` taps the root
            module's return value instead. Tapping the output layer lets a loss computed inside ``forward``
            (transformers' ``labels=``) still deliver ``e``.
        include / exclude: glob patterns on qualified module names (``"features.*"``)
            selecting / skipping layers; an excluded module's whole subtree is skipped.
        include_types / exclude_types: class names (``"Linear"`` or
            ``"torch.nn.modules.linear.Linear"``) selecting / skipping layers by type.
        error_at: where direct modes take the error ``e``: ``output`` (the output layer's
            output), ``head_input`` (the output layer's input: the output layer trains on the
            true error and hands ``W^T e`` back, one layer of backprop, so the feedback size
            does not grow with a language model's vocabulary) or ``auto`` (default:
            ``head_input`` when the output layer looks like a vocabulary head: named
            ``lm_head``, tied to an ``nn.Embedding``, or at least 8x wider than its input;
            else ``output``).
        granularity: where direct modes inject feedback: ``layer`` (default, the input of
            every converted layer), ``macro`` (the output of every transformer block, with
            backprop inside blocks) or ``micro`` (the output of every attention and MLP
            sub-layer and block). See :mod:`bio_ext.points`.
        points: explicit module names for the macro/micro feedback points (overrides the
            automatic discovery of blocks and sub-layers).
        seed: seeds the feedback initialisation (None: torch's global RNG). The feedback's stream is
            derived from ``seed`` (:func:`bio_ext.modes.base.feedback_generator`), so it differs from that
            of ``torch.manual_seed(seed)`` even when both use the same number.
        output_key: where the output tensor is in a tuple (int) or dict/ModelOutput
            (str) output; default ``logits`` for mappings, first tensor for tuples.
        options: mode-specific options.
        conv_feedback: shape of a Conv2d's direct feedback (direct family): ``kernel`` (default,
            ``(D, C, kh, kw)`` on the error spread over the output grid), ``dense`` (``(D, C, H, W)``
            on the padded input grid: Nokland's DFA on the flattened activity) or ``factored``
            (``Bc[d, c] Bs[d, h, w]``, ``D (C + H W)`` entries). Memory and cost: see
            :class:`bio_ext.layers.FeedbackConv2d`.
        input_shape: one example's input shape (e.g. ``(3, 32, 32)``), needed by ``dense`` and
            ``factored``: convert() runs one probe forward of zeros to learn each Conv2d's input grid
            and creates the feedback then.
        radial: direct family: what each converted layer does with the component of its injected input
            gradient along its own input, example by example (the part of a step that grows or shrinks the
            activity rather than turning it). ``keep``: the projection as it is (Nokland's DFA); ``drop``:
            removed (:func:`bio_ext.functional.tangential`); ``output``: replaced by the true gradient's
            radial component ``<e_n, z_n>`` (``z`` the output), exact wherever the net above the layer is
            positively homogeneous (ReLU, pooling, dropout, linear maps, biases aside), with the tangential
            part at the error's norm (:func:`bio_ext.functional.output_radial`); ``auto`` (default): the
            mode's own default (``output`` for dfa and grape, ``keep`` for the others), with ``keep`` instead
            of ``output`` when the model holds a module outside :data:`bio_ext.convert.HOMOGENEOUS_TYPES`
            (tanh, GELU, LayerNorm, attention...: logged at ``convert``). Feedback points
            (``granularity='macro'``/``'micro'``) take their projection as it is. Why: BENCHMARKS.md, "Deep
            networks, fourth round".
        tangential: ``True`` is the older spelling of ``radial='drop'``.
        strict: refuse (instead of warning about) modules with parameters that the conversion leaves on
            plain backprop, and converted layers whose weight is used by another module: the rule is in
            :mod:`bio_ext.audit`.
    """

    _WHAT = "bio_ext configuration"

    mode: str = "dfa"
    output_dim: Optional[int] = None
    init: str = "kaiming"
    scale: float = 1.0
    conv_error: str = "norm"
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    include_types: Tuple[str, ...] = ()
    exclude_types: Tuple[str, ...] = ()
    seed: Optional[int] = None
    output_key: Optional[Union[str, int]] = None
    output_layer: Optional[str] = None
    error_at: str = "auto"
    granularity: str = "layer"
    points: Tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    conv_feedback: str = "kernel"
    input_shape: Optional[Tuple[int, ...]] = None
    radial: str = "auto"
    tangential: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.input_shape, list):
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        for name in ("include", "exclude", "include_types", "exclude_types", "points"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value) if value is not None else ())
        options_ok = self.options is None or isinstance(self.options, Mapping)
        object.__setattr__(self, "options", dict(self.options or {}) if options_ok else self.options)
        problems = [] if options_ok else [Problem("options", "must be a mapping of the mode's options "
                                                  f"({{'feedback_lr': 0.05}}), got a {type(self.options).__name__}: "
                                                  f"{self.options!r}")]
        if not isinstance(self.mode, str) or self.mode not in mode_names():
            if len(self.validate_rest()) == 0 and options_ok:
                raise UnknownModeError(self.mode, mode_names())
            problems.append(f"mode: unknown mode {self.mode!r}; valid modes are: {', '.join(mode_names())}")
        problems.extend(self.validate_rest())
        if problems:
            raise (ConfigError if options_ok else ConfigTypeError)(problems, what="bio_ext configuration")

    def resolved_radial(self, not_homogeneous: Sequence[str] = ()) -> str:
        """``radial`` with ``auto`` and ``tangential`` resolved: ``keep``, ``drop`` or ``output`` (``keep`` for
        modes outside the direct family, which inject nothing). ``auto`` takes the mode's default, except that
        ``output`` falls back to ``keep`` when the model has modules that are not positively homogeneous
        (``not_homogeneous``, their names: saturating activations such as tanh, where ``<e, z>`` is not the
        true gradient's radial component)."""
        spec = get_mode(self.mode)
        if spec.family != "direct":
            return "keep"
        if self.tangential:
            return "drop"
        if self.radial != "auto":
            return self.radial
        default = type(spec.rule).__dict__.get("default_radial", "keep")  # not inherited (FeedbackRule.default_radial)
        return "keep" if default == "output" and not_homogeneous else default

    def validate_rest(self):
        problems = []
        if self.output_dim is not None and (isinstance(self.output_dim, bool) or not isinstance(self.output_dim, int)
                                            or self.output_dim < 1):
            problems.append(f"output_dim: must be a positive int or None, got {self.output_dim!r}")
        if self.init not in INIT_SCHEMES:
            problems.append(f"init: {self.init!r} is not one of {', '.join(INIT_SCHEMES)}")
        if isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) \
                and not math.isfinite(self.scale):
            problems.append(Problem("scale", f"must be a finite number > 0, got {self.scale!r}"))
        elif isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            problems.append(f"scale: must be a positive number, got {self.scale!r}")
        if self.conv_error not in CONV_ERROR:
            problems.append(f"conv_error: {self.conv_error!r} is not one of {', '.join(CONV_ERROR)}")
        if not isinstance(self.conv_feedback, str) or self.conv_feedback not in CONV_FEEDBACK:
            problems.append(f"conv_feedback: {self.conv_feedback!r} is not one of {', '.join(CONV_FEEDBACK)}")
        if self.input_shape is not None and (
                not isinstance(self.input_shape, tuple) or not self.input_shape
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.input_shape)):
            problems.append(f"input_shape: must be one example's shape as positive ints (e.g. [3, 32, 32]) or "
                            f"None, got {self.input_shape!r}")
        if not isinstance(self.strict, bool):
            problems.append(f"strict: must be true or false, got {self.strict!r}")
        if not isinstance(self.tangential, bool):
            problems.append(f"tangential: must be true or false, got {self.tangential!r}")
        if not isinstance(self.radial, str) or self.radial not in RADIAL:
            problems.append(f"radial: {self.radial!r} is not one of {', '.join(RADIAL)}")
        elif self.tangential is True and self.radial not in ("auto", "drop"):
            problems.append(Problem("radial", f"{self.radial!r} contradicts tangential=True (which means "
                                    "radial='drop'): set only radial"))
        if self.error_at not in ERROR_AT:
            problems.append(f"error_at: {self.error_at!r} is not one of {', '.join(ERROR_AT)}")
        if self.granularity not in GRANULARITY:
            problems.append(f"granularity: {self.granularity!r} is not one of {', '.join(GRANULARITY)}")
        elif self.granularity != "layer" and isinstance(self.mode, str) and self.mode in mode_names() \
                and get_mode(self.mode).family != "direct":
            problems.append(f"granularity: {self.granularity!r} needs a direct-feedback mode (dfa, "
                            f"grape, ...); mode {self.mode!r} transports its feedback layer by layer: use "
                            "granularity='layer'")
        if self.points and self.granularity == "layer":
            problems.append("points: explicit feedback points need granularity='macro' or 'micro'")
        for name in ("include", "exclude", "include_types", "exclude_types", "points"):
            bad = [v for v in getattr(self, name) if not isinstance(v, str)]
            if bad:
                problems.append(f"{name}: entries must be strings, got {bad!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed: must be an int or None, got {self.seed!r}")
        if self.output_layer is not None and not isinstance(self.output_layer, str):
            problems.append(f"output_layer: must be a module name (str) or None, got {self.output_layer!r}")
        if self.output_key is not None and not isinstance(self.output_key, (str, int)):
            problems.append(f"output_key: must be a str, an int or None, got {self.output_key!r}")
        return problems
