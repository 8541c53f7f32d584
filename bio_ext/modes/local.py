"""The modes that transport feedback layer by layer: backprop itself and the Feedback Alignment
family (``fa`` and biotorch's sign-concordant ``usf``, ``brsf``, ``frsf``)."""

from __future__ import annotations

import torch

from .base import FeedbackRule, init_bound, random_feedback, register_mode


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
    spec = layer.feedback_spec
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
        spec = layer.feedback_spec
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
