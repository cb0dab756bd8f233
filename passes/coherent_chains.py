"""Find chains of MoE layers joined by per-token ops: where context-coherent EP (ExFlow) applies.

Used by sparse_collectives in mode "coherent". A chain is MoE ops m_1..m_n with "state" nodes
S_0..S_n such that, for every layer i,

    hidden_i, logits_i = row programs of S_{i-1}          (e.g. layer_norm -> view, router mm)
    S_i                = row program of (S_{i-1}, m_i)     (e.g. the residual add)

and nothing outside the chain reads a value computed after m_1 except S_n (the chain's output).
Row programs (codegen/comm/row_program.py) prove the in-between ops treat tokens independently.
Where they mix tokens (attention), a link may instead hold one context region (context_region.py):

    S_a = row program of (S_{i-1}, m_i);  S_i = region(S_a) (its keys/values cut all-gathered)

A region whose values escape the chain (a KV cache returned by the graph), per-token data computed
inside the chain but not from S_a, sizes computed at run time, or a router's logits read by an aux
loss ends the chain there. A chain needs two layers or more (one layer gains nothing over two
all-to-alls); everything else is reported with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from moe_compiler.codegen.comm import context_region, row_program
from moe_compiler.codegen.comm.context_region import ContextLink
from moe_compiler.codegen.comm.row_program import NotRowWise, RowProgram

_aten = torch.ops.aten
# metadata checks functionalization leaves on values; they read a chain's values but need no copy of them
CHECKS = {_aten._assert_tensor_metadata.default, _aten._assert_scalar.default}

# a state candidate is searched among this many nodes around a MoE op (keeps the search linear)
_WINDOW = 64


@dataclass
class ChainLayer:
    moe: torch.fx.Node
    hidden: RowProgram        # S_{i-1} -> moe hidden input
    logits: RowProgram        # S_{i-1} -> router logits
    post: RowProgram          # (S_{i-1}, moe output) -> S_i, or -> S_a of the context region
    context: ContextLink | None = None   # S_a -> S_i across attention (None: post gives S_i)


@dataclass
class Chain:
    start: torch.fx.Node      # S_0 (rows at home)
    end: torch.fx.Node        # S_n: the only value the rest of the graph reads
    layers: list
    token_dims: tuple

    @property
    def names(self) -> list:
        return [layer_path(layer.moe) for layer in self.layers]


def layer_path(moe: torch.fx.Node) -> str:
    from moe_compiler.ir import MoESpec

    return MoESpec.from_json(moe.args[-1]).path or moe.name


def find_chains(moes: list, is_param, values=None) -> tuple[list, dict]:
    """moes: MoE op nodes in graph order -> (chains, {moe node: why it is in no chain}).

    values(nodes) -> {node: tensor} (the graph's values on its example inputs) lets a context region
    gather a narrow keys/values cut (context_region.link); without it the region gathers its state."""
    if not moes:
        return [], {}
    graph = moes[0].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    chains, why = [], {}
    i = 0
    while i < len(moes):
        chain, reason = _longest_chain(moes, i, order, is_param, values)
        if chain is None or len(chain.layers) < 2:
            why[moes[i]] = reason or "a chain needs two consecutive MoE layers"
            i += 1
            continue
        chains.append(chain)
        i += len(chain.layers)
    return chains, why


def _token_dims(moe) -> tuple:
    return tuple(moe.args[0].meta["val"].shape[:-1])


def _pre(moe, state, token_dims, is_param):
    hidden, logits = moe.args[0], moe.args[1]
    bias = moe.args[2]
    if isinstance(bias, torch.fx.Node) and not is_param(bias):
        raise NotRowWise(f"{layer_path(moe)}: its score bias {bias.name} is not a parameter")
    return (row_program.extract([hidden], [state], token_dims, is_param),
            row_program.extract([logits], [state], token_dims, is_param))


def _ancestors_before(moe, order) -> list:
    """Row-valued ancestors of moe's hidden/logits, nearest first (the S_0 candidates)."""
    seen, stack = set(), [moe.args[0], moe.args[1]]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(seen, key=order.__getitem__, reverse=True)[:_WINDOW]


def _descendants(moe, order, limit=None) -> list:
    seen, stack = set(), [moe]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and (limit is None or order[u] <= limit):
                seen.add(u)
                stack.append(u)
    return sorted(seen, key=order.__getitem__)[:_WINDOW]


def _link(state, moe, nxt, token_dims, order, is_param, start, values):
    """The state S after moe from which nxt's inputs follow -> (S, post, hidden', logits', context);
    raises NotRowWise. A per-token link is preferred; else one context region (attention) in between."""
    if not row_program.same_sizes(_token_dims(nxt), token_dims):
        raise NotRowWise(f"{layer_path(nxt)} has token dims {list(_token_dims(nxt))}, {layer_path(moe)} "
                         f"{list(token_dims)}")
    last = None
    after = [moe] + _descendants(moe, order, limit=order[nxt])
    for cand in after:
        try:
            post = row_program.extract([cand], [state, moe], token_dims, is_param)
            hp, lp = _pre(nxt, cand, token_dims, is_param)
            return cand, post, hp, lp, None
        except NotRowWise as e:
            last = e
    return _context_link(state, moe, nxt, token_dims, order, is_param, start, values, last)


def _context_link(state, moe, nxt, token_dims, order, is_param, start, values, why):
    """_link across attention: S_a after moe (a row program of (state, moe), before the first attention
    op) and S_b after the last one, from which nxt's inputs follow; why: the per-token link's failure."""
    graph = moe.graph.nodes
    between = [n for n in graph if order[moe] < order[n] < order[nxt]]
    attention = [n for n in between if n.target in context_region.ATTENTION]
    if not attention:
        raise why or NotRowWise(f"nothing joins {layer_path(moe)} to {layer_path(nxt)}")
    if row_program.row_layout(start, token_dims)[0] != len(token_dims):
        raise NotRowWise(f"the chain's input {start.name} is flattened; attention between {layer_path(moe)} and "
                         f"{layer_path(nxt)} needs the token dims {list(token_dims)}")
    feeds_next = set(context_region.ancestors_of([nxt.args[0], nxt.args[1]]))
    ends = [n for n in between if n in feeds_next and order[n] > order[attention[-1]]]
    last = why
    for sa in [moe] + _descendants(moe, order, limit=order[attention[0]]):
        try:
            post = row_program.extract([sa], [state, moe], token_dims, is_param)
        except NotRowWise:
            continue
        reach = context_region.dependents([sa])
        for sb in ends:
            if sb not in reach:
                continue
            try:
                hp, lp = _pre(nxt, sb, token_dims, is_param)
                ctx = context_region.link(sa, sb, start, token_dims, is_param, values)
            except NotRowWise as e:
                last = NotRowWise(f"{e} (in the region {sa.name} -> {sb.name})")
                continue
            return sb, post, hp, lp, ctx
    raise last


def _longest_chain(moes, i, order, is_param, values=None):
    """The longest valid chain starting at moes[i], or (None, reason)."""
    first = moes[i]
    token_dims = _token_dims(first)
    last_err = link_err = None  # why no state feeds the layer / why the nearest state joins no next layer
    for start in _ancestors_before(first, order):
        try:
            row_program.row_layout(start, token_dims)
            hp, lp = _pre(first, start, token_dims, is_param)
        except NotRowWise as e:
            last_err = e
            continue
        layers, links, state = [], [], start
        reason = None
        for j in range(i, len(moes)):
            if j + 1 == len(moes):
                layers.append((moes[j], hp, lp))
                break
            try:
                nstate, post, nhp, nlp, ctx = _link(state, moes[j], moes[j + 1], token_dims, order, is_param,
                                                    start, values)
            except NotRowWise as e:
                reason = f"{layer_path(moes[j])} -> {layer_path(moes[j + 1])}: {e}"
                layers.append((moes[j], hp, lp))
                break
            layers.append((moes[j], hp, lp))
            links.append((nstate, post, ctx))
            state, hp, lp = nstate, nhp, nlp
        if len(layers) < 2:
            link_err = reason or link_err  # the furthest state that feeds the layer explains best
            continue
        # the longest prefix whose values stay inside the chain, ending at a valid S_n
        for n in range(len(layers), 1, -1):
            chain = _close(start, layers[:n], links[:n - 1], token_dims, order, is_param)
            if chain is not None:
                return chain, reason
        return None, (f"values computed inside {layer_path(first)}..{layer_path(layers[-1][0])} are read outside "
                      "the chain (e.g. router logits by an aux loss, per-layer hidden states, or keys/values "
                      "returned as a KV cache: pass use_cache=False)")
    return None, link_err or (str(last_err) if last_err else "no per-token state feeds the layer")


def _close(start, layers, links, token_dims, order, is_param):
    """A chain over these layers ending at the first S_n after the last MoE op that keeps every value
    computed after the first MoE op inside the chain; None when there is none."""
    last_moe, state = layers[-1][0], (links[-1][0] if links else start)
    start_dims = row_program.row_layout(start, token_dims)[0]
    for end in [last_moe] + _descendants(last_moe, order):
        try:
            post = row_program.extract([end], [state, last_moe], token_dims, is_param)
            end_dims = row_program.row_layout(end, token_dims)[0]
        except NotRowWise:
            continue
        if end_dims not in (start_dims, 1):   # the op can flatten the token dims, not restore them
            continue
        chain_layers = [ChainLayer(m, hp, lp, p, ctx)
                        for (m, hp, lp), (_, p, ctx) in zip(layers, links + [(end, post, None)])]
        if not _escapes(chain_layers, [s for s, _, _ in links], end, start):
            return Chain(start, end, chain_layers, token_dims)
    return None


def _escapes(layers, states, end, start) -> bool:
    """True when a value that depends on a MoE op of the chain is read outside the chain."""
    inside = set(states) | {end}
    for layer in layers:
        inside |= layer_nodes(layer)
    moes, memo = {layer.moe for layer in layers}, {}
    after = {n for n in inside if _depends_on(n, moes, start, memo)}
    return any(u not in inside and u.target not in CHECKS for n in after if n is not end for u in n.users)


def layer_nodes(layer: ChainLayer) -> set:
    """The graph nodes a chain layer recomputes inside the op (its MoE op included)."""
    nodes = layer.hidden.nodes | layer.logits.nodes | layer.post.nodes | {layer.moe}
    if layer.context is not None:
        nodes |= layer.context.nodes | {layer.context.state} | set(layer.context.cut_nodes)
    return nodes


def _depends_on(n, targets, stop, _memo=None) -> bool:
    memo = {} if _memo is None else _memo
    if n in targets:
        return True
    if n is stop or n.op != "call_function":
        return False
    if n not in memo:
        memo[n] = False
        memo[n] = any(_depends_on(a, targets, stop, memo) for a in n.all_input_nodes)
    return memo[n]
