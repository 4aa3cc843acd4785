"""Fused spiking attention in Triton, FlashAttention-style: no tensor with an L x L factor, forward or backward.

The semantics are those of ``spiking_lm.spiking_attention_reference``, whose docstring has the equations, for
the layout the ablation kept: ``centering="row_max"``, ``readout="cumulative"``, ``norm="count"``. The other
layouts exist only in the reference: ``backend="auto"`` runs the reference for them, and ``backend="triton"``
(this module) refuses them with a ValueError that names the setting.

The launcher scales q by 1 / (sqrt(hs) * theta) in PyTorch, exactly as the reference does, so the kernels see
threshold-1 scores and autograd carries the threshold's gradient; nothing divides inside a kernel loop.

- Forward: one program per (query block, batch * head), the longest causal prefixes launched first. Pass 1
  streams the key blocks for the row maxima of the scores and the first key attaining each (its argmax), kept
  in registers for pass 2. Pass 2 streams the key blocks once: per tile it computes each step's scores once,
  steps every pair's LIF neuron once per step, and adds N_t @ V into one (BLOCK_M, hs) accumulator per step.
- Backward: one program per (key block, batch * head), and with S' = S per (key block, step, batch * head),
  streaming the query blocks from the diagonal on. Per tile it replays the S neuron steps once, keeping each
  step's pre-spike membrane in registers, then walks the steps backwards (with S' = S down to its own step)
  through the readout, the normalisation (via D = dy . y per row and step, FlashAttention-2's way) and the LIF
  backward of ``kernels/lif.py``. The program owns dk and dv of its keys (of its step with S' = S: one pair of
  accumulators, not S; plain stores); dq and the per-row gradient sums reach memory with relaxed atomic adds.
  With S' = S the programs of a key block replay the same steps: about twice the dots of one program per key
  block (38 per tile at S = 4, not 20), for 12 resident warps per SM in bf16 rather than 8.
- The row max's gradient: every input of row i moves with m_i, so m_i's key takes minus the row's gradient
  sum R_i. A PyTorch epilogue applies it at the saved argmax (a gather for dq, a scatter-add for dk). On an
  exact tie the first key attaining the max takes all of it, a valid subgradient; ``torch.amax`` (the
  reference) splits it equally between the tied keys. Outputs, spikes, dv and the decay's gradient agree.
- Attention dropout (training): a counter-based Philox mask, one independent draw per (step, batch * head,
  query, key), drawn from a seed that the launcher takes from torch's generator (so ``seed_everything``
  reproduces it) and regenerated identically in the backward. As in the reference it drops the weights N_t
  with probability p and scales the kept ones by 1 / (1 - p); the normaliser counts the undropped weights.

Numerics: the kernels compile without FMA contraction (``COMPILE_OPTIONS``), so h = beta * v + x rounds as the
reference's product then sum, and the outputs divide by the row count with a correctly rounded division once
per tile. Dots on bf16 inputs are bf16 with fp32 accumulation; fp32 inputs use ``input_precision="tf32x3"``
(fp32-accurate products on tensor cores), ``DOT_PRECISION``; their score dots sum the head dim in chunks of 16
(``DOT_CHUNK``), alike in the forward and the backward. Nothing is imported from ``spiking_lm``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .constants import ROW_MAX_CURRENT
from .lif import SURROGATE_IDS, _surrogate_grad

# (query rows, key rows, warps, register cap, pipeline stages) per (kernel, dtype, S' = S), read off sm_90 builds
# (ptxas -v) at head size 64 and S = 4. A capped build keeps MIN_RESIDENT_WARPS warps per SM without spilling; the
# bf16 S' = 1 backward gets there uncapped (with the cap ptxas spilled a value across the loop). The fp32 builds use
# up to 255 registers (8 warps per SM) rather than spill: tf32x3 dots split every operand in two. 64-row tiles
# (wgmma) need about 210 registers a thread for the forward's S accumulators and would cut residency to 8 warps per
# SM. Stages are Triton's software pipelining of the key-block loop (3 is its default): the fp32 S' = S forward
# spilled with 3 (the prefetched k and v tiles of every step) and not with 1.
# Both Triton 3.6 (the GPU machine's image) and 3.8 (what pip resolves) must build every row without spilling. They
# allocate registers differently, and one row has no setting that suits both: the bf16 S' = 1 backward needs 192
# registers on 3.6 with pipelining (8 warps per SM) and 162 without it, while 3.8 spills without it at head size 32.
_PIPELINED_BF16_BWD = tuple(int(n) for n in triton.__version__.split(".")[:2]) >= (3, 8)
TILES = {
    ("fwd", "bf16", False): (16, 32, 4, True, 3),
    ("fwd", "bf16", True): (16, 16, 4, True, 2),  # 3 spilled on Triton 3.6 at head size 64 with dropout
    ("bwd", "bf16", False): (16, 16, 4, False, 3 if _PIPELINED_BF16_BWD else 1),
    ("bwd", "bf16", True): (16, 16, 4, True, 3),
    ("fwd", "fp32", False): (16, 16, 8, False, 3),
    ("fwd", "fp32", True): (16, 16, 8, False, 1),
    ("bwd", "fp32", False): (16, 16, 8, False, 3),
    ("bwd", "fp32", True): (16, 16, 8, False, 3),
}
MIN_RESIDENT_WARPS = 12  # per SM on sm_90, to hide latency: caps a capped build's registers per thread (maxnreg)
HEAD_SIZES = (16, 32, 64)  # the padded head sizes the kernels are built for; tl.dot needs >= 16
# Kernel dtypes of q, k, v; fp16 runs as fp32 (exactly), so that only two dtypes need compiling.
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
LAYOUT = dict(centering="row_max", readout="cumulative", norm="count")  # the one layout the kernels build
_CENTRE = tl.constexpr(ROW_MAX_CURRENT)
DOT_PRECISION = tl.constexpr("tf32x3")  # for fp32 operands; bf16 operands multiply exactly in any case
# Head-dim columns per chunk of the score dots (``_scores``), per kernel dtype: one chunk in bf16.
DOT_CHUNK = {"bf16": max(HEAD_SIZES), "fp32": 16}
# No FMA contraction: a*b + c rounded once could flip a spike that lands within an ulp of the threshold.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _launch(kernel: str, dtype: str, per_step: bool) -> dict:
    """A launch's tile constexprs and options from TILES; a register cap lets MIN_RESIDENT_WARPS warps share an
    SM's 65,536 registers (allocated per warp in units of 256, so per thread in units of 8)."""
    block_m, block_n, warps, capped, stages = TILES[kernel, dtype, per_step]
    options = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **COMPILE_OPTIONS)
    if capped:
        options["maxnreg"] = 65536 // (-(-MIN_RESIDENT_WARPS // warps) * warps * 32) // 8 * 8
    return options


@triton.jit
def _tile(base, rows, offs_d, stride_l, L, hs):
    """The (rows, HS) tile of an (L, hs) matrix whose rows are ``stride_l`` apart; padding reads 0."""
    mask = (rows[:, None] < L) & (offs_d[None, :] < hs)
    return tl.load(base + rows[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _scores(a_base, a_rows, a_stride, b_base, b_rows, b_stride, L, hs, HS: tl.constexpr, DK: tl.constexpr):
    """a @ b^T of an (a_rows, HS) and a (b_rows, HS) tile over the head dim, in chunks of DK columns loaded where
    they are used, in a loop at run time (unrolled, the compiler hoists every chunk's operands): tf32x3 splits each
    fp32 operand in two, and whole 64-column operands spilled the fp32 backward. The forward and the backward
    chunk alike, so that their scores agree to the bit."""
    acc = tl.zeros([a_rows.shape[0], b_rows.shape[0]], tl.float32)
    for d0 in range(0, HS, DK):
        offs_d = d0 + tl.arange(0, DK)
        a = _tile(a_base, a_rows, offs_d, a_stride, L, hs)
        b = _tile(b_base, b_rows, offs_d, b_stride, L, hs)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _keep(seed, step, bh, BH, rows, cols, L, p_drop):
    """The dropout mask of a tile: one Philox draw per (step, batch * head, query, key), True where kept."""
    c0 = (rows[:, None] * L + cols[None, :]).to(tl.uint32)  # L**2 < 2**32 for any L the kernels take
    c1 = tl.full(c0.shape, 0, tl.uint32) + (step * BH + bh).to(tl.uint32)
    zero = tl.full(c0.shape, 0, tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _lif_step(x, mem, ref, valid, beta, R, RESET_ZERO: tl.constexpr):
    """One step of the threshold-1 LIF neurons of a tile; masked pairs never fire.

    Returns the spikes, the new membrane and refractory counter, and the pre-spike membrane h, NaN where
    the neuron was refractory (kernels/lif.py's code: NaN > 1 is false, so it never reads as a spike).
    """
    gated = ref > 0
    h = beta * mem + x
    fired = (h > 1.0) & (~gated) & valid
    s = fired.to(tl.float32)
    if RESET_ZERO:
        mem = h * (1.0 - s)
    else:
        mem = h - s
    mem = tl.where(gated, 0.0, mem)
    ref = tl.where(gated, ref - 1, tl.where(fired, R, 0))
    return s, mem, ref, tl.where(gated, float("nan"), h)


@triton.jit
def _heads(NH, stride_b, stride_h):
    """This program's (batch * head) index, their number and its offset in q, k, v (grid axis 1)."""
    bh = tl.program_id(1)
    return bh, tl.num_programs(1), (bh // NH).to(tl.int64) * stride_b + (bh % NH).to(tl.int64) * stride_h


@triton.jit(do_not_specialize=["R", "seed"])
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    y_ptr,
    m_ptr,
    arg_ptr,
    cnt_ptr,
    spikes_ptr,
    L,
    NH,
    hs,
    R,
    seed,
    p_drop,
    keep_scale,
    stride_s,
    stride_b,
    stride_h,
    stride_l,
    S: tl.constexpr,
    PER_STEP: tl.constexpr,
    RESET_ZERO: tl.constexpr,
    DROPOUT: tl.constexpr,
    HS: tl.constexpr,
    DK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal prefixes first
    bh, BH, base = _heads(NH, stride_b, stride_h)
    stat = bh.to(tl.int64) * L  # this head's rows in the (S or S', B * nh, L) row statistics
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    row_ok = offs_m < L
    beta = tl.load(beta_ptr)
    hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)  # causal block skipping: keys past the last row never fire
    S_QK: tl.constexpr = S if PER_STEP else 1

    # Pass 1: per input step, the row maxima of the causal scores (which shift every input of the row) and
    # the first key attaining each, for the backward's epilogue. They stay in registers for pass 2.
    maxima = ()
    for w in tl.static_range(S_QK):
        qk = base + w * stride_s
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_arg = tl.zeros([BLOCK_M], tl.int32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            c = _scores(q_ptr + qk, offs_m, stride_l, k_ptr + qk, offs_n, stride_l, L, hs, HS, DK)
            c = tl.where(offs_n[None, :] <= offs_m[:, None], c, float("-inf"))
            block_max = tl.max(c, 1)
            block_arg = tl.min(tl.where(c == block_max[:, None], offs_n[None, :], L), 1)
            row_arg = tl.where(block_max > row_max, block_arg, row_arg)  # an earlier block keeps a tie
            row_max = tl.maximum(row_max, block_max)
        tl.store(m_ptr + w * BH * L + stat + offs_m, row_max, mask=row_ok)
        tl.store(arg_ptr + w * BH * L + stat + offs_m, row_arg, mask=row_ok)
        maxima = maxima + (row_max,)

    # Pass 2: each key block once; its neurons stepped once per step, N_t @ V into step t's accumulator.
    accs = ()
    counts = ()
    for _ in tl.static_range(S):
        accs = accs + (tl.zeros([BLOCK_M, HS], tl.float32),)
        counts = counts + (tl.zeros([BLOCK_M], tl.float32),)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        valid = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
        mem = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ref = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        n_cum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        new_accs = ()
        new_counts = ()
        for t in tl.static_range(S):
            if t == 0 or PER_STEP:  # with S' = 1 every step has the same input
                qkv = base + t * stride_s
                v = _tile(v_ptr + qkv, offs_n, offs_d, stride_l, L, hs)
                c = _scores(q_ptr + qkv, offs_m, stride_l, k_ptr + qkv, offs_n, stride_l, L, hs, HS, DK)
                x = (c - maxima[t][:, None]) + _CENTRE  # two roundings, as the reference's
            s, mem, ref, h = _lif_step(x, mem, ref, valid, beta, R, RESET_ZERO)
            n_cum += s
            weights = n_cum  # N_t, small integers: exact in any float dtype
            if DROPOUT:
                weights = tl.where(_keep(seed, t, bh, BH, offs_m, offs_n, L, p_drop), weights, 0.0)
            new_accs = new_accs + (tl.dot(weights.to(v.dtype), v, accs[t], input_precision=DOT_PRECISION),)
            new_counts = new_counts + (counts[t] + tl.sum(n_cum, 1),)  # the undropped weights normalise
        accs = new_accs
        counts = new_counts

    out = bh.to(tl.int64) * L * hs  # this head's rows in the contiguous (S, B * nh, L, hs) output
    for t in tl.static_range(S):
        acc = accs[t] * keep_scale if DROPOUT else accs[t]
        y = tl.math.div_rn(acc, tl.maximum(counts[t], 1.0)[:, None])
        y_ptrs = y_ptr + t * BH * L * hs + out + offs_m[:, None] * hs + offs_d[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < hs))
        tl.store(cnt_ptr + t * BH * L + stat + offs_m, counts[t], mask=row_ok)
    # Every spike of a pair is in its last weight N_{S-1}: the block's spikes are the last step's row counts
    # (integers in fp32, exact below 2**24).
    tl.store(spikes_ptr + bh * tl.num_programs(0) + pid_m, tl.sum(counts[S - 1], 0).to(tl.int32))


@triton.jit
def _pick(tiles, u, S: tl.constexpr):
    """tiles[u] for a step u known only at run time: a select per step, on tiles of a few registers a thread."""
    tile = tiles[0]
    for t in tl.static_range(1, S):
        tile = tl.where(u == t, tiles[t], tile)
    return tile


@triton.jit
def _put(tiles, u, tile, S: tl.constexpr):
    """tiles with tiles[u] replaced by tile, for a step u known only at run time."""
    out = ()
    for t in tl.static_range(S):
        out += (tl.where(u == t, tile, tiles[t]),)
    return out


@triton.jit
def _value_grad(dv, n_t, t, dys_base, seed, p_drop, bh, BH, offs_m, offs_n, offs_d, L, hs, DROPOUT: tl.constexpr):
    """dv + N_t^T dys_t: the weights N_t of step t as dropout kept them, dys_t = dy_t / d_t from dys_base."""
    dys = _tile(dys_base, offs_m, offs_d, hs, L, hs)  # (BLOCK_M, HS)
    if DROPOUT:
        n_t = tl.where(_keep(seed, t, bh, BH, offs_m, offs_n, L, p_drop), n_t, 0.0)
    return tl.dot(tl.trans(n_t.to(dys.dtype)), dys, dv, input_precision=DOT_PRECISION)


@triton.jit
def _step_back(
    u,
    hs_,
    valid,
    n_cum,
    g_later,
    gv,
    v_base,
    stride_l,
    dys_base,
    delta_base,
    g_count,
    beta,
    alpha,
    seed,
    p_drop,
    bh,
    BH,
    offs_m,
    offs_n,
    row_ok,
    L,
    hs,
    S: tl.constexpr,
    RESET_ZERO: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HS: tl.constexpr,
    DK: tl.constexpr,
):
    """Step u of a tile's backward, given the gradients that the steps after it leave (n_cum = N_u, g_later, gv):
    kernels/lif.py's backward at threshold 1, through the readout and the normalisation. The step's rows of v,
    dys = dy / d (times 1 / (1 - p) with dropout) and delta = (dy . y) / d (0 where the row count is clamped)
    start at v_base, dys_base and delta_base.

    Returns dL/dx_u, the membrane before step u, N_{u-1} and the updated g_later and gv.
    """
    h = _pick(hs_, u, S)
    gated = h != h
    s = ((h > 1.0) & valid).to(tl.float32)
    h_prev = _pick(hs_, u - 1, S)  # any tile when u == 0, where the membrane before is 0
    s_prev = ((h_prev > 1.0) & valid).to(tl.float32)
    mem_prev = h_prev * (1.0 - s_prev) if RESET_ZERO else h_prev - s_prev
    mem_prev = tl.where((h_prev != h_prev) | (u == 0), 0.0, mem_prev)

    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    g_weights = _scores(dys_base, offs_m, hs, v_base, offs_n, stride_l, L, hs, HS, DK)  # (BLOCK_M, BLOCK_N)
    if DROPOUT:
        g_weights = tl.where(_keep(seed, u, bh, BH, offs_m, offs_n, L, p_drop), g_weights, 0.0)
    g_later += g_weights - delta[:, None]  # a spike at step u is in the weights of every step >= u
    n_cum -= s  # N_{u-1}

    g_spike = g_later + g_count
    if not DETACH_RESET:
        if RESET_ZERO:
            g_spike += gv * -h
        else:
            g_spike -= gv
    gh = g_spike * _surrogate_grad(h - 1.0, alpha, SURROGATE)
    if RESET_ZERO:
        gh += gv * (1.0 - s)
    else:
        gh += gv
    g_x = tl.where(valid & (~gated), gh, 0.0)  # (BLOCK_M, BLOCK_N)
    return g_x, mem_prev, n_cum, g_later, g_x * beta


@triton.jit(do_not_specialize=["R", "seed"])
def _attn_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    beta_ptr,
    m_ptr,
    dys_ptr,
    delta_ptr,
    gcount_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    rowgrad_ptr,
    dbeta_ptr,
    L,
    NH,
    hs,
    R,
    alpha,
    seed,
    p_drop,
    stride_s,
    stride_b,
    stride_h,
    stride_l,
    S: tl.constexpr,
    PER_STEP: tl.constexpr,
    RESET_ZERO: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    DROPOUT: tl.constexpr,
    HS: tl.constexpr,
    DK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # With S' = S a program owns the gradients of one step (program axis 0 is key block major), so that it holds
    # one dk and one dv; it replays the recurrence of the steps after that one.
    GROUPS: tl.constexpr = S if PER_STEP else 1
    pid_n = tl.program_id(0) // GROUPS  # key block 0 sees every query block: the heaviest programs come first
    lo = tl.program_id(0) % GROUPS  # the owned step (0 when S' = 1, whose sums own every step)
    bh, BH, base = _heads(NH, stride_b, stride_h)
    stat = bh.to(tl.int64) * L
    out = stat * hs  # this head's rows in the contiguous (S or S', B * nh, L, hs) gradients
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    d_ok = offs_d[None, :] < hs
    beta = tl.load(beta_ptr)
    g_count = tl.load(gcount_ptr)  # d loss / d spike count, for the firing-rate regulariser

    dk = tl.zeros([BLOCK_N, HS], tl.float32)  # summed over the steps when S' = 1
    dv = tl.zeros([BLOCK_N, HS], tl.float32)
    dbeta_acc = tl.zeros([BLOCK_N], tl.float32)
    # Causal block skipping: query blocks before the one holding this block's first key see none of it.
    for start_m in range((pid_n * BLOCK_N // BLOCK_M) * BLOCK_M, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        valid = (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]

        # The forward of the tile once: each step's pre-spike membrane (NaN where refractory) and N_{S-1}.
        # A loop at run time, as the backward's below.
        hs_ = ()
        for _ in tl.static_range(S):
            hs_ += (tl.zeros([BLOCK_M, BLOCK_N], tl.float32),)
        mem = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ref = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        n_cum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        n_own = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # N_lo, the owned step's weights
        if not PER_STEP:  # every step has the same input
            c = _scores(q_ptr + base, offs_m, stride_l, k_ptr + base, offs_n, stride_l, L, hs, HS, DK)
            x = (c - tl.load(m_ptr + stat + offs_m, mask=row_ok, other=0.0)[:, None]) + _CENTRE
        for t in range(S):
            if PER_STEP:
                qk = base + t * stride_s
                c = _scores(q_ptr + qk, offs_m, stride_l, k_ptr + qk, offs_n, stride_l, L, hs, HS, DK)
                x = (c - tl.load(m_ptr + t * BH * L + stat + offs_m, mask=row_ok, other=0.0)[:, None]) + _CENTRE
            s, mem, ref, h = _lif_step(x, mem, ref, valid, beta, R, RESET_ZERO)
            n_cum += s
            hs_ = _put(hs_, t, h, S)
            if PER_STEP:
                n_own = tl.where(t == lo, n_cum, n_own)
            else:  # dv needs no backward through the neurons: every step's weights read the one v
                dys_t = dys_ptr + t * BH * L * hs + out
                dv = _value_grad(dv, n_cum, t, dys_t, seed, p_drop, bh, BH, offs_m, offs_n, offs_d, L, hs, DROPOUT)
        if PER_STEP:
            dys_t = dys_ptr + lo * BH * L * hs + out
            dv = _value_grad(dv, n_own, lo, dys_t, seed, p_drop, bh, BH, offs_m, offs_n, offs_d, L, hs, DROPOUT)

        # Backwards over the steps, down to the owned one. A loop at run time, not unrolled: unrolled, the
        # compiler hoists the loads and dots of earlier steps and keeps several steps' tiles alive at once.
        gv = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # d loss / d membrane after step u, from step u + 1
        g_later = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # d loss / d N_u, summed over steps >= u
        g_x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # the owned step's dL/dx; with S' = 1 summed over them
        mem_prev = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for i in range(S - lo):
            u = S - 1 - i
            g_u, mem_prev, n_cum, g_later, gv = _step_back(
                u,
                hs_,
                valid,
                n_cum,
                g_later,
                gv,
                v_ptr + base + u * stride_s,
                stride_l,
                dys_ptr + u * BH * L * hs + out,
                delta_ptr + u * BH * L + stat,
                g_count,
                beta,
                alpha,
                seed,
                p_drop,
                bh,
                BH,
                offs_m,
                offs_n,
                row_ok,
                L,
                hs,
                S,
                RESET_ZERO,
                DETACH_RESET,
                SURROGATE,
                DROPOUT,
                HS,
                DK,
            )
            if PER_STEP:
                g_x = g_u  # the last step, u = lo, is the owned one
            else:
                dbeta_acc += tl.sum(g_u * mem_prev, 0)
                g_x += g_u
        if PER_STEP:
            dbeta_acc += tl.sum(g_x * mem_prev, 0)
        q = _tile(q_ptr + base + lo * stride_s, offs_m, offs_d, stride_l, L, hs)
        k = _tile(k_ptr + base + lo * stride_s, offs_n, offs_d, stride_l, L, hs)  # reloaded (from cache)
        dq = tl.dot(g_x.to(k.dtype), k, input_precision=DOT_PRECISION)  # (BLOCK_M, HS)
        tl.atomic_add(
            dq_ptr + lo * BH * L * hs + out + offs_m[:, None] * hs + offs_d[None, :],
            dq,
            mask=row_ok[:, None] & d_ok,
            sem="relaxed",
        )
        tl.atomic_add(rowgrad_ptr + lo * BH * L + stat + offs_m, tl.sum(g_x, 1), mask=row_ok, sem="relaxed")
        dk = tl.dot(tl.trans(g_x.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)

    # This program's keys and step: no other program writes them.
    rows = lo * BH * L * hs + out + offs_n[:, None] * hs + offs_d[None, :]
    key_mask = (offs_n[:, None] < L) & d_ok
    tl.store(dk_ptr + rows, dk, mask=key_mask)
    tl.store(dv_ptr + rows, dv, mask=key_mask)
    tl.store(dbeta_ptr + bh * tl.num_programs(0) + tl.program_id(0), tl.sum(dbeta_acc, 0))


@triton.jit
def _dropout_mask_kernel(keep_ptr, seed, p_drop, L, BH, BLOCK: tl.constexpr):
    # The kernels' mask as a tensor, for tests: program (query row, step * BH + batch * head).
    row, plane = tl.program_id(0), tl.program_id(1)
    for start in range(0, L, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = _keep(seed, plane // BH, plane % BH, BH, tl.full([1], row, tl.int32), cols, L, p_drop)
        tl.store(
            keep_ptr + (plane.to(tl.int64) * L + row) * L + cols[None, :], keep.to(tl.int8), mask=cols[None, :] < L
        )


@dataclass(frozen=True)
class Settings:
    """Everything the kernels need besides the tensors, as ``spiking_attention_triton`` takes it."""

    timesteps: int
    refractory: int
    reset: str
    surrogate: str
    alpha: float
    detach_reset: bool
    dropout: float


class AttentionOutput(NamedTuple):
    y: torch.Tensor
    """(S, B, nh, L, hs), the attention output."""
    count: torch.Tensor
    """0-d fp64: spikes of all causal pairs and steps, differentiable through the surrogate."""
    row_count: torch.Tensor
    """(S, B, nh, L) fp32, detached: sum_j N_t[i, j], the undropped weights of each row and step. Under the
    cumulative readout this is the attention's accumulate count (spikes so far, each adding a V row once)."""


def draw_seed() -> int:
    """The dropout seed of one call, from torch's default (CPU) generator: no device sync, and
    ``torch.manual_seed`` / ``seed_everything`` reproduce it."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_mask(seed: int, p: float, timesteps: int, B: int, nh: int, L: int, device=None) -> torch.Tensor:
    """The kept pairs (S, B, nh, L, L) of a call whose seed was ``seed``: what the kernels drop, as a tensor."""
    keep = torch.empty((timesteps, B * nh, L, L), dtype=torch.int8, device=device)
    _dropout_mask_kernel[(L, timesteps * B * nh)](keep, seed, p, L, B * nh, BLOCK=16)
    return keep.view(timesteps, B, nh, L, L).bool()


def unsupported(hs: int, centering: str, readout: str, norm: str) -> str | None:
    """Why the kernels cannot run these settings (the reference can), or None when they can."""
    for name, value in (("centering", centering), ("readout", readout), ("norm", norm)):
        if value != LAYOUT[name]:
            return (
                f"fused spiking attention builds only {name}={LAYOUT[name]!r}, got {value!r}; "
                "backend='auto' runs the reference for it"
            )
    if max(16, triton.next_power_of_2(hs)) not in HEAD_SIZES:
        return f"fused spiking attention supports head sizes up to {HEAD_SIZES[-1]}, got {hs}"
    return None


def _qkv_layout(q, k, v):
    """q, k, v sharing one layout with unit stride over the head dim (copies only if not)."""
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v


def _strides(q) -> dict:
    """The kernels' q/k/v strides; a step's stride is 0 when S' = 1."""
    return dict(
        stride_s=q.stride(0) if q.shape[0] > 1 else 0, stride_b=q.stride(1), stride_h=q.stride(2), stride_l=q.stride(3)
    )


def _head(dtype: str, hs: int) -> dict:
    """The padded head size and the chunk of it that the score dots take at a time, alike in both kernels."""
    head = max(16, triton.next_power_of_2(hs))
    return dict(HS=head, DK=min(head, DOT_CHUNK[dtype]))


def _fwd_meta(settings: Settings, dtype: str, per_step: bool, hs: int) -> dict:
    """The forward kernel's constexprs and launch options for one call."""
    return dict(
        S=settings.timesteps,
        PER_STEP=per_step,
        RESET_ZERO=settings.reset == "zero",
        DROPOUT=settings.dropout > 0,
        **_head(dtype, hs),
        **_launch("fwd", dtype, per_step),
    )


def _bwd_meta(settings: Settings, dtype: str, per_step: bool, hs: int) -> dict:
    """The backward kernel's constexprs and launch options for one call."""
    return dict(
        S=settings.timesteps,
        PER_STEP=per_step,
        RESET_ZERO=settings.reset == "zero",
        DETACH_RESET=settings.detach_reset,
        SURROGATE=SURROGATE_IDS[settings.surrogate],
        DROPOUT=settings.dropout > 0,
        **_head(dtype, hs),
        **_launch("bwd", dtype, per_step),
    )


class SpikingAttentionFunction(torch.autograd.Function):
    """Fused spiking attention on scaled queries (threshold 1): the output, spike count and row counts."""

    @staticmethod
    def forward(ctx, q, k, v, beta, settings: Settings):
        q, k, v = _qkv_layout(q, k, v)
        S, (S_qk, B, nh, L, hs) = settings.timesteps, q.shape
        beta_f = torch.as_tensor(beta, dtype=torch.float32, device=q.device).detach().reshape(1)
        row_max = torch.empty((S_qk, B * nh, L), dtype=torch.float32, device=q.device)
        argmax = torch.empty((S_qk, B * nh, L), dtype=torch.int32, device=q.device)
        row_count = torch.empty((S, B * nh, L), dtype=torch.float32, device=q.device)
        y = torch.empty((S, B, nh, L, hs), dtype=q.dtype, device=q.device)
        meta = _fwd_meta(settings, DTYPES[q.dtype], S_qk > 1, hs)
        grid = (triton.cdiv(L, meta["BLOCK_M"]), B * nh)
        spikes = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=q.device)
        seed = draw_seed() if settings.dropout > 0 else 0
        _attn_fwd_kernel[grid](
            q_ptr=q,
            k_ptr=k,
            v_ptr=v,
            beta_ptr=beta_f,
            y_ptr=y,
            m_ptr=row_max,
            arg_ptr=argmax,
            cnt_ptr=row_count,
            spikes_ptr=spikes,
            L=L,
            NH=nh,
            hs=hs,
            R=settings.refractory,
            seed=seed,
            p_drop=settings.dropout,
            keep_scale=1.0 / (1.0 - settings.dropout),
            **_strides(q),
            **meta,
        )
        ctx.save_for_backward(q, k, v, beta_f, y, row_max, argmax, row_count)
        ctx.settings, ctx.seed = settings, seed
        ctx.beta_meta = (beta.shape, beta.dtype) if isinstance(beta, torch.Tensor) else None
        ctx.mark_non_differentiable(row_count)
        return y, spikes.sum(dtype=torch.int64).double(), row_count.view(S, B, nh, L)

    @staticmethod
    def backward(ctx, dy, d_count, _d_row_count):
        q, k, v, beta_f, y, row_max, argmax, row_count = ctx.saved_tensors
        settings = ctx.settings
        S, (S_qk, B, nh, L, hs) = settings.timesteps, q.shape
        # Through the normalisation, as FlashAttention-2's D = dy . y: dL/dN_t[i, j] = dys[i] . v[j] - delta[i]
        # for a kept pair (-delta[i] for a dropped one: the normaliser counts it still).
        d = row_count.clamp_min(1).unsqueeze(-1)  # (S, B*nh, L, 1)
        dyd = dy.float().reshape(S, B * nh, L, hs) / d
        delta = ((dyd * y.float().reshape(S, B * nh, L, hs)).sum(-1) * (row_count > 1)).contiguous()  # (S, B*nh, L)
        dys = (dyd / (1.0 - settings.dropout)).to(q.dtype).contiguous()  # (S, B*nh, L, hs)
        dq, dk, dv = (torch.zeros((S_qk, B * nh, L, hs), dtype=torch.float32, device=q.device) for _ in range(3))
        rowgrad = torch.zeros_like(row_max)  # (S', B*nh, L): sum_j of dL/dx, minus the row max's gradient
        meta = _bwd_meta(settings, DTYPES[q.dtype], S_qk > 1, hs)
        grid = (triton.cdiv(L, meta["BLOCK_N"]) * S_qk, B * nh)  # with S' = S, a program per key block and step
        dbeta = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=q.device)
        _attn_bwd_kernel[grid](
            q_ptr=q,
            k_ptr=k,
            v_ptr=v,
            beta_ptr=beta_f,
            m_ptr=row_max,
            dys_ptr=dys,
            delta_ptr=delta,
            gcount_ptr=d_count.float().reshape(1),
            dq_ptr=dq,
            dk_ptr=dk,
            dv_ptr=dv,
            rowgrad_ptr=rowgrad,
            dbeta_ptr=dbeta,
            L=L,
            NH=nh,
            hs=hs,
            R=settings.refractory,
            alpha=settings.alpha,
            seed=ctx.seed,
            p_drop=settings.dropout,
            **_strides(q),
            **meta,
        )
        # The row max's gradient at its argmax: x = c - m, so m's key takes -rowgrad of the row.
        q_rows, k_rows = (t.reshape(-1, hs).float() for t in (q, k))  # (S' * B*nh * L, hs)
        heads = torch.arange(S_qk * B * nh, device=q.device).view(S_qk, B * nh, 1) * L
        index = (heads + argmax).flatten()  # the argmax key's row, per (step, head, query)
        dq -= (rowgrad.flatten().unsqueeze(-1) * k_rows[index]).view_as(dq)
        dk.view(-1, hs).index_add_(0, index, -rowgrad.flatten().unsqueeze(-1) * q_rows)
        dq, dk, dv = (g.view(S_qk, B, nh, L, hs).to(q.dtype) for g in (dq, dk, dv))
        d_beta = dbeta.sum().reshape(ctx.beta_meta[0]).to(ctx.beta_meta[1]) if ctx.beta_meta else None
        return dq, dk, dv, d_beta, None


def spiking_attention_triton(
    q,
    k,
    v,
    threshold,
    beta,
    *,
    timesteps: int,
    refractory: int,
    reset: str,
    surrogate: str,
    alpha: float,
    detach_reset: bool,
    centering: str = "row_max",
    readout: str = "cumulative",
    norm: str = "count",
    dropout: float = 0.0,
) -> AttentionOutput:
    """Fused spiking attention with the semantics of the reference; every neuron setting given, ``alpha`` resolved.

    q, k, v: (S', B, nh, L, hs) with S' in {1, S}; threshold: (nh,) positive; beta: float or 0-d tensor;
    dropout: the probability of dropping an attention weight (pass 0 outside training).
    Returns ``AttentionOutput(y, count, row_count)``; ``row_count`` is where an energy counter reads the fused
    path's accumulate count (see ``AttentionOutput``).
    """
    S, (S_qk, nh, hs) = timesteps, (q.shape[0], q.shape[2], q.shape[4])
    if S_qk not in (1, S) or not q.shape == k.shape == v.shape:
        raise ValueError(
            f"q, k, v must share a shape (S', B, nh, L, hs) with S' 1 or S = {S}, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if reason := unsupported(hs, centering, readout, norm):
        raise ValueError(reason)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
    dtype = q.dtype if q.dtype in DTYPES else torch.float32  # fp16 runs as fp32
    # Scaled as the reference scales them; autograd carries the threshold's gradient.
    q = (q / (math.sqrt(hs) * threshold).view(nh, 1, 1)).to(dtype)
    settings = Settings(S, refractory, reset, surrogate, float(alpha), bool(detach_reset), float(dropout))
    y, count, row_count = SpikingAttentionFunction.apply(q, k.to(dtype), v.to(dtype), beta, settings)
    return AttentionOutput(y.to(v.dtype), count, row_count)


def compile_variants(timesteps=(4,), resets=("subtract",), surrogates=("atan",), detach_resets=(True,)) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps, options) the launchers pick for these neuron settings
    (by default the shipped configurations'), for ahead-of-time compile tests: both dtypes, every head size,
    S' in {1, S}, dropout off and on."""
    variants = []
    for dtype, hs, S, per_step, reset, surrogate, detach_reset, dropout in itertools.product(
        DTYPES.values(), HEAD_SIZES, timesteps, (False, True), resets, surrogates, detach_resets, (0.0, 0.1)
    ):
        settings = Settings(S, 1, reset, surrogate, 2.0, detach_reset, dropout)
        for kernel, meta in (
            (_attn_fwd_kernel, _fwd_meta(settings, dtype, per_step, hs)),
            (_attn_bwd_kernel, _bwd_meta(settings, dtype, per_step, hs)),
        ):
            warps = meta.pop("num_warps")
            options = {name: meta.pop(name) for name in ("maxnreg", "num_stages", *COMPILE_OPTIONS) if name in meta}
            variants.append(
                dict(
                    kernel=kernel,
                    signature=_signature(kernel, dtype, meta),
                    constexprs=meta,
                    num_warps=warps,
                    options=options,
                )
            )
    return variants


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    """Triton types of a kernel's arguments: q, k, v, y and dys in ``dtype``, other pointers fp32 (the argmax
    and spike counts i32), sizes i32."""
    pointers = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, y_ptr=dtype, dys_ptr=dtype, arg_ptr="i32", spikes_ptr="i32")
    floats = {"alpha", "p_drop", "keep_scale"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            # a drawn seed is 64-bit; without dropout the launch passes 0, an i32
            signature[name] = "fp32" if name in floats else "i64" if name == "seed" and constexprs["DROPOUT"] else "i32"
    return signature
