"""The forward-mode tangent of BatchNorm under GrAPE, in a few fused passes.

PyTorch's forward AD runs BatchNorm's tangent formula as some twenty elementwise kernels over the activations
(most of the extra cost of a GrAPE forward through a ResNet). For ``nn.BatchNorm1d/2d/3d`` (exactly those classes:
``SyncBatchNorm``'s statistics span the ranks) the converted model's GrAPE forward takes the tangent off the
input (a forward pre-hook), lets the module run on the primal and gives its output the exact tangent (a forward
hook). With the batch statistics (training, or no running statistics), ``y = g (x - m) / s + b`` over every
dimension but the channels (``s = sqrt(var + eps)``, biased variance), the tangent is::

    t_y = (g / s) (t - mean(t) - xh mean(t xh)),     xh = (x - m) / s

computed as ``a t + c (x - m) + d`` with per-channel ``a, c, d``; with the running statistics it is
``t g / sqrt(running_var + eps)``. The hooks act only inside a GrAPE forward (a current session whose rule
carries tangents), when the input carries a tangent and the module's own parameters carry none.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from .._utils.hooks import hook_function
from ..session import current_session

#: the classes whose forward is exactly F.batch_norm of their buffers (subclasses may do anything)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TANGENT = "_bio_ext_grape_tangent"


def hook_norms(root: nn.Module) -> None:
    """Give every BatchNorm of ``root`` the two hooks, where it has not got them: once, when ``convert`` builds a
    model whose rule carries tangents (``revert`` and ``detach_feedback`` take them off again). A BatchNorm
    added to the model afterwards gets PyTorch's own tangent formula: the same tangent, in more passes."""
    for m in root.modules():
        if type(m) in NORMS and not any(hook_function(h) is take_tangent for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(take_tangent)
            m.register_forward_hook(give_tangent)


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
    if tangent is None or any(fwAD.unpack_dual(p).tangent is not None for p in (module.weight, module.bias)
                              if p is not None):
        return None
    module.__dict__[_TANGENT] = tangent
    return (primal, *args[1:])


def give_tangent(module, args, output):
    """Forward hook: the output with the exact tangent of the one :func:`take_tangent` took."""
    tangent = None if torch.compiler.is_compiling() else module.__dict__.pop(_TANGENT, None)
    if tangent is None:
        return None
    return fwAD.make_dual(output, batch_norm_tangent(module, args[0], tangent, _saved_stats(output)).to(output.dtype))


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
