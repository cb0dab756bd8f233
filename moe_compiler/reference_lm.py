"""A small byte-level MoE language model, trained by examples/train_reference_model.py.

Random weights have no routing structure; this model, trained on Python source text, gives the
placement, expert-parallel and offloading work real routings (cross-layer expert affinity).
Its MoE layers are moe_compiler.MoELayer, so the backend raises every one of them.

    x [B, S] bytes -> embed + learned positions -> L x (RMSNorm -> causal attention -> +,
                      RMSNorm -> MoELayer -> +) -> RMSNorm -> tied LM head -> logits [B, S, 256]
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_compiler.modules import MoELayer


@dataclass(frozen=True)
class ReferenceLMConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 8
    heads: int = 4
    experts: int = 16
    top_k: int = 2
    ffn: int = 64
    context: int = 128


class Block(nn.Module):
    def __init__(self, c: ReferenceLMConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.proj = nn.Linear(c.dim, c.dim, bias=False)
        self.norm2 = nn.RMSNorm(c.dim)
        self.mlp = MoELayer(c.dim, c.ffn, c.experts, c.top_k)
        self.heads = c.heads

    def forward(self, x, router_logits: list | None = None, past=None):
        """x [B, S, D]; past: (k, v) [B, heads, P, D/heads] of earlier positions, or None.
        Returns x, or (x, (k, v)) with the keys/values of all P + S positions when past is given."""
        b, s, d = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads)
                   .unbind(2))
        mask = None
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            if s > 1:  # causal over the new positions, all of the past visible
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - s)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past is None)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.norm2(x)
        if router_logits is not None:  # [B*S, E], for load-balancing losses and analysis
            router_logits.append(F.linear(h.reshape(-1, d), self.mlp.router))
        x = x + self.mlp(h)
        return x if past is None else (x, (k, v))


class ReferenceLM(nn.Module):
    def __init__(self, config: ReferenceLMConfig = ReferenceLMConfig()):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.context, config.dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, router_logits: list | None = None, cache: list | None = None):
        """ids [B, S] -> logits [B, S, vocab]; appends each layer's router logits when given a list.

        Incremental decoding: pass ``cache`` (a list: empty for the prompt, then what the previous call
        returned); the call returns (logits, new cache) and positions continue after the cached ones.
        """
        start = 0 if not cache else cache[0][0].shape[2]
        x = self.embed(ids) + self.pos[start: start + ids.shape[1]]
        if cache is None:
            for blk in self.blocks:
                x = blk(x, router_logits)
            return F.linear(self.norm(x), self.embed.weight)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            past = cache[i] if cache else (x.new_zeros(x.shape[0], blk.heads, 0, x.shape[-1] // blk.heads),) * 2
            x, kv = blk(x, router_logits, past)
            new_cache.append(kv)
        return F.linear(self.norm(x), self.embed.weight), new_cache

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @staticmethod
    def load(folder: str) -> "ReferenceLM":
        from safetensors.torch import load_file

        with open(os.path.join(folder, "config.json")) as f:
            model = ReferenceLM(ReferenceLMConfig(**json.load(f)))
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return model.eval()


def corpus_files() -> list:
    """The Python standard library's source files (present on every machine), sorted."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files)


def corpus_bytes(files) -> torch.Tensor:
    data = b"".join(open(f, "rb").read() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
