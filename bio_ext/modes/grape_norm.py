"""Forward-mode tangents of common plain layers under GrAPE, in a few fused passes (BatchNorm first, hence the name).

PyTorch's forward AD runs some tangent formulas as many separate kernels: BatchNorm's as some twenty elementwise
kernels over the activations (most of the extra cost of a GrAPE forward through a ResNet), LayerNorm's through a
Python decomposition, GPT-2's ``NewGELUActivation`` (``0.5 x (1 + tanh(...))`` written out) as a tangent per
elementwise op, and a Linear or ``Conv1D`` with a plain weight as ``addmm``'s formula with zero-tensor terms for
the weight and bias. For the module types with a tangent rule (exactly those classes: a subclass may do anything in
its forward) the converted model's GrAPE forward takes the tangent off the input (a forward pre-hook), lets the
module run on the primal and gives its output the exact tangent (a forward hook): the same tangent as torch's,
for the primal the user's module computes. The hooks act only inside a GrAPE forward (a current session whose
rule carries tangents), when the input carries a tangent and the module's own parameters carry none. Layers
that ``convert`` swapped have their own tangent path; these are the plain ones around and inside them (macro and
micro granularity leave whole blocks plain).

BatchNorm (``nn.BatchNorm1d/2d/3d``; ``SyncBatchNorm``'s statistics span the ranks): with the batch statistics
(training, or no running statistics), ``y = g (x - m) / s + b`` over every dimension but the channels
(``s = sqrt(var + eps)``, biased variance), the tangent is::

    t_y = (g / s) (t - mean(t) - xh mean(t xh)),     xh = (x - m) / s

computed as ``a t + c (x - m) + d`` with per-channel ``a, c, d``; with the running statistics it is
``t g / sqrt(running_var + eps)``. LayerNorm: the same formula over the normalised (last) dimensions, ``g``
elementwise, computed by LayerNorm's fused backward (:func:`layer_norm_tangent`). Linear and ``Conv1D``: the
product of the tangent with the weight, no bias. The GELU tanh approximation (``NewGELUActivation``,
``FastGELUActivation``): ``t * gelu'(x)``, one ``gelu_backward`` kernel.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from .._utils.hooks import hook_function
from ..registry import register_tangent_rule as tangent_rule
from ..registry import tangent_rule_for as rule_for
from ..session import current_session

#: the classes whose forward is exactly F.batch_norm of their buffers (subclasses may do anything)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TANGENT = "_bio_ext_grape_tangent"

def hook_modules(root: nn.Module) -> None:
    """Give every module of ``root`` with a tangent rule the two hooks, where it has not got them: once, when
    ``convert`` builds a model whose rule carries tangents (``revert`` and ``detach_feedback`` take them off again).
    A module added to the model afterwards gets PyTorch's own tangent formula: the same tangent, in more passes."""
    for m in root.modules():
        if rule_for(m) is not None and not any(hook_function(h) is take_tangent for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(take_tangent)  # last: the other pre-hooks see the input with its tangent
            m.register_forward_hook(give_tangent, prepend=True)  # first: the others see the output with its tangent


def _active(module) -> bool:
    session = current_session(module)
    return session is not None and getattr(session.rule, "forward_gradient", False)


def take_tangent(module, args):
    """Forward pre-hook: the input's tangent, kept for :func:`give_tangent`; the module runs on the primal."""
    if torch.compiler.is_compiling():
        return None
    module.__dict__.pop(_TANGENT, None)  # left by a forward that raised between the hooks
    if not args or not isinstance(args[0], torch.Tensor) or not _active(module):
        return None
    primal, tangent = fwAD.unpack_dual(args[0])
    if tangent is None or len(args) > 1 and any(fwAD.unpack_dual(a).tangent is not None for a in args[1:]
                                                if isinstance(a, torch.Tensor)) \
            or any(fwAD.unpack_dual(p).tangent is not None for p in module.parameters(recurse=False)):
        return None
    module.__dict__[_TANGENT] = tangent
    return (primal, *args[1:])


def give_tangent(module, args, output):
    """Forward hook: the output with the exact tangent of the one :func:`take_tangent` took."""
    tangent = None if torch.compiler.is_compiling() else module.__dict__.pop(_TANGENT, None)
    if tangent is None:
        return None
    return fwAD.make_dual(output, rule_for(module)(module, args[0], tangent, output).to(output.dtype))


@tangent_rule(*NORMS)
def _batch_norm_rule(module, x, t, output):
    return batch_norm_tangent(module, x, t, _saved_stats(output))


def _saved_stats(output: torch.Tensor):
    """The batch mean and inverse standard deviation the forward computed, as its autograd node saved them
    (training with a graph), or None."""
    node = output.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0" or not getattr(node, "_saved_training", False):
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def batch_norm_tangent(module, x: torch.Tensor, t: torch.Tensor, stats=None) -> torch.Tensor:
    """The tangent of ``module(x)`` along ``t`` (``module`` a BatchNorm, as it ran: see the module docstring);
    ``stats``: the batch's ``(mean, 1 / sqrt(var + eps))`` per channel where the forward kept them."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, t.dtype), torch.float32)
    x, t = x.detach().to(dtype), t.to(dtype)
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    weight = None if module.weight is None else module.weight.detach().to(dtype).reshape(shape)
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if not batch_stats:
        a = (module.running_var.to(dtype) + module.eps).rsqrt().reshape(shape)
        return t * (a if weight is None else a * weight)
    dims = [0] + list(range(2, x.dim()))
    if stats is not None and stats[0].numel() == x.shape[1]:
        mean, inv = (s.to(dtype).reshape(shape) for s in stats)
    else:
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        inv = (var + module.eps).rsqrt()
    xc = x - mean
    mt = t.mean(dims, keepdim=True)
    m2 = (xc * t).mean(dims, keepdim=True) * inv  # mean(t xh)
    a = inv if weight is None else inv * weight
    out = torch.addcmul(-a * mt, a, t)  # a (t - mean(t))
    return out.addcmul_(-a * m2 * inv, xc)  # - a xh mean(t xh)


@tangent_rule(nn.LayerNorm)
def layer_norm_tangent(module, x: torch.Tensor, t: torch.Tensor, output=None) -> torch.Tensor:
    """The tangent of ``module(x)`` along ``t`` (``module`` an ``nn.LayerNorm``), ``g J t``: the Jacobian ``J`` of
    the normalisation alone, ``(I - 1 1^T / n - xh xh^T / n) / s``, is symmetric, so ``J t`` is the vector-Jacobian
    product that torch's fused LayerNorm backward computes (with the mean and ``1 / s`` the forward saved where it
    kept a graph), then the weight ``g`` elementwise."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, t.dtype), torch.float32)
    x, t = x.detach().to(dtype), t.to(dtype)
    shape = list(module.normalized_shape)
    node = getattr(output, "grad_fn", None)
    if type(node).__name__ == "NativeLayerNormBackward0":
        mean, rstd = node._saved_result1.detach().to(dtype), node._saved_result2.detach().to(dtype)
    else:
        var, mean = torch.var_mean(x, tuple(range(x.dim() - len(shape), x.dim())), correction=0, keepdim=True)
        rstd = (var + module.eps).rsqrt()
    out = torch.ops.aten.native_layer_norm_backward(t, x, shape, mean, rstd, None, None, [True, False, False])[0]
    return out if module.weight is None else out.mul_(module.weight.detach().to(dtype))


@tangent_rule(nn.Linear)
def _linear_rule(module, x, t, output):
    return F.linear(t, module.weight.detach())


@tangent_rule("transformers.pytorch_utils.Conv1D")
def _conv1d_rule(module, x, t, output):
    """transformers' ``Conv1D``: ``x @ W + b`` with ``W`` of shape (in, out)."""
    return t.matmul(module.weight.detach())


@tangent_rule("transformers.activations.NewGELUActivation", "transformers.activations.FastGELUActivation")
def gelu_tanh_tangent(module, x: torch.Tensor, t: torch.Tensor, output=None) -> torch.Tensor:
    """``t * gelu'(x)`` of the tanh approximation ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` that
    these modules write out op by op: torch's fused derivative, one kernel."""
    dtype = torch.promote_types(x.dtype, t.dtype)
    return torch.ops.aten.gelu_backward(t.to(dtype), x.detach().to(dtype), approximate="tanh")
