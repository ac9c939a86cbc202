"""The planner against published measurements it was (mostly) not fitted to.

``data/published.csv`` holds one measurement per line with its source, table, row (in published
order), column, the configuration that produced it (model, GPUs, tp/pp/dp, virtual stages, batch,
micro-batch, recomputation, sequence parallelism, software preset) and the measured value. The split
was fixed before any fitting: in each source table, odd rows (1st, 3rd, ...) may be used for
calibration and even rows are held out; ``split`` records it and :func:`check_split` enforces it.

Metrics: ``tflops_per_gpu`` (Narayanan's Eq. 3 FLOPs over the step time), ``iteration_s``,
``layer_forward_ms`` and ``layer_backward_ms`` (one transformer layer, one micro-batch).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from .gpus import get_gpu
from .layer import Setup, layer_time
from .model_catalog import get_model
from .search import Cluster, TrainRequest, evaluate_train
from .software import get_software
from .timing import training_flops

TABLE = os.path.join(os.path.dirname(__file__), "data", "published.csv")
GPUS_PER_NODE = 8
NETWORK_GBPS = 200  # Selene: 8 x 200 Gb/s HDR InfiniBand per DGX A100 (both papers)


@dataclass(frozen=True)
class Row:
    """One published measurement and its configuration (the CSV's columns)."""

    source: str
    table: str
    row: int
    column: str
    split: str
    model: str
    gpu: str
    gpus: int
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    global_batch: int
    micro_batch: int
    seq: int
    recompute: str
    sp: bool
    software: str
    metric: str
    measured: float
    config_source: str


def load(path: str = TABLE) -> list[Row]:
    with open(path, newline="") as fh:
        out = []
        for d in csv.DictReader(fh):
            ints = ("row", "gpus", "tp", "pp", "dp", "virtual_stages", "global_batch", "micro_batch", "seq")
            kw = {k: (int(v) if k in ints else v) for k, v in d.items()}
            kw["sp"], kw["measured"] = d["sp"] == "1", float(d["measured"])
            out.append(Row(**kw))
    return out


def check_split(rows: list[Row]) -> None:
    """Raise if a row's split disagrees with the rule fixed in advance (odd rows calibrate)."""
    for r in rows:
        want = "calibration" if r.row % 2 else "held-out"
        if r.split != want:
            raise ValueError(f"{r.source} {r.table} row {r.row} ({r.column}) is marked {r.split!r}, "
                             f"the fixed split says {want!r}")


def predict(r: Row) -> float:
    """The planner's value of ``r.metric`` for the row's configuration."""
    m, gpu = get_model(r.model), get_gpu(r.gpu)
    cluster = Cluster(gpu, r.gpus, GPUS_PER_NODE, "nvlink", NETWORK_GBPS)
    if r.metric.startswith("layer_"):
        setup = Setup(r.tp, r.micro_batch, r.seq, r.sp, r.recompute, get_software(r.software), "fp16",
                      cluster.link(r.tp, 1))
        t = layer_time(m, gpu, setup)
        return 1e3 * (t.forward if r.metric == "layer_forward_ms" else t.backward).total_s
    req = TrainRequest(r.seq, r.global_batch, r.micro_batch, precision="fp16", sp=r.sp,
                       recompute=r.recompute, virtual_stages=r.virtual_stages, software=r.software)
    c = evaluate_train(m, cluster, req, tp=r.tp, pp=r.pp, dp=r.dp, micro_batch=r.micro_batch,
                       virtual_stages=r.virtual_stages)
    step = c.time.step_s
    if r.metric == "iteration_s":
        return step
    if r.metric == "tflops_per_gpu":
        return training_flops(m, r.global_batch, r.seq, "full") / step / r.gpus / 1e12
    raise ValueError(f"unknown metric {r.metric!r} in {TABLE}")


def errors(rows: list[Row] | None = None) -> list[tuple[Row, float, float]]:
    """(row, predicted, relative error predicted / measured - 1) for every row."""
    rows = load() if rows is None else rows
    check_split(rows)
    return [(r, p, p / r.measured - 1) for r in rows for p in (predict(r),)]


def summary(errs: list[tuple[Row, float, float]], split: str) -> tuple[float, float, int]:
    """(mean absolute error, max absolute error, count) over one split."""
    e = [abs(x) for r, _, x in errs if r.split == split]
    return sum(e) / len(e), max(e), len(e)
