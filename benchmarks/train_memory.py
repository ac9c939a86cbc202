"""Training memory per rank, measured by tensor bytes per category, against ``shardwise plan``.

For each layout the trainer's own pieces (model, optimizer, StageRunner, as ``shardwise train``
builds them) run two steps on local gloo workers; step 2 is measured on every rank:

* parameters: bytes of the distinct storages of the model's parameters (ZeRO: the flat buffer);
* autocast copies (bf16 only): 16-bit casts of parameters made during the step (a dispatch mode
  sees autocast's ``_to_copy`` of each parameter; the autocast cache holds one per weight);
* gradients: distinct storages of the ``.grad`` tensors and ZeRO's shard buffer, after the
  backward and its reductions (before the optimizer step);
* optimizer: the tensors in the AdamW state (iterating the optimizer, ``step`` counters included);
* activations: the peak, over the step, of the bytes of distinct storages saved for backward
  (saved-tensor hooks; parameters and their autocast copies excluded). Full recomputation's
  rebuilt layer lives inside ``torch.utils.checkpoint`` and is not seen: compared separately.

and against ``shardwise plan --gpu cpu`` pinned to the same layout (its JSON ``memory_bytes``),
component by component, on the busiest rank (max over ranks, as the planner reports).

    python benchmarks/train_memory.py --model debug           # ~2 min
    python benchmarks/train_memory.py --model smollm2-135m    # ~3 min
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (tp, pp, dp, options)
DEBUG = {
    "tp1": (1, 1, 1, {}),
    "tp1 selective": (1, 1, 1, {"recompute": "selective"}),
    "tp1 full": (1, 1, 1, {"recompute": "full"}),
    "tp2": (2, 1, 1, {}),
    "tp2 sp selective": (2, 1, 1, {"sequence_parallel": True, "recompute": "selective"}),
    "dp2": (1, 1, 2, {}),
    "dp2 zero1": (1, 1, 2, {"zero": 1}),
    "dp2 zero2": (1, 1, 2, {"zero": 2}),
    "pp2 (1f1b)": (1, 2, 1, {}),
    "tp2 pp2 selective": (2, 2, 1, {"recompute": "selective"}),
    "tp2 dp2 zero1 sp": (2, 1, 2, {"zero": 1, "sequence_parallel": True}),
    "tp1 bf16": (1, 1, 1, {"bf16": True}),
    "tp2 bf16 selective": (2, 1, 1, {"bf16": True, "recompute": "selective"}),
}
SMOL = {
    "tp1": (1, 1, 1, {}),
    "tp2 selective": (2, 1, 1, {"recompute": "selective"}),
    "dp2": (1, 1, 2, {}),
    "dp2 zero1": (1, 1, 2, {"zero": 1}),
    "tp2 pp2 full": (2, 2, 1, {"recompute": "full"}),
    "tp2 bf16 sp": (2, 1, 1, {"bf16": True, "sequence_parallel": True}),
}
COMPONENTS = ("weights", "grads", "optimizer", "activations")


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedMeter:
    """Peak bytes of distinct storages saved for backward (saved-tensor hooks); parameters and
    the 16-bit copies ``casts`` saw made of them are not activations."""

    def __init__(self, model: torch.nn.Module, casts: "CastCounter") -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.casts = casts.outputs
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda h: h.t)

    def pack(self, t: torch.Tensor):
        if not t.numel():
            return _Held(t, None, None)
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params or ptr in self.casts:
            return _Held(t, None, None)
        entry = self.live.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(t, self, ptr)

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]


class _Held:
    __slots__ = ("t", "meter", "ptr")

    def __init__(self, t, meter, ptr) -> None:
        self.t, self.meter, self.ptr = t, meter, ptr

    def __del__(self) -> None:
        if self.meter is not None:
            self.meter.release(self.ptr)


class CastCounter(TorchDispatchMode):
    """Distinct parameters cast to 16 bits during the step (autocast's weight copies)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.params = {p.data_ptr(): p.numel() for p in model.parameters()}
        self.cast: dict[int, int] = {}
        self.outputs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.params \
                and kwargs.get("dtype") in (torch.bfloat16, torch.float16):
            self.cast[args[0].data_ptr()] = 2 * self.params[args[0].data_ptr()]
            self.outputs.add(out.untyped_storage().data_ptr())
        return out


def measure(cfg, source, rows: torch.Tensor) -> dict:
    """Worker: two steps of the trainer's pieces; step 2's bytes per category on this rank."""
    from shardwise.checkpoint.source import build_model
    from shardwise.mesh import Mesh
    from shardwise.random import seed_everything
    from shardwise.train.config import stage_layers
    from shardwise.train.data import PackedData
    from shardwise.train.loop import make_optimizer
    from shardwise.train.optim import clip_coefficient
    from shardwise.train.pipeline import StageRunner
    mesh = Mesh.init(cfg.tp, cfg.pp, cfg.dp)
    seed_everything(mesh, cfg.seed)
    model = build_model(source, group=mesh.tp_group, sequence_parallel=cfg.sequence_parallel,
                        layers=stage_layers(source.config.num_hidden_layers, cfg.pp, mesh.pp_rank))
    opt = make_optimizer(model, mesh, cfg)
    model.set_recompute(cfg.recompute)
    runner = StageRunner(model, mesh, micro_batches=cfg.accumulation, schedule=cfg.schedule,
                         bf16=cfg.bf16, zero=cfg.zero)
    data = PackedData(rows, cfg.seed)
    for step in range(2):
        ids, targets = data.batch(step, global_batch=cfg.global_batch, dp=cfg.dp,
                                  dp_rank=mesh.dp_rank)
        opt.zero_grad()
        casts = CastCounter(model)
        meter = SavedMeter(model, casts)
        t0 = time.perf_counter()
        with meter.hooks, casts:
            runner.step(ids, targets)
        opt.finish_grads()
        grads = storage_bytes([p.grad for p in model.parameters()]
                              + [getattr(opt, "grad_shard", None)])
        opt.clip(clip_coefficient(opt.grad_norm(), cfg.max_grad_norm))
        opt.step()
        seconds = time.perf_counter() - t0
    state = [t for st in opt.opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return {"params": storage_bytes(model.parameters()), "copies": sum(casts.cast.values()),
            "grads": grads, "optimizer": sum(t.numel() * t.element_size() for t in state),
            "activations": meter.peak, "step_s": seconds}


def planned(cfg, config_path: Path, world: int) -> dict:
    """``shardwise plan --gpu cpu`` pinned to the layout: its per-component bytes."""
    from shardwise.planner.cli import add_arguments, make_plan
    from shardwise.planner.report import to_json
    argv = ["--model", str(config_path), "--gpus", str(world), "--gpu", "cpu",
            "--tp", str(cfg.tp), "--pp", str(cfg.pp), "--dp", str(cfg.dp),
            "--micro-batch", str(cfg.micro_batch), "--global-batch", str(cfg.global_batch),
            "--seq-len", str(cfg.seq_len), "--recompute", cfg.recompute,
            "--zero", str(cfg.zero), "--precision", "bf16" if cfg.bf16 else "fp32"]
    if cfg.sequence_parallel:
        argv.append("--sequence-parallel")
    p = argparse.ArgumentParser()
    add_arguments(p)
    plan = to_json(make_plan(p.parse_args(argv)))
    cand = (plan["candidates"] or plan["rejected"])[0]
    return cand["memory_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="debug", choices=("debug", "smollm2-135m"))
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/"
                    "train_memory_<model>.json)")
    ap.add_argument("--only", nargs="*", help="layout names to run (default all)")
    ap.add_argument("--replan", metavar="JSON", help="only recompute the planned column of an "
                    "earlier result (after a planner change; the measurements stay)")
    args = ap.parse_args()
    if args.replan:
        return replan(Path(args.replan))
    from shardwise.launch import WorkerPool
    from shardwise.train.config import TrainConfig
    from shardwise.train.run import prepare
    layouts = DEBUG if args.model == "debug" else SMOL
    if args.only:
        layouts = {k: v for k, v in layouts.items() if k in args.only}
    seq = args.seq_len or (256 if args.model == "debug" else 128)
    data = ROOT / "README.md"
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "train_memory"
    tmp.mkdir(exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if "model name" in l),
               platform.processor())
    print(f"CPU {cpu}; load average {os.getloadavg()}; torch {torch.__version__}")
    rows_out, pools = [], {}
    try:
        for name, (tp, pp, dp, kw) in layouts.items():
            cfg = TrainConfig(model=args.model, data=[str(data)], tp=tp, pp=pp, dp=dp,
                              micro_batch=2, global_batch=8, seq_len=seq, steps=2,
                              progress=False, save=False, **kw)
            source, packed = prepare(cfg)
            config_path = tmp / f"{args.model}.json"
            config_path.write_text(json.dumps(source.config.to_hf()))
            world = tp * pp * dp
            if world not in pools:
                for p in pools.values():
                    p.close()
                pools = {world: WorkerPool(world, timeout_s=900)}
            got = pools[world].run(measure, cfg, source, packed.rows)
            plan = planned(cfg, config_path, world)
            meas = {"weights": max(g["params"] + g["copies"] for g in got),
                    **{k: max(g[k] for g in got) for k in ("grads", "optimizer", "activations")}}
            row = {"layout": name, "tp": tp, "pp": pp, "dp": dp, **kw, "per_rank": got,
                   "measured": meas, "planned": {k: plan[k] for k in COMPONENTS},
                   "planned_workspace": plan["recompute_workspace"]}
            rows_out.append(row)
            print(_line(row), flush=True)
    finally:
        for p in pools.values():
            p.close()
    out = Path(args.out or ROOT / "benchmarks" / f"train_memory_{args.model}.json")
    out.write_text(json.dumps({"model": args.model, "seq_len": seq, "micro_batch": 2,
                               "global_batch": 8, "cpu": cpu, "rows": rows_out}, indent=1))
    print(f"wrote {out}")


def replan(path: Path) -> None:
    from shardwise.checkpoint.source import resolve
    from shardwise.train.config import TrainConfig
    d = json.loads(path.read_text())
    config_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{d['model']}.json"
    config_path.write_text(json.dumps(resolve(d["model"]).config.to_hf()))
    for row in d["rows"]:
        opts = {k: row[k] for k in ("zero", "recompute", "sequence_parallel", "bf16") if k in row}
        cfg = TrainConfig(model=d["model"], tp=row["tp"], pp=row["pp"], dp=row["dp"],
                          micro_batch=d["micro_batch"], global_batch=d["global_batch"],
                          seq_len=d["seq_len"], **opts)
        plan = planned(cfg, config_path, row["tp"] * row["pp"] * row["dp"])
        row["planned"] = {k: plan[k] for k in COMPONENTS}
        row["planned_workspace"] = plan["recompute_workspace"]
        print(_line(row))
    path.write_text(json.dumps(d, indent=1))
    print(f"rewrote {path}")


def _line(row: dict) -> str:
    cells = []
    for k in COMPONENTS:
        m, p = row["measured"][k], row["planned"][k]
        gap = (m - p) / p * 100 if p else 0.0
        cells.append(f"{k} {m / 2**20:8.2f}/{p / 2**20:8.2f} MiB ({gap:+5.1f}%)")
    return f"{row['layout']:22s} " + "  ".join(cells)


if __name__ == "__main__":
    main()
