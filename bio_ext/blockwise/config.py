"""The options of block-wise training, validated and round-tripping to dicts and YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..config import RoundTrip
from ..errors import ConfigError
from ..registry import get_mode, mode_names

COSTS = ("flops", "params", "activations")
POOLS = ("auto", "avg", "mean", "token", "flatten")


@dataclass(frozen=True)
class BlockwiseConfig(RoundTrip):
    """Options of :func:`bio_ext.blockwise` (round-trips to dict/YAML; ``mode`` is always ``"bwbpf"``).

    Attributes:
        blocks: number of blocks K (default 4 when ``splits`` is empty).
        splits: names of the units that start blocks 2..K (overrides the cost balancing).
        isolate: detach between blocks (True) or deep supervision as the seed's code (False).
        early_backward: back-propagate each local loss inside the forward to free activations
            (needs ``isolate=True`` and explicit targets: :func:`set_targets` / :func:`train_step`).
        cost: ``flops``, ``params`` or ``activations``: what the partition balances.
        pool: how an auxiliary head reduces a block output: ``auto`` (global average pooling
            for feature maps, mean over tokens for sequences unless the output layer predicts
            per token, then per token), ``avg``, ``mean``, ``token`` or ``flatten``.
        local_weight: multiplies every local loss.
        layer_mode: convert the blocks' layers with a per-layer mode as well: ``bp`` or the local
            family (``fa``, ``usf``, ...), or ``dfa``/``drtp``, whose layers then get the projection of
            their own block's local error ``e_k = dL_k/d(aux_k)`` (``B`` is ``(classes, in)``; the
            block's last layer trains on the true gradient through its auxiliary head). Direct modes
            need ``isolate=True``; ``grape`` is refused (no tangents at the auxiliary heads).
        units / head: the spine (module names in forward order) and output layer, for models
            that are not a known family.
        seed: seeds the auxiliary heads' (and ``layer_mode``'s feedback) initialisation.
    """

    _WHAT = "blockwise configuration"

    mode: str = "bwbpf"
    blocks: Optional[int] = None
    splits: Tuple[str, ...] = ()
    isolate: bool = True
    early_backward: bool = False
    cost: str = "flops"
    pool: str = "auto"
    local_weight: float = 1.0
    layer_mode: Optional[str] = None
    units: Tuple[str, ...] = ()
    head: Optional[str] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("splits", "units"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value) if value is not None else ())
        problems = []
        if self.mode != "bwbpf":
            problems.append(f"mode: a BlockwiseConfig has mode 'bwbpf', got {self.mode!r}")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)
                                        or self.blocks < 1):
            problems.append(f"blocks: must be a positive int, got {self.blocks!r}")
        if self.splits and self.blocks is not None and isinstance(self.blocks, int) \
                and self.blocks != len(self.splits) + 1:
            problems.append(f"blocks: {self.blocks} does not match {len(self.splits)} split point(s) "
                            f"(which make {len(self.splits) + 1} blocks); give one or the other")
        for name in ("splits", "units"):
            bad = [v for v in getattr(self, name) if not isinstance(v, str)]
            if bad:
                problems.append(f"{name}: entries must be module names (str), got {bad!r}")
        if len(set(self.splits)) != len(self.splits):
            problems.append(f"splits: names repeat in {list(self.splits)}")
        for name in ("isolate", "early_backward"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if self.early_backward is True and self.isolate is False:
            problems.append("early_backward: needs isolate=True (with deep supervision a later local loss "
                            "back-propagates through earlier blocks, so their activations cannot be freed early)")
        if self.cost not in COSTS:
            problems.append(f"cost: {self.cost!r} is not one of {', '.join(COSTS)}")
        if self.pool not in POOLS:
            problems.append(f"pool: {self.pool!r} is not one of {', '.join(POOLS)}")
        if isinstance(self.local_weight, bool) or not isinstance(self.local_weight, (int, float)) \
                or not self.local_weight > 0:
            problems.append(f"local_weight: must be a positive number, got {self.local_weight!r}")
        if self.layer_mode is not None:
            if not isinstance(self.layer_mode, str) or self.layer_mode not in mode_names():
                problems.append(f"layer_mode: unknown mode {self.layer_mode!r}; valid: {', '.join(mode_names())}")
            elif get_mode(self.layer_mode).rule.forward_gradient:
                problems.append(
                    f"layer_mode: {self.layer_mode!r} needs forward-mode tangents at every auxiliary head, which "
                    "blockwise does not carry; use layer_mode='dfa' or 'drtp' inside blocks, or train the whole "
                    f"model with convert(model, mode={self.layer_mode!r})")
            elif get_mode(self.layer_mode).family == "direct" and self.isolate is False:
                problems.append(
                    f"layer_mode: {self.layer_mode!r} projects each block's own local error onto its layers, which "
                    "needs isolated blocks: with isolate=False later losses reach the block too. Use isolate=True, "
                    "or a local-family layer_mode (fa, usf, brsf, frsf)")
        if self.units and self.head is None:
            problems.append("head: give the output layer's name with units=[...]")
        if self.head is not None and not isinstance(self.head, str):
            problems.append(f"head: must be a module name (str), got {self.head!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed: must be an int or None, got {self.seed!r}")
        if problems:
            raise ConfigError(problems, what="blockwise configuration")

    @property
    def n_blocks(self) -> Optional[int]:
        return len(self.splits) + 1 if self.splits else (self.blocks if self.blocks is not None else 4)
