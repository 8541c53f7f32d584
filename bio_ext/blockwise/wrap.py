"""The block-wise wrapper: hooks at the block boundaries, the auxiliary heads' gradients delivered by
one identity on the output, and the registration of ``bwbpf`` as a whole-model method."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd import Function

from .._utils.outputs import call, find_output, first_tensor
from ..config import require_bool
from ..convert import REVERT_COPY, convert, detach_feedback, is_converted, revert
from ..errors import ConfigError, ConversionError, FeedbackSignalError, PartitionError, UnsupportedModuleError
from ..registry import get_mode, handler_for, register_method
from ..session import FeedbackBank, FeedbackSession, activate, reset
from .config import BlockwiseConfig
from .heads import aux_head, local_grad, recover_targets
from .partition import Partition, partition

log = logging.getLogger("bio_ext.blockwise")

AUX_NAME = "bio_ext_aux_heads"


class _Step:
    """One forward of a wrapped model: the auxiliary outputs waiting for targets."""

    __slots__ = ("targets", "aux", "losses", "sessions")

    def __init__(self, targets: Optional[torch.Tensor]):
        self.targets = targets
        self.aux: List[torch.Tensor] = []
        self.losses: List[Optional[float]] = []
        #: with a direct layer_mode: one feedback session per block, fed that block's local error
        self.sessions: List[Any] = []


class _Collect(Function):
    """Identity on the output layer's output that hands every auxiliary head its local-loss gradient."""

    @staticmethod
    def forward(ctx, out, step, weight, *aux):
        ctx.step, ctx.weight = step, weight
        ctx.aux = [a.detach() for a in aux]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        step: _Step = ctx.step
        targets = step.targets if step.targets is not None else recover_targets(grad.reshape(-1, grad.shape[-1]))
        grads = []
        step.losses = []
        for k, a in enumerate(ctx.aux):
            g, v = local_grad(a, targets, ctx.weight)
            if k < len(step.sessions):  # direct layer_mode: block k's layers get e_k @ B
                step.sessions[k].receive_error(g.reshape(-1, g.shape[-1]))
            grads.append(g)
            step.losses.append(v)
        return (grad, None, None, *grads)


# --------------------------------------------------------------------------- the wrapper


class BlockwiseState:
    """The state of a wrapped model, bound to the hooks :func:`blockwise` installs (:func:`state_of` finds it)."""

    def __init__(self, config: BlockwiseConfig, part: Partition, aux: nn.ModuleList, converted: bool):
        self.config = config
        self.partition = part
        self.aux = aux
        self.converted = converted
        self.handles: List[Any] = []
        self.step: Optional[_Step] = None
        self.pending: Optional[torch.Tensor] = None
        self.last_step: Optional[_Step] = None
        self.aux_prefix = AUX_NAME
        #: with a direct layer_mode: (rule, output_dim, one FeedbackBank per block)
        self.direct: Optional[Tuple[Any, int, List[Any]]] = None
        #: the token that puts back the session that was current before the forward (direct layer_mode)
        self.outer_token: Any = None

    def __getstate__(self):
        raise TypeError("a blockwise-wrapped model cannot be deep-copied or pickled: save model.state_dict(), or "
                        "wrap a copy of the original (bio_ext.revert(model) gives a plain copy)")

    def __deepcopy__(self, memo):
        """Refused (as pickling), except inside bio_ext's own copies, which are reverted once used (by
        :func:`bio_ext.revert` straight away, by :func:`local_alignment` after one training step): there the
        copy is a working wrapper of the copied model (handles and heads mapped onto it, fresh feedback banks)."""
        if not memo.get(REVERT_COPY):
            self.__getstate__()
        new = BlockwiseState.__new__(BlockwiseState)
        memo[id(self)] = new
        new.__dict__.update(vars(BlockwiseState(self.config, self.partition, self.aux, self.converted)))
        new.aux = copy.deepcopy(self.aux, memo)
        new.handles = copy.deepcopy(self.handles, memo)
        new.aux_prefix = self.aux_prefix
        if self.direct is not None:
            rule, out_dim, banks = self.direct
            new.direct = (rule, out_dim, [FeedbackBank() for _ in banks])
        return new


def state_of(model: nn.Module) -> Optional[BlockwiseState]:
    """The state of a model wrapped by :func:`blockwise` (None for any other module)."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, functools.partial) and hook.func is _root_pre:
            return hook.args[0]
    return None


def is_blockwise(model: nn.Module) -> bool:
    return state_of(model) is not None


def _open_block_session(state: BlockwiseState, step: "_Step", block: int):
    """Direct layer_mode: make block ``block``'s feedback session current while the block runs (the output
    layer, trained by the global loss, gets none). Returns the token of :func:`bio_ext.session.activate`."""
    if state.direct is None:
        return None
    rule, output_dim, banks = state.direct
    session = None
    if block < len(banks):
        session = FeedbackSession(banks[block], output_dim, rule)
        step.sessions.append(session)
    return activate(session)


def _root_pre(state: BlockwiseState, module, args):
    if torch.is_grad_enabled() and module.training:
        if state.config.early_backward and _under_ddp():
            raise ConfigError([EARLY_BACKWARD_UNDER_DDP], what="blockwise model under DistributedDataParallel")
        state.step = state.last_step = _Step(state.pending)
        if state.direct is not None:
            state.outer_token = _open_block_session(state, state.step, 0)
    else:
        state.step = None
    state.pending = None
    return None


EARLY_BACKWARD_UNDER_DDP = (
    "early_backward=True back-propagates each local loss inside the forward, before DistributedDataParallel "
    "can reduce the gradients, so the blocks would not be averaged across ranks (DDP then stops at the next "
    "step with 'Expected to have finished reduction'); wrap the model with early_backward=False (the default) "
    "to train it under DDP")


def _under_ddp() -> bool:
    """Whether a DistributedDataParallel forward is running (its module's hooks run inside it)."""
    get = getattr(getattr(torch.nn.parallel, "DistributedDataParallel", None), "_get_active_ddp_module", None)
    return get is not None and get() is not None


def _root_post(state: BlockwiseState, module, args, output):
    if state.outer_token is not None:
        reset(state.outer_token)
        state.outer_token = None
    state.step = None
    return None


def _boundary(state: BlockwiseState, index: int, module, args, kwargs):
    step = state.step
    if step is None:
        return None
    x, put = first_tensor(args, kwargs)
    if x is None:
        return None
    a = state.aux[index](x)
    cfg = state.config
    if cfg.early_backward:
        if step.targets is None:
            raise FeedbackSignalError(
                "blockwise(early_backward=True) back-propagates each local loss inside the forward and needs the "
                "targets before it: call bio_ext.blockwise.set_targets(model, y) before model(x), or use "
                "bio_ext.blockwise.train_step(model, x, y, loss_fn, optimizer)")
        g, v = local_grad(a, step.targets, cfg.local_weight)
        if index < len(step.sessions):
            step.sessions[index].receive_error(g.reshape(-1, g.shape[-1]))
        if a.requires_grad:
            a.backward(g)  # this block's graph (activations) is freed here
        step.losses.append(v)
        _open_block_session(state, step, index + 1)
        return put(x.detach())
    step.aux.append(a)
    _open_block_session(state, step, index + 1)
    return put(x.detach()) if cfg.isolate else None


def _head_post(state: BlockwiseState, module, args, output):
    step = state.step
    if step is None or not step.aux:
        return None
    tensor, put = find_output(output)
    collected = _Collect.apply(tensor, step, float(state.config.local_weight), *step.aux)
    step.aux = []
    return put(collected)


def set_targets(model: nn.Module, targets: torch.Tensor) -> None:
    """Give the next forward of a wrapped model its targets (class indices, one per output row; -100: none).

    Needed with ``early_backward=True`` and for global losses other than softmax cross-entropy;
    explicit targets always replace the ones recovered from the output error. For a language
    model whose loss shifts the labels (transformers' ``labels=``), pass the shifted targets
    (``labels[:, 1:]`` with ``-100`` appended), one per position of the logits.
    """
    state = state_of(model)
    if state is None:
        raise ConversionError("set_targets: the model is not wrapped by bio_ext.blockwise; call blockwise(model) first")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        raise FeedbackSignalError("set_targets: targets must be an integer tensor of class indices (use -100 for "
                                  "rows without a target)")
    state.pending = targets.detach()


def local_losses(model: nn.Module) -> List[Optional[float]]:
    """The local losses (one per block) of the last training step, once its backward ran."""
    state = state_of(model)
    if state is None:
        raise ConversionError("local_losses: the model is not wrapped by bio_ext.blockwise")
    return list(state.last_step.losses) if state.last_step is not None else []


def train_step(model: nn.Module, x: Any, y: torch.Tensor, loss_fn: Callable, optimizer=None) -> torch.Tensor:
    """One training step with explicit targets: ``set_targets``, forward, ``loss_fn(out, y).backward()``,
    and ``optimizer.step()`` (zeroing gradients first) when an optimizer is given. Returns the loss."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    state = state_of(model)
    if state is not None:
        set_targets(model, y.reshape(-1) if y.dim() > 1 else y)
    out = call(model, x)
    loss = loss_fn(out, y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


def blockwise(model: nn.Module, blocks: Optional[int] = None, *, config: Optional[BlockwiseConfig] = None,
              example_input: Any = None, aux_factory: Optional[Callable] = None, inplace: bool = False,
              **options: Any) -> nn.Module:
    """Wrap ``model`` for block-wise training with local losses (see :mod:`bio_ext.blockwise`).

    Args:
        model: a torchvision ResNet/VGG/AlexNet/MobileNet/EfficientNet, an ``nn.Sequential``, a
            transformers model, or any model with ``units=[...]`` and ``head=...``.
        blocks: K, the number of blocks (default 4), or give ``splits=[...]``.
        config: a :class:`BlockwiseConfig` (keyword options override its fields).
        example_input: a small batch for the probe forward (default: guessed for known families).
        aux_factory: ``fn(block_output_shape, output_shape) -> nn.Module`` building custom
            auxiliary heads (shapes of the probe batch); default: :func:`~bio_ext.blockwise.heads.aux_head`
            with ``pool``.
        inplace: wrap ``model`` itself instead of a deep copy.
        **options: fields of :class:`BlockwiseConfig` (``isolate``, ``early_backward``, ``cost``,
            ``pool``, ``local_weight``, ``layer_mode``, ``splits``, ``units``, ``head``, ``seed``).

    Returns the wrapped model: its forward returns what the original returned; the auxiliary
    heads are the submodule ``bio_ext_aux_heads`` (so ``model.parameters()`` includes them);
    ``bio_ext.revert(model)`` gives a plain copy without them and without any hook (``inplace=True``: removes
    them from the wrapped model itself). The model is left unchanged on error.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModuleError(f"blockwise() expects a torch.nn.Module, got {type(model).__name__}")
    BlockwiseConfig.check_keywords(options, ("mode",), what="blockwise() keyword arguments")
    require_bool("inplace", inplace)
    base = config.to_dict() if config is not None else {}
    if blocks is not None:
        base["blocks"] = blocks
    base.update(options)
    base.pop("mode", None)
    cfg = BlockwiseConfig(**base)
    if is_blockwise(model):
        raise ConversionError("the model is wrapped by bio_ext.blockwise already; wrap bio_ext.revert(model) (a plain "
                              "copy) instead, or the original model")
    if is_converted(model):
        raise ConversionError("the model is converted by bio_ext.convert already; wrap the original model and pass "
                              "layer_mode=<mode> to blockwise() to convert the blocks' layers as well")
    part = partition(model, cfg.n_blocks if not cfg.splits else None, splits=cfg.splits, cost=cfg.cost,
                     units=cfg.units, head=cfg.head, example_input=example_input)
    aux = _make_heads(model, part, cfg, aux_factory)
    # everything that can fail has run: now modify (a copy of) the model
    work = model if inplace else copy.deepcopy(model)
    work, direct = _convert_blocks(work, part, cfg)
    holder_name = _aux_holder(work, part.head)
    work.get_submodule(holder_name).add_module(AUX_NAME, aux)
    state = BlockwiseState(cfg, part, aux, cfg.layer_mode is not None)
    state.direct = direct
    state.aux_prefix = f"{holder_name}.{AUX_NAME}" if holder_name else AUX_NAME
    _install_hooks(work, state, part)
    log.info("blockwise %s: %d blocks (%s, isolate=%s, early_backward=%s)\n%s", type(model).__name__,
             len(part.blocks), cfg.cost, cfg.isolate, cfg.early_backward, part.describe())
    return work


def _make_heads(model: nn.Module, part: Partition, cfg: BlockwiseConfig, aux_factory) -> nn.ModuleList:
    """One auxiliary head per block (seeded by ``cfg.seed`` without touching the global RNG stream)."""
    out_shape = part.head_out_shape
    heads = []
    with (torch.random.fork_rng(devices=[]) if cfg.seed is not None else contextlib.nullcontext()):
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for k in range(len(part.blocks)):
            shape = part.head_in_shape if k == len(part.blocks) - 1 else part.units[part.blocks[k + 1][0]].in_shape
            if shape is None:
                raise PartitionError(f"block {k + 2} starts at {part.block_entry(k + 1)!r}, whose input is not a "
                                     "tensor; pass splits=[...] naming other units")
            if aux_factory is not None:
                heads.append(aux_factory(shape, out_shape))
                continue
            head, used = aux_head(shape, out_shape, cfg.pool)
            rows_aux = (math.prod(shape[:-1]) if used == "token" else shape[0])
            rows_out = math.prod(out_shape[:-1])
            if rows_aux != rows_out:
                raise ConfigError([f"pool: {used!r} gives {rows_aux} prediction rows for a probe batch whose "
                                   f"output has {rows_out}; use pool='token' for per-token outputs or 'mean'/"
                                   "'avg' for one prediction per example"], what="blockwise configuration")
            heads.append(head)
    aux = nn.ModuleList(heads)
    p0 = next(model.parameters(), None)
    if p0 is not None:
        aux = aux.to(device=p0.device, dtype=p0.dtype if p0.is_floating_point() else None)
    return aux


def _convert_blocks(work: nn.Module, part: Partition, cfg: BlockwiseConfig):
    """Convert the blocks' layers with ``layer_mode``; a direct mode gets one feedback bank per block
    (each block's session is fed its own local error) instead of the model-wide session."""
    if cfg.layer_mode is None:
        return work, None
    spec = get_mode(cfg.layer_mode)
    if spec.family != "direct":
        return convert(work, cfg.layer_mode, inplace=True, exclude=[part.head], seed=cfg.seed), None
    out_dim = part.head_out_shape[-1]
    work = convert(work, cfg.layer_mode, inplace=True, exclude=[part.head], seed=cfg.seed,
                   output_layer=part.head, output_dim=out_dim, error_at="output")
    detach_feedback(work)  # the blocks' sessions replace the global one
    return work, (spec.rule, out_dim, [FeedbackBank() for _ in part.blocks])


def _install_hooks(work: nn.Module, state: BlockwiseState, part: Partition) -> None:
    state.handles.append(work.register_forward_pre_hook(functools.partial(_root_pre, state)))
    state.handles.append(work.register_forward_hook(functools.partial(_root_post, state), always_call=True))
    for k in range(1, len(part.blocks)):
        entry = work.get_submodule(part.block_entry(k))
        state.handles.append(entry.register_forward_pre_hook(functools.partial(_boundary, state, k - 1),
                                                             with_kwargs=True))
    head_mod = work.get_submodule(part.head)
    state.handles.append(head_mod.register_forward_pre_hook(functools.partial(_boundary, state, len(part.blocks) - 1),
                                                            with_kwargs=True))
    state.handles.append(head_mod.register_forward_hook(functools.partial(_head_post, state)))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _aux_holder(model: nn.Module, head: str) -> str:
    """Where the auxiliary heads are registered: the root, unless its forward runs all its children
    (nn.Sequential), then the output layer (a leaf layer whose forward ignores extra children)."""
    if not isinstance(model, _CONTAINERS):
        return ""
    if not isinstance(model.get_submodule(head), _CONTAINERS) and not list(model.get_submodule(head).children()):
        return head
    raise PartitionError(f"cannot register the auxiliary heads in {type(model).__name__}: its forward runs every "
                         f"child and the output layer {head!r} is a container too. Wrap the model in a module "
                         "whose forward calls it, and pass units=[...] and head=...")


def aux_prefix(model: nn.Module) -> str:
    """The qualified name of the auxiliary heads' ModuleList in a wrapped model (``bio_ext_aux_heads``, or
    ``<output layer>.bio_ext_aux_heads`` for an nn.Sequential)."""
    state = state_of(model)
    if state is None:
        raise ConversionError("aux_prefix: the model is not wrapped by bio_ext.blockwise")
    return state.aux_prefix


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the hooks and auxiliary heads of :func:`blockwise` (in place); :func:`bio_ext.revert` calls it."""
    state = state_of(model)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    holder = model.get_submodule(state.aux_prefix.rpartition(".")[0])
    if holder._modules.get(AUX_NAME) is state.aux:
        del holder._modules[AUX_NAME]
    return model


def partition_of(model: nn.Module) -> Partition:
    """The :class:`Partition` a wrapped model was split with."""
    state = state_of(model)
    if state is None:
        raise ConversionError("partition_of: the model is not wrapped by bio_ext.blockwise")
    return state.partition


# --------------------------------------------------------------------------- alignment with backprop
# Inside a block every layer has a true gradient, of the block's *local* loss; what separates block-wise
# training from backprop is that this is not the gradient of the model's loss. local_alignment measures
# the angle between the two (bio_ext.alignment's ``update`` for a wrapped model, through the method's
# registration).


def _angle(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    if a is None or b is None:
        return None
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, float((a @ b) / (na * nb))))))


def _weight_grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    return {n: (m.weight.grad.detach().clone() if m.weight.grad is not None else None)
            for n, m in model.named_modules() if handler_for(m) is not None}


def local_alignment(model: nn.Module, x, y: torch.Tensor,
                    loss_fn: Callable) -> Optional[Dict[str, Dict[str, float]]]:
    """``{layer: {"update": degrees}}`` for a model wrapped by :func:`~bio_ext.blockwise.blockwise`
    (None for any other model). Runs on a copy, in training mode, with explicit targets ``y``;
    ``model``, its ``.grad`` and its local losses are left as they were (the caller restores the RNG)."""
    if state_of(model) is None:
        return None
    work = copy.deepcopy(model, {REVERT_COPY: True})
    work.train()
    for p in work.parameters():
        p.grad = None
    set_targets(work, y.reshape(-1) if y.dim() > 1 else y)
    out, _ = find_output(call(work, x))
    loss_fn(out, y).backward()
    plain = revert(work, inplace=True)  # plain layers holding the same Parameters (and their local .grad)
    local = _weight_grads(plain)
    for p in plain.parameters():
        p.grad = None
    out, _ = find_output(call(plain, x))
    loss_fn(out, y).backward()
    true = _weight_grads(plain)
    report = {}
    for name, g in local.items():
        angle = _angle(g, true.get(name))
        report[name] = {"update": angle} if angle is not None else {}
    return report


@register_method("bwbpf", config_type=BlockwiseConfig, revert=unwrap, alignment=local_alignment,
                 description="block-wise local losses (BWBPF seed): blocks trained by auxiliary heads, isolated")
def _as_method(model: nn.Module, *, config: Optional[BlockwiseConfig] = None, inplace: bool = False,
               **options: Any) -> nn.Module:
    """``convert(model, "bwbpf", ...)`` and ``convert(model, BlockwiseConfig(...))``."""
    return blockwise(model, config=config, inplace=inplace, **options)
