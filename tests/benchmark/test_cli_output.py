"""What the benchmark CLI writes when its output is not a terminal (issue 13, item 6)."""

import re
import subprocess
import sys
import time
from pathlib import Path



ROOT = Path(__file__).resolve().parents[2]


def test_a_piped_run_writes_a_progress_line_every_30_s_at_most(tmp_path):
    """Through a pipe (CI, nohup, a log file) the CLI promises a progress line every 30 s at most."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
experiment: {{name: piped, output_dir: {tmp_path}, seeds: [0]}}
data: {{dataset: digits, val_fraction: 0.0}}
model: {{architecture: mlp, kwargs: {{hidden: [16]}}, mode: {{type: [dfa]}}}}
training: {{hyperparameters: {{epochs: 3, batch_size: 16}}, metrics: {{layer_alignment: false}}}}
""")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bio_ext.benchmark", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = [s for s in re.split(r"[\r\n]+", proc.stderr) if s.strip()]
    allowed = 1 + int(elapsed // 30)  # the first line, then one per 30 s
    assert len(lines) <= allowed, f"{len(lines)} lines on stderr in {elapsed:.0f} s:\n" + "\n".join(lines[:10])
    assert lines and "batch" in lines[0]


def test_seconds_per_epoch_keep_three_significant_digits():
    from bio_ext.benchmark.results import format_seconds
    assert format_seconds(0.0423) == "0.0423"
    assert format_seconds(0.4) == "0.400"
    assert format_seconds(3.25) == "3.25"
    assert format_seconds(42.0) == "42.0"
