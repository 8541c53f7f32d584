"""GrAPE: DFA whose feedback matrices are turned toward forward-gradient estimates.

Seed paper: "Backpropagation-free learning through gradient aligned feedbacks",
section 3 and Algorithm 1. Every choice the paper leaves open is defined here.

One step, inside the user's ordinary ``model(x)`` / ``loss.backward()``:

1. **Forward (with tangents).** The converted model's forward runs under a
   forward-mode AD level (``torch.autograd.forward_ad``). Each converted layer
   whose input needs a gradient adds a fresh standard-normal perturbation ``u_l``
   to the tangent of its input, the very tensor at which DFA injects its
   feedback. Tangents flow through everything in between (ReLU, BatchNorm,
   residual additions, pooling) by PyTorch's own forward-mode rules, and through
   the converted layers by their ``jvp``. The output layer's output tangent ``t``
   is kept; the loss itself is computed without tangents.
2. **Backward.** When the output error ``e = dL/d(output)`` (``N x D``) arrives,
   the per-example directional derivative is ``d_n = <e_n, t_n>`` (no forward pass
   through the loss is needed) and layer ``l``'s activity-perturbed forward
   gradient is ``g_l[n] = d_n u_l[n]``, an unbiased estimate of ``dL/dx_l[n]``
   (tested). When the output has several rows per example (the tokens of a
   sequence: the first dimension of the output is taken as the examples), ``d_n``
   sums ``<e_r, t_r>`` over all rows ``r`` of example ``n``: a perturbation at one
   token moves the outputs at the other tokens through attention, and a per-token
   product would drop those terms (a biased estimate; tested on GPT-2 blocks).
3. **Feedback update (the rule the paper's text describes).** Equation 6 as
   printed, ``B <- B - eta (1 - cos) B``, only rescales ``B`` and cannot turn it. We
   step ``B`` along the gradient of ``cos(P_l, g_l)`` instead, where
   ``P_l = e @ B_l`` is the projected error (for Conv2d, spread over the input
   grid exactly as DFA's backward does) and the **mini-batch cosine** is the
   cosine between ``P_l`` and ``g_l`` flattened over the whole batch
   (``N x K`` numbers each). The step is scale-free::

       v   <- momentum * v + (1 - momentum) * grad_B cos(P_l, g_l)
       lr  =  feedback_lr / (1 + t / feedback_lr_halflife)     # t: this layer's step count
       B   <- B + lr * ||B||^2 * v
       B   <- B * (||B_0|| / ||B||)          # norm kept constant (as the paper does)

   Because ``cos`` does not depend on ``||B||``, ``||B|| grad_B cos`` is
   dimensionless and ``lr`` is roughly the angle (radians) ``B`` turns per step.
   ``momentum`` is the moving average of the update over steps, the paper's
   remedy for the variance of forward gradients. The rate decays because a
   single-direction forward gradient is very noisy: a fast constant rate aligns
   the feedback quickly but then keeps it wandering (and the weights cannot
   align with a moving feedback, which is how DFA itself learns), a slow one is
   accurate late but takes thousands of steps to get there.
4. **Weight update.** Then the projections ``e @ B_l`` with the *updated*
   feedback give DFA's input gradients; weight and bias gradients come from each
   layer's own ``grad_output``. No gradient is transported through the weights.

Options (``convert(model, "grape", options={...})``):

``feedback_lr`` (default 0.05) and ``feedback_lr_halflife`` (default 500 steps; None: constant)
    initial turning rate of the feedback and the step count at which it has halved
    (see 3). The paper's 1e-3 refers to an unscaled SGD step whose size depends on
    ``||B||`` and the loss scale. Chosen from measurements (BENCHMARKS.md):

    * frozen weights, 784-1024-1024-10 tanh MLP, batch 256, constant rate, mean
      cosine of the hidden layers' projected error with the true gradient after 300
      steps: 0.03 (rate 0.003), 0.08 (0.01), 0.21 (0.03), 0.57 (0.1), 0.83 (0.3);
      DFA stays at 0.01. The defaults pass ``tests/test_grape.py`` (>= 0.3).
    * training on MNIST (the seed's Table 1 MLP, 20 epochs, seed 0), angle between
      the hidden layers' injected signal and the true gradient at the end: constant
      0.1 -> 63/71 degrees (worse than DFA's 43/40), 0.03 -> 42/51, 0.01 -> 29/32,
      0.001 -> 39/37; the defaults -> 27/27.
``momentum`` (default 0.9)
    moving average of the feedback update; 0 disables it.
``directions`` (default 1)
    tangent directions per step, ``K``. ``torch.autograd.forward_ad`` carries one tangent per
    forward, so ``K > 1`` replays the forward ``K - 1`` more times right after it, under
    ``no_grad`` and with tangents only (no autograd graph): each replay restarts the global RNG
    where the forward started (same dropout masks, so the same function is differentiated),
    draws fresh perturbations from a per-step generator, and updates copies of BatchNorm's
    running statistics that are thrown away; afterwards the RNG continues as after one forward.
    The estimate is the mean ``g_l = (1/K) sum_k d^k u_l^k``: still unbiased, with ``1/K`` of the
    variance (both tested). Each replay is a forward with tangents (measured: 0.8x a backprop step
    on the seed's MLP, 1.2x on its CNN; BENCHMARKS.md), so ``K = 1`` keeps
    the one-forward-one-backward cost the paper sells; the moving average (``momentum``) is the
    free way to cut variance.
``perturbation`` (default ``"input"``)
    where the perturbation is added: the layer input, i.e. the very tensor at which the feedback
    is injected, so ``g_l`` estimates the gradient that ``e @ B_l`` stands in for (with
    ``granularity='macro'``/``'micro'``, the feedback point's tensor). This is the only point at
    which the estimate and the projection are of the same quantity; perturbing a layer's output
    or its weights estimates a different gradient, which the feedback cannot be compared with
    without transporting it back through the layer (i.e. backprop). The option is kept so a
    config states it explicitly; any other value is refused.
``keep_estimate`` (default False)
    keep the last ``g_l`` on each layer as ``layer.forward_gradient`` (for analysis).

After each step every layer holds ``layer.grape_cos``: the mini-batch cosine
between its projected error and its forward-gradient estimate, before the update.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping

import torch

from .modes import DirectFeedbackAlignment, FeedbackRule, register_mode

DEFAULTS: Dict[str, Any] = {"feedback_lr": 0.05, "feedback_lr_halflife": 500, "momentum": 0.9, "directions": 1,
                            "perturbation": "input", "keep_estimate": False}


def validate_options(options: Mapping[str, Any]) -> List[str]:
    problems = []
    for k in options:
        if k not in DEFAULTS:
            problems.append(f"options.{k}: unknown option of mode 'grape'; valid: {', '.join(DEFAULTS)}")
    lr = options.get("feedback_lr", DEFAULTS["feedback_lr"])
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 or not math.isfinite(lr):
        problems.append(f"options.feedback_lr: must be a finite number >= 0, got {lr!r}")
    half = options.get("feedback_lr_halflife", DEFAULTS["feedback_lr_halflife"])
    if half is not None and (isinstance(half, bool) or not isinstance(half, (int, float)) or not half > 0):
        problems.append(f"options.feedback_lr_halflife: must be a number of steps > 0 or None, got {half!r}")
    mom = options.get("momentum", DEFAULTS["momentum"])
    if isinstance(mom, bool) or not isinstance(mom, (int, float)) or not 0 <= mom < 1:
        problems.append(f"options.momentum: must be in [0, 1), got {mom!r}")
    k = options.get("directions", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(f"options.directions: must be an int >= 1 (tangent directions per step), got {k!r}")
    if options.get("perturbation", "input") != "input":
        problems.append(f"options.perturbation: only 'input' (the point where feedback is injected) is "
                        f"implemented, got {options.get('perturbation')!r}")
    return problems


def batch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between two tensors flattened over the whole mini-batch."""
    a, b = a.reshape(-1), b.reshape(-1)
    return (a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny)


@register_mode("grape", family="direct",
               description="DFA whose feedback turns toward activity-perturbed forward-gradient estimates")
class GradientAlignedProjectedError(DirectFeedbackAlignment):
    """GrAPE (seed paper, Algorithm 1). See :mod:`bio_ext.grape` for every definition."""

    forward_gradient = True

    def validate_options(self, options):
        return validate_options(options)

    def create(self, weight, spec, generator):
        buffers = super().create(weight, spec, generator)
        fb = buffers["feedback"]
        buffers["feedback_velocity"] = torch.zeros_like(fb)
        buffers["feedback_norm"] = fb.norm().reshape(())
        buffers["feedback_steps"] = torch.zeros((), dtype=torch.long, device=fb.device)
        return buffers

    def before_projection(self, session, e: torch.Tensor) -> None:
        n = e.shape[0]
        # one directional derivative per example and tangent direction: the rows of one example (the tokens
        # of a sequence) interact (attention), so a perturbation at token j moves the outputs at other tokens
        ex = session.examples or n

        def per_example(tangent):
            return (e * tangent.to(e.dtype)).sum(-1).reshape(ex, -1).sum(1)

        directions = [(session.perturbations, per_example(session.out_tangent))]
        for perturbations, tangent in session.replays:
            if tangent is not None:
                directions.append((perturbations, per_example(tangent)))
        for slot, layer in enumerate(session.layers):
            u = session.perturbations[slot]
            if u is None or layer is None:
                continue
            rows = u.numel() // u.shape[-1]
            if u.shape[0] != ex or rows % n:
                continue  # the rows of this input cannot be matched with the examples: no estimate
            shape = (ex,) + (1,) * (u.dim() - 1)
            terms = [(us[slot] * d.reshape(shape).to(u.dtype)).reshape(n, -1) for us, d in directions
                     if slot < len(us) and us[slot] is not None and us[slot].shape == u.shape]
            g = (terms[0] if len(terms) == 1 else torch.stack(terms).mean(0)).to(e.dtype)
            opts = {**DEFAULTS, **layer.__dict__.get("_mode_options", {})}
            self.step(layer, e, g, session.infos[slot], opts)

    @staticmethod
    def step(layer, e: torch.Tensor, g: torch.Tensor, info, opts) -> None:
        fb = layer.feedback
        with torch.enable_grad():
            b = fb.detach().to(e.dtype).requires_grad_(True)
            p = layer.project_error(e.detach(), b, info)
            width = p[0].numel()
            if width != g.shape[1]:
                # one error row per example but several positions (tokens) per example at this layer: the
                # projection is spread evenly over them, so the best it can align with is their sum
                g = g.reshape(g.shape[0], -1, width).sum(1)
            cos = batch_cosine(p, g)
            (grad,) = torch.autograd.grad(cos, b)
        with torch.no_grad():
            layer.grape_cos = cos.detach()
            if opts["keep_estimate"]:
                layer.forward_gradient = g.detach()
            lr, mom, half = opts["feedback_lr"], opts["momentum"], opts["feedback_lr_halflife"]
            if lr == 0:
                return
            steps = layer.feedback_steps
            if half is not None:  # a tensor, so no device sync
                lr = lr / (1.0 + steps.to(fb.dtype) / half)
            steps += 1
            v = layer.feedback_velocity
            v.mul_(mom).add_(grad.to(v.dtype), alpha=1 - mom)
            norm0 = layer.feedback_norm
            fb.add_(v * (lr * norm0 * norm0))
            fb.mul_(norm0 / fb.norm().clamp_min(torch.finfo(fb.dtype).tiny))
