"""A GPT whose attention softmax and MLP activation can be LIF neurons with refractory periods.

One decoder, in the style of nanoGPT, serves every variant: ``ModelConfig``
picks softmax or spiking attention, GELU or LIF in the MLP, optionally
spiking Q/K/V, and optionally LIF sites in front of the linear layers
(spike-driven inputs: then those layers see only spikes). The baseline (softmax + GELU) is exactly nanoGPT's model.

Simulation. Each token is presented for S = ``timesteps`` steps (direct
encoding). The residual stream has shape (S', B, L, C), where S' is 1 until the
first LIF site and S after it: the site broadcasts its input over S with
``expand`` (no copy), so everything before it runs once, and the pure
softmax + GELU model never gets a step dimension at all. Neuron state runs over
the S steps only, never across sequence positions, so causality is the
attention mask's alone. The readout averages the last hidden state over S.

Firing counts. The model keeps nothing from a forward: pass a
``spiking_lm.firing.FiringCounts`` as ``firing=`` and every LIF site adds its
spike count and neuron-steps to it (per-neuron counts, differentiable counts
and attention's products when the collector asks for them). The counts come
from what the neurons and the fused attention kernel compute anyway, so
collecting them never changes which implementation runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from spiking_lm.config import ModelConfig, NeuronConfig
from spiking_lm.decode import BaselineStep, KVCache
from spiking_lm.firing import FiringCounts
from spiking_lm.lif import LIF, clamp_learned, resolve_backend
from spiking_lm.spiking_attention_reference import spiking_attention_reference

# The kinds of site in GPT.sites() that are spike-driven inputs of linear layers (ModelConfig.spiking_*_in).
INPUT_SITES = ("qkv_in", "proj_in", "fc_in")
# Momentum of an adaptive threshold's running mean of |input|, used in eval.
ADAPTIVE_MOMENTUM = 0.1


class NeuronSite(nn.Module):
    """LIF neurons at one place in the model; ``name`` is its key in ``GPT.sites()`` and in firing counts.

    With ``adaptive_threshold`` the threshold is scaled by the mean |input| (``input_scale`` keeps its running
    average); with ``amplitude`` each channel's output n is n * amplitude, a scale the next linear layer can
    absorb into its weights, so its input stays the integer code. While ``passthrough`` is set the site returns
    its real input unchanged, as if it were not there (a training curriculum switches input sites on late).
    """

    def __init__(self, neuron: NeuronConfig, channels: int | None, timesteps: int, backend: str, **overrides):
        super().__init__()
        settings = {**asdict(neuron), **overrides}
        adaptive, amplitude = settings.pop("adaptive_threshold", False), settings.pop("amplitude", False)
        if amplitude and channels is None:
            raise ValueError("an amplitude needs per-channel neurons")
        self.lif = LIF(channels, **settings, backend=backend)
        self.timesteps = timesteps
        self.amplitude = nn.Parameter(torch.ones(channels)) if amplitude else None
        # 0 until the first training batch sets it; eval before that uses the batch's own mean.
        self.register_buffer("input_scale", torch.zeros(()) if adaptive else None)
        self.name = ""  # set by GPT
        self.passthrough = False

    def forward(self, x: torch.Tensor, firing: FiringCounts | None = None) -> torch.Tensor:
        """Spikes (S, ..., C) for current ``x`` of shape (1 or S, ..., C); their counts go to ``firing``."""
        if self.passthrough:
            return x
        scale = None if self.input_scale is None else self._input_scale(x)
        spikes, stats = self.lif(x.expand(self.timesteps, *x.shape[1:]), scale, return_stats=True)  # (S, ..., C)
        if firing is not None:
            counts = spikes if self.lif.spec.code == "binary" else spikes.abs()  # a signed or graded n is |n| spikes
            firing.add(
                self.name,
                stats.spikes,
                stats.neuron_steps,
                self.timesteps,
                # fp32 sum: a half-precision sum of many ones would round the count.
                graded=counts.sum(dtype=torch.float32) if firing.rate_grad else None,
                neuron_spikes=counts.flatten(0, -2).sum(0, dtype=torch.float64) if firing.per_neuron else None,
                presentations=spikes[0].numel() // spikes.shape[-1],  # batch entries x positions
            )
        return spikes if self.amplitude is None else spikes * self.amplitude

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The adaptive threshold's scale (0-d, detached): the batch's mean |x| in training, else the running one."""
        batch = x.detach().abs().mean(dtype=torch.float32).clamp_min(1e-6)
        known = self.input_scale > 0
        if self.training:
            self.input_scale.copy_(torch.where(known, torch.lerp(self.input_scale, batch, ADAPTIVE_MOMENTUM), batch))
            return batch
        return torch.where(known, self.input_scale, batch)


def site_if(enabled: bool, neuron: NeuronConfig, config: ModelConfig) -> NeuronSite | None:
    """A spike-driven input site: LIF neurons on the ``n_embd`` channels feeding a linear layer, when enabled."""
    return NeuronSite(neuron, config.n_embd, config.timesteps, config.backend) if enabled else None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd, self.timesteps = config.n_head, config.n_embd, config.timesteps
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.name = ""  # layer{i}.attn, set by GPT: the key of this layer's products in firing counts
        self.qkv_neuron = (
            NeuronSite(config.qkv_neuron, 3 * config.n_embd, config.timesteps, config.backend)
            if config.spiking_qkv
            else None
        )
        self.qkv_in_neuron = site_if(config.spiking_qkv_in, config.qkv_in_neuron, config)
        self.proj_in_neuron = site_if(config.spiking_proj_in, config.proj_in_neuron, config)
        self.neuron = None
        if config.attention == "spiking":
            # Per-channel LIF parameters broadcast over the last dim, which here is the key
            # index, so the score neurons get a scalar decay and threshold 1; the per-head
            # threshold is a per-head input scale instead, as LIF dynamics are unchanged
            # when input and threshold are scaled together (the surrogate's width is not).
            cfg = config.attn_neuron
            self.neuron = NeuronSite(cfg, None, config.timesteps, config.backend, threshold=1.0, learn_threshold=False)
            self.threshold = nn.Parameter(
                torch.full((config.n_head,), float(cfg.threshold)), requires_grad=cfg.learn_threshold
            )
            self.attn_norm, self.attn_centering = config.attn_norm, config.attn_centering
            self.attn_readout = config.attn_readout

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, firing: FiringCounts | None = None
    ) -> torch.Tensor:
        """x: (S', B, L, C). With ``cache``, x holds the L positions after the T cached ones of ``layer``."""
        C, nh = self.n_embd, self.n_head
        if self.qkv_in_neuron is not None:
            x = self.qkv_in_neuron(x, firing)  # (S, B, L, C) spikes
        qkv = self.c_attn(x)  # (S', B, L, 3C)
        if self.qkv_neuron is not None:
            qkv = self.qkv_neuron(qkv, firing)  # (S, B, L, 3C)
        q, k, v = (t.unflatten(-1, (nh, C // nh)).transpose(-3, -2) for t in qkv.split(C, dim=-1))  # (S', B, nh, L, hs)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (S', B, nh, T + L, hs)
        if self.neuron is None:
            L, T = q.shape[-2], k.shape[-2]
            # is_causal aligns the mask top-left, so queries after cached keys need theirs (one query sees all).
            mask = None if L in (1, T) else torch.ones(L, T, dtype=torch.bool, device=q.device).tril(T - L)
            y = F.scaled_dot_product_attention(
                q.flatten(0, 1),
                k.flatten(0, 1),
                v.flatten(0, 1),
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=L == T,
            ).unflatten(0, q.shape[:2])  # (S', B, nh, L, hs)
            if firing is not None and firing.products:
                firing.add_products(self.name, self._qk_products(q, k), self._softmax_av_products(q, v))
        else:
            y, count, rows, weigh = self._spiking_attention(q, k, v)  # (S, B, nh, L, hs), 0-d, (S, B, nh, L)
            if firing is not None:
                self._count(firing, q, k, v, count, rows, weigh)
        y = y.transpose(-3, -2).flatten(-2)  # (S', B, L, C)
        if self.proj_in_neuron is not None:
            y = self.proj_in_neuron(y, firing)  # (S, B, L, C) spikes
        return self.resid_dropout(self.c_proj(y))

    def _spiking_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The attention output (S, B, nh, L, hs), its score neurons' spike count (0-d, differentiable through
        the surrogate), the weight sum of each row (S, B, nh, L), and ``weigh``: values (S', B, nh, T, hs) ->
        N_t @ values (S, B, nh, L, hs), the weights of the implementation that ran applied to other values.

        q: (S', B, nh, L, hs), the last L of the T positions of k and v (T > L after a KVCache).
        ``backend`` picks the implementation as for the neurons: the fused kernels ("triton"; "auto" on CUDA),
        attention dropout included, or the reference. The reference also runs for queries after cached keys
        (a decoding step's one row, not L x L work), and under "auto" for what the kernels do not build (a
        layout other than row_max/cumulative/count, head sizes above 64); "triton" refuses those.
        """
        B, nh, L, hs = q.shape[1:]
        T = k.shape[-2]
        S, site = self.timesteps, self.neuron
        threshold = clamp_learned(self.threshold)
        dropout = self.dropout if self.training else 0.0
        backend = site.lif.backend
        if L == T and resolve_backend(backend, q) == "triton":
            from spiking_lm.kernels.spiking_attention import spiking_attention_triton, unsupported

            if backend == "triton" or not unsupported(hs, self.attn_centering, self.attn_readout, self.attn_norm):
                spec = site.lif.spec
                fused = partial(
                    spiking_attention_triton,
                    q,
                    k,
                    threshold=threshold,
                    beta=site.lif.effective_params()[0],
                    timesteps=S,
                    refractory=spec.refractory,
                    reset=spec.reset,
                    surrogate=spec.surrogate,
                    alpha=spec.surrogate_alpha,
                    detach_reset=spec.detach_reset,
                    centering=self.attn_centering,
                    readout=self.attn_readout,
                    norm=self.attn_norm,
                    dropout=dropout,
                )
                y, count, rows = fused(v)  # (S, B, nh, L, hs), 0-d, (S, B, nh, L)

                def weigh(values: torch.Tensor) -> torch.Tensor:
                    # The same kernel on the same spikes, its count norm undone (exact for 0/1 values in fp32);
                    # undropped, as the reference's weights are (another call would also draw another mask).
                    return fused(values, dropout=0.0).y * rows.clamp_min(1).unsqueeze(-1)

                return y, count, rows, weigh
        y, count, weights = spiking_attention_reference(
            q,
            k,
            v,
            threshold,
            site,
            S,
            self.attn_centering,
            self.attn_readout,
            self.attn_norm,
            dropout,
        )  # (S, B, nh, L, hs), 0-d, (S, B, nh, L, T)
        return y, count, weights.sum(-1), lambda values: weights @ values

    def _count(
        self,
        firing: FiringCounts,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        count: torch.Tensor,
        rows: torch.Tensor,
        weigh: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Add the score neurons' ``count`` to ``firing``, and what it asks for beyond: spikes per head (from the
        weight sums of the ``rows``) and the products of the two matmuls."""
        B, nh, L, hs = q.shape[1:]
        T = k.shape[-2]
        per_head = None
        if firing.per_neuron:
            # Under the cumulative readout a row's weights at the last step are all of its spikes.
            spikes = rows[-1] if self.attn_readout == "cumulative" else rows.sum(0)  # (B, nh, L)
            per_head = spikes.sum((0, 2), dtype=torch.float64)  # (nh,)
        pairs = B * L * (2 * T - L + 1) // 2  # causal (query, key) pairs of one head
        firing.add(
            self.neuron.name,
            count,
            self.timesteps * nh * pairs,
            self.timesteps,
            graded=count.float(),
            neuron_spikes=per_head,
            presentations=pairs,
        )
        if firing.products:
            if self.qkv_neuron is not None:  # a weight n meets each V spike n times
                av = weigh(v.ne(0).to(v.dtype)).round().sum(dtype=torch.float64)
            else:  # a weight n adds a V row of hs values n times
                av = rows.sum(dtype=torch.float64) * hs
            firing.add_products(self.name, self._qk_products(q, k), av)

    def _qk_products(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Nonzero products of Q.K^T over the causal pairs (0-d fp64): hs per pair with real Q and K, and with
        spiking ones the coinciding spikes, q_i . sum_{j<=i} k_j."""
        L, hs = q.shape[-2:]
        T = k.shape[-2]
        if self.qkv_neuron is None:
            pairs = q.shape[:-2].numel() * L * (2 * T - L + 1) // 2
            return torch.tensor(float(pairs * hs), dtype=torch.float64, device=q.device)
        q_on, k_on = q.ne(0).to(q.dtype), k.ne(0).to(k.dtype)
        return (q_on * k_on.cumsum(-2)[..., T - L :, :]).sum(dtype=torch.float64)

    def _softmax_av_products(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Nonzero products of softmax weights and V (0-d fp64): a real weight on every causal pair, times hs
        channels of a real V, or times the spikes of a spiking V (key j is seen by the queries from j on)."""
        L, hs = q.shape[-2:]
        T = v.shape[-2]
        if self.qkv_neuron is None:
            pairs = q.shape[:-2].numel() * L * (2 * T - L + 1) // 2
            return torch.tensor(float(pairs * hs), dtype=torch.float64, device=q.device)
        seen_by = T - torch.arange(T, device=v.device).clamp_min(T - L)  # (T,)
        return (v.ne(0).sum(-1, dtype=torch.float64) * seen_by).sum()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.neuron = (
            NeuronSite(config.mlp_neuron, 4 * config.n_embd, config.timesteps, config.backend)
            if config.mlp_activation == "lif"
            else None
        )
        self.fc_in_neuron = site_if(config.spiking_fc_in, config.fc_in_neuron, config)

    def forward(self, x: torch.Tensor, firing: FiringCounts | None = None) -> torch.Tensor:  # x: (S', B, L, C)
        if self.fc_in_neuron is not None:
            x = self.fc_in_neuron(x, firing)  # (S, B, L, C) spikes
        h = self.c_fc(x)  # (S', B, L, 4C)
        h = F.gelu(h) if self.neuron is None else self.neuron(h, firing)  # (S', B, L, 4C), S' = S after LIF
        return self.dropout(self.c_proj(h))  # (S', B, L, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        has_attn = config.attention != "none"
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias) if has_attn else None
        self.attn = CausalSelfAttention(config) if has_attn else None
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, firing: FiringCounts | None = None
    ) -> torch.Tensor:  # x: (S', B, L, C)
        if self.attn is not None:
            # broadcasting lifts (1, ...) to (S, ...) after a site
            x = x + self.attn(self.ln_1(x), cache, layer, firing)
        return x + self.mlp(self.ln_2(x), firing)


class GPT(nn.Module):
    """nanoGPT's decoder with optional LIF sites; see the module docstring for the simulation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError(
                "ModelConfig.vocab_size is 0 (not set); set it to the tokenizer's vocabulary size "
                "(the trainer fills it from the data module)"
            )
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaling of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for name, site in self.sites().items():
            site.name = name
        for i, block in enumerate(self.transformer.h):
            if block.attn is not None:
                block.attn.name = f"layer{i}.attn"

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Trainable parameters, position embeddings included, the tied embedding counted once.

        Frozen neuron constants (a decay or threshold with learning off) are left out:
        they are settings stored as tensors, not parameters.
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def sites(self) -> dict[str, NeuronSite]:
        """The LIF sites in execution order, by name: ``layer{i}.qkv_in``, ``layer{i}.qkv``, ``layer{i}.attn``,
        ``layer{i}.proj_in``, ``layer{i}.fc_in``, ``layer{i}.mlp``."""
        sites = {}
        for i, block in enumerate(self.transformer.h):
            attn = block.attn
            for kind, site in (
                ("qkv_in", attn and attn.qkv_in_neuron),
                ("qkv", attn and attn.qkv_neuron),
                ("attn", attn and attn.neuron),
                ("proj_in", attn and attn.proj_in_neuron),
                ("fc_in", block.mlp.fc_in_neuron),
                ("mlp", block.mlp.neuron),
            ):
                if site is not None:
                    sites[f"layer{i}.{kind}"] = site
        return sites

    def sites_of(self, kinds: Iterable[str]) -> list[NeuronSite]:
        """The LIF sites of the given kinds (``qkv_in``, ``qkv``, ``attn``, ``proj_in``, ``fc_in``, ``mlp``: a
        site's name after its layer), in execution order."""
        kinds = set(kinds)
        return [site for name, site in self.sites().items() if name.rsplit(".", 1)[1] in kinds]

    def neuron_parameters(self) -> list[nn.Parameter]:
        """The learned parameters of the LIF sites (thresholds, decays, amplitudes), for a learning rate of their
        own; attention's per-head threshold included."""
        params = [p for site in self.sites().values() for p in site.parameters()]
        params += [
            block.attn.threshold
            for block in self.transformer.h
            if block.attn is not None and block.attn.neuron is not None
        ]
        return [p for p in params if p.requires_grad]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        firing: FiringCounts | None = None,
    ):
        """Logits (B, L, V) for ``idx`` (B, L), and the loss for ``targets`` (B, L) if given.

        With ``cache``, ``idx`` holds the positions after the cached ones, whose keys and values are used and
        extended (see ``generate``). The LIF sites add their counts to ``firing`` (see ``spiking_lm.firing``).
        """
        B, L = idx.shape
        T = cache.length if cache is not None else 0  # positions before idx
        if T + L > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {T + L}, block_size is {self.config.block_size}")
        pos = torch.arange(T, T + L, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, L, C)
        x = x.unsqueeze(0)  # (1, B, L, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, firing)  # (S', B, L, C)
        if cache is not None:
            cache.length += L
        x = self.transformer.ln_f(x.mean(0))  # (B, L, C)
        logits = self.lm_head(x)  # (B, L, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def sample(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` sampled tokens (B, 1), one at a time, after the context ``idx`` (B, L).

        The model sees a window of at most block_size tokens. When a new token would overflow it, the window
        restarts at the last block_size // 2 tokens rather than sliding by one: positions are absolute, so a
        slide changes every position's keys and values, and the cache would be refilled for every token. Each
        token is thus predicted from at least block_size // 2 tokens of context, and the cache is refilled
        once per block_size // 2 tokens. ``use_cache=False`` runs the whole window for every token, with the
        same window, so it samples the same tokens for the same seed (to compare, or to check the cache), up to
        float rounding: matmuls of other shapes round differently, and in a spiking model such a difference
        can tip a neuron over its threshold and so change a sample (float64 agrees to ~1e-15). The softmax +
        GELU model runs its cached single positions through ``spiking_lm.decode.BaselineStep``, the same
        computation with less Python around it.
        """
        block = self.config.block_size
        lean = BaselineStep(self) if use_cache and BaselineStep.applies(self) else None
        window = idx[:, -block:]  # (B, <= block)
        cache, fresh = None, window  # fresh: the window's tokens that have not yet run through the model
        for _ in range(max_new_tokens):
            # inference_mode skips autograd's per-op bookkeeping, a large part of a one-position forward; its
            # tensors stay inside (the cache) or are copied out (the last logits), so what is yielded is plain.
            with torch.inference_mode():
                if use_cache:
                    if cache is None:
                        cache, fresh = KVCache(self.config.n_layer, block), window
                    if lean is not None and fresh.size(1) == 1:
                        logits = lean(fresh, cache)  # (B, 1, V)
                    else:
                        logits, _ = self(fresh, cache=cache)
                else:
                    logits, _ = self(window)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            yield idx_next
            window, fresh = torch.cat((window, idx_next), dim=1), idx_next
            if window.size(1) > block:
                window, cache = window[:, -max(1, block // 2) :], None

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """``idx`` (B, L) followed by ``max_new_tokens`` tokens from ``sample`` (B, L + max_new_tokens)."""
        return torch.cat([idx, *self.sample(idx, max_new_tokens, temperature, top_k, use_cache)], dim=1)
