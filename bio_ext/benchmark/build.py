"""What one run is built from, given its configuration: seeds, device, data, the converted model,
the optimizer and the scheduler.

The model is the plain model of ``model.architecture`` (biotorch's ``init`` applied, then
``model.checkpoint`` loaded) converted by ``bio_ext.convert`` to the run's mode, or wrapped by
``bio_ext.blockwise`` for ``bwbpf``. Everything random is drawn after :func:`seed_everything`
with the run's seed, so a run is reproducible from its configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blockwise import blockwise
from ..convert import convert
from ..errors import ConfigError
from . import biotorch
from .data import TensorDataset, load_dataset
from .fields import BLOCKWISE
from .models import build_model
from .schema import BenchmarkConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and ``random`` with ``seed``."""
    import numpy as np
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """``torch.use_deterministic_algorithms(on)`` and cuDNN settings for the block, restored after."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, \
        torch.backends.cudnn.deterministic
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]


def select_device(gpus, local_rank: int = 0, world: int = 1) -> torch.device:
    """``infrastructure.gpus``: -1 is the CPU; a device index (or list, first used) is that CUDA
    device when CUDA is available, else the CPU with a warning (so biotorch's ``gpus: 0`` runs
    anywhere). Under torchrun (``world`` processes) local rank ``r`` takes ``gpus[r]`` of the list
    (:mod:`bio_ext.benchmark.parallel`)."""
    if world > 1 and isinstance(gpus, list) and len(gpus) < world and torch.cuda.is_available():
        raise ConfigError([f"infrastructure.gpus: {gpus} names {len(gpus)} device(s) for the {world} processes "
                           f"torchrun started; list one device per process (e.g. gpus: {list(range(world))})"],
                          what="benchmark configuration")
    if world > 1 and isinstance(gpus, int) and gpus >= 0 and torch.cuda.is_available():
        raise ConfigError([f"infrastructure.gpus: {gpus} names one device for the {world} processes torchrun "
                           f"started; list one device per process (e.g. gpus: {list(range(world))}), or -1 for "
                           "the CPU"], what="benchmark configuration")
    index = (gpus[local_rank] if world > 1 else gpus[0]) if isinstance(gpus, list) else gpus
    if index is None or index < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("infrastructure.gpus=%r asks for CUDA but none is available: running on the CPU", gpus)
        return torch.device("cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError([f"infrastructure.gpus: device {index} does not exist; this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s) (use -1 for the CPU)"],
                          what="benchmark configuration")
    if world == 1 and isinstance(gpus, list) and len(gpus) > 1:
        log.warning("infrastructure.gpus=%r: only device %d is used by one process; launch with torchrun "
                    "--nproc_per_node=%d -m bio_ext.benchmark CONFIG.yaml to train on all of them", gpus, index,
                    len(gpus))
    return torch.device(f"cuda:{index}")


# ---------------------------------------------------------------------------------------- data and model


def load_data(cfg: BenchmarkConfig):
    """The run's :class:`~bio_ext.benchmark.data.DataBundle`, resized to ``data.target_size``."""
    d = cfg.data
    bundle = load_dataset(d.dataset, d.dataset_path, val_fraction=d.val_fraction, seed=0, limit=d.limit,
                          test_limit=d.test_limit, augment=d.augment, **d.options)
    size = d.target_size
    if size is None or len(bundle.input_shape) != 3 or tuple(bundle.input_shape[1:]) == (size, size):
        if size is not None and len(bundle.input_shape) != 3:
            log.warning("data.target_size=%d ignored: %s examples are not images (shape %s)", size, d.dataset,
                        bundle.input_shape)
        return bundle

    def resize(ds):
        if ds is None:
            return None
        x = F.interpolate(ds.x, size=(size, size), mode="bilinear", align_corners=False)
        return TensorDataset(x, ds.y, ds.transform)

    log.info("resizing %s images from %s to %dx%d", d.dataset, bundle.input_shape[1:], size, size)
    return dataclasses.replace(bundle, train=resize(bundle.train), val=resize(bundle.val), test=resize(bundle.test),
                               input_shape=(bundle.input_shape[0], size, size))


def build_plain_model(cfg: BenchmarkConfig, bundle) -> nn.Module:
    """The model of ``model.architecture`` for the bundle's shape and classes, unconverted (building
    it is also how the model's options are checked before any run starts)."""
    pretrained = {"pretrained": True} if cfg.model.pretrained else {}
    return build_model(cfg.model.architecture, num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                       **cfg.model.kwargs, **pretrained)


def build_run_model(cfg: BenchmarkConfig, mode: str, seed: int, bundle) -> nn.Module:
    """The plain model of ``model.architecture``, converted to ``mode``."""
    seed_everything(seed)
    model = build_plain_model(cfg, bundle)
    biotorch.initialise(model, cfg.model.mode.biotorch_options())
    if cfg.model.checkpoint:
        state = torch.load(cfg.model.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    config = cfg.model.mode.convert_config(mode, seed=seed)
    if mode == BLOCKWISE:  # the partition's probe forward gets a batch of the dataset's shape
        return blockwise(model, config=config, example_input=torch.zeros(2, *bundle.input_shape))
    if config.conv_feedback != "kernel" and config.input_shape is None:  # dense/factored: the dataset's grid
        return convert(model, config, input_shape=tuple(bundle.input_shape))
    return convert(model, config)


# ---------------------------------------------------------------------------------------- optimisation


def build_optimizer(cfg: BenchmarkConfig, params) -> torch.optim.Optimizer:
    """The optimizer of ``training.optimizer`` over ``params``."""
    o = cfg.training.optimizer
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.type == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.epsilon, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, eps=o.epsilon, weight_decay=o.weight_decay)


def build_scheduler(cfg: BenchmarkConfig, opt: torch.optim.Optimizer):
    """The per-epoch schedule of ``training.lr_scheduler`` (None for ``none``)."""
    s = cfg.training.lr_scheduler
    if s.type == "multistep_lr":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.type == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=s.gamma)
    if s.type == "cosine":
        t_max = s.t_max or cfg.training.hyperparameters.epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=s.eta_min)
    return None
