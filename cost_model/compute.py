"""Compute and memory-traffic costs of one MoE layer on one device (seconds, sympy expressions in T).

Shapes (one rank, one step): hidden [T, H]; router [E, H]; per expert w1 [N1, H] (N1 = 2I gated,
I ungated), w2 [H, I]; top-k slots S = T * k; optional shared expert (a dense gated MLP of width Is).

GEMM model (roofline with a small-M efficiency term): a GEMM of ``rows`` x K x N made of ``calls``
per-expert GEMMs costs

    calls * overhead + Max(2 * N * K * (rows + calls * m_half) / (peak * eff),     # compute
                           (calls * N * K + rows * (N + K)) * bytes / mem_bandwidth) # weights + activations

i.e. each call runs at eff * m / (m + m_half) of peak with m rows: small per-expert row counts are
slow (weight-bandwidth / packing bound), large ones reach the profile's GEMM efficiency. Routing is
assumed uniform: the expected number of experts with at least one token is
``E * (1 - (1 - k/E) ** T)`` and every active expert gets ``T * k / active`` rows.
Elementwise and indexing ops cost op_overhead each plus their bytes over memory bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from moe_compiler.cost_model.profiles import HardwareProfile
from moe_compiler.cost_model.symbols import T, as_expr

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one MoE layer that its costs depend on."""

    num_experts: int      # E
    top_k: int            # k
    hidden: int           # H
    ffn: int              # I, per expert
    gated: bool = True    # gate and up projections (N1 = 2I) vs one up projection (N1 = I)
    shared_ffn: int = 0   # Is, width of a dense shared expert (0 = none)
    dtype: str = "fp32"   # "fp32" | "bf16" | "fp16"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"LayerShape.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not (1 <= self.top_k <= self.num_experts):
            raise ValueError(f"LayerShape needs 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                             f"num_experts={self.num_experts}")

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def n1(self) -> int:
        return 2 * self.ffn if self.gated else self.ffn

    @property
    def expert_bytes(self) -> int:
        """One expert's weights (w1 and w2), bytes."""
        return (self.n1 + self.ffn) * self.hidden * self.bytes

    @property
    def expert_flops_per_row(self) -> int:
        """FLOPs of one token-slot through one expert (forward)."""
        return 2 * self.hidden * (self.n1 + self.ffn)


def active_experts(tokens, num_experts: int, top_k: int):
    """Expected experts with at least one of ``tokens`` tokens under uniform top-k routing."""
    tokens = as_expr(tokens)
    if top_k >= num_experts:
        return sympy.Integer(num_experts)
    return num_experts * (1 - sympy.Rational(num_experts - top_k, num_experts) ** tokens)


def gemm_time(rows, n: int, k: int, profile: HardwareProfile, dtype: str = "fp32", calls=1,
              variant: str = "default"):
    """Seconds for ``calls`` GEMMs with ``rows`` rows in all, each [m, k] x [k, n] (module docstring)."""
    rows, calls = as_expr(rows), as_expr(calls)
    g = profile.gemm(variant)
    b = DTYPE_BYTES[dtype]
    compute = 2 * n * k * (rows + calls * g.small_m_rows) / (profile.flops(dtype) * g.gemm_efficiency)
    traffic = (calls * n * k + rows * (n + k)) * b / profile.mem_bandwidth
    return calls * g.gemm_overhead_s + sympy.Max(compute, traffic)


def elementwise_time(nbytes, profile: HardwareProfile, ops=1):
    """Seconds for ``ops`` memory-bound ops moving ``nbytes`` in all (reads + writes)."""
    return as_expr(ops) * profile.op_overhead_s + as_expr(nbytes) / profile.mem_bandwidth


def gating_time(layer: LayerShape, profile: HardwareProfile, tokens=T):
    """Router GEMM [T, H] x [H, E] plus softmax/sigmoid and top-k over fp32 scores [T, E]."""
    t = as_expr(tokens)
    router = gemm_time(t, layer.num_experts, layer.hidden, profile, layer.dtype)
    scores = elementwise_time(t * layer.num_experts * 4 * 4 + t * layer.top_k * 8 * 2, profile, ops=4)
    return router + scores


def permute_combine_time(layer: LayerShape, profile: HardwareProfile, tokens=T):
    """Sort slots by expert, gather rows [S, H], weight and scatter-add back to [T, H] in fp32."""
    t = as_expr(tokens)
    s = t * layer.top_k
    b = layer.bytes
    sort = elementwise_time(s * 8 * 4, profile, ops=4)                      # argsort, div, bincount, index
    gather = elementwise_time(s * layer.hidden * b * 2, profile, ops=1)      # xs = hidden[token]
    combine = elementwise_time(s * layer.hidden * (b + 4) * 2 + t * layer.hidden * (4 + b) * 2, profile, ops=4)
    return sort + gather + combine


def activation_time(layer: LayerShape, profile: HardwareProfile, tokens=T, calls=None):
    """act(gate) * up over [S, I]: activation, product and the copy of the result, per active expert."""
    t = as_expr(tokens)
    calls = active_experts(t, layer.num_experts, layer.top_k) if calls is None else as_expr(calls)
    return elementwise_time(t * layer.top_k * layer.ffn * layer.bytes * 5, profile, ops=3 * calls)


def experts_time(layer: LayerShape, profile: HardwareProfile, tokens=T, variant: str = "default"):
    """The two grouped GEMMs (per-expert GEMMs on sorted tokens) of the routed experts, forward."""
    t = as_expr(tokens)
    act = active_experts(t, layer.num_experts, layer.top_k)
    s = t * layer.top_k
    up = gemm_time(s, layer.n1, layer.hidden, profile, layer.dtype, calls=act, variant=variant)
    down = gemm_time(s, layer.hidden, layer.ffn, profile, layer.dtype, calls=act, variant=variant)
    return up + down


def shared_expert_time(layer: LayerShape, profile: HardwareProfile, tokens=T):
    """Dense shared expert (gated MLP of width Is) over all T tokens; 0 when there is none."""
    if not layer.shared_ffn:
        return sympy.Integer(0)
    t = as_expr(tokens)
    s = layer.shared_ffn
    return (gemm_time(t, 2 * s, layer.hidden, profile, layer.dtype) + gemm_time(t, layer.hidden, s, profile, layer.dtype)
            + elementwise_time(t * s * layer.bytes * 5 + t * layer.hidden * layer.bytes * 3, profile, ops=3))


def fresh_buffer_time(nbytes: float, profile: HardwareProfile):
    """Page-fault seconds of a buffer of ``nbytes`` (a number) that gets fresh pages on every
    allocation: nbytes / page_fault_bandwidth at or above profile.large_alloc_bytes, else 0; always 0
    when the profile has a caching allocator (no large_alloc_bytes)."""
    if profile.large_alloc_bytes is None or nbytes < profile.large_alloc_bytes:
        return sympy.Integer(0)
    return sympy.Float(nbytes / profile.page_fault_bandwidth)


def moe_layer_time(layer: LayerShape, profile: HardwareProfile, tokens=T, *, training: bool = False,
                   variant: str = "default") -> dict:
    """Named terms and their sum ("total") of one MoE layer, forward or forward + backward.

    Backward: every GEMM gives two of the same size (grad input, grad weight), elementwise and
    indexing work doubles. Training uses the plain GEMM variant (prepacking is for fixed weights).
    Training also allocates the stacked expert-weight gradients [E, N1, H] and [E, H, I] every step:
    "fresh_buffers" charges page faults for those at or above the profile's large_alloc_bytes (CPU).
    """
    terms = {"gating": gating_time(layer, profile, tokens),
             "permute_combine": permute_combine_time(layer, profile, tokens),
             "experts": experts_time(layer, profile, tokens, "default" if training else variant),
             "activation": activation_time(layer, profile, tokens),
             "shared_expert": shared_expert_time(layer, profile, tokens)}
    if training:
        terms = {k: 3 * v for k, v in terms.items()}
        b = layer.bytes
        buffers = (layer.num_experts * layer.n1 * layer.hidden * b, layer.num_experts * layer.hidden * layer.ffn * b)
        terms["fresh_buffers"] = sum((fresh_buffer_time(n, profile) for n in buffers), sympy.Integer(0))
    terms["total"] = sum(terms.values())
    return terms


def dense_bound_time(layer: LayerShape, profile: HardwareProfile, tokens=T, *, training: bool = False):
    """The same FLOPs as dense matmuls: all S slots through one [H, N1] and one [I, H] GEMM (+ shared)."""
    t = as_expr(tokens)
    s = t * layer.top_k
    total = (gating_time(layer, profile, t) + gemm_time(s, layer.n1, layer.hidden, profile, layer.dtype)
             + gemm_time(s, layer.hidden, layer.ffn, profile, layer.dtype)
             + elementwise_time(s * layer.ffn * layer.bytes * 5 + s * layer.hidden * layer.bytes * 3, profile, ops=4)
             + shared_expert_time(layer, profile, t))
    return 3 * total if training else total


def weight_stream_time(nbytes, link_bandwidth: float, latency: float = 0.0, messages=1):
    """Seconds to move ``nbytes`` of weights over a link (host -> device, or a memory read)."""
    return as_expr(messages) * latency + as_expr(nbytes) / link_bandwidth
