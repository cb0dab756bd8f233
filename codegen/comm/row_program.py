"""Row programs: a per-token region of a graph, cut out so it can run on any subset of the tokens.

Context-coherent expert parallelism (coherent.py) keeps tokens on the rank of their last expert
between MoE layers, so the graph between two MoE layers (residual add, norm, router) must run on
whatever rows a rank holds, in any order. That is sound only where every op of the region treats
tokens independently. ``extract`` proves that op by op and builds the region as a GraphModule
over flattened rows:

    graph values  [*token_dims, *feat]  or  [T, *feat]   (T = prod(token_dims))
    program       inputs [n, *feat_in] ..., free operands ...  ->  outputs [n, *feat_out] ...

Accepted ops: pointwise ops (torch.Tag.pointwise), mm/addmm with the rows on the left, views and
reshapes that keep the token dims in front, layer norm, reductions/softmax/slices/cats over
feature dims, dtype casts, getitem. Anything else in the region (attention's bmm, an embedding or
index, a reduction over tokens) is refused with the op's name: the tokens interact there.

Operands that do not depend on the rows ("free": parameters, buffers, constants and ops on them)
become program inputs; a free operand that is per-token data from elsewhere in the graph is
refused (it would have to travel with the token).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_AS_IS = {aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.native_layer_norm.default, operator.getitem}
# op -> (index of its dim argument, default when absent); the dim argument may be an int or a list
_DIM_ARG = {
    aten.mean.dim: (1, None), aten.sum.dim_IntList: (1, None), aten.amax.default: (1, ()),
    aten.amin.default: (1, ()), aten.var.correction: (1, None), aten.var_mean.correction: (1, None),
    aten.std.correction: (1, None), aten._softmax.default: (1, None), aten._log_softmax.default: (1, None),
    aten.softmax.int: (1, None), aten.log_softmax.int: (1, None), aten.unsqueeze.default: (1, None),
    aten.squeeze.dim: (1, None), aten.squeeze.dims: (1, None), aten.slice.Tensor: (1, 0),
    aten.select.int: (1, None), aten.split.Tensor: (2, 0), aten.split_with_sizes.default: (2, 0),
    aten.chunk.default: (2, 0), aten.cat.default: (1, 0), aten.transpose.int: (1, None),
    aten.argmax.default: (1, None), aten.topk.default: (2, -1),
}


class NotRowWise(ValueError):
    """The region is not a per-token computation; the message says which node and why."""


@dataclass
class RowProgram:
    """A per-token region as a program over flattened rows."""

    module: torch.fx.GraphModule   # forward(*rows, *free) -> tuple of outputs, each [n, *feat]
    free: list                     # graph nodes fed as the free operands, in order
    nodes: set                     # the graph nodes the program recomputes (inputs excluded)

    def __call__(self, rows: list, free: list):
        return self.module(*rows, *free)


def row_layout(node: torch.fx.Node, token_dims: tuple):
    """node's value -> (number of leading token dims (len(token_dims) or 1 when flattened), feature shape)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NotRowWise(f"{node.name} ({_name(node)}) has no tensor value")
    shape = tuple(val.shape)
    L = len(token_dims)
    if L > 1 and same_sizes(shape[:L], token_dims):
        return L, shape[L:]
    if shape and same_sizes(shape[:1], (math.prod(token_dims),)):
        return 1, shape[1:]
    raise NotRowWise(f"{node.name} ({_name(node)}) has shape {list(shape)}, not laid out by the tokens "
                     f"{list(token_dims)}")


def same_sizes(a: tuple, b: tuple) -> bool:
    """Equal sizes; symbolic sizes compare by expression (no guard is added)."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _name(node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else node.op


def _nodes_in(args) -> list:
    out = []
    torch.fx.node.map_arg(args, out.append)
    return out


def extract(outputs: list, inputs: list, token_dims: tuple, is_param) -> RowProgram:
    """The program computing `outputs` (graph nodes) from `inputs` (graph nodes holding rows).

    is_param(node) -> bool: the node is a parameter/buffer/constant-derived value (safe to broadcast)."""
    depends: dict = {}

    def dep(n):
        if n in inputs:
            return True
        if n not in depends:
            depends[n] = False  # (acyclic; guards recursion)
            depends[n] = any(dep(a) for a in _nodes_in((n.args, n.kwargs)))
        return depends[n]

    region, free, stack = set(), [], list(outputs)
    while stack:
        n = stack.pop()
        if n in inputs or n in region or n in free:
            continue
        if not dep(n):
            if not is_param(n):
                raise NotRowWise(f"{n.name} ({_name(n)}) is per-token data computed outside the region")
            if n.op == "call_function" and not isinstance(n.meta.get("val"), torch.Tensor):
                region.add(n)   # a scalar of a constant (a module float lifted by dynamic=True): recomputed,
                stack.extend(n.all_input_nodes)   # so the program's operands stay tensors
                continue
            free.append(n)
            continue
        if n.op != "call_function":
            raise NotRowWise(f"{n.name} ({n.op}) is not an op")
        region.add(n)
        # a view's sizes are rewritten to [-1, *feat]: its size arguments (symbolic sizes under dynamic
        # shapes) are not program inputs
        stack.extend(_nodes_in(n.args[0] if n.target in _VIEWS or n.target is aten.expand.default
                               else (n.args, n.kwargs)))
    order = {n: i for i, n in enumerate(outputs[0].graph.nodes)}
    free.sort(key=order.__getitem__)
    g = torch.fx.Graph()
    env = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"rows{i}")
    for i, n in enumerate(free):
        env[n] = g.placeholder(f"free{i}")
    for n in sorted(region, key=order.__getitem__):
        if not dep(n):   # a constant's scalar: as it is
            env[n] = g.node_copy(n, env.__getitem__)
            continue
        args, kwargs = _row_args(n, token_dims, dep)
        env[n] = g.call_function(n.target, tuple(torch.fx.node.map_arg(tuple(args), env.__getitem__)),
                                 dict(torch.fx.node.map_arg(kwargs, env.__getitem__)))
    g.output(tuple(env[o] for o in outputs))
    for o in outputs:   # (an output that is an input is checked here too)
        row_layout(o, token_dims)
    return RowProgram(torch.fx.GraphModule(torch.nn.Module(), g), free, region)


def _row_args(n: torch.fx.Node, token_dims: tuple, dep):
    """n's args for the row program (views re-sized to [-1, *feat], token-leading dims re-numbered)."""
    t = n.target
    args, kwargs = list(n.args), dict(n.kwargs)
    val = n.meta.get("val")
    feat_out = row_layout(n, token_dims)[1] if isinstance(val, torch.Tensor) else None
    if t is operator.getitem:
        return args, kwargs
    src = next((a for a in _nodes_in(args) if dep(a)), None)
    if t in _VIEWS:
        if any(isinstance(s, torch.SymInt) for s in feat_out):
            raise NotRowWise(f"{n.name} (view) has a symbolic feature size {list(feat_out)}")
        args[1] = [-1, *feat_out]
        return args, kwargs
    if t is aten.expand.default:
        args[1] = [-1, *feat_out]
        return args, kwargs
    if t in (aten.mm.default, aten.addmm.default):
        rows_i = 0 if t is aten.mm.default else 1
        others = [a for i, a in enumerate(args) if i != rows_i and isinstance(a, torch.fx.Node)]
        if not dep(args[rows_i]) or any(dep(a) for a in others):
            raise NotRowWise(f"{n.name} ({_name(n)}) multiplies token rows with token rows")
        bias = args[0].meta.get("val") if t is aten.addmm.default and isinstance(args[0], torch.fx.Node) else None
        if bias is not None and bias.dim() > 1 and int(bias.shape[0]) != 1:
            raise NotRowWise(f"{n.name} (addmm) adds {args[0].name} of shape {list(bias.shape)}, not one row")
        return args, kwargs
    if t is aten.native_layer_norm.default:
        L_in, feat_in = row_layout(src, token_dims)
        if len(args[1]) > len(feat_in):
            raise NotRowWise(f"{n.name} (layer_norm over {list(args[1])}) normalizes over a token dim")
        return args, kwargs
    if t in _DIM_ARG:
        L_in, _ = row_layout(src, token_dims)
        ndim = src.meta["val"].dim() + (t is aten.unsqueeze.default)
        free_tensors = [a for a in _nodes_in(args) if not dep(a) and isinstance(a.meta.get("val"), torch.Tensor)]
        if free_tensors:
            raise NotRowWise(f"{n.name} ({_name(n)}) combines token rows with {free_tensors[0].name}, which is not "
                             "laid out by the tokens")
        i, default = _DIM_ARG[t]
        if i < len(args):
            args[i] = _renumber(args[i], L_in, ndim, n)
            if t is aten.transpose.int:
                args[2] = _renumber(args[2], L_in, ndim, n)
        elif "dim" in kwargs:
            kwargs["dim"] = _renumber(kwargs["dim"], L_in, ndim, n)
        elif default is None or (isinstance(default, int) and default >= 0):
            raise NotRowWise(f"{n.name} ({_name(n)}) works along its default dim(s), which include a token dim")
        return args, kwargs
    if t is aten.permute.default:
        L_in, _ = row_layout(src, token_dims)
        ndim = src.meta["val"].dim()
        dims = [d % ndim for d in args[1]]
        if dims[:L_in] != list(range(L_in)):
            raise NotRowWise(f"{n.name} (permute {args[1]}) moves a token dim")
        args[1] = [0] + [d - L_in + 1 for d in dims[L_in:]]
        return args, kwargs
    if t in _AS_IS or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
        if t not in _AS_IS:
            for a in _nodes_in(args):
                v = a.meta.get("val")
                if not dep(a) and isinstance(v, torch.Tensor) and v.dim() > len(feat_out):
                    raise NotRowWise(f"{n.name} ({_name(n)}) broadcasts {a.name} of shape {list(v.shape)} over "
                                     "the token dims")
        return args, kwargs
    raise NotRowWise(f"{n.name} ({_name(n)}) is not a per-token op: tokens may interact there")


def _renumber(dims, L_in: int, ndim: int, n):
    """Dim argument(s) of a value with L_in leading token dims (ndim dims in all) -> the same dims with
    one row dim; a dim that names a token dim (counting from either end) is refused."""
    def one(d):
        if d is None:
            raise NotRowWise(f"{n.name} ({_name(n)}) works along every dim, the token dims included")
        d = int(d)
        if (d + ndim if d < 0 else d) < L_in:
            raise NotRowWise(f"{n.name} ({_name(n)}) works along dim {d}, a token dim")
        return d if d < 0 else d - L_in + 1

    if isinstance(dims, (list, tuple)):
        if len(dims) == 0:
            raise NotRowWise(f"{n.name} ({_name(n)}) reduces over every dim, the token dims included")
        return [one(d) for d in dims]
    return one(dims)
