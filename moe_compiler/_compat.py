"""The one place that touches private torch APIs (checked on torch 2.11 and 2.13)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import re

import torch
import torch.fx

log = logging.getLogger(__name__)


def functionalize(gm: torch.fx.GraphModule, example_inputs: list, training: bool = False) -> torch.fx.GraphModule:
    """Dynamo graph -> functional ATen graph with the same placeholders, in order (no autograd).

    ``training``: the graph will be differentiated (aot_autograd re-traces it), so ops that the
    no-grad export specialised for inference are turned back (``_inference_choices_undone``).
    Raises if the graph mutates its inputs or returns aliases of them (callers fall back).
    """
    out = _differentiable_copies(_export(gm, example_inputs))
    return _inference_choices_undone(out) if training else out


# scaled_dot_product_attention decomposes by grad mode: under the no-grad export, CUDA's
# memory-efficient and cuDNN kernels are asked not to compute the logsumexp their backward needs
# (the backward then fails with "LSE is not correctly aligned"). Argument 4 is compute_log_sumexp.
_LOGSUMEXP_ATTENTION = tuple(getattr(torch.ops.aten, name).default
                             for name in ("_scaled_dot_product_efficient_attention",
                                          "_scaled_dot_product_cudnn_attention")
                             if hasattr(torch.ops.aten, name))


def _inference_choices_undone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Attention nodes exported without their logsumexp compute it again (for the backward)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _LOGSUMEXP_ATTENTION and len(n.args) > 4 and n.args[4] is False:
            n.args = (*n.args[:4], True, *n.args[5:])
            changed = True
    if changed:
        gm.recompile()
    return gm


def _export(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
    from torch._functorch.aot_autograd import aot_export_joint_simple

    try:
        with torch.no_grad():
            return aot_export_joint_simple(gm, example_inputs, trace_joint=False)
    except RuntimeError as e:
        if "alias" not in str(e):
            raise
    # Outputs that are views of inputs (e.g. a router graph returning its reshaped input): export
    # a copy of the graph whose outputs are cloned. Only the analysis sees the copies.
    restore = _clone_outputs(gm)
    try:
        with torch.no_grad():
            return aot_export_joint_simple(gm, example_inputs, trace_joint=False)
    finally:
        restore()


def _differentiable_copies(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Functionalization writes slice assignments as aten.copy(dst, src), which has no derivative;
    aot_autograd re-traces this graph for training, so express each as src broadcast and cast to dst."""
    aten = torch.ops.aten
    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not aten.copy.default:
            continue
        dst, src = n.args[0], n.args[1]
        dv, sv = dst.meta["val"], src.meta["val"]
        g = gm.graph
        with g.inserting_before(n):
            cur = src
            if list(sv.shape) != list(dv.shape):
                sizes = [int(s) if isinstance(s, int) else g.call_function(aten.sym_size.int, (dst, i))
                         for i, s in enumerate(dv.shape)]
                for sz in sizes:
                    if isinstance(sz, torch.fx.Node):
                        sz.meta["val"] = dv.shape[sizes.index(sz)]
                cur = g.call_function(aten.expand.default, (cur, sizes))
                cur.meta["val"] = sv.expand(dv.shape)
            new = g.call_function(aten._to_copy.default, (cur,), {"dtype": dv.dtype})
            new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _clone_outputs(gm: torch.fx.GraphModule):
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    old_args = out.args
    added = []

    def wrap(a):
        if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("example_value"), torch.Tensor):
            with gm.graph.inserting_before(out):
                c = gm.graph.call_function(torch.clone, (a,))
            c.meta.update(a.meta)
            added.append(c)
            return c
        return a

    out.args = torch.fx.node.map_aggregate(old_args, wrap)
    gm.recompile()

    def restore():
        out.args = old_args
        for c in reversed(added):
            gm.graph.erase_node(c)
        gm.recompile()

    return restore


def source_fingerprint(*roots: str) -> str:
    """16 hex digits of a digest of the Python sources under ``roots`` (names and contents)."""
    digest = hashlib.sha256()
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


# the package's source folders: one in an installed wheel, four in a checkout (pyproject's package-dir)
_SOURCE_PACKAGES = ("moe_compiler", "moe_compiler.passes", "moe_compiler.codegen", "moe_compiler.cost_model")


@functools.cache
def _package_cache_tag() -> str:
    folders = sorted({os.path.realpath(p) for name in _SOURCE_PACKAGES for p in importlib.import_module(name).__path__})
    roots = [f for f in folders if not any(f.startswith(other + os.sep) for other in folders)]
    return "moe_compiler-" + source_fingerprint(*roots)


@contextlib.contextmanager
def inductor_caches_keyed_by_package():
    """Add this package's source fingerprint to the key of Inductor's and AOTAutograd's on-disk caches
    while inside. The graphs the backend compiles call the package's ops, and those caches do not key
    on how an op is registered: a graph compiled while an op was not marked side-effecting (Inductor
    then drops one whose output nobody reads) would otherwise be served again after an upgrade.
    The user's own ``torch.compiler.config.cache_key_tag`` is kept in front."""
    config = getattr(torch.compiler, "config", None)
    tag = getattr(config, "cache_key_tag", None)
    ours = _package_cache_tag()
    if tag is None or ours in tag:
        yield
        return
    with config.patch(cache_key_tag=f"{tag}+{ours}" if tag else ours):
        yield


def compile_inductor(gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None, inner_compile=None):
    """Hand a graph to Inductor (which runs aot_autograd: forward and backward graphs); its on-disk
    caches are keyed by this package's sources too (``inductor_caches_keyed_by_package``)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = {}
    if mode not in (None, "default"):
        patches = dict(torch._inductor.list_mode_options(mode))
    kwargs = {"config_patches": patches} if patches else {}
    if inner_compile is not None:
        kwargs["inner_compile"] = inner_compile
    with inductor_caches_keyed_by_package():
        return compile_fx(gm, example_inputs, **kwargs)


def compile_fx_inner(*args, **kwargs):
    """Inductor's compile of one ATen graph (the backward's is called lazily, at the first backward:
    outside ``compile_inductor``, so the cache key is salted here too)."""
    from torch._inductor.compile_fx import compile_fx_inner as inner

    with inductor_caches_keyed_by_package():
        return inner(*args, **kwargs)


def compile_eager_aot(gm: torch.fx.GraphModule, example_inputs: list, fw_hook=None):
    """aot_autograd with the graphs run as plain fx code (the "eager" inner backend)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw(g, inputs):
        if fw_hook:
            fw_hook(g, "forward")
        return make_boxed_func(g.forward)

    def bw(g, inputs):
        if fw_hook:
            fw_hook(g, "backward")
        return make_boxed_func(g.forward)

    return aot_autograd(fw_compiler=fw, bw_compiler=bw)(gm, example_inputs)


def debug_dir() -> str:
    """torch's debug folder (TORCH_COMPILE_DEBUG=1), e.g. torch_compile_debug/run_.../"""
    from torch._dynamo.utils import get_debug_dir

    return get_debug_dir()


def trace_artifact(name: str, text: str) -> None:
    """Emit a string artifact into the structured trace (TORCH_TRACE); tlparse shows it."""
    try:
        from torch._logging import trace_structured

        trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                         payload_fn=lambda: text)
    except Exception:  # pragma: no cover - never let logging break compilation
        log.debug("trace_structured unavailable", exc_info=True)


_SOURCE_KEY = re.compile(r"\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def placeholder_paths(gm: torch.fx.GraphModule, known_names: dict | None = None) -> list:
    """Per placeholder: dotted module path of a parameter/buffer ("model.layers.0.mlp.gate.weight"), else None.

    known_names maps id(tensor) -> full name (from the model being explained), which gives absolute
    paths even for frames dynamo compiled separately after a graph break.
    """
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        ga = n.meta.get("grapharg")
        example = getattr(ga, "example", None)
        if known_names and example is not None and id(example) in known_names:
            out.append(known_names[id(example)])
            continue
        src = getattr(getattr(ga, "source", None), "name", None)
        src = src() if callable(src) else src
        if not src or ("_parameters" not in src and "_buffers" not in src and not isinstance(getattr(ga, "example", None), torch.nn.Parameter)):
            out.append(None)
            continue
        parts = []
        for m in _SOURCE_KEY.finditer(src.split("]", 1)[1] if src.startswith("L[") else src):
            key = m.group(1) or m.group(2) or m.group(3)
            if key and key not in _CONTAINERS:
                parts.append(key)
        out.append(".".join(parts))
    return out


def module_constant_placeholders(gm: torch.fx.GraphModule) -> list:
    """Per placeholder of a dynamo graph: True for a non-tensor attribute of the compiled module that dynamo
    lifted to a graph input (under dynamic=True a float such as a norm's variance_epsilon becomes a 0-dim
    tensor input), i.e. a constant of the model rather than data the caller passed."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        src = getattr(getattr(n.meta.get("grapharg"), "source", None), "name", None)
        src = src() if callable(src) else src
        val = n.meta.get("example_value")
        out.append(bool(src) and src.startswith("L['self']") and "_parameters" not in src and "_buffers" not in src
                   and isinstance(val, torch.Tensor) and val.dim() == 0)
    return out


def fake_mode_of(gm: torch.fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    return detect_fake_mode(vals)


def fake_like(gm: torch.fx.GraphModule, tensor: torch.Tensor):
    """A fake copy of a real tensor in the graph's fake mode (meta["val"] of a new get_attr node);
    the real tensor itself when the graph has no fake mode."""
    mode = fake_mode_of(gm)
    return mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor


def allow_data_dependent_scalars(gm: torch.fx.GraphModule) -> None:
    """Let tracing turn tensor values into unbacked SymInts (``.tolist()`` of the functional expert-parallel
    layers' counts), as ``torch._dynamo.config.capture_scalar_outputs`` does for the graphs dynamo traces."""
    import dataclasses

    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    for mode in (fake_mode_of(gm), ctx.fake_mode if ctx is not None else None):
        env = getattr(mode, "shape_env", None)
        if env is not None and not env.allow_scalar_outputs:
            # a read-only property over a frozen ShapeEnvSettings (torch 2.11-2.13)
            env.settings = dataclasses.replace(env.settings, allow_scalar_outputs=True)


def statically_equal(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def current_graph_name() -> str:
    """A short id of the frame dynamo is compiling, for dump folder names."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
        if cid is not None:
            return str(cid).replace("/", "_").replace(" ", "").strip("[]").replace("]", "").replace("[", "")
    except Exception:  # pragma: no cover
        pass
    return ""


def size_hint(x, fallback: int = 1024) -> int:
    """A concrete int for a possibly symbolic size (its example value), without adding a guard."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    hint = getattr(x.node, "hint", None)   # the value it had in the example (None: unbacked)
    return int(hint) if hint is not None else fallback


def resolve_process_group(name: str):
    """A torch.distributed process group by its registered name."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)
