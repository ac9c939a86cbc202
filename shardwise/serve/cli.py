"""``shardwise serve`` and ``shardwise bench serve``: arguments and entry points."""
from __future__ import annotations

import argparse
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shardwise serve``."""
    parser.add_argument("--model", required=True,
                        help="preset (smollm2-135m, debug, ...), HF checkpoint dir or .gguf file")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="KV cache size in tokens per rank (default: the context)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-seqs", type=int, default=32, help="most requests in a step")
    parser.add_argument("--max-batched-tokens", type=int, default=256,
                        help="token budget of one step (prefill chunks fill what decodes leave)")
    parser.add_argument("--max-queue", type=int, default=128,
                        help="requests that may wait beyond --max-seqs; more get 429")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default max(1, cores // tp))")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds SIGTERM waits for in-flight requests")
    parser.add_argument("--profile", action="store_true",
                        help="time collectives in every step (engine step metrics)")
    parser.add_argument("--no-compile", action="store_true",
                        help="run decode steps eager instead of as compiled graphs")


def engine_config(args: argparse.Namespace):
    from .engine import EngineConfig
    return EngineConfig(model=args.model, tp=args.tp, kv_tokens=args.kv_tokens,
                        block_size=args.block_size, max_seqs=args.max_seqs,
                        max_batched_tokens=args.max_batched_tokens, dtype=args.dtype,
                        threads=args.threads, profile=args.profile,
                        compile=not args.no_compile)


def run(args: argparse.Namespace) -> int:
    """Start the TP workers and the HTTP server; returns the exit code (1 if a worker died)."""
    import uvicorn

    from ..checkpoint.source import load_tokenizer, resolve
    from .client import EngineClient, EngineDead
    from .server import ServerState, create_app

    if args.tp < 1:
        print(f"shardwise serve: --tp={args.tp} must be >= 1", file=sys.stderr)
        return 2
    try:
        source = resolve(args.model)
        tokenizer = load_tokenizer(source)
        from ..partition import HeadLayout
        cfg = source.config
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
    except (ValueError, FileNotFoundError) as e:
        print(f"shardwise serve: {e}", file=sys.stderr)
        return 2
    engine = EngineClient(engine_config(args))
    try:
        info = engine.start()
    except EngineDead as e:
        print(f"shardwise serve: {e}", file=sys.stderr)
        return 1
    eos = sorted(set(cfg.eos_ids) | ({tokenizer.eos_token_id} - {None}))
    st = ServerState(name=source.name, engine=engine, tokenizer=tokenizer, eos_ids=eos,
                     context=info["context"], capacity=info["num_blocks"] * info["block_size"],
                     max_in_flight=args.max_seqs + args.max_queue)
    app = create_app(st)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=args.drain_timeout))
    st.server = server
    # uvicorn re-raises the signal that stopped it; after a drain we exit by our own code instead
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"shardwise serve: {source.name} on {args.tp} rank(s), KV cache "
          f"{info['num_blocks']} blocks x {info['block_size']} tokens "
          f"({info['kv_mib']:.0f} MiB/rank), loaded in {info['load_s']:.1f} s, "
          f"{info['graphs']} decode graphs ready in {info['compile_s']:.1f} s; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started and st.exit_code == 0:
        return 1
    return st.exit_code


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shardwise bench serve``."""
    from .bench import add_bench_arguments as add
    add(parser)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench as run_
    return run_(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardwise.serve",
                                     description="OpenAI-compatible tensor-parallel server")
    add_arguments(parser)
    return run(parser.parse_args(argv))
