"""PEPITA: a second forward pass on the input modulated by a fixed random projection of the error.

Paper: Dellaferrera & Kreiman, "Error-driven input modulation: solving the credit assignment problem without
a backward pass" (ICML 2022), with the refinements of Srinivasan et al., "Forward learning with top-down
feedback: empirical and analytical characterization" (ICLR 2024, arXiv 2302.05440), whose code
(``ravifrancesco/PEPITA``) fixes choices the papers' text leaves open; bio_ext follows it there and says so.

One step, inside the user's ordinary ``model(x)`` / ``loss.backward()`` / ``optimizer.step()``:

1. **First forward** (the user's). Every converted Linear's input ``h_{l-1}`` is kept (``h_0 = x``, the first
   converted layer's input). The model's output is handed to the loss through an autograd node whose inputs
   are the converted layers' weights and biases, *detached from the network's graph*: no gradient flows
   through the network, and no backward pass of any layer runs.
2. **The error arrives** (that node's backward, right after the error tap's): ``e = dL/d(output)``
   (``N x D``). The per-example error is ``err = N e`` for a mean-reduced loss (the default; ``sum``: ``e``):
   for softmax cross-entropy, ``softmax(output) - onehot(y)``, the papers' ``e``.
3. **Second forward**, under ``no_grad``, through the model's own ``forward`` with the first layer's input
   replaced by ``h_0^mod = x + err @ F`` (``F``: the first layer's fixed ``D x K`` feedback, see below). The
   global random generators restart where the first forward started, so dropout draws the same masks (the
   reference code's "consistent dropout"); BatchNorm running statistics are put back afterwards.
4. **Updates**, handed to autograd as the weights' gradients (so they land in ``.grad``, add up over
   backward calls, and any optimizer applies them)::

       hidden layer l:  dW_l = (1/N) (h_l - h_l^mod)^T h_{l-1}^mod      db_l = (1/N) sum_n (h_l - h_l^mod)
       output layer:    dW_L = e^T h_{L-1}^mod                          db_L = sum_n e_n

   where ``h_l`` is layer ``l``'s activity (the next converted layer's input: after the activation, and
   after dropout) in the first pass and ``h_l^mod`` in the second (for the first layer ``h_0^mod`` is the
   modulated input), and the output layer is the one whose output is tapped. ``sum`` reduction: no ``1/N``.

``F`` and its scale. Every converted layer holds a ``feedback`` of shape ``(D, in_features)``; the first
converted layer's is ``F`` (the others are not used: any layer can be first, e.g. under ``include``). Entries
are uniform in ``+-0.05 sqrt(6 / D)`` (the reference code: He-uniform with fan-in ``D``, times ``Bstd`` 0.05),
times ``convert(..., scale=s)``: ``scale`` is the factor on the papers' 0.05. ``init`` is ignored.

Choices the papers leave open, as defined here:

* **sign of the modulation**: ``x + F e`` as in the reference code (the GrAPE seed writes ``x - F e``; with a
  zero-mean symmetric ``F`` the two are the same distribution);
* **the batch**: the updates are batch means (the reference code divides by the batch size) for a
  mean-reduced loss; ``error_reduction: sum`` for a summed one;
* **biases**: the papers' networks have none; a bias gets the sum over the batch of its layer's ``delta``;
* **what is an activity**: the next converted layer's input, so PEPITA needs a chain of converted Linear
  layers in which each one's output (through elementwise activations, dropout, normalisation) is the next
  one's input; another shape raises :class:`~bio_ext.errors.FeedbackSignalError` at the first backward;
* **other parameters** (BatchNorm's, embeddings, layers left on backprop): the papers define no update for
  them and they get none (their ``.grad`` stays as it was);
* **convolutions**: the method has no convolutional form: converting a Conv2d raises
  :class:`~bio_ext.errors.UnsupportedModuleError` (exclude them with ``exclude_types=[nn.Conv2d]``; they then
  get no gradient at all, see the previous point).

Srinivasan et al.'s refinements. What the seed's Table 1 calls "PEPITA with the improvements of Srinivasan
et al." is, in their code: ``F``'s scale (``scale`` above), weight decay and the learning-rate schedule (the
optimizer's ``weight_decay`` and scheduler: nothing mode-specific), activity normalisation (a module the
model holds), and weight mirroring of ``F`` (a separate learning phase on noise that learns ``F`` as a product
of per-layer matrices): **weight mirroring is not implemented**.

Limits: one error row per example at the output and a 2-D first-layer input (no tokens); the loss must be
unscaled (``GradScaler``'s scaled error would scale the modulation too); a forward hook that changes the
model's behaviour between the two passes changes what the second pass computes.

Options (``convert(model, "pepita", options={...})``):

``error_reduction`` (default ``"mean"``)
    how the loss reduces over the batch, which is how the per-example error is recovered from ``e``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.autograd import Function

from .._utils import rng
from ..errors import FeedbackSignalError, Problem, UnsupportedModuleError
from ..session import FeedbackSession, activate, reset
from .base import check_scale, register_mode
from .direct import DirectFeedbackAlignment

DEFAULTS: Dict[str, Any] = {"error_reduction": "mean"}
#: the reference code's ``Bstd``: F's entries are uniform in +-F_STD * sqrt(6 / D)
F_STD = 0.05


class _Pass:
    """PEPITA's state for one forward (``session.rule_state``)."""

    __slots__ = ("module", "args", "kwargs", "rng", "device", "layers", "inputs", "tapped_at", "modulation")

    def __init__(self) -> None:
        self.module: Any = None
        self.args: Any = ()
        self.kwargs: Any = {}
        self.rng: Any = None
        self.device: Any = None
        #: the converted layers in the order they were called, and the input each was called with
        self.layers: List[Any] = []
        self.inputs: List[torch.Tensor] = []
        #: how many layers had been called when the output was tapped (the last of them is the output layer)
        self.tapped_at: Optional[int] = None
        #: the second pass: what is added to the first layer's input
        self.modulation: Optional[torch.Tensor] = None


class _Updates(Function):
    """Identity on the (detached) output whose inputs are the converted layers' parameters: its backward runs
    PEPITA's second pass and returns the updates as their gradients."""

    @staticmethod
    def forward(out, session, *params):
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.session = inputs[1]

    @staticmethod
    def backward(ctx, e):
        return (None, None, *Pepita.updates(ctx.session, e))


@register_mode("pepita", family="direct",
               description="PEPITA: a second forward on the input modulated by a fixed random projection of the "
                           "error; updates from the two passes' activities")
class Pepita(DirectFeedbackAlignment):
    """PEPITA (Dellaferrera & Kreiman 2022; Srinivasan et al. 2023). See :mod:`bio_ext.modes.pepita`."""

    #: per-layer work in :meth:`enter`, a second forward in the backward
    traceable = False

    def validate_options(self, options):
        problems = [Problem(f"options.{k}", f"unknown option of mode 'pepita'; valid: {', '.join(DEFAULTS)}")
                    for k in options if k not in DEFAULTS]
        if options.get("error_reduction", "mean") not in ("mean", "sum"):
            problems.append(Problem("options.error_reduction",
                                    f"'mean' or 'sum' (the loss's reduction over the batch), got "
                                    f"{options.get('error_reduction')!r}"))
        return problems

    def create(self, weight, spec, generator):
        if weight.dim() != 2:
            raise UnsupportedModuleError(
                f"mode 'pepita' has no convolutional form (Dellaferrera & Kreiman 2022 and Srinivasan et al. "
                f"define it for fully connected layers only), and this layer's weight has shape "
                f"{tuple(weight.shape)}. Exclude convolutions (exclude_types=[torch.nn.Conv2d]; they then get no "
                "gradient), or use a mode with a convolutional form such as 'dfa' or 'grape'.")
        d = spec.shape[0]
        bound = F_STD * math.sqrt(6.0 / d) * spec.scale
        check_scale(bound, weight.dtype, spec.scale)
        fb = torch.empty(spec.shape, dtype=weight.dtype).uniform_(-bound, bound, generator=generator)
        return {"feedback": fb.to(weight.device)}

    # ----------------------------------------------------------------- the first forward

    def open_forward(self, session, module, args, kwargs, options) -> None:
        st = _Pass()
        st.module, st.args, st.kwargs = module, args, kwargs
        st.device = next(module.parameters()).device
        st.rng = rng.capture(st.device)
        session.rule_state = st

    def enter(self, session, layer, x, info=None):
        st = session.rule_state
        if st is None:
            return -1, x
        if session.tangent_only:  # the second pass: modulate the first layer's input
            if not st.inputs and st.modulation is not None:
                x = x + st.modulation.to(x.dtype)
            st.inputs.append(x)
            st.layers.append(layer)
            return -1, x
        st.layers.append(layer)
        st.inputs.append(x.detach())
        return -1, x

    def on_output(self, session, output):
        st = session.rule_state
        if session.tangent_only or st is None or not st.layers:
            return output
        st.tapped_at = len(st.layers)
        params = []
        for layer in st.layers:
            params.append(layer.weight)
            params.append(layer.bias)
        return _Updates.apply(output.detach(), session, *params)

    # ----------------------------------------------------------------- the error arrives

    @staticmethod
    def updates(session, e: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """The second pass and the gradients of every (weight, bias) pair of the first pass's layers."""
        st: _Pass = session.rule_state
        e = e.reshape(-1, e.shape[-1])
        rows = e.shape[0]
        first = st.layers[0]
        x0 = st.inputs[0]
        if x0.dim() != 2 or x0.shape[0] != rows:
            raise FeedbackSignalError(
                f"mode 'pepita' modulates the first converted layer's input with one error row per example, but "
                f"that input has shape {tuple(x0.shape)} and the output error {rows} rows; PEPITA applies to "
                "fully connected networks on (batch, features) inputs: flatten the input before the first Linear")
        opts = {**DEFAULTS, **first.mode_options}
        mean = opts["error_reduction"] == "mean"
        err = e * rows if mean else e
        second = Pepita.second_pass(session, err.detach().to(first.feedback.dtype).mm(first.feedback))
        if len(second.inputs) != len(st.layers) or any(a is not b for a, b in zip(second.layers, st.layers)):
            raise FeedbackSignalError(
                "mode 'pepita': the second forward called other converted layers than the first "
                f"({len(second.inputs)} calls against {len(st.layers)}); PEPITA needs a forward whose path does not "
                "depend on its input's values")
        out = st.tapped_at
        if out is None or out != len(st.layers):
            raise FeedbackSignalError(
                f"mode 'pepita': {len(st.layers) - (out or 0)} converted layer(s) ran after the output layer, and "
                "PEPITA defines no update for them; convert only the layers up to the output layer")
        grads: List[Optional[torch.Tensor]] = []
        for i, layer in enumerate(st.layers):
            h_in = second.inputs[i]
            if i == len(st.layers) - 1:
                delta = e
            else:
                h, h_mod = st.inputs[i + 1], second.inputs[i + 1]
                width = layer.weight.shape[1] if getattr(layer, "transposed", False) else layer.weight.shape[0]
                if h.dim() != 2 or h.shape != (rows, width):
                    raise FeedbackSignalError(
                        f"mode 'pepita': the layer called after a Linear with {width} outputs has input shape "
                        f"{tuple(h.shape)}; PEPITA's update (h_l - h_l^mod) needs each converted Linear's output "
                        "(through elementwise activations, dropout) to be the next converted Linear's input")
                delta = (h - h_mod) / rows if mean else h - h_mod
            delta, h_in = delta.to(layer.weight.dtype), h_in.to(layer.weight.dtype)
            gw = delta.t().mm(h_in)
            grads.append(gw.t() if getattr(layer, "transposed", False) else gw)
            grads.append(delta.sum(0) if layer.bias is not None else None)
        return grads

    @staticmethod
    def second_pass(session, modulation: torch.Tensor) -> _Pass:
        """The model's forward again, under ``no_grad``, on the first layer's input plus ``modulation``, with the
        random generators where the first forward started them (the same dropout masks) and BatchNorm running
        statistics restored afterwards; the generators continue afterwards as if it had not run."""
        st: _Pass = session.rule_state
        replay = FeedbackSession(session.bank, session.output_dim, session.rule, tangent_only=True)
        mod = _Pass()
        mod.modulation = modulation
        replay.rule_state = mod
        after = rng.capture(st.device)
        norms = [m for m in st.module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        saved = [dict(m._buffers) for m in norms]
        for m in norms:
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.clone()
        try:
            with torch.no_grad():
                rng.restore(st.rng)
                token = activate(replay)
                try:
                    st.module.forward(*st.args, **st.kwargs)
                finally:
                    reset(token)
        finally:
            for m, bufs in zip(norms, saved):
                m._buffers.update(bufs)
            rng.restore(after)
        return mod
