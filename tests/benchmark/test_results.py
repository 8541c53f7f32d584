"""bio_ext.benchmark.results: atomic writes, the final metrics of a history, the run's files."""

import json

from bio_ext.benchmark import results
from bio_ext.benchmark.schema import BenchmarkConfig


def test_atomic_writes_leave_only_the_complete_file(tmp_path):
    results.write_json(tmp_path / "a.json", {"x": 1})
    results.atomic_save({"y": 2}, tmp_path / "b.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_final_metrics_name_the_best_validation_epoch():
    history = [{"epoch": 1, "val_accuracy": 50.0, "test_accuracy": 40.0},
               {"epoch": 2, "val_accuracy": 70.0, "test_accuracy": 65.0},
               {"epoch": 3, "val_accuracy": 60.0, "test_accuracy": 66.0}]
    final = results.final_metrics(history)
    assert final["epoch"] == 3 and final["best_val_accuracy"] == 70.0 and final["best_val_epoch"] == 2
    assert final["test_accuracy_at_best_val"] == 65.0 and results.final_metrics([]) == {}


def test_run_files_round_trip(tmp_path):
    cfg = BenchmarkConfig.from_dict({}).for_run("bp", 0)
    history = [{"epoch": 1, "val_accuracy": 10.0}]
    results.write_run_files(tmp_path, cfg, "bp", 0, "finished", history, [{"step": 0}], {"epochs": [1.5]})
    assert results.read_finished(tmp_path, cfg)["history"] == history
    assert results.read_finished(tmp_path, cfg.for_run("bp", 1)) is None  # another configuration
    assert results.read_alignment(tmp_path) == [{"step": 0}]
    assert json.loads((tmp_path / "timings.json").read_text())["seconds_per_epoch"] == 1.5
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,val_accuracy", "1,10.0"]
