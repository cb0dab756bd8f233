"""A dead or stuck rank must make the others fail with a clear error in bounded time (EP and FSSDP tests)."""
from __future__ import annotations

import os
import time

from moe_compiler.runtime.launch import run_ranks

HERE = os.path.dirname(os.path.abspath(__file__))


def fail_last_rank(rank: int, world: int, how: str, call) -> dict:
    """In a spawned rank: the last rank dies ("die") or sleeps past the process-group timeout ("hang");
    the others run call() and report {error: "<type>: <message>" or None, seconds}."""
    if rank == world - 1:
        if how == "die":
            os._exit(3)
        time.sleep(15)  # stuck past the others' process-group timeout (5 s), then leaves quietly
        return dict(error=None, seconds=0.0)
    t0 = time.monotonic()
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return dict(error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    return dict(error=None, seconds=time.monotonic() - t0)


def assert_others_fail_in_bounded_time(target: str, how: str, *expected: str) -> None:
    """Run target ("module:worker") on 2 ranks with a 5 s process-group timeout; rank 0 must raise a
    CommError naming every `expected` string within 20 s, and the whole run end within 45 s."""
    t0 = time.monotonic()
    results = run_ranks(target, 2, {"how": how}, timeout=40, pg_timeout=5, python_path=(HERE,),
                        allow_failures=True)
    assert time.monotonic() - t0 < 45
    r0 = results[0]
    assert isinstance(r0, dict), r0
    assert r0["error"] and "CommError" in r0["error"], r0
    assert all(s in r0["error"] for s in expected), (expected, r0)
    assert r0["seconds"] < 20, r0
