"""The Direct Feedback Alignment family's fixed-feedback modes: ``dfa`` and ``drtp``."""

from __future__ import annotations

import torch

from ..functional import targets_from_error
from .base import FeedbackRule, register_mode


@register_mode("dfa", family="direct", description="direct feedback alignment: fixed random projection of the output error")
class DirectFeedbackAlignment(FeedbackRule):
    """Direct Feedback Alignment (Nøkland 2016).

    ``feedback`` is ``(output_dim, K)``, drawn once like the weight of a
    ``Linear(K, output_dim)`` under the ``init`` scheme, times ``scale``. ``K`` is
    ``in_features`` for Linear/Conv1D and ``C_in * kh * kw`` for Conv2d (stored as
    ``(output_dim, C_in, kh, kw)``).
    """

    traceable = True
    #: ConvertConfig.radial="auto": the true gradient's radial part, which keeps deep ReLU nets from diverging
    #: (this class's own declaration: drtp, dkp and pepita derive from it and keep the projection as it is)
    default_radial = "output"


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
        target = targets_from_error(e, "mode 'drtp'", "Use mode 'dfa' for losses other than cross-entropy.")
        live = target.ge(0).unsqueeze(-1)
        signal = torch.zeros_like(e).scatter_(-1, target.clamp_min(0).unsqueeze(-1), -1.0 / e.shape[0])
        return signal * live
