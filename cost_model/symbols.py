"""The free sizes costs are written in, and evaluating costs for concrete sizes.

    T   tokens on one rank in one step (the symbolic batch size a dynamic graph is compiled for)

Every cost in this package is a sympy expression in ``T`` (seconds, or bytes for memory), so one
compiled graph's cost holds for every batch size. ``evaluate`` substitutes concrete values through a
cached ``sympy.lambdify`` (numpy), so it also takes arrays of sizes.
"""
from __future__ import annotations

import functools

import numpy as np
import sympy

T = sympy.Symbol("T", positive=True)


def as_expr(x) -> sympy.Expr:
    return x if isinstance(x, sympy.Basic) else sympy.Float(x)


@functools.lru_cache(maxsize=4096)
def _compiled(expr: sympy.Expr, names: tuple):
    syms = [sympy.Symbol(n, positive=True) for n in names]
    return sympy.lambdify(syms, expr, modules=["numpy"])


def evaluate(expr, **sizes):
    """Value of a cost for concrete sizes, e.g. ``evaluate(cost, T=1024)`` -> float (or an array for arrays).

    Every free symbol of ``expr`` must be given; a missing one is a clear error.
    """
    expr = as_expr(expr)
    names = tuple(sorted(s.name for s in expr.free_symbols))
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"evaluate needs values for {missing} (the cost's free sizes are {list(names)})")
    out = _compiled(expr, names)(*[np.asarray(sizes[n], dtype=float) for n in names])
    out = np.asarray(out, dtype=float)
    return float(out) if out.ndim == 0 else out
