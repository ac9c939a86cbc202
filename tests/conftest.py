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


# `make test` runs two pytest-xdist workers, a file to a worker, files in collection order
# (--no-loadscope-reorder). The longest files start first, so that none starts late and runs
# alone at the end: this tuple is ordered by their cold seconds on this 2-core VM (CI from a
# fresh clone, 2026-12-03); files not named follow in their usual order. Scheduling only: no
# test depends on where or when it runs.
LONGEST_FIRST = (
    "test_serve.py", "test_compiled_step.py", "test_real_model.py", "test_serve_faults.py",
    "test_gguf.py", "test_serve_prefix.py", "test_serve_openai.py", "test_train.py",
    "test_families.py", "test_failures.py", "test_torchrun_entry.py", "test_model.py",
    "test_sampling.py", "test_train_zero.py", "test_core.py", "test_serve_hardening.py",
    "test_comm_backend.py", "test_convert_cli.py", "test_bench.py", "test_quant_ckpt.py",
)


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: within a file
