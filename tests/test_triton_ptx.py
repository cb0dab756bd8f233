"""Every kernel in moe_compiler.codegen.triton.moe.KERNELS compiles to PTX for sm_90 and sm_80
without a GPU: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))``.

Needs a process whose triton was imported WITHOUT TRITON_INTERPRET=1 (an interpreted triton has
interpreted library functions, which the compiler cannot lower); under TRITON_INTERPRET=1 the file
re-runs itself in a subprocess with the variable removed.

ptxas: Triton runs its bundled ptxas (triton/backends/nvidia/bin) after the PTX stage, so a
normal compile also yields a cubin.  Without any ptxas, ``triton.compile`` fails up front
("Cannot find ptxas": the backend hash asks for the ptxas version); PTX alone is still produced
with TRITON_MOCK_PTX_VERSION set, an explicit ``ptx_version`` option, and a stages hook
(``knobs.runtime.add_stages_inspection_hook``) that replaces the cubin stage —
``test_ptx_only_without_ptxas`` checks that route by hiding ptxas.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_IN_INTERPRETED = False
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as _tl

    _IN_INTERPRETED = type(_tl.max).__name__ == "InterpretedFunction"

compiled_only = pytest.mark.skipif(
    _IN_INTERPRETED, reason="triton imported under TRITON_INTERPRET=1; run by the subprocess test")

ARCHS = {90: ".target sm_90a", 80: ".target sm_80"}
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
PTX_ONLY_ISA = 87  # PTX ISA 8.7 (CUDA 12.8), used only when no ptxas is available


def _examples():
    if _IN_INTERPRETED:
        return []
    from moe_compiler.codegen.triton.moe import KERNELS

    return [pytest.param(name, ex, id=f"{name}-{ex.name}")
            for name, entry in KERNELS.items() for ex in entry.examples()]


def _ptxas_available() -> bool:
    from triton import knobs

    try:
        return knobs.nvidia.ptxas is not None
    except RuntimeError:  # "Cannot find ptxas"
        return False


def _ptx_only_hook(*args):
    if not args:  # asked for a cache key
        return "moe-compiler-ptx-only", "moe-compiler-ptx-only"
    stages = args[1]
    stages["cubin"] = lambda src, metadata: b""


def _forget_ptxas_version():
    """The NVIDIA backend caches the (possibly mocked) ptxas version per arch; drop it."""
    from triton.backends.nvidia import compiler as nv

    clear = getattr(getattr(nv, "get_ptxas_version", None), "cache_clear", None)
    if clear is not None:
        clear()


def _compile(kernel, ex, arch, *, ptx_only: bool):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=ex.signature, constexprs=ex.constexprs)
    options = dict(ex.options)
    if not ptx_only:
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    old_hook = knobs.runtime.add_stages_inspection_hook
    old_env = os.environ.get("TRITON_MOCK_PTX_VERSION")
    os.environ["TRITON_MOCK_PTX_VERSION"] = "12.8"
    knobs.runtime.add_stages_inspection_hook = _ptx_only_hook
    try:
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(options, ptx_version=PTX_ONLY_ISA))
    finally:
        knobs.runtime.add_stages_inspection_hook = old_hook
        _forget_ptxas_version()
        if old_env is None:
            os.environ.pop("TRITON_MOCK_PTX_VERSION", None)
        else:
            os.environ["TRITON_MOCK_PTX_VERSION"] = old_env


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A private Triton cache, so every test really compiles (no cache hits)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    yield
    if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = old


def _check_ptx(ck, kernel, arch):
    ptx = ck.asm["ptx"]
    assert isinstance(ptx, str) and ARCHS[arch] in ptx, ptx[:400]
    assert f".entry {kernel.__name__}" in ptx
    assert ck.metadata.shared <= SMEM_LIMIT[arch], f"shared memory {ck.metadata.shared} B"
    return ptx


@compiled_only
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name,ex", _examples())
def test_kernel_compiles_to_ptx(name, ex, arch, fresh_cache):
    from moe_compiler.codegen.triton.moe import KERNELS

    kernel = KERNELS[name].kernel
    have_ptxas = _ptxas_available()
    ck = _compile(kernel, ex, arch, ptx_only=not have_ptxas)
    ptx = _check_ptx(ck, kernel, arch)
    if have_ptxas:
        assert len(ck.asm["cubin"]) > 0
    if name == "fused_moe_gemm" and not ex.signature["a_ptr"].endswith("fp32"):
        assert "mma" in ptx  # tensor cores (mma.sync on sm_80, mma/wgmma on sm_90)
    if name == "fused_moe_gemm" and arch == 90 and ex.constexprs["BLOCK_M"] >= 64 \
            and not ex.signature["a_ptr"].endswith("fp32"):
        assert "wgmma" in ptx


@compiled_only
def test_ptx_only_without_ptxas(monkeypatch, fresh_cache):
    """Hide every ptxas (Triton then raises 'Cannot find ptxas') and produce PTX anyway."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_compiler.codegen.triton.moe import KERNELS

    monkeypatch.setattr(knobs.NvidiaTool, "from_path", staticmethod(lambda path: None))
    assert not _ptxas_available()
    entry = KERNELS["fused_moe_gemm"]
    ex = entry.examples()[0]
    with pytest.raises(RuntimeError, match="ptxas"):
        triton.compile(ASTSource(fn=entry.kernel, signature=ex.signature,
                                 constexprs=ex.constexprs), target=GPUTarget("cuda", 90, 32))
    if not hasattr(knobs.runtime, "add_stages_inspection_hook"):
        pytest.skip("this Triton has no stages inspection hook")
    for arch in ARCHS:
        ck = _compile(entry.kernel, ex, arch, ptx_only=True)
        _check_ptx(ck, entry.kernel, arch)
        assert ck.asm["cubin"] == b""


def test_registry_lists_every_kernel():
    """Every @triton.jit function in codegen/triton is in KERNELS (source scan: works in any
    mode)."""
    import re

    import moe_compiler.codegen.triton as pkg

    names = set()
    for f in Path(pkg.__file__).parent.glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+)", f.read_text()))
    from moe_compiler.codegen.triton.moe import KERNELS

    assert names == {e.kernel.__name__ for e in KERNELS.values()}
    for entry in KERNELS.values():
        assert entry.examples(), entry.name


@pytest.mark.skipif(not _IN_INTERPRETED, reason="only needed when triton is interpreted here")
def test_ptx_suite_in_subprocess(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
           "no:cacheprovider", "--rootdir", str(repo)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"PTX suite failed:\n{r.stdout[-12000:]}\n{r.stderr[-4000:]}"
