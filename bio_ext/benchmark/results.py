"""What a run and an experiment write: result files, written atomically, and the summary.

Every file is written to ``<name>.tmp`` and renamed over ``<name>``: a killed run never leaves a
half-written checkpoint or results file. ``results.json`` is deterministic (no times; those go to
``timings.json``), so two runs with the same configuration write the same file.

A file that cannot be written raises :class:`~bio_ext.benchmark.errors.OutputDirError` naming it;
a ``results.json`` that cannot be read back on resume raises
:class:`~bio_ext.benchmark.errors.RunFileError` naming it and the fix. Unreadable
``alignment.json`` / ``timings.json`` (figures only) are skipped with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .errors import OutputDirError, RunFileError
from .schema import BenchmarkConfig

log = logging.getLogger(__name__)

#: version of the layout of ``results.json`` and ``checkpoint.pt``
RESULTS_FORMAT = 1


# ---------------------------------------------------------------------------------------- atomic writes


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputDirError(path, f"cannot be written ({e.strerror or e}); make its folder writable (free space, "
                             "permissions, no file in the way) or set experiment.output_dir to another "
                             "folder") from None


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then rename: ``path`` is always a complete file."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    _atomic_write(Path(path), lambda f: f.write(text), mode="w")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_history_csv(path: Path, history: List[Dict[str, Any]]) -> None:
    """The per-epoch metrics as a table, one row per epoch."""
    keys = list(history[0].keys()) if history else ["epoch"]

    def write(f):
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)

    _atomic_write(Path(path), write, mode="w")


# ---------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    mode: str
    seed: int
    run_dir: Path
    status: str  # finished, diverged (see the runner), failed (a typed error stopped it)
    history: List[Dict[str, Any]]
    final: Dict[str, Any]
    alignment: List[Dict[str, Any]] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0


def final_metrics(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The last epoch's metrics, plus the best validation accuracy, its epoch and the test
    accuracy at that epoch."""
    if not history:
        return {}
    out = dict(history[-1])
    vals = [h for h in history if h.get("val_accuracy") is not None]
    if vals:
        best = max(vals, key=lambda h: h["val_accuracy"])
        out["best_val_accuracy"] = best["val_accuracy"]
        out["best_val_epoch"] = best["epoch"]
        if best.get("test_accuracy") is not None:
            out["test_accuracy_at_best_val"] = best["test_accuracy"]
    return out


def write_run_files(run_dir: Path, cfg: BenchmarkConfig, mode: str, seed: int, status: str,
                    history: List[Dict[str, Any]], align_rows: List[Dict[str, Any]], timings: Dict[str, Any],
                    message: str = "") -> None:
    """``results.json``, ``metrics.csv``, ``alignment.json`` and ``timings.json`` of one run."""
    data = {"format": RESULTS_FORMAT, "status": status, "mode": mode, "seed": seed,
            "epochs": cfg.training.hyperparameters.epochs, "final": final_metrics(history), "history": history,
            "config": cfg.to_dict()}
    if message:
        data["message"] = message
    run_dir = Path(run_dir)
    write_json(run_dir / "results.json", data)
    write_history_csv(run_dir / "metrics.csv", history)
    write_json(run_dir / "alignment.json", align_rows)
    write_json(run_dir / "timings.json", {**timings, "seconds_per_epoch":
               statistics.mean(timings["epochs"]) if timings["epochs"] else None})


def read_finished(run_dir: Path, cfg: BenchmarkConfig) -> Optional[Dict[str, Any]]:
    """The stored ``results.json`` when the run in ``run_dir`` finished with configuration ``cfg``."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    fix = ("delete it and run again with --resume: the run then continues from its checkpoint.pt, or starts "
           "over without one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFileError(path, f"is not readable JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise RunFileError(path, f"holds a JSON {type(data).__name__}, not a run's results; {fix}")
    if data.get("status") != "finished" or data.get("config") != cfg.to_dict():
        return None
    return data


def read_alignment(run_dir: Path) -> List[Dict[str, Any]]:
    """The alignment probe's rows a run wrote (none when it wrote no file)."""
    p = Path(run_dir) / "alignment.json"
    if not p.is_file():
        return []
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s is not readable JSON (%s): the run's alignment figures are left out", p, e)
        return []
    return rows if isinstance(rows, list) else []


# ---------------------------------------------------------------------------------------- the summary


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _seconds_per_epoch(runs: Sequence[RunResult]) -> List[float]:
    secs = []
    for r in runs:
        t = r.run_dir / "timings.json"
        if t.is_file():
            try:
                v = json.loads(t.read_text(encoding="utf-8")).get("seconds_per_epoch")
            except (OSError, ValueError, AttributeError) as e:
                log.warning("%s is not a readable timings file (%s): left out of s/epoch", t, e)
                continue
            if isinstance(v, (int, float)) and v:
                secs.append(v)
    return secs


def _last_update_angles(runs: Sequence[RunResult]) -> str:
    """Per layer, the update angle of the last probe, mean over ``runs``: ``"12.3 / 45.6"``."""
    angles: Dict[str, List[float]] = {}
    for r in runs:
        if r.alignment:
            for layer, qs in r.alignment[-1]["layers"].items():
                if qs.get("update") is not None:
                    angles.setdefault(layer, []).append(qs["update"])
    return " / ".join(f"{statistics.mean(v):.1f}" for v in angles.values()) or "-"


def format_seconds(v: float) -> str:
    """Seconds with three significant digits (a quick-start epoch takes a few hundredths of a second)."""
    return f"{v:#.3g}" if v < 100 else f"{v:.0f}"


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
        secs = _seconds_per_epoch(ok)
        epochs = sorted({len(r.history) for r in ok})
        not_ok = Counter(r.status for r in rs if r.status != "finished")
        note = f" ({', '.join(f'{n} {status}' for status, n in not_ok.items())})" if not_ok else ""
        lines.append(f"| {mode} | {len(ok)}{note} | {'/'.join(map(str, epochs)) or '-'} | {_mean_std(acc)} | "
                     f"{_mean_std(best)} | {_mean_std(loss) if loss else '-'} | {_last_update_angles(ok)} | "
                     f"{format_seconds(statistics.mean(secs)) if secs else '-'} |")
    return "\n".join(lines) + "\n"


def summary_markdown(cfg: BenchmarkConfig, results: Sequence[RunResult], table: str,
                     pending: Sequence[str] = ()) -> str:
    """``summary.md``: the experiment's settings, the table, runs that diverged or failed, the runs
    an interrupt left ``pending`` (``mode/seed_k``), and the figures."""
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
    if pending:
        head += ["", f"Interrupted before {len(pending)} run(s) ended: {', '.join(pending)}. Run again with "
                 "--resume to continue them (finished runs are skipped)."]
    head += ["", "![test accuracy per epoch](accuracy.png)", "", "![alignment over training](alignment.png)", ""]
    return "\n".join(head)
