"""Sampling with a KV cache: prefill the prompts once, then decode one token a step.

Prompts of different lengths are left-padded to a common length, so every row writes the same
cache slot each step; the attention mask keeps padding out and positions per row exact. Each row
stops at any of the stop ids. Rows that stopped leave the batch once they are a quarter of it
(`DROP_ENDED`: their cache rows are dropped, and the others copied into a smaller cache); until
then they decode padding, which nothing reads. Sampling draws one random number per row of the
whole batch each step, ended rows included, so every row draws the same numbers however the
batch shrinks, and the same tokens up to rounding (a product of fewer rows may round its last
bit differently, as in any other batch). A prompt given several times (REINFORCE's k samples
of each) is prefilled once and its cache copied to each of its rows. On a GPU, a small batch's
steps after the prefill replay a CUDA graph (`minirm.graphs`), whose batch stays whole:
launching a step's kernels one by one costs more there than reading the weights. The graph
stays with the model for the next call of the same batch size (`release` frees it); with
`compile=True` it replays compiled steps, and distinct prompts are prefilled compiled, straight
into its cache. On the CPU,
a batch of up to 16 rows in the streamed layout (`minirm.packed`) takes each step in one call
to C++ (`minirm.decode`): on a 2-core Xeon, SmolLM2-135M's step went from 30 ms (eager) and
27 ms (compiled) to 20 ms at one row, and from 39-42 to 26 ms at 8 rows. Without top-k or
top-p, the loop runs there too (sampling and bookkeeping), until ended rows are to leave the
batch: another 1.1 ms a token saved at one row. Elsewhere,
`compile=True` runs a small batch's steps through `torch.compile` (`minirm.graphs`; the batch
stays whole): 15-35% faster steps than eager, after 25-130 s of compiling on the first call for
each batch size (a process that compiled the same graphs before reads them from inductor's
cache on disk).

`generate` returns the new tokens, their log-probabilities under the distribution they were
sampled from (after temperature, top-k and top-p; plain log-softmax for greedy decoding) and
whether each row ended with a stop id. REINFORCE (METHOD.md section 7) samples at temperature 1
with no filtering, where these are exactly log pi(y_t).

    python -m minirm.generate --model weights/smollm2-135m-instruct \\
        --prompt "What is the capital of France?"
"""

import math
import sys
from dataclasses import dataclass

import torch

from minirm import decode, graphs, packed
from minirm.errors import ArgumentParser, UserError, cli
from minirm.graphs import (can_graph, decoding_step, prefill_applies, prefilled_step,
                           static_steps_apply)
from minirm.model import KVCache
from minirm.packed import packed_for_decoding

# Ended rows leave the decoding batch when they are at least this fraction of it: a smaller
# batch decodes faster (on 2 CPU cores, SmolLM2's step takes ~0.2 s at 64 rows, ~0.07 s at 8),
# and copying the cache costs about one step's attention reads. The packed weights stay those
# chosen for the first batch size (`minirm.packed`): repacking would cost more than it saves.
DROP_ENDED = 0.25
# On a GPU, batches of up to GRAPH_ROWS rows replay each step from a CUDA graph
# (`minirm.graphs`) when at least GRAPH_MIN_TOKENS are asked for: capturing costs about two
# eager steps. Graphs were measured at batch 1 (an 8B model: 72 -> 140 tokens/s on an H200).
# The same batches are the ones a CPU compiles the steps of, with `compile=True`.
GRAPH_ROWS = 8
GRAPH_MIN_TOKENS = 8


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, N) new tokens; pad_id after a row ended
    logprobs: torch.Tensor  # (B, N) float32 log-probability of each new token
    mask: torch.Tensor      # (B, N) bool: tokens that belong to the response (stop id included)
    ended: torch.Tensor     # (B,) bool: the row emitted a stop id

    def token_lists(self, keep_stop: bool = False, stop_ids=()):
        out = []
        for row, m in zip(self.tokens.tolist(), self.mask.tolist()):
            ids = [t for t, keep in zip(row, m) if keep]
            if not keep_stop and ids and ids[-1] in stop_ids:
                ids = ids[:-1]
            out.append(ids)
        return out


def left_pad(prompts, pad_id: int, device=None):
    """List of id lists -> (tokens (B, P), mask (B, P)) padded on the left."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = True
    return tokens.to(device), mask.to(device)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None, u=None):
    """One token per row from logits (B, V); returns (tokens (B,), logprobs (B,)). `u`: the
    rows' uniform numbers (B, 1) float64, when the caller drew them (`sample_categorical`)."""
    logits = logits.float()
    if not top_k and (top_p is None or top_p >= 1.0):  # on the CPU, one call to C++
        if temperature > 0 and u is None:
            u = torch.rand(len(logits), 1, generator=generator, dtype=torch.float64,
                           device=logits.device)  # as sample_categorical would draw it
        drawn = decode.sample(logits, temperature, u)
        if drawn is not None:
            return drawn
    if temperature <= 0:  # the first largest logit (log-probs can round two of them equal)
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    if temperature != 1:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        drop = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    # The weights exp(logits - max), unnormalised (the inverse CDF scales by their total), are
    # the one (B, V) tensor made here; log p of the chosen token is logits - logsumexp.
    top = logits.amax(-1, keepdim=True)
    weights = (logits - top).exp_()
    tok = sample_categorical(weights, generator, u)
    lse = top + weights.sum(-1, keepdim=True).log_()
    return tok, (logits.gather(-1, tok[:, None]) - lse)[:, 0]


# Entries per block of the two-level running sum in `sample_categorical`.
CDF_BLOCK = 256


def sample_categorical(probs, generator=None, u=None):
    """One index per row of probs (B, V) (weights: they need not sum to 1), by inverse CDF: a
    uniform u per row, scaled to the row's total, and the first index whose running sum
    exceeds it (zero-probability entries are never picked). One random number per row, where
    torch.multinomial draws one per vocabulary entry: ~1 ms a token for a 49k vocabulary on a
    CPU core, 4% of a SmolLM2 decoding step. `u` (B, 1) float64 in [0, 1): those numbers,
    drawn by the caller.

    The running sum is taken in two levels: the sums of blocks of CDF_BLOCK entries, with
    their running sum in float64 (one over a 128k-entry row in float32 would lose its last
    digits), find the block, and that block's own running sum in float64 the entry. Nothing
    of size (B, V) is made: the whole row's running sum in float64 is 3 MB at 8 rows of 49k
    entries, and on the Xeon its copies and sums page-faulted fresh memory in most processes:
    `sample_next` took 3.8-4.6 ms a step at 8 rows that way, 0.6 ms now (on the CPU it now
    draws in C++ where it can, `decode.sample`, ~0.1 ms a row). The pick is the whole running
    sum's but where the target falls within rounding of an entry's edge (the blocks' sums are
    float32; tests/test_model.py)."""
    B, V = probs.shape
    if u is None:
        u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device)
    n = V // CDF_BLOCK * CDF_BLOCK
    sums = probs[:, :n].unflatten(1, (-1, CDF_BLOCK)).sum(-1)       # whole blocks: views
    if n < V:
        sums = torch.cat([sums, probs[:, n:].sum(-1, keepdim=True)], 1)  # the short last one
    ends = sums.double().cumsum(-1)                                   # running sum at block ends
    target = u * ends[:, -1:]
    # The block holding the entry: the first whose end exceeds the target (it has mass), or,
    # should rounding put the target at the total, the last block with mass.
    b = torch.minimum(torch.searchsorted(ends, target, right=True),
                      (ends == ends[:, -1:]).long().argmax(-1, keepdim=True))
    before = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)), 0.0)
    index = b * CDF_BLOCK + torch.arange(CDF_BLOCK, device=probs.device)  # (B, CDF_BLOCK)
    block = probs.gather(1, index.clamp(max=V - 1)).masked_fill_(index >= V, 0)
    j = torch.searchsorted(block.double().cumsum(-1), target - before, right=True)
    # Rounding (the block's sum taken in another order) can leave the target past the block's
    # own running total: the last entry with mass is then the one.
    last = (block > 0).long().mul_(torch.arange(1, CDF_BLOCK + 1, device=probs.device))
    return b[:, 0] * CDF_BLOCK + torch.minimum(j[:, 0], last.argmax(-1))


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
             stop_ids=(), pad_id=0, generator=None, progress=False,
             cuda_graphs=True, compile=False) -> Generation:
    """Sample continuations of `prompts` (lists of token ids) with a KV cache. On a GPU the
    decoding steps of up to GRAPH_ROWS rows are replayed from a CUDA graph unless
    `cuda_graphs` is False, with `compile` a graph of compiled steps; on the CPU, up to 16
    rows take each step in one call to C++ where the streamed layout is in use
    (`minirm.decode`), else with `compile` they run through `torch.compile`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    device = next(model.parameters()).device
    tokens, mask = left_pad(prompts, pad_id, device)
    B, P = tokens.shape
    limit = model.cfg.max_seq_len
    if P + max_new_tokens > limit:
        raise UserError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the "
                        f"model's context of {limit}; shorten the prompt or --max-new-tokens")
    # A prompt given several times (REINFORCE's k samples of each) is prefilled once: row b
    # continues distinct prompt rows[b], whose cache and last logits it starts from.
    distinct = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    first = [rows.index(i) for i in range(len(distinct))]
    rows = torch.tensor(rows, device=device)
    with packed_for_decoding(model, rows=B):
        return _sample(model, tokens[first], mask[first], rows, max_new_tokens, temperature,
                       top_k, top_p, stop_ids, pad_id, generator, progress, cuda_graphs,
                       compile)


def _sample(model, tokens, mask, rows, max_new_tokens, temperature, top_k, top_p, stop_ids,
            pad_id, generator, progress, cuda_graphs, compile):
    B, P = len(rows), tokens.shape[1]
    device = tokens.device
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    # On a GPU the steps replay one CUDA graph (`minirm.graphs`), on the CPU with `compile` they
    # run compiled; either way the batch stays whole. On the CPU a step can also be one call to
    # C++ (`minirm.decode`), which comes first.
    small = B <= GRAPH_ROWS and max_new_tokens >= GRAPH_MIN_TOKENS
    static = whole = None
    if small and len(tokens) == B and prefill_applies(model, device, cuda_graphs, compile):
        # Compiled steps on a GPU: the prompts go straight into the graph's cache, compiled too.
        logits, static = prefilled_step(model, tokens, mask, P + max_new_tokens, compile=True)
        cache = static.cache
    else:
        cache = KVCache(len(model.layers), len(tokens), P + max_new_tokens)
        # Prefill: each distinct prompt through the model, logits at its last position only.
        logits = model.logits_from(model.norm(model.body(tokens, mask, cache)[:, -1:]))[:, -1]
        if len(tokens) < B:
            cache, logits = cache.rows(rows), logits[rows]
        if decode.applies(model, cache, B):
            whole = decode.Step(model)
        elif small:
            if cuda_graphs and can_graph(model, cache):
                static = decoding_step(model, cache, compile=compile)
            elif compile and device.type == "cpu" and static_steps_apply(model):
                static = decoding_step(model, cache, graph=False, compile=True)
            if static:
                cache = static.cache  # the prefill's copy is free to go
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    valid = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    # The batch being decoded: row i of the cache (and of logits) is output row alive[i].
    alive = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", leave=False)
    n, finished = 0, False
    if whole and not top_k and (top_p is None or top_p >= 1.0):
        # The loop below in C++, until rows leave the batch: nothing left for Python a token.
        logits = logits.contiguous()  # the loop writes each step's logits into it
        n = _loop_in_cpp(whole, cache, logits, temperature, stop_ids, pad_id, generator, out,
                         logprobs, valid, done, bar)
        ended |= done
        finished = n == max_new_tokens or (len(stop_ids) > 0 and bool(done.all()))
    for step in range(n, max_new_tokens) if not finished else ():
        u = None
        if temperature > 0:  # one number per output row, whichever rows are still decoding
            u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=device)[alive]
        tok, lp = sample_next(logits, temperature, top_k, top_p, u=u)
        tok = torch.where(done, pad_id, tok)
        out[alive, step], logprobs[alive, step], valid[alive, step] = tok, lp, ~done
        hit = torch.isin(tok, stop) & ~done
        ended[alive] |= hit
        done |= hit
        n = step + 1
        if bar is not None:
            bar.update()
        if step == max_new_tokens - 1:
            break
        if len(stop_ids):  # else no row can end, and a GPU need not wait to be asked
            n_done = int(done.sum())  # one sync a step
            if n_done == len(alive):
                break
            if static is None and n_done >= DROP_ENDED * len(alive):  # ended rows leave
                keep = (~done).nonzero()[:, 0]
                cache, alive, tok, done = cache.rows(keep), alive[keep], tok[keep], done[keep]
                if whole is None and decode.applies(model, cache, len(keep)):
                    whole = decode.Step(model)  # few enough rows left for it
        if static:
            logits = static(tok)
        elif whole:
            logits = whole(tok, cache)
        else:
            logits = model(tok[:, None], None, cache)[:, -1]
    if bar is not None:
        bar.close()
    logprobs = logprobs.masked_fill(~valid, 0.0)
    return Generation(out[:, :n], logprobs[:, :n], valid[:, :n], ended)


def _loop_in_cpp(whole, cache, logits, temperature, stop_ids, pad_id, generator, out, logprobs,
                 valid, done, bar):
    """The sampling loop of `_sample` from its first step, in calls to C++ (`decode.Step.loop`:
    each step's sampling, bookkeeping and decoding step). It draws every step's random numbers
    at once, then puts the generator where the steps it took would have left it. Returns the
    step to sample next: max_new_tokens; where every row has ended; a step after enough rows
    have ended to leave the batch (DROP_ENDED: they leave it one step later than in
    `_sample`'s own loop); or a step it could not take (a row's logits with a NaN or +inf or
    nothing above -inf, a token outside the embedding). `_sample`'s own loop takes the last
    two from there."""
    B, N = out.shape
    gen = generator if generator is not None else torch.default_generator
    u = None
    if temperature > 0:
        state = gen.get_state()
        u = torch.rand(N, B, generator=gen, dtype=torch.float64)
    chunk = 8 if bar is not None else N  # a progress bar moves every few tokens
    enough = math.ceil(DROP_ENDED * B)  # ended rows that leave the batch, in `_sample`'s loop
    n = 0
    while n < N:
        m = whole.loop(cache, logits, n, n + chunk, temperature, u, stop_ids, pad_id, out,
                       logprobs, valid, done, enough)
        if bar is not None:
            bar.update(m - n)
        stopped = m < min(n + chunk, N) or (len(stop_ids) > 0 and int(done.sum()) >= enough)
        n = m
        if stopped:
            break
    if u is not None and n < N:
        gen.set_state(state)
        torch.rand(n, B, generator=gen, dtype=torch.float64)  # as the steps taken drew them
    return n


def release(model):
    """Free what `generate` keeps with `model` for its next call: the decoding layout's copy of
    the weights (`minirm.packed`) and the static step with its cache (`minirm.graphs`).
    Callers that go on to train (a REINFORCE rollout, an evaluation during SFT) call it after
    generating, so that neither is held through the optimizer's steps."""
    packed.release(model)
    graphs.release(model)


def build_parser():
    p = ArgumentParser(prog="python -m minirm.generate",
                       description="Generate a response from a model folder.")
    p.add_argument("--model", required=True, help="model folder (Hugging Face layout) or preset")
    p.add_argument("--prompt", required=True, help="sent as a user message via the chat format")
    p.add_argument("--raw", action="store_true", help="send --prompt as it is, no chat format")
    p.add_argument("--system", default=None, help="system message (chat format only)")
    p.add_argument("--chat-format", default=None, choices=["llama3", "chatml", "toy"],
                   help="the model's chat format (default: tokenizer_config.json's)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="stop after this many tokens if no end of turn came (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities add up to p "
                        "(nucleus sampling; default 1: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler: the same seed gives the same answer (default 0)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree (run under torchrun --nproc-per-node TP)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch each decoding step's kernels one by one instead of "
                        "replaying a CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="run the decoding steps through torch.compile: on a GPU inside "
                        "the CUDA graph, on the CPU where they do not run in one call to C++ "
                        "(minirm.decode; 15-35%% faster steps after 25-130 s of compiling, so "
                        "only worth it there for thousands of new tokens)")
    return p


def check_sampling_args(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    for name in ("temperature", "top_p"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


@cli
def main(argv=None):
    from minirm.checkpoint import load_model, load_tokenizer

    args = build_parser().parse_args(argv)
    check_sampling_args(args)
    from minirm.distributed import env_rank
    from minirm.score import resolve_device, tp_grid

    device = resolve_device(args.device)
    grid = tp_grid(args.tp)  # every tp rank samples the same tokens from the same seed
    device = str(grid.device) if grid else device
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    tok = load_tokenizer(args.model, chat_format=args.chat_format)
    model, cfg = load_model(args.model, dtype=dtype, device=device, grid=grid)
    model.eval()
    if cfg.n_outputs:
        raise UserError(f"{args.model}: a reward model (it has a {cfg.n_outputs}-output reward "
                        "head and no language-model head) cannot generate; pass a language "
                        "model, or score text with python -m minirm.score")
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.encode_chat(messages, add_generation_prompt=True).ids
    stop_ids = set(cfg.eos_ids) | set(tok.stop_ids)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.compile and env_rank() == 0:
        print("generate: --compile: the decoding step compiles before the first token"
              + (" (20-130 s) unless it runs in one call to C++" if device == "cpu"
                 else ", block by block"), file=sys.stderr)
    result = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k,
                      args.top_p, stop_ids=stop_ids, pad_id=tok.pad_id, generator=gen,
                      progress=sys.stderr.isatty(), cuda_graphs=not args.no_cuda_graphs,
                      compile=args.compile)
    if env_rank() == 0:
        print(tok.decode(result.token_lists(stop_ids=stop_ids)[0]))


if __name__ == "__main__":
    main()
