"""The disk tier of the expert store: one safetensors file per expert, checked on every read.

    <root>/<layer>/expert_<e>.safetensors   tensors {"w1": [N1, H] or [H, N1], "w2": ..., "b1": ...}
    <root>/<layer>/manifest.json            {"names": [...], "num_experts": E, "bytes": [...],
                                             "crc32": [...], "shapes": {...}, "dtype": "..."}

Reads drop the file's pages from the page cache afterwards (posix_fadvise DONTNEED, where the OS has
it), so the next read of that expert really goes to the disk, as it would for a model larger than
host memory. A missing file, a file whose header cannot be parsed, or one whose bytes do not match
the CRC32 written with it raises ExpertReadError naming the file: the store never computes with
garbage.
"""
from __future__ import annotations

import json
import os
import zlib

import torch


class ExpertReadError(RuntimeError):
    """An expert could not be read back from disk intact (missing, unreadable or corrupt file)."""


def _crc(tensors: dict) -> int:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"", crc)
    return crc


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

    def __init__(self, root: str, *, drop_page_cache: bool = True):
        self.root = root
        self.drop_page_cache = drop_page_cache
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
        num = {t.shape[0] for t in stacked.values()}
        if len(num) != 1:
            raise ValueError(f"layer {layer!r}: expert tensors disagree on the expert count: "
                             f"{ {n: tuple(t.shape) for n, t in stacked.items()} }")
        (E,) = num
        sizes, crcs = [], []
        for e in range(E):
            one = {n: t[e].detach().to("cpu", copy=True).contiguous() for n, t in stacked.items()}  # copies: numpy views pin storage
            save_file(one, self.path(layer, e))
            sizes.append(sum(t.numel() * t.element_size() for t in one.values()))
            crcs.append(_crc(one))
            if self.drop_page_cache:
                _drop_page_cache(self.path(layer, e))
        manifest = {"names": sorted(stacked), "num_experts": E, "bytes": sizes, "crc32": crcs,
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

    def read_expert(self, layer: str, expert: int, manifest: dict) -> dict:
        """name -> tensor of one expert, read from disk and checked against the manifest."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self.path(layer, expert)
        try:
            with open(path, "rb") as f:
                data = f.read()
            tensors = load(data)
        except (OSError, SafetensorError, ValueError) as e:
            raise ExpertReadError(f"cannot read expert {expert} of layer {layer!r} from {path}: {e}") from e
        finally:
            if self.drop_page_cache and os.path.exists(path):
                _drop_page_cache(path)
        _check_layout(path, {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}, manifest)
        if _crc(tensors) != manifest["crc32"][expert]:
            raise ExpertReadError(f"{path} is corrupt: its CRC32 does not match the one written with it")
        return tensors

    def tensors_from_file_bytes(self, layer: str, expert: int, manifest: dict, data: torch.Tensor) -> dict:
        """name -> tensor of one expert from the bytes of its file (uint8 [file bytes], already checked
        against the manifest's CRC32, e.g. by the loader process): copies, so ``data`` may be reused."""
        path = self.path(layer, expert)
        raw = data.numpy()  # the same memory; bytes() of a tensor would go element by element
        base = 8 + int.from_bytes(raw[:8].tobytes(), "little")
        header = json.loads(raw[8:base].tobytes())
        layout = {}
        for n, info in header.items():
            if n == "__metadata__":
                continue
            if info.get("dtype") not in _SAFETENSORS_DTYPES:
                raise ExpertReadError(f"{path}: tensor {n!r} has dtype {info.get('dtype')!r}, which this reader "
                                      f"does not know (known: {sorted(_SAFETENSORS_DTYPES)})")
            layout[n] = (_SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]))
        _check_layout(path, layout, manifest)
        out = {}
        for n, (dtype, shape) in layout.items():
            start, end = header[n]["data_offsets"]
            t = torch.empty(shape, dtype=dtype)
            if t.numel():
                t.reshape(-1).view(torch.uint8).copy_(data[base + start:base + end])
            out[n] = t
        return out


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
