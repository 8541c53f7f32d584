"""TensorBoard logging for benchmark runs, and reading the numbers back.

Tags written by the runner (``step`` is the global training step, ``epoch`` counts from 1):

``train/loss``, ``train/accuracy``, ``train/lr``, ``train/step_time_ms``
    every ``training.metrics.display_iterations`` steps: the batch's loss and accuracy, the
    learning rate and the wall time of the step (forward, backward, optimizer step).
``alignment/<quantity>/<layer>``
    at the same steps, :func:`bio_ext.alignment` on (the first ``alignment_batch`` examples of) the
    current batch, computed on a copy of the model: ``update`` (angle between the weight gradient
    the mode produced and backprop's, degrees), ``signal`` (the layer's injected input gradient
    vs backprop's), ``feedback`` and ``norm_ratio`` (feedback vs forward weight, local modes and
    bp), ``estimate`` (GrAPE's forward-gradient estimate vs backprop's input gradient). A ``bwbpf``
    run logs ``update`` only: each layer's gradient (its block's local loss; the global loss for the
    output layer) against the end-to-end backprop gradient (:func:`bio_ext.blockwise.local_alignment`).
``epoch/<split>_loss``, ``epoch/<split>_accuracy``, ``epoch/lr``
    after every epoch, for split ``train``, ``val`` and ``test``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional, Tuple


class Tracker:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` that skips non-finite values
    and does nothing when disabled."""

    def __init__(self, logdir: str, *, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir, purge_step=purge_step)

    def scalars(self, values: Mapping[str, Optional[float]], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(tag, float(v), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: ``{tag: [(step, value), ...]}``,
    read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: Dict[str, List[Tuple[int, float]]] = {}
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags().get("scalars", []):
        out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out
