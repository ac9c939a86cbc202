"""ZeRO-1/2, the three recompute modes and the one checkpoint format, on one 4-process pool.

Model: 9 query heads / 3 KV heads (hidden 72, head_dim 8), 4 layers, tied embeddings, vocabulary
256 (UTF-8 bytes): at tp=2 and 4 the heads split unevenly and KV heads are replicated. fp32,
global batch 8 x 16 tokens, max_grad_norm 0.05 so that every step clips, warmup 3 (the first
three steps' learning rates do not depend on the run's length, so a 3-step run is the start of a
5-step one).

* ZeRO vs plain DDP at the same layout: losses within 1e-5 per step, the global norm (and so the
  clipping) within 1e-5 relative; AdamW state bytes per rank at dp=4 a quarter of DDP's.
* Recomputation vs none at the same layout: losses within 1e-6; gradients of every rank within
  1e-6 (one forward/backward at tp=4 with sequence parallelism).
* A ZeRO-2 checkpoint (tp=2, dp=2) resumed at (dp=4, ZeRO-1) and (tp=4, pp=1, plain): steps 4-5
  equal the uninterrupted run's (Adam moments and parameters both restored).
* Old checkpoint formats load through the compatibility reader; an unknown one fails in one line
  naming ``shardwise convert``; ``--model`` takes a sharded directory.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint.source import ModelSource
from shardwise.models.config import LlamaConfig
from shardwise.train.config import TrainConfig
from shardwise.train.run import prepare

MC = LlamaConfig(vocab_size=256, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=9, num_key_value_heads=3)
SRC = ModelSource("t9", MC, None, None)

# name -> (tp, pp, dp, options); every layout uses the pool's 4 ranks
LAYOUTS = {
    "dp4": (1, 1, 4, {"steps": 5}),                       # the plain-DDP reference (5 steps)
    "dp4-zero1": (1, 1, 4, {"zero": 1}),
    "dp4-zero2": (1, 1, 4, {"zero": 2}),
    "tp2-dp2": (2, 1, 2, {}),
    "tp2-dp2-zero1-sp": (2, 1, 2, {"zero": 1, "sequence_parallel": True}),
    "tp2-dp2-zero2": (2, 1, 2, {"zero": 2, "save": True}),  # its checkpoint is resumed below
    "pp2-dp2": (1, 2, 2, {}),
    "pp2-dp2-zero2": (1, 2, 2, {"zero": 2}),
    "tp2-pp2": (2, 2, 1, {}),
    "tp2-pp2-selective": (2, 2, 1, {"recompute": "selective"}),
    "tp2-dp2-full": (2, 1, 2, {"recompute": "full"}),
    "tp2-dp2-selective-sp-zero2": (2, 1, 2, {"recompute": "selective", "zero": 2,
                                             "sequence_parallel": True}),
}
SAME_AS = {  # layout -> the layout it must equal (ZeRO: 1e-5, recomputation: 1e-6)
    "dp4-zero1": ("dp4", 1e-5), "dp4-zero2": ("dp4", 1e-5),
    "tp2-dp2-zero1-sp": ("tp2-dp2", 1e-5), "tp2-dp2-zero2": ("tp2-dp2", 1e-5),
    "pp2-dp2-zero2": ("pp2-dp2", 1e-5), "tp2-pp2-selective": ("tp2-pp2", 1e-6),
    "tp2-dp2-full": ("tp2-dp2", 1e-6), "tp2-dp2-selective-sp-zero2": ("tp2-dp2", 1e-5),
}


def make_cfg(tmp: Path, name: str, tp: int, pp: int, dp: int, **kw) -> TrainConfig:
    base = dict(model=SRC, data=[str(tmp / "data.txt")], tp=tp, pp=pp, dp=dp, micro_batch=1,
                global_batch=8, seq_len=16, steps=3, lr=1e-2, warmup=3, max_grad_norm=0.05,
                progress=False, out_dir=str(tmp / name), save=False)
    base.update(kw)
    return TrainConfig(**base)


def run_layouts(cfgs: list[TrainConfig], rows: torch.Tensor) -> list[dict]:
    """Worker: the runs one after another on the pool's process group; per run the losses,
    rank 0's records and every rank's AdamW state bytes."""
    import torch.distributed as dist

    from shardwise.mesh import Mesh
    from shardwise.train import loop
    out, seen = [], {}
    real = loop.make_optimizer

    def spy(model, mesh, cfg):
        seen["opt"] = real(model, mesh, cfg)
        return seen["opt"]
    loop.make_optimizer = spy
    try:
        for cfg in cfgs:
            res = loop.train_on_mesh(cfg, cfg.model, rows, Mesh.init(cfg.tp, cfg.pp, cfg.dp))
            opt = seen["opt"]
            state = getattr(opt, "opt", opt).state
            nbytes = sum(t.numel() * t.element_size() for st in state.values()
                         for k, t in st.items() if k != "step")
            out.append({"losses": res["losses"], "records": res["records"], "opt_bytes": nbytes,
                        "rank": dist.get_rank()})
    finally:
        loop.make_optimizer = real
    return out


def grads_worker(ids: torch.Tensor) -> dict:
    """One forward/backward at tp=4 with sequence parallelism in each recompute mode: this rank's
    loss and gradients."""
    from shardwise.loss import vocab_parallel_cross_entropy
    from shardwise.mesh import Mesh
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    mesh = Mesh.init(4, 1, 1)
    model = LlamaForCausalLM(MC, group=mesh.tp_group, sequence_parallel=True)
    init_weights(model, seed=3)
    out = {}
    for mode in ("none", "selective", "full"):
        model.set_recompute(mode)
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        loss = vocab_parallel_cross_entropy(logits, ids.roll(-1, 1), group=mesh.tp_group,
                                            vocab_start=model.lm_head.start, vocab_size=256)
        loss.backward()
        out[mode] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    text = Path(__file__).resolve().parents[1].joinpath("shardwise", "layers.py").read_text()
    (tmp / "data.txt").write_text(text)
    _, data = prepare(make_cfg(tmp, "x", 1, 1, 1))
    cfgs = [make_cfg(tmp, n, tp, pp, dp, **kw) for n, (tp, pp, dp, kw) in LAYOUTS.items()]
    ck = str(tmp / "tp2-dp2-zero2" / "checkpoints")
    resumed = {"resume-dp4-zero1": make_cfg(tmp, "r1", 1, 1, 4, zero=1, steps=5, resume=ck),
               "resume-tp4": make_cfg(tmp, "r2", 4, 1, 1, steps=5, resume=ck)}
    got = pool.run(run_layouts, cfgs + list(resumed.values()), data.rows)
    names = list(LAYOUTS) + list(resumed)
    out = {"tmp": tmp, "ckpt": Path(ck)}
    for i, name in enumerate(names):
        out[name] = dict(got[0][i], opt_bytes=[g[i]["opt_bytes"] for g in got])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out["grads"] = pool.run(grads_worker, ids)
    return out


@pytest.mark.parametrize("name", list(SAME_AS))
def test_losses_equal_the_reference_layout(runs, name):
    ref, tol = SAME_AS[name]
    a, b = runs[ref]["losses"][:3], runs[name]["losses"]
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert len(b) == 3 and diff < tol, f"{name}: {b} vs {ref} {a} (max {diff:.2e})"


def test_every_layout_clips_and_learns(runs):
    for name in LAYOUTS:
        recs = runs[name]["records"]
        assert all(r["clip_coef"] < 1 for r in recs), (name, [r["clip_coef"] for r in recs])
        assert recs[-1]["loss"] < recs[0]["loss"], name


@pytest.mark.parametrize("name", ["dp4-zero2", "tp2-dp2-zero2", "pp2-dp2-zero2"])
def test_zero2_clipping_equals_plain_ddp(runs, name):
    """The global norm from the sharded gradients, hence the clipping factor, equals DDP's."""
    ref = runs[SAME_AS[name][0]]["records"]
    for r, z in zip(ref, runs[name]["records"]):
        assert abs(z["grad_norm"] - r["grad_norm"]) / r["grad_norm"] < 1e-5, (name, z, r)
        assert abs(z["clip_coef"] - r["clip_coef"]) / r["clip_coef"] < 1e-5, (name, z, r)


def test_zero_shards_the_optimizer_states(runs):
    """dp=4: every rank holds about a quarter of plain DDP's AdamW bytes (padding: < 64 elements
    per bucket)."""
    full = runs["dp4"]["opt_bytes"]
    assert len(set(full)) == 1 and full[0] > 0
    for name in ("dp4-zero1", "dp4-zero2"):
        for b in runs[name]["opt_bytes"]:
            assert abs(b - full[0] / 4) <= 2 * 4 * 64, (name, runs[name]["opt_bytes"], full)


@pytest.mark.parametrize("name", ["resume-dp4-zero1", "resume-tp4"])
def test_zero_checkpoint_resumes_at_another_layout(runs, name):
    """Saved at (tp=2, dp=2, ZeRO-2) after step 3; steps 4 and 5 equal the uninterrupted run."""
    ref = runs["dp4"]["losses"][3:]
    got = runs[name]["losses"]
    assert [r["step"] for r in runs[name]["records"]] == [4, 5]
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (name, got, ref)


def test_zero_checkpoint_holds_every_rank_slices(runs):
    from shardwise.checkpoint.sharded import Checkpoint
    ck = Checkpoint(runs["ckpt"])
    assert ck.layout == {"tp": 2, "pp": 1, "dp": 2, "zero": 2} and ck.meta["step"] == 3
    flat = [e for e in ck.entries if e.kind == "exp_avg" and e.flat is not None]
    assert flat and {Path(f).name for f in ck.meta["files"]} == {
        f"shard-pp0-dp{d}-tp{t}.safetensors" for d in (0, 1) for t in (0, 1)}
    assert ck.full("exp_avg", "model.layers.0.self_attn.k_proj.weight").shape == (24, 72)


def test_recompute_gradients_equal_no_recompute(runs):
    for rank, res in enumerate(runs["grads"]):
        loss, grads = res["none"]
        for mode in ("selective", "full"):
            l2, g2 = res[mode]
            assert abs(l2 - loss) < 1e-6, (rank, mode, l2, loss)
            worst = max((g2[n] - grads[n]).abs().max().item() for n in grads)
            assert worst < 1e-6, (rank, mode, worst)


# ------------------------------------------------------------------------ formats and --model

def _write_format1(model, d: Path) -> None:
    """What ``save_sharded`` wrote before this format (tp=1)."""
    from safetensors.torch import save_file
    d.mkdir()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
              str(d / "rank-000.safetensors"))
    pieces = {n: [dataclasses.asdict(x) for x in p.pieces] if getattr(p, "pieces", None) else None
              for n, p in model.named_parameters()}
    (d / "shardwise.json").write_text(json.dumps({"format": 1, "tp": 1, "pieces": {"0": pieces}}))
    (d / "config.json").write_text(json.dumps(model.config.to_hf()))


def _write_train1(model, d: Path) -> None:
    """What the first training format wrote (``meta.json`` + ``shard-pp0-tp0.pt``)."""
    from shardwise.shards import split_local
    d.mkdir()
    entries = []
    for path, p in model.named_parameters():
        for name, pc, rows in split_local(path, p):
            key = None if pc is None else (pc.dim, pc.start, pc.stop, pc.full)
            entries.append((name, key, {"param": rows.clone()}))
    torch.save({"entries": entries, "opt_step": 0.0}, d / "shard-pp0-tp0.pt")
    meta = {"step": 7, "layout": {"tp": 1, "pp": 1, "dp": 1}, "config": model.config.to_hf(),
            "files": ["shard-pp0-tp0.pt"], "tokenizer": None}
    (d / "meta.json").write_text(json.dumps(meta))


def test_old_formats_load_and_model_takes_a_sharded_directory(runs, tmp_path):
    from shardwise.checkpoint.convert import reshard
    from shardwise.checkpoint.source import build_model, resolve
    ref = build_model(SRC, seed=5).eval()
    ids = torch.arange(24).view(2, 12)
    with torch.no_grad():
        want = ref(ids)
    _write_format1(ref, tmp_path / "f1")
    _write_train1(ref, tmp_path / "t1")
    reshard(tmp_path / "t1", tmp_path / "new", tp=2)  # `shardwise convert --from OLD --out NEW`
    for d in ("f1", "t1", "new"):
        src = resolve(str(tmp_path / d))
        assert src.config.to_hf() == MC.to_hf()
        with torch.no_grad():
            torch.testing.assert_close(build_model(src).eval()(ids), want, atol=1e-5, rtol=0)
    trained = resolve(str(runs["ckpt"]))  # a training run's checkpoint root as --model
    assert trained.config.to_hf() == MC.to_hf() and build_model(trained)(ids).shape == (2, 12, 256)
    (tmp_path / "f9").mkdir()
    (tmp_path / "f9" / "shardwise.json").write_text(json.dumps({"format": 9}))
    with pytest.raises(ValueError) as err:
        resolve(str(tmp_path / "f9"))
    msg = str(err.value)
    assert "shardwise convert" in msg and "\n" not in msg


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_planner_activation_formula_is_what_the_model_saves(mode, tmp_path):
    """One forward at tp=1: the bytes of the distinct storages saved for backward (parameters
    excluded) equal the planner's activations for the same shape (fp32; the benchmark checks
    every layout and bf16)."""
    from shardwise.checkpoint.source import build_model
    from shardwise.loss import vocab_parallel_cross_entropy
    from shardwise.planner.memory import training_memory
    from shardwise.planner.models import from_hf_config
    model = build_model(SRC)
    model.set_recompute(mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel():
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, 256, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_cross_entropy(model(ids), ids, group=None, vocab_start=0, vocab_size=256)
    (tmp_path / "config.json").write_text(json.dumps(MC.to_hf()))
    spec = from_hf_config(str(tmp_path / "config.json"))
    plan = training_memory(spec, tp=1, pp=1, dp=1, micro_batch=2, micro_batches=1, seq=16,
                           sp=False, recompute=mode, zero=0, capacity=2**30, precision="fp32")
    # per layer the int64 KV-expansion index (9 heads; inside the checkpoint under full); the
    # loss's count: not modelled
    small = (4 * 9 * 8 if mode != "full" else 0) + 8
    assert sum(saved.values()) - small == plan.activations
