"""The GPU check's measurements (run by ``benchmarks/gpu_check.sh``; one GPU, tp=1).

For each model shape (random weights written as a Hugging Face directory on the GPU machine, so
that shardwise and transformers load the same weights):

* **agreement**: greedy decoding on CUDA (fp32 and bf16) against the CPU in fp32, teacher-forced
  on the CPU's own greedy continuation: the fraction of positions whose top-1 token agrees;
* **decode**: batch-1 greedy decode tokens/s of :class:`~shardwise.serve.step.StaticStep` eager,
  eager + CUDA graphs, compiled, compiled + CUDA graphs, and transformers' ``generate`` on the
  same GPU; each against the memory-bandwidth limit (weight bytes read per token / the GPU's
  bandwidth);
* **engine**: the serving engine (:class:`~shardwise.serve.client.EngineClient`: a worker
  process on the GPU, the scheduler, the step plan on the wire; no HTTP) on the 64-request
  workload of ``shardwise bench serve`` against transformers' ``generate_batch`` (continuous
  batching) on the same GPU and workload.

Prints one JSON object (and writes it to ``--out``); ``--check`` makes a missed correctness check
an exit code of 1 (speed goals are reported, not enforced). ``--device cpu --shapes tiny`` runs
the same code on a CPU in seconds (the script's own test; nothing of a GPU is measured).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> transformers LlamaConfig fields (SmolLM2-135M's and Llama-3.2-1B's shapes)
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600}


def make_model(name: str, out: Path, device: str) -> Path:
    """A random-weight bf16 HF directory of shape ``name`` (written once)."""
    d = out / name
    if (d / "config.json").exists():
        return d
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    m.to(torch.bfloat16).save_pretrained(d)
    tok = ROOT / ".gpu" / "tokenizer"  # the SmolLM2 tokenizer, carried (gpu_check.sh --prepare)
    if tok.is_dir() and name != "llama-3.2-1b":
        for f in tok.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _shardwise(d: Path, dtype: torch.dtype, device: torch.device):
    from shardwise.checkpoint.source import build_model, resolve
    return build_model(resolve(str(d)), dtype=dtype, device=device).eval()


@torch.inference_mode()
def agreement(d: Path, device: torch.device, prompt: list[int], n: int) -> dict:
    """Top-1 agreement of the device's greedy steps with the CPU's (fp32), teacher-forced."""
    ref = _shardwise(d, torch.float32, torch.device("cpu"))
    ids = torch.tensor([prompt])
    for _ in range(n):  # the CPU's greedy continuation (full forward: no cache to trust)
        ids = torch.cat([ids, ref(ids)[:, -1:].argmax(-1)], dim=1)
    want = ref(ids)[0, len(prompt) - 1:-1].argmax(-1)                     # (n,)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = _shardwise(d, dtype, device)
        got = m(ids.to(device))[0, len(prompt) - 1:-1].argmax(-1).cpu()
        out[name] = round(float((got == want).float().mean()), 4)
        del m
    return out


def _weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (a tied head reads the embedding)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def decode_speed(d: Path, device: torch.device, tokens: int) -> dict:
    """Batch-1 decode tok/s per mode (a fresh cache, a one-token prompt, ``tokens`` steps)."""
    from shardwise.sampling import SamplingParams, sample
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = _shardwise(d, dtype, device)
    head, out = m.lm_head, {"weight_mib": round(_weight_bytes(m) / 2**20, 1)}
    modes = {"eager": (False, False), "eager+graphs": (False, True),
             "compiled": (True, False), "compiled+graphs": (True, True)}
    for mode, (comp, graphs) in modes.items():
        if graphs and device.type != "cuda":
            continue
        cache = PagedKVCache(m, -(-(tokens + 2) // 16), 16)
        step = StaticStep(m, cache, StepOptions(compile=comp, cuda_graphs=graphs, max_seqs=1,
                                                max_context=tokens + 2))
        t0 = time.perf_counter()
        step.warmup()
        ready_s = time.perf_counter() - t0
        blocks = list(range(cache.num_blocks))

        def pick(lg):
            return int(sample(lg, [SamplingParams()], [None], start=head.start,
                              vocab=head.num_embeddings, group=None)[0])
        tok = pick(step([Chunk(0, [1], 0, blocks, True)]))
        for pos in range(1, 9):  # the widths' graphs captured and the caches warm
            tok = pick(step([Chunk(0, [tok], pos, blocks, True)]))
        _sync(device)
        t0 = time.perf_counter()
        for pos in range(1, tokens + 1):  # from position 1 again: the keys are overwritten
            tok = pick(step([Chunk(0, [tok], pos, blocks, True)]))
        _sync(device)
        out[mode] = {"tok_s": round(tokens / (time.perf_counter() - t0), 1),
                     "ready_s": round(ready_s, 1), "graphs": step.graph_count}
        del step, cache
    out["transformers"] = _hf_decode(d, device, dtype, tokens)
    return out


def _hf_decode(d: Path, device: torch.device, dtype: torch.dtype, tokens: int) -> dict:
    """transformers' greedy ``generate`` (its default dynamic cache), batch 1: decode tok/s
    from the difference of a ``tokens + 1`` and a 1-token run."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    ids = torch.tensor([[1]], device=device)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        m.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0
    run(4)
    one, many = run(1), run(tokens + 1)
    return {"tok_s": round(tokens / max(1e-9, many - one), 1)}


def workload(requests: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    """``shardwise bench serve``'s workload (prompts of 20-200 tokens, 16-128 new tokens)."""
    from shardwise.serve.bench import workload as serve_workload
    ns = argparse.Namespace(seed=seed, prompt_min=20, prompt_max=200, out_min=16, out_max=128,
                            requests=requests)
    return [([t % vocab for t in p], n) for p, n in serve_workload(ns)]


async def _drive(engine, work: list[tuple[list[int], int]]) -> tuple[int, float]:
    """Submit every request at once, read every token; the tokens and the seconds. The engine
    stops before the event loop closes (its event thread delivers to this loop)."""
    from shardwise.serve.scheduler import SamplerSpec
    engine.attach(asyncio.get_running_loop())
    try:
        t0 = time.perf_counter()
        queues = [q for p, n in work for _, q in engine.submit(p, [SamplerSpec()], n, [])]
        tokens = 0
        for q in queues:
            while True:
                item = await q.get()
                if item[0] == "error":
                    raise RuntimeError(f"engine: {item[1]}")
                if item[0] == "token":
                    tokens += 1
                    if item[2] is not None:
                        break
        return tokens, time.perf_counter() - t0
    finally:
        await asyncio.to_thread(engine.stop)


def engine_speed(d: Path, device: str, work, *, max_seqs: int, compile_: bool) -> dict:
    """The engine on ``work``, every request submitted at once (``max_seqs`` run at a time)."""
    from shardwise.serve.client import EngineClient
    from shardwise.serve.engine import EngineConfig
    longest = max(len(p) + n for p, n in work)
    cfg = EngineConfig(model=str(d), device=device, max_seqs=max_seqs, max_batched_tokens=512,
                       kv_tokens=max_seqs * (longest + 16), compile=compile_)
    engine = EngineClient(cfg)
    try:
        info = engine.start(timeout_s=900)
    except BaseException:
        engine.kill()
        raise
    tokens, seconds = asyncio.run(_drive(engine, work))
    return {"tok_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2),
            "device": info["device"], "dtype": info["dtype"], "graphs": info["graphs"],
            "ready_s": round(info["load_s"] + info["compile_s"], 1)}


def hf_batch_speed(d: Path, device: torch.device, work) -> dict:
    """transformers' continuous batching (``generate_batch``'s manager) on the same workload."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    gc = GenerationConfig(max_new_tokens=max(n for _, n in work), do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    tokens, done = 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), m.continuous_batching_context_manager(generation_config=gc) \
            as manager:
        for p, n in work:
            manager.add_request(p, max_new_tokens=n)
        deadline = time.monotonic() + 600
        while done < len(work) and time.monotonic() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                done += 1
                tokens += len(r.generated_tokens)
    seconds = time.perf_counter() - t0
    return {"tok_s": round(tokens / seconds, 1), "tokens": tokens, "requests_done": done,
            "seconds": round(seconds, 2)}


def _guard(what: str, fn, *a, **kw) -> dict:
    """A contender that fails is reported with its error; the other sections still run."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the check reports it and fails at the end
        return {"error": f"{what}: {type(e).__name__}: {e}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--engine-shape", default="llama-3.2-1b")
    p.add_argument("--models", default="/tmp/shardwise-gpu-models")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="the GPU's memory bandwidth (default: by its name)")
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true", help="exit 1 when a correctness check fails")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bw = args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    res: dict = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                 "bandwidth_gbs": bw, "shapes": {}}
    failures: list[str] = []
    models = Path(args.models)
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        d = make_model(shape, models, args.device)
        row = res["shapes"][shape] = {}
        row["agreement"] = _guard("agreement", agreement, d, device, list(range(5, 37)), 32)
        row["decode"] = dec = _guard("decode", decode_speed, d, device, args.decode_tokens)
        if bw and "weight_mib" in dec:
            limit = bw * 1e9 / (dec["weight_mib"] * 2**20)
            row["bandwidth_limit_tok_s"] = round(limit, 1)
            row["fraction_of_limit"] = {k: round(v["tok_s"] / limit, 3) for k, v in dec.items()
                                        if isinstance(v, dict) and "tok_s" in v}
        agree = row["agreement"].get("float32")
        if agree is None or agree < 0.97:
            failures.append(f"{shape}: fp32 {args.device} vs CPU top-1 agreement {agree} < 0.97")
        failures += [f"{shape}: {v['error']}" for v in (row["agreement"], dec, *dec.values())
                     if isinstance(v, dict) and "error" in v]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({shape: row}), file=sys.stderr, flush=True)
    if args.engine_shape:
        d = make_model(args.engine_shape, models, args.device)
        vocab = SHAPES[args.engine_shape]["vocab_size"]
        work = workload(args.requests, 0, vocab)
        eng = res["engine"] = {"shape": args.engine_shape, "requests": len(work)}
        eng["shardwise"] = _guard("engine", engine_speed, d, args.device, work,
                                  max_seqs=args.max_seqs, compile_=False)
        eng["transformers_generate_batch"] = _guard("generate_batch", hf_batch_speed, d,
                                                    device, work)
        a, b = eng["shardwise"].get("tok_s"), eng["transformers_generate_batch"].get("tok_s")
        eng["ratio"] = round(a / b, 2) if a and b else None
        if "error" in eng["shardwise"]:
            failures.append(eng["shardwise"]["error"])
    res["failures"] = failures
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
