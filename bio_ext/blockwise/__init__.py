"""Block-wise training with local losses (the BWBPF seed), with automatic partitioning.

The package is callable: ``bio_ext.blockwise(model, ...)`` is :func:`~bio_ext.blockwise.wrap.blockwise`,
and its helpers are its attributes (``bio_ext.blockwise.set_targets``, ``.train_step``, ...). Its
modules: :mod:`~.config` (the options), :mod:`~.partition` (spine, probe, balanced cuts),
:mod:`~.heads` (auxiliary heads and local losses), :mod:`~.wrap` (the hooks; registers ``bwbpf``),
:mod:`~.pipeline` (block-parallel training: one block per process, ``bio_ext.blockwise.parallel``).

    model = bio_ext.blockwise(model, blocks=4)          # a wrapped copy; model itself is untouched
    loss = loss_fn(model(x), y); loss.backward()         # unchanged loop
    plain = bio_ext.revert(model)                        # a plain copy, auxiliary heads dropped

What it does
------------
The model's *spine* (the modules its forward runs one after the other) is cut into ``K``
contiguous blocks of roughly equal cost. Each block gets an auxiliary head (global average
pooling then a dense layer by default) that predicts the targets from the block's output,
with a local cross-entropy loss. The model's output layer (``fc``, ``classifier[-1]``,
``lm_head``, ...) is trained by the user's (global) loss.

* ``isolate=True`` (default, as DGL/InfoPro/SEDONA): the output of every block is detached
  before the next block and before the output layer, so block ``k``'s parameters get the
  gradient of their own local loss ``L_k`` only and the output layer that of the global loss.
* ``isolate=False``: nothing is detached, as in the BWBPF seed's own code (deep
  supervision): every parameter gets the gradient of ``L_global + sum_k L_k``, so block ``k``
  gets those of ``L_k, ..., L_K`` and of the global loss.
* ``early_backward=True`` (memory option, needs ``isolate=True``): each block's local loss is
  back-propagated inside the forward, right after the block ran, so its activations are
  freed before the next block runs (InfoPro's trick). The local losses then need the targets
  *before* the forward: call :func:`~bio_ext.blockwise.wrap.set_targets` before ``model(x)``, or use :func:`train_step`.
  The later ``loss.backward()`` trains the output layer only.

How the local losses get their targets (design choice)
------------------------------------------------------
The user's loop passes only ``x`` to the model; the targets reach the loss, not the model.
So the wrapped model passes its output through an identity autograd function (like the
:class:`~bio_ext.session.ErrorTap` of the feedback modes) whose backward sees the output
error ``e = dL/d(logits)``. For softmax cross-entropy, a row of ``e`` is
``(softmax(z) - onehot(y)) / N``: its only negative entry is at the target class, so
``y = argmin(e_row)``; rows that are all zero (``ignore_index``, padding, the last position
of a shifted language-model loss) get no local loss. The same backward then hands every
auxiliary head the gradient of its local loss, ``(softmax(a_k) - onehot(y)) / N_valid``
(mean over the rows that have a target), so a single ``loss.backward()`` delivers every
gradient, and a loss computed inside the model (transformers' ``labels=``) works too.

This is exact for plain softmax cross-entropy (any reduction, class weights change only the
scale). It is NOT right for other losses (MSE, label smoothing, ...): for those pass the
targets explicitly with :func:`set_targets` (or :func:`train_step`) before the forward;
explicit targets always take precedence. A loss whose error has a row with no negative
entry raises :class:`~bio_ext.errors.FeedbackSignalError` (not cross-entropy).

Partitioning
------------
Known families get their spine automatically: torchvision ResNet (``conv1`` stem, every
residual block, ``fc``), VGG / AlexNet (every parameterised child of ``features`` and
``classifier``, parameter-free ones riding with the preceding unit), MobileNet V2/V3 and
EfficientNet (``features`` children, then ``classifier``), any ``nn.Sequential`` (its
children), and transformers models (everything before the transformer block list as one
unit, each block a unit, the output embedding / classifier as the output layer). Any other
model: pass ``units=[names of the modules its forward runs in sequence]`` and ``head=name``.
A probe forward (no gradients, eval mode) records the order in which the units and every
parameterised module run, assigns each parameter to the unit it is first used in (a weight
tied to the output layer, as GPT-2's ``lm_head``/``wte``, stays with its first unit and
also gets the output layer's gradient) and measures each unit's cost (``flops`` of its
Linear/Conv layers, ``params`` or ``activations``: elements of the outputs its leaf
modules produce). Units are cut into ``K`` contiguous blocks minimising the largest block
cost (exact dynamic programme), or at explicit ``splits=[names of first units of blocks 2..K]``.

The block boundaries are forward pre-hooks on the first module of each block and on the
output layer, so the model's own forward runs unchanged. Whatever passes between blocks
other than that module's first input (attention masks, position ids) must not need a
gradient; a spine with a skip connection across a boundary is not isolated by the hooks.
"""

import sys
import types

from .config import COSTS, POOLS, BlockwiseConfig
from .heads import aux_head, local_grad, recover_targets
from .partition import Partition, Unit, balanced_cuts, default_example, default_spine, partition
from .wrap import (AUX_NAME, BlockwiseState, aux_prefix, blockwise, is_blockwise, local_alignment, local_losses,
                   partition_of, set_targets, state_of, train_step, unwrap)
from .pipeline import BlockStage, parallel

__all__ = ["AUX_NAME", "COSTS", "POOLS", "BlockStage", "BlockwiseConfig", "BlockwiseState", "Partition", "Unit", "aux_head",
           "aux_prefix", "balanced_cuts", "blockwise", "default_example", "default_spine", "is_blockwise",
           "local_alignment", "local_grad", "local_losses", "parallel", "partition", "partition_of", "recover_targets", "set_targets", "state_of",
           "train_step", "unwrap"]


class _CallableModule(types.ModuleType):
    """``bio_ext.blockwise(model, ...)`` wraps a model; the module's other names stay its attributes."""

    def __call__(self, model, blocks=None, **options):
        return blockwise(model, blocks, **options)


sys.modules[__name__].__class__ = _CallableModule
