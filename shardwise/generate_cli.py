"""``shardwise generate --model MODEL --tp N --prompt TEXT ...``"""
from __future__ import annotations

import argparse
import json
import sys

from .sampling import SamplingParams
from .usage import add_device_arguments, check_device, float_range, int_range, require, seed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (smollm2-135m, debug, ...), HF directory "
                   "or .gguf file")
    p.add_argument("--tp", type=int_range(1), default=1,
                   help="tensor-parallel ranks (local processes; under torchrun its processes)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int_range(1), default=64)
    p.add_argument("--temperature", type=float_range(0.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int_range(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=float_range(0.0, high=1.0, strict=True), default=1.0)
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat-template", action="store_true")
    from .quant.config import add_arguments as quant_arguments
    quant_arguments(p)
    add_device_arguments(p)
    p.add_argument("--no-compile", action="store_true",
                   help="run the decode step eager instead of as a compiled graph")
    p.add_argument("--json", action="store_true",
                   help="stdout holds exactly one JSON object; everything else goes to stderr")


def check(args: argparse.Namespace) -> None:
    """Everything before a worker starts: the model, its tokenizer, the layout, the lengths."""
    from .checkpoint.source import resolve
    from .generate import check_request, encode_prompt

    check_device(args)  # first: cheap, and nothing else matters on a device that is not there
    args.params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed,
                                 max_tokens=args.max_new_tokens, stop=args.stop)
    from .quant.config import from_args
    args.quant_config = from_args(args)
    args.source = resolve(args.model, dense=args.quant_config is None)
    from .checkpoint.source import quant_for
    quant_for(args.source, args.quant_config)
    require("transformers", what="generate (the tokenizer)")
    from .checkpoint.source import load_tokenizer
    tokenizer = load_tokenizer(args.source)
    args.ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat_template)
    check_request(args.source, args.tp, len(args.ids), args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    from .generate import GenerateJob, format_signals, generate, summarize
    from .mesh import launch_env

    if not hasattr(args, "ids"):
        check(args)
    job = GenerateJob(args.model, args.tp, args.ids, args.params,
                      stream="stderr" if args.json else "stdout", dtype=args.dtype,
                      eos_ids=args.source.config.eos_ids, quant=args.quant_config,
                      compile=not args.no_compile, device=args.device,
                      cuda_graphs=not args.no_cuda_graphs)
    summary = summarize(generate(job))
    if launch_env().rank != 0:  # under torchrun: rank 0 speaks for every rank
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_signals(summary), file=sys.stderr)
    return 0
