"""Runs collective-schedule steps on torch.distributed (gloo on CPU, NCCL on GPU).

    route_rows(tensors, dest [S] int64, hop)  -> received tensors [S_recv, ...], Route
        counts  = zeros(G).scatter_add(dest)          # fixed size [G]: no bincount, no host sync yet
        recv    = all_to_all_single(counts)           # "exchange_counts"
        splits  = counts.tolist(), recv.tolist()      # the only host sync
        rows    = all_to_all_single(tensor[argsort(dest)], recv splits, send splits)
    reverse_rows(y [S_recv, ...], route)          -> [S, ...] in the order route_rows was given
    start_route_rows / start_reverse_rows         the same, issued with async_op=True: an InFlight whose
                                                  finish() waits and returns what the blocking call returns
                                                  (no autograd: for forwards that run without gradients)
    exchange_splits(dests, hop)                   the counts of several exchanges in one all_to_all_single

Float tensors move through ``AllToAll`` (an autograd Function: its backward is the reverse
all-to-all), so gradients flow back to the sending rank. A failing collective (a dead peer, a
timeout of the process group) raises ``CommError`` naming the step, the rank and the group size.
Traffic is recorded per step while ``record_traffic()`` is active (bytes sent to other ranks).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx


class CommError(RuntimeError):
    """A collective of the expert-parallel schedule failed (peer died, timed out, or mismatched)."""


def runs_collectives(*ops) -> None:
    """Mark custom ops that run collectives inside as side-effecting, so that neither FX dead-code
    elimination nor Inductor drops them. Inductor treats a read of a zero-element buffer as a no-op:
    on a rank that passes no tokens the op's [0, H] output has no readers and the op would be removed,
    leaving the other ranks waiting in its collectives (or receiving another layer's)."""
    for op in ops:
        torch.fx.node.has_side_effect(op)


# ------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Hop:
    """A process group one route step runs on, and how a global destination maps into it."""

    name: str                      # "world" | "intra_node" | "inter_node"
    group: object                  # torch.distributed ProcessGroup
    size: int
    rank: int                      # this process's rank in the group


_GROUP_CACHE: dict = {}


def resolve_group(name: str):
    """'world' -> the default group; otherwise a process group by its registered name."""
    if name in ("world", "", None):
        return dist.group.WORLD
    from moe_compiler import _compat

    return _compat.resolve_process_group(name)


def group_name(group) -> str:
    """The name ``resolve_group`` accepts for a group (None/WORLD -> 'world')."""
    if group is None or group is dist.group.WORLD:
        return "world"
    return group.group_name


def world_hop(group) -> Hop:
    return Hop("world", group, dist.get_world_size(group), dist.get_rank(group))


def node_hops(ranks_per_node: int) -> tuple[Hop, Hop]:
    """(intra-node hop, inter-node hop) of this rank for the default group, nodes of ranks_per_node.

    Node n holds world ranks [n*M, (n+1)*M); the inter-node group of local index m is
    {m, M + m, 2M + m, ...}. Every rank creates every subgroup in the same order (new_group is
    collective), once per process.
    """
    world = dist.get_world_size()
    m = int(ranks_per_node)
    if m < 1 or world % m:
        raise ValueError(f"ranks_per_node={ranks_per_node} must be a positive divisor of the world size {world}")
    key = ("nodes", world, m)
    if key not in _GROUP_CACHE:
        intra = [dist.new_group(list(range(n * m, (n + 1) * m))) for n in range(world // m)]
        inter = [dist.new_group(list(range(j, world, m))) for j in range(m)]
        _GROUP_CACHE[key] = (intra, inter)
    intra, inter = _GROUP_CACHE[key]
    r = dist.get_rank()
    return Hop("intra_node", intra[r // m], m, r % m), Hop("inter_node", inter[r % m], world // m, r // m)


# ------------------------------------------------------------------ traffic
_TRAFFIC: list = []


@contextlib.contextmanager
def record_traffic():
    """Collect {"layer", "step", "group", "rows_remote", "bytes_remote", "rows_sent", "rows_received"}
    per executed all-to-all (remote = to other ranks of the step's group); the backward of a
    differentiable all-to-all is logged as "<step>.backward"."""
    log: list = []
    _TRAFFIC.append(log)
    try:
        yield log
    finally:
        _TRAFFIC.remove(log)


_TIMERS: list = []


@contextlib.contextmanager
def record_comm_time():
    """Collect {"seconds": wall time inside this module's collectives, "calls": n} while active."""
    acc = {"seconds": 0.0, "calls": 0}
    _TIMERS.append(acc)
    try:
        yield acc
    finally:
        _TIMERS.remove(acc)


@contextlib.contextmanager
def timed_collective():
    """Adds the block's wall time to the active record_comm_time() accumulators."""
    if not _TIMERS:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        for acc in _TIMERS:
            acc["seconds"] += dt
            acc["calls"] += 1


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def note_traffic(layer: str, step: str, hop: Hop, send_splits, recv_splits, row_bytes: int) -> None:
    """Log one exchange (rows sent to / received from each group rank) to the active recorders."""
    if not _TRAFFIC:
        return
    remote = sum(n for j, n in enumerate(send_splits) if j != hop.rank)
    for log in _TRAFFIC:
        log.append({"layer": layer, "step": step, "group": hop.name, "rows_remote": int(remote),
                    "bytes_remote": int(remote * row_bytes), "rows_sent": int(sum(send_splits)),
                    "rows_received": int(sum(recv_splits))})


# ------------------------------------------------------------------ collectives
def _a2a(out, inp, out_splits, in_splits, hop: Hop, what: str):
    try:
        with timed_collective():
            dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=hop.group)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _comm_error("all_to_all", what, hop, e) from e
    return out


def _comm_error(kind: str, what: str, hop: Hop, e: Exception) -> CommError:
    return peer_failure(f"{kind} {what!r} on group {hop.name} failed on group rank {hop.rank} of {hop.size}",
                        "schedule", e)


def peer_failure(where: str, ran: str, e: Exception) -> CommError:
    """The CommError for a collective that failed at `where` with the process group's error e."""
    return CommError(
        f"expert parallelism: {where} (a peer process died, timed out, or ran a different {ran}): "
        f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def all_gather_rows(t: torch.Tensor, hop: Hop, what: str) -> torch.Tensor:
    """[n, ...] on every group rank -> [G * n, ...] (rank order); a failing peer raises CommError."""
    parts = [torch.empty_like(t) for _ in range(hop.size)]
    try:
        with timed_collective():
            dist.all_gather(parts, t.contiguous(), group=hop.group)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _comm_error("all_gather", what, hop, e) from e
    return torch.cat(parts, 0)


class AllToAll(torch.autograd.Function):
    """y = all_to_all_single(x, in_splits -> out_splits); backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, hop, what):
        ctx.splits, ctx.hop, ctx.what = (out_splits, in_splits), hop, what
        y = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        return _a2a(y, x, out_splits, in_splits, hop, what)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        gx = _a2a(gx, g, in_splits, out_splits, ctx.hop, ctx.what + ".backward")
        layer, _, step = ctx.what.rpartition(":")
        note_traffic(layer, step + ".backward", ctx.hop, out_splits, in_splits, _row_bytes(g))
        return gx, None, None, None, None


def all_to_all(x, out_splits, in_splits, hop: Hop, what: str):
    if x.is_floating_point():
        return AllToAll.apply(x, list(out_splits), list(in_splits), hop, what)
    return _a2a(x.new_empty((sum(out_splits),) + tuple(x.shape[1:])), x, list(out_splits), list(in_splits), hop, what)


@dataclass
class Route:
    """How route_rows moved rows: undone by reverse_rows."""

    hop: Hop
    order: torch.Tensor        # [S] send order (stable argsort of dest)
    send_splits: list
    recv_splits: list
    layer: str = ""
    name: str = ""


def _send_splits(dest: torch.Tensor, hop: Hop, layer: str, name: str) -> tuple:
    """Exchange per-destination row counts: -> (send order [S], send splits, receive splits)."""
    return exchange_splits([dest], hop, layer, name)[0]


def exchange_splits(dests: list, hop: Hop, layer: str, name: str) -> list:
    """The row counts of several exchanges (e.g. token chunks) with destinations dests[c] [S_c], in ONE
    all-to-all of a [G, n] table: -> per exchange (send order [S_c], send splits, receive splits)."""
    device = dests[0].device
    counts = torch.zeros(hop.size, len(dests), dtype=torch.int64, device=device)   # row j goes to rank j
    for c, dest in enumerate(dests):
        counts[:, c].scatter_add_(0, dest, torch.ones_like(dest))
    recv = _a2a(torch.empty_like(counts), counts, [1] * hop.size, [1] * hop.size, hop, f"{layer}:{name}_counts")
    out = []
    for c, dest in enumerate(dests):
        send_splits, recv_splits = counts[:, c].tolist(), recv[:, c].tolist()
        for src, n in enumerate(recv_splits):  # a peer that ran another schedule sends garbage counts
            torch._check(n >= 0, lambda: f"expert parallelism: {layer}:{name}: group rank {src} announced {n} rows "
                                          f"(a peer ran a different schedule?)")
        out.append((torch.argsort(dest, stable=True), send_splits, recv_splits))
    return out


def route_rows(tensors: list, dest: torch.Tensor, hop: Hop, *, layer: str = "", name: str = "dispatch"):
    """Send row i of every tensor to group rank dest[i]; returns (received tensors, Route).

    Received rows are ordered by source group rank, and within a source in send order.
    """
    order, send_splits, recv_splits = _send_splits(dest, hop, layer, name)
    out = []
    for t in tensors:
        out.append(all_to_all(t.index_select(0, order), recv_splits, send_splits, hop, f"{layer}:{name}"))
        _note_route_step(layer, name, hop, t, send_splits, recv_splits)
    return out, Route(hop, order, send_splits, recv_splits, layer, name)


def _note_route_step(layer, name, hop, t, send_splits, recv_splits):
    step = name if t.is_floating_point() else name + "_meta"
    note_traffic(layer, step, hop, send_splits, recv_splits, _row_bytes(t))


def reverse_rows(y: torch.Tensor, route: Route, name: str = "combine") -> torch.Tensor:
    """Send received rows back to where route_rows took them from, restoring the original order."""
    back = all_to_all(y, route.send_splits, route.recv_splits, route.hop, f"{route.layer}:{name}")
    note_traffic(route.layer, name, route.hop, route.recv_splits, route.send_splits, _row_bytes(y))
    return _restore_order(back, route)


def _restore_order(back: torch.Tensor, route: Route) -> torch.Tensor:
    inv = torch.empty_like(route.order)
    inv[route.order] = torch.arange(route.order.numel(), device=route.order.device)
    return back.index_select(0, inv)


# ------------------------------------------------------------------ collectives in flight
class InFlight:
    """All-to-alls issued with ``async_op=True``. ``finish()`` waits for them (a failing one raises
    CommError naming its step) and returns ``result()``; the wait counts as collective time."""

    def __init__(self, works: list, result):
        self._works = works          # [(Work, hop, what)]
        self._result = result

    def finish(self):
        for work, hop, what in self._works:
            try:
                with timed_collective():
                    work.wait()
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise _comm_error("all_to_all", what, hop, e) from e
        self._works = []
        return self._result()


def _start_a2a(x: torch.Tensor, out_splits, in_splits, hop: Hop, what: str):
    """Issue all_to_all_single(x) without waiting: -> (output buffer, (Work, hop, what))."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    try:
        work = dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=hop.group,
                                      async_op=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _comm_error("all_to_all", what, hop, e) from e
    return out, (work, hop, what)


def start_route_rows(tensors: list, dest: torch.Tensor | None, hop: Hop, *, layer: str = "",
                     name: str = "dispatch", splits: tuple | None = None) -> InFlight:
    """route_rows without waiting for the rows: the counts exchange blocks (the splits are needed to
    issue the rows), the rows' all-to-alls are left in flight. finish() -> (received tensors, Route).
    splits: this exchange's entry of exchange_splits when its counts went with others' (dest is then
    not read and may be None)."""
    order, send_splits, recv_splits = splits if splits is not None else _send_splits(dest, hop, layer, name)
    outs, works = [], []
    for t in tensors:
        out, work = _start_a2a(t.index_select(0, order), recv_splits, send_splits, hop, f"{layer}:{name}")
        outs.append(out)
        works.append(work)
        _note_route_step(layer, name, hop, t, send_splits, recv_splits)
    return InFlight(works, lambda: (outs, Route(hop, order, send_splits, recv_splits, layer, name)))


def start_reverse_rows(y: torch.Tensor, route: Route, name: str = "combine") -> InFlight:
    """reverse_rows without waiting: finish() -> y's rows back in the order route_rows was given."""
    back, work = _start_a2a(y, route.send_splits, route.recv_splits, route.hop, f"{route.layer}:{name}")
    note_traffic(route.layer, name, route.hop, route.recv_splits, route.send_splits, _row_bytes(y))
    return InFlight([work], lambda: _restore_order(back, route))
