"""Triton kernels of the ``triton`` experts backend (see ``launch``, which loads this
module on first use; importing it needs the triton package).

Shape legend: S slots sorted by expert, H hidden, I expert intermediate, E experts; a block
is a run of at most BLOCK_M sorted slots of one expert.

Each GEMM program finds its own block from the per-expert slot counts (``_block``), so the
block table is never built on the host: no device → host read, no host → device copy, and
the grid is sized from S and E alone (see ``launch.max_blocks``).

IEEE: fp32 operands, multiplied without TF32 rounding. UPCAST: half-precision operands are
widened to fp32 before ``tl.dot``: exact products and the same fp32 accumulation as a
tensor-core dot. It is set under Triton's CPU interpreter, whose ``tl.dot`` gives wrong
results for bf16 operands (triton 3.9).
"""

import triton
import triton.language as tl

# constexpr globals: compiled kernels may read no other module-level values
SILU, GELU, GELU_TANH, CLAMPED_SWIGLU = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _block(counts_ptr, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, lo, hi) of this program's block: blocks are numbered expert by expert, each
    expert's run of sorted slots cut into pieces of BLOCK_M. Programs past the last block
    get lo >= hi (an empty block: they read and write nothing)."""
    b = tl.program_id(0)
    es = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + es, mask=es < E, other=0).to(tl.int32)
    nblk = (cnt + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(nblk, 0) <= b).to(tl.int32), 0)  # experts whose blocks all precede b
    before = es < e
    first = tl.sum(tl.where(before, nblk, 0), 0)  # e's first block
    start = tl.sum(tl.where(before, cnt, 0), 0)  # e's first sorted slot
    end = start + tl.sum(tl.where(es == e, cnt, 0), 0)
    lo = start + (b - first) * BLOCK_M
    return tl.minimum(e, E - 1).to(tl.int64), lo, tl.minimum(lo + BLOCK_M, end)


@triton.jit
def _dot(a, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ w in fp32. IEEE (fp32 inputs): no TF32 rounding, the precision of the CPU
    paths. UPCAST (the interpreter): half-precision operands widened to fp32 first."""
    if UPCAST:
        a, w = a.to(tl.float32), w.to(tl.float32)
    if IEEE or UPCAST:
        return tl.dot(a, w, acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def gate_up_act(x_ptr, tok_ptr, w_ptr, b_ptr, h_ptr, counts_ptr, E, H, I,
                stride_xt, stride_we, stride_wn, stride_wk, stride_be, stride_hs, GATE_STEP, UP_OFF, alpha, limit,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """h[rows, cols] = act(x[tok] @ w_gate[e].T) * (x[tok] @ w_up[e].T) for one block of
    sorted slots (rows) and BLOCK_N intermediate columns. x rows are read by token index
    (``tok_ptr``: int64 token of each sorted slot): the gather is this load. Column j of
    the intermediate takes gate row ``j * GATE_STEP`` and up row ``j * GATE_STEP + UP_OFF``
    of the fused [2I] projection: (1, I) for [gate | up], (2, 1) for GPT-OSS's interleaved
    rows. ``stride_wn``/``stride_wk`` address either weight layout ([E, 2I, H] or GPT-OSS's
    transposed [E, H, 2I]). ``alpha``/``limit``: the clamped SwiGLU's (GPT-OSS)."""
    e, lo, hi = _block(counts_ptr, E, E_POW2, BLOCK_M)
    rows = lo + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    n_gate = cols * GATE_STEP
    n_up = n_gate + UP_OFF
    w_e = w_ptr + e * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(hi > lo, H, 0)  # an empty block streams no weights
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_e + n_gate[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        wu = tl.load(w_e + n_up[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_g = _dot(a, wg, acc_g, IEEE, UPCAST)
        acc_u = _dot(a, wu, acc_u, IEEE, UPCAST)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + e * stride_be + n_gate, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + e * stride_be + n_up, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # The projections are rounded to the activations' dtype before the activation, as
    # the other backends (and transformers) compute them.
    g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
    if ACT == SILU:
        h = g * tl.sigmoid(g) * u
    elif ACT == GELU:
        h = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    elif ACT == GELU_TANH:  # tanh approximation, with tanh(z) = 2 sigmoid(2z) - 1
        h = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) * u
    else:  # clamped SwiGLU: (up + 1) * g * sigmoid(alpha g), gate clamped above, up both ways
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        h = (u + 1.0) * (g * tl.sigmoid(g * alpha))
    out = h_ptr + rows[:, None].to(tl.int64) * stride_hs + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_weighted(h_ptr, w_ptr, b_ptr, order_ptr, tw_ptr, out_ptr, counts_ptr, E, I, H,
                  stride_hs, stride_we, stride_wn, stride_wk, stride_be, stride_os,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[rows, cols] = routing weight × (h[rows] @ w_down[e].T), fp32, for one block of
    sorted slots and BLOCK_N hidden columns (``stride_wn``/``stride_wk``: [E, H, I] or the
    transposed [E, I, H]). A sorted slot's routing weight is
    ``tw[order[row]]`` (``tw``: the [T*K] fp32 top-k weights, ``order``: int64 slot ids)."""
    e, lo, hi = _block(counts_ptr, E, E_POW2, BLOCK_M)
    rows = lo + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_e = w_ptr + e * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(hi > lo, I, 0)  # an empty block streams no weights
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(h_ptr + rows64[:, None] * stride_hs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_e + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = _dot(a, w, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # The expert's output in the activations' dtype first (what every backend returns),
    # then the routing weight in fp32, as the CPU combine applies it.
    acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0)
    acc *= tl.load(tw_ptr + slot, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + rows64[:, None] * stride_os + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def combine(src_ptr, pos_ptr, y_ptr, H, K, stride_ss, stride_yt, K_POW2: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t, cols] = the sum of src[j, cols] over token t's sorted positions j = pos[t*K + k]
    (-1: a dropped slot, left out), added in fp32 in ascending j, which is ascending expert
    id (the order of the CPU combine); one program per token and BLOCK_H columns."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    ks = tl.arange(0, K_POW2)
    pos = tl.load(pos_ptr + t * K + ks, mask=ks < K, other=-1).to(tl.int64)
    none = tl.full((K_POW2,), 1 << 62, tl.int64)
    left = tl.where(pos >= 0, pos, none)  # positions not yet added (distinct: a permutation)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for _ in range(0, K):
        j = tl.min(left, 0)
        left = tl.where(left == j, none, left)
        kept = tl.full((BLOCK_H,), j, tl.int64) < (1 << 62)  # a block mask: a scalar one is not accepted everywhere
        acc += tl.load(src_ptr + tl.where(j < (1 << 62), j, 0) * stride_ss + cols, mask=col_ok & kept, other=0.0)
    tl.store(y_ptr + t * stride_yt + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def plan_slots(ids_ptr, order_ptr, token_ptr, expert_ptr, position_ptr, counts_ptr, S, E, K, RANK_PROGRAMS,
               BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """The dispatch plan in one launch: a stable counting sort of the S slots by expert.
    Slot s goes to rank(s) = #(slots with a smaller id) + #(earlier slots with the same id),
    the position ``torch.sort(stable=True)`` gives it. The first RANK_PROGRAMS programs rank
    BLOCK_S slots each against all S, CHUNK at a time; the others count the slots of BLOCK_E
    experts each (no atomics: every output element has one writer). Ids must lie in [0, E)
    (a router's top-k does)."""
    p = tl.program_id(0)
    if p < RANK_PROGRAMS:
        s = p * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = s < S
        mine = tl.load(ids_ptr + s, mask=ok, other=0).to(tl.int32)
        rank = tl.zeros((BLOCK_S,), dtype=tl.int32)
        for c0 in range(0, S, CHUNK):
            o = c0 + tl.arange(0, CHUNK)
            other = tl.load(ids_ptr + o, mask=o < S, other=E).to(tl.int32)  # E: past every real id
            before = (other[None, :] < mine[:, None]) | ((other[None, :] == mine[:, None]) & (o[None, :] < s[:, None]))
            rank += tl.sum(before.to(tl.int32), 1)
        tl.store(order_ptr + rank, s.to(tl.int64), mask=ok)
        tl.store(expert_ptr + rank, mine.to(tl.int64), mask=ok)
        tl.store(token_ptr + rank, (s // K).to(tl.int64), mask=ok)
        tl.store(position_ptr + s, rank.to(tl.int64), mask=ok)
    else:
        es = (p - RANK_PROGRAMS) * BLOCK_E + tl.arange(0, BLOCK_E)
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for c0 in range(0, S, CHUNK):
            o = c0 + tl.arange(0, CHUNK)
            other = tl.load(ids_ptr + o, mask=o < S, other=E).to(tl.int32)
            counts += tl.sum((other[None, :] == es[:, None]).to(tl.int32), 1)
        tl.store(counts_ptr + es, counts.to(tl.int64), mask=es < E)
