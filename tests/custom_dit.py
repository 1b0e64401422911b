"""A hand-written DiT in the original DiT repository's layout (not a diffusers model), its CustomAdapter settings
and a CFG-batched sampling loop: shared by the custom-model and compatibility tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

import relcache


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """adaLN-zero block: ``attn`` and ``mlp`` see the modulated norm; gates and residuals are applied here."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TinyDiT(nn.Module):
    """Patch embedding, timestep and label embeddings, adaLN-zero blocks, adaLN final layer; ``forward(x, t, y)``."""

    def __init__(self, size: int = 8, channels: int = 4, patch: int = 2, dim: int = 32, depth: int = 3,
                 heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.t_embedder = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(classes + 1, dim)  # the last class is the null label for CFG
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_linear = nn.Linear(dim, patch * patch * channels)

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000) * torch.arange(32, dtype=torch.float32) / 32)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.pos_embed[:, : tokens.shape[1]]
        c = self.t_embedder(self.time_features(t)) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        out = self.final_linear(modulate(self.final_norm(tokens), shift, scale))
        p = self.patch
        out = out.view(b, h // p, w // p, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.channels, h, w)


ADAPTER = dict(blocks="blocks", modules={"attn": "attn", "mlp": "mlp"}, timestep=1)  # forward(x, t, y)


def sample(model: nn.Module, steps: int = 10, begin: bool = True, batch: int = 2,
           after_step: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """A DDIM-like loop, CFG batched as in the original DiT's ``forward_with_cfg``."""
    if begin:
        relcache.begin_generation(model, steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    y = torch.cat([torch.arange(batch) % 10, torch.full((batch,), 10)])
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2 * batch,), 999 - i * (999 // steps))
            cond, uncond = model(torch.cat([x, x]), t, y).chunk(2)
            eps = uncond + 4.0 * (cond - uncond)
            outs.append(eps)
            x = x - 0.1 * eps
            if after_step is not None:
                after_step()
    return outs
