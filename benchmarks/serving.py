"""SLO serving benchmark: SLO attainment and goodput vs request rate, systems side by side.

Same as ``adaspec-hf bench serve``; every option of that command works here::

    python benchmarks/serving.py                                   # built-in pair, ~10 min on 2 CPU cores
    python benchmarks/serving.py --rates 2,4,8 --arrival gamma --cv 3
    python benchmarks/serving.py --pair-dir ~/.cache/adaspec_hf/pair-quick --duration 5   # smoke run

Writes benchmarks/results/<name>.{json,md,png} (default name: ``serving``). See
:mod:`adaspec_hf.bench.serving` for the method (calibration, SLO classes, systems, metrics).
"""
from __future__ import annotations

import sys

from adaspec_hf.cli.bench import serve_main as main

if __name__ == "__main__":
    sys.exit(main())
