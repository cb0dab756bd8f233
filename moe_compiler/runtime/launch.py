"""Run a function on N gloo processes on 127.0.0.1 (tests, examples, benchmarks).

    results = run_ranks("my_module:work", world_size=4, args={...}, timeout=120, pg_timeout=30)
    # work(rank, world_size, **args) runs in each process after init_process_group("gloo", ...);
    # its return value (anything torch.save can store) comes back in results[rank].

Each rank is a fresh ``python -m moe_compiler.runtime.launch`` subprocess (1 intra-op thread) on a
free port. The process group timeout (``pg_timeout`` seconds) bounds how long a collective waits
for a dead or stuck peer; ``timeout`` bounds the whole run (stragglers are killed). A rank that
fails raises ``RankFailure`` with every failed rank's exit code and stderr tail, unless
``allow_failures=True`` (then results hold a ``RankFailure`` for that rank).
"""
from __future__ import annotations

import datetime
import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time


class RankFailure(RuntimeError):
    """A rank exited with an error, or the run timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: str, world_size: int, args: dict | None = None, *, timeout: float = 120.0,
              pg_timeout: float = 30.0, python_path: tuple = (), allow_failures: bool = False,
              threads: int = 1) -> list:
    """Run ``target`` ("module:function") on world_size processes; returns each rank's result."""
    import torch

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moe_ep_") as tmp:
        with open(os.path.join(tmp, "args.pkl"), "wb") as f:
            pickle.dump(args or {}, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*python_path, *sys.path])
        env["OMP_NUM_THREADS"] = str(threads)
        procs = []
        for r in range(world_size):
            cmd = [sys.executable, "-m", "moe_compiler.runtime.launch", target, str(r), str(world_size), str(port),
                   tmp, str(pg_timeout), str(threads)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        outs = [None] * world_size
        timed_out = False
        for r, p in enumerate(procs):
            try:
                outs[r] = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for r, p in enumerate(procs):
                if outs[r] is None:
                    outs[r] = p.communicate()
        results, failures = [], []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if p.returncode == 0 and os.path.exists(path):
                results.append(torch.load(path, weights_only=False))
            else:
                err = (outs[r][1] or "")[-3000:]
                why = "killed at the run timeout" if timed_out and p.returncode and p.returncode < 0 else \
                    f"exit code {p.returncode}"
                fail = RankFailure(f"rank {r} of {world_size} ({target}): {why}\n{err}")
                failures.append(fail)
                results.append(fail)
        if failures and not allow_failures:
            raise RankFailure("\n".join(str(f) for f in failures))
        return results


def _main(argv) -> None:
    target, rank, world, port, tmp, pg_timeout, threads = argv
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(threads))
    rank, world = int(rank), int(world)
    with open(os.path.join(tmp, "args.pkl"), "rb") as f:
        args = pickle.load(f)
    mod, fn = target.split(":")
    func = getattr(importlib.import_module(mod), fn)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(pg_timeout)))
    try:
        result = func(rank, world, **args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; the result is saved
            pass


if __name__ == "__main__":
    _main(sys.argv[1:])
