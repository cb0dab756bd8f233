"""The disk tier of the expert store: one safetensors file per expert, checked on every read.

    <root>/<layer>/expert_<e>.safetensors   tensors {"w1": [N1, H] or [H, N1], "w2": ..., "b1": ...}
    <root>/<layer>/manifest.json            {"names": [...], "num_experts": E, "bytes": [...],
                                             "xxh3_64": [...], "shapes": {...}, "dtype": "..."}

Reads go to the disk, as they would for a model larger than host memory: with ``drop_page_cache``
(the default) a file is read with O_DIRECT where the OS and file system allow it (Linux: the disk's
DMA fills an aligned staging buffer, no page-cache copy: a cold 768 KiB read took 0.11-0.20 ms of CPU
against 0.50-0.74 ms buffered on the 2-core test machine), else read through the page cache and its
pages dropped afterwards (posix_fadvise DONTNEED). ``direct_io=False`` keeps buffered reads (the store's
readahead loader needs them: it reads what the kernel prefetched into the page cache). A missing
file, a file whose header cannot be parsed, or one whose bytes do not match the checksum written with
it raises ExpertReadError naming the file: the store never computes with garbage. The checksum is
XXH3-64 over the tensors' bytes in name order: 0.016 ms for 768 KiB against zlib CRC32's 0.28 ms on
the 2-core test machine, and a load's CPU is what a 2-core machine's decode pays for.
"""
from __future__ import annotations

import errno
import json
import os
import threading

import torch
import xxhash

# O_DIRECT wants the buffer, the file offset and the length aligned to the device's logical block
# (512 or 4096 bytes); 4096 covers both
_DIRECT_ALIGN = 4096


class ExpertReadError(RuntimeError):
    """An expert could not be read back from disk intact (missing, unreadable or corrupt file)."""


def checksum(chunks) -> int:
    """XXH3-64 of the concatenated byte buffers (the tensors' bytes in name order), as the manifest's
    "xxh3_64" holds it."""
    h = xxhash.xxh3_64()
    for chunk in chunks:
        h.update(chunk)
    return h.intdigest()


def _tensor_checksum(tensors: dict) -> int:
    return checksum(t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
                    for _, t in sorted(tensors.items()))


def _corrupt(layer: str, expert: int, path: str) -> "ExpertReadError":
    return ExpertReadError(f"expert {expert} of layer {layer!r}: {path} is corrupt: its XXH3-64 checksum does "
                           "not match the one written with it")


def _drop_page_cache(path: str) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class ExpertFiles:
    """Per-expert safetensors files under ``root`` (one folder per layer key)."""

    def __init__(self, root: str, *, drop_page_cache: bool = True, direct_io: bool = True):
        self.root = root
        self.drop_page_cache = drop_page_cache
        # O_DIRECT only where reads must miss the page cache anyway; off for good after the first
        # open or read the OS refuses (tmpfs, some overlay file systems)
        self.direct_io = bool(direct_io and drop_page_cache and hasattr(os, "O_DIRECT"))
        self._headers: dict = {}  # layer -> (safetensors header bytes, its parsed spans, bytes they need)
        self._file_bytes: dict = {}  # layer -> the largest file size seen (sizes the direct read)
        self._staging = threading.local()  # per reading thread: an aligned buffer for direct reads
        os.makedirs(root, exist_ok=True)

    def layer_dir(self, layer: str) -> str:
        return os.path.join(self.root, layer)

    def path(self, layer: str, expert: int) -> str:
        return os.path.join(self.layer_dir(layer), f"expert_{expert}.safetensors")

    def write_layer(self, layer: str, stacked: dict) -> list:
        """Write every expert of one layer; stacked: name -> [E, ...] tensor. Returns bytes per expert."""
        from safetensors.torch import save_file

        d = self.layer_dir(layer)
        os.makedirs(d, exist_ok=True)
        self._headers.pop(layer, None)
        num = {t.shape[0] for t in stacked.values()}
        if len(num) != 1:
            raise ValueError(f"layer {layer!r}: expert tensors disagree on the expert count: "
                             f"{ {n: tuple(t.shape) for n, t in stacked.items()} }")
        (E,) = num
        sizes, sums = [], []
        for e in range(E):
            one = {n: t[e].detach().to("cpu", copy=True).contiguous() for n, t in stacked.items()}  # copies: numpy views pin storage
            save_file(one, self.path(layer, e))
            sizes.append(sum(t.numel() * t.element_size() for t in one.values()))
            sums.append(_tensor_checksum(one))
            if self.drop_page_cache:
                _drop_page_cache(self.path(layer, e))
        manifest = {"names": sorted(stacked), "num_experts": E, "bytes": sizes, "xxh3_64": sums,
                    "shapes": {n: list(t.shape[1:]) for n, t in stacked.items()},
                    "dtypes": {n: str(t.dtype) for n, t in stacked.items()}}
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        return sizes

    def manifest(self, layer: str) -> dict:
        path = os.path.join(self.layer_dir(layer), "manifest.json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ExpertReadError(f"expert manifest {path} is missing or unreadable ({e}); "
                                  "rewrite the layer's experts (delete the folder and compile again)") from e

    def readahead(self, layer: str, expert: int) -> None:
        """Ask the kernel to start reading an expert's file into the page cache (posix_fadvise
        WILLNEED) and return at once; a missing file is left for the read to report."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.path(layer, expert), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read_expert(self, layer: str, expert: int, manifest: dict) -> dict:
        """name -> tensor of one expert, read from disk and checked against the manifest.

        The layer's files share one safetensors header, parsed at the layer's first read; later reads
        are one open/preadv/fadvise/close, scattered straight into a fresh (aligned) buffer per
        tensor, and the header bytes compared with the known ones. A read on the loader thread so
        gives the GIL up as seldom as it can, and the tensors' memory is laid out as a resident
        layer's would be (the GEMM kernels' results can depend on alignment).
        """
        path = self.path(layer, expert)
        if self.direct_io:
            data = self._direct_read(path, layer, expert)
            if data is not None:  # the staging buffer is reused: the tensors are copied out of it
                return self.tensors_from_file_bytes(layer, expert, manifest, data, check=True)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: {e}") from e
        try:
            out = self._scatter_read(fd, layer, expert, manifest)
            if out is None:  # the layer's first read, or a header unlike the layer's: read it whole
                data = _read_whole(fd, path)
            if self.drop_page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: {e}") from e
        finally:
            os.close(fd)
        if out is None:
            return self.tensors_from_file_bytes(layer, expert, manifest, data, check=True)
        if _tensor_checksum(out) != manifest["xxh3_64"][expert]:
            raise _corrupt(layer, expert, path)
        return out

    def _direct_read(self, path: str, layer: str, expert: int) -> torch.Tensor | None:
        """uint8 [file bytes] of the file, read with O_DIRECT into this thread's staging buffer (valid
        until this thread's next read); None when the OS refuses O_DIRECT (direct_io is then off)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self.direct_io = False
                return None
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: {e}") from e
        try:
            size = self._file_bytes.get(layer, 0)
            while True:
                # one block more than the largest size seen: a read that fills the buffer may have more
                buf = self._staging_buffer(size + _DIRECT_ALIGN)
                got = 0
                while got < buf.shape[0]:
                    n = os.preadv(fd, [buf[got:].numpy()], got)
                    if n == 0:
                        break
                    got += n
                    if got % _DIRECT_ALIGN:  # a short read ends the file
                        break
                if got < buf.shape[0]:
                    self._file_bytes[layer] = max(size, got)
                    return buf[:got]
                size = os.fstat(fd).st_size
        except OSError as e:
            if e.errno == errno.EINVAL:  # the file system opened it but cannot read it directly
                self.direct_io = False
                return None
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: {e}") from e
        finally:
            os.close(fd)

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        """This thread's uint8 buffer of at least nbytes (a multiple of the block), block-aligned."""
        nbytes = -(-nbytes // _DIRECT_ALIGN) * _DIRECT_ALIGN
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.shape[0] < nbytes:
            raw = torch.empty(nbytes + _DIRECT_ALIGN, dtype=torch.uint8)
            start = -raw.data_ptr() % _DIRECT_ALIGN
            buf = self._staging.buf = raw[start:start + nbytes]
        return buf[:nbytes]

    def _scatter_read(self, fd: int, layer: str, expert: int, manifest: dict):
        """One preadv of the file into the header bytes and a buffer per tensor, when the layer's
        header is known and the file has it; else None (nothing is trusted from a partial read)."""
        known = self._headers.get(layer)
        if known is None:
            return None
        head, spans, need = known
        prefix = bytearray(8 + len(head))
        bufs = {n: torch.empty(end - start, dtype=torch.uint8) for n, (_, _, start, end) in spans.items()}
        iov, pos = [prefix], 0
        for n in sorted(spans, key=lambda n: spans[n][2]):
            start, end = spans[n][2], spans[n][3]
            if start > pos:
                iov.append(bytearray(start - pos))
            iov.append(bufs[n].numpy())
            pos = max(pos, end)
        if os.preadv(fd, iov, 0) != len(prefix) + pos or prefix[:8] != len(head).to_bytes(8, "little") \
                or prefix[8:] != head:
            return None
        return {n: bufs[n].view(dtype).view(shape) for n, (dtype, shape, _, _) in spans.items()}

    def tensors_from_file_bytes(self, layer: str, expert: int, manifest: dict, data: torch.Tensor, *,
                                check: bool = False) -> dict:
        """name -> tensor of one expert from the bytes of its file (uint8 [file bytes]), copied into
        fresh aligned memory (so ``data`` may be reused). ``check``: compare with the manifest's
        checksum (the loader process has already done so).
        Raises ExpertReadError naming the file when the header or the bytes are not what was written."""
        path = self.path(layer, expert)
        raw = data.numpy()  # the same memory; bytes() of a tensor would go element by element
        size = raw.shape[0]
        base = 8 + int.from_bytes(raw[:8].tobytes(), "little") if size >= 8 else size + 1
        if base > size:
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: the file is too "
                                  "short for its safetensors header")
        head = raw[8:base].tobytes()
        known = self._headers.get(layer)
        if known is not None and known[0] == head:  # the layer's files share one header: parsed once
            spans, need = known[1], known[2]
            if size - base < need:
                raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: the file "
                                      f"ends {need - (size - base)} bytes before its last tensor does")
        else:
            spans = _spans(f"expert {expert} of layer {layer!r}: {path}", head, manifest, size - base)
            self._headers[layer] = (head, spans, max((end for *_, end in spans.values()), default=0))
        if check and checksum(raw[base + spans[n][2]:base + spans[n][3]] for n in sorted(spans)) \
                != manifest["xxh3_64"][expert]:
            raise _corrupt(layer, expert, path)
        out = {}
        for n, (dtype, shape, start, end) in spans.items():
            piece = data[base + start:base + end]
            out[n] = piece.clone().view(dtype).view(shape)
        return out


def _read_whole(fd: int, path: str) -> torch.Tensor:
    """uint8 [file bytes] of an open file."""
    size = os.fstat(fd).st_size
    data = torch.empty(size, dtype=torch.uint8)
    raw, got = data.numpy(), 0
    while got < size:
        n = os.preadv(fd, [raw[got:]], got)
        if n == 0:
            raise ExpertReadError(f"{path}: short read ({got} of {size} bytes)")
        got += n
    return data


def _spans(where: str, head: bytes, manifest: dict, data_bytes: int) -> dict:
    """A safetensors header -> name -> (dtype, shape, start, end) of each tensor's bytes after the header,
    checked against the manifest and the file's size (ExpertReadError naming the file otherwise)."""
    try:
        header = json.loads(head)
        items = {n: (info["dtype"], list(info["shape"]), *info["data_offsets"])
                 for n, info in header.items() if n != "__metadata__"}
    except (ValueError, KeyError, TypeError) as e:
        raise ExpertReadError(f"{where}: its safetensors header cannot be parsed ({e})") from e
    spans = {}
    for n, (dt, shape, start, end) in items.items():
        if dt not in _SAFETENSORS_DTYPES:
            raise ExpertReadError(f"{where}: tensor {n!r} has dtype {dt!r}, which this reader does not know "
                                  f"(known: {sorted(_SAFETENSORS_DTYPES)})")
        dtype = _SAFETENSORS_DTYPES[dt]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes
                and end - start == torch.Size(shape).numel() * dtype.itemsize and start % dtype.itemsize == 0):
            raise ExpertReadError(f"{where}: tensor {n!r} ({dt}{shape}) does not lie inside the file as its "
                                  f"header says (bytes {start}..{end} of {data_bytes})")
        spans[n] = (dtype, shape, start, end)
    _check_layout(where, {n: (dtype, shape) for n, (dtype, shape, _, _) in spans.items()}, manifest)
    return spans


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _check_layout(path: str, layout: dict, manifest: dict) -> None:
    """layout: name -> (dtype, shape) as read from the file; raise ExpertReadError unless it is the manifest's."""
    if sorted(layout) != manifest["names"]:
        raise ExpertReadError(f"{path} holds tensors {sorted(layout)}, the manifest expects {manifest['names']}")
    for n, (dtype, shape) in layout.items():
        if shape != manifest["shapes"][n] or str(dtype) != manifest["dtypes"][n]:
            raise ExpertReadError(f"{path}: tensor {n!r} is {dtype}{shape}, the manifest expects "
                                  f"{manifest['dtypes'][n]}{manifest['shapes'][n]}")
