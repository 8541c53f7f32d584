"""The README's main job and the benchmark scripts' data handling."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_trains_every_requested_mode_on_digits(capsys):
    pytest.importorskip("sklearn")
    from bio_ext.quickstart import main
    assert main(["--epochs", "2", "--modes", "bp,dfa,grape"]) == 0
    out = capsys.readouterr().out
    for mode in ("bp", "dfa", "grape"):
        assert f"| {mode} |" in out


def test_quickstart_rejects_unknown_mode_with_the_valid_list():
    from bio_ext import UnknownModeError
    from bio_ext.quickstart import main
    with pytest.raises(UnknownModeError, match="grape"):
        main(["--modes", "bpp"])


def test_mnist_benchmark_names_the_missing_files(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/grape_mnist.py"), "--data", str(tmp_path),
                           "--epochs", "1"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "train-images-idx3-ubyte.gz" in proc.stderr + proc.stdout
