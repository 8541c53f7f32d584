"""FDFA: DFA whose feedback is a momentum average of forward-mode estimates of the output's Jacobian.

Paper: Bacho & Chu, "Low-variance forward gradients using direct feedback alignment and momentum" (Neural
Networks, 2024); public code ``Florian-BACHO/FDFA``. The forward machinery is GrAPE's
(:mod:`bio_ext.modes.grape`: one forward-mode AD level per forward, a standard-normal perturbation ``u_l``
added to the tangent of every converted layer's input, the output tangent kept, ``directions`` replays);
only what is done with it when the error arrives differs.

The rule. With every layer input perturbed, the output tangent of example ``n`` is
``t_n = sum_k J_k[n] u_k[n]`` (``J_k[n]``: the ``D x K`` Jacobian of the output with respect to layer ``k``'s
input), so ``E[t_n u_l[n]^T] = J_l[n]`` (the ``u`` are independent, zero-mean, unit-variance): the outer
product is an unbiased estimate of the Jacobian that DFA's ``B_l`` stands in for (``e @ J_l`` is the true
gradient at the layer input). Each step::

    J_hat  = (1/N) sum_n t_n u_l[n]^T                      # D x K, the batch mean (directions: their mean)
    m      <- momentum * m + (1 - momentum) * J_hat         # m starts at 0
    B_l    =  m / (1 - momentum^t)                          # t: this layer's step count

The division is Adam's bias correction: ``B_l`` is then a weighted *average* of the estimates at every step
(weights summing to 1), so with frozen weights ``E[B_l] = E_n[J_l[n]]`` from the first step on (tested:
the cosine with the true Jacobian passes 0.95), where an average started from a random ``B`` would carry
``momentum^t`` of it. Before the first step ``B_l`` is DFA's random feedback (``init``, ``scale``).

Choices the paper leaves open, as defined here:

* **where the perturbation is**: the layer's input, the tensor at which the feedback is injected (the FDFA
  code perturbs the output of each hidden block after its activation: the next layer's input, the same
  point);
* **which Jacobian**: ``B_l`` is shared by the batch, so it estimates the batch-mean Jacobian; with it the
  hidden-layer gradients are exactly backprop's where the Jacobian does not depend on the example (one
  example, or a network linear above the layer), tested;
* **when B steps**: before this step's projection (``before_projection``, as GrAPE): this step's hidden
  gradients already use this step's estimate (the FDFA code steps ``B`` by an optimizer after the
  projection, with ``B.grad = B - J_hat``: plain SGD at rate ``a`` on that is an average with momentum
  ``1 - a``, without the bias correction; the code uses Adam, which is not an average);
* **feedback shapes**: the estimate is taken at the feedback's own shape as
  ``grad_B (1/N) sum_n <P_B(t_n), u_n>`` (:func:`bio_ext.modes.dkp.counterpart_gradient`), which for flat
  feedback (Linear, Conv1D, Conv2d with ``conv_feedback='dense'``, the FDFA code's conv feedback) is
  ``J_hat`` above. Conv2d's ``kernel`` and ``factored`` feedback cannot hold a Jacobian, and that gradient
  would not be an unbiased estimate of anything they hold: refused (:class:`~bio_ext.errors.UnsupportedModuleError`
  at the first forward);
* **non-finite batches**: the step is skipped (buffers unchanged) and ``layer.feedback_skips`` counts it.

Options (``convert(model, "fdfa", options={...})``):

``momentum`` (default 0.9)
    of the average; 0 uses each step's estimate alone. With frozen weights larger is better (less
    variance); while the weights move, ``1/(1 - momentum)`` steps is how far back the average looks.
``directions`` (default 1), ``perturb_layers`` (default ``"all"``), ``perturbation`` (only ``"input"``)
    as in GrAPE (:mod:`bio_ext.modes.grape`): tangent directions per step (their mean estimate: still
    unbiased, ``1/K`` of the variance, ``K - 1`` more forwards with tangents), and whether every layer is
    perturbed at every step or one per step in turn.
``update`` (default True)
    False freezes the feedback (``bio_ext.alignment`` probes with it).
``keep_estimate`` (default False)
    keep ``e @ J_hat`` (the step's gradient estimate at the layer input) as ``layer.forward_gradient``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .. import distributed
from ..errors import Problem, UnsupportedModuleError
from .base import FeedbackRule, register_mode
from .dkp import counterpart_gradient
from .grape import GradientAlignedProjectedError

DEFAULTS: Dict[str, Any] = {"momentum": 0.9, "directions": 1, "perturb_layers": "all", "perturbation": "input",
                            "update": True, "keep_estimate": False}


def validate_options(options) -> list:
    problems = [Problem(f"options.{k}", f"unknown option of mode 'fdfa'; valid: {', '.join(DEFAULTS)}")
                for k in options if k not in DEFAULTS]
    mom = options.get("momentum", DEFAULTS["momentum"])
    if isinstance(mom, bool) or not isinstance(mom, (int, float)) or not 0 <= mom < 1:
        problems.append(Problem("options.momentum", f"must be in [0, 1), got {mom!r}"))
    k = options.get("directions", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(Problem("options.directions", f"must be an int >= 1 (tangent directions per step), got {k!r}"))
    if options.get("perturb_layers", "all") not in ("all", "cycle"):
        problems.append(Problem("options.perturb_layers", f"'all' or 'cycle', got {options.get('perturb_layers')!r}"))
    if options.get("perturbation", "input") != "input":
        problems.append(Problem("options.perturbation", "only 'input' (the point where feedback is injected) is "
                                f"implemented, got {options.get('perturbation')!r}"))
    for flag in ("update", "keep_estimate"):
        if not isinstance(options.get(flag, False), bool):
            problems.append(Problem(f"options.{flag}", f"must be True or False, got {options.get(flag)!r}"))
    return problems


CONV_SHAPE_ERROR = (
    "mode 'fdfa' averages estimates of the output's Jacobian at each layer input, which only a flat feedback "
    "can hold; this Conv2d has conv_feedback={shape!r}. Convert with conv_feedback='dense' and "
    "input_shape=(C, H, W) (one example's shape), exclude the Conv2d layers, or use mode 'grape' or 'dfa'.")


@register_mode("fdfa", family="direct",
               description="DFA whose feedback is a momentum average of forward-mode estimates of the output's "
                           "Jacobian at each layer input")
class ForwardDirectFeedbackAlignment(GradientAlignedProjectedError):
    """FDFA (Bacho & Chu 2024). See :mod:`bio_ext.modes.fdfa` for every definition."""

    traceable = False
    forward_gradient = True
    transient_buffers = ("feedback_skips",)

    def validate_options(self, options):
        return validate_options(options)

    def probe_options(self, options):
        """No feedback step, and the estimate kept (``alignment`` compares it with the true gradient)."""
        return {**options, "update": False, "keep_estimate": True}

    def create(self, weight, spec, generator):
        buffers = FeedbackRule.create(self, weight, spec, generator)
        fb = buffers["feedback"]
        buffers["feedback_avg"] = torch.zeros_like(fb)
        buffers["feedback_steps"] = torch.zeros((), dtype=torch.long, device=fb.device)
        buffers["feedback_skips"] = torch.zeros((), dtype=torch.long, device=fb.device)
        return buffers

    def enter(self, session, layer, x, info=None):
        if info is not None and not (isinstance(info, tuple) and info and info[0] == "dense"):
            raise UnsupportedModuleError(CONV_SHAPE_ERROR.format(shape=getattr(layer, "conv_feedback", "?")))
        return super().enter(session, layer, x, info)

    def before_projection(self, session, e: torch.Tensor) -> None:
        fwd = session.rule_state
        if fwd is None or fwd.out_tangent is None:
            return
        rows = e.shape[0]
        tangents = [(fwd.perturbations, fwd.out_tangent)] + [(us, t) for us, t in fwd.replays if t is not None]
        todo = []
        for slot, layer in enumerate(session.layers):
            u = fwd.perturbations[slot] if slot < len(fwd.perturbations) else None
            if u is None or layer is None or not hasattr(layer, "feedback_avg"):
                continue
            opts = {**DEFAULTS, **layer.mode_options}
            if not (opts["update"] or opts["keep_estimate"]):
                continue
            pairs = [(us[slot], t) for us, t in tangents
                     if slot < len(us) and us[slot] is not None and us[slot].shape == u.shape]
            est = None
            for uk, t in pairs:
                g = counterpart_gradient(layer, t.reshape(rows, -1), uk, session.infos[slot])
                if g is None:
                    est = None
                    break
                est = g if est is None else est + g
            if est is None:
                continue  # the rows of this input cannot be matched with the output's
            todo.append((slot, layer, opts, est / (len(pairs) * rows)))
        # under DDP the estimate of the global batch: the mean of the ranks' (equal shards), one all_reduce
        estimates = distributed.reduce_tensors([est for *_, est in todo], getattr(fwd, "group", None), mean=True)
        for (slot, layer, opts, _), est in zip(todo, estimates):
            if opts["keep_estimate"]:
                layer.forward_gradient = layer.project_error(e.detach().to(est.dtype), est, session.infos[slot])
            if opts["update"]:
                average(layer, est, opts["momentum"])


def average(layer, est: torch.Tensor, momentum: float) -> None:
    """One step of the bias-corrected momentum average (see the module); skipped where ``est`` is not finite."""
    with torch.no_grad():
        fb, avg, steps = layer.feedback, layer.feedback_avg, layer.feedback_steps
        est = est.to(avg.dtype)
        ok = torch.isfinite(est).all()
        new_avg = avg * momentum + est * (1.0 - momentum)
        t = (steps + 1).to(avg.dtype)
        new_fb = new_avg / (1.0 - torch.pow(torch.as_tensor(momentum, dtype=avg.dtype, device=avg.device), t))
        avg.copy_(torch.where(ok, new_avg, avg))
        fb.copy_(torch.where(ok, new_fb.to(fb.dtype), fb))
        steps += ok.to(steps.dtype)
        layer.feedback_skips += (~ok).to(torch.long)

