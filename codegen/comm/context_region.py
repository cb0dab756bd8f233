"""Context regions: a coherent chain crosses attention by making the context coherent (ExFlow).

Between two MoE layers of a transformer, attention mixes the tokens of a sequence, so the per-token
row programs of row_program.py cannot carry a token across it. ExFlow makes the context coherent
instead: every rank gets the context, and each rank runs the mixing region for the rows it holds.

    S_a     the state before the region (rows held on this rank, at their anchors, in any order)
    cut     per-token values the region's attention reads as keys and values (each a row program of
            S_a, computed where the row is held): all-gathered, so every rank holds every token's cut
    region  (S_a, *cut, *free) -> S_b: the graph's own ops with their own shapes, run once per home
            rank r that has rows here: S_a holds the rows held here in place and zeros elsewhere, the
            cut is complete, and free operands that are per-token data from outside the chain (rotary
            tables, attention masks: "context operands") are r's, all-gathered once per chain
    S_b     the held rows of the region's output

A held row of S_b must depend only on its own row of S_a and on the cut. ``link`` proves that
numerically at compile time (zeroed rows of S_a must not change the other rows' outputs); when no
narrow cut proves sound (two attentions in one region, keys that are not a row program of S_a), the
cut is S_a itself: every rank gets every state row and runs the region on the whole context, which
is the graph's own computation. Under dynamic shapes the region reads its sizes from its input's dims
at run time (aten.sym_size), so a rank that recompiled alone for a new length keeps its chain. The
ranks' token shapes and context operands (their number, shapes and dtypes: a graph compiled with
dynamic shapes takes rotary tables and masks as per-rank operands where a static one has constants)
must be equal for one rank to run another's region; when they differ, the rows go home for the
region instead (``ChainContext._at_home``), which every rank sees from the all-gathered token sizes and
operand signatures, so all take the same path.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.fx

from moe_compiler.codegen.comm import row_program
from moe_compiler.codegen.comm.row_program import NotRowWise

log = logging.getLogger(__name__)
_aten = torch.ops.aten
ATTENTION = {getattr(_aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention") if hasattr(_aten, name)}


@dataclass
class ContextLink:
    """A region S_a -> S_b of a chain that mixes tokens, and the cut all-gathered for it."""

    state: torch.fx.Node           # S_a
    out: torch.fx.Node             # S_b
    module: torch.fx.GraphModule   # (S_a, *cut values, *free) -> (S_b,) in the graph's layout
    free: list                     # graph nodes fed as the free operands, in order
    context: list                  # those of them that are per-token data from outside the chain
    cuts: list                     # RowPrograms S_a rows -> cut rows; [] = S_a itself is gathered
    cut_nodes: list
    nodes: set                     # graph nodes the region and the cut programs recompute
    mixing: list = field(default_factory=list)   # names of the token-mixing ops inside
    masks: list = field(default_factory=list)    # free nodes read as attention masks (no gradient)

    def per_token_values(self, token_dims) -> int:
        """Values per token all-gathered for the region."""
        nodes = self.cut_nodes or [self.state]
        return sum(math.prod(row_program.row_layout(n, token_dims)[1]) for n in nodes)

    def context_values(self) -> int:
        """Values of the per-token context operands (masks, rotary tables) one rank all-gathers once."""
        return sum(n.meta["val"].numel() for n in self.context)

    def describe(self, token_dims) -> str:
        what = (f"keys/values cut {[n.name for n in self.cut_nodes]}" if self.cuts
                else f"the state {self.state.name}")
        extra = (f"; context operands {[n.name for n in self.context]} ({self.context_values()} values per rank) "
                 "all-gathered once per chain" if self.context else "")
        return (f"context made coherent across {', '.join(self.mixing) or 'a token-mixing region'}: "
                f"all-gather of {what}, {self.per_token_values(token_dims)} values per token{extra}")


def dependents(targets) -> set:
    """Every node that depends on one of `targets` (the targets included)."""
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def extract_region(out: torch.fx.Node, inputs: list, chain_start: torch.fx.Node, token_dims: tuple, is_param):
    """The graph region computing `out` from `inputs` -> (module, free nodes, region nodes).

    Free operands that do not come from parameters must be tensors computed without the chain's
    rows (they are all-gathered once per chain) and not an earlier state of the tokens (one the chain's
    start follows from per token: the chain should start there). Under dynamic shapes a size the region
    uses is read from an input's dim at run time (aten.sym_size) or recomputed from such sizes; another
    size (one only this rank's other tensors give) is refused."""
    from_inputs, from_start = dependents(inputs), dependents([chain_start])
    dims_of = _symbolic_dims(inputs)
    region, free, sizes, stack = set(), [], {}, [out]
    while stack:
        n = stack.pop()
        if n in inputs or n in region or n in free or n in sizes:
            continue
        if isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):   # dynamic shapes
            expr = n.meta["val"].node.expr
            if expr in dims_of:               # the size of an input's dim: read there at run time
                sizes[n] = dims_of[expr]
            elif n.op == "call_function":     # arithmetic on sizes (s0 * s1), or a lifted module float
                region.add(n)                 # (_local_scalar_dense of a 0-dim constant): recomputed
                stack.extend(n.all_input_nodes)
            else:
                raise NotRowWise(f"{n.name} ({n.op}) is a size computed at run time ({expr}) that no dim of the "
                                 "region's inputs gives: the region would carry this rank's sizes")
            continue
        if n not in from_inputs:
            if n in from_start:
                raise NotRowWise(f"{n.name} is computed inside the chain but not from the region's state")
            if not isinstance(n.meta.get("val"), torch.Tensor):
                raise NotRowWise(f"{n.name} ({n.op}) is not a tensor: the region cannot take it as an operand")
            if not is_param(n) and _earlier_state(n, chain_start, token_dims, is_param):
                raise NotRowWise(f"{n.name} is an earlier state of the tokens (the chain's start {chain_start.name} "
                                 "follows from it per token)")
            free.append(n)
            continue
        if n.op != "call_function":
            raise NotRowWise(f"{n.name} ({n.op}) is not an op")
        region.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    free.sort(key=order.__getitem__)
    g = torch.fx.Graph()
    env = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"in{i}")
    for i, n in enumerate(free):
        env[n] = g.placeholder(f"free{i}")
    for n, (i, d) in sizes.items():
        env[n] = g.call_function(_aten.sym_size.int, (env[inputs[i]], d))
    for n in sorted(region, key=order.__getitem__):
        env[n] = g.node_copy(n, env.__getitem__)
    g.output((env[out],))
    return torch.fx.GraphModule(torch.nn.Module(), g), free, region


def _symbolic_dims(inputs) -> dict:
    """{sympy symbol: (input index, dim)} for every input dim whose size is a plain symbol (dynamic shapes):
    where the region reads that size at run time."""
    out = {}
    for i, n in enumerate(inputs):
        val = n.meta.get("val")
        for d, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                out.setdefault(size.node.expr, (i, d))
    return out


def _earlier_state(n, start, token_dims, is_param) -> bool:
    try:
        row_program.extract([start], [n], token_dims, is_param)
        return True
    except NotRowWise:
        return False


def _mixing_ops(region: set) -> list:
    return sorted((n for n in region if n.target in ATTENTION), key=lambda n: n.name)


def _narrow_cut(state, mixing: list, token_dims, is_param) -> list | None:
    """Per attention op, the narrowest row program of S_a that every path from S_a to its keys (and to
    its values) passes through, nearest the op on ties -> [(node, RowProgram)], or None when some key or
    value has none."""
    order = {n: i for i, n in enumerate(state.graph.nodes)}
    chosen = {}
    from_state = dependents([state])
    for op in mixing:
        for arg in op.args[1:3]:
            ancestors = [n for n in ancestors_of([arg]) if n is not state and n in from_state]
            best = None
            for n in sorted(ancestors, key=order.__getitem__, reverse=True):
                try:
                    feat = row_program.row_layout(n, token_dims)[1]
                except NotRowWise:
                    continue
                size = math.prod(feat)
                if (best is None or size < best[0]) and _separates(n, arg, state):
                    try:
                        best = (size, n, row_program.extract([n], [state], token_dims, is_param))
                    except NotRowWise:
                        continue
            if best is None:
                return None
            chosen[best[1]] = best[2]
    return list(chosen.items())


def ancestors_of(nodes) -> list:
    """Every node the given ones are computed from (themselves included)."""
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if isinstance(n, torch.fx.Node) and n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return list(seen)


def _separates(cut, target, state) -> bool:
    """Every path from state to target passes through cut."""
    seen, stack = set(), [target]
    while stack:
        n = stack.pop()
        if n is state:
            return False
        if n is cut or n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return True


def link(state, out, chain_start, token_dims, is_param, values=None) -> ContextLink:
    """The region S_a=state -> S_b=out as a ContextLink; raises NotRowWise when it cannot be one.

    values(nodes) -> {node: tensor}: the graph's values on its example inputs, for the proof that a
    narrow cut is sound; without it S_a itself is gathered."""
    row_program.row_layout(state, token_dims)
    row_program.row_layout(out, token_dims)
    module, free, region = extract_region(out, [state], chain_start, token_dims, is_param)
    mixing = _mixing_ops(region)
    if not mixing:
        raise NotRowWise(f"the region {state.name} -> {out.name} mixes tokens without attention")
    masks = [m for op in mixing for m in [op.kwargs.get("attn_mask", op.args[3] if len(op.args) > 3 else None)]
             if isinstance(m, torch.fx.Node)]
    full = ContextLink(state, out, module, free, [n for n in free if not is_param(n)], [], [], set(region),
                       [n.name for n in mixing], masks)
    cut = _narrow_cut(state, mixing, token_dims, is_param) if values is not None else None
    if not cut:
        return full
    nodes = [n for n, _ in cut]
    try:
        module_c, free_c, region_c = extract_region(out, [state, *nodes], chain_start, token_dims, is_param)
    except NotRowWise:
        return full
    progs = [p for _, p in cut]
    narrow = ContextLink(state, out, module_c, free_c, [n for n in free_c if not is_param(n)], progs, nodes,
                         set(region_c).union(*(p.nodes for p in progs)), [n.name for n in mixing], masks)
    return narrow if _held_rows_independent(narrow, token_dims, values) else full


def _held_rows_independent(link_: ContextLink, token_dims, values) -> bool:
    """Zeroing some rows of S_a (the cut kept from the whole S_a) leaves every other row of S_b unchanged."""
    needed = [link_.state, *link_.free, *[f for p in link_.cuts for f in p.free]]
    vals = values(needed)
    x = vals[link_.state]
    dims, feat = row_program.row_layout(link_.state, token_dims)
    rows = x.reshape((-1,) + tuple(feat))
    T = rows.shape[0]
    if T < 2 or not x.is_floating_point():
        return False
    cuts = [cut_layout(p([rows], [vals[f] for f in p.free])[0], n, token_dims, tuple(x.shape[:dims]))
            for p, n in zip(link_.cuts, link_.cut_nodes)]
    free = [vals[f] for f in link_.free]
    with torch.no_grad():
        whole = link_.module(x, *cuts, *free)[0].reshape(T, -1)
        for keep in (torch.arange(T) % 2 == 0, torch.arange(T) % 3 != 1):
            part = link_.module((rows * keep.view((-1,) + (1,) * len(feat)).to(rows.dtype)).reshape(x.shape),
                                *cuts, *free)[0].reshape(T, -1)
            tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(part[keep], whole[keep], rtol=tol, atol=tol * (1 + float(whole.abs().max())),
                                  equal_nan=True):
                return False
    return True


def cut_layout(rows: torch.Tensor, node: torch.fx.Node, token_dims: tuple, sizes: tuple) -> torch.Tensor:
    """Rows [T, *feat] of a graph value -> the value's layout (token dims `sizes` in front, or flat)."""
    dims, feat = row_program.row_layout(node, token_dims)
    lead = tuple(sizes) if dims > 1 else (rows.shape[0],)
    return rows.reshape(lead + tuple(feat))


# ------------------------------------------------------------------ run time (inside coherent_moe_chain)
@dataclass
class ContextProgram:
    """A ContextLink as the chain op runs it: modules, and where their free operands sit in the op's list."""

    region: torch.fx.GraphModule
    region_free: tuple             # operand indices
    cuts: list                     # row-program modules (S_a rows, *free) -> (cut rows,); [] = S_a gathered
    cut_free: tuple                # per cut, operand indices
    state_dims: int                # leading token dims of S_a in the graph (1: flat)
    cut_dims: tuple                # the same per cut value
    out_dims: int
    out_feat: tuple
    out_dtype: torch.dtype
    describe: str = ""
    cut_layout: str = ""           # feature shapes of the gathered values (part of the ranks' signature)


def _transport(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype is torch.bool else t


def _layout(rows: torch.Tensor, dims: int, sizes: tuple) -> torch.Tensor:
    return rows.reshape((tuple(sizes) if dims > 1 else (rows.shape[0],)) + tuple(rows.shape[1:]))


def _signature(tensors: list, programs=()) -> int:
    """An int64 naming the number, shapes and dtypes of `tensors` and the values each program gathers per
    token (equal on ranks that can exchange context operands and cut rows row for row)."""
    text = repr(([(tuple(t.shape), str(t.dtype)) for t in tensors], [p.cut_layout for p in programs])).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _keep_connected(out: torch.Tensor, received: list) -> torch.Tensor:
    """Make out depend (by zero) on every received float tensor that needs a gradient: each all-to-all's
    backward then runs on every rank, also one whose rows no region here reads."""
    for t in received:
        if t.requires_grad:
            out = out + t.sum().to(out.dtype) * 0
    return out


class ChainContext:
    """What a chain's context regions share on one rank during one forward: every rank's token sizes and
    context operands, all-gathered once (``gather``), then each region as a generator (``step``).

    exchange(tensors, dest, layer, name) builds the coherent executor's Exchange request."""

    def __init__(self, operands: list, context_operands: tuple, sizes: tuple, exchange, programs=()):
        self.operands, self.context_operands, self.sizes = operands, tuple(context_operands), tuple(sizes)
        self.exchange, self.programs = exchange, tuple(programs)
        self.shapes: tuple = ()
        self.all_shapes: list = []
        self.per_rank: dict = {}

    @property
    def equal_shapes(self) -> bool:
        return all(s == self.shapes for s in self.all_shapes)

    def gather(self, hop):
        """Generator: every rank's token sizes and context operand shapes, then (when all are equal) every
        context operand."""
        every = torch.arange(hop.size, dtype=torch.int64)
        # token sizes and one signature of the context operands and cuts: a fixed length on every rank, also
        # where a rank's graph has other context operands (one compiled with dynamic shapes reads its rotary
        # tables and mask as per-rank operands, a static one as constants) or proved another cut
        shapes = list(self.sizes) + [_signature([self.operands[i] for i in self.context_operands], self.programs)]
        dims = torch.tensor([shapes] * hop.size, dtype=torch.int64).reshape(hop.size, len(shapes))
        (got,) = yield self.exchange([dims], every, "context", "context_shapes")
        self.shapes = tuple(shapes)   # compared whole: equal token sizes with unequal masks are unequal
        self.all_shapes = [tuple(r) for r in got.tolist()]
        if not self.equal_shapes or not self.context_operands:
            return
        sent = [_transport(self.operands[i]).reshape(1, -1).expand(hop.size, -1) for i in self.context_operands]
        got = yield self.exchange(sent, every, "context", "context_operands")
        for i, g in zip(self.context_operands, got):
            t = self.operands[i]
            self.per_rank[i] = [(g[r].view(torch.bool) if t.dtype is torch.bool else g[r]).reshape(t.shape)
                                for r in range(hop.size)]

    def step(self, prog: ContextProgram, state, meta, hop, layer: str):
        """Generator: state rows [n, *feat_a] held here (meta [n, 2] home rank, home index) -> (S_b rows
        [n, *feat_b] in the same order, meta)."""
        if not self.equal_shapes:
            return (yield from self._at_home(prog, state, meta, hop, layer))
        free = self.operands
        cut_rows = [m(state, *[free[j] for j in idx])[0] for m, idx in zip(prog.cuts, prog.cut_free)] \
            if prog.cuts else [state]
        n, G = state.shape[0], hop.size
        send = [c.repeat((G,) + (1,) * (c.dim() - 1)) for c in cut_rows] + [meta.repeat(G, 1)]
        dest = torch.arange(G, dtype=torch.int64, device=state.device).repeat_interleave(n)
        *got, gmeta = yield self.exchange(send, dest, layer, "context")
        T = math.prod(self.sizes)
        outs, where = [], []
        for r in meta[:, 0].unique().tolist():
            held = (meta[:, 0] == r).nonzero()[:, 0]
            idx = meta[held, 1]
            src = (gmeta[:, 0] == r).nonzero()[:, 0]
            full = [c.new_zeros((T,) + tuple(c.shape[1:])).index_copy(0, gmeta[src, 1], c.index_select(0, src))
                    for c in got]
            if prog.cuts:
                x = state.new_zeros((T,) + tuple(state.shape[1:])).index_copy(0, idx, state.index_select(0, held))
                inputs = [_layout(x, prog.state_dims, self.sizes)] + \
                    [_layout(c, d, self.sizes) for c, d in zip(full, prog.cut_dims)]
            else:
                inputs = [_layout(full[0], prog.state_dims, self.sizes)]
            y = prog.region(*inputs, *self._free(prog, r))[0]
            outs.append(y.reshape((T,) + tuple(y.shape[prog.out_dims:])).index_select(0, idx))
            where.append(held)
        if outs:
            pos = torch.cat(where)
            new = torch.cat(outs).index_select(0, torch.argsort(pos))
        else:
            new = state.new_empty((0,) + tuple(prog.out_feat), dtype=prog.out_dtype)
        received = got + [v for i in prog.region_free for v in self.per_rank.get(i, [])[:1]]
        return _keep_connected(new, received), meta

    def _free(self, prog: ContextProgram, home: int) -> list:
        return [self.per_rank[i][home] if i in self.per_rank else self.operands[i] for i in prog.region_free]

    def _at_home(self, prog: ContextProgram, state, meta, hop, layer: str):
        """Ranks pass different token shapes or context operands: the rows go home and each rank runs the
        region on its own."""
        log.info("coherent chain, %s: ranks pass different token shapes %s or context operands; the rows go home "
                 "for the attention region (one more all-to-all, no context all-gather)", layer,
                 [s[:-1] for s in self.all_shapes])
        rows, m = yield self.exchange([state, meta], meta[:, 0], layer, "context_home")
        rows = rows.index_select(0, torch.argsort(m[:, 1]))
        free = self.operands
        cuts = [_layout(mod(rows, *[free[j] for j in idx])[0], d, self.sizes)
                for mod, idx, d in zip(prog.cuts, prog.cut_free, prog.cut_dims)]
        y = prog.region(_layout(rows, prog.state_dims, self.sizes), *cuts,
                        *[free[i] for i in prog.region_free])[0]
        T = rows.shape[0]
        home = torch.stack([torch.full((T,), hop.rank, dtype=torch.int64, device=rows.device),
                            torch.arange(T, dtype=torch.int64, device=rows.device)], 1)
        return y.reshape((T,) + tuple(y.shape[prog.out_dims:])), home
