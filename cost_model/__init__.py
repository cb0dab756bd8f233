"""Cost model: symbolic costs and hardware profiles that drive the compiler's choices.

Pure functions (no torch.fx, no side effects at import, nothing from passes/ or codegen/):

    profiles      HardwareProfile, load_profile("h200" | "h100" | "a100" | "cpu" | path), schema checks
    symbols       the symbolic token count T, evaluate(expr, T=...) via lambdify
    compute       LayerShape, grouped GEMM (roofline + small-M efficiency), gating, permute/combine,
                  activation, shared expert, dense bound, weight streaming  (seconds, sympy in T)
    collectives   alpha-beta all-to-all (flat / hierarchical), all-gather, reduce-scatter, Hecate's
                  sparse all-gather / reduce-scatter
    memory        footprint per rank, overlap (exposed / hidden time, overlap degree)
    decisions     Decision + decide_ep_mode, decide_movement, decide_replicas, decide_prefetch_depth,
                  decide_cpu_gemm, decide_cuda_tile
    calibrate     the CPU microbenchmark (``python -m moe_compiler.cost_model.calibrate``)
"""
from moe_compiler.cost_model.compute import LayerShape, dense_bound_time, moe_layer_time
from moe_compiler.cost_model.decisions import Decision
from moe_compiler.cost_model.profiles import HardwareProfile, ProfileError, load_profile, profile_for_device
from moe_compiler.cost_model.symbols import T, evaluate

__all__ = ["Decision", "HardwareProfile", "LayerShape", "ProfileError", "T", "dense_bound_time", "evaluate",
           "load_profile", "moe_layer_time", "profile_for_device"]
