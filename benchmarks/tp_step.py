"""Training and decode step: shardwise tp=2 vs PyTorch tensor parallelism vs one process.

    python benchmarks/tp_step.py [--rounds 3 --train-steps 4 --decode-steps 10]

Same as ``shardwise bench step``; prints a table and writes benchmarks/tp_step.json and
benchmarks/tp_step.png. See ``shardwise/bench/step.py`` for what each contender runs.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shardwise.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_step")
    sys.exit(main(["step", "--out", out] + sys.argv[1:]))
