import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# inductor's C++ wrapper (the CPU default of StepOptions) costs 10-20 s more per compiled graph;
# the suite compiles dozens of graphs, so it runs without, save test_compiled_equals_eager[1]
os.environ.setdefault("SHARDWISE_CPP_WRAPPER", "0")


@pytest.fixture(scope="module")
def pool():
    """Four long-lived gloo workers for the module; tests run tp in {1,2,3,4} on subgroups."""
    from shardwise.launch import WorkerPool
    with WorkerPool(4, timeout_s=300) as p:
        yield p
