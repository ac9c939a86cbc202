"""``python -m shardwise.planner --model llama-2-70b --gpus 8 --gpu a100 --workload serve``: the
same as ``shardwise plan ...``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as shardwise
    return shardwise(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
