"""Run a benchmark configuration: every (mode, seed) of the sweep, then the comparison.

    from bio_ext.benchmark import load_config, run_experiment
    results = run_experiment(load_config("configs/quickstart_digits.yaml"))

Layout of the outputs (``<output_dir>/<experiment.name>/``)::

    config.yaml                      the resolved configuration (every default filled in)
    summary.md                       one row per mode: final test accuracy, mean +- std over seeds
    accuracy.png                     test accuracy per epoch, one line per mode (mean over seeds)
    alignment.png                    per-layer update angle vs backprop over training, one panel per mode
                                     (lines, or a heat map beyond 10 layers; :mod:`~bio_ext.benchmark.plots`)
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
``step``, on the model ``bio_ext.convert`` returned (``bp`` too, whose gradients are autograd's),
with biotorch's ``gradient_clip`` / ``constrain_weights`` around ``step`` when the configuration
asks for them (:class:`~bio_ext.benchmark.biotorch.StepRules`). The optimizer and scheduler are
built from ``training`` (:mod:`bio_ext.benchmark.build`); the scheduler steps once per epoch.
:class:`Run` trains one (mode, seed): set up, restore from the checkpoint, then epoch by epoch
and step by step.

Reproducibility: each run seeds torch, numpy and ``random`` with its seed before building the
model; the training order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``; the alignment probe restores the RNG state it used, so logging never changes
training. ``resume=True`` skips finished runs and continues unfinished ones from their last
checkpoint (model with its feedback buffers, optimizer, scheduler, RNG states, history), ending
with the metrics an uninterrupted run ends with.

Divergence: a run is *diverged* (its ``results.json`` and the summary say so; it is never
"finished") when

* a training loss is NaN or infinite (checked before each backward): :class:`~bio_ext.errors.NonFiniteLossError`;
* a parameter or a floating buffer of the model (the feedback matrices, GrAPE's velocities, batch
  norm statistics) is NaN or infinite when a checkpoint is due, e.g. after a finite loss with
  non-finite gradients: :class:`~bio_ext.benchmark.errors.TrainingDivergedError`, and the
  checkpoint is not written, so ``checkpoint.pt`` and ``best_model.pt`` only ever hold finite state;
* an epoch's mean training loss exceeds :data:`DIVERGENCE_FACTOR` times the larger of the run's
  first training loss (the untrained model's, kept in the checkpoint for resumes) and
  ``ln(num_classes)`` (a uniform guess's cross-entropy, so a model that starts near zero loss is
  not flagged for ordinary noise): TrainingDivergedError (lr=1e6 reaches losses of 1e6 and more).

Each message names the epoch, the step or the tensors, and the last good checkpoint, which stays
as it was; :func:`run_experiment` records the run as diverged and goes on with the next.

Failures: any other :class:`~bio_ext.errors.BioExtError` of one run (a damaged ``checkpoint.pt`` or
``results.json`` on resume: :class:`~bio_ext.benchmark.errors.RunFileError`; a run folder that
cannot be written: :class:`~bio_ext.benchmark.errors.OutputDirError`; a conversion the model refuses)
marks that run *failed* with a one-line message naming the file and the fix, and the sweep goes on;
``summary.md`` is written in every case. Ctrl-C (``KeyboardInterrupt``) stops the sweep: the runs
that ended keep their files, ``summary.md`` is written for them and lists the runs left, and
:class:`~bio_ext.benchmark.errors.SweepInterrupted` (a KeyboardInterrupt) is raised; ``--resume``
continues from there.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils.rng import capture, restore
from ..errors import BioExtError, NonFiniteLossError, RunExistsError
from ..inspection import alignment
from . import parallel
from .biotorch import StepRules
from .errors import OutputDirError, RunFileError, SweepInterrupted, TrainingDivergedError
# what a run is built from and what it writes, re-exported: the runner's names are imported from here
from .build import (build_optimizer, build_plain_model, build_run_model, build_scheduler,  # noqa: F401
                    deterministic_mode, load_data, seed_everything, select_device)
from .results import (RESULTS_FORMAT, RunResult, atomic_save, final_metrics, read_alignment,  # noqa: F401
                      read_finished, summary_markdown, summary_table, write_run_files, write_text)
from .schema import BenchmarkConfig
from .tracking import Tracker

log = logging.getLogger(__name__)

#: epoch ``e`` of seed ``s`` trains in the order of a permutation drawn with seed ``s * ORDER_STRIDE + e``
ORDER_STRIDE = 1_000_003
#: an epoch whose mean training loss exceeds this many times the run's reference loss (its first
#: training loss, at least ln(num_classes)) has diverged
DIVERGENCE_FACTOR = 100.0


# ---------------------------------------------------------------------------------------- batches


def _batches(ds, batch_size: int, order: Optional[torch.Tensor] = None):
    idx = order if order is not None else torch.arange(len(ds))
    n = len(idx)
    plain = getattr(ds, "transform", "missing") is None and hasattr(ds, "x")
    for i in range(0, n, batch_size):
        b = idx[i:i + batch_size]
        if plain:
            yield ds.x[b], ds.y[b]
        else:
            items = [ds[int(j)] for j in b]
            yield torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int, device, top_k: int = 5,
             ranks: Optional[parallel.Ranks] = None) -> Dict[str, float]:
    """Mean loss, top-1 and top-k accuracy (in %) of ``model`` on ``ds`` (eval mode, no gradients). Under
    torchrun (``ranks``) each process evaluates its share of ``ds`` and the sums are reduced."""
    was = model.training
    model.eval()
    total, loss_sum, correct, correct_k = 0, 0.0, 0, 0
    order = ranks.eval_indices(len(ds)) if ranks is not None and ranks.active else None
    try:
        for x, y in _batches(ds, batch_size, order):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            k = min(top_k, out.shape[1])
            correct_k += int((out.topk(k, 1).indices == y[:, None]).any(1).sum())
            total += len(y)
    finally:
        model.train(was)
    if ranks is not None:
        loss_sum, correct, correct_k, total = ranks.sums((loss_sum, correct, correct_k, total), device)
    return {"loss": loss_sum / max(total, 1), "accuracy": 100.0 * correct / max(total, 1),
            f"top{top_k}": 100.0 * correct_k / max(total, 1)}


# ---------------------------------------------------------------------------------------- one run


@dataclass
class _Training:
    """The live state of one run: what it trains with, and the progress a checkpoint holds."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    rules: StepRules
    device: torch.device
    bundle: Any
    loss_fn: nn.Module
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: List[Dict[str, Any]] = field(default_factory=list)
    align_rows: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, Any] = field(default_factory=lambda: {"epochs": []})
    first_loss: Optional[float] = None  # the loss of step 0, the untrained model's (checkpointed)
    train_model: Optional[nn.Module] = None  # what the steps run: under torchrun DDP around ``model``
    ranks: parallel.Ranks = field(default_factory=parallel.Ranks)


def _non_finite(model: nn.Module) -> List[str]:
    """Names of the parameters and floating buffers of ``model`` holding a NaN or an infinity."""
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    if not named:
        return []
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()  # one synchronisation
    return [n for (n, _), good in zip(named, ok.tolist()) if not good]


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a ConfigError lists its problems on several)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


class Run:
    """One mode and one seed of a configuration, trained in ``run_dir`` (under torchrun by this process among
    ``ranks``, :mod:`bio_ext.benchmark.parallel`: rank 0 alone writes)."""

    def __init__(self, cfg: BenchmarkConfig, mode: str, seed: int, run_dir: Path, *,
                 progress: Optional[Callable[..., Any]] = None,
                 on_epoch_end: Optional[Callable[["Run", int], None]] = None, bundle=None,
                 ranks: Optional[parallel.Ranks] = None):
        self.cfg = cfg.for_run(mode, seed)
        self.ranks = ranks if ranks is not None else parallel.Ranks()
        self.bundle = bundle
        self.mode, self.seed, self.run_dir = mode, seed, Path(run_dir)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.results_path = self.run_dir / "results.json"

    # -------------------------------------------------------------- public
    def finished_result(self) -> Optional[RunResult]:
        """The stored result when this run finished already with this configuration."""
        data = read_finished(self.run_dir, self.cfg)
        if data is None:
            return None
        return RunResult(self.mode, self.seed, self.run_dir, "finished", data["history"], data["final"],
                         read_alignment(self.run_dir))

    def execute(self, *, resume: bool = False) -> RunResult:
        """Train the run (``resume``: skip it when finished, continue it from its checkpoint)."""
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
        if self.ranks.main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputDirError(self.run_dir, f"the run's folder cannot be made ({e.strerror or e}); remove "
                                     "what is in the way or set experiment.output_dir to a writable folder") from None
            write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        t0 = time.perf_counter()
        with deterministic_mode(self.cfg.experiment.deterministic):
            result = self._train(resume)
        result.seconds = time.perf_counter() - t0
        return result

    def mark_diverged(self, message: str) -> RunResult:
        """Record the run as diverged, with the history of its last good checkpoint."""
        return self._mark("diverged", message)

    def mark_failed(self, error: BioExtError) -> RunResult:
        """Record the run as failed with ``error``'s one-line message. A damaged ``results.json``
        is left as it is (the message says to delete it), and so are the files of a run folder
        written with another configuration (:class:`~bio_ext.errors.RunExistsError`); otherwise
        the results files are written with the history of the last checkpoint (or of
        ``results.json`` when the checkpoint is damaged)."""
        keep = isinstance(error, RunExistsError) or (isinstance(error, RunFileError)
                                                     and Path(error.path) == self.results_path)
        return self._mark("failed", _one_line(error), write=not keep)

    def _mark(self, status: str, message: str, write: bool = True) -> RunResult:
        history, align_rows, timings = [], [], {"epochs": []}
        try:
            if self.ckpt_path.is_file():
                ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
                history, align_rows, timings = ck["history"], ck["alignment"], ck.get("timings", timings)
            elif self.results_path.is_file():
                history = json.loads(self.results_path.read_text(encoding="utf-8")).get("history", [])
        except Exception as e:  # a damaged file: its error is the run's message already
            log.debug("%s: no history to keep (%s)", self.run_dir, e)
        if write and self.ranks.main:
            try:
                self._write_results(status, history, align_rows, timings, message)
            except (OutputDirError, OSError) as e:
                log.error("%s: the %s run's results cannot be written: %s", self.run_dir, status, e)
        return RunResult(self.mode, self.seed, self.run_dir, status, history, final_metrics(history), align_rows,
                         message)

    # -------------------------------------------------------------- training
    def _train(self, resume: bool) -> RunResult:
        st = self._setup()
        if resume:
            self._restore(st)
        tb = Tracker(str(self.run_dir / "tensorboard"), purge_step=st.step if st.epoch else None,
                     enabled=self.cfg.training.metrics.tensorboard and self.ranks.main)
        try:
            for epoch in range(st.epoch, self.cfg.training.hyperparameters.epochs):
                self._epoch(st, epoch, tb)
        finally:
            tb.close()
        if self.ranks.main:
            self._write_results("finished", st.history, st.align_rows, st.timings)
        return RunResult(self.mode, self.seed, self.run_dir, "finished", st.history, final_metrics(st.history),
                         st.align_rows)

    def _setup(self) -> _Training:
        """Device, data, the converted model, optimizer, scheduler and biotorch's step rules."""
        cfg, ranks = self.cfg, self.ranks
        device = select_device(cfg.infrastructure.gpus, ranks.local_rank, ranks.world)
        if cfg.infrastructure.threads:
            torch.set_num_threads(cfg.infrastructure.threads)
        parallel.batches_per_rank(cfg.training.hyperparameters.batch_size, ranks)
        bundle = self.bundle if self.bundle is not None else load_data(cfg)
        model = build_run_model(cfg, self.mode, self.seed, bundle).to(device)
        train_model = parallel.wrap(model, device, ranks)
        opt = build_optimizer(cfg, model.parameters())
        sched = build_scheduler(cfg, opt)
        rules = StepRules(model, cfg.model.mode.biotorch_options())
        return _Training(model, opt, sched, rules, device, bundle, nn.CrossEntropyLoss(), train_model=train_model,
                         ranks=ranks)

    def _restore(self, st: _Training) -> None:
        """Continue from the last checkpoint, when there is one: model, optimizer, scheduler, RNG
        states and progress."""
        if not self.ckpt_path.is_file():
            log.info("%s: no checkpoint, starting from scratch", self.run_dir)
            return
        fix = "delete it to train this run from scratch (--resume then starts it over)"
        try:
            ck = torch.load(self.ckpt_path, map_location=st.device, weights_only=False)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
            raise RunFileError(self.ckpt_path, f"is truncated or not a checkpoint ({type(e).__name__}: "
                               f"{_one_line(e)[:200]}); {fix}") from None
        if not isinstance(ck, dict) or not {"model", "optimizer", "epoch", "step", "history", "alignment",
                                            "rng"} <= set(ck):
            raise RunFileError(self.ckpt_path, f"is not a checkpoint of this runner (no model, optimizer and "
                               f"progress in it); {fix}")
        if ck.get("config") != self.cfg.to_dict():
            raise RunExistsError(
                f"{self.ckpt_path} was written with a different configuration; resume it with the "
                "configuration it was started with, or delete the folder to start over.")
        try:
            st.model.load_state_dict(ck["model"])
            st.opt.load_state_dict(ck["optimizer"])
            if st.sched is not None and ck.get("scheduler") is not None:
                st.sched.load_state_dict(ck["scheduler"])
            restore(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunFileError(self.ckpt_path, f"does not fit this run's model or optimizer ({type(e).__name__}: "
                               f"{_one_line(e)[:200]}); {fix}") from None
        st.rules.init_norms = ck.get("init_norms", st.rules.init_norms)
        st.epoch, st.step, st.history, st.align_rows = ck["epoch"], ck["step"], ck["history"], ck["alignment"]
        st.timings = ck.get("timings", st.timings)
        st.first_loss = ck.get("first_loss")
        log.info("%s: resumed after epoch %d (step %d)", self.run_dir, st.epoch, st.step)

    def _epoch(self, st: _Training, epoch: int, tb: Tracker) -> None:
        """Train one epoch, evaluate, log, and checkpoint."""
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = self._train_epoch(st, epoch, tb)
        row = {"epoch": epoch + 1, "step": st.step, "lr": st.opt.param_groups[0]["lr"],
               "train_loss": loss_sum / max(seen, 1), "train_accuracy": 100.0 * correct / max(seen, 1)}
        self._check_loss_growth(st, epoch, row["train_loss"])
        if st.sched is not None:
            st.sched.step()
        st.ranks.broadcast_buffers(st.model)  # every rank evaluates (and rank 0 saves) the same model
        row.update(self._evaluate(st))
        st.history.append(row)
        st.timings["epochs"].append(time.perf_counter() - t_epoch)
        tb.scalars({f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step")}, epoch + 1)
        tb.flush()
        st.epoch = epoch + 1
        self._checkpoint(st)
        st.ranks.barrier()  # rank 0's files are complete before any rank goes on (a kill then finds them whole)
        log.info("%s seed %d epoch %d: train loss %.4f, val acc %s, test acc %s", self.mode, self.seed, epoch + 1,
                 row["train_loss"], _fmt(row.get("val_accuracy")), _fmt(row.get("test_accuracy")))
        if self.on_epoch_end is not None:
            self.on_epoch_end(self, epoch + 1)

    def _train_epoch(self, st: _Training, epoch: int, tb: Tracker) -> Tuple[float, int, int]:
        """Every training step of one epoch, in the epoch's order: ``(loss sum, correct, examples)``."""
        hp = self.cfg.training.hyperparameters
        g = torch.Generator().manual_seed(self.seed * ORDER_STRIDE + epoch)
        order = st.ranks.shard(torch.randperm(len(st.bundle.train), generator=g), epoch)
        batch_size = parallel.batches_per_rank(hp.batch_size, st.ranks)  # this rank's share of the global batch
        n_batches = math.ceil(len(order) / batch_size)
        bar = self.progress(total=n_batches, desc=f"{self.mode} seed {self.seed} epoch {epoch + 1}/{hp.epochs}") \
            if self.progress and st.ranks.main else None
        st.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        try:
            for x, y in _batches(st.bundle.train, batch_size, order):
                loss, batch_correct, batch_seen = self._step(st, x.to(st.device), y.to(st.device), epoch, tb)
                loss_sum += loss * batch_seen
                correct += batch_correct
                seen += batch_seen
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # redrawn at the bar's own pace
        finally:
            if bar is not None:
                bar.close()
        return loss_sum, correct, seen

    def _step(self, st: _Training, x: torch.Tensor, y: torch.Tensor, epoch: int,
              tb: Tracker) -> Tuple[float, int, int]:
        """One optimizer step (the alignment probe first, on its logging steps): ``(loss, correct, examples)``
        of the whole step (under torchrun: summed over the ranks, the loss their mean)."""
        metrics = self.cfg.training.metrics
        log_now = st.step % metrics.display_iterations == 0
        if log_now and (metrics.layer_alignment or metrics.weight_ratio) and st.ranks.main:
            st.align_rows.append(self._probe(st.model, x, y, st.loss_fn, st.step, epoch, tb))
        t_step = time.perf_counter()
        st.opt.zero_grad(set_to_none=True)
        out = (st.train_model or st.model)(x)
        loss = st.loss_fn(out, y)
        batch_correct, batch_seen = (out.detach().argmax(1) == y).sum(), len(y)
        global_loss, batch_correct, batch_seen = st.ranks.step_metrics(loss, batch_correct, batch_seen)
        if not torch.isfinite(global_loss):
            raise NonFiniteLossError(self._nan_message(global_loss, epoch, st.step))
        loss.backward()
        st.rules.after_backward(st.model)
        st.opt.step()
        st.rules.after_step(st.model)
        dt = time.perf_counter() - t_step
        value = float(global_loss)
        if st.step == 0:
            st.first_loss = value
        if log_now:
            tb.scalars({"train/loss": value, "train/accuracy": 100.0 * batch_correct / batch_seen,
                        "train/lr": st.opt.param_groups[0]["lr"], "train/step_time_ms": 1000.0 * dt}, st.step)
        st.step += 1
        return value, batch_correct, batch_seen

    def _evaluate(self, st: _Training) -> Dict[str, Any]:
        """Validation and (with ``evaluation.enabled``) test metrics, None where there is no split."""
        cfg, metrics = self.cfg, self.cfg.training.metrics
        eval_bs = cfg.data.batch_size or cfg.training.hyperparameters.batch_size
        row: Dict[str, Any] = {}
        for split, ds in (("val", st.bundle.val), ("test", st.bundle.test if cfg.evaluation.enabled else None)):
            if ds is None:
                row.update({f"{split}_loss": None, f"{split}_accuracy": None, f"{split}_top{metrics.top_k}": None})
                continue
            ev = evaluate(st.model, ds, eval_bs, st.device, metrics.top_k, st.ranks)
            row.update({f"{split}_{k}": v for k, v in ev.items()})
        return row

    def _probe(self, model, x, y, loss_fn, step: int, epoch: int, tb) -> Dict[str, Any]:
        """The alignment of this batch's updates with backprop's (on a copy of the model), logged."""
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

    def _kept(self, epoch: int) -> str:
        """What is kept of a run that diverges in epoch ``epoch + 1``."""
        if self.ckpt_path.is_file():
            return f"the last good checkpoint, {self.ckpt_path} (after epoch {epoch}), is kept"
        return "no checkpoint was written yet (it diverged in the first epoch)"

    _ADVICE = ("Lower training.optimizer.lr, or try another seed or the mode's options (e.g. "
               "model.mode.convert.scale).")

    def _nan_message(self, loss, epoch: int, step: int) -> str:
        return (f"{self.mode} seed {self.seed}: the training loss is {float(loss.detach())} at epoch {epoch + 1}, step "
                f"{step}; training stopped. {self._kept(epoch)}. {self._ADVICE}")

    def _check_loss_growth(self, st: _Training, epoch: int, train_loss: float) -> None:
        """Raise TrainingDivergedError when epoch ``epoch + 1``'s mean training loss is above
        :data:`DIVERGENCE_FACTOR` times the reference (see the module docstring)."""
        if st.first_loss is None:  # a checkpoint of an older runner: no reference
            return
        reference = max(st.first_loss, math.log(max(st.bundle.num_classes, 2)))
        if train_loss > DIVERGENCE_FACTOR * reference:
            raise TrainingDivergedError(
                f"{self.mode} seed {self.seed}: the mean training loss of epoch {epoch + 1} is {train_loss:.4g}, more "
                f"than {DIVERGENCE_FACTOR:g} times the reference {reference:.4g} (the first step's loss, at least "
                f"ln(classes)); the run diverged and training stopped. {self._kept(epoch)}. {self._ADVICE}")

    def _check_finite_state(self, st: _Training) -> None:
        """Raise TrainingDivergedError, before a checkpoint, when a parameter or a floating buffer
        is not finite (the checkpoint of the epoch before stays the last good one)."""
        bad = _non_finite(st.model)
        if bad:
            names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise TrainingDivergedError(
                f"{self.mode} seed {self.seed}: after epoch {st.epoch} (step {st.step}) the model's {names} "
                f"{'is' if len(bad) == 1 else 'are'} not finite (NaN or infinite) although every loss was finite "
                f"(non-finite gradients or feedback); training stopped. {self._kept(st.epoch - 1)}. {self._ADVICE}")

    def _checkpoint(self, st: _Training) -> None:
        """``checkpoint.pt`` after ``st.epoch`` epochs, ``best_model.pt`` when its validation is the
        best so far, and the results files (status ``running``). Never a state that is not finite."""
        self._check_finite_state(st)
        if not self.ranks.main:
            return
        state = {"format": RESULTS_FORMAT, "epoch": st.epoch, "step": st.step, "model": st.model.state_dict(),
                 "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict() if st.sched is not None else None,
                 "rng": capture(all_cuda=True, host=True), "history": st.history, "alignment": st.align_rows,
                 "init_norms": st.rules.init_norms, "config": self.cfg.to_dict(), "timings": st.timings,
                 "first_loss": st.first_loss}
        atomic_save(state, self.ckpt_path)
        vals = [h["val_accuracy"] for h in st.history if h.get("val_accuracy") is not None]
        if vals and st.history[-1].get("val_accuracy") == max(vals):
            atomic_save(st.model.state_dict(), self.run_dir / "best_model.pt")
        self._write_results("running", st.history, st.align_rows, st.timings)

    def _write_results(self, status: str, history, align_rows, timings, message: str = "") -> None:
        write_run_files(self.run_dir, self.cfg, self.mode, self.seed, status, history, align_rows, timings, message)


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
        """Every run that did not finish: diverged or failed."""
        return [r for r in self.runs if r.status != "finished"]

    @property
    def failed(self) -> List[RunResult]:
        """The runs a typed error stopped (status ``failed``)."""
        return [r for r in self.runs if r.status == "failed"]


def experiment_dir(cfg: BenchmarkConfig) -> Path:
    """``<output_dir>/<experiment.name>``."""
    return Path(cfg.experiment.output_dir) / cfg.experiment.name


def run_experiment(cfg: BenchmarkConfig, *, resume: bool = False, progress: Optional[Callable[..., Any]] = None,
                   on_epoch_end: Optional[Callable[[Run, int], None]] = None) -> ExperimentResult:
    """Train every (mode, seed) of ``cfg`` and write the comparison (see the module docstring).

    ``progress``: a tqdm-like factory ``progress(total=..., desc=...)`` for a bar per epoch (the CLI
    passes tqdm). ``on_epoch_end(run, epoch)`` is called after each epoch's checkpoint.

    A run that diverges or fails (a :class:`~bio_ext.errors.BioExtError`) is recorded so and the
    next one starts; ``summary.md`` is always written. On ``KeyboardInterrupt`` the summary of the
    runs that ended is written and :class:`~bio_ext.benchmark.errors.SweepInterrupted` raised.
    The experiment folder not being writable is an :class:`~bio_ext.benchmark.errors.OutputDirError`.
    """
    if not isinstance(cfg, BenchmarkConfig):
        raise TypeError(f"run_experiment expects a BenchmarkConfig (see load_config), got {type(cfg).__name__}")
    with parallel.launch(cfg) as ranks:  # under torchrun: this process's rank (bio_ext.benchmark.parallel)
        return _run_experiment(cfg, resume, progress if ranks.main else None, on_epoch_end, ranks)


def _run_experiment(cfg: BenchmarkConfig, resume: bool, progress, on_epoch_end,
                    ranks: parallel.Ranks) -> ExperimentResult:
    out = experiment_dir(cfg)
    # everything that can fail on the user's input fails here, before any folder is written: the data (a missing
    # data directory names the files expected; rank 0 loads first) and the model's options
    bundle = ranks.first_on_rank0(load_data, cfg)
    build_plain_model(cfg, bundle)
    runs = [Run(cfg, m, s, out / m / f"seed_{s}", progress=progress, on_epoch_end=on_epoch_end, bundle=bundle,
                ranks=ranks) for m, s in cfg.runs()]
    if not resume:
        taken = [str(r.run_dir) for r in runs if r.ckpt_path.exists() or r.results_path.exists()]
        if taken:
            raise RunExistsError(
                f"{len(taken)} run folder(s) hold results already ({', '.join(taken[:3])}"
                f"{', ...' if len(taken) > 3 else ''}). Pass --resume (resume=True) to continue unfinished runs "
                "and skip finished ones, or choose another experiment.name / output_dir.")
    ranks.barrier()  # every rank has looked for finished runs before rank 0 writes anything
    if ranks.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputDirError(out, f"the experiment folder cannot be made ({e.strerror or e}); set "
                                 "experiment.output_dir to a writable folder, or remove what is in the way") from None
        write_text(out / "config.yaml", cfg.to_yaml())
    results: List[RunResult] = []
    try:
        for run in runs:
            try:
                results.append(run.execute(resume=resume))
            except NonFiniteLossError as e:
                log.error("%s", e)
                results.append(run.mark_diverged(str(e)))
            except BioExtError as e:
                log.error("%s seed %d failed: %s", run.mode, run.seed, _one_line(e))
                results.append(run.mark_failed(e))
    except KeyboardInterrupt:
        pending = [f"{r.mode}/seed_{r.seed}" for r in runs[len(results):]]
        log.info("interrupted: %d of %d run(s) done; writing the summary", len(results), len(runs))
        partial = _write_summary(cfg, out, results, pending, write=ranks.main)
        raise SweepInterrupted(
            f"interrupted: {len(results)} of {len(runs)} run(s) done, {out / 'summary.md'} written for them; run "
            "again with --resume to continue the others", partial, pending) from None
    return _write_summary(cfg, out, results, write=ranks.main)


def _write_summary(cfg: BenchmarkConfig, out: Path, results: List[RunResult],
                   pending: Sequence[str] = (), write: bool = True) -> ExperimentResult:
    """``summary.md`` and the figures of ``results`` (``pending``: runs an interrupt left; ``write`` False: none)."""
    table = summary_table(cfg, results)
    if not write:
        return ExperimentResult(cfg, out, results, table)
    from .plots import plot_accuracy, plot_alignment  # matplotlib only once there is something to draw
    write_text(out / "summary.md", summary_markdown(cfg, results, table, pending))
    plot_accuracy(results, out / "accuracy.png", title=cfg.experiment.name)
    plot_alignment(results, out / "alignment.png", title=cfg.experiment.name)
    return ExperimentResult(cfg, out, results, table)
