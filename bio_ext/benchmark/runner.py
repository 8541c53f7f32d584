"""Run a benchmark configuration: every (mode, seed) of the sweep, then the comparison.

    from bio_ext.benchmark import load_config, run_experiment
    results = run_experiment(load_config("configs/quickstart_digits.yaml"))

Layout of the outputs (``<output_dir>/<experiment.name>/``)::

    config.yaml                      the resolved configuration (every default filled in)
    summary.md                       one row per mode: final test accuracy, mean +- std over seeds
    accuracy.png                     test accuracy per epoch, one line per mode (mean over seeds)
    alignment.png                    per-layer update angle vs backprop over training, one panel per mode
    <mode>/seed_<k>/config.yaml      the run's own configuration (one mode, one seed)
    <mode>/seed_<k>/results.json     per-epoch metrics and the final ones; deterministic (no times)
    <mode>/seed_<k>/metrics.csv      the per-epoch metrics as a table
    <mode>/seed_<k>/alignment.json   the alignment probe's numbers, per logged step and layer
    <mode>/seed_<k>/timings.json     wall-clock times (kept out of results.json)
    <mode>/seed_<k>/checkpoint.pt    the last completed epoch (written to a temporary file, then
                                     renamed: a kill never leaves a broken checkpoint)
    <mode>/seed_<k>/best_model.pt    model state_dict of the epoch with the best validation accuracy
    <mode>/seed_<k>/tensorboard/     TensorBoard events (tags: :mod:`bio_ext.benchmark.tracking`)

One training step is the ordinary loop: ``zero_grad``, ``loss_fn(model(x), y).backward()``,
``step``, on the model ``bio_ext.convert`` returned (``bp`` too, whose gradients are autograd's).
The optimizer and scheduler are built from ``training``; the scheduler steps once per epoch.

Reproducibility: each run seeds torch, numpy and ``random`` with its seed before building the
model; the training order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``; the alignment probe restores the RNG state it used, so logging never changes
training. ``resume=True`` skips finished runs and continues unfinished ones from their last
checkpoint (model with its feedback buffers, optimizer, scheduler, RNG states, history), ending
with the metrics an uninterrupted run ends with. A NaN or infinite loss raises
:class:`~bio_ext.errors.NonFiniteLossError` naming the epoch, the step and the last good checkpoint,
which stays as it was; :func:`run_experiment` records the run as diverged and goes on with the next.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, NonFiniteLossError, RunExistsError
from .schema import BenchmarkConfig

log = logging.getLogger(__name__)

RESULTS_FORMAT = 1


# ---------------------------------------------------------------------------------------- helpers


def _atomic_write_bytes(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then rename: ``path`` is always a complete file."""
    _atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


def _write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(Path(path), lambda f: f.write(text), mode="w")


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _rng_state() -> Dict[str, Any]:
    import numpy as np
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
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


def select_device(gpus) -> torch.device:
    """``infrastructure.gpus``: -1 is the CPU; a device index (or list, first used) is that CUDA
    device when CUDA is available, else the CPU with a warning."""
    index = gpus[0] if isinstance(gpus, list) else gpus
    if index is None or index < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("infrastructure.gpus=%r asks for CUDA but none is available: running on the CPU", gpus)
        return torch.device("cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError([f"infrastructure.gpus: device {index} does not exist; this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s) (use -1 for the CPU)"],
                          what="benchmark configuration")
    if isinstance(gpus, list) and len(gpus) > 1:
        log.warning("infrastructure.gpus=%r: only device %d is used (no multi-GPU training)", gpus, index)
    return torch.device(f"cuda:{index}")


# ---------------------------------------------------------------------------------------- building


def load_data(cfg: BenchmarkConfig):
    """The run's :class:`~bio_ext.benchmark.data.DataBundle`, resized to ``data.target_size``."""
    from .data import TensorDataset, load_dataset
    d = cfg.data
    bundle = load_dataset(d.dataset, d.dataset_path, val_fraction=d.val_fraction, seed=0, limit=d.limit,
                          augment=d.augment, **d.options)
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

    import dataclasses
    log.info("resizing %s images from %s to %dx%d", d.dataset, bundle.input_shape[1:], size, size)
    return dataclasses.replace(bundle, train=resize(bundle.train), val=resize(bundle.val), test=resize(bundle.test),
                               input_shape=(bundle.input_shape[0], size, size))


def _biotorch_init(model: nn.Module, scheme: str) -> None:
    """biotorch's layers re-initialise their weights: xavier-uniform with zero bias, or PyTorch's own."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            else:
                m.reset_parameters()


def build_run_model(cfg: BenchmarkConfig, mode: str, seed: int, bundle) -> nn.Module:
    """The plain model of ``model.architecture``, converted to ``mode``."""
    from .. import convert
    from .models import build_model
    seed_everything(seed)
    model = build_model(cfg.model.architecture, num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                        **cfg.model.kwargs)
    bt = cfg.model.mode.biotorch_options()
    if "init" in bt:
        _biotorch_init(model, bt["init"])
    if cfg.model.checkpoint:
        state = torch.load(cfg.model.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    config = cfg.model.mode.convert_config(mode, seed=seed)
    if mode == "bwbpf":  # the partition's probe forward gets a batch of the dataset's shape
        from ..blockwise import blockwise
        return blockwise(model, config=config, example_input=torch.zeros(2, *bundle.input_shape))
    return convert(model, config)


def build_optimizer(cfg: BenchmarkConfig, params) -> torch.optim.Optimizer:
    o = cfg.training.optimizer
    if o.type == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.type == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.epsilon, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, eps=o.epsilon, weight_decay=o.weight_decay)


def build_scheduler(cfg: BenchmarkConfig, opt: torch.optim.Optimizer):
    s = cfg.training.lr_scheduler
    if s.type == "multistep_lr":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if s.type == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=s.gamma)
    if s.type == "cosine":
        t_max = s.t_max or cfg.training.hyperparameters.epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=s.eta_min)
    return None


# ---------------------------------------------------------------------------------------- batches


def _batches(ds, batch_size: int, order: Optional[torch.Tensor] = None):
    n = len(ds)
    idx = order if order is not None else torch.arange(n)
    plain = getattr(ds, "transform", "missing") is None and hasattr(ds, "x")
    for i in range(0, n, batch_size):
        b = idx[i:i + batch_size]
        if plain:
            yield ds.x[b], ds.y[b]
        else:
            items = [ds[int(j)] for j in b]
            yield torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int, device, top_k: int = 5) -> Dict[str, float]:
    """Mean loss, top-1 and top-k accuracy (in %) of ``model`` on ``ds`` (eval mode, no gradients)."""
    was = model.training
    model.eval()
    total, loss_sum, correct, correct_k = 0, 0.0, 0, 0
    try:
        for x, y in _batches(ds, batch_size):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            k = min(top_k, out.shape[1])
            correct_k += int((out.topk(k, 1).indices == y[:, None]).any(1).sum())
            total += len(y)
    finally:
        model.train(was)
    return {"loss": loss_sum / max(total, 1), "accuracy": 100.0 * correct / max(total, 1),
            f"top{top_k}": 100.0 * correct_k / max(total, 1)}


# ---------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    mode: str
    seed: int
    run_dir: Path
    status: str  # finished, diverged
    history: List[Dict[str, Any]]
    final: Dict[str, Any]
    alignment: List[Dict[str, Any]] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0


def _history_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    keys = list(history[0].keys()) if history else ["epoch"]

    def write(f):
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)

    _atomic_write_bytes(path, write, mode="w")


def _final(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    out = {k: v for k, v in last.items()}
    vals = [h for h in history if h.get("val_accuracy") is not None]
    if vals:
        best = max(vals, key=lambda h: h["val_accuracy"])
        out["best_val_accuracy"] = best["val_accuracy"]
        out["best_val_epoch"] = best["epoch"]
        if best.get("test_accuracy") is not None:
            out["test_accuracy_at_best_val"] = best["test_accuracy"]
    return out


class Run:
    """One mode and one seed of a configuration, trained in ``run_dir``."""

    def __init__(self, cfg: BenchmarkConfig, mode: str, seed: int, run_dir: Path, *,
                 progress: Optional[Callable[..., Any]] = None,
                 on_epoch_end: Optional[Callable[["Run", int], None]] = None, bundle=None):
        self.cfg = cfg.for_run(mode, seed)
        self.bundle = bundle
        self.mode, self.seed, self.run_dir = mode, seed, Path(run_dir)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.results_path = self.run_dir / "results.json"

    # -------------------------------------------------------------- public
    def finished_result(self) -> Optional[RunResult]:
        """The stored result when this run finished already with this configuration."""
        if not self.results_path.is_file():
            return None
        data = json.loads(self.results_path.read_text(encoding="utf-8"))
        if data.get("status") != "finished" or data.get("config") != self.cfg.to_dict():
            return None
        return RunResult(self.mode, self.seed, self.run_dir, "finished", data["history"], data["final"],
                         self._read_alignment())

    def execute(self, *, resume: bool = False) -> RunResult:
        if resume:
            done = self.finished_result()
            if done is not None:
                log.info("%s: finished already, skipped", self.run_dir)
                return done
        elif self.ckpt_path.exists() or self.results_path.exists():
            raise RunExistsError(
                f"{self.run_dir} holds a run already (checkpoint.pt / results.json). Pass --resume "
                "(resume=True) to continue it or skip it when finished, or choose another "
                "experiment.name / output_dir, or delete the folder.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        t0 = time.perf_counter()
        with deterministic_mode(self.cfg.experiment.deterministic):
            result = self._train(resume)
        result.seconds = time.perf_counter() - t0
        return result

    # -------------------------------------------------------------- training
    def _train(self, resume: bool) -> RunResult:
        cfg, mode, seed = self.cfg, self.mode, self.seed
        device = select_device(cfg.infrastructure.gpus)
        if cfg.infrastructure.threads:
            torch.set_num_threads(cfg.infrastructure.threads)
        bundle = self.bundle if self.bundle is not None else load_data(cfg)
        model = build_run_model(cfg, mode, seed, bundle).to(device)
        opt = build_optimizer(cfg, model.parameters())
        sched = build_scheduler(cfg, opt)
        hp, metrics = cfg.training.hyperparameters, cfg.training.metrics
        bt = cfg.model.mode.biotorch_options()
        if bt.get("constrain_weights"):  # biotorch: the converted layers' weights keep their initial norm
            from ..convert import feedback_layers
            converted = {f"{n}.weight" if n else "weight" for n, _ in feedback_layers(model)}
            init_norms = {n: p.detach().norm() for n, p in model.named_parameters() if n in converted}
        else:
            init_norms = {}

        start_epoch, step, history, align_rows, timings = 0, 0, [], [], {"epochs": []}
        if resume and self.ckpt_path.is_file():
            ck = torch.load(self.ckpt_path, map_location=device, weights_only=False)
            if ck.get("config") != cfg.to_dict():
                raise RunExistsError(
                    f"{self.ckpt_path} was written with a different configuration; resume it with the "
                    "configuration it was started with, or delete the folder to start over.")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if sched is not None and ck.get("scheduler") is not None:
                sched.load_state_dict(ck["scheduler"])
            init_norms = ck.get("init_norms", init_norms)
            start_epoch, step, history, align_rows = ck["epoch"], ck["step"], ck["history"], ck["alignment"]
            timings = ck.get("timings", timings)
            _set_rng_state(ck["rng"])
            log.info("%s: resumed after epoch %d (step %d)", self.run_dir, start_epoch, step)
        elif resume:
            log.info("%s: no checkpoint, starting from scratch", self.run_dir)

        from .tracking import Tracker
        tb = Tracker(str(self.run_dir / "tensorboard"), enabled=metrics.tensorboard,
                     purge_step=step if start_epoch else None)
        eval_bs = cfg.data.batch_size or hp.batch_size
        loss_fn = nn.CrossEntropyLoss()
        try:
            for epoch in range(start_epoch, hp.epochs):
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                order = torch.randperm(len(bundle.train), generator=g)
                n_batches = math.ceil(len(bundle.train) / hp.batch_size)
                bar = self.progress(total=n_batches, desc=f"{mode} seed {seed} epoch {epoch + 1}/{hp.epochs}") \
                    if self.progress else None
                model.train()
                loss_sum, correct, seen, t_epoch = 0.0, 0, 0, time.perf_counter()
                try:
                    for x, y in _batches(bundle.train, hp.batch_size, order):
                        x, y = x.to(device), y.to(device)
                        log_now = step % metrics.display_iterations == 0
                        if log_now and (metrics.layer_alignment or metrics.weight_ratio):
                            align_rows.append(self._probe(model, x, y, loss_fn, step, epoch, tb))
                        t_step = time.perf_counter()
                        opt.zero_grad(set_to_none=True)
                        out = model(x)
                        loss = loss_fn(out, y)
                        if not torch.isfinite(loss):
                            raise NonFiniteLossError(self._nan_message(loss, epoch, step))
                        loss.backward()
                        if bt.get("gradient_clip"):
                            for p in model.parameters():
                                if p.grad is not None:
                                    p.grad.clamp_(-1.0, 1.0)
                        opt.step()
                        if init_norms:
                            with torch.no_grad():
                                for n, p in model.named_parameters():
                                    if n in init_norms:
                                        p.mul_(init_norms[n] / p.norm().clamp_min(1e-12))
                        dt = time.perf_counter() - t_step
                        batch_correct = int((out.detach().argmax(1) == y).sum())
                        loss_sum += float(loss.detach()) * len(y)
                        correct += batch_correct
                        seen += len(y)
                        if log_now:
                            tb.scalars({"train/loss": float(loss.detach()),
                                        "train/accuracy": 100.0 * batch_correct / len(y),
                                        "train/lr": opt.param_groups[0]["lr"],
                                        "train/step_time_ms": 1000.0 * dt}, step)
                        step += 1
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                finally:
                    if bar is not None:
                        bar.close()
                lr = opt.param_groups[0]["lr"]
                if sched is not None:
                    sched.step()
                row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                       "train_accuracy": 100.0 * correct / max(seen, 1)}
                for split, ds in (("val", bundle.val), ("test", bundle.test if cfg.evaluation.enabled else None)):
                    if ds is None:
                        row.update({f"{split}_loss": None, f"{split}_accuracy": None,
                                    f"{split}_top{metrics.top_k}": None})
                        continue
                    ev = evaluate(model, ds, eval_bs, device, metrics.top_k)
                    row.update({f"{split}_{k}": v for k, v in ev.items()})
                history.append(row)
                timings["epochs"].append(time.perf_counter() - t_epoch)
                tb.scalars({f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step")}, epoch + 1)
                tb.flush()
                self._checkpoint(model, opt, sched, epoch + 1, step, history, align_rows, init_norms, timings)
                log.info("%s seed %d epoch %d: train loss %.4f, val acc %s, test acc %s", mode, seed, epoch + 1,
                         row["train_loss"], _fmt(row.get("val_accuracy")), _fmt(row.get("test_accuracy")))
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self, epoch + 1)
        finally:
            tb.close()
        self._write_results("finished", history, align_rows, timings)
        return RunResult(mode, seed, self.run_dir, "finished", history, _final(history), align_rows)

    def _probe(self, model, x, y, loss_fn, step: int, epoch: int, tb) -> Dict[str, Any]:
        from ..blockwise import is_blockwise
        from ..inspection import alignment
        if is_blockwise(model):  # local losses: no injected signal to compare, and the wrapper is not copyable
            return {"step": step, "epoch": epoch + 1, "layers": {}}
        k = self.cfg.training.metrics.alignment_batch
        was = model.training
        report = alignment(model, x[:k], y[:k], loss_fn)
        model.train(was)
        metrics = self.cfg.training.metrics
        keep = set()
        if metrics.layer_alignment:
            keep |= {"update", "signal", "feedback", "estimate"}
        if metrics.weight_ratio:
            keep |= {"norm_ratio"}
        layers = {n: {q: v for q, v in a.as_dict().items() if q in keep and q != "cosine"} for n, a in report.items()}
        tb.scalars({f"alignment/{q}/{n}": v for n, qs in layers.items() for q, v in qs.items()}, step)
        return {"step": step, "epoch": epoch + 1, "layers": layers}

    def _nan_message(self, loss, epoch: int, step: int) -> str:
        if self.ckpt_path.is_file():
            where = f"the last good checkpoint, {self.ckpt_path} (after epoch {epoch}), is kept"
        else:
            where = "no checkpoint was written yet (it diverged in the first epoch)"
        return (f"{self.mode} seed {self.seed}: the training loss is {float(loss.detach())} at epoch {epoch + 1}, step "
                f"{step}; training stopped. {where}. Lower training.optimizer.lr, or try another seed or "
                "the mode's options (e.g. model.mode.convert.scale).")

    def _checkpoint(self, model, opt, sched, epoch, step, history, align_rows, init_norms, timings) -> None:
        state = {"format": RESULTS_FORMAT, "epoch": epoch, "step": step, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                 "rng": _rng_state(), "history": history, "alignment": align_rows, "init_norms": init_norms,
                 "config": self.cfg.to_dict(), "timings": timings}
        atomic_save(state, self.ckpt_path)
        vals = [h["val_accuracy"] for h in history if h.get("val_accuracy") is not None]
        if vals and history[-1].get("val_accuracy") == max(vals):
            atomic_save(model.state_dict(), self.run_dir / "best_model.pt")
        self._write_results("running", history, align_rows, timings)

    def _write_results(self, status: str, history, align_rows, timings, message: str = "") -> None:
        data = {"format": RESULTS_FORMAT, "status": status, "mode": self.mode, "seed": self.seed,
                "epochs": self.cfg.training.hyperparameters.epochs, "final": _final(history), "history": history,
                "config": self.cfg.to_dict()}
        if message:
            data["message"] = message
        _write_json(self.results_path, data)
        _history_csv(self.run_dir / "metrics.csv", history)
        _write_json(self.run_dir / "alignment.json", align_rows)
        _write_json(self.run_dir / "timings.json", {**timings, "seconds_per_epoch":
                    statistics.mean(timings["epochs"]) if timings["epochs"] else None})

    def _read_alignment(self) -> List[Dict[str, Any]]:
        p = self.run_dir / "alignment.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else []

    def mark_diverged(self, message: str) -> RunResult:
        history, align_rows, timings = [], [], {"epochs": []}
        if self.ckpt_path.is_file():
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            history, align_rows, timings = ck["history"], ck["alignment"], ck.get("timings", timings)
        self._write_results("diverged", history, align_rows, timings, message)
        return RunResult(self.mode, self.seed, self.run_dir, "diverged", history, _final(history), align_rows,
                         message)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------------------------------- experiment


@dataclass
class ExperimentResult:
    config: BenchmarkConfig
    directory: Path
    runs: List[RunResult]
    table: str

    @property
    def diverged(self) -> List[RunResult]:
        return [r for r in self.runs if r.status != "finished"]


def experiment_dir(cfg: BenchmarkConfig) -> Path:
    return Path(cfg.experiment.output_dir) / cfg.experiment.name


def run_experiment(cfg: BenchmarkConfig, *, resume: bool = False, progress: Optional[Callable[..., Any]] = None,
                   on_epoch_end: Optional[Callable[[Run, int], None]] = None) -> ExperimentResult:
    """Train every (mode, seed) of ``cfg`` and write the comparison (see the module docstring).

    ``progress``: a tqdm-like factory ``progress(total=..., desc=...)`` for a bar per epoch (the CLI
    passes tqdm). ``on_epoch_end(run, epoch)`` is called after each epoch's checkpoint.
    """
    if not isinstance(cfg, BenchmarkConfig):
        raise TypeError(f"run_experiment expects a BenchmarkConfig (see load_config), got {type(cfg).__name__}")
    out = experiment_dir(cfg)
    # everything that can fail on the user's input fails here, before any folder is written: the data
    # (a missing data directory names the files expected) and the model's options
    bundle = load_data(cfg)
    from .models import build_model
    build_model(cfg.model.architecture, num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                **cfg.model.kwargs)
    runs = [Run(cfg, m, s, out / m / f"seed_{s}", progress=progress, on_epoch_end=on_epoch_end, bundle=bundle)
            for m, s in cfg.runs()]
    if not resume:
        taken = [str(r.run_dir) for r in runs if r.ckpt_path.exists() or r.results_path.exists()]
        if taken:
            raise RunExistsError(
                f"{len(taken)} run folder(s) hold results already ({', '.join(taken[:3])}"
                f"{', ...' if len(taken) > 3 else ''}). Pass --resume (resume=True) to continue unfinished runs "
                "and skip finished ones, or choose another experiment.name / output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "config.yaml", cfg.to_yaml())
    results = []
    for run in runs:
        try:
            results.append(run.execute(resume=resume))
        except NonFiniteLossError as e:
            log.error("%s", e)
            results.append(run.mark_diverged(str(e)))
    from .plots import plot_accuracy, plot_alignment
    table = summary_table(cfg, results)
    _write_text(out / "summary.md", summary_markdown(cfg, results, table))
    plot_accuracy(results, out / "accuracy.png", title=cfg.experiment.name)
    plot_alignment(results, out / "alignment.png", title=cfg.experiment.name)
    return ExperimentResult(cfg, out, results, table)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_table(cfg: BenchmarkConfig, results: Sequence[RunResult]) -> str:
    """Markdown table: per mode, final test (and best validation) accuracy, mean ± sample std over seeds."""
    test_key = "test_accuracy" if cfg.evaluation.enabled else "val_accuracy"
    lines = [f"| mode | seeds | epochs | final {test_key.replace('_', ' ')} (%) | best val accuracy (%) | "
             "final train loss | update angle per layer, last probe (deg) | s/epoch |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for mode in cfg.modes:
        rs = [r for r in results if r.mode == mode]
        ok = [r for r in rs if r.status == "finished"]
        acc = [r.final[test_key] for r in ok if r.final.get(test_key) is not None]
        best = [r.final["best_val_accuracy"] for r in ok if r.final.get("best_val_accuracy") is not None]
        loss = [r.final["train_loss"] for r in ok if r.final.get("train_loss") is not None]
        secs = []
        for r in ok:
            t = r.run_dir / "timings.json"
            if t.is_file():
                v = json.loads(t.read_text(encoding="utf-8")).get("seconds_per_epoch")
                if v:
                    secs.append(v)
        epochs = sorted({len(r.history) for r in ok})
        note = f" ({len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else ""
        angles: Dict[str, List[float]] = {}
        for r in ok:
            if r.alignment:
                for layer, qs in r.alignment[-1]["layers"].items():
                    if qs.get("update") is not None:
                        angles.setdefault(layer, []).append(qs["update"])
        angle = " / ".join(f"{statistics.mean(v):.1f}" for v in angles.values()) or "-"
        lines.append(f"| {mode} | {len(ok)}{note} | {'/'.join(map(str, epochs)) or '-'} | {_mean_std(acc)} | "
                     f"{_mean_std(best)} | {_mean_std(loss) if loss else '-'} | {angle} | "
                     f"{f'{statistics.mean(secs):.1f}' if secs else '-'} |")
    return "\n".join(lines) + "\n"


def summary_markdown(cfg: BenchmarkConfig, results: Sequence[RunResult], table: str) -> str:
    e, d, t = cfg.experiment, cfg.data, cfg.training
    head = [f"# {e.name}", ""]
    if e.description:
        head += [e.description, ""]
    head += [f"Dataset `{d.dataset}`{f' (limit {d.limit})' if d.limit else ''}, model `{cfg.model.architecture}` "
             f"{cfg.model.kwargs or ''}, {t.optimizer.type} lr {t.optimizer.lr}, scheduler {t.lr_scheduler.type}, "
             f"batch {t.hyperparameters.batch_size}, {t.hyperparameters.epochs} epochs, seeds {cfg.seeds}. "
             "Accuracy: mean ± sample standard deviation over seeds (one seed: the value).", "", table]
    for r in results:
        if r.status != "finished":
            head += [f"- {r.mode} seed {r.seed}: {r.status}: {r.message}"]
    head += ["", "![test accuracy per epoch](accuracy.png)", "", "![alignment over training](alignment.png)", ""]
    return "\n".join(head)
