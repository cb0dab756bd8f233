"""moe_compiler: a torch.compile backend for Mixture-of-Experts models.

    torch.compile(model, backend="moe")                 # registered by the package's entry point
    moe_compiler.explain(model, *inputs)                 # what was found, rewritten, dumped

The backend is NOT registered at import time (the torch_dynamo_backends entry point does that).
"""
from moe_compiler import ir  # noqa: F401  (registers the moe_compiler custom ops)
from moe_compiler.codegen import ops as _lowered_ops  # noqa: F401  (registers the lowered ops)
from moe_compiler.config import BackendConfig, ConfigError
from moe_compiler.explain import ExplainReport, MoELayerReport, explain
from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec
from moe_compiler.modules import MoELayer
from moe_compiler.recording import RoutingRecorder, record_routing
from moe_compiler.runtime.expert_parallel import shard_experts

__all__ = ["BackendConfig", "ConfigError", "ExplainReport", "ExpertSpec", "MoELayer", "MoELayerReport", "MoESpec",
           "RouterSpec", "RoutingRecorder", "explain", "record_routing", "shard_experts"]
__version__ = "0.1.0"
