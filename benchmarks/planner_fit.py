"""Fit the planner's two global figures on the calibration rows of its validation table only.

    PYTHONPATH=. python benchmarks/planner_fit.py

Grid search over kernels.SUSTAINED_MATMUL (share of the measured matmul ceiling a training step
sustains) and kernels.SUSTAINED_STREAM (share of the streaming bandwidth), minimising the mean
absolute relative error over the rows marked ``calibration``. Held-out rows are never read here:
the script filters them out before predicting. Prints the best pair and the calibration errors.
"""
from __future__ import annotations

import itertools

from shardwise.planner import kernels, layer, validation


def _clear() -> None:
    for f in (kernels.gemm_s, layer.layer_time, layer.head_time, layer.embedding_time):
        f.cache_clear()


def calibration_error(matmul: float, stream: float, rows) -> float:
    kernels.SUSTAINED_MATMUL, kernels.SUSTAINED_STREAM = matmul, stream
    _clear()
    errs = [abs(validation.predict(r) / r.measured - 1) for r in rows]
    return sum(errs) / len(errs)


def main() -> None:
    rows = validation.load()
    validation.check_split(rows)
    cal = [r for r in rows if r.split == "calibration"]
    grid = [x / 100 for x in range(70, 101)]
    best = min(itertools.product(grid, grid), key=lambda p: calibration_error(*p, cal))
    print(f"calibration rows: {len(cal)}; best SUSTAINED_MATMUL={best[0]:.2f} SUSTAINED_STREAM={best[1]:.2f}; "
          f"calibration MAE {100 * calibration_error(*best, cal):.2f}%")


if __name__ == "__main__":
    main()
