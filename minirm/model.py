"""The Llama-3 decoder, written out: RMSNorm, RoPE with Llama-3 scaling, grouped-query attention,
SwiGLU, a tied or untied output layer, and an optional reward head.

Layouts follow Hugging Face's `LlamaForCausalLM` (rotate-half RoPE), so its q/k weights load
without permutation. The forward pass never mentions tensor parallelism: projections reshape with
`view(B, T, -1, head_dim)`, so the same code runs on a shard holding a fraction of the heads
(`minirm.parallel` swaps the Linear modules, it does not fork the math).

Padding is described by an attention mask (B, T), True for real tokens. Positions count real
tokens only, so a left-padded row gets the same positions, and the same outputs, as the unpadded
one. The reward is read at the last real token found from that mask, never by searching for a pad
or eos id (which breaks when pad == eos; METHOD.md section 2).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirm import fused, onednn
from minirm.attention import attention, build_mask
from minirm.config import ModelConfig, llama3_inv_freq


def allow_recompiles(n: int):
    """Let `torch.compile` compile each function up to `n` times (for the whole process) before
    it falls back to running it eagerly: minirm compiles one function for several kinds of call."""
    import torch._dynamo

    config = torch._dynamo.config  # the limit's name before torch 2.7: cache_size_limit
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), n))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight. F.rms_norm is that formula in one kernel
        # (fewer calls per token; a decoding step on a GPU is mostly small kernels).
        if x.dtype == torch.float32:
            if fused.applies(x) and self.weight.dtype == x.dtype:  # one pass each way
                return fused.rms_norm(x, self.weight, self.eps)       # (minirm.fused)
            if (x.device.type == "cpu" and torch.is_grad_enabled()
                    and not torch.compiler.is_compiling()):
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 (at least: float64 stays) and cast back before the gain, as the
        # Llama reference does.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * F.rms_norm(x32, self.weight.shape, None, self.eps).to(x.dtype)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with its gradient written out, for training on the CPU where the C++ kernels of
    `minirm.fused` (the same formulas, one pass each way) are not built. Autograd goes
    through F.rms_norm's parts (square, mean, rsqrt and two products, then the backward of
    each: a dozen passes over the activations). With x^ = x r, r = (mean(x^2) + eps)^-1/2 and
    y = x^ * w, for an upstream gradient dy:

        dw = sum over positions of dy * x^
        dx = r (g - x^ mean(g * x^)),   g = dy * w

    where mean(g * x^) = (dy * x^) . w / dim reuses dw's product. SmolLM2-135M's training step
    on 8 x 256 tokens took 6-9% less time (Xeon, 2 cores, in turns with F.rms_norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)     # sqrt(sum(x^2)): one pass
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, dy):
        x_hat, r, weight = ctx.saved_tensors
        dim = weight.shape[0]
        t = dy * x_hat
        dw = t.reshape(-1, dim).sum(0) if ctx.needs_input_grad[1] else None
        with torch.autocast("cpu", enabled=False):  # a backward called under autocast: float32
            mean = (t @ weight).unsqueeze_(-1).div_(dim)            # mean(g * x^), (..., 1)
        # dx in t's memory: one activation-sized buffer fewer
        dx = torch.mul(dy, weight, out=t).addcmul_(x_hat, mean, value=-1).mul_(r)
        return dx, dw, None


def rope_cos_sin(inv_freq, positions, dtype):
    """cos and sin of shape (B, T, 1, head_dim) for integer positions (B, T), the sin with its
    first half negated: the form `apply_rope` takes."""
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)[:, :, None, :]
    signed_sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)[:, :, None, :]
    return cos.to(dtype), signed_sin.to(dtype)


def apply_rope(x, cos, signed_sin):
    """Rotate query/key vectors x (B, T, H, head_dim) by their positions.

    The rotate-half form (Hugging Face's layout) is x * cos + rotate_half(x) * sin, where
    rotate_half maps the halves (x1, x2) to (-x2, x1). Here rotate_half(x) * sin is computed as
    x with its halves swapped (a roll by head_dim / 2) times the sin with its first half
    negated: two kernels instead of three (chunk, neg, cat), forward and backward. On the CPU
    in float32 it is one kernel each way (`minirm.fused`)."""
    if fused.applies(x):
        return fused.rope(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Linear(nn.Linear):
    """nn.Linear without a bias whose products run through oneDNN for float32 on the CPU
    (`minirm.onednn`: the same function, faster there); elsewhere exactly nn.Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return onednn.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.backend = cfg.attention
        self.block = cfg.flash_block
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.packed = None  # (qkv, wo) while decoding with packed weights (minirm.packed)

    def forward(self, x, cos, sin, key_mask, cache=None, layer=0, allowed=None, read=None):
        if read is not None:
            return self.read_out(x, cos, sin, key_mask, read, cache, layer)
        B, T, _ = x.shape
        packed = self.packed if not torch.is_grad_enabled() else None
        q, k, v = packed[0](x) if packed else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(B, T, -1, self.head_dim)  # -1: all heads, or this rank's share
        k = k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys so far: (B, Hkv, S, head_dim)
        # A compiled decoding step's cache names the formula it compiles best (`minirm.graphs`).
        backend = getattr(cache, "backend", None) or self.backend
        out = attention(q, k, v, key_mask, backend=backend, block=self.block, allowed=allowed)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return packed[1](out) if packed else self.wo(out)

    def read_out(self, x, cos, sin, key_mask, read, cache=None, layer=0):
        """The output at one position per row, `read` (B,): every position's key and value,
        but only that position's query. One query per row, so the scores are a (B, heads, S)
        vector and the plain formula (the reference backend) computes them in one product, in
        float32 at least (what SDPA and the flash backend accumulate in). With `cache` (the
        keys and values of shared prompts), the keys are the prompt's followed by these."""
        B, T, _ = x.shape
        rows = torch.arange(B, device=x.device)
        q = self.wq(x[rows, read][:, None]).view(B, 1, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q = apply_rope(q, cos[rows, read][:, None], sin[rows, read][:, None])
        k, v = apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, head_dim)
        # The read query sits at key position `at`, and sees key j iff j <= at and (key j is
        # real or j is at): the rule of `attention`, whose own mask would put the query at the
        # last key instead.
        S = k.shape[2]
        at = (read + S - T)[:, None]
        pos = torch.arange(S, device=x.device)
        sees = pos <= at
        if key_mask is not None:
            sees = sees & (key_mask | (pos == at))
        dt = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            out = attention(q.transpose(1, 2).to(dt), k.to(dt), v.to(dt), backend="reference",
                            allowed=sees[:, None, None, :])
        return self.wo(out.to(v.dtype).transpose(1, 2).reshape(B, 1, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is Hugging Face's gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim)
        self.packed = None  # (w1 and w3 as one, w2) while decoding with packed weights

    def forward(self, x):
        packed = self.packed if not torch.is_grad_enabled() else None
        if packed:
            gate, up = packed[0](x)
            return packed[1](F.silu(gate) * up)
        gate, up = self.w1(x), self.w3(x)
        if fused.applies(gate):  # forward and backward in one pass each (minirm.fused)
            return self.w2(fused.swiglu(gate, up))
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, key_mask, cache=None, layer=0, allowed=None, read=None):
        """The block's output (B, T, dim), or with `read` (B,) only at those positions,
        (B, 1, dim): the reward reads one position, and the last block's other outputs would
        be thrown away (`Transformer.body`)."""
        h = self.attention(self.attention_norm(x), cos, sin, key_mask, cache, layer, allowed,
                           read)
        if read is not None:
            x = x[torch.arange(x.shape[0], device=x.device), read][:, None]
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache(nn.Module):
    """A preallocated key/value cache for all layers, filled left to right.

    Every row of the batch writes at the same slot (prompts are left-padded to a common length),
    while `mask` remembers which slots hold real tokens and `lengths` how many each row has, so
    RoPE positions and attention masks stay per-row exact. Buffers are allocated on the first
    update, from the key shape, so a tensor-parallel shard allocates only its own heads.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int):
        super().__init__()
        self.n_layers, self.batch, self.max_len = n_layers, batch, max_len
        self.k = self.v = None
        self.pos = 0                       # slots filled so far
        self.mask = None                   # (B, max_len) bool: real tokens
        self.lengths = None                # (B,) real tokens so far

    def start(self, mask):
        """Record the new tokens' mask (B, T); return the key mask over all slots so far."""
        B, T = mask.shape
        if self.mask is None:
            self.mask = torch.zeros(B, self.max_len, dtype=torch.bool, device=mask.device)
            self.lengths = torch.zeros(B, dtype=torch.long, device=mask.device)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos + T} needed")
        self.mask[:, self.pos:self.pos + T] = mask
        return self.mask[:, :self.pos + T]

    def update(self, layer, k, v):
        B, H, T, D = k.shape
        if self.k is None:
            shape = (self.n_layers, B, H, self.max_len, D)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, mask):
        self.lengths += mask.sum(-1)
        self.pos += mask.shape[1]

    def rows(self, rows):
        """A cache whose row b is a copy of this cache's row rows[b] (a prompt prefilled once
        for several samples; the rows still decoding). Only the filled slots are copied: the
        others are written before they are read."""
        out = KVCache(self.n_layers, len(rows), self.max_len)
        shape = (self.n_layers, len(rows), *self.k.shape[2:])
        out.k, out.v = self.k.new_empty(shape), self.v.new_empty(shape)
        out.k[:, :, :, :self.pos] = self.k[:, rows, :, :self.pos]
        out.v[:, :, :, :self.pos] = self.v[:, rows, :, :self.pos]
        out.mask, out.lengths, out.pos = self.mask[rows], self.lengths[rows], self.pos
        return out


class SharedPrompts:
    """The keys and values of prompts computed once for several continuations each: a preference
    pair's chosen and rejected responses share their prompt, and the prompt's part of the work
    (everything but attention from the responses) need not be done twice.

    Two passes of `Transformer.body`, with this object in place of a KV cache. The first runs
    the prompts (P, Lp), left-padded, and records every layer's keys and values (after RoPE),
    with their gradients. The second runs the continuations (B, Lt), right-padded, with
    `continued(rows)`: row b continues prompt rows[b], its positions count on from that
    prompt's length, and its queries attend to the prompt's keys followed by its own. That is
    the KV-cache prefill of `minirm.generate`, made differentiable, so each continuation gets
    the same outputs, and the prompt the same gradients (summed over its continuations), as
    the whole sequences would in one pass.
    """

    def __init__(self, mask):
        self.prompt_mask = mask.bool()     # (P, Lp): real prompt tokens
        self.lengths = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        self.k, self.v = {}, {}            # layer -> (P, Hkv, Lp, head_dim)

    def start(self, mask):
        return mask

    def update(self, layer, k, v):
        # The first pass's tensors only: with activation checkpointing, backward runs a block
        # again, and keeping its recomputed keys would hold their graph until the end.
        self.k.setdefault(layer, k)
        self.v.setdefault(layer, v)
        return k, v

    def advance(self, mask):
        pass

    def continued(self, rows):
        """The second pass's view: row b of the continuations follows prompt rows[b]."""
        return _Continued(self, rows)


class _Continued:
    def __init__(self, shared: SharedPrompts, rows):
        self.rows = rows
        self.k, self.v = dict(shared.k), dict(shared.v)
        self.prompt_mask = shared.prompt_mask[rows]
        self.lengths = self.prompt_mask.sum(-1)

    def start(self, mask):
        """The key mask over the prompt's slots and then the continuation's."""
        return torch.cat((self.prompt_mask, mask), dim=1)

    def update(self, layer, k, v):
        return (torch.cat((self.k[layer][self.rows], k), dim=2),
                torch.cat((self.v[layer][self.rows], v), dim=2))

    def advance(self, mask):
        pass


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # A reward model has no language-model head (METHOD.md section 2: it is unused), which
        # is also the layout of Hugging Face's LlamaForSequenceClassification.
        self.output = (None if cfg.tie_embeddings or cfg.n_outputs
                       else Linear(cfg.dim, cfg.vocab_size))
        # The reward head (METHOD.md section 2): Linear(hidden, n_outputs, bias=True), float32.
        self.score = (nn.Linear(cfg.dim, cfg.n_outputs, bias=True, dtype=torch.float32)
                      if cfg.n_outputs else None)
        self._inv_freq = None
        self._compiled = None  # compiled blocks for passes without a cache (`compile_blocks`)
        self.activation_checkpointing = False
        self.packed_head = None  # the output layer while decoding with packed weights

    def compile_blocks(self, **options):
        """Compile the blocks with `torch.compile` for passes without a cache (training, scoring).
        Inductor fuses what runs between the products (norms, RoPE, SwiGLU, residuals) into few
        kernels, which on a GPU is much of a training step's time besides the products. The
        blocks themselves stay as they are (names, weights, checkpoints); the compiled versions
        share their weights. One compiled graph serves every block for each kind of call (the
        last block reading one position, padding or none, gradients or none), so the limit on
        recompilations is raised to cover those; the first steps pay for compiling. Passes with
        a cache (shared prompts, decoding) keep the plain blocks: a cache looks up each layer's
        keys by its number, which compiled code would specialise once per layer."""
        allow_recompiles(32)
        self._compiled = [torch.compile(layer, **options) for layer in self.layers]
        return self

    def _apply(self, fn, *args, **kwargs):
        # A move or a cast (to, cuda, float, ...) replaces the tensors: the decoding step kept
        # for the old ones (`minirm.graphs`, a CUDA graph reading them by address) goes, even
        # if the new ones land at the same addresses.
        from minirm import graphs

        graphs.release(self)
        self._inv_freq = None
        return super()._apply(fn, *args, **kwargs)

    def inv_freq(self, device):
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = llama3_inv_freq(self.cfg).to(device)
        return self._inv_freq

    def init_weights(self, seed: int | None = None, std: float = 0.02):
        """Random initialisation for training from scratch (normal(0, std), unit norms), drawn
        on the model's device (a GPU draws other numbers than the CPU for the same seed; an 8B
        model is drawn in seconds there)."""
        device = self.tok_embeddings.weight.device
        gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "score.bias":
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
        return self

    def cast(self, dtype):
        """Convert the weights to `dtype`, keeping the reward head in float32."""
        self.to(dtype)
        if self.score is not None:
            self.score.float()
        return self

    def body(self, tokens, mask=None, cache=None, read=None, embedded=None):
        """Hidden states (B, T, dim) after the last block, before the final norm.

        With `read`, a (B,) tensor of positions (or (1,), the same for every row), only the
        hidden state at each row's position, (B, dim). The last block then needs every
        position's keys and values but nothing else of the other positions: their queries,
        attention, output projection and feed-forward are skipped, nearly 1/n_layers of the
        work. `embedded` is the tokens' embeddings (B, T, dim) when the caller has them."""
        B, T = tokens.shape
        if read is not None:
            read = read % T  # -1 is the last position, as in indexing
        if isinstance(cache, KVCache) and read is not None:
            raise ValueError("read= computes the last block at a few positions; a KV cache "
                             "needs all of them")
        if cache is not None:
            if mask is None:
                mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
            key_mask = cache.start(mask.bool())
            positions = cache.lengths[:, None] + mask.long().cumsum(-1) - 1
        elif mask is not None:
            key_mask = mask.bool()
            positions = mask.long().cumsum(-1) - 1
        else:  # no padding: attention may take its causal fast path
            key_mask = None
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        positions = positions.clamp(min=0)  # left padding sits at position 0
        allowed = None
        if getattr(cache, "static", False):
            # A static cache (`minirm.graphs`: a CUDA graph's steps, or compiled ones). One token
            # a row sees every real slot of the whole cache, its own included; a prefill from
            # empty, the usual rule over its own T slots. No test that syncs.
            allowed = (key_mask[:, None, None, :] if T == 1
                       else build_mask(key_mask, T, T, tokens.device))
        elif key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding at all: attention takes its causal fast paths
        # Who sees whom, built once for all layers (not by the flash backend, which never
        # holds a T x S matrix).
        if allowed is None and key_mask is not None and self.layers[0].attention.backend != "flash":
            allowed = build_mask(key_mask, T, key_mask.shape[1], tokens.device)
        x = self.tok_embeddings(tokens) if embedded is None else embedded
        # sin comes with its first half negated, as apply_rope takes it.
        cos, sin = rope_cos_sin(self.inv_freq(tokens.device), positions, x.dtype)
        last_layer = len(self.layers) - 1
        blocks = getattr(cache, "run_block", None)  # a static cache's compiled blocks (graphs.py)
        for i, layer in enumerate(self.layers):
            r = read if i == last_layer else None
            if self._compiled is not None and cache is None:
                layer = self._compiled[i]
            if blocks is not None:
                x = blocks(i, layer, x, cos, sin, key_mask, allowed)
            elif (self.activation_checkpointing and self.training
                    and not isinstance(cache, KVCache)):
                # Keep only block inputs; recompute the block in backward (memory for time).
                x = checkpoint(layer, x, cos, sin, key_mask, cache, i, allowed, r,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_mask, cache, i, allowed, r)
        if cache is not None:
            cache.advance(mask.bool())
        return x if read is None else x[:, 0]

    def logits_from(self, h):
        """Language-model logits from final-norm hidden states."""
        if self.packed_head is not None and not torch.is_grad_enabled():
            return self.packed_head(h)
        if self.output is None:
            if not self.cfg.tie_embeddings:
                raise ValueError("a reward model has no language-model head")
            return onednn.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def forward(self, tokens, mask=None, cache=None):
        """Next-token logits (B, T, vocab)."""
        return self.logits_from(self.norm(self.body(tokens, mask, cache)))

    def embed_together(self, *tokens):
        """The embeddings of several token tensors, in one lookup: its backward then makes one
        dense gradient of the whole table (113 MB for SmolLM2), not one per tensor."""
        x = self.tok_embeddings(torch.cat([t.reshape(-1) for t in tokens]))
        parts = x.split([t.numel() for t in tokens])
        return [e.view(*t.shape, -1) for t, e in zip(tokens, parts)]

    def run_prompts(self, tokens, mask, embedded=None):
        """The first pass of `SharedPrompts`: prompts (P, Lp), left-padded, through the model.
        Returns the cache of every layer's keys and values, for the continuations, and the
        hidden states at the prompts' last position (P, dim), before the final norm. Only that
        position is read, so the last block computes its keys and values and skips the rest
        of the other positions."""
        cache = SharedPrompts(mask)
        last = self.body(tokens, mask, cache=cache, read=torch.full((1,), -1, device=tokens.device),
                         embedded=embedded)
        return cache, last

    def last_hidden(self, tokens, mask=None, prompts=None, embedded=None):
        """Final-norm hidden states (B, dim) at each row's last real token: what a reward reads.

        With `prompts` = (prompt tokens (P, Lp), their mask, rows (B,)), row b of `tokens` is
        only what follows prompt rows[b] (`SharedPrompts`): each prompt is computed once,
        however many rows continue it, and the result is that of the whole sequences; every
        row of `tokens` then needs a real token (the reward is read there, not in the prompt).
        `embedded`: the tokens' embeddings (B, T, dim), when the caller has them (without
        `prompts`, which embeds prompts and rows in one lookup)."""
        cache = None
        if prompts is not None and prompts[0].shape[1] > 0:  # else the rows are whole
            if embedded is not None:
                raise ValueError("pass embedded= or prompts=, not both")
            prompt_tokens, prompt_mask, rows = prompts
            prompt_embedded, embedded = self.embed_together(prompt_tokens, tokens)
            cache, _ = self.run_prompts(prompt_tokens, prompt_mask, prompt_embedded)
            cache = cache.continued(rows)
        last = last_token_index(mask, tokens.shape[1], tokens.device)
        return self.norm(self.body(tokens, mask, cache=cache, read=last, embedded=embedded))

    def reward(self, tokens, mask=None, prompts=None, embedded=None):
        """Reward head outputs (B, n_outputs), float32 (the head's dtype), read at each row's
        last real token; `prompts` and `embedded` as for `last_hidden`."""
        if self.score is None:
            raise ValueError("this model has no reward head (n_outputs=0)")
        h_last = self.last_hidden(tokens, mask, prompts, embedded)
        with torch.autocast(device_type=h_last.device.type, enabled=False):  # head in float32
            return self.score(h_last.to(self.score.weight.dtype))


def last_token_index(mask, T: int, device=None):
    """Index of the last real token of each row, from the mask alone (left or right padding)."""
    if mask is None:
        return torch.full((1,), T - 1, dtype=torch.long, device=device)
    pos = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (pos + 1)).argmax(-1)
