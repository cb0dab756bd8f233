"""Expert reads in a separate process, for the CPU fast tier (option offload["loader"] = "process").

A Python loader thread costs the model thread more than its reads: every time it returns from a
syscall it takes the GIL back, and the model thread waits for it (BENCHMARKS.md, "Expert offloading":
a background thread doing 400 reads/s slowed resident decode by 3.6 ms per step; the same reads
from another process, by at most 1.5). This loader hands the reads and the checksums to a child
process (runtime/_loader_child.py, standard library and xxhash only) that writes each file into a
slot of a shared staging file; the model's process only sends a line per request, reads a line per
reply and copies the checked bytes out of the slot.

    loader = ProcessLoader(slot_bytes=1 << 20, slots=8, drop_page_cache=True)
    loader.submit(key, path, xxh3_64, priority)   # False when every slot is taken
    for key, slot, size, error in loader.poll(timeout=0.0):
        raw = loader.slot(slot)[:size]          # uint8 view of the file; copy it out, then
        loader.release(slot)
    loader.close()

Staging memory is ``slots * slot_bytes`` outside the fast tier's budget (loads in flight). The
staging file lives in /dev/shm where there is one and is unlinked as soon as the child has mapped
it, so nothing is left behind if either process dies. A child that exits makes every call raise.
"""
from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import tempfile
import time

import torch

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_loader_child.py")
STAGING_CAP = 64 << 20   # staging bytes a store aims at: up to 16 slots, at least 2


def staging_slots(slot_bytes: int) -> int:
    return max(2, min(16, STAGING_CAP // max(slot_bytes, 1)))


class LoaderProcessError(RuntimeError):
    """The loader process exited or stopped answering."""


class ProcessLoader:
    """A child process reading expert files into ``slots`` shared slots of ``slot_bytes`` each."""

    def __init__(self, slot_bytes: int, slots: int, drop_page_cache: bool, start_timeout: float = 60.0):
        self.slot_bytes = -(-slot_bytes // 4096) * 4096   # whole blocks: the child may read with O_DIRECT
        self.slots = slots
        folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="moe_compiler_staging_", dir=folder)
        try:
            os.ftruncate(fd, self.slot_bytes * slots)
            self._mm = mmap.mmap(fd, self.slot_bytes * slots)
        finally:
            os.close(fd)
        self.staging = torch.frombuffer(self._mm, dtype=torch.uint8)
        try:
            self.proc = subprocess.Popen([sys.executable, CHILD, path, str(slots), str(self.slot_bytes),
                                          "1" if drop_page_cache else "0"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
            self._out = self.proc.stdout.fileno()
            os.set_blocking(self._out, False)
            self._buf = b""
            self._free = list(range(slots - 1, -1, -1))
            self._inflight: dict = {}       # request id -> (key, slot)
            self._next_id = 0
            deadline = time.monotonic() + start_timeout
            while True:
                line = self._line(deadline - time.monotonic())
                if line == "ready":
                    break
                if line is None and time.monotonic() >= deadline:
                    raise LoaderProcessError(f"the expert loader process did not start within {start_timeout} s")
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(path)

    # ------------------------------------------------------------------ requests
    def free_slots(self) -> int:
        return len(self._free)

    def in_flight(self) -> int:
        return len(self._inflight)

    def in_flight_keys(self) -> list:
        return [key for key, _ in self._inflight.values()]

    def submit(self, key, path: str, digest: int, priority: int) -> bool:
        """Ask the child to read ``path`` into a free slot; False when none is free."""
        if not self._free:
            return False
        self._check_alive()
        slot = self._free.pop()
        req = self._next_id
        self._next_id += 1
        self._inflight[req] = (key, slot)
        try:
            self.proc.stdin.write(f"{req} {slot} {priority} {digest} {path}\n".encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise LoaderProcessError(f"the expert loader process stopped taking requests ({e})") from e
        return True

    def poll(self, timeout: float = 0.0) -> list:
        """Finished reads as (key, slot, file bytes, error message or None); waits up to timeout
        seconds for the first one when none has finished."""
        done = []
        line = self._line(timeout)
        while line is not None:
            req, status, rest = (line.split(" ", 2) + [""])[:3]
            key, slot = self._inflight.pop(int(req))
            done.append((key, slot, int(rest), None) if status == "ok" else (key, slot, 0, rest))
            line = self._line(0.0)
        return done

    def slot(self, slot: int) -> torch.Tensor:
        """uint8 [slot_bytes] view of one slot of the staging file."""
        return self.staging[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def release(self, slot: int) -> None:
        self._free.append(slot)

    # ------------------------------------------------------------------ plumbing
    def _line(self, timeout: float):
        """The child's next reply line, or None when none arrives within timeout (>= 0) seconds."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if not select.select([self._out], [], [], max(left, 0.0))[0]:
                if left <= 0:
                    return None
                continue
            chunk = os.read(self._out, 1 << 16)
            if not chunk:
                self._check_alive(eof=True)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _check_alive(self, eof: bool = False) -> None:
        code = self.proc.poll()
        if eof or code is not None:
            if code is None:
                code = self.proc.wait(timeout=5)
            raise LoaderProcessError(f"the expert loader process exited (code {code}) with "
                                     f"{len(self._inflight)} reads in flight")

    def close(self, timeout: float = 5.0) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b"Q\n")
                proc.stdin.flush()
                proc.stdin.close()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc is not None:
            proc.stdout.close()
        # the mapping is unmapped when the last view of it goes (an explicit close would fail while
        # a tensor still views the staging memory)
        self.staging = self._mm = None
