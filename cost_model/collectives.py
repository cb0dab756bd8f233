"""Collective costs, alpha-beta model (seconds, sympy expressions in the byte counts).

A message of n bytes over a link costs ``alpha + n / beta`` (latency alpha, s; bandwidth beta,
bytes/s per rank and direction; both from the profile's intra_node / inter_node links). G ranks,
R ranks per node (the profile's ranks_per_node unless given), nodes = ceil(G / R).

    all_to_all(n)            each rank sends n bytes in all, n/G to every rank (flat: G-1 messages;
                             the bytes that leave the node go over the network link, the rest over
                             the intra-node link, concurrently)
    all_to_all_hierarchical  intra-node all-to-all, then one inter-node all-to-all per node-pair
                             slice (aggregated messages: nodes-1 network latencies instead of G-R),
                             then an intra-node scatter; trades latency for one extra intra-node pass
    all_gather(n)            ring, each rank holds n bytes and receives (G-1) n
    reduce_scatter(n)        ring, each rank starts with n bytes and ends with n/G reduced
    sparse_all_gather        Hecate's SparseAllGather: per-chunk broadcasts from owners to the ranks
                             that need the chunk; a rank receives lambda * C chunks of c bytes
                             (lambda = fraction of the layer's C chunks that cross ranks), so the
                             volume is O(lambda * S) instead of all-gather's O(S)
    sparse_reduce_scatter    the reverse (same volume, the backward of sparse_all_gather)
"""
from __future__ import annotations

import math

import sympy

from moe_compiler.cost_model.profiles import HardwareProfile
from moe_compiler.cost_model.symbols import as_expr


def _topology(profile: HardwareProfile, ranks: int, ranks_per_node: int | None):
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    rpn = min(ranks, ranks_per_node or profile.ranks_per_node)
    return rpn, math.ceil(ranks / rpn)


def p2p(nbytes, bandwidth: float, latency: float, messages=1):
    """``messages`` messages carrying ``nbytes`` in all over one link."""
    return as_expr(messages) * latency + as_expr(nbytes) / bandwidth


def all_to_all(nbytes, ranks: int, profile: HardwareProfile, ranks_per_node: int | None = None):
    """Flat all-to-all: each rank sends ``nbytes`` in all (n/G to each rank, its own share stays)."""
    if ranks == 1:
        return sympy.Integer(0)
    n = as_expr(nbytes)
    rpn, nodes = _topology(profile, ranks, ranks_per_node)
    intra, inter = profile.intra_node, profile.inter_node
    t_intra = p2p(n * (rpn - 1) / ranks, intra.bandwidth, intra.latency, rpn - 1)
    if nodes == 1:
        return t_intra
    t_inter = p2p(n * (ranks - rpn) / ranks, inter.bandwidth, inter.latency, ranks - rpn)
    return sympy.Max(t_intra, t_inter)


def all_to_all_hierarchical(nbytes, ranks: int, profile: HardwareProfile, ranks_per_node: int | None = None):
    """Two-level all-to-all (Tutel / DeepEP style): intra-node shuffle, inter-node exchange, intra scatter."""
    if ranks == 1:
        return sympy.Integer(0)
    n = as_expr(nbytes)
    rpn, nodes = _topology(profile, ranks, ranks_per_node)
    if nodes == 1:
        return all_to_all(n, ranks, profile, ranks_per_node)
    intra, inter = profile.intra_node, profile.inter_node
    shuffle = p2p(n * (rpn - 1) / rpn, intra.bandwidth, intra.latency, rpn - 1)
    exchange = p2p(n * (nodes - 1) / nodes, inter.bandwidth, inter.latency, nodes - 1)
    return 2 * shuffle + exchange


def all_gather(shard_bytes, ranks: int, profile: HardwareProfile, ranks_per_node: int | None = None):
    """Ring all-gather of one ``shard_bytes`` shard per rank (slowest link sets the pace)."""
    if ranks == 1:
        return sympy.Integer(0)
    rpn, nodes = _topology(profile, ranks, ranks_per_node)
    link = profile.inter_node if nodes > 1 else profile.intra_node
    return p2p(as_expr(shard_bytes) * (ranks - 1), link.bandwidth, link.latency, ranks - 1)


def reduce_scatter(nbytes, ranks: int, profile: HardwareProfile, ranks_per_node: int | None = None):
    """Ring reduce-scatter of ``nbytes`` per rank (each ends with nbytes / G reduced)."""
    return all_gather(as_expr(nbytes) / ranks, ranks, profile, ranks_per_node)


def sparse_all_gather(chunk_bytes: float, chunks: int, crossing_fraction, ranks: int, profile: HardwareProfile,
                      ranks_per_node: int | None = None, hierarchical: bool = False):
    """Hecate SparseAllGather: a rank receives ``crossing_fraction * chunks`` chunks from their owners.

    Flat: every needed chunk comes over the link to its owner (network for the share of owners on
    other nodes). Hierarchical: each remote chunk crosses the network once per node and is shared
    inside the node over the intra-node link (the network share is divided by the ranks of a node
    that need it, at most ranks_per_node).
    """
    if ranks == 1:
        return sympy.Integer(0)
    lam = as_expr(crossing_fraction)
    rpn, nodes = _topology(profile, ranks, ranks_per_node)
    intra, inter = profile.intra_node, profile.inter_node
    got = lam * chunks                                  # chunks received by one rank
    local_share = sympy.Rational(rpn - 1, ranks - 1)    # owners inside this node
    # one message per sending peer (the chunks of one owner travel together: one all_to_all_single
    # with splits on CPU/gloo, grouped sends on NCCL), at most one per chunk
    t_intra = p2p(got * local_share * chunk_bytes, intra.bandwidth, intra.latency,
                  sympy.Min(got * local_share, rpn - 1))
    if nodes == 1:
        return t_intra
    remote = got * (1 - local_share)
    if hierarchical:
        t_inter = p2p(remote * chunk_bytes / rpn, inter.bandwidth, inter.latency,
                      sympy.Min(remote / rpn, nodes - 1))
        t_share = p2p(remote * chunk_bytes, intra.bandwidth, intra.latency, sympy.Min(remote, rpn - 1))
        return sympy.Max(t_intra, t_inter) + t_share
    t_inter = p2p(remote * chunk_bytes, inter.bandwidth, inter.latency, sympy.Min(remote, ranks - rpn))
    return sympy.Max(t_intra, t_inter)


def sparse_reduce_scatter(chunk_bytes: float, chunks: int, crossing_fraction, ranks: int,
                          profile: HardwareProfile, ranks_per_node: int | None = None, hierarchical: bool = False):
    """Hecate SparseReduceScatter: the reverse of sparse_all_gather (same volume and messages)."""
    return sparse_all_gather(chunk_bytes, chunks, crossing_fraction, ranks, profile, ranks_per_node, hierarchical)
