"""GrAPE: DFA whose feedback matrices are turned toward forward-gradient estimates.

Seed paper: "Backpropagation-free learning through gradient aligned feedbacks",
section 3 and Algorithm 1. Every choice the paper leaves open is defined here.

One step, inside the user's ordinary ``model(x)`` / ``loss.backward()``:

1. **Forward (with tangents).** The converted model's forward runs under a
   forward-mode AD level (``torch.autograd.forward_ad``). Each converted layer
   whose input needs a gradient adds a fresh standard-normal perturbation ``u_l``
   to the tangent of its input, the very tensor at which DFA injects its
   feedback. Tangents flow through everything in between (ReLU, residual additions,
   pooling) by PyTorch's own forward-mode rules, through BatchNorm, LayerNorm, plain Linear/Conv1D
   and GPT-2's GELU by the same formulas in fewer passes (:mod:`bio_ext.modes.grape_norm`), through
   softmax attention beside its fused kernel (:mod:`bio_ext.modes.grape_attention`), and through the converted layers
   by the tangent product each computes in its forward. The output layer's output tangent ``t``
   is kept; the loss itself is computed without tangents. The level is shared
   (:mod:`bio_ext.modes.levels`): GrAPE forwards in several threads run under one level, and
   a forward inside the user's own ``fwAD.dual_level()`` runs under theirs (refused, with a
   :class:`~bio_ext.errors.NestedForwardADError`, when its inputs carry the user's tangents).
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

   The gradient is computed in closed form for Linear and Conv2d layers (every feedback shape) and
   feedback points (:func:`~bio_ext.modes.grape_step.cosine_gradient`): ``cos = <P, g> / (||P|| ||g||)``
   with ``<P, g> = <B, e^T (d u)>`` and ``||P||^2 = <B, (e^T e) B>`` (through the convolution's spread
   where it has one), so neither ``P`` nor ``g`` is formed; other layers differentiate ``project_error``
   with autograd. Equal to autograd in float64 (tests/test_functional.py).

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
    ``||B||`` and the loss scale. The defaults were chosen by measuring alignment with
    frozen weights and accuracy with training, against constant rates from 0.001 to 0.3
    (BENCHMARKS.md, "GrAPE feedback alignment"): a fast constant rate aligns the feedback quickly and
    then keeps it wandering, a slow one takes thousands of steps.
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
    variance (both tested). A replay computes no Linear or Conv2d product of its own: it reuses the real
    forward's outputs of those layers (the same function of the same inputs) and computes only their
    tangent products and the elementwise ops between layers (:mod:`bio_ext.modes.grape_replay`; equal to
    recomputing, tested). Its cost is in BENCHMARKS.md ("GrAPE's speed, second round"); ``K = 1`` keeps the
    one-forward-one-backward cost the paper sells, and the moving average (``momentum``) is the free way to
    cut variance.
``perturbation`` (default ``"input"``)
    where the perturbation is added: the layer input, i.e. the very tensor at which the feedback
    is injected, so ``g_l`` estimates the gradient that ``e @ B_l`` stands in for (with
    ``granularity='macro'``/``'micro'``, the feedback point's tensor). This is the only point at
    which the estimate and the projection are of the same quantity; perturbing a layer's output
    or its weights estimates a different gradient, which the feedback cannot be compared with
    without transporting it back through the layer (i.e. backprop). The option is kept so a
    config states it explicitly; any other value is refused.
``perturb_layers`` (default ``"all"``)
    ``"all"``: every layer's input is perturbed in every step, so one directional derivative ``d_n``
    carries every layer's perturbation and each layer's estimate has the others' as noise (its
    variance grows with the total perturbed width of the network). ``"cycle"``: one layer per step,
    in turn (slot ``t mod L`` of step ``t``, ``L`` the layers of the previous step; all of them in the
    first step): each layer's feedback is updated every ``L`` steps, from an estimate with no other
    layer's noise in it. Measured (BENCHMARKS.md, "Forward-gradient estimate quality").
``feedback_target`` (default ``"gradient"``)
    what the feedback is turned toward. ``"gradient"``: the seed's rule above, the forward-gradient
    estimate ``g_l = d u_l`` against the projected error ``e @ B_l``. ``"jacobian"``: the same forward's
    output tangent ``t = J_l u_l + (the other layers' terms)`` projected through ``B_l`` as the error is,
    against the perturbation ``u_l`` itself: ``E[t u_l^T] = J_l``, the output's Jacobian at the layer
    input, which is what ``B_l`` stands in for (``e @ J_l`` is the true gradient). It uses the ``D``
    numbers of ``t`` per example where the gradient target keeps their one product with ``e``, and it
    does not depend on the error being informative, so it is much less noisy: with frozen weights,
    300 steps, default rates, the mean cosine of the injected signal with the true gradient goes from
    0.49 to 0.88 (tanh MLP, 2 hidden layers of 256), 0.22 to 0.48 (6 layers), and at a convolution's
    input (16x16) from 0.16 to 0.46 (``dense``) and 0.10 to 0.24 (``factored``); BENCHMARKS.md
    ("GrAPE's Jacobian target"). Same cost (no extra forward). With several rows per example (tokens)
    it aligns each row's feedback with its own row's Jacobian (the cross-token terms are noise to it).
    Recommended for training: ahead of the seed's rule or level with it in every training measured (VGG-16/4 +1.6
    points, MNIST MLP +0.2, CNN +0.7, char GPT-2 macro perplexity 16.0 against 25.5; BENCHMARKS.md, "Deep networks,
    tenth round"). Not the default: ``grape`` is the seed's rule. ``layer.grape_cos`` is cos(``t @ B_l``, ``u_l``).
``distribution`` (default ``"normal"``)
    what the perturbations ``u_l`` are drawn from: ``"normal"``, standard normals (the seed's), or
    ``"rademacher"``, independent signs +-1. Both have mean 0 and ``E[u u^T] = I``, so the estimate is unbiased
    with either (tested); with signs it has the smaller variance (``u_i^2 = 1``: no fourth-moment term), and they
    cost less than half the normals' draw on the CPU (eight per random byte, :func:`bio_ext._utils.rng.rademacher`;
    step times in BENCHMARKS.md, "GrAPE's speed, second round").
``keep_estimate`` (default False)
    keep the last ``g_l`` on each layer as ``layer.forward_gradient`` (for analysis).

Activation checkpointing. The estimate needs forward-mode tangents through the whole forward, and
activation checkpointing cannot recompute them: torch's forward-mode AD records the tangents' own operations in
the autograd graph, so a non-reentrant segment's recompute (without tangents) saves other tensors than its
forward did, and a reentrant segment is a custom Function with no ``jvp``. What is true, and tested
(tests/test_checkpointing.py):

* transformers' ``activation_checkpointing_enable()`` (formerly ``gradient_checkpointing_enable()``, either
  ``use_reentrant``): GrAPE sees the modules' ``gradient_checkpointing`` flag and runs the forward without
  tangents, with a warning: every layer gets DFA's projection of its current feedback, and no feedback is
  updated (the gradients equal DFA's with that feedback);
* ``torch.utils.checkpoint(..., use_reentrant=False)`` around converted layers: a
  :class:`~bio_ext.errors.FeedbackSignalError` at the first layer inside the segment, naming the fixes;
* ``use_reentrant=True``: the segment runs under ``no_grad``, so its layers are neither perturbed nor stepped
  and get DFA's projection when the backward recomputes them; a tangent from a layer before the segment
  reaching it raises torch's "You must implement the jvp function" error.

Perturbations are drawn from a generator of each forward's own, seeded by one draw from the global RNG at the
start of the forward, so dropout inside the forward sees the same stream whether or not layers perturb. On the
CPU, where torch draws normals on one thread, a draw of 65536 numbers or more takes its second half from a second
generator of the forward's own (seeded from the first's seed) in a worker thread at the same time: the same
independent standard normals, in about half the time (:func:`bio_ext._utils.rng.normal`).

Convolutions. With the default ``conv_feedback="kernel"`` a Conv2d's projection is (nearly) constant over its input
grid, so GrAPE cannot align it with a spatially varying gradient (frozen weights, 16x16 inputs: cosine 0.04 at a
convolution's input after 300 steps at feedback_lr 0.3). ``conv_feedback="dense"`` (``(D, C, H, W)``) reaches 0.63 and
``"factored"`` (``Bc[d, c] Bs[d, h, w]``, the cosine step differentiates through the product, so it turns both factors)
0.33-0.37: see :class:`bio_ext.layers.conv2d.FeedbackConv2d` and BENCHMARKS.md ("Convolution feedback shapes"). The
per-step estimate there is ~89 degrees from the true gradient; what the feedback update can use improves with the batch
(~sqrt(N)), with ``directions`` (~sqrt(K)) and, in deep nets, by not sharing one directional derivative among all
layers (``perturb_layers="cycle"``), measured in BENCHMARKS.md ("Forward-gradient estimate quality"). On a deep network
(VGG-16 with every width divided by 4) ``dense`` trains GrAPE to 34.1% against 28.9% with ``kernel`` (800 steps, 4
seeds), ahead of DFA with the same shape early but level with it after 1,600 steps (+0.3, 6 seeds). With the Jacobian
target (``feedback_target="jacobian"``, recommended) it keeps +1.9 ± 1.5 (6 seeds); a constant rate adds nothing
and a faster one (0.15) falls to DFA's level or below. On AlexNet (400 steps, 3 seeds) the default and the Jacobian
target (at a constant rate) both end +0.5 over DFA. BENCHMARKS.md, "Deep networks", fifth to ninth rounds.

Stability on deep ReLU networks (VGG-16, VGG-16-BN, AlexNet at the seed's Adam 1e-4). What grows under DFA
and GrAPE with the projection as it is (``radial="keep"``) is the activity of the late layers, while every
weight keeps its norm: a fixed random signal's component along a layer's input moves each example's activity
out or in regardless of whether that lowers the loss, Adam moves every weight by about ``lr`` per step whatever
the signal's scale, and nothing turns the growth back. The true gradient has that component in closed form
wherever the net above the layer is positively homogeneous (ReLU, pooling, dropout, linear maps; biases aside):
``<g_n, x_n> = <e_n, J x_n> = <e_n, z_n>`` by Euler's identity, the same number for every layer. The default
``ConvertConfig.radial="auto"`` therefore gives dfa and grape ``"output"`` on such models: each injected signal
keeps its random (now aligning) direction orthogonal to the input, at the error's norm, plus that radial part
(:func:`bio_ext.functional.output_radial`), so an example's activity grows only while that lowers its loss and
shrinks when its logits overshoot. Side by side (BENCHMARKS.md, "Deep networks, fourth round"), full VGG-16 on a
CIFAR-10 subset: ``keep`` diverges within 60 steps, ``drop`` (the radial part removed, the older
``tangential=True``) only slows the growth, ``output`` holds the activity at its initial size and learns. On
VGG-16-BN (BatchNorm is affine, not homogeneous, for one example) ``output`` is the only one of the three whose loss
falls, though the classifier's activity stays above backprop's.
Models with a saturating activation or a normalisation other than BatchNorm (tanh MLPs, transformers) keep the
projection as it is under ``auto``: there ``<e, z>`` is not the radial component (and the tanh MLPs measured do not
diverge). GrAPE's cosine step is unchanged: it turns ``B`` toward the estimate of the whole gradient, and the layer
injects the tangential part of ``e @ B`` with the radial part above.

After each step every layer holds ``layer.grape_cos``: the mini-batch cosine
between its projected error and its forward-gradient estimate, before the update.

**Non-finite batches.** The feedback step runs inside ``backward``, before the user's loop can look
at the loss, so a loop that skips the optimizer step on a NaN/inf loss (GradScaler-style) cannot
skip it. The step therefore checks that the error ``e``, the estimate ``g_l`` and the cosine's
gradient are all finite (in the closed form, one check of the gradient and the cosine: a NaN or inf
in ``e``, ``d`` or ``u`` reaches every entry of both); when one is not, it leaves every buffer (``feedback``,
``feedback_velocity``, ``feedback_steps``) as it was and adds 1 to ``layer.feedback_skips``
(a 0-d long buffer, kept out of ``state_dict``: a diagnostic count since the model was built). The
check is a ``torch.where`` on a 0-d tensor, so it needs no device sync. The cosine divides each
side by its largest magnitude first, so logits of 1e19 (estimates whose float32 norm overflows)
give a finite cosine and step.

**Under DistributedDataParallel** (:mod:`bio_ext.distributed`) the step is that of the global batch: the
cosine's sums (and their gradients) are all-reduced once per step over the DDP's process group, so every rank
holds the same feedback; each rank draws its perturbations from its own stream (the seed mixed with its rank).

**How often the feedback steps.** Once each time a forward's output error arrives: every forward
opens its own session (its own perturbations and output tangent), and the step runs in that
session's error tap, right before the session projects ``e @ B``. So the count is per forward per
backward pass through it, not per ``backward()`` call:

* two forwards, then one ``backward()`` of the summed loss: two steps, one per forward, each from
  that forward's error and estimate (in the order autograd reaches the two taps, the later forward
  first); each forward's hidden gradients are projected with the feedback right after its own
  step, so they differ (by about ``lr``) from a DFA-style sum with one fixed ``B``;
* one forward, then ``backward(retain_graph=True)`` twice: two steps, both from the same error and
  perturbation (the second sees the velocity and feedback of the first).

For one step per optimizer step with gradient accumulation, accumulate over forwards with
``feedback_lr`` divided by the number of micro-batches, or set ``feedback_lr=0`` on all but one
(``layer.mode_options``). Tested in ``tests/test_grape_reliability.py``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from .. import distributed
from .._utils import rng
from ..errors import FeedbackSignalError, Problem
from ..session import FeedbackSession
from . import grape_attention, grape_replay, levels
from .base import register_mode
from .direct import DirectFeedbackAlignment
from .grape_step import PendingSteps, apply_steps, batch_cosine, cosine_gradient, projection_kind  # noqa: F401

#: perturb_layers='cycle': per converted model, [forwards seen, slots of the last forward]
_CYCLES: "weakref.WeakKeyDictionary[nn.Module, List[int]]" = weakref.WeakKeyDictionary()

DEFAULTS: Dict[str, Any] = {"feedback_lr": 0.05, "feedback_lr_halflife": 500, "momentum": 0.9, "directions": 1,
                            "perturbation": "input", "keep_estimate": False, "perturb_layers": "all",
                            "feedback_target": "gradient", "distribution": "normal"}


def validate_options(options: Mapping[str, Any]) -> List[Problem]:
    problems = []
    for k in options:
        if k not in DEFAULTS:
            problems.append(Problem(f"options.{k}", f"unknown option of mode 'grape'; valid: {', '.join(DEFAULTS)}"))
    lr = options.get("feedback_lr", DEFAULTS["feedback_lr"])
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 or not math.isfinite(lr):
        problems.append(Problem("options.feedback_lr", f"must be a finite number >= 0, got {lr!r}"))
    half = options.get("feedback_lr_halflife", DEFAULTS["feedback_lr_halflife"])
    if half is not None and (isinstance(half, bool) or not isinstance(half, (int, float)) or not half > 0):
        problems.append(Problem("options.feedback_lr_halflife", f"must be a number of steps > 0 or None, got {half!r}"))
    mom = options.get("momentum", DEFAULTS["momentum"])
    if isinstance(mom, bool) or not isinstance(mom, (int, float)) or not 0 <= mom < 1:
        problems.append(Problem("options.momentum", f"must be in [0, 1), got {mom!r}"))
    k = options.get("directions", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(Problem("options.directions", f"must be an int >= 1 (tangent directions per step), got {k!r}"))
    if options.get("perturb_layers", "all") not in ("all", "cycle"):
        problems.append(Problem("options.perturb_layers", f"'all' or 'cycle', got {options.get('perturb_layers')!r}"))
    if options.get("feedback_target", "gradient") not in ("gradient", "jacobian"):
        problems.append(Problem("options.feedback_target",
                                f"'gradient' or 'jacobian', got {options.get('feedback_target')!r}"))
    if options.get("distribution", "normal") not in ("normal", "rademacher"):
        problems.append(Problem("options.distribution",
                                f"'normal' or 'rademacher', got {options.get('distribution')!r}"))
    if options.get("perturbation", "input") != "input":
        problems.append(Problem("options.perturbation", "only 'input' (the point where feedback is injected) is "
                                f"implemented, got {options.get('perturbation')!r}"))
    return problems


class _Forward:
    """GrAPE's state for one forward (``session.rule_state``): the perturbation added at each slot,
    the output's tangent, and what the extra tangent directions need and produce."""

    __slots__ = ("perturbations", "out_tangent", "examples", "generator", "generator2", "replay", "replays", "main",
                 "cursor",
                 "level", "counted", "sdpa", "only_slot", "cycle", "off", "seed", "group", "primals", "cursor_primal",
                 "distribution")

    def __init__(self, main: Optional[FeedbackSession] = None) -> None:
        self.perturbations: List[Optional[torch.Tensor]] = []
        self.out_tangent: Optional[torch.Tensor] = None
        #: examples in the output (its first dimension); the rows of ``out_tangent`` (e.g. the tokens of a
        #: sequence) are grouped by example for the directional derivative
        self.examples: Optional[int] = None
        #: draws the perturbations when set (several tangent directions: the global RNG must replay)
        self.generator: Optional[torch.Generator] = None
        #: on the CPU, the generator of the second half of large draws (:func:`bio_ext._utils.rng.normal`)
        self.generator2: Optional[torch.Generator] = None
        #: (module, args, kwargs, rng state, directions, device) of the forward, to replay it
        self.replay: Any = None
        #: (perturbations, output tangent) of each extra tangent direction
        self.replays: List[Tuple[List[Optional[torch.Tensor]], Optional[torch.Tensor]]] = []
        #: in a tangent-only replay: the session of the real forward, and how many of its slots were seen
        self.main = main
        self.cursor = 0
        self.level: Any = None
        #: whether the level is GrAPE's own, counted (see :mod:`bio_ext.modes.levels`)
        self.counted = False
        self.sdpa: Any = None
        #: perturb_layers='cycle': the one slot perturbed in this forward (None: all), and the model's
        #: [forwards seen, slots of the last one]
        self.only_slot: Optional[int] = None
        self.cycle: Optional[List[int]] = None
        #: no tangents in this forward (activation checkpointing): the step is DFA's, the feedback stays
        self.off = False
        #: the perturbation generator's seed (this rank's, under torch.distributed)
        self.seed: Optional[int] = None
        #: the process group the feedback steps are all-reduced over (:mod:`bio_ext.distributed`), or None
        self.group: Any = None
        #: directions > 1: (layer, input shape, output) of each converted layer's product in the real forward, in
        #: call order, which the tangent-only replays reuse (see primal_output); dropped once they have run
        self.primals: Optional[List[Tuple[nn.Module, torch.Size, torch.Tensor]]] = None
        self.cursor_primal = 0
        #: the perturbations' distribution (option ``distribution``)
        self.distribution = "normal"
        if main is not None:  # a replay draws as its real forward does, from the same generators
            real = main.rule_state
            self.generator, self.generator2, self.distribution = real.generator, real.generator2, real.distribution


@register_mode("grape", family="direct",
               description="DFA whose feedback turns toward activity-perturbed forward-gradient estimates")
class GradientAlignedProjectedError(DirectFeedbackAlignment):
    """GrAPE (seed paper, Algorithm 1). See :mod:`bio_ext.modes.grape` for every definition."""

    #: ConvertConfig.radial="auto": as dfa's (this class's own declaration: fdfa derives from it)
    default_radial = "output"

    forward_gradient = True
    traceable = False
    transient_buffers = ("feedback_skips",)

    def validate_options(self, options):
        return validate_options(options)

    def probe_options(self, options):
        """No feedback step, and the estimate kept (``alignment`` compares it with the true gradient)."""
        return {**options, "feedback_lr": 0.0, "keep_estimate": True}

    def create(self, weight, spec, generator):
        buffers = super().create(weight, spec, generator)
        fb = buffers["feedback"]
        buffers["feedback_velocity"] = torch.zeros_like(fb)
        buffers["feedback_norm"] = fb.norm().reshape(())
        buffers["feedback_steps"] = torch.zeros((), dtype=torch.long, device=fb.device)
        buffers["feedback_skips"] = torch.zeros((), dtype=torch.long, device=fb.device)
        return buffers

    # ----------------------------------------------------------------- the forward, with tangents

    def open_forward(self, session, module, args, kwargs, options) -> None:
        """Enter a forward-mode AD level for the forward (and :mod:`.grape_attention`'s attention: the fused
        kernels have no tangent formulas); with ``directions`` > 1, keep what replaying the forward needs."""
        fwd = _Forward()
        session.rule_state = fwd
        if module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()):
            warnings.warn(CHECKPOINTING_WARNING, UserWarning, stacklevel=2)
            fwd.off = True
            return
        if options.get("perturb_layers", "all") == "cycle":
            fwd.cycle = _CYCLES.setdefault(module, [0, 0])
            if fwd.cycle[1]:
                fwd.only_slot = fwd.cycle[0] % fwd.cycle[1]
        # the perturbations come from a generator of the forward's own, seeded by one draw from the global RNG
        # here: the global stream inside the forward (dropout) is then the same whether or not a layer draws a
        # perturbation, so activation checkpointing's recompute (which restores the RNG and draws no
        # perturbation) recomputes the same dropout masks, and extra tangent directions can replay it
        directions = options.get("directions", 1)
        fwd.distribution = options.get("distribution", "normal")
        device = next(module.parameters()).device
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        fwd.group = distributed.feedback_group(module)
        if fwd.group is not None:  # a stream of each rank's own: perturbations are per-example noise
            seed = distributed.rank_seed(seed, distributed.group_rank(fwd.group))
        fwd.seed = seed
        fwd.generator = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cpu":
            fwd.generator2 = torch.Generator(device=device).manual_seed(rng.derived_seed(seed))
        if directions > 1:
            fwd.replay = (module, args, kwargs, rng.capture(device), directions, device)
            fwd.primals = []
        fwd.level, fwd.counted = levels.enter(module, args, kwargs)  # may refuse: before anything is entered
        fwd.sdpa = grape_attention.tangent_attention(module)  # fused attention kernels, the tangent beside them
        fwd.sdpa.__enter__()

    def enter(self, session, layer, x, info=None):
        fwd = session.rule_state
        if fwd.off:
            return super().enter(session, layer, x, info)
        if not session.tangent_only and in_checkpoint():
            raise FeedbackSignalError(CHECKPOINTING_ERROR)
        if session.tangent_only:  # a replay perturbs the layers the real forward registered, in order
            main = fwd.main
            if fwd.cursor >= len(main.layers) or main.layers[fwd.cursor] is not layer:
                return -1, x
            fwd.cursor += 1
            main_fwd = main.rule_state
            if fwd.cursor - 1 >= len(main_fwd.perturbations) or main_fwd.perturbations[fwd.cursor - 1] is None:
                fwd.perturbations.append(None)  # not perturbed in the real forward either
                return -1, x
            return -1, self.perturb(session, len(fwd.perturbations), x)
        slot, x = super().enter(session, layer, x, info)
        if slot >= 0 and (fwd.only_slot is None or slot == fwd.only_slot):
            x = self.perturb(session, slot, x)
        return slot, x

    @torch._dynamo.disable  # torch.compile: drawn eagerly from the forward's generator (a graph break)
    def perturb(self, session, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Add a fresh standard-normal perturbation ``u`` to the forward-mode tangent of ``x`` (kept for slot)."""
        fwd = session.rule_state
        primal, tangent = fwAD.unpack_dual(x)
        # drawn in at least float32 (under autocast the activations are bf16/fp16): the same draws as without
        # autocast, rounded to the activation's dtype
        draw = torch.promote_types(primal.dtype, torch.float32)
        if fwd.distribution == "rademacher":
            u = rng.rademacher(primal.shape, primal.dtype, primal.device, fwd.generator)
        else:
            u = rng.normal(primal.shape, draw, primal.device, fwd.generator, fwd.generator2).to(primal.dtype)
        while len(fwd.perturbations) <= slot:
            fwd.perturbations.append(None)
        fwd.perturbations[slot] = u
        return fwAD.make_dual(primal, u if tangent is None else tangent + u)

    def primal_output(self, session, layer, x, compute):
        """With ``directions`` > 1 a replay reuses the real forward's products (:func:`.grape_replay.primal_output`)."""
        return grape_replay.primal_output(session, layer, x, compute)

    def on_output(self, session, output):
        """Keep the output's tangent; the loss is computed from the primal, without tangents."""
        fwd = session.rule_state
        if fwd.off:
            return output
        primal, tangent = fwAD.unpack_dual(output)
        out_tangent = None if tangent is None else tangent.detach().reshape(-1, session.output_dim).clone()
        if session.tangent_only:
            fwd.out_tangent = out_tangent
            return output
        if tangent is None:
            return output
        fwd.out_tangent = out_tangent
        fwd.examples = output.shape[0] if output.dim() >= 2 else 1
        return primal

    def close_forward(self, session, module, output) -> None:
        fwd = session.rule_state
        if fwd.off:
            return
        if fwd.cycle is not None:
            fwd.cycle[0], fwd.cycle[1] = fwd.cycle[0] + 1, len(session.feedbacks)
        try:
            if fwd.replay is not None and output is not None and fwd.out_tangent is not None:
                self._replay_directions(session)  # still inside this forward's session and dual level
        finally:
            fwd.primals = None  # the products the replays reused (grape_replay.primal_output)
            levels.leave(fwd.level, fwd.counted)
            fwd.sdpa.__exit__(None, None, None)

    @staticmethod
    def _replay_directions(session) -> None:
        """``directions`` K > 1: K - 1 more forwards that carry tangents only (:func:`.grape_replay.replay`)."""
        grape_replay.replay(session, lambda: _Forward(main=session))

    # ----------------------------------------------------------------- the backward: estimate, then turn B

    def before_projection(self, session, e: torch.Tensor) -> None:
        fwd = session.rule_state
        if fwd is None or fwd.out_tangent is None:
            return
        n = e.shape[0]
        # one directional derivative per example and tangent direction: the rows of one example (the tokens
        # of a sequence) interact (attention), so a perturbation at token j moves the outputs at other tokens
        ex = fwd.examples or n

        wide = torch.promote_types(e.dtype, torch.float32)  # bf16/fp16 errors (autocast): sums in float32

        def per_example(tangent):
            return (e.to(wide) * tangent.to(wide)).sum(-1).reshape(ex, -1).sum(1)

        tangents = [(fwd.perturbations, fwd.out_tangent)] + [(us, t) for us, t in fwd.replays if t is not None]
        directions = None  # (perturbations, d) per tangent direction, computed when a layer needs them
        synced = []  # under torch.distributed: the steps whose statistics are all-reduced together
        shared: Dict[Any, Any] = {}  # what the layers' steps share (the scaled error and its Gram matrix)
        pending = PendingSteps()  # the layers' feedback steps, applied together at the end
        for slot, layer in enumerate(session.layers):
            u = fwd.perturbations[slot] if slot < len(fwd.perturbations) else None
            if u is None or layer is None:
                continue
            rows = u.numel() // u.shape[-1]
            if u.shape[0] != ex or rows % n:
                continue  # the rows of this input cannot be matched with the examples: no estimate
            opts = {**DEFAULTS, **layer.mode_options}
            pairs = [(us[slot], t) for us, t in tangents
                     if slot < len(us) and us[slot] is not None and us[slot].shape == u.shape]
            sync = fwd.group is not None and opts["feedback_lr"] != 0
            g = weights = None
            if opts["feedback_target"] == "gradient" or opts["keep_estimate"]:
                if directions is None:
                    directions = {id(t): per_example(t) for _, t in tangents}
                if len(pairs) == 1 and opts["feedback_target"] == "gradient" and not sync:
                    # one direction: the estimate d_n u_n is kept as its factors (the per-row d and u), and the
                    # step never forms it (see step())
                    uk, t = pairs[0]
                    weights = directions[id(t)]
                    if n != ex:  # several rows (tokens) per example: each row has its example's d
                        weights = weights.repeat_interleave(n // ex)
                    g = uk.to(wide).reshape(n, -1)
                else:
                    # the mean of d^k u^k over the directions, accumulated in place (no stack of K copies)
                    shape = (ex,) + (1,) * (u.dim() - 1)
                    (u0, t0), rest = pairs[0], pairs[1:]
                    g = u0.to(wide) * directions[id(t0)].reshape(shape)
                    for uk, t in rest:
                        g.addcmul_(uk.to(wide), directions[id(t)].reshape(shape))
                    if rest:
                        g.div_(len(pairs))
                    g = g.reshape(n, -1)
            if opts["feedback_target"] == "jacobian":
                # B against the output's Jacobian: each direction's output tangent t = J u, projected
                # through B as the error is, is compared with the perturbation u itself (E[t u^T] = J)
                t = torch.cat([t.detach().to(wide).reshape(e.shape) for _, t in pairs])
                call = (layer, t, torch.cat([uk.reshape(n, -1) for uk, _ in pairs]).to(wide), session.infos[slot],
                        opts, g)
            else:
                call = (layer, e, g, session.infos[slot], opts, None)
            if sync:
                synced.append(call)
            else:
                self.step(*call[:5], estimate=call[5], weights=weights, shared=shared, pending=pending.before(layer))
        if synced:
            self.step_synced(synced, fwd.group)
        pending.flush()

    @staticmethod
    def step(layer, e: torch.Tensor, g: torch.Tensor, info, opts, estimate: Optional[torch.Tensor] = None,
             weights: Optional[torch.Tensor] = None, shared: Optional[dict] = None, pending: Optional[list] = None
             ) -> None:
        """Turn ``layer.feedback`` up the gradient of the mini-batch cosine between ``e`` projected through
        it and ``g`` (the error and the gradient estimate, or the output tangent and the perturbation);
        ``weights`` (one per row): the estimate is ``weights[:, None] * g`` (GrAPE's ``d_n u_n``, never formed);
        ``estimate`` is what ``keep_estimate`` keeps when ``g`` is not the gradient estimate; ``shared``: what
        the steps of one backward share (:func:`~bio_ext.modes.grape_step.scaled_error`); ``pending``: a list the
        step is appended to, for :func:`~bio_ext.modes.grape_step.apply_steps` (None: applied now)."""
        fb = layer.feedback
        # in the wider of the error's and the feedback's dtypes, autocast off: under mixed precision the error
        # is bf16/fp16, the feedback (and its step) stays in its own dtype
        dtype = torch.promote_types(e.dtype, fb.dtype)
        e, g = e.to(dtype), g.to(dtype)
        weights = None if weights is None else weights.to(dtype)
        with torch.no_grad(), torch.autocast(e.device.type, enabled=False):
            cos, grad, ok, g = cosine_gradient(layer, e, g, info, weights, shared)
            layer.grape_cos = cos
            if opts["keep_estimate"]:
                if estimate is None:
                    estimate = g if weights is None else g * weights[:, None]
                layer.forward_gradient = estimate.detach()
            lr, mom, half = opts["feedback_lr"], opts["momentum"], opts["feedback_lr_halflife"]
            if lr == 0:
                return
            if pending is None:
                apply_steps([(layer, grad, ok, lr, mom, half)])
            else:
                pending.append((layer, grad, ok, lr, mom, half))

    @staticmethod
    def step_synced(calls, group) -> None:
        """:meth:`step` for every layer of ``calls`` (``(layer, e, g, info, opts, estimate)``) on the global batch
        of ``group``: one ``all_reduce`` of every layer's statistics (:func:`bio_ext.distributed.global_cosine`)."""
        results = distributed.global_cosine([call[:4] for call in calls], group)
        steps = []
        with torch.no_grad():
            for (layer, _, _, _, opts, estimate), (grad, cos, ok, g) in zip(calls, results):
                layer.grape_cos = cos
                if opts["keep_estimate"]:
                    layer.forward_gradient = (g if estimate is None else estimate).detach()
                steps.append((layer, grad, ok, opts["feedback_lr"], opts["momentum"], opts["feedback_lr_halflife"]))
            apply_steps(steps)


CHECKPOINTING_WARNING = (
    "GrAPE under transformers' gradient checkpointing: the forward carries no forward-mode tangents (activation "
    "checkpointing cannot recompute them), so these steps train with DFA's projection of the current feedback and "
    "the feedback is not updated. Disable gradient checkpointing for GrAPE's feedback to turn.")
CHECKPOINTING_ERROR = (
    "mode 'grape' carries forward-mode tangents through the forward, and torch.utils.checkpoint cannot recompute "
    "them (its recompute would save other tensors than the forward did). Checkpoint the model with transformers' "
    "activation_checkpointing_enable() (or its older name, gradient_checkpointing_enable(); GrAPE then trains with "
    "DFA's projection and leaves its feedback as it is), use mode 'dfa', or do not checkpoint the converted layers.")


def in_checkpoint() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` segment is running (its saved-tensor hooks are on top)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return bool(hooks) and getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")
