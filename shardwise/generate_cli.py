"""``shardwise generate --model MODEL --tp N --prompt TEXT ...``"""
from __future__ import annotations

import argparse
import json
import sys

from .sampling import SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (smollm2-135m, debug, ...), HF directory "
                   "or .gguf file")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (local processes)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-compile", action="store_true",
                   help="run the decode step eager instead of as a compiled graph")
    p.add_argument("--json", action="store_true",
                   help="stdout holds exactly one JSON object; everything else goes to stderr")


def run(args: argparse.Namespace) -> int:
    from .checkpoint.source import load_tokenizer, resolve
    from .generate import (GenerateJob, check_request, encode_prompt, format_signals, generate,
                           summarize)

    if args.tp < 1:
        raise ValueError(f"--tp {args.tp}: the number of ranks must be >= 1")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_tokens=args.max_new_tokens, stop=args.stop)
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template)
    check_request(source, args.tp, len(ids), args.max_new_tokens)
    job = GenerateJob(args.model, args.tp, ids, params, stream="stderr" if args.json else "stdout",
                      dtype=args.dtype, eos_ids=source.config.eos_ids,
                      compile=not args.no_compile)
    summary = summarize(generate(job))
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_signals(summary), file=sys.stderr)
    return 0
