"""Block-parallel training: block ``k`` of a block-wise model on process ``k``, no gradient between them.

Block-wise training with isolated blocks (``isolate=True``) needs nothing from the blocks above a block to
update it: its local loss is computed on its own output by its auxiliary head. So the blocks can run on
different processes (and devices), each receiving its input activations from the process below and sending
its output to the one above, and **no gradient ever travels back between processes** (that is what the
method buys over pipelined backprop, which must send the gradients back down).

    import torch.distributed as dist
    dist.init_process_group("gloo")                     # torchrun --nproc_per_node=K train.py
    stage = bio_ext.blockwise.parallel(model, x[:2], micro_batches=4)   # block `rank` of K = world size
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)
    for x, y in loader:                                 # rank 0 needs x and y; the others may pass None
        stage.train_step(x, y, opt, loss_fn=F.cross_entropy)
    stage.flush()                                       # the last sends have arrived

How a process runs its block, for any model :func:`~bio_ext.blockwise.blockwise` can split: every process
builds the same wrapped model (same seed); on process ``k`` the layers of the blocks below ``k`` are replaced
by stand-ins that return zeros of their recorded output shape (the model's own forward, and whatever it
computes between layers, then runs unchanged and almost free up to block ``k``), the input of block ``k``'s
first module is replaced by the received activations, and the forward stops at the input of block ``k+1``
(which is sent on). The last process runs to the output and trains the output layer on the global loss.

Schedule: synchronous per micro-batch (each block takes one optimizer step per micro-batch, right after its
local backward), with the send of a micro-batch's activations before its backward, so block ``k`` works on
micro-batch ``m+1`` while block ``k+1`` works on ``m``. Block ``k`` computes micro-batch ``m``'s output with
the weights of its ``m`` previous steps, exactly as single-process block-wise training on the same
micro-batches does: the weights after ``N`` steps are the same (tested). The targets travel with the
activations, so only process 0 needs the data.

Limits: the blocks' layers may be converted with a local-family ``layer_mode`` (``bp``, ``fa``, ...); a
direct one (its per-block sessions) is refused. Every process calls :meth:`BlockStage.train_step` the same
number of times; batch sizes may vary (each call sends its micro-batch sizes first). The examples' shape
beyond the batch dimension is fixed by ``example_input``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .._utils.outputs import find_output, first_tensor
from .._utils.probing import quiet_forward
from ..errors import ConfigError, ConversionError
from ..registry import get_mode
from .heads import local_grad
from .wrap import blockwise, partition_of, state_of, unwrap

log = logging.getLogger("bio_ext.blockwise")


class _Stop(Exception):
    """Raised at the input of the next block: this process's part of the forward is done."""

    def __init__(self, activation: torch.Tensor) -> None:
        super().__init__()
        self.activation = activation


class _StandIn(nn.Module):
    """Zeros of the recorded output shape (the batch dimension follows the input's): a layer of a block that
    runs on another process."""

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.dtype = tuple(shape), dtype

    def forward(self, *args, **kwargs):
        x, _ = first_tensor(args, kwargs)
        rows = x.shape[0] if x is not None and x.dim() else self.shape[0]
        device = x.device if x is not None else None
        return torch.zeros((rows,) + self.shape[1:], dtype=self.dtype, device=device)


class BlockStage(nn.Module):
    """One process's block of a block-parallel model (see :mod:`bio_ext.blockwise.parallel`).

    ``parameters()`` are the block's own (its layers and its auxiliary head; on the last process the output
    layer's too): give them to the optimizer. :meth:`train_step` runs one batch through the pipeline."""

    def __init__(self, wrapped: nn.Module, example: torch.Tensor, rank: int, world: int, group=None,
                 micro_batches: int = 1) -> None:
        super().__init__()
        state = state_of(wrapped)
        part = partition_of(wrapped)
        self.rank, self.world, self.group, self.micro_batches = rank, world, group, micro_batches
        self.local_weight = float(state.config.local_weight)
        self.aux = state.aux[rank]
        self.last = rank == world - 1
        names = set(part.block_params(rank)) | (set(part.head_params) if self.last else set())
        self._own = [(n, p) for n, p in wrapped.named_parameters() if n in names]
        self.entry = part.block_entry(rank)
        self.exit = part.head if self.last else part.block_entry(rank + 1)
        self.head = part.head
        unwrap(wrapped)  # the stage's own hooks replace the wrapper's
        self.model = wrapped
        self._example = example
        p0 = next(wrapped.parameters())
        self._in_shape = tuple(part.units[part.blocks[rank][0]].in_shape[1:]) if rank else ()
        self._in_dtype = p0.dtype
        self._stand_ins(part)
        self._recv: Optional[torch.Tensor] = None
        self._pending: List[Tuple[Any, torch.Tensor]] = []
        self._captured: Optional[torch.Tensor] = None
        if self.entry is not None:
            self.model.get_submodule(self.entry).register_forward_pre_hook(self._take_input, with_kwargs=True)
        self.model.get_submodule(self.exit).register_forward_pre_hook(self._at_exit, with_kwargs=True)

    # ------------------------------------------------------------------ set-up

    def _stand_ins(self, part) -> None:
        """Replace the leaf layers of the blocks below this one by zeros of their recorded output shape."""
        below = {p for k in range(self.rank) for p in part.block_params(k)}
        if not below:
            return
        owners = {}
        for name, module in self.model.named_modules():
            own = [f"{name}.{n}" if name else n for n, p in module._parameters.items() if p is not None]
            if own and not list(module.children()) and set(own) <= below:
                owners[name] = module
        shapes = self._record_shapes(owners)
        for name, shape in shapes.items():
            parent, _, child = name.rpartition(".")
            holder = self.model.get_submodule(parent) if parent else self.model
            holder._modules[child] = _StandIn(*shape)
        missing = sorted(set(owners) - set(shapes))
        if missing:
            raise ConversionError(f"block-parallel: the probe forward did not run {missing}; they cannot be stood in "
                                  "for on this process")

    def _record_shapes(self, owners: Dict[str, nn.Module]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        shapes: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}

        def record(name, module, args, out) -> None:
            tensor = find_output(out)[0]
            shapes.setdefault(name, (tuple(tensor.shape), tensor.dtype))

        handles = [m.register_forward_hook(functools.partial(record, n)) for n, m in owners.items()]
        try:
            with quiet_forward(self.model, grad=False):
                self.model(self._example)
        finally:
            for h in handles:
                h.remove()
        return shapes

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from ((prefix + n, p) for n, p in self._own)
        yield from ((f"{prefix}aux.{n}", p) for n, p in self.aux.named_parameters())

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_parameters())

    # ------------------------------------------------------------------ hooks

    def _take_input(self, module, args, kwargs):
        x, put = first_tensor(args, kwargs)
        return put(self._recv) if self._recv is not None else None

    def _at_exit(self, module, args, kwargs):
        x, put = first_tensor(args, kwargs)
        if not self.last:
            raise _Stop(x)
        self._captured = x
        return put(x.detach())

    # ------------------------------------------------------------------ the step

    def _forward(self, x: Optional[torch.Tensor], recv: Optional[torch.Tensor]):
        self._recv, self._captured = recv, None
        try:
            out = self.model(x)
        except _Stop as stop:
            return stop.activation, None
        finally:
            self._recv = None
        return self._captured, out

    def train_step(self, x: Optional[torch.Tensor], y: Optional[torch.Tensor], optimizer,
                   loss_fn: Callable = F.cross_entropy) -> Optional[float]:
        """One batch, split into ``micro_batches``: forward of this block, send on, local backward, one
        optimizer step per micro-batch. Process 0 passes ``x`` and ``y``; the others may pass None (they
        receive both). Returns the last process's mean global loss on that process, the mean local loss on
        the others."""
        prev = self.rank - 1
        if self.rank == 0:
            if x is None or y is None:
                raise ConfigError(["block-parallel: process 0 needs the batch (x, y) at every train_step"])
            xs, ys = x.chunk(self.micro_batches), y.chunk(self.micro_batches)
            sizes = torch.tensor([len(c) for c in ys], dtype=torch.long)
        else:
            sizes = torch.empty(self.micro_batches, dtype=torch.long)
            dist.recv(sizes, prev, group=self.group)
        header = [sizes] if not self.last else []  # sent on with the first micro-batch
        losses = []
        for m, rows in enumerate(sizes.tolist()):
            if self.rank == 0:
                xm, ym, recv = xs[m], ys[m], None
            else:
                ym = torch.empty(rows, dtype=torch.long)
                dist.recv(ym, prev, group=self.group)
                recv = torch.empty((rows,) + self._in_shape, dtype=self._in_dtype)
                dist.recv(recv, prev, group=self.group)
                xm = self._dummy(rows)
            act, out = self._forward(xm, recv)
            if not self.last:
                self._send(header + [ym.contiguous(), act.detach().contiguous()])
                header = []
            optimizer.zero_grad(set_to_none=True)
            a = self.aux(act)
            g, value = local_grad(a, ym, self.local_weight)
            if self.last:
                loss = loss_fn(out, ym)
                torch.autograd.backward([a, loss], [g, None])
                value = float(loss.detach())
            else:
                a.backward(g)
            optimizer.step()
            losses.append(value)
        return sum(losses) / len(losses)

    def _send(self, tensors: List[torch.Tensor]) -> None:
        """Send ``tensors`` to the next process without waiting for them to arrive: the sends before them are
        waited for first (so a process runs at most one micro-batch ahead of the next, across calls too)."""
        self.flush()
        self._pending = [(dist.isend(t, self.rank + 1, group=self.group), t) for t in tensors]  # t kept alive

    def flush(self) -> None:
        """Wait until what this process sent has arrived (call it after the last :meth:`train_step`, before
        ``destroy_process_group``)."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def _dummy(self, rows: int) -> torch.Tensor:
        """What the model's forward is called with on a process > 0 (its input is replaced at the block)."""
        return self._example[:1].expand(rows, *self._example.shape[1:])


def parallel(model: nn.Module, example_input: torch.Tensor, *, group=None, micro_batches: int = 1,
             **options: Any) -> BlockStage:
    """This process's :class:`BlockStage` of ``model`` split into as many blocks as ``group`` has processes
    (``torch.distributed`` must be initialised; block ``k`` on rank ``k``).

    ``example_input``: a batch of the training input's shape (any number of rows, e.g. ``x[:2]``): the shapes
    that travel between processes and the stand-ins' outputs are recorded from it. ``options`` are
    :func:`~bio_ext.blockwise.blockwise`'s (``cost``, ``splits``, ``units``, ``head``, ``pool``,
    ``local_weight``, a local-family ``layer_mode``, ``seed``); every process must pass the same model (same
    initialisation), example shape and options."""
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(["block-parallel training needs torch.distributed initialised: "
                           "dist.init_process_group('gloo') (CPU) or 'nccl' (GPU), e.g. under torchrun"])
    if options.get("isolate", True) is not True or options.get("early_backward", False):
        raise ConfigError(["block-parallel training needs isolate=True (no gradient between blocks) and "
                           "early_backward=False (each process runs its own backward)"])
    mode = options.get("layer_mode")
    if mode is not None and get_mode(mode).family == "direct":
        raise ConfigError([f"block-parallel training: layer_mode={mode!r} is a direct mode, whose per-block error "
                           "sessions need the whole model in one process; use a local-family layer_mode "
                           "('bp', 'fa', ...) or none"])
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ConfigError([f"micro_batches must be a positive int, got {micro_batches!r}"])
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ConfigError(["block-parallel training needs example_input, a batch of the training input's shape "
                           "(e.g. x[:2])"])
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world < 2:
        raise ConfigError(["block-parallel training needs at least 2 processes (one block each); with one, use "
                           "bio_ext.blockwise(model) itself"])
    wrapped = blockwise(model, blocks=world, example_input=example_input, **options)
    log.info("block-parallel: rank %d of %d runs block %d\n%s", rank, world, rank + 1,
             partition_of(wrapped).describe())
    return BlockStage(wrapped, example_input, rank, world, group=group, micro_batches=micro_batches)
