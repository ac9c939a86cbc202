"""The TP worker processes: rank 0 schedules, every rank runs the same step.

Each step rank 0 broadcasts the scheduler's :class:`StepPlan` (token ids, positions, block
tables, samplers of new sequences, sequences to forget) over the TP group as one int64 tensor
(:mod:`.wire`: on the GPU under NCCL); then every rank runs the batch through its shard of the
model, with its own :class:`PagedKVCache`, and samples the next tokens with the
vocabulary-parallel sampler, which gives every rank the same tokens. Rank 0 talks to the server
through two queues: commands in (``add``, ``cancel``, ``stop``), events out (``ready``, ``step``,
``stats``, ``fail``, ``error``).

Where the ranks live: :func:`worker_main` is a rank the server spawned (one process per rank);
under torchrun the launcher's processes are the ranks (:func:`run_rank`): rank 0 runs the engine
in a thread beside the HTTP server, the others run :func:`run_rank` as their main loop. The device
follows the mesh (``cuda:LOCAL_RANK`` with NCCL when CUDA is present, the CPU otherwise,
``EngineConfig.device`` overrides); the cache, the block tables, the step and the sampling live
there, and only the sampled token ids (and log-probabilities asked for) come back to the host.

Expert parallelism (``ep > 1``): the ``tp x ep`` ranks form ``ep`` TP groups that run different
sequences and exchange tokens in every MoE layer (:mod:`shardwise.models.moe`). Rank 0 puts each
new sequence on the group running the fewest (:class:`Groups`; forked samples stay with their
leader, whose KV they share) and the plan goes to every rank; each group runs its chunks, a group
without any in a step still runs the model on no tokens (its all-to-alls take part), and the
groups' results are gathered on rank 0 (``all_gather_object`` over the EP group of TP rank 0).
Each group keeps its sequences' KV in its own cache, so prefix caching (shared blocks) is off. A
step that raises is fatal there: the other groups would wait for it in an all-to-all.

One request never takes the engine down: rank 0 refuses a request it cannot run before it is
scheduled (:func:`.admit.admission_error`, a ``fail`` event with status 400), and a step that
raises on every rank (the same plan runs the same code everywhere) fails only the sequence that
caused it (:meth:`.Scheduler.fail_step`, status 500) while the others go on. A failed collective
(a peer gone, the group broken) is the engine's failure, not a request's: it stays fatal, as does
``error`` (rank 0 itself broke).
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..comm import Ledger
from ..quant.config import QuantConfig
from ..sampling import SamplingParams, mask_words, parallel_logprobs, sample
from ..shm import PeerError
from .admit import admission_error, make_sampler
from .grammar import Grammars
from .kv import PagedKVCache, blocks_for
from .scheduler import Request, SamplerSpec, Scheduler, Sequence, StepPlan
from .step import StaticStep, StepOptions
from . import wire


@dataclass
class EngineConfig:
    model: str
    tp: int = 1
    ep: int = 1                       # TP groups side by side splitting the experts (MoE)
    expert_tp: int | None = None      # ranks each expert spans in its TP group (default tp)
    kv_tokens: int | None = None      # cache size in tokens per rank (default: the context)
    block_size: int = 16
    max_seqs: int = 32
    max_batched_tokens: int = 256
    dtype: str = "auto"               # "auto": bfloat16 on a GPU, float32 on the CPU
    device: str = "auto"              # "auto" (CUDA when present), "cpu" or "cuda"
    threads: int | None = None        # torch threads per rank (default: its pinned cores)
    prefix_caching: bool = True       # reuse the KV of full blocks of earlier prompts
    profile: bool = False             # time collectives in each step (the Ledger)
    compile: bool = True              # decode steps through torch.compile (--no-compile: eager)
    cuda_graphs: bool = True          # on CUDA, replay captured decode steps (--no-cuda-graphs)
    quant: QuantConfig | None = None  # weight-only quantization (shardwise.quant)

    def __post_init__(self) -> None:
        """Raise ValueError naming the option, before any worker starts."""
        for name in ("tp", "ep", "block_size", "max_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("kv_tokens", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1 "
                                 "(or left out for the default)")
        from ..mesh import DEVICES
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.ep > 1:  # each TP group holds its own sequences' KV: no shared prefix blocks
            self.prefix_caching = False
        if self.kv_tokens is not None and self.kv_tokens < self.block_size:
            raise ValueError(f"--kv-tokens={self.kv_tokens} is less than one block of "
                             f"--block-size={self.block_size} tokens")

    def num_blocks(self, context: int) -> int:
        return blocks_for(self.kv_tokens or context, self.block_size)

    @property
    def world(self) -> int:
        return self.tp * self.ep


@dataclass
class StepResult:
    """What one step gives back: sampled tokens, their log-probabilities, prompt ones."""
    sampled: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, Any] = field(default_factory=dict)  # id -> (logprob, [(tok, lp), ...])
    prompt: dict[int, list] = field(default_factory=dict)   # id -> [(tok, lp, [(tok, lp)])]


class Runner:
    """One rank's model, cache, step function and per-sequence samplers; with ``ep`` > 1 the
    sequences of its TP group (``ep_rank`` of ``ep``) and the EP group its results are gathered
    over."""

    def __init__(self, model, group, cache: PagedKVCache, *,
                 options: StepOptions = StepOptions(), ep: int = 1, ep_rank: int = 0,
                 ep_group=None, tp_rank: int = 0) -> None:
        self.model, self.group, self.cache = model, group, cache
        self.step = StaticStep(model, cache, options)
        self.ep, self.ep_rank, self.ep_group, self.tp_rank = ep, ep_rank, ep_group, tp_rank
        self.head = model.lm_head
        self.vocab = self.head.num_embeddings
        self.samplers: dict[int, tuple[SamplerSpec, SamplingParams, torch.Generator]] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: the forward of every chunk, the KV copies of forked sequences, then
        sampling (with the plan's token masks) and the log-probabilities asked for. With
        ``ep`` > 1 this rank runs its group's chunks; TP rank 0 returns every group's results."""
        for sid in plan.drop:
            self.samplers.pop(sid, None)
        for sid, sp in plan.new.items():
            self.samplers[sid] = (sp, *make_sampler(sp, self.cache.device))
        if self.ep == 1:
            return self._run(plan, plan.chunks)
        out = self._run(plan, [c for c in plan.chunks if c.group == self.ep_rank])
        if self.tp_rank == 0:  # every group's results to rank 0
            box: list[Any] = [None] * self.ep
            dist.all_gather_object(box, out, group=self.ep_group)
            for r in box:
                out.sampled.update(r.sampled)
                out.logprobs.update(r.logprobs)
                out.prompt.update(r.prompt)
        return out

    def _run(self, plan: StepPlan, chunks: list) -> StepResult:
        picked: list[tuple[int, int]] = []          # (seq id, chunk whose last row it samples)
        spans: list[tuple[int, int, list[int]]] = []  # prompt logprobs: (seq id, chunk, targets)
        for i, c in enumerate(chunks):
            if c.targets:
                spans.append((c.seq_id, i, c.targets))
            if c.sample:
                picked += [(sid, i) for sid in (c.seq_id, *c.forks)]
        last = [len(c.tokens) - 1 for c in chunks]
        rows = [(i, last[i]) for _, i in picked] + [(i, j) for _, i, t in spans
                                                    for j in range(len(t))]
        local = self.step(chunks, rows)                               # (len(rows), V_local)
        self.cache.copy_blocks(plan.copies)
        out, n = StepResult(), len(picked)
        if spans:
            out.prompt = self._prompt_logprobs(local[n:], spans)
        if not picked:
            return out
        samp = [self.samplers[sid] for sid, _ in picked]
        toks = sample(local[:n], [s[1] for s in samp], [s[2] for s in samp],
                      start=self.head.start, vocab=self.vocab, group=self.group,
                      mask=self._masks(plan.masks, [sid for sid, _ in picked]))
        out.sampled = {sid: t for (sid, _), t in zip(picked, toks.tolist())}
        want = [i for i, s in enumerate(samp) if s[0].logprobs is not None]
        if want:
            k = max(samp[i][0].logprobs or 0 for i in want)
            chosen, vals, top = parallel_logprobs(local[want], toks[want], k, start=self.head.start,
                                                  vocab=self.vocab, group=self.group)
            for row, i in enumerate(want):
                ki = samp[i][0].logprobs or 0
                out.logprobs[picked[i][0]] = (float(chosen[row]), list(zip(
                    top[row, :ki].tolist(), vals[row, :ki].tolist())))
        return out

    def _masks(self, masks: dict[int, bytes], sids: list[int]) -> torch.Tensor | None:
        """The packed token masks of the sampled rows (n, words) int32; all ones for rows
        without a grammar; ``None`` when no row has one."""
        if not masks:
            return None
        out = torch.full((len(sids), mask_words(self.vocab)), -1, dtype=torch.int32)
        for i, sid in enumerate(sids):
            if sid in masks:
                out[i] = torch.frombuffer(bytearray(masks[sid]), dtype=torch.int32)
        return out.to(self.cache.device)

    def _prompt_logprobs(self, local: torch.Tensor, spans: list) -> dict[int, list]:
        """Each prompt token's log-probability given the tokens before it, with the top k."""
        targets = torch.tensor([t for _, _, ts in spans for t in ts], device=local.device)
        k = max(self.samplers[sid][0].prompt_logprobs or 0 for sid, _, _ in spans)
        chosen, vals, top = parallel_logprobs(local, targets, k, start=self.head.start,
                                              vocab=self.vocab, group=self.group)
        out, at = {}, 0
        for sid, _, ts in spans:
            ki = self.samplers[sid][0].prompt_logprobs or 0
            out[sid] = [(t, float(chosen[at + j]), list(zip(top[at + j, :ki].tolist(),
                                                            vals[at + j, :ki].tolist())))
                        for j, t in enumerate(ts)]
            at += len(ts)
        return out


class Groups:
    """Rank 0 under expert parallelism: the TP group of every running sequence. A new sequence
    goes to the group running the fewest; forked samples stay with their leader."""

    def __init__(self, ep: int) -> None:
        self.ep, self.of = ep, {}

    def assign(self, plan: StepPlan) -> None:
        for sid in plan.drop:
            self.of.pop(sid, None)
        load = [0] * self.ep
        for g in self.of.values():
            load[g] += 1
        for c in plan.chunks:
            if c.seq_id not in self.of:
                self.of[c.seq_id] = min(range(self.ep), key=load.__getitem__)
                load[self.of[c.seq_id]] += 1
            c.group = self.of[c.seq_id]
            for f in c.forks:
                self.of[f] = c.group


def _drain(cmd_q, block: bool) -> list[tuple]:
    out = []
    try:
        out.append(cmd_q.get(timeout=0.5) if block else cmd_q.get_nowait())
        while True:
            out.append(cmd_q.get_nowait())
    except queue.Empty:
        pass
    return out


# a collective that failed: a peer is gone or the group is broken, whatever the request
COMM_FAILURES = (PeerError, dist.DistError)


def _comm_failure(e: BaseException) -> bool:
    return isinstance(e, COMM_FAILURES) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("Connection closed", "Connection reset", "[gloo", "Gloo",
                              "shared-memory")))


def run_step(runner: Runner, sched: Scheduler,
             plan: StepPlan) -> tuple[list[tuple], list[tuple], list[tuple[int, str]]]:
    """Run ``plan`` and advance the scheduler. Returns the token events ``(seq id, token, finish
    reason, logprobs)``, the prompt log-probabilities ``(seq id, entries)`` and the requests
    that failed ``(seq id, message)``. A step that raises
    (on every rank alike) fails its only sequence, or isolates its sequences
    (:meth:`Scheduler.fail_step`); the traceback goes to stderr, its last line to the request."""
    try:
        res = runner.execute(plan)
    except Exception as e:  # noqa: BLE001 - one request's failure, not the engine's...
        if _comm_failure(e) or runner.ep > 1:
            raise  # ...unless a peer died or the group broke (or EP groups wait): fatal
        trace = traceback.format_exc()
        failed = sched.fail_step(plan)
        print(f"shardwise engine: a step of {len(plan.chunks)} sequence(s) raised; "
              f"{'failing request ' + str(failed[0].id) if failed else 'retrying them one by one'}"
              f":\n{trace}", file=sys.stderr, flush=True)
        last = trace.strip().splitlines()[-1]
        return [], [], [(s.id, f"the engine failed on this request: {last}") for s in failed]
    prompt = sched.prompt_logprobs(plan, res.prompt)  # before update() ends sequences
    return [(seq.id, tok, reason, res.logprobs.get(seq.id))
            for seq, tok, reason in sched.update(plan, res.sampled)], prompt, []


def _add(req: Request, sched: Scheduler, grammars: Grammars, *, vocab: int,
         context: int) -> str | None:
    """Queue a submission's sequences (leader and followers); or why it cannot run."""
    seqs = [Sequence(sid, list(req.prompt), spec, req.max_tokens, frozenset(req.eos_ids))
            for sid, spec in zip(req.ids, req.specs)]
    if not seqs:
        return "a submission without sequences"
    seqs[0].followers = seqs[1:]
    why = admission_error(seqs[0], vocab=vocab, context=context, num_blocks=sched.alloc.num_blocks,
                          block_size=sched.block_size, max_seqs=sched.max_seqs,
                          need=sched.blocks_needed(len(req.prompt) + req.max_tokens))
    if why is None and req.grammar is not None:
        try:
            seqs[0].grammar = grammars.constraint(req.grammar)
            for s in seqs[1:]:
                s.grammar = seqs[0].grammar.copy()
        except ValueError as e:  # GrammarError, or a tokenizer llguidance cannot read
            why = f"the grammar cannot be used: {e}"
    if why is None:
        sched.add(seqs[0])
    return why


def _lead(runner: Runner, sched: Scheduler, grammars: Grammars, group, cmd_q, evt_q,
          profile: bool, context: int, parent: int) -> None:
    """Rank 0: take commands, schedule, broadcast, run, report; stop when ``parent`` (the
    process that launched this one) is gone."""
    stopping, dev = False, runner.cache.device
    groups = Groups(runner.ep) if runner.ep > 1 else None
    while True:
        cmds = _drain(cmd_q, block=not sched.has_work())
        for cmd in cmds:
            if cmd[0] == "add":
                why = _add(cmd[1], sched, grammars, vocab=runner.vocab, context=context)
                for sid in cmd[1].ids if why else ():
                    evt_q.put(("fail", sid, 400, why))
            elif cmd[0] == "cancel":
                sched.cancel(cmd[1])
            elif cmd[0] == "stop":
                stopping = True
        if cmds:
            evt_q.put(("stats", _stats(sched)))
        if (stopping and not sched.has_work()) or os.getppid() != parent:
            if group is not None:
                wire.broadcast(StepPlan(stop=True), group, dev)
            return
        if not sched.has_work():
            continue
        plan = sched.schedule()
        if not plan.chunks:
            time.sleep(0.005)
            continue
        if groups is not None:
            groups.assign(plan)
        t0 = time.perf_counter()
        with Ledger() if profile else _NoLedger() as ledger:
            if group is not None:
                wire.broadcast(plan, group, dev)
            events, prompt, failed = run_step(runner, sched, plan)
        step_s = time.perf_counter() - t0
        for sid, why in failed:
            evt_q.put(("fail", sid, 500, why))
        stats = _stats(sched)
        stats.update(step_s=step_s, step_tokens=sum(len(c.tokens) for c in plan.chunks),
                     step_seqs=len(plan.chunks), comm_s=ledger.seconds,
                     collectives=ledger.counts() if profile else {})
        evt_q.put(("step", events, prompt, stats))


class _NoLedger:
    seconds = 0.0

    def __enter__(self) -> "_NoLedger":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _stats(sched: Scheduler) -> dict[str, Any]:
    return {"waiting": len(sched.waiting), "running": len(sched.running),
            "blocks_used": sched.alloc.num_used, "blocks_free": sched.alloc.num_free,
            "blocks_cached": sched.alloc.num_cached, "preemptions": sched.preemptions,
            "prefix_hit_tokens": sched.hit_tokens, "prefix_query_tokens": sched.query_tokens,
            "prefill_tokens": sched.prefill_tokens, "evictions": sched.alloc.evictions}


def _follow(runner: Runner, group) -> None:
    """Ranks > 0: run whatever rank 0 broadcasts until it says stop."""
    while True:
        plan = wire.broadcast(None, group, runner.cache.device)
        if plan.stop:
            return
        try:
            runner.execute(plan)
        except Exception as e:  # noqa: BLE001 - rank 0 raised alike and decides what fails
            if _comm_failure(e) or runner.ep > 1:
                raise


def worker_main(rank: int, cfg: EngineConfig, port: int, cmd_q, evt_q,
                server: int | None = None) -> None:
    """Entry point of TP worker ``rank``, a process the server (pid ``server``) spawned: it gets
    torchrun's environment from here, then runs :func:`run_rank`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cfg.world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(cfg.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ..affinity import pin
    pin(rank, cfg.world)  # before loading: the weights land in this rank's NUMA node
    run_rank(cfg, cmd_q, evt_q, parent=server)


def run_rank(cfg: EngineConfig, cmd_q, evt_q, *, parent: int | None = None) -> None:
    """One TP rank of the engine, on the ranks of the launcher's environment (a spawned worker or
    a torchrun process). Rank 0 serves ``cmd_q`` / ``evt_q``; the other ranks follow it (their
    queues are unused: ``None`` under torchrun, where a failure is this process's exit).
    ``parent``: the process whose exit ends this one (default: this one's parent *now*; a
    spawned worker is told the server's pid, since loading can outlast a killed server, and a
    parent read after that would be init's)."""
    parent = os.getppid() if parent is None else parent
    from .. import failure
    from ..checkpoint.source import build_model, load_tokenizer, resolve
    from ..mesh import Mesh, launch_env, pick_dtype
    from ..models.moe import ExpertParallel
    rank = launch_env().rank
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if evt_q is not None:  # every rank reports its phase and its error to the server
        failure.install(rank, evt_q.put)
    try:
        with torch.inference_mode(), failure.phase("start"):
            t0 = time.perf_counter()
            mesh = Mesh.init(tp=cfg.tp, ep=cfg.ep, device=cfg.device, timeout_s=7 * 86400.0)
            source = resolve(cfg.model, dense=cfg.quant is None)
            model = build_model(source, group=mesh.tp_group, device=mesh.device,
                                dtype=pick_dtype(cfg.dtype, mesh.device, quantized=bool(
                                    cfg.quant or source.quant)), quant=cfg.quant,
                                experts=ExpertParallel(mesh.ep_group, cfg.expert_tp)).eval()
            context = source.config.max_position_embeddings
            with failure.phase("allocate KV cache"):
                cache = PagedKVCache(model, cfg.num_blocks(context), cfg.block_size)
            runner = Runner(model, mesh.tp_group, cache,
                            options=StepOptions(compile=cfg.compile, max_seqs=cfg.max_seqs,
                                                cuda_graphs=cfg.cuda_graphs),
                            ep=cfg.ep, ep_rank=mesh.ep_rank, ep_group=mesh.ep_group,
                            tp_rank=mesh.tp_rank)
            plans = mesh.tp_group if cfg.ep == 1 else dist.group.WORLD  # who gets the plans
            t1 = time.perf_counter()
            if rank == 0 and cfg.compile:
                print(f"shardwise serve: compiling the decode step for batch buckets "
                      f"{runner.step.buckets} (cached on disk for the next start; --no-compile "
                      "skips)", file=sys.stderr, flush=True)
            with failure.phase("compile decode steps"):
                runner.step.warmup()
            compile_s = time.perf_counter() - t1
            pids = _pids(mesh.tp_group)
            if rank != 0:
                with failure.phase("serve"):
                    _follow(runner, plans)
                return
            sched = Scheduler(cache.num_blocks, cfg.block_size, max_seqs=cfg.max_seqs,
                              max_batched_tokens=cfg.max_batched_tokens,
                              prefix_caching=cfg.prefix_caching, window=cache.window,
                              long_after=cache.long_after)
            capacity = context if sched.blocks_needed(context) <= cache.num_blocks \
                else cache.num_blocks * cfg.block_size  # tokens one sequence can reach
            grammars = Grammars(lambda: load_tokenizer(source), vocab=runner.vocab,
                                eos_ids=source.config.eos_ids)
            if source.tokenizer is not None:
                grammars.warm()
            evt_q.put(("ready", {"num_blocks": cache.num_blocks, "block_size": cfg.block_size,
                                 "capacity": capacity,
                                 "context": context, "kv_mib": cache.bytes / 2**20,
                                 "load_s": t1 - t0, "compile_s": compile_s,
                                 "graphs": runner.step.graph_count, "device": str(mesh.device),
                                 "dtype": str(cache.dtype).removeprefix("torch."),
                                 "pids": pids}))
            with failure.phase("serve"):
                _lead(runner, sched, grammars, plans, cmd_q, evt_q, cfg.profile, context,
                      parent)
    except BaseException as exc:  # noqa: BLE001 - reported to the server (once); die non-zero
        failure.report(exc)
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def _pids(group) -> list[int]:
    """The process ids of the TP ranks, in rank order (every rank calls this: a collective)."""
    if group is None:
        return [os.getpid()]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, os.getpid(), group=group)
    return out
