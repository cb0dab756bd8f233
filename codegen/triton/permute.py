"""Dropless block alignment of routed tokens (vLLM ``moe_align_block_size`` semantics).

    topk_ids [T, k] (int32 | int64, values in [0, E))
        -> sorted_token_ids [P] int32, expert_ids [P // BLOCK_M] int32,
           num_tokens_post_padded [1] int32

with ``P = round_up(T*k + min(E, T*k) * (BLOCK_M - 1), BLOCK_M)`` (a bound known on the host, so
no host synchronisation).  ``sorted_token_ids`` lists the flat slot indices ``i = t*k + j`` grouped
by expert (expert 0 first), ascending within an expert (deterministic, unlike vLLM's atomics);
each expert's segment is padded to a multiple of BLOCK_M with the sentinel ``T*k``; experts
without tokens take no block.  ``expert_ids[b]`` is the expert of block ``b`` (rows
``b*BLOCK_M .. b*BLOCK_M+BLOCK_M-1``), ``-1`` for blocks at or past ``num_tokens_post_padded``.
Entries of ``sorted_token_ids`` at or past ``num_tokens_post_padded`` are the sentinel.

Precondition (not checked: it would need a host synchronisation): every id is in ``[0, E)``.
An id outside that range is dropped and its slot is never listed.

Three kernels, all deterministic:
  1. ``align_count_kernel``  grid (n_tiles,): per-tile expert histogram   -> counts [n_tiles, E]
  2. ``align_scan_kernel``   grid (1,):  per-expert padded segment starts, per-tile write offsets
                             -> tile_offsets [n_tiles, E], expert_ids, num_tokens_post_padded
  3. ``align_scatter_kernel`` grid (n_tiles,): rank inside the tile (cumsum of a one-hot)
                             -> sorted_token_ids
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, launchable, next_pow2

__all__ = [
    "MoEAlignment", "moe_align_block_size", "moe_align_block_size_reference",
    "align_count_kernel", "align_scan_kernel", "align_scatter_kernel", "max_padded_tokens",
]


class MoEAlignment(NamedTuple):
    sorted_token_ids: torch.Tensor  # [P] int32, flat slot ids t*k+j, sentinel num_valid_tokens
    expert_ids: torch.Tensor  # [P // block_m] int32, -1 past the used blocks
    num_tokens_post_padded: torch.Tensor  # [1] int32 (on device)
    block_m: int
    top_k: int
    num_valid_tokens: int  # T * k (also the sentinel)


def max_padded_tokens(numel: int, num_experts: int, block_m: int) -> int:
    """Host-side bound P on the padded length (a multiple of block_m)."""
    p = numel + min(num_experts, numel) * (block_m - 1)
    return cdiv(p, block_m) * block_m


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def align_count_kernel(
    # pointers
    topk_ids_ptr,  # [numel] int32/int64 (flat, contiguous)
    counts_ptr,  # [n_tiles, E] int32 (out)
    # sizes
    numel,
    # meta-parameters
    E: tl.constexpr,
    BLOCK: tl.constexpr,  # slots per tile
    BLOCK_E: tl.constexpr,  # next_pow2(E)
):
    """counts[tile, e] = #{i in tile : topk_ids[i] == e}.  Grid: (n_tiles,)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_e = tl.arange(0, BLOCK_E)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
    cnt = tl.sum(onehot, axis=0)
    tl.store(counts_ptr + pid * E + offs_e, cnt, mask=offs_e < E)


@triton.jit
def align_scan_kernel(
    # pointers
    counts_ptr,  # [n_tiles, E] int32
    tile_offsets_ptr,  # [n_tiles, E] int32 (out): first output position of (tile, expert)
    expert_ids_ptr,  # [max_blocks] int32 (out)
    num_post_ptr,  # [1] int32 (out)
    # sizes
    n_tiles,
    max_blocks,
    # meta-parameters
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,  # GEMM row block; segments are padded to it
    BLOCK_E: tl.constexpr,  # next_pow2(E)
    BLOCK_TILES: tl.constexpr,  # tiles scanned per step
    BLOCK_B: tl.constexpr,  # blocks labelled per step
):
    """Single program: exclusive scans over experts (padded) and over tiles.  Grid: (1,)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_tile = tl.arange(0, BLOCK_TILES)
    emask = offs_e < E
    # `while` rather than `for ... in range(runtime bound)`: Triton 3.6's interpreter cannot use
    # a runtime scalar as a range() bound (int() of a 1-element array); the compiled code is alike.
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    t0 = 0
    while t0 < n_tiles:
        tt = t0 + offs_tile
        c = tl.load(counts_ptr + tt[:, None] * E + offs_e[None, :],
                    mask=(tt[:, None] < n_tiles) & emask[None, :], other=0)
        total += tl.sum(c, axis=0)
        t0 += BLOCK_TILES
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    num_post = tl.sum(padded, axis=0)
    tl.store(num_post_ptr, num_post)

    run = starts
    t0 = 0
    while t0 < n_tiles:
        tt = t0 + offs_tile
        m2 = (tt[:, None] < n_tiles) & emask[None, :]
        c = tl.load(counts_ptr + tt[:, None] * E + offs_e[None, :], mask=m2, other=0)
        excl = tl.cumsum(c, axis=0) - c
        tl.store(tile_offsets_ptr + tt[:, None] * E + offs_e[None, :], run[None, :] + excl, mask=m2)
        run += tl.sum(c, axis=0)
        t0 += BLOCK_TILES

    end_blocks = tl.where(emask, ends // BLOCK_M, 2147483647)
    used_blocks = num_post // BLOCK_M
    offs_b = tl.arange(0, BLOCK_B)
    b0 = 0
    while b0 < max_blocks:
        b = b0 + offs_b
        # the expert of block b is the number of experts whose segment ends at or before b
        eid = tl.sum((end_blocks[None, :] <= b[:, None]).to(tl.int32), axis=1)
        eid = tl.where(b < used_blocks, eid, -1)
        tl.store(expert_ids_ptr + b, eid, mask=b < max_blocks)
        b0 += BLOCK_B


@triton.jit
def align_scatter_kernel(
    # pointers
    topk_ids_ptr,  # [numel] int32/int64 (flat, contiguous)
    tile_offsets_ptr,  # [n_tiles, E] int32
    sorted_token_ids_ptr,  # [P] int32 (out; pre-filled with the sentinel)
    # sizes
    numel,
    # meta-parameters
    E: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """sorted_token_ids[tile_offsets[tile, e] + rank] = i, rank = #{i' < i in tile, same e}.
    Grid: (n_tiles,)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_e = tl.arange(0, BLOCK_E)
    valid = offs < numel
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [BLOCK, BLOCK_E]
    rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1), axis=1)
    base = tl.load(tile_offsets_ptr + pid * E + offs_e, mask=offs_e < E, other=0)
    pos = tl.sum(onehot * base[None, :], axis=1) + rank
    ok = valid & (ids >= 0) & (ids < E)
    tl.store(sorted_token_ids_ptr + pos, offs, mask=ok)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def _tile(num_experts: int) -> tuple[int, int]:
    block_e = next_pow2(num_experts)
    return block_e, max(16, min(1024, 8192 // block_e))


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Group the T*k routed slots by expert, padded per expert to ``block_m`` (see module doc).

    Output sizes depend only on (T, k, E, block_m), never on the routing: no host sync, and the
    result can be captured in a CUDA graph.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got {tuple(topk_ids.shape)}")
    if block_m < 1:
        raise ValueError("block_m must be >= 1")
    T, k = topk_ids.shape
    E = int(num_experts)
    dev = topk_ids.device
    numel = T * k
    P = max_padded_tokens(numel, E, block_m)
    max_blocks = P // block_m
    sorted_ids = torch.full((P,), numel, dtype=torch.int32, device=dev)
    expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    num_post = torch.zeros((1,), dtype=torch.int32, device=dev)
    out = MoEAlignment(sorted_ids, expert_ids, num_post, block_m, k, numel)
    if numel == 0:
        return out
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    block_e, block = _tile(E)
    n_tiles = cdiv(numel, block)
    counts = torch.empty((n_tiles, E), dtype=torch.int32, device=dev)
    tile_offsets = torch.empty((n_tiles, E), dtype=torch.int32, device=dev)
    launchable(align_count_kernel, dev)[(n_tiles,)](
        flat, counts, numel, E=E, BLOCK=block, BLOCK_E=block_e)
    launchable(align_scan_kernel, dev)[(1,)](
        counts, tile_offsets, expert_ids, num_post, n_tiles, max_blocks,
        E=E, BLOCK_M=block_m, BLOCK_E=block_e,
        BLOCK_TILES=max(1, min(64, 4096 // block_e)), BLOCK_B=max(16, min(256, 8192 // block_e)))
    launchable(align_scatter_kernel, dev)[(n_tiles,)](
        flat, tile_offsets, sorted_ids, numel, E=E, BLOCK=block, BLOCK_E=block_e)
    return out


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def moe_align_block_size_reference(topk_ids: torch.Tensor, num_experts: int,
                                   block_m: int) -> MoEAlignment:
    """Plain-torch definition of :func:`moe_align_block_size` (host loop over experts)."""
    T, k = topk_ids.shape
    E = int(num_experts)
    dev = topk_ids.device
    numel = T * k
    P = max_padded_tokens(numel, E, block_m)
    sorted_ids = torch.full((P,), numel, dtype=torch.int32, device=dev)
    expert_ids = torch.full((P // block_m,), -1, dtype=torch.int32, device=dev)
    flat = topk_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < E)
    order = torch.argsort(torch.where(keep, flat, E), stable=True)
    counts = torch.bincount(flat[keep], minlength=E).tolist()
    pos = src = 0
    for e in range(E):
        c = counts[e]
        padded = cdiv(c, block_m) * block_m
        sorted_ids[pos:pos + c] = order[src:src + c].to(torch.int32)
        expert_ids[pos // block_m:(pos + padded) // block_m] = e
        pos += padded
        src += c
    num_post = torch.tensor([pos], dtype=torch.int32, device=dev)
    return MoEAlignment(sorted_ids, expert_ids, num_post, block_m, k, numel)


def _ptx_examples():
    """(kernel, name, signature, constexprs, options) examples for the PTX compile test."""
    E = 64
    block_e, block = _tile(E)
    return [
        (align_count_kernel, "count_e64",
         {"topk_ids_ptr": "*i64", "counts_ptr": "*i32", "numel": "i32",
          "E": "constexpr", "BLOCK": "constexpr", "BLOCK_E": "constexpr"},
         dict(E=E, BLOCK=block, BLOCK_E=block_e), dict(num_warps=4)),
        (align_scan_kernel, "scan_e64_bm64",
         {"counts_ptr": "*i32", "tile_offsets_ptr": "*i32", "expert_ids_ptr": "*i32",
          "num_post_ptr": "*i32", "n_tiles": "i32", "max_blocks": "i32", "E": "constexpr",
          "BLOCK_M": "constexpr", "BLOCK_E": "constexpr", "BLOCK_TILES": "constexpr",
          "BLOCK_B": "constexpr"},
         dict(E=E, BLOCK_M=64, BLOCK_E=block_e, BLOCK_TILES=64, BLOCK_B=128), dict(num_warps=4)),
        (align_scatter_kernel, "scatter_e64",
         {"topk_ids_ptr": "*i64", "tile_offsets_ptr": "*i32", "sorted_token_ids_ptr": "*i32",
          "numel": "i32", "E": "constexpr", "BLOCK": "constexpr", "BLOCK_E": "constexpr"},
         dict(E=E, BLOCK=block, BLOCK_E=block_e), dict(num_warps=4)),
    ]
