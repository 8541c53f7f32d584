"""Training modes as registered rules: the base rule, its helpers, and :func:`register_mode`.

A mode is a :class:`FeedbackRule` registered under a name with
:func:`register_mode`. The rule says which *family* the mode belongs to and how
its feedback tensors are made; the layers and autograd Functions are shared by
every mode of a family:

``bp``
    plain autograd, no feedback tensor of its own.
``local``
    Feedback Alignment family: the layer's input gradient is ``grad_output``
    multiplied by a weight-shaped feedback tensor instead of the weight.
``direct``
    Direct Feedback Alignment family: the layer's input gradient is the model's
    output error ``e`` multiplied by a ``(output_dim, K)`` feedback matrix.

Adding a mode is registering a rule::

    @bio_ext.register_mode("my_fa", family="local")
    class MyFA(bio_ext.FeedbackRule):
        def effective(self, layer):
            return layer.feedback * 0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import ConfigError, Problem
from ..registry import FAMILIES, INIT_SCHEMES, ModeSpec, add_mode


def init_bound(scheme: str, fan_in: int, fan_out: int) -> float:
    """Standard deviation of the named initialisation for a ``fan_in -> fan_out`` map."""
    if scheme == "kaiming":  # PyTorch's default for Linear/Conv (kaiming_uniform_, a=sqrt(5))
        return 1.0 / math.sqrt(3.0 * fan_in)
    if scheme == "xavier":
        return math.sqrt(2.0 / float(fan_in + fan_out))
    if scheme == "normal":
        return 1.0 / math.sqrt(fan_in)
    raise ConfigError([f"unknown init {scheme!r}; valid: {', '.join(INIT_SCHEMES)}"])


def check_scale(magnitude: float, dtype: torch.dtype, scale: float) -> None:
    """Refuse a ``scale`` whose feedback entries (up to ``magnitude``) would not be finite in ``dtype``."""
    if not math.isfinite(magnitude) or (dtype.is_floating_point and magnitude > torch.finfo(dtype).max):
        raise ConfigError([Problem("scale", f"{scale!r} makes feedback entries of about {magnitude:.3g}, which "
                                   f"overflow {dtype} (max {torch.finfo(dtype).max:.3g} when floating): use a "
                                   "scale that keeps the feedback finite (scale=1 matches the init's std)")])


def random_feedback(
    shape: Tuple[int, ...],
    fan_in: int,
    fan_out: int,
    *,
    scheme: str,
    scale: float,
    generator: Optional[torch.Generator],
    like: torch.Tensor,
) -> torch.Tensor:
    """A random tensor with the statistics of the named initialisation, times ``scale``.

    ``kaiming`` and ``xavier`` are uniform with the standard deviation returned by
    :func:`init_bound`; ``normal`` is Gaussian with std ``1/sqrt(fan_in)``.
    """
    std = init_bound(scheme, fan_in, fan_out) * scale
    check_scale(std * 6.0, like.dtype, scale)  # a uniform's bound is std * sqrt(3); a normal's tail ~ 6 std
    out = torch.empty(shape, dtype=like.dtype)
    if scheme == "normal":
        out.normal_(0.0, std, generator=generator)
    else:
        bound = std * math.sqrt(3.0)
        out.uniform_(-bound, bound, generator=generator)
    return out.to(like.device)


def feedback_generator(seed: int) -> torch.Generator:
    """The generator that draws the feedback of ``convert(..., seed=seed)``.

    Its stream is derived from ``seed`` by a hash, so it never equals the stream of
    ``torch.manual_seed(seed)``: seeding the model's initialisation and the conversion with the
    same number (the common pattern) does not make the feedback a copy of the initial weights.
    """
    import hashlib
    digest = hashlib.blake2b(f"bio_ext.feedback:{int(seed)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass(frozen=True)
class FeedbackSpec:
    """What a layer tells a rule about itself when its feedback is created.

    ``shape`` is the feedback tensor's shape; ``fan_in``/``fan_out`` describe the
    map the feedback stands for (for the local family, the layer's own; for the
    direct family, ``K -> output_dim``).
    """

    shape: Tuple[int, ...]
    fan_in: int
    fan_out: int
    init: str
    scale: float


class FeedbackRule:
    """How one mode makes and uses its feedback tensors.

    Subclasses set nothing but what differs: :meth:`create` returns the buffers to
    register on the layer (``feedback`` at least), :meth:`effective` the tensor the
    backward multiplies by. Rules are stateless; state lives in layer buffers so
    that ``state_dict`` carries it, and per-forward state in ``session.rule_state``.

    Direct-family rules can take part in every stage of a step through hooks that are
    no-ops here: :meth:`open_forward` / :meth:`close_forward` around the model's forward,
    :meth:`enter` when a layer is about to use the tensor its feedback is injected at,
    :meth:`on_output` on the output tensor before the error tap, :meth:`before_projection`
    and :meth:`error_signal` when the output error arrives, :meth:`after_projection` once it is projected. GrAPE (:mod:`bio_ext.modes.grape`)
    is written entirely through them.
    """

    family: str = "local"
    #: direct family: what ``ConvertConfig.radial='auto'`` resolves to for this mode (see there). Only a rule's
    #: own class declares it: a rule derived from another is another method, measured (or not) on its own
    default_radial: str = "keep"
    #: whether :meth:`effective` must be recomputed at every forward
    dynamic: bool = False
    #: whether the mode needs forward-mode tangents (direct family; see :mod:`bio_ext.modes.grape`)
    forward_gradient: bool = False
    #: whether :meth:`error_signal` replaces the output error before it is projected (direct family)
    transforms_error: bool = False
    #: whether, under ``torch.compile``, converted layers may take the traceable path that leaves the rule's
    #: :meth:`enter` out (direct family: :meth:`bio_ext.layers.FeedbackLayer.traces_direct`); a rule that
    #: does anything in :meth:`enter` or :meth:`on_output` must leave it False
    traceable: bool = False
    #: buffers of :meth:`create` kept out of ``state_dict`` (counters for diagnosis: checkpoints written
    #: before such a buffer existed still load strictly)
    transient_buffers: Tuple[str, ...] = ()

    @property
    def traces_under_compile(self) -> bool:
        """Whether converted layers take the traceable path under ``torch.compile``: the rule says it is
        ``traceable`` and needs no forward-mode tangents."""
        return self.traceable and not self.forward_gradient

    def validate_options(self, options: Mapping[str, Any]) -> List[Problem]:
        """Problems with the mode-specific ``options`` (every one)."""
        return [Problem(f"options.{k}", "mode takes no options") for k in options]

    def create(self, weight: torch.Tensor, spec: "FeedbackSpec",
               generator: Optional[torch.Generator]) -> Dict[str, torch.Tensor]:
        fb = random_feedback(spec.shape, spec.fan_in, spec.fan_out, scheme=spec.init,
                             scale=spec.scale, generator=generator, like=weight)
        return {"feedback": fb}

    def effective(self, layer) -> torch.Tensor:
        return layer.feedback

    def prepare(self, layer, generator: Optional[torch.Generator]) -> None:
        """Called by :func:`bio_ext.convert` once per converted layer, after :meth:`create`'s buffers are
        installed and ``layer.mode_options`` is set: a rule registers here the buffers that depend on its
        options (PEPITA's weight-mirroring matrices). A no-op here."""

    def probe_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """The options for a pass that measures the mode without changing its state (:func:`bio_ext.alignment`)."""
        return dict(options)

    # ----------------------------------------------------------------- hooks of the direct family's step

    def open_forward(self, session, module, args, kwargs, options: Mapping[str, Any]) -> None:
        """The converted model's forward starts (``session`` is about to become current)."""

    def enter(self, session, layer, x: torch.Tensor, info: Any = None):
        """``layer`` is about to use ``x``, where its feedback is injected: reserve its slot (-1: none)
        and return ``(slot, x)``."""
        if session.tangent_only or not x.requires_grad:
            return -1, x
        return session.register_layer(layer, info), x

    def primal_output(self, session, layer, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A converted Linear or Conv2d's output for input ``x`` (its primal): ``compute()``, the layer's product,
        or what the rule already has for it (GrAPE's tangent-only replays reuse the real forward's products)."""
        return compute()

    def on_output(self, session, output: torch.Tensor) -> torch.Tensor:
        """The model's output tensor, before the error tap: returns the tensor to tap."""
        return output

    def close_forward(self, session, module, output) -> None:
        """The converted model's forward ended (also after an exception; ``output`` is then None)."""

    def before_projection(self, session, e: torch.Tensor) -> None:
        """The output error ``e`` (``N x D``) arrived; the feedback is projected right after."""

    def error_signal(self, e: torch.Tensor) -> torch.Tensor:
        """The signal the feedback projects, given the output error ``e`` (``N x D``)."""
        return e

    def after_projection(self, session, e: torch.Tensor) -> None:
        """The projections of the output error ``e`` (``N x D``) have been computed (``session.proj``): a rule
        that updates its feedback from this step's error without changing this step's projection (DKP) does it
        here."""


def register_mode(name: str, *, family: str, description: str = "",
                  overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering a :class:`FeedbackRule` subclass as mode ``name``."""
    if family not in FAMILIES:
        raise ConfigError([f"family {family!r} is not one of {', '.join(FAMILIES)}"], what="mode registration")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, FeedbackRule)):
            raise TypeError(f"register_mode expects a FeedbackRule subclass, got {cls!r}")
        doc = description or (cls.__doc__ or "").strip().split("\n")[0]
        add_mode(ModeSpec(name=name, family=family, rule=cls(), description=doc), overwrite=overwrite)
        cls.family = family
        return cls

    return deco
