"""Seconds of a collective over one group: the alpha-beta model with nccl-tests' bus bandwidth.

Ring algorithms, S bytes, n ranks, link latency alpha and bus bandwidth B (``gpus.Link``):

    all-reduce                    alpha + 2 (n-1)/n x S / B
    all-gather, reduce-scatter    alpha + (n-1)/n x S / B        (S = the full gathered buffer)
    point-to-point send           alpha + S / B
    all-to-all                    alpha + (n-1)/n x S / B        (S = one rank's send buffer; across
                                                                  nodes B is one NIC, not a ring)
"""
from __future__ import annotations

from .gpus import Link


def allreduce_s(nbytes: float, n: int, link: Link) -> float:
    return 0.0 if n <= 1 else link.alpha_s + 2 * (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


def gather_s(nbytes: float, n: int, link: Link) -> float:
    """All-gather or reduce-scatter of a full buffer of ``nbytes``."""
    return 0.0 if n <= 1 else link.alpha_s + (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


def p2p_s(nbytes: float, link: Link) -> float:
    return link.alpha_s + nbytes / (link.busbw_GBps * 1e9)


def alltoall_s(nbytes: float, n: int, link: Link) -> float:
    """All-to-all of a rank's ``nbytes`` (its whole send buffer): (n-1)/n of it leaves the rank."""
    return 0.0 if n <= 1 else link.alpha_s + (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)
