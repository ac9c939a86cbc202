"""Serving load benchmark (``shardwise bench serve``): shardwise's server at several tp beside
transformers' static batches and ``generate_batch``. See ``shardwise.serve.bench``.

    python benchmarks/serve_bench.py --tp 1,2,3 --repeats 2 --out benchmarks/serve_results.md
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardwise.serve.cli import add_bench_arguments, run_bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    sys.exit(run_bench(parser.parse_args()))
