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
are uniform in ``+-0.05 sqrt(6 / D)`` (the reference code from July to mid-October 2022: He-uniform with fan-in
``D``, times ``Bstd`` 0.05; from 20 October 2022 on, and in its published zip, the fan-in is the input width ``K``,
``+-0.05 sqrt(6 / K)``, a smaller ``F`` when ``K > D``: pass ``scale=sqrt(D / K)`` for it), times
``convert(..., scale=s)``: ``scale`` is the factor on the papers' 0.05. ``init`` is ignored.

Choices the papers leave open, as defined here:

* **sign of the modulation**: ``x + F e`` with the fixed random ``F``, as in the reference code before 3 October
  2022; its later versions (and the GrAPE seed) write ``x - F e``: with a zero-mean symmetric ``F`` the
  two are the same distribution. With weight mirroring the sign matters (a mirrored ``F`` is aligned with the
  forward weights, and ``+`` would turn the hidden updates uphill): there it is ``x - F e``, as in the
  reference code;
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
model holds), and weight mirroring of ``F`` (``weight_mirroring: true``, below).

Weight mirroring (``weight_mirroring: true``; Akrout et al. 2019's weight mirror, as Srinivasan et al. apply it
to PEPITA). ``F`` is no longer a fixed draw but the product of per-layer *mirror matrices* ``B_l``, one per
converted layer, shaped like ``W_l^T`` (``in_l x out_l``; buffer ``mirror``)::

    F = (B_1 B_2 ... B_L)^T   (D x K)          modulation:  h_0^mod = x - err @ F

(``B_1 ... B_L`` in the order the layers run, ``B_L`` the output layer's). Each ``B_l`` learns in *mirror steps*
from noise sent through its own layer::

    xi_l = a * z - mean(a * z),  z ~ N(0, 1)^(N x in_l)      (one scalar mean over the whole matrix)
    B_l <- (1 - mirror_lr * mirror_decay) B_l + mirror_lr * xi_l^T (xi_l W_l^T) / N

so that ``E[xi^T xi W^T] / N = a^2 W^T``: ``B_l`` turns towards ``W_l^T`` and ``F`` towards the transposed product
of the forward weights. After every mirror step the matrices are rescaled together (``mirror_normalize``):
every ``B_l`` times ``(s / std(B_1 ... B_L))^(1/L)``, which keeps ``std(F) = s = 0.05 sqrt(2 / K) * scale``
(``K`` the first layer's input width; the reference code's target). A mirror step runs in the same backward as
the PEPITA update, after it (this step's updates used the matrices from before it).

The schedule, counted in backward calls (buffer ``mirror_steps``; step ``t = 0, 1, ...``): for ``t <
mirror_warmup`` the backward only mirrors (the reference's "pre-mirror" epochs: no second pass, no weight
update: every ``.grad`` is left as it was, so an optimizer with ``zero_grad(set_to_none=True)``, PyTorch's
default, leaves the weights alone); afterwards a step mirrors when ``t mod mirror_every >= mirror_every -
mirror_for``, and the PEPITA update runs at every step. The reference's schedule, in epochs of ``S`` steps
(mirror in epoch ``E`` when ``E < PRE_MIRROR`` or ``(E + 1) % MIRROR == 0``), is ``mirror_warmup =
PRE_MIRROR * S``, ``mirror_every = MIRROR * S``, ``mirror_for = S``; the defaults (1, 1) mirror at every step.

What the reference code (``ravifrancesco/PEPITA``, ``pepita/models/FCnet.py`` ``mirror_weights`` and
``pepita/core/trainer.py``) does, and where bio_ext differs:

* **the update**: its mirror step sets ``B_l.grad = -xi^T y / N`` and steps an SGD optimiser of the ``B_l``
  (``lr = WMLR``, ``weight_decay = WMWD``): exactly the line above. Its older ``FCNetMirror`` wrote
  ``B <- (1 - wmwd) B + wmlr u``, a decay not scaled by the rate; bio_ext follows the later code;
* **what the noise passes through**: there ``y`` is the whole block's output (Linear, dropout, ReLU; the output
  block's softmax); here the Linear alone, without bias (a converted layer does not know which activation
  follows it). For zero-mean Gaussian noise through a ReLU ``E[xi relu(W xi)^T] = a^2 W^T / 2``: the same
  direction at half the size (a ReLU layer's mirror step there is, in expectation, this one at ``mirror_lr /
  2``); through the output block's softmax it is, for small noise, ``a^2 W^T (I - 11^T / D) / D`` (each row of
  ``W^T`` centred over the ``D`` outputs), which bio_ext does not reproduce;
* **the noise**: ``a * randn`` less its scalar mean, as in the later code (``FCNetMirror`` drew ``a * (randn -
  0.5)``), from the global torch generator (so a mirror step moves the random stream), ``N`` = this batch's
  rows, on the layer's device and in the mirror matrices' dtype;
* **when, within a step**: there after the optimiser's weight step (mirroring the updated weights); here in the
  backward, before ``optimizer.step()`` (mirroring the weights of this step's forward): one step's lag;
* **the initial matrices**: normal with one standard deviation for all layers, rescaled at the first backward
  so that ``std(F) = s`` (the reference draws ``N(0, (s / sqrt(prod of hidden widths))^(2/L))``: the same
  distribution up to the product's sampling spread); drawn from ``convert``'s ``seed`` generator after each
  layer's ``feedback``, which stays unused (the ``feedback`` of a ``weight_mirroring`` model is not ``F``);
* **the reference's defaults**: ``pepita/core/config.py`` has ``WMLR 0.01, WMWD 1e-4, PRE_MIRROR 2,
  MIRROR 100`` (bio_ext's ``mirror_lr``, ``mirror_decay`` defaults); its ``scripts/train.py`` command line
  defaults are ``0.1, 0.5, 0, 200``; the noise amplitude is ``mirror_weights``' default 0.1, which the trainer
  never changes (``mirror_noise``);
* **under DDP** each rank draws its own noise, and DDP's ``broadcast_buffers=True`` (its default) replaces the
  other ranks' mirror matrices by rank 0's at the next forward: the ranks train with rank 0's ``F``.

Limits: one error row per example at the output and a 2-D first-layer input (no tokens); the loss must be
unscaled (``GradScaler``'s scaled error would scale the modulation too); a forward hook that changes the
model's behaviour between the two passes changes what the second pass computes.

Options (``convert(model, "pepita", options={...})``):

``error_reduction`` (default ``"mean"``)
    how the loss reduces over the batch, which is how the per-example error is recovered from ``e``.
``weight_mirroring`` (default false)
    learn ``F`` as the product of per-layer mirror matrices (above). The ``mirror_*`` options below are refused
    unless it is true; the matrices exist only then (buffers ``mirror`` and ``mirror_steps`` of every converted
    layer, in ``state_dict``).
``mirror_lr`` (default 0.01), ``mirror_decay`` (default 1e-4)
    rate and L2 weight decay of the mirror step (the reference's ``WMLR``, ``WMWD``); finite, >= 0. With the
    rescaling the decay hardly matters (the rescaling undoes it) and ``mirror_lr * mirror_noise^2`` sets how fast
    the matrices turn: at the defaults slowly (the Table 1 MNIST MLP, mirroring every step: cosine of ``B_l``
    with ``W_l^T`` about 0.18 after 1,175 steps; 0.96 at ``mirror_lr: 1.0``; BENCHMARKS.md).
``mirror_noise`` (default 0.1)
    the noise amplitude ``a``; finite, > 0.
``mirror_warmup`` (default 0), ``mirror_every`` (default 1), ``mirror_for`` (default 1)
    the schedule in backward calls (above); ints, ``mirror_warmup >= 0``, ``1 <= mirror_for <= mirror_every``.
``mirror_normalize`` (default true)
    rescale the matrices after every mirror step so that ``std(F)`` stays ``0.05 sqrt(2 / K) * scale``.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

DEFAULTS: Dict[str, Any] = {"error_reduction": "mean", "weight_mirroring": False, "mirror_lr": 0.01,
                            "mirror_decay": 1e-4, "mirror_noise": 0.1, "mirror_warmup": 0, "mirror_every": 1,
                            "mirror_for": 1, "mirror_normalize": True}
#: the options that only weight mirroring reads
MIRROR_OPTIONS = tuple(k for k in DEFAULTS if k.startswith("mirror_"))
#: the reference code's ``Bstd``: F's entries are uniform in +-F_STD * sqrt(6 / D)
F_STD = 0.05


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def option_problems(options) -> List[Problem]:
    """Every problem with PEPITA's ``options``."""
    problems = [Problem(f"options.{k}", f"unknown option of mode 'pepita'; valid: {', '.join(DEFAULTS)}")
                for k in options if k not in DEFAULTS]
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}
    if opts["error_reduction"] not in ("mean", "sum"):
        problems.append(Problem("options.error_reduction",
                                f"'mean' or 'sum' (the loss's reduction over the batch), got {opts['error_reduction']!r}"))
    for flag in ("weight_mirroring", "mirror_normalize"):
        if not isinstance(opts[flag], bool):
            problems.append(Problem(f"options.{flag}", f"must be True or False, got {opts[flag]!r}"))
    for k in ("mirror_lr", "mirror_decay"):
        if not _is_number(opts[k]) or opts[k] < 0:
            problems.append(Problem(f"options.{k}", f"must be a finite number >= 0, got {opts[k]!r}"))
    if not _is_number(opts["mirror_noise"]) or opts["mirror_noise"] <= 0:
        problems.append(Problem("options.mirror_noise",
                                f"must be a finite number > 0 (the noise amplitude), got {opts['mirror_noise']!r}"))
    if not _is_int(opts["mirror_warmup"]) or opts["mirror_warmup"] < 0:
        problems.append(Problem("options.mirror_warmup",
                                f"must be an int >= 0 (backward calls that only mirror), got {opts['mirror_warmup']!r}"))
    every_ok = _is_int(opts["mirror_every"]) and opts["mirror_every"] >= 1
    if not every_ok:
        problems.append(Problem("options.mirror_every", f"must be an int >= 1, got {opts['mirror_every']!r}"))
    if not _is_int(opts["mirror_for"]) or opts["mirror_for"] < 1 or (every_ok and opts["mirror_for"] > opts["mirror_every"]):
        problems.append(Problem("options.mirror_for",
                                f"must be an int in [1, mirror_every] (mirror steps in every period of mirror_every "
                                f"backward calls), got {opts['mirror_for']!r}"))
    if opts["weight_mirroring"] is not True:
        problems += [Problem(f"options.{k}", "takes effect only with weight_mirroring: true")
                     for k in MIRROR_OPTIONS if k in options]
    return problems


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
    def forward(ctx, out, session, *params):
        ctx.session = session
        return out.view_as(out)

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
        return option_problems(options)

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

    def prepare(self, layer, generator):
        """With ``weight_mirroring``: the layer's mirror matrix (``W^T``'s shape, standard normal until the first
        backward rescales the chain) and its step count."""
        if not {**DEFAULTS, **layer.mode_options}["weight_mirroring"]:
            return
        w = layer.weight.detach()
        shape = tuple(w.shape) if getattr(layer, "transposed", False) else (w.shape[1], w.shape[0])
        b = torch.empty(shape, dtype=w.dtype).normal_(0.0, 1.0, generator=generator)
        layer.register_buffer("mirror", b.to(w.device))
        layer.register_buffer("mirror_steps", torch.zeros((), dtype=torch.long, device=w.device))

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
        out = st.tapped_at
        if out is None or out != len(st.layers):
            raise FeedbackSignalError(
                f"mode 'pepita': {len(st.layers) - (out or 0)} converted layer(s) ran after the output layer, and "
                "PEPITA defines no update for them; convert only the layers up to the output layer")
        if not opts["weight_mirroring"]:
            return Pepita.two_pass_updates(session, e, err.detach().to(first.feedback.dtype).mm(first.feedback), mean)
        chain = mirror_chain(st.layers, e.shape[-1])
        target = F_STD * math.sqrt(2.0 / chain[0].shape[0]) * first.feedback_spec.scale
        step = int(first.mirror_steps)
        with torch.no_grad():
            if step == 0:  # the initial draw, to the reference's std of F
                rescale(chain, target)
            if step < opts["mirror_warmup"]:
                grads: List[Optional[torch.Tensor]] = [None] * (2 * len(st.layers))
            else:
                f = product(chain)  # K x D
                grads = Pepita.two_pass_updates(session, e, -err.detach().to(f.dtype).mm(f.t()), mean)
            every = opts["mirror_every"]
            if step < opts["mirror_warmup"] or step % every >= every - opts["mirror_for"]:
                mirror_step(st.layers, rows, opts)
                if opts["mirror_normalize"]:
                    rescale(chain, target)
            for layer in st.layers:
                layer.mirror_steps += 1
        return grads

    @staticmethod
    def two_pass_updates(session, e: torch.Tensor, modulation: torch.Tensor, mean: bool) -> List[Optional[torch.Tensor]]:
        """The second pass on the first layer's input plus ``modulation`` and the updates of every (weight, bias)
        pair of the first pass's layers."""
        st: _Pass = session.rule_state
        e = e.reshape(-1, e.shape[-1])
        rows = e.shape[0]
        second = Pepita.second_pass(session, modulation)
        if len(second.inputs) != len(st.layers) or any(a is not b for a, b in zip(second.layers, st.layers)):
            raise FeedbackSignalError(
                "mode 'pepita': the second forward called other converted layers than the first "
                f"({len(second.inputs)} calls against {len(st.layers)}); PEPITA needs a forward whose path does not "
                "depend on its input's values")
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


# --------------------------------------------------------------------------- weight mirroring


def mirror_chain(layers, out_dim: int) -> List[torch.Tensor]:
    """The mirror matrices of the layers in the order they ran, checked to chain from the first layer's input to
    the ``out_dim`` outputs."""
    chain = []
    for i, layer in enumerate(layers):
        b = getattr(layer, "mirror", None)
        if not isinstance(b, torch.Tensor):
            raise FeedbackSignalError(
                "mode 'pepita' with weight_mirroring: a converted layer has no mirror matrix (its options were "
                "changed after convert); convert the model with options={'weight_mirroring': True}")
        if chain and chain[-1].shape[1] != b.shape[0]:
            raise FeedbackSignalError(
                f"mode 'pepita' with weight_mirroring: converted layer {i} takes {b.shape[0]} inputs but the layer "
                f"before it has {chain[-1].shape[1]} outputs; F is the product of the layers' mirror matrices, which "
                "needs a chain of Linear layers each feeding the next")
        chain.append(b)
    if chain[-1].shape[1] != out_dim:
        raise FeedbackSignalError(
            f"mode 'pepita' with weight_mirroring: the output layer has {chain[-1].shape[1]} outputs and the error "
            f"{out_dim} columns")
    return chain


def product(chain: List[torch.Tensor]) -> torch.Tensor:
    """``B_1 B_2 ... B_L`` (``K x D``), multiplied from the right: every product then has ``D`` columns (an MLP
    784-1024-1024-10: about 18 M multiply-adds instead of 0.8 G from the left)."""
    dtype = chain[0].dtype
    f = chain[-1].to(dtype)
    for b in reversed(chain[:-1]):
        f = b.to(dtype).mm(f)
    return f


def rescale(chain: List[torch.Tensor], target: float) -> None:
    """Every matrix times ``(target / std(B_1 ... B_L))^(1/L)``, in place (the reference's ``normalize_B``)."""
    std = float(product(chain).std())
    if not math.isfinite(std) or std <= 0:
        log.warning("pepita weight mirroring: std of F is %s, matrices left unscaled", std)
        return
    factor = (target / std) ** (1.0 / len(chain))
    for b in chain:
        b.mul_(factor)


def mirror_step(layers, rows: int, opts: Dict[str, Any]) -> None:
    """One mirror step of every layer: ``B <- (1 - lr decay) B + lr xi^T (xi W^T) / N`` on fresh noise ``xi``."""
    lr, decay, amp = opts["mirror_lr"], opts["mirror_decay"], opts["mirror_noise"]
    for layer in layers:
        b = layer.mirror
        noise = amp * torch.randn(rows, b.shape[0], dtype=b.dtype, device=b.device)
        noise = noise - noise.mean()
        w = layer.weight.detach().to(b.dtype)
        y = noise.mm(w) if getattr(layer, "transposed", False) else noise.mm(w.t())
        b.mul_(1.0 - lr * decay).add_(noise.t().mm(y), alpha=lr / rows)
