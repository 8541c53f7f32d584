"""Training modes as registered rules.

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
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import ConfigError, UnknownModeError

FAMILIES = ("bp", "local", "direct")
INIT_SCHEMES = ("kaiming", "xavier", "normal")


def init_bound(scheme: str, fan_in: int, fan_out: int) -> float:
    """Standard deviation of the named initialisation for a ``fan_in -> fan_out`` map."""
    if scheme == "kaiming":  # PyTorch's default for Linear/Conv (kaiming_uniform_, a=sqrt(5))
        return 1.0 / math.sqrt(3.0 * fan_in)
    if scheme == "xavier":
        return math.sqrt(2.0 / float(fan_in + fan_out))
    if scheme == "normal":
        return 1.0 / math.sqrt(fan_in)
    raise ConfigError([f"unknown init {scheme!r}; valid: {', '.join(INIT_SCHEMES)}"])


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
    that ``state_dict`` carries it.
    """

    family: str = "local"
    #: whether :meth:`effective` must be recomputed at every forward
    dynamic: bool = False
    #: whether the mode needs forward-mode tangents (direct family; see :mod:`bio_ext.grape`)
    forward_gradient: bool = False

    def validate_options(self, options) -> list:
        """Problems with the mode-specific ``options`` (every one, as strings)."""
        return [f"options.{k}: mode takes no options" for k in options]

    def before_projection(self, session, e: torch.Tensor) -> None:
        """Direct family with forward gradients: called with the output error before projecting it."""

    #: whether :meth:`error_signal` replaces the output error before it is projected (direct family)
    transforms_error: bool = False

    def error_signal(self, e: torch.Tensor) -> torch.Tensor:
        """Direct family: the signal the feedback projects, given the output error ``e`` (``N x D``)."""
        return e

    def create(self, weight: torch.Tensor, spec: FeedbackSpec,
               generator: Optional[torch.Generator]) -> Dict[str, torch.Tensor]:
        fb = random_feedback(spec.shape, spec.fan_in, spec.fan_out, scheme=spec.init,
                             scale=spec.scale, generator=generator, like=weight)
        return {"feedback": fb}

    def effective(self, layer) -> torch.Tensor:
        return layer.feedback


@dataclass(frozen=True)
class ModeSpec:
    name: str
    family: str
    rule: FeedbackRule
    description: str


_MODES: Dict[str, ModeSpec] = {}


def register_mode(name: str, *, family: str, description: str = "",
                  overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering a :class:`FeedbackRule` subclass as mode ``name``."""
    if family not in FAMILIES:
        raise ConfigError([f"family {family!r} is not one of {', '.join(FAMILIES)}"], what="mode registration")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, FeedbackRule)):
            raise TypeError(f"register_mode expects a FeedbackRule subclass, got {cls!r}")
        if name in _MODES and not overwrite:
            raise ConfigError([f"mode {name!r} is registered already; pass overwrite=True to replace it"],
                              what="mode registration")
        cls.family = family
        doc = description or (cls.__doc__ or "").strip().split("\n")[0]
        _MODES[name] = ModeSpec(name=name, family=family, rule=cls(), description=doc)
        return cls

    return deco


def get_mode(name: object) -> ModeSpec:
    if not isinstance(name, str) or name not in _MODES:
        raise UnknownModeError(name, _MODES)
    return _MODES[name]


def available_modes() -> Dict[str, str]:
    """Registered modes and their one-line descriptions."""
    return {k: v.description for k, v in sorted(_MODES.items())}


# --------------------------------------------------------------------------- built-in rules


@register_mode("bp", family="bp", description="backpropagation: gradients identical to plain autograd")
class Backprop(FeedbackRule):
    """Backpropagation. The feedback is the forward weight itself (nothing is stored)."""

    def create(self, weight, spec, generator):
        return {}

    def effective(self, layer):
        return layer.weight


@register_mode("fa", family="local", description="feedback alignment: fixed random weight-shaped feedback")
class FeedbackAlignment(FeedbackRule):
    """Feedback Alignment (Lillicrap et al. 2016).

    ``feedback`` has the weight's shape and is drawn once from the ``init`` scheme
    (default: PyTorch's own Linear/Conv initialisation) times ``scale``. The input
    gradient is ``grad_output @ feedback`` (Linear) or the transposed convolution
    with ``feedback`` as kernel (Conv2d).
    """


def _sign_scale(layer) -> float:
    spec = layer._feedback_spec
    return init_bound(spec.init, spec.fan_in, spec.fan_out) * spec.scale


@register_mode("usf", family="local", description="uniform sign-concordant feedback: sign(W) times the init std")
class UniformSignConcordant(FeedbackRule):
    """uSF (Liao, Leibo & Poggio 2016), as biotorch defines it.

    ``feedback = sign(W) * s`` recomputed at every forward, where ``s`` is the
    standard deviation of the ``init`` scheme for the layer (biotorch's scaling
    factor), times ``scale``.
    """

    dynamic = True

    def create(self, weight, spec, generator):
        return {"feedback": torch.zeros(spec.shape, dtype=weight.dtype, device=weight.device)}

    def effective(self, layer):
        return torch.sign(layer.weight.detach()) * _sign_scale(layer)


@register_mode("brsf", family="local",
               description="batchwise random-magnitude sign-concordant feedback: |M| * sign(W), M redrawn per batch")
class BatchRandomSignConcordant(FeedbackRule):
    """brSF, as biotorch defines it.

    ``feedback = |M| * sign(W)`` where ``M`` is redrawn from the ``init`` scheme
    (times ``scale``) at every forward, i.e. after every update of ``W``.
    """

    dynamic = True

    def create(self, weight, spec, generator):
        return {"feedback": torch.zeros(spec.shape, dtype=weight.dtype, device=weight.device)}

    def effective(self, layer):
        spec = layer._feedback_spec
        m = random_feedback(spec.shape, spec.fan_in, spec.fan_out, scheme=spec.init, scale=spec.scale,
                            generator=None, like=layer.weight)
        return m.abs_() * torch.sign(layer.weight.detach())


@register_mode("frsf", family="local",
               description="fixed random-magnitude sign-concordant feedback: |M| * sign(W), M fixed")
class FixedRandomSignConcordant(FeedbackRule):
    """frSF, as biotorch defines it.

    ``feedback = |M| * sign(W)`` where ``|M|`` is drawn once from the ``init``
    scheme (times ``scale``) and kept in the buffer ``feedback_magnitude``.
    """

    dynamic = True

    def create(self, weight, spec, generator):
        mag = random_feedback(spec.shape, spec.fan_in, spec.fan_out, scheme=spec.init, scale=spec.scale,
                              generator=generator, like=weight).abs_()
        return {"feedback": torch.zeros_like(mag), "feedback_magnitude": mag}

    def effective(self, layer):
        return layer.feedback_magnitude * torch.sign(layer.weight.detach())


@register_mode("dfa", family="direct", description="direct feedback alignment: fixed random projection of the output error")
class DirectFeedbackAlignment(FeedbackRule):
    """Direct Feedback Alignment (Nøkland 2016).

    ``feedback`` is ``(output_dim, K)``, drawn once like the weight of a
    ``Linear(K, output_dim)`` under the ``init`` scheme, times ``scale``. ``K`` is
    ``in_features`` for Linear/Conv1D and ``C_in * kh * kw`` for Conv2d (stored as
    ``(output_dim, C_in, kh, kw)``).
    """


@register_mode("drtp", family="direct",
               description="direct random target projection: fixed random projection of the (negated) target")
class DirectRandomTargetProjection(DirectFeedbackAlignment):
    """DRTP (Frenkel, Lefebvre & Bol 2021).

    Hidden layers receive ``-y* @ B`` instead of ``e @ B``: a fixed random projection of
    the one-hot target, so their update needs neither the output error's magnitude nor
    anything but the label (no update locking on the error). The output layer still
    trains on the true error. ``B`` is made as in ``dfa``.

    The user's loop passes only ``x`` to the model, so the target is recovered in the
    backward from the output error: for softmax cross-entropy ``e_n = (p_n - y_n) / N``
    is negative at the target class and positive everywhere else, so
    ``target = argmin e_n`` exactly (any reduction; label smoothing keeps the argmin).
    Rows whose error is exactly zero carry no signal; an error row with no negative entry
    (not a cross-entropy loss) raises :class:`~bio_ext.errors.FeedbackSignalError`. The signal is
    ``-onehot(target) / N`` (``N`` rows), the scale of a mean-reduced loss, so learning
    rates carry over from ``dfa``. For losses other than cross-entropy over classes the
    recovered target is meaningless: use ``dfa`` there.
    """

    transforms_error = True

    def error_signal(self, e: torch.Tensor) -> torch.Tensor:
        from .functional import targets_from_error
        target = targets_from_error(e, "mode 'drtp'", "Use mode 'dfa' for losses other than cross-entropy.")
        live = target.ge(0).unsqueeze(-1)
        signal = torch.zeros_like(e).scatter_(-1, target.clamp_min(0).unsqueeze(-1), -1.0 / e.shape[0])
        return signal * live
