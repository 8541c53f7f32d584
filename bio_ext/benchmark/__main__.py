"""Command line: ``python -m bio_ext.benchmark CONFIG.yaml [--override KEY=VALUE ...] [--resume]``
(also installed as ``bio-ext-benchmark``).

Runs every (mode, seed) of the configuration with a progress bar per epoch, then prints the
results table (also written to ``<output_dir>/<name>/summary.md``). Overrides are YAML values
set at a dotted key before validation, e.g. ``--override training.hyperparameters.epochs=2
--override "model.mode.type=[bp, dfa]"``. ``--check`` validates the configuration and prints it
resolved, training nothing. Exit status: 0 done, 1 a run diverged or failed (each named on one
line), 2 invalid configuration or input (one line, or the list of problems), 130 interrupted
(Ctrl-C: the runs that ended are kept and summarised, one line says how to resume).

Under torchrun (``torchrun --nproc_per_node=N -m bio_ext.benchmark CONFIG.yaml``) every process trains its
share of each batch with DistributedDataParallel and rank 0 alone writes and prints: see
:mod:`bio_ext.benchmark.parallel`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import List, Optional

from ..errors import BioExtError
from .progress import cli_progress


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bio_ext.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="benchmark YAML file (biotorch's format; see the README's configuration table)")
    p.add_argument("--override", "-o", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set a dotted key, e.g. training.hyperparameters.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished runs from their last checkpoint and skip finished ones")
    p.add_argument("--check", action="store_true", help="validate and print the resolved configuration only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    from .runner import run_experiment
    from .schema import load_config
    overrides = [o for group in args.override for o in group]
    try:
        cfg = load_config(args.config, overrides)
        if args.check:
            print(cfg.to_yaml(), end="")
            print(f"# valid: {len(cfg.runs())} run(s): {', '.join(f'{m}/seed_{s}' for m, s in cfg.runs())}")
            return 0
        # in a terminal the bar redraws in place; in a log file, a line every 30 s at most
        progress = None if args.no_progress else functools.partial(cli_progress(sys.stderr), unit="batch")
        result = run_experiment(cfg, resume=args.resume, progress=progress)
    except BioExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SweepInterrupted says what was kept; a bare one came before any run
        print(str(e) if str(e) else "interrupted (Ctrl-C) before any run ended; run again (with --resume) to "
              "continue", file=sys.stderr)
        return 130
    from .parallel import launched
    if not launched().main:  # under torchrun rank 0 reports (every rank has the same result)
        return 1 if result.diverged else 0
    print(f"\n{cfg.experiment.name}: {cfg.data.dataset}, {cfg.model.architecture}, "
          f"{cfg.training.hyperparameters.epochs} epochs, seeds {cfg.seeds}\n")
    print(result.table)
    print(f"outputs: {result.directory}/ (summary.md, accuracy.png, alignment.png, <mode>/seed_<k>/)")
    for r in result.diverged:
        print(f"error: {r.message}", file=sys.stderr)
    return 1 if result.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
