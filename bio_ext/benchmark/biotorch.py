"""Every rule that lets a biotorch benchmark file run unchanged, in one place.

biotorch (https://github.com/jsalbert/biotorch) spells some keys and values differently and gives
its layers options that bio_ext's modes do not have. This module holds each such rule; the
schema and the runner ask it instead of knowing biotorch themselves:

* names: mode ``backpropagation`` is ``bp``; the dataset ``cifar10_benchmark`` is ``cifar10``
  with biotorch's 45k/5k holdout and crop+flip augmentation; the architectures
  ``le_net_mnist`` / ``le_net_cifar`` are ``le_net`` with that variant; ``num_epochs`` and
  ``model_checkpoint`` are accepted for ``epochs`` and ``checkpoint``; ``evaluation: true`` (or
  ``false``) is ``evaluation: {enabled: ...}``;
* the mode options of :data:`MODE_OPTIONS`, which belong to the training loop, not to the mode:
  ``init`` (``xavier`` or ``kaiming``) sets the feedback initialisation and, as biotorch's layers
  do, re-initialises every Linear/Conv2d weight with that scheme (xavier: zero biases);
  ``constrain_weights`` rescales each converted weight to its initial norm after every step;
  ``gradient_clip`` clamps every parameter gradient to [-1, 1] before the step (biotorch clamps the
  layers' input gradients; this is the closest the ordinary loop allows); ``scaling_factor``
  (biotorch lists it, no biotorch layer reads it) must be false.

Optimizer and scheduler names are case-insensitive (``SGD``, ``Adam``, ``RMSProp``;
``multistep_lr``) and ``infrastructure.gpus: 0`` falls back to the CPU without CUDA: those are the
schema's and the device selection's ordinary behaviour, not special rules.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from ..convert import feedback_layers

MODE_ALIASES = {"backpropagation": "bp"}
DATASET_ALIASES = {"cifar10_benchmark": "cifar10"}
ARCH_ALIASES = {"le_net_mnist": "le_net", "le_net_cifar": "le_net"}
#: biotorch's key -> bio_ext's key of the same section
KEY_ALIASES = {"training.hyperparameters.num_epochs": "epochs", "model.model_checkpoint": "checkpoint",
               # biotorch's configuration reference names the per-layer angle metric so
               "training.metrics.weight_alignment": "layer_alignment"}
#: biotorch's mode options: the runner's, never passed to the mode
MODE_OPTIONS = ("constrain_weights", "gradient_clip", "init", "scaling_factor")
INIT_SCHEMES = ("kaiming", "xavier")


# ------------------------------------------------------------------------------------------ the document


def apply_sugar(data: Dict[str, Any]) -> None:
    """Rewrite, in place, the biotorch spellings of a raw document that are not plain renames."""
    if isinstance(data.get("evaluation"), bool):
        data["evaluation"] = {"enabled": data["evaluation"]}
    model = data.get("model")
    if isinstance(model, dict):
        arch = model.get("architecture")
        if arch in ARCH_ALIASES:
            kwargs = model.setdefault("kwargs", {}) if isinstance(model.get("kwargs", {}), dict) else None
            if kwargs is not None:
                kwargs.setdefault("variant", arch.split("_")[-1])
    d = data.get("data")
    if isinstance(d, dict) and d.get("dataset") in DATASET_ALIASES:
        d.setdefault("augment", True)
        d.setdefault("val_fraction", 0.1)


def rename_keys(path: str, values: Dict[str, Any], problems: List[str]) -> None:
    """Rename, in place, the biotorch keys of the section at ``path`` (:data:`KEY_ALIASES`);
    giving both spellings is a problem."""
    for old_path, new in KEY_ALIASES.items():
        parent, old = old_path.rsplit(".", 1)
        if parent == path and old in values:
            if new in values:
                problems.append(f"{path}.{old}: give either {old!r} or {new!r}, not both")
            values[new] = values.pop(old)


# ------------------------------------------------------------------------------------------ mode options


def split_options(options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(biotorch's options, the mode's own options)`` of ``model.mode.options``."""
    biotorch = {k: v for k, v in options.items() if k in MODE_OPTIONS}
    own = {k: v for k, v in options.items() if k not in MODE_OPTIONS}
    return biotorch, own


def option_problems(options: Mapping[str, Any], path: str) -> List[str]:
    """What is wrong with biotorch's options (as :func:`split_options` returns them) at ``path``."""
    problems = []
    for k in ("constrain_weights", "gradient_clip", "scaling_factor"):
        if k in options and not isinstance(options[k], bool):
            problems.append(f"{path}.{k}: must be true or false, got {options[k]!r}")
    if options.get("scaling_factor") is True:
        problems.append(f"{path}.scaling_factor: must be false (no biotorch layer implements it)")
    if "init" in options and options["init"] not in INIT_SCHEMES:
        problems.append(f"{path}.init: {options['init']!r} is not one of {', '.join(INIT_SCHEMES)}")
    return problems


def convert_defaults(options: Mapping[str, Any], kwargs: Dict[str, Any]) -> None:
    """biotorch's ``init`` is the feedback's initialisation unless ``model.mode.convert`` sets one."""
    if "init" in options and "init" not in kwargs:
        kwargs["init"] = options["init"]


# ------------------------------------------------------------------------------------------ the model


def initialise(model: nn.Module, options: Mapping[str, Any]) -> None:
    """With ``init``, re-initialise the weights as biotorch's layers do: xavier-uniform with zero
    bias, or PyTorch's own (kaiming)."""
    scheme = options.get("init")
    if scheme is None:
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            else:
                m.reset_parameters()


class StepRules:
    """``gradient_clip`` and ``constrain_weights`` around one optimizer step.

    ``init_norms`` (parameter name -> initial norm of a converted layer's weight) is part of a
    run's checkpoint, so a resumed run keeps constraining to the norms it started with.
    """

    def __init__(self, model: nn.Module, options: Mapping[str, Any]):
        self.clip = bool(options.get("gradient_clip"))
        self.init_norms: Dict[str, torch.Tensor] = {}
        if options.get("constrain_weights"):
            converted = {f"{n}.weight" if n else "weight" for n, _ in feedback_layers(model)}
            self.init_norms = {n: p.detach().norm() for n, p in model.named_parameters() if n in converted}

    def after_backward(self, model: nn.Module) -> None:
        """Clamp every gradient to [-1, 1] (``gradient_clip``)."""
        if self.clip:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-1.0, 1.0)

    def after_step(self, model: nn.Module) -> None:
        """Rescale each converted weight to its initial norm (``constrain_weights``)."""
        if self.init_norms:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.init_norms:
                        p.mul_(self.init_norms[n] / p.norm().clamp_min(1e-12))
