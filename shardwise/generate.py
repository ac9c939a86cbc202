"""``shardwise generate``: one prompt through a tensor-parallel model, token by token.

Every rank runs the same loop: prefill the prompt, then one token per step, through the serving
engine's step function (:class:`~shardwise.serve.step.StaticStep`: a compiled decode graph of
batch 1 over a paged KV cache of its own KV heads; ``compile=False`` runs it eager). Sampling
exchanges only what it must (``shardwise.sampling``); every rank decodes the text itself to check
stop strings, so no rank needs to tell the others to stop.

The ranks are torchrun's when it launched this process (every torchrun process is one rank and
spawns nothing), else local processes spawned here (none for tp=1). The device follows the mesh:
``cuda:LOCAL_RANK`` (bf16 by default) when CUDA is present, the CPU (fp32) otherwise.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .checkpoint.source import ModelSource, build_model, load_tokenizer, resolve
from .comm import Ledger
from .failure import phase
from .mesh import Mesh, pick_dtype, under_launcher
from .partition import HeadLayout
from .quant.config import QuantConfig
from .quant.load import weight_bytes
from .sampling import SamplingParams, sample
from .serve.kv import Chunk, PagedKVCache, blocks_for
from .serve.step import StaticStep, StepOptions


@dataclass
class GenerateJob:
    model: str
    tp: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: str | None = "stdout"  # where rank 0 streams text: "stdout", "stderr" or None
    dtype: str = "auto"            # "auto": bfloat16 on a GPU, float32 on the CPU
    eos_ids: list[int] = field(default_factory=list)
    compile: bool = True
    device: str = "auto"           # "auto" (CUDA when present), "cpu" or "cuda"
    cuda_graphs: bool = True       # on CUDA: replay captured decode steps
    quant: QuantConfig | None = None


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """The chat template when the tokenizer has one (and ``chat``), else plain tokenization."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return list(tokenizer(prompt)["input_ids"])


def check_request(source: ModelSource, tp: int, n_prompt: int, max_new: int) -> None:
    cfg = source.config
    HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
    ctx = cfg.max_position_embeddings
    if n_prompt >= ctx:
        raise ValueError(f"the prompt has {n_prompt} tokens but the model's context is {ctx}")
    if n_prompt + max_new > ctx:
        raise ValueError(f"{n_prompt} prompt tokens + {max_new} new tokens exceed the context of "
                         f"{ctx}: use --max-new-tokens <= {ctx - n_prompt}")


def _stop_at(text: str, stops: list[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def cache_tokens(n: int, context: int) -> int:
    """The KV cache's size for ``n`` tokens: the next power of two from 256, within the model's
    context (``n`` where it is longer). The compiled step's shapes include the cache's, so other
    prompt lengths and ``--max-new-tokens`` reuse one graph (and the compile cache across runs)
    instead of one for every 16 tokens."""
    size = 256
    while size < n:
        size *= 2
    return max(n, min(size, context))


@torch.inference_mode()
def run_generation(job: GenerateJob) -> dict:
    """Worker body (also runs in-process for tp=1). Returns this rank's result and signals."""
    t0 = time.perf_counter()
    with phase("start"):
        mesh = Mesh.init(tp=job.tp, device=job.device)
    source = resolve(job.model, dense=job.quant is None)
    dtype = pick_dtype(job.dtype, mesh.device, quantized=bool(job.quant or source.quant))
    model = build_model(source, group=mesh.tp_group, dtype=dtype, device=mesh.device,
                        quant=job.quant).eval()
    tokenizer = load_tokenizer(source) if source.tokenizer else None
    load_s = time.perf_counter() - t0
    p = job.params
    gen = torch.Generator(mesh.device).manual_seed(p.seed if p.seed is not None else 0)
    n = cache_tokens(len(job.prompt_ids) + p.max_tokens, source.config.max_position_embeddings)
    cache = PagedKVCache(model, blocks_for(n, 16), 16)
    run_step = StaticStep(model, cache, StepOptions(compile=job.compile, max_seqs=1, max_context=n,
                                                    cuda_graphs=job.cuda_graphs))
    t1 = time.perf_counter()
    run_step.warmup()
    compile_s = time.perf_counter() - t1
    blocks = list(range(cache.num_blocks))
    long_after = model.long_after
    chunk = Chunk(0, list(job.prompt_ids), 0, blocks, sample=True,
                  long_rope=long_after is not None and len(job.prompt_ids) > long_after)
    head = model.lm_head
    out_ids: list[int] = []
    text, shown = "", 0
    stream = {"stdout": sys.stdout, "stderr": sys.stderr}.get(job.stream or "") \
        if mesh.tp_rank == 0 and mesh.rank == 0 else None
    times = []
    with phase("generate"), Ledger() as ledger:
        for step in range(p.max_tokens):
            start = time.perf_counter()
            total = chunk.start + len(chunk.tokens)
            if long_after is not None and not chunk.long_rope and total > long_after:
                # longrope: past the original context every key takes the long frequencies,
                # the cached ones included: feed the whole sequence again (transformers drops
                # its cache at the same point)
                chunk = Chunk(0, list(job.prompt_ids) + out_ids, 0, blocks, sample=True,
                              long_rope=True)
            logits = run_step([chunk])                                   # (1, V / t)
            nxt = int(sample(logits, [p], [gen], start=head.start,
                             vocab=head.num_embeddings, group=mesh.tp_group)[0])
            times.append(time.perf_counter() - start)
            if nxt in job.eos_ids:
                break
            out_ids.append(nxt)
            if tokenizer is not None:
                text = tokenizer.decode(out_ids, skip_special_tokens=True)
                cut = _stop_at(text, p.stop)
                if cut is not None:
                    text = text[:cut]
                if stream and len(text) > shown:
                    stream.write(text[shown:])
                    stream.flush()
                    shown = len(text)
                if cut is not None:
                    break
            chunk = Chunk(0, [nxt], chunk.start + len(chunk.tokens), blocks, sample=True,
                          long_rope=chunk.long_rope)
    if stream:
        stream.write("\n")
        stream.flush()
    total = sum(times)
    decode = times[1:]
    signals = {
        "rank": mesh.rank,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "device": str(mesh.device),
        "dtype": str(dtype).removeprefix("torch."),
        "graphs": run_step.graph_count,
        "prompt_tokens": len(job.prompt_ids),
        "generated_tokens": len(out_ids),
        "load_s": round(load_s, 3),
        "compile_s": round(compile_s, 3),
        "prefill_tokens_per_s": round(len(job.prompt_ids) / times[0], 1) if times else 0.0,
        "decode_tokens_per_s": round(len(decode) / sum(decode), 1) if decode else 0.0,
        "param_mib": round(weight_bytes(model) / 2**20, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "comm_s": round(ledger.seconds, 4),
        "compute_s": round(max(0.0, total - ledger.seconds), 4),
        "comm_fraction": round(ledger.seconds / total, 3) if total else 0.0,
        "collectives": ledger.counts(),
        # per forward: the embedding's partial sums + 2 per layer (attention and MLP outputs)
        "all_reduce_minimum": len(times) * (1 + 2 * source.config.num_hidden_layers)
        if mesh.tp > 1 else 0,
    }
    if mesh.device.type == "cuda":
        signals["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"text": text, "token_ids": out_ids, "signals": signals}


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def generate(job: GenerateJob) -> list[dict]:
    """Run ``job`` on ``job.tp`` ranks; results by rank. Under torchrun this process is one of
    the ranks (every rank returns every rank's result); otherwise tp=1 runs in this process and
    more ranks are spawned here."""
    if under_launcher():
        import torch.distributed as dist
        mine = run_generation(job)
        if not dist.is_initialized():
            return [mine]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        dist.destroy_process_group()
        return out
    if job.tp == 1:
        return [run_generation(job)]
    from .affinity import plan, read_nodes
    from .launch import spawn
    note = plan(job.tp, read_nodes()).note
    if note and job.stream:
        print(f"shardwise: {note}", file=sys.stderr)
    return spawn(run_generation, job.tp, job)


def summarize(results: list[dict]) -> dict:
    first = results[0]
    per_rank = [r["signals"] for r in results]
    return {"text": first["text"], "token_ids": first["token_ids"],
            "signals": {"prefill_tokens_per_s": per_rank[0]["prefill_tokens_per_s"],
                        "decode_tokens_per_s": per_rank[0]["decode_tokens_per_s"],
                        "ranks": per_rank}}


def format_signals(summary: dict) -> str:
    s = summary["signals"]
    compile_s = s["ranks"][0].get("compile_s", 0.0)
    lines = [f"prefill {s['prefill_tokens_per_s']} tok/s, decode {s['decode_tokens_per_s']} tok/s"
             + (f" (decode graph ready in {compile_s:.1f} s)" if compile_s else "")]
    for r in s["ranks"]:
        lines.append(f"rank {r['rank']}: params {r['param_mib']} MiB, peak RSS {r['peak_rss_mib']}"
                     f" MiB, comm {r['comm_s']} s vs compute {r['compute_s']} s "
                     f"({100 * r['comm_fraction']:.0f}% in collectives), {r['collectives']}"
                     f" (all-reduce minimum {r['all_reduce_minimum']})")
    return "\n".join(lines)

