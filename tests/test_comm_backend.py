"""The shared-memory collectives against gloo's, and what happens when a peer dies."""
import glob
import os
import signal

import pytest
import torch
import torch.distributed as dist


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64]


def _data(rank, dtype, shape):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(shape, generator=g) * 10
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)


def collectives_worker(tp, shapes, capacity):
    from shardwise import comm, kernels
    ranks = list(range(tp))
    gloo = dist.new_group(ranks)  # every rank of the world calls new_group
    comm.use_torch_distributed(gloo)
    kernels.load()  # the third group's sums run in C++ (shardwise::shm_all_reduce)
    shm, native = dist.new_group(ranks), dist.new_group(ranks)
    if dist.get_rank() < tp:  # both set up with the small capacity
        comm.configure(capacity=capacity, native=False)
        comm.prepare(shm)
        comm.configure(native=True)
        comm.prepare(native)
    comm.configure(capacity=8 << 20)
    if dist.get_rank() >= tp:
        return None
    out = []
    for dtype in DTYPES:
        for shape in shapes:
            x = _data(dist.get_rank(), dtype, shape)
            row = {}
            for name, g in (("gloo", gloo), ("shm", shm), ("native", native)):
                s = comm.all_reduce(x, g)
                m = comm.all_reduce_(x.clone(), g, op="max")
                ag = comm.all_gather_last(x, g)
                rs = comm.reduce_scatter_dim(x.reshape(tp, -1) if x.numel() % tp == 0
                                             else x.reshape(1, -1).repeat(tp, 1), g, dim=0)
                row[name] = (s, m, ag, rs)
            row["backends"] = (comm.backend_name(gloo), comm.backend_name(shm),
                               comm.native_all_reduce(shm), comm.native_all_reduce(native))
            out.append((str(dtype), shape, row))
    # what a traced step holds: the C++ operator for the native group, the Python one otherwise
    x, ops = _data(dist.get_rank(), torch.float32, (5,)), {}
    for name, g in (("shm", shm), ("native", native)):
        def backend(gm, inputs, name=name):
            ops[name] = sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        got = torch.compile(lambda x, g=g: comm.all_reduce(x, g) * 2, backend=backend,
                            fullgraph=True)(x)
        assert torch.equal(got, comm.all_reduce(x, g) * 2)
    out.append(ops)
    return out


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_every_collective_equals_gloo(pool, tp):
    # odd sizes; a 4 KiB capacity forces pieces; 3 x 3001 in 8 bytes is over SMALL (two phases)
    shapes = [(1,), (7,), (3, 1001), (3, 3001)]
    results = [r for r in pool.run(collectives_worker, tp, shapes, 4096) if r]
    for ops in [r.pop() for r in results]:
        assert "shardwise.shm_all_reduce" in ops["native"], ops
        assert "shardwise.all_reduce" in ops["shm"], ops
    for per_rank in zip(*results):  # one case, as every rank saw it
        for dtype, shape, row in per_rank:
            assert row["backends"] == ("gloo", "shm", False, True)
            # the C++ sums run shm.py's protocol and summation order: the same bits
            for got, ref in zip(row["native"], row["shm"]):
                assert torch.equal(got, ref), (dtype, shape)
            exact = dtype == "torch.int64" or tp == 2  # a + b == b + a; longer sums reassociate
            for got, ref in zip(row["shm"], row["gloo"]):
                if exact:
                    assert torch.equal(got, ref), (dtype, shape)
                else:
                    torch.testing.assert_close(got, ref, atol=0.25 if "bfloat" in dtype else 1e-5,
                                               rtol=2e-2 if "bfloat" in dtype else 1e-6)  # 2 ulps of bf16
        # bit-identical across ranks: every rank's all-reduce results are the same bits
        first = per_rank[0][2]["shm"]
        for other in per_rank[1:]:
            assert torch.equal(other[2]["shm"][0], first[0])
            assert torch.equal(other[2]["shm"][1], first[1])
            assert torch.equal(other[2]["shm"][2], first[2])


def dying_rank(rank, port, path, native):
    """One of two ranks, started without the launcher: its policy (every rank killed 0.3 s after
    one dies, test_failures.py) would race rank 0's own detection on a loaded machine. Rank 1
    dies mid-collective; rank 0 writes how long it took to notice, and what it said."""
    from shardwise import comm, kernels
    from shardwise.launch import _setup
    from shardwise.shm import PeerError
    _setup(rank, 2, port, 1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group, x = dist.new_group([0, 1]), torch.ones(10)
    if native:
        kernels.load()
    comm.all_reduce_(x, group)  # sets up the segment, works
    assert comm.native_all_reduce(group) == native
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    import time
    start = time.monotonic()
    try:
        comm.all_reduce_(x, group)
        msg = "no error"
    except PeerError as e:
        msg = str(e)
    with open(path, "w") as f:
        f.write(f"{time.monotonic() - start:.3f}\n{msg}")
    os._exit(0)  # no process-group teardown with a dead peer


@pytest.mark.parametrize("native", [False, True], ids=["python", "c++"])
def test_dead_peer_fails_fast_and_leaks_nothing(tmp_path, native):
    from shardwise.launch import context, free_port
    before = set(glob.glob("/dev/shm/shardwise-*"))
    path, port, ctx = tmp_path / "rank0.txt", free_port(), context()
    ranks = [ctx.Process(target=dying_rank, args=(r, port, str(path), native)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    alive = [r for r, p in enumerate(ranks) if p.is_alive()]
    for p in ranks:
        p.kill()
    assert not alive, f"rank(s) {alive} still running after 120 s"
    assert (ranks[0].exitcode, ranks[1].exitcode) == (0, -signal.SIGKILL)
    waited, msg = path.read_text().split("\n", 1)
    assert "rank(s) [1]" in msg and "died mid-collective" in msg, msg
    assert float(waited) < 10
    assert set(glob.glob("/dev/shm/shardwise-*")) == before
