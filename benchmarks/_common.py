"""Shared helpers for the benchmark scripts (models, timing, hardware description)."""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn


def mlp(in_dim: int = 784, hidden: int = 1024, depth: int = 3, out_dim: int = 10, act=nn.ReLU) -> nn.Module:
    layers: List[nn.Module] = [nn.Flatten()]
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 3, size: int = 32, out_dim: int = 10) -> nn.Module:
    flat = 64 * (size // 4) * (size // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, out_dim))


def resnet18(out_dim: int = 10) -> nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=out_dim)


MODELS: Dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": small_cnn, "resnet18": resnet18}
INPUTS = {"mlp": ((784,), 256), "cnn": ((3, 32, 32), 128), "resnet18": ((3, 32, 32), 64)}


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(steps: Dict[str, Callable[[], None]], *, rounds: int, per_round: int, warmup: int,
                        device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each step function, timed in interleaved rounds so that
    drift of the machine (thermal, other load) hits every variant alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
