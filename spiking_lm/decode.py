"""Generation one position at a time: the keys-and-values cache, and the baseline's one-position step.

A cached position at batch 1 reads every weight of the model for a single row. On a CPU those matmuls are
bound by memory bandwidth, and the Python around them costs nearly as much again: module calls, attribute
lookups and reshapes of the (S', B, L, C) stream. Each of those costs several times what it costs in a loop of
its own, as the weights streaming through the caches evict everything else. ``BaselineStep`` runs one position
of the softmax + GELU model as a flat sequence of tensor ops on the model's own weights. It computes what
``GPT.forward`` computes, bit for bit (tests/test_kv_cache.py), and ``GPT.sample`` takes it wherever it
applies. The spiking variants keep the forward: the S steps of their neurons outweigh the overhead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from spiking_lm.model import GPT


class KVCache:
    """The keys and values of every position run so far, per layer, for generating one position at a time.

    Exact for every variant: neuron state runs over the S steps of one token only, never across positions, so
    an earlier position's keys, values and residual stream never change once computed; a new position needs only
    its own row of attention against them. (An adaptive threshold that never trained uses the batch's own mean
    |x| in eval, which mixes positions: the cache is exact once training has set its running scale.) Buffers
    hold block_size positions, allocated at a layer's first ``extend`` with that layer's S' (1, or S once a LIF
    site precedes it).
    """

    def __init__(self, n_layer: int, block_size: int):
        self.block_size = block_size
        self.length = 0  # T: positions cached, advanced by GPT.forward and BaselineStep
        self.k: list[torch.Tensor | None] = [None] * n_layer  # (S', B, nh, block_size, hs) each
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' ``k``, ``v`` (S', B, nh, L, hs) of ``layer``; all its keys and values
        (S', B, nh, T + L, hs)."""
        T, L = self.length, k.shape[-2]
        if self.k[layer] is None:
            shape = (*k.shape[:-2], self.block_size, k.shape[-1])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        self.k[layer][..., T : T + L, :] = k
        self.v[layer][..., T : T + L, :] = v
        return self.k[layer][..., : T + L, :], self.v[layer][..., : T + L, :]


class _Layer(NamedTuple):
    """One block's (weight, bias) pairs; a bias is None where the model has none."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None]
    c_attn: tuple[torch.Tensor, torch.Tensor | None]
    attn_proj: tuple[torch.Tensor, torch.Tensor | None]
    ln_2: tuple[torch.Tensor, torch.Tensor | None]
    c_fc: tuple[torch.Tensor, torch.Tensor | None]
    mlp_proj: tuple[torch.Tensor, torch.Tensor | None]


class BaselineStep:
    """One cached position of the softmax + GELU model: ``model(idx, cache=cache)[0]``, bit for bit.

    The weights are gathered from the modules once, at construction (they are the model's own tensors, so
    in-place updates show). Looked up through the modules at every position, they would cost as much as the
    module calls the step saves.
    """

    @staticmethod
    def applies(model: GPT) -> bool:
        """Whether the step computes ``model``'s forward: softmax attention, no LIF site, and eval mode (the
        step has no dropout)."""
        return not model.training and model.config.attention == "softmax" and not model.sites()

    def __init__(self, model: GPT):
        if not self.applies(model):
            raise ValueError("BaselineStep needs the softmax + GELU model (no LIF site) in eval mode")
        tr, pair = model.transformer, lambda m: (m.weight, m.bias)
        self.n_embd, self.n_head, self.eps = model.config.n_embd, model.config.n_head, tr.ln_f.eps
        self.wte, self.wpe, self.ln_f, self.lm_head = tr.wte.weight, tr.wpe.weight, pair(tr.ln_f), model.lm_head.weight
        self.layers = [
            _Layer(*map(pair, (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj))) for b in tr.h
        ]

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The logits (B, 1, V) of one position ``idx`` (B, 1) after the ``cache``'s positions, which it extends."""
        C, nh, eps = self.n_embd, self.n_head, self.eps
        B, T = idx.size(0), cache.length
        if T + 1 > cache.block_size:
            raise ValueError(f"cannot forward a sequence of length {T + 1}, block_size is {cache.block_size}")
        x = F.embedding(idx[:, 0], self.wte) + self.wpe[T]  # (B, C)
        for i, w in enumerate(self.layers):
            qkv = F.linear(F.layer_norm(x, (C,), *w.ln_1, eps), *w.c_attn)  # (B, 3C)
            q, k, v = qkv.view(B, 3, nh, 1, C // nh).unbind(1)  # (B, nh, 1, hs)
            k, v = cache.extend(i, k.unsqueeze(0), v.unsqueeze(0))  # (1, B, nh, T + 1, hs)
            y = F.scaled_dot_product_attention(q, k[0], v[0])  # (B, nh, 1, hs)
            x = x + F.linear(y.view(B, C), *w.attn_proj)
            h = F.gelu(F.linear(F.layer_norm(x, (C,), *w.ln_2, eps), *w.c_fc))  # (B, 4C)
            x = x + F.linear(h, *w.mlp_proj)
        cache.length += 1
        return F.linear(F.layer_norm(x, (C,), *self.ln_f, eps), self.lm_head).unsqueeze(1)  # (B, 1, V)
