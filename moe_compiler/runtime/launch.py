"""Run a function on N gloo processes on 127.0.0.1 (tests, examples, benchmarks).

    results = run_ranks("my_module:work", world_size=4, args={...}, timeout=120, pg_timeout=30)
    # work(rank, world_size, **args) runs in each process after init_process_group("gloo", ...);
    # its return value (anything torch.save can store) comes back in results[rank].

Each rank is a fresh ``python -m moe_compiler.runtime.launch`` subprocess (1 intra-op thread); the
rendezvous store lives in the calling process. The process group timeout (``pg_timeout`` seconds)
bounds how long a collective waits for a dead or stuck peer; ``timeout`` bounds the whole run
(stragglers are killed). A rank that fails raises ``RankFailure`` with every failed rank's exit
code and stderr tail, unless ``allow_failures=True`` (then results hold a ``RankFailure`` for that
rank).
"""
from __future__ import annotations

import datetime
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time


class RankFailure(RuntimeError):
    """A rank exited with an error, or the run timed out."""


INIT_FAILED = 75  # a rank's exit code when init_process_group failed (EX_TEMPFAIL): the run is retried


def run_ranks(target: str, world_size: int, args: dict | None = None, *, timeout: float = 120.0,
              pg_timeout: float = 30.0, python_path: tuple = (), allow_failures: bool = False,
              threads: int = 1, init_attempts: int = 3) -> list:
    """Run ``target`` ("module:function") on world_size processes; returns each rank's result.

    The rendezvous store is hosted here, bound before any rank starts: a port picked free and bound
    later by rank 0 can be taken meanwhile, even by a rank's own connect to it (a TCP self-connect).
    A run whose ranks failed only while joining the process group is started again with a new store,
    up to ``init_attempts`` runs; a failure inside ``target`` is never retried."""
    import torch

    with tempfile.TemporaryDirectory(prefix="moe_ep_") as tmp:
        with open(os.path.join(tmp, "args.pkl"), "wb") as f:
            pickle.dump(args or {}, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*python_path, *sys.path])
        env["OMP_NUM_THREADS"] = str(threads)
        deadline = time.monotonic() + timeout
        for attempt in range(init_attempts):
            procs, outs, timed_out = _spawn_and_wait(target, world_size, tmp, env, pg_timeout, threads, deadline)
            init_failed = any(p.returncode == INIT_FAILED for p in procs)
            if not init_failed or timed_out or attempt == init_attempts - 1:
                break
        results, failures = [], []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pt")
            if p.returncode == 0 and os.path.exists(path):
                results.append(torch.load(path, weights_only=False))
            else:
                err = (outs[r][1] or "")[-3000:]
                why = "killed at the run timeout" if timed_out and p.returncode and p.returncode < 0 else \
                    f"exit code {p.returncode}"
                if init_failed:
                    why += f" (joining the process group failed in all {attempt + 1} attempts)"
                fail = RankFailure(f"rank {r} of {world_size} ({target}): {why}\n{err}")
                failures.append(fail)
                results.append(fail)
        if failures and not allow_failures:
            raise RankFailure("\n".join(str(f) for f in failures))
        return results


def _spawn_and_wait(target, world_size, tmp, env, pg_timeout, threads, deadline):
    """Start the ranks around a new store and wait for all of them (or the deadline); a rank that
    could not join the process group stops the others at once. Returns (procs, [(stdout, stderr)],
    timed_out)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=float(pg_timeout)))
    port = store.port
    procs = [subprocess.Popen([sys.executable, "-m", "moe_compiler.runtime.launch", target, str(r), str(world_size),
                               str(port), tmp, str(pg_timeout), str(threads)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world_size)]
    outs = [None] * world_size
    timed_out = False
    while any(o is None for o in outs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        for r, p in enumerate(procs):
            if outs[r] is None:
                try:
                    outs[r] = p.communicate(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                if p.returncode == INIT_FAILED:
                    break
        if any(p.returncode == INIT_FAILED for p in procs):
            break
    for p in procs:
        if p.poll() is None:
            p.kill()
    for r, p in enumerate(procs):
        if outs[r] is None:
            outs[r] = p.communicate()
    del store
    return procs, outs, timed_out


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
    try:
        timeout = datetime.timedelta(seconds=float(pg_timeout))
        store = dist.TCPStore("127.0.0.1", int(port), world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any rendezvous failure: run_ranks starts the run again
        print(f"rank {rank}: joining the gloo process group on port {port} failed: {e!r}", file=sys.stderr)
        sys.exit(INIT_FAILED)
    try:
        result = func(rank, world, **args)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; the result is saved
            pass
    # the result is saved: leave without interpreter finalization. After a peer died or hung, gloo can
    # still hold a timed-out collective's work, whose tensors are freed during finalization without the
    # interpreter (SIGABRT, "terminate called without an active exception"), failing a finished rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
