"""``shardwise serve`` and ``shardwise bench serve``: arguments and entry points."""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from ..usage import (add_device_arguments, check_device, float_range, int_range, port, require,
                     seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shardwise serve``."""
    parser.add_argument("--model", required=True,
                        help="preset (smollm2-135m, debug, ...), HF checkpoint dir or .gguf file")
    parser.add_argument("--tp", type=int_range(1), default=1,
                        help="tensor-parallel ranks (processes spawned here; under torchrun its "
                             "processes, rank 0 hosting HTTP)")
    parser.add_argument("--ep", type=int_range(1), default=1,
                        help="mixture of experts: TP groups side by side that split the experts "
                             "and serve different sequences (tp x ep processes; default 1)")
    parser.add_argument("--expert-tp", type=int_range(1), default=None,
                        help="mixture of experts: ranks each expert spans inside its TP group "
                             "(default tp; 1: whole experts, expert parallelism within TP)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $SHARDWISE_API_KEY; none when unset)")
    parser.add_argument("--kv-tokens", type=int_range(1), default=None,
                        help="KV cache size in tokens per rank (default: the context)")
    parser.add_argument("--block-size", type=int_range(1), default=16,
                        help="tokens per KV block")
    parser.add_argument("--max-seqs", type=int_range(1), default=32,
                        help="most requests in a step")
    parser.add_argument("--max-batched-tokens", type=int_range(1), default=256,
                        help="token budget of one step (prefill chunks fill what decodes leave)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="prefill every prompt in full (default: reuse the KV of full blocks "
                             "that earlier prompts computed)")
    parser.add_argument("--max-queue", type=int_range(0), default=128,
                        help="requests that may wait beyond --max-seqs; more get 429")
    parser.add_argument("--max-prompt-tokens", type=int_range(1), default=None,
                        help="longest prompt accepted, in tokens (default: the context - 1)")
    from ..quant.config import add_arguments as quant_arguments
    quant_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--threads", type=int_range(1), default=None,
                        help="torch threads per rank (default max(1, cores // tp))")
    parser.add_argument("--drain-timeout", type=float_range(0.0), default=120.0,
                        help="seconds SIGTERM waits for in-flight requests")
    parser.add_argument("--profile", action="store_true",
                        help="time collectives in every step (engine step metrics)")
    parser.add_argument("--no-compile", action="store_true",
                        help="run decode steps eager instead of as compiled graphs")


def engine_config(args: argparse.Namespace):
    from ..quant.config import from_args
    from .engine import EngineConfig
    return EngineConfig(model=args.model, tp=args.tp, ep=args.ep, expert_tp=args.expert_tp,
                        kv_tokens=args.kv_tokens,
                        block_size=args.block_size, max_seqs=args.max_seqs,
                        max_batched_tokens=args.max_batched_tokens, dtype=args.dtype,
                        threads=args.threads, profile=args.profile,
                        prefix_caching=args.prefix_cache, quant=from_args(args),
                        compile=not args.no_compile,
                        device=args.device, cuda_graphs=not args.no_cuda_graphs)


def check_experts(cfg, tp: int, ep: int, expert_tp: int | None) -> None:
    """``--ep`` / ``--expert-tp`` against the model: a dense model has no experts to place, and
    every expert slot needs an expert (raises ValueError with the numbers)."""
    if (ep > 1 or expert_tp is not None) and not cfg.num_experts:
        raise ValueError(f"--ep/--expert-tp place the experts of a mixture of experts, but "
                         f"{cfg.model_type!r} has none")
    if cfg.num_experts:
        from ..models.moe import ExpertLayout
        ExpertLayout(cfg.num_experts, cfg.expert_width, tp, ep, expert_tp)


def _check_listen(host: str, port_: int) -> None:
    """Bind the address once, so that a port in use fails now and not after the model loaded."""
    try:
        infos = socket.getaddrinfo(host, port_, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port_}: {e.strerror}; choose another "
                             "--port or --host") from None


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(i[4][0]).is_loopback
                   for i in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def check(args: argparse.Namespace) -> None:
    """Every check before a worker starts: options, the model and its layout, the tokenizer,
    the extras, the address."""
    check_device(args)
    require("fastapi", what="shardwise serve")
    require("uvicorn", what="shardwise serve")
    require("llguidance", what="shardwise serve (structured output)")
    require("transformers", what="shardwise serve (the tokenizer)")
    from ..checkpoint.source import load_tokenizer, resolve
    from ..partition import HeadLayout
    from .guard import ServeLimits

    if args.api_key is None:
        args.api_key = os.environ.get("SHARDWISE_API_KEY")
    args.limits = ServeLimits(api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                              max_running=args.max_seqs, max_queue=args.max_queue)
    args.engine_config = engine_config(args)
    quant = args.engine_config.quant
    args.source = resolve(args.model, dense=quant is None)
    from ..checkpoint.source import quant_for
    quant_for(args.source, quant)
    cfg = args.source.config
    HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
    check_experts(cfg, args.tp, args.ep, args.expert_tp)
    args.tokenizer = load_tokenizer(args.source)
    from ..mesh import launch_env
    if launch_env().rank == 0:  # under torchrun the other ranks host nothing
        _check_listen(args.host, args.port)


def run(args: argparse.Namespace) -> int:
    """Start the TP workers and the HTTP server; returns the exit code (1 if a worker died).

    Under torchrun this process is one rank: rank 0 runs the engine in a thread and hosts HTTP,
    the others follow rank 0's steps until it stops them (:func:`follow`)."""
    import uvicorn

    from ..mesh import launch_env
    from .client import EngineClient, EngineDead
    from .server import ServerState, create_app

    if not hasattr(args, "limits"):
        check(args)
    env = launch_env()
    if env.launched and env.rank != 0:
        return follow(args.engine_config)
    source, tokenizer = args.source, args.tokenizer
    engine = EngineClient(args.engine_config, in_process=env.launched)
    try:
        info = engine.start()
    except EngineDead as e:
        print(f"shardwise serve: {e}", file=sys.stderr)
        return 1
    eos = sorted(set(source.config.eos_ids) | ({tokenizer.eos_token_id} - {None}))
    st = ServerState(name=source.name, engine=engine, tokenizer=tokenizer, eos_ids=eos,
                     context=info["context"], capacity=info["capacity"],
                     vocab=source.config.vocab_size, limits=args.limits)
    app = create_app(st)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=args.drain_timeout))
    st.server = server
    # uvicorn re-raises the signal that stopped it; after a drain we exit by our own code instead
    signal.signal(signal.SIGTERM, lambda *_: None)
    ranks = f"{args.tp} rank(s)" if args.ep == 1 else f"{args.tp} x ep {args.ep} ranks"
    print(f"shardwise serve: {source.name} on {ranks} ({info['device']}, "
          f"{info['dtype']}{', torchrun' if env.launched else ''}), KV cache "
          f"{info['num_blocks']} blocks x {info['block_size']} tokens "
          f"({info['kv_mib']:.0f} MiB/rank), loaded in {info['load_s']:.1f} s, "
          f"{info['graphs']} decode graphs ready in {info['compile_s']:.1f} s; "
          f"http://{args.host}:{args.port}/v1"
          + ("" if args.limits.api_key else " (no API key)"), file=sys.stderr, flush=True)
    if not args.limits.api_key and not _loopback(args.host):
        print(f"shardwise serve: listening on {args.host} without an API key: anyone who can "
              "reach this address can use the model (--api-key)", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started and st.exit_code == 0:
        return 1
    return st.exit_code


def follow(cfg) -> int:
    """A torchrun rank other than 0: run rank 0's steps until it says stop. Signals are rank 0's
    business (torchrun sends SIGTERM to every rank; rank 0 drains, then stops the others); a
    rank that fails ends the torchrun job with its error."""
    from .engine import run_rank
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    run_rank(cfg, None, None)
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``shardwise bench serve``."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", default="1,2,3", help="comma-separated tp degrees to serve with")
    p.add_argument("--requests", type=int_range(1), default=64)
    p.add_argument("--concurrency", type=int_range(1), default=16)
    p.add_argument("--prompt-min", type=int_range(1), default=20)
    p.add_argument("--prompt-max", type=int_range(1), default=200)
    p.add_argument("--out-min", type=int_range(1), default=16)
    p.add_argument("--out-max", type=int_range(1), default=128)
    p.add_argument("--repeats", type=int_range(1), default=1)
    p.add_argument("--baselines", default="llama-server,static,generate_batch",
                   help="comma-separated: llama-server, static, generate_batch (empty for none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights of shardwise and llama-server (transformers: fp32); with "
                        "--quant shardwise's activations")
    p.add_argument("--quant", choices=["int8", "int4"], default=None,
                   help="serve quantized: shardwise --quant on the file llama-server reads "
                        "(int4: the Q4_1 GGUF; int8: its Q8_0 re-quantization)")
    p.add_argument("--max-batched-tokens", type=int_range(1), default=256)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--timeout", type=float_range(0.0, strict=True), default=1800.0,
                   help="seconds per contender run")
    p.add_argument("--out", default=None, help="write a markdown report here")
    p.add_argument("--no-compile", action="store_true", help="serve with eager decode steps")


def check_bench(args: argparse.Namespace) -> None:
    """The options of ``bench serve``, before any server starts."""
    require("httpx", what="bench serve")
    require("transformers", what="bench serve (the baselines)")
    for lo, hi in (("prompt_min", "prompt_max"), ("out_min", "out_max")):
        if getattr(args, lo) > getattr(args, hi):
            raise ValueError(f"--{lo.replace('_', '-')}={getattr(args, lo)} exceeds "
                             f"--{hi.replace('_', '-')}={getattr(args, hi)}")
    try:
        tps = [int(t) for t in args.tp.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--tp {args.tp!r}: give comma-separated integers, e.g. 1,2") from None
    if not tps or min(tps) < 1:
        raise ValueError(f"--tp {args.tp!r}: give one or more degrees >= 1, e.g. 1,2")
    unknown = {b for b in args.baselines.split(",") if b} - {"llama-server", "static",
                                                             "generate_batch"}
    if unknown:
        raise ValueError(f"--baselines: unknown {', '.join(sorted(unknown))}; use "
                         "llama-server, static, generate_batch or nothing")
    from ..checkpoint.source import resolve
    from ..partition import HeadLayout
    cfg = resolve(args.model).config
    for t in tps:
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, t)
    args.bench_checked = True


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench as run_
    if not hasattr(args, "bench_checked"):
        check_bench(args)
    return run_(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m shardwise.serve ...``: the same as ``shardwise serve ...``."""
    from ..cli import main as shardwise
    return shardwise(["serve", *(sys.argv[1:] if argv is None else argv)])
