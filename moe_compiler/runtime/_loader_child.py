"""The loader process of an expert store (runtime.loader_process): reads expert files into a shared
staging file and checks them, so that reads cost the model's process no GIL time.

The standard library and xxhash only, run by path, not ``-m`` (importing the package would import
torch):

    python _loader_child.py STAGING SLOTS SLOT_BYTES DROP_PAGE_CACHE

    stdin, a request a line:  "<id> <slot> <priority> <xxh3_64> <path>"  (lower priority first, then id)
                              "Q"                                        quit (so does end of input)
    stdout, a reply a line:   "ready" once, then "<id> ok <file bytes>" or "<id> err <message>"

With DROP_PAGE_CACHE 1 files are read with O_DIRECT where the file system allows it (slots are
whole 4096-byte blocks), else buffered and their pages dropped afterwards (posix_fadvise DONTNEED).

A reply "ok" means the whole file is in the slot (bytes [slot * SLOT_BYTES, ... + file bytes) of
STAGING), its safetensors header parses, every tensor's bytes lie inside the file, and the XXH3-64 of
the tensors' bytes (names in sorted order, as runtime.expert_files writes it) equals the request's.
"""
import errno
import fcntl
import json
import mmap
import os
import select
import sys

import xxhash


BLOCK = 4096            # O_DIRECT reads whole blocks into block-aligned memory (slots start on one)
_direct = [hasattr(os, "O_DIRECT")]   # turned off for good by the first file system that refuses it


def _read_into(path: str, view: memoryview, drop_page_cache: bool) -> int:
    """Read the file into view (a slot); returns its size. With drop_page_cache the read bypasses the
    page cache (O_DIRECT) where the file system allows it, else its pages are dropped afterwards."""
    direct = drop_page_cache and _direct[0]
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError as e:
        if not (direct and e.errno == errno.EINVAL):
            raise
        _direct[0] = direct = False
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = -(-size // BLOCK) * BLOCK if direct else size
        if end > len(view):
            raise ValueError(f"the file has {size} bytes, more than the staging slot's {len(view)}")
        got = 0
        while got < size:
            try:
                n = os.preadv(fd, [view[got:end]], got)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                _direct[0] = direct = False   # the file system took the flag but not the read: read buffered
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                end = size
                continue
            if n == 0:
                raise ValueError(f"short read: {got} of {size} bytes")
            got += n
        return size
    finally:
        if drop_page_cache and not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _check(view: memoryview, size: int, expected: int):
    """None when the safetensors file in view[:size] is whole and its tensors' XXH3-64 is expected, else
    what is wrong."""
    if size < 8:
        return "the file is shorter than a safetensors header"
    header_len = int.from_bytes(view[:8], "little")
    base = 8 + header_len
    if base > size:
        return "its header length runs past the end of the file"
    try:
        header = json.loads(bytes(view[8:base]))
        spans = [(name, header[name]["data_offsets"]) for name in sorted(header) if name != "__metadata__"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its safetensors header cannot be parsed ({e})"
    h = xxhash.xxh3_64()
    for name, (start, end) in spans:
        if not 0 <= start <= end <= size - base:
            return f"tensor {name!r} lies outside the file"
        h.update(view[base + start:base + end])
    if h.intdigest() != expected:
        return "is corrupt: its XXH3-64 checksum does not match the one written with it"
    return None


def _serve(staging: str, slots: int, slot_bytes: int, drop_page_cache: bool) -> None:
    fd = os.open(staging, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, slots * slot_bytes)
    finally:
        os.close(fd)
    view = memoryview(mm)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    pending, buf, closing = [], b"", False
    stdin = sys.stdin.fileno()
    while True:
        # take every request that has arrived, so a demand load jumps the prefetches queued before it
        while not closing and select.select([stdin], [], [], None if not pending else 0)[0]:
            chunk = os.read(stdin, 1 << 16)
            if not chunk:
                closing = True
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"Q":
                    closing = True
                    break
                req, slot, priority, digest, path = line.decode().split(" ", 4)
                pending.append((int(priority), int(req), int(slot), int(digest), path))
            if closing:
                break
        if closing or not pending:
            if closing:
                return
            continue
        pending.sort()
        _, req, slot, digest, path = pending.pop(0)
        slot_view = view[slot * slot_bytes:(slot + 1) * slot_bytes]
        try:
            size = _read_into(path, slot_view, drop_page_cache)
            problem = _check(slot_view, size, digest)
        except (OSError, ValueError) as e:
            problem = f"cannot be read: {e}"
        reply = f"{req} ok {size}" if problem is None else f"{req} err {problem}".replace("\n", " ")
        out.write(reply.encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
