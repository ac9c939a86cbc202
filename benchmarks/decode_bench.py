"""Batch-1 decode and 128-token prefill beside llama.cpp (``shardwise bench decode``).

    python benchmarks/llama_cpp.py            # once: build llama.cpp (cached outside the repo)
    python benchmarks/decode_bench.py --rounds 3 --json benchmarks/decode.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardwise.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
