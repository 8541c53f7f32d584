"""DKP, Direct Kolen-Pollack: DFA whose feedback matrices learn, each with the update its forward counterpart would get.

Paper: Webster, Choi & Ahn, "Learning the connections in direct feedback alignment" (ICLR 2021 submission,
OpenReview ``zgGmAx9ZcY``). The stored copies of the paper that could be read here hold its first page only
(the abstract and the start of the introduction), so its equations and their numbers could not be checked. The
rule was checked instead against the first author's own code, ``webstah/dkp-gist`` ("Direct Kolen Pollack",
CIFAR-10 and AlexNet/CIFAR-100), and it is the rule below:

* its README states the update as ``grad B_l = -delta_k^T . a_{l-1}``, where ``delta_k = error * f'(a_k)`` is the
  learning signal at the output and ``a_{l-1}`` the output of layer ``l - 1``, the tensor at which ``B_l``'s
  projection ``delta_k . B_l`` is injected (the sign is that of an ``error = target - output`` convention);
* its code (``utils/gradfunctions.py``, ``DFAHookFunction.backward``) computes that gradient as
  ``grad_at_output^T . layer_out``: the loss gradient at the output (``e`` here) times the hooked activity, the
  hidden layer's output after its activation (``h_l`` here), and hands it to an optimiser of the ``B_l`` with
  L2 weight decay in the gradient: ``e^T h_l + decay B_l``, as below. The FDFA authors' ``DKP`` (Bacho & Chu
  2024, ``Florian-BACHO/FDFA``) is the same rule.

What differs is the optimiser only (see "the optimiser of B" below): the DKP code steps ``B`` with Adam, lr
1e-4, weight decay 1e-6 and the rate times 0.8 every epoch (CIFAR-10), or lr 0.01, weight decay 1e-4 and the
rate divided by 10 every 30 epochs (AlexNet, CIFAR-100); its README calls the backward learning-rate schedule
"essential". Its injection points are each hidden layer's output after the activation (for a convolution before
the max-pool that follows it): for a chain of Linear layers the same tensors as the converted layers' inputs
here; across a pooling or a flatten, bio_ext's point is the next converted layer's input, after them.

The rule. A layer's feedback ``B_l`` (``D x K``) turns the output error ``e`` (``N x D``) into the gradient
injected at the layer's input, ``e @ B_l``, exactly as in ``dfa``. Kolen-Pollack learning (Kolen & Pollack
1994; Akrout et al. 2019) gives a backward matrix the very update of the forward matrix it stands in for,
plus weight decay on both, so that the two converge. In DFA the forward counterpart of ``B_l`` is a direct
connection ``A_l`` from the activity ``h_l`` at the injection point to the output (``y += h_l @ A_l^T``),
whose loss gradient is ``e^T h_l``. So, at every step::

    B_l  <-  B_l - feedback_lr * (e^T h_l + feedback_decay * B_l)

where ``h_l`` is the layer's input in this forward (``N x K``, the tensor at which the feedback is injected:
after the previous layer's activation, as in the FDFA code's hook placement) and ``e = dL/d(output)``
(``N x D``, so the batch reduction of the loss is already in it: a mean-reduced loss gives a batch mean).

For the output layer this is exactly Kolen-Pollack: its feedback is injected at its input, so ``e^T h`` is its
own weight's gradient, and with SGD at the same rate and decay on both, ``B - W`` shrinks by
``(1 - lr decay)`` every step (tested): the last hidden layer's signal then approaches backprop's.

Choices the paper leaves open, as defined here:

* **when B steps**: after this step's projection (``after_projection``): this step's hidden gradients use
  ``B_l`` as it was at the forward, as in Kolen-Pollack, where both matrices step together from the same
  signals (the FDFA code computes ``e @ B`` with the current ``B`` and lets an optimizer step it after);
* **the optimiser of B**: plain SGD at ``feedback_lr`` with L2 decay ``feedback_decay`` in the
  step (the DKP and FDFA codes step ``B`` with Adam, lr 1e-4, weight decay 1e-6: Adam's per-entry
  normalisation and the DKP code's schedule are not reproduced; the defaults below were chosen for plain SGD);
* **where the activity is taken**: the converted layer's input, the injection point (with tokens, one row
  per token when the error has one row per token, summed over the tokens of an example when it has one row
  per example);
* **other feedback shapes** (Conv2d's ``kernel``/``dense``/``factored`` feedback): the forward counterpart of
  a feedback map ``P_B: e -> dL/dx`` is its adjoint ``x -> P_B^T x``, whose gradient is
  ``grad_B sum_n <P_B(e)_n, x_n>``; for the flat feedback of Linear/Conv1D (and ``dense``) this is exactly
  ``e^T h``, computed directly; for the others it is computed by autograd through the layer's projection;
* **non-finite batches**: the step is skipped (every buffer left as it was) when ``e`` or the update is not
  finite, and ``layer.feedback_skips`` counts it (a diagnostic, kept out of ``state_dict``).

Options (``convert(model, "dkp", options={...})``):

``feedback_lr`` (default 1e-3)
    SGD rate of the feedback; 0 freezes it (``dkp`` is then ``dfa``).
``feedback_decay`` (default 1e-6)
    L2 weight decay of the feedback (the FDFA code's recommended value for DKP). The forward weights' decay,
    which Kolen-Pollack pairs it with, is the optimizer's (``weight_decay``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch

from .. import distributed
from ..errors import Problem
from ..functional import project_flat
from .base import FeedbackRule, register_mode
from .direct import DirectFeedbackAlignment

DEFAULTS: Dict[str, Any] = {"feedback_lr": 1e-3, "feedback_decay": 1e-6}


def number_problems(mode: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> List[Problem]:
    """Unknown options, and those of ``defaults`` given as anything but a finite number >= 0."""
    problems = [Problem(f"options.{k}", f"unknown option of mode {mode!r}; valid: {', '.join(defaults)}")
                for k in options if k not in defaults]
    for k, v in options.items():
        if k in defaults and isinstance(defaults[k], float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                problems.append(Problem(f"options.{k}", f"must be a finite number >= 0, got {v!r}"))
    return problems


def counterpart_gradient(layer, e: torch.Tensor, x: torch.Tensor, info=None) -> Optional[torch.Tensor]:
    """``grad_B sum_n <P_B(e)_n, x_n>`` at the layer's feedback shape: the gradient that the adjoint of the
    layer's feedback map (``x -> P_B^T x``) gets from ``e``. For flat feedback (``e @ B``, and Conv2d's ``dense``
    shape, which is ``e @ B`` reshaped) it is ``e^T x``, computed directly; otherwise by autograd.
    None when the rows of ``x`` cannot be matched with those of ``e``."""
    fb = layer.feedback
    dtype = torch.promote_types(e.dtype, fb.dtype)
    e, x = e.detach().to(dtype), x.detach().to(dtype)
    rows = e.shape[0]
    if getattr(type(layer), "project_error", None) is project_flat or (isinstance(info, tuple) and info
                                                                         and info[0] == "dense"):
        width = fb[0].numel()
        if x.numel() % (rows * width):
            return None
        # one error row per example, several tokens: their sum (one row each: a view, no pass over the activity)
        a = x.reshape(rows, width) if x.numel() == rows * width else x.reshape(rows, -1, width).sum(1)
        return e.t().mm(a).reshape(fb.shape)
    with torch.enable_grad(), torch.autocast(e.device.type, enabled=False):
        b = fb.detach().to(dtype).requires_grad_(True)
        p = layer.project_error(e, b, info)
        if x.numel() % p.numel():
            return None
        a = x.reshape(p.shape[0], -1, p[0].numel()).sum(1) if x.numel() != p.numel() else x.reshape(p.shape)
        (g,) = torch.autograd.grad((p * a.reshape(p.shape)).sum(), b)
    return g


@register_mode("dkp", family="direct",
               description="direct Kolen-Pollack: DFA whose feedback learns the update of a direct forward "
                           "connection, with weight decay")
class DirectKolenPollack(DirectFeedbackAlignment):
    """DKP (Webster, Choi & Ahn 2020). See :mod:`bio_ext.modes.dkp` for every definition."""

    #: per-layer work in :meth:`enter` and in the backward (the activity kept, the feedback stepped)
    traceable = False
    transient_buffers = ("feedback_skips",)

    def validate_options(self, options):
        return number_problems("dkp", options, DEFAULTS)

    def create(self, weight, spec, generator):
        buffers = FeedbackRule.create(self, weight, spec, generator)
        fb = buffers["feedback"]
        buffers["feedback_steps"] = torch.zeros((), dtype=torch.long, device=fb.device)
        buffers["feedback_skips"] = torch.zeros((), dtype=torch.long, device=fb.device)
        return buffers

    def open_forward(self, session, module, args, kwargs, options) -> None:
        session.rule_state = _Activity()
        session.rule_state.group = distributed.feedback_group(module)  # resolved in the (DDP) forward

    def enter(self, session, layer, x, info=None):
        slot, x = super().enter(session, layer, x, info)
        if slot >= 0:
            acts = session.rule_state
            if acts is None:
                acts = session.rule_state = _Activity()
            acts.extend([None] * (slot + 1 - len(acts)))
            acts[slot] = x.detach()
        return slot, x

    def after_projection(self, session, e: torch.Tensor) -> None:
        acts = session.rule_state or []
        todo = []
        for slot, layer in enumerate(session.layers):
            h = acts[slot] if slot < len(acts) else None
            if h is None or layer is None or not hasattr(layer, "feedback_steps"):
                continue
            opts = {**DEFAULTS, **layer.mode_options}
            if opts["feedback_lr"] == 0:
                continue
            g = counterpart_gradient(layer, e, h, session.infos[slot])
            if g is not None:
                todo.append((layer, opts, g.to(layer.feedback.dtype)))
        if not todo:
            return
        # under DDP the step of the global batch (the ranks' mean, equal shards) and skipped on every rank when one
        # rank's error is not finite: one all_reduce for every layer
        bad = (~torch.isfinite(e).all()).to(todo[0][2].dtype).reshape(1)
        *grads, bad = distributed.reduce_tensors([g for *_, g in todo] + [bad], getattr(acts, "group", None),
                                                 mean=True)
        for (layer, opts, _), g in zip(todo, grads):
            with torch.no_grad():
                fb = layer.feedback
                ok = torch.isfinite(g).all() & (bad[0] == 0)
                new = fb - opts["feedback_lr"] * (g + opts["feedback_decay"] * fb)
                fb.copy_(torch.where(ok, new, fb))
                layer.feedback_steps += ok.to(torch.long)
                layer.feedback_skips += (~ok).to(torch.long)


class _Activity(list):
    """The activity at each slot's injection point in one forward, and the process group (or None) the feedback
    step is averaged over (:func:`bio_ext.distributed.feedback_group`)."""

    group: Any = None
