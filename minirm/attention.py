"""Causal attention with grouped-query heads and padding masks: one function, three backends.

`attention(q, k, v, key_mask, backend)` is the only thing the model calls. The backends compute
the same function (tests/test_attention.py proves it to 1e-5, forward and backward):

- `reference`: softmax(Q K^T / sqrt(d) + mask) V, written out ("Attention Is All You Need",
  eq. 1). It builds the whole T x S score matrix; read this one first.
- `flash`: FlashAttention-2 (Dao, 2023) in plain PyTorch tensor ops. Keys are visited one block
  at a time with an online softmax (Alg. 1) and the backward recomputes the scores block by
  block from the saved log-sum-exp (Alg. 2), so neither pass ever holds a T x S score matrix.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention, PyTorch's fused kernels. On the
  CPU, float32 rows of head size 64 or 128 (up to 1536 or 768 keys, padded or not, not
  decoding steps) go to minirm's own kernel instead (`minirm/attention.cpp`, below `_sdpa`):
  flash's two passes in C++, 1.7x faster than SDPA's at 8 x 256 tokens.

Positions. The T queries are the last T of the S keys: query i sits at key position S - T + i.
One rule thus covers a plain forward (T == S), a prefill after a KV cache, and one-token decode
(T == 1). Query i sees key j iff j <= S - T + i and (key j is a real token or j is query i
itself). The self exception keeps every softmax row non-empty, so padded queries (left or right
padding) give finite, unused outputs instead of NaN.

What it simplifies, compared with the CUDA FlashAttention-2 kernel:
- The kernel's parallel grid over query blocks becomes one batched matmul per step: a step takes
  one key block (in the forward, up to a few that the whole tile sees) against a tile of query
  blocks (TILE_SCORES bounds its scores), for every batch element and key/value head at once.
  The Python loop thus runs far fewer times than once per pair of blocks, which is what makes
  it fast enough on a CPU.
- Grouped-query attention: the G query heads that share a key/value head are stacked as the
  rows of one matrix (position-major: row t * G + g is position t of head g), so a step
  multiplies each key/value block once per key/value head, in matmuls G times taller, and K and V
  are never repeated (the kernel gives each query head its own thread block, which reads the
  shared block). The rows of a tile then cover all G heads of its query positions.
- Scores and accumulators are float32 (or float64 for float64 inputs) whatever the input dtype,
  and the inputs are upcast before the matmuls; the kernel multiplies in bf16/fp16 and only
  accumulates in float32. The result is cast back to q's dtype.
- No dropout, no sliding window, no soft-capping: Llama-3 uses none of them.
"""

import ctypes
import math

import torch
import torch.nn.functional as F

from minirm.native import Library

BACKENDS = ("reference", "flash", "sdpa")


def attention(q, k, v, key_mask=None, backend="reference", block=128, allowed=None):
    """q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0 and S >= T.
    The T queries are the LAST T of the S key positions (query i sits at key position S - T + i);
    this covers plain forward (S == T), prefill and one-token KV-cache decode (T == 1).
    key_mask: optional (B, S) bool, True = real token, False = padding (left or right padding).
    Query i may attend to key j iff j <= S - T + i and (key_mask[b, j] or j == S - T + i).
    (A padded query always sees itself, so no row is fully masked and nothing is NaN; outputs at
    padded queries are unused by the model.) Scale 1/sqrt(D). Returns (B, Hq, T, D) in q's dtype.
    `block` is the flash backend's key block size; the other backends ignore it. `allowed` is
    `build_mask(key_mask, T, S)` when the caller already built it (the model does, once for all
    layers); the flash backend never uses it."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (B, Hkv, S, D), \
        f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, Hkv, S, D={D})"
    assert Hq % Hkv == 0, f"n_heads={Hq} is not divisible by n_kv_heads={Hkv}"
    assert S >= T, f"{T} queries but only {S} keys; queries must be the last T key positions"
    if key_mask is not None:
        assert key_mask.shape == (B, S) and key_mask.dtype == torch.bool, \
            f"key_mask must be a (B={B}, S={S}) bool tensor, " \
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
    if backend == "reference":
        return _reference(q, k, v, key_mask, allowed)
    if backend == "flash":
        assert block > 0, f"flash block={block} must be positive"
        return _FlashAttention.apply(q, k, v, key_mask, block)
    if backend == "sdpa":
        return _sdpa(q, k, v, key_mask, allowed)
    raise ValueError(f"attention backend {backend!r} is unknown; "
                     f"choose one of {', '.join(BACKENDS)}")


def build_mask(key_mask, T, S, device):
    """Who sees whom: bool (B, 1, T, S), or (1, 1, T, S) without key_mask; True = may attend."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # queries are the last T positions
    k_pos = torch.arange(S, device=device)[None, :]
    causal = k_pos <= q_pos
    if key_mask is None:
        return causal[None, None]
    return causal & (key_mask[:, None, None, :] | (k_pos == q_pos))


# ----------------------------------------------------------------------------------- reference

def _reference(q, k, v, key_mask, allowed=None):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Grouped-query attention without repeating K/V per query head: the G query heads that share
    # a K/V head are (B, Hkv, G, T, D), and folding G into the rows, (B, Hkv, G*T, D), is the
    # broadcast against k (B, Hkv, 1, S, D) done as one plain batched matmul.
    qg = q.reshape(B, Hkv, G * T, D)
    scores = (qg @ k.transpose(-2, -1)) / math.sqrt(D)                  # eq. 1: Q K^T / sqrt(d)
    scores = scores.view(B, Hkv, G, T, S)
    if allowed is None:
        allowed = build_mask(key_mask, T, S, q.device)
    allowed = allowed[:, :, None]                                        # (B|1, 1, 1, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax in float32 and back, as Hugging Face does: half precision exp/sum loses digits.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    probs = probs.to(q.dtype)
    out = probs.view(B, Hkv, G * T, S) @ v
    return out.view(B, Hq, T, D)


# ----------------------------------------------------------------------------------------- sdpa

def _sdpa(q, k, v, key_mask, allowed=None):
    T, S = q.shape[2], k.shape[2]
    if _kernel_applies(q, k, v):  # minirm's CPU kernel, below
        return _CausalCPU.apply(q, k, v, key_mask)
    if key_mask is None and T == S:
        # The fast path. is_causal aligns the mask top-left, which equals ours only when T == S.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if key_mask is None and T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # decode sees every key
    if allowed is None:
        allowed = build_mask(key_mask, T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


# The CPU kernel of the sdpa backend: float32 rows of up to MAX_KEYS positions, with or without
# padding, head sizes 64 and 128, the keys of a shared prompt (SharedPrompts) or a KV cache
# before the queries or not (but at least MIN_QUERIES queries then). FlashAttention-2's two
# passes (the forward keeps only the output and each row's log-sum-exp; the backward recomputes
# the scores), written in C++ with whole rows of scores per block of queries
# (`minirm/attention.cpp`). At SmolLM2-135M's training shape (8 x 256 tokens, 9 query heads on 3
# key/value heads) on a 2-core Xeon, forward + backward took 11.5 ms against 19.2 for torch's
# SDPA.
#
# It holds a block's whole rows of scores and the head's K^T and V^T, ~640 bytes per key at
# head size 64, in the processor's second-level cache up to about 2000 keys: with one sequence
# of 9 query heads on 3 key/value heads, forward + backward took 22.6 ms against SDPA's 30.8 at
# 1024 tokens, 52.7 against 60.0 at 1536, the same at 2048, and 506 against 344 at 4096. At head
# size 128 (two sequences, 8 query heads on 2): 17.4 against 26.9 ms at 512 tokens, 42.2
# against 48.1 at 768, the same at 1024, 190 against 153 at 1536.
MAX_KEYS = {64: 1536, 128: 768}
# Fewer queries than this after a cache (a decoding step) stay with SDPA: the kernel would
# transpose every key and value for them.
MIN_QUERIES = 16
KERNEL = Library("attention.cpp", {
    "minirm_attention": [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6,
    "minirm_attention_backward": [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 6,
})


def _kernel_applies(q, k, v):
    T, S, D = q.shape[2], k.shape[2], q.shape[-1]
    if not (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and 0 < S <= MAX_KEYS.get(D, 0) and not torch.compiler.is_compiling()):
        return False
    if T < min(S, MIN_QUERIES):
        return False  # a decoding step: K and V transposed for a handful of queries
    # The backward gives each thread whole (batch element, key/value head) pairs: with fewer
    # pairs than threads, SDPA's backward, which splits finer, keeps every thread busy.
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if grad and q.shape[0] * k.shape[1] < torch.get_num_threads():
        return False
    return KERNEL.available()


class _CausalCPU(torch.autograd.Function):
    """q (B, H, T, D), k and v (B, Hkv, S, D), S >= T: views of the model's (B, T, heads, D)
    tensors, which the kernel reads as they are stored (the transposes back make no copies
    there; keys after a shared prompt's are copied). key_mask (B, S), True for real tokens, or
    None: the rule of `attention` (the queries are the last T positions; a key that is padding
    is seen by its own query only), as a bias of 0 or -inf added to the scores."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask):
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        (B, T, H, D), (S, Hkv) = q.shape, k.shape[1:3]
        bias = (None if key_mask is None
                else q.new_zeros(B, S).masked_fill_(~key_mask, float("-inf")))
        out, lse = torch.empty_like(q), q.new_empty(B, H, T)
        KERNEL.lib.minirm_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(bias),
                                    out.data_ptr(), lse.data_ptr(), B, T, S, H, Hkv, D)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dout = dout.transpose(1, 2).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        (B, T, H, D), (S, Hkv) = q.shape, k.shape[1:3]
        KERNEL.lib.minirm_attention_backward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(bias), out.data_ptr(),
            lse.data_ptr(), dout.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            B, T, S, H, Hkv, D)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def _ptr(x):
    return None if x is None else x.data_ptr()


# ---------------------------------------------------------------------------------------- flash

class _FlashAttention(torch.autograd.Function):
    """Saves q, k, v, out and the log-sum-exp per row: O(T * D), never O(T * S).

    Both passes choose their own dtypes (float32 tiles at least), so autocast is switched off
    inside them: under it, a backward run in an autocast region would get bf16 tiles from
    `bmm` and mix them with float32 accumulators."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, block):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _flash_forward(q, k, v, key_mask, block)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _flash_backward(q, k, v, out, lse, dout, key_mask, ctx.block)
        return dq, dk, dv, None, None


# Scores a pass holds at once, over all batch elements and heads together (float32, 4 bytes
# each): the backward two tiles of them (S or P, and dP or dS), the forward one tile of twice
# as many keys. It sets how many query rows and keys a step takes, and so bounds the working
# memory of both passes whatever T and S are. At T = 2048 (B = 1, 9 heads, D = 64) on CPU,
# 2**18 keeps forward + backward below SDPA's peak memory for ~8% more time than taller tiles
# (fewer, larger matmuls) would take in the backward. The forward holds none of the gradients
# (as many numbers as q, k and v) that the backward holds beside its tiles, so its larger tile
# does not raise the peak of the two; there, steps of 3 key blocks instead of 1 took it from
# 66 to 59 ms.
TILE_SCORES = 2**18


def _tile_rows(B, Hq, block, tiles=1):
    """Query rows per step: whole key blocks' worth, at least one, with `tiles` score tiles of
    that many rows within TILE_SCORES."""
    return block * max(1, TILE_SCORES // (tiles * B * Hq * block * block))


def _span(B, Hq, rows, block):
    """Keys per forward step for tiles of `rows` query rows: whole blocks, at least one, with
    the step's scores within 2 * TILE_SCORES."""
    return block * max(1, 2 * TILE_SCORES // (B * Hq * rows * block))


def _tiles(T, S, block, rows, span=None):
    """The query tiles of `rows` rows, each with the key blocks it has anything to compute with.

    Yields (i0, i1, steps): query rows [i0, i1), and steps (a, c, j0, j1) for keys [j0, j1),
    in ascending order. Query i sits at key position i + S - T, so a tile's rows before a would
    see none of these keys (they are in their causal future) and are skipped; rows [a, c) sit
    inside the keys and need the causal mask; rows [c, i1) see them all. A step is one key
    block, except that blocks every row of the tile sees whole (a == c == i0) are merged into
    steps of up to `span` keys (default `block`: no merging).
    """
    shift, span = S - T, span or block
    for i0 in range(0, T, rows):
        i1 = min(i0 + rows, T)
        steps = []
        for j0 in range(0, min(S, i1 + shift), block):
            j1 = min(j0 + block, S)
            a = max(i0, j0 - shift)
            c = max(a, min(i1, j1 - shift))
            if c == a and steps and steps[-1][0] == steps[-1][1] and j1 - steps[-1][2] <= span:
                steps[-1] = (a, c, steps[-1][2], j1)                 # one more whole block
            else:
                steps.append((a, c, j0, j1))
        yield i0, i1, steps


def _by_group(x, Hkv):
    """(B, Hq, T, D) -> (B, Hkv, T, G, D): the G query heads of each key/value head side by side
    at every position. A view of the model's (B, T, Hq, D) layout (and of a contiguous one)."""
    B, Hq, T, D = x.shape
    return x.reshape(B, Hkv, Hq // Hkv, T, D).transpose(2, 3)


def _rows(x5, a, b, dtype, scale=1.0):
    """Positions [a, b) of a (B, Hkv, T, G, D) tensor as (B*Hkv, (b - a) * G, D) matmul rows,
    position-major, in `dtype` and times `scale`: a new tensor."""
    B, Hkv, _, G, D = x5.shape
    rows = x5.new_empty((B * Hkv, (b - a) * G, D), dtype=dtype)
    rows.view(B, Hkv, b - a, G, D).copy_(x5[:, :, a:b])
    return rows.mul_(scale) if scale != 1 else rows


def _mask_(s, masked_keys, pos, a, c, j0, j1, shift, B, G):
    """Fill -inf where a query row may not see a key. s: (B*Hkv, (b - a) * G, j1 - j0) scores
    of query positions [a, b), each G rows (one per query head of the group)."""
    s = s.view(B, -1, s.shape[1] // G, G, s.shape[2])               # (B, Hkv, rows, G, keys)
    if c > a:  # rows inside the key block: causal, and a padded query still sees itself
        q_pos, k_pos = pos[a + shift:c + shift, None], pos[j0:j1]
        blocked = k_pos > q_pos                                      # (rows, keys)
        if masked_keys is not None:
            blocked = blocked | (masked_keys[:, None, j0:j1] & (k_pos != q_pos))
        s[:, :, :c - a].masked_fill_(blocked.view(-1, 1, c - a, 1, j1 - j0), float("-inf"))
    if masked_keys is not None and c - a < s.shape[2]:               # rows past the key block
        s[:, :, c - a:].masked_fill_(masked_keys[:, None, None, None, j0:j1], float("-inf"))


def _flash_forward(q, k, v, key_mask, block):
    """FlashAttention-2 forward (Alg. 1): online softmax over key blocks.

    As in the paper, query tiles are the outer loop and each keeps its running max m, sum l and
    unnormalised output O to itself (the CUDA kernel runs one thread block per query block, all
    in parallel; here a tile of query blocks is one batched matmul over (batch, key/value
    heads)). Key blocks are walked from last to first, so each row's first step is the block
    holding its own position, which it always sees: its running max is finite from the start
    (no NaN from padding). Returns the output and the log-sum-exp per row, (B, Hkv, T, G).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, shift, scale = Hq // Hkv, S - T, 1 / math.sqrt(D)
    dt = torch.promote_types(q.dtype, torch.float32)                # accumulate in float32 at least
    Qg = _by_group(q, Hkv)                                           # a view; tiles convert
    K, V = k.reshape(B * Hkv, S, D).to(dt), v.reshape(B * Hkv, S, D).to(dt)
    # A batched product shares whole (batch element, key/value head) pairs out between the
    # threads: with an odd number of pairs on an even number of threads, one thread waits for
    # part of it. Then each pair's rows go in two halves, against K and V repeated for them,
    # where a step takes a tile's rows whole. The forward has the memory to spare (the
    # backward's peak is the higher): at SmolLM2's 3 pairs and 2048 tokens on 2 cores, the
    # forward took 51-56 ms instead of 59-61, forward + backward 2-7% less.
    halves = (B * Hkv) % 2 == 1 and torch.get_num_threads() % 2 == 0
    if halves:
        K2, V2 = K.repeat_interleave(2, 0), V.repeat_interleave(2, 0)
    masked_keys = None if key_mask is None else ~key_mask
    pos = torch.arange(S, device=q.device)
    # The output is written in the model's (B, T, Hq, D) layout, so the caller's transpose back
    # to (B, T, Hq * D) is free, as after SDPA.
    out = q.new_empty((B, T, Hq, D), dtype=dt)
    O = _by_group(out.transpose(1, 2), Hkv)                          # (B, Hkv, T, G, D) view
    lse = q.new_empty((B, Hkv, T, G), dtype=dt)
    rows = _tile_rows(B, Hq, block)
    for i0, i1, steps in _tiles(T, S, block, rows, _span(B, Hq, rows, block)):
        # This tile's rows, with 1/sqrt(d) folded in: Q K^T / sqrt(d) without a pass over every
        # score tile to scale it.
        Q_i = _rows(Qg, i0, i1, dt, scale)                           # (B*Hkv, rows*G, D)
        m = Q_i.new_full((*Q_i.shape[:2], 1), float("-inf"))         # running row max
        l = Q_i.new_zeros((*Q_i.shape[:2], 1))                       # running row sum
        acc = torch.zeros_like(Q_i)                                  # running O, unnormalised
        pairs, n = Q_i.shape[:2]
        split = halves and n % 2 == 0
        for a, c, j0, j1 in reversed(steps):
            r = slice((a - i0) * G, None)                            # the rows that see keys j0..
            whole = split and a == i0                                # every row, in halves
            if whole:
                s = torch.bmm(Q_i.view(2 * pairs, n // 2, D),
                              K2[:, j0:j1].transpose(1, 2)).view(pairs, n, -1)
            else:
                s = torch.bmm(Q_i[:, r], K[:, j0:j1].transpose(1, 2))  # S = Q_i K_j^T / sqrt(d)
            _mask_(s, masked_keys, pos, a, c, j0, j1, shift, B, G)
            m_new = torch.maximum(m[:, r], s.amax(-1, keepdim=True))  # m = max(m_old, rowmax(S))
            p = s.sub_(m_new).exp_()                                 # P~ = exp(S - m)
            alpha = m[:, r].sub_(m_new).exp_()                       # alpha = e^(m_old - m)
            l[:, r].mul_(alpha).add_(p.sum(-1, keepdim=True))        # l = alpha l + rowsum(P~)
            if whole:                                                # O = alpha O + P~ V_j
                acc.mul_(alpha).view(2 * pairs, n // 2, D).baddbmm_(
                    p.view(2 * pairs, n // 2, -1), V2[:, j0:j1])
            else:
                acc[:, r].mul_(alpha).baddbmm_(p, V[:, j0:j1])
            m[:, r] = m_new
            del s, p  # free this step's scores before the next step allocates its own
        shape = (B, Hkv, i1 - i0, G)
        O[:, :, i0:i1] = acc.div_(l).view(*shape, D)                # O = diag(l)^-1 O
        lse[:, :, i0:i1] = m.add_(l.log_()).view(shape)             # L = m + log(l)
    return out.transpose(1, 2).to(q.dtype), lse


def _flash_backward(q, k, v, out, lse, dout, key_mask, block):
    """FlashAttention-2 backward (Alg. 2): recompute P block by block from L, never store it.

    The paper's outer loop is over key blocks, each thread block owning its dK_j and dV_j (and
    needing atomic adds for dQ). Here query tiles are outermost and dQ, dK and dV are whole
    buffers that every step adds its share to: dK_j and dV_j sum over the query tiles and over
    the G query heads sharing them, which are rows of the same matmul.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, shift, scale = Hq // Hkv, S - T, 1 / math.sqrt(D)
    dt = torch.promote_types(q.dtype, torch.float32)
    Q, dO, O = _by_group(q, Hkv), _by_group(dout, Hkv), _by_group(out, Hkv)  # views
    K, V = k.reshape(B * Hkv, S, D).to(dt), v.reshape(B * Hkv, S, D).to(dt)
    masked_keys = None if key_mask is None else ~key_mask
    pos = torch.arange(S, device=q.device)
    dq = q.new_zeros((B, T, Hq, D), dtype=dt)                        # the model's layout
    dQ, dK, dV = _by_group(dq.transpose(1, 2), Hkv), torch.zeros_like(K), torch.zeros_like(V)
    # Query tiles outermost here too, so that each tile's rows of Q and dO are gathered once (the
    # full copies would lift the peak over SDPA's); dK_j and dV_j are whole buffers anyway.
    for i0, i1, steps in _tiles(T, S, block, _tile_rows(B, Hq, block, tiles=2)):
        # Q's rows come scaled by 1/sqrt(d), as in the forward: S needs no scaling pass, and
        # dS^T (Q_i / sqrt(d)) is dK_j's share with the scale already in.
        Q_tile, dO_tile = _rows(Q, i0, i1, dt, scale), _rows(dO, i0, i1, dt)
        Di = _rows(O, i0, i1, dt).mul_(dO_tile).sum(-1, keepdim=True)  # D_i = rowsum(dO * O)
        L = lse[:, :, i0:i1].reshape(B * Hkv, -1, 1)                 # the tile's rows, as S's
        for a, c, j0, j1 in steps:
            K_j, V_j, r = K[:, j0:j1], V[:, j0:j1], slice((a - i0) * G, None)
            Q_i, dO_i = Q_tile[:, r], dO_tile[:, r]
            s = torch.bmm(Q_i, K_j.transpose(1, 2))                  # S = Q_i K_j^T / sqrt(d)
            _mask_(s, masked_keys, pos, a, c, j0, j1, shift, B, G)
            p = s.sub_(L[:, r]).exp_()                               # P = exp(S - L), in place
            # dV_j and dK_j are slices of whole buffers, and baddbmm_ into a slice runs one
            # matmul per (batch element, key/value head): a product, then an add, is faster.
            dV[:, j0:j1].add_(torch.bmm(p.transpose(1, 2), dO_i))    # dV_j += P^T dO_i
            dp = torch.bmm(dO_i, V_j.transpose(1, 2))                # dP = dO V_j^T
            ds = dp.sub_(Di[:, r]).mul_(p)                           # dS = P * (dP - D_i)
            del s, p  # P's tile freed before dQ_i's is made: the peak stays under SDPA's
            dQ_i = torch.bmm(ds, K_j).view(B, Hkv, i1 - a, G, D)
            dQ[:, :, a:i1].add_(dQ_i, alpha=scale)                   # dQ_i += dS K_j / sqrt(d)
            del dQ_i
            dK[:, j0:j1].add_(torch.bmm(ds.transpose(1, 2), Q_i))    # dK_j += dS^T Q_i / sqrt(d)
            del dp, ds  # free this step's tiles before the next step allocates its own
        del Q_tile, dO_tile, Di  # free this tile's rows before the next tile gathers its own
    return (dq.transpose(1, 2).to(q.dtype), dK.view(k.shape).to(k.dtype),
            dV.view(v.shape).to(v.dtype))
