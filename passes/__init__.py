"""The pass pipeline (installed as moe_compiler.passes). One file per rewrite family.

Every pass is a frozen dataclass with typed option fields, a ``name`` and ``call(gm, ctx) -> PassResult``
(see moe_compiler.pipeline). ``PIPELINE`` is the default order; ``build_pipeline`` applies the config
(``disable_passes``, ``pass_options``).
"""
from __future__ import annotations

import dataclasses

from moe_compiler.config import BackendConfig, ConfigError
from moe_compiler.passes.cost_decisions import CostDecisions
from moe_compiler.passes.detect_moe import DetectMoE
from moe_compiler.passes.fuse_gating import FuseGating
from moe_compiler.passes.hoist_prefetch import HoistPrefetch
from moe_compiler.passes.offload_experts import OffloadExperts
from moe_compiler.passes.plan_placement import PlanPlacement
from moe_compiler.passes.rewrite_dispatch import RewriteDispatch
from moe_compiler.passes.sparse_collectives import SparseCollectives

PIPELINE = (DetectMoE, PlanPlacement, CostDecisions, SparseCollectives, FuseGating, RewriteDispatch, OffloadExperts,
            HoistPrefetch)
PASSES = {p.name: p for p in PIPELINE}


def pass_options(cls) -> list:
    """(name, type, default) of a pass's options."""
    return [(f.name, str(f.type), f.default) for f in dataclasses.fields(cls)]


def build_pipeline(config: BackendConfig) -> list:
    unknown = sorted(set(config.disable_passes) - set(PASSES))
    if unknown:
        raise ConfigError(f"option 'disable_passes' names unknown passes {unknown}; passes are {sorted(PASSES)}")
    unknown = sorted(set(config.pass_options) - set(PASSES))
    if unknown:
        raise ConfigError(f"option 'pass_options' names unknown passes {unknown}; passes are {sorted(PASSES)}")
    out = []
    for cls in PIPELINE:
        if cls.name in config.disable_passes:
            continue
        kwargs = {}
        if cls is DetectMoE:
            kwargs["verify"] = config.verify
        given = dict(config.pass_options.get(cls.name, {}))
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(given) - fields)
        if bad:
            raise ConfigError(f"pass_options[{cls.name!r}] has unknown keys {bad}; valid keys are {sorted(fields)}")
        kwargs.update(given)
        out.append(cls(**kwargs))
    return out
