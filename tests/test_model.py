"""The model against Hugging Face `transformers`, and its invariances (padding, batching, cache)."""

import weakref

import pytest
import torch
import torch.nn.functional as F

from minirm import fused
from minirm.checkpoint import load_model, save_model
from minirm.config import preset
from minirm.data import collate, collate_pairs
from minirm.generate import generate, left_pad
from minirm.model import (KVCache, RMSNorm, Transformer, _RMSNormCPU, apply_rope,
                          last_token_index, rope_cos_sin)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS = {
    "gqa-untied-llama3-rope": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-tied-head-dim": dict(tie_word_embeddings=True, head_dim=32, rope_theta=100000.0),
}


def tokens(B=2, T=40, vocab=300, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_rope_is_the_rotate_half_formula():
    """apply_rope's roll form equals x cos + rotate_half(x) sin written out, gradients too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 7, 30]])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    cos, signed_sin = rope_cos_sin(inv_freq, positions, torch.float64)
    angles = positions[..., None, None].double() * torch.cat((inv_freq, inv_freq))
    x1, x2 = x.chunk(2, dim=-1)
    want = x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()
    got = apply_rope(x, cos, signed_sin)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0],
                               torch.autograd.grad(want, x, dy)[0], rtol=0, atol=1e-12)


def test_rms_norm_gradient_written_out(monkeypatch):
    """The CPU training norm's hand-written backward, where the fused kernels are not built
    (`minirm.fused`, tested in test_fused.py): against finite differences in float64, and in
    float32 against autograd through F.rms_norm (the norm outside training)."""
    monkeypatch.setattr(fused, "applies", lambda x: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormCPU.apply(x, w, 1e-5), (x, w))
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(4, 7, 64, generator=g, requires_grad=True)
    dy = torch.randn(4, 7, 64, generator=g)
    got = norm(x)
    assert got.grad_fn.name() == "_RMSNormCPUBackward"
    want = F.rms_norm(x, (64,), norm.weight, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    expected = torch.autograd.grad(want, (x, norm.weight), dy)
    for a, b in zip(torch.autograd.grad(got, (x, norm.weight), dy, retain_graph=True), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward run inside autocast
        for a, b in zip(torch.autograd.grad(got, (x, norm.weight), dy), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), want, rtol=0, atol=0)  # F.rms_norm itself


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(hf_llama, variant):
    hf, folder = hf_llama(**VARIANTS[variant])
    model, cfg = load_model(folder)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        ours = model(x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_saved_checkpoint_loads_in_transformers(hf_llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, folder = hf_llama(**VARIANTS["gqa-untied-llama3-rope"])
    model, _ = load_model(folder)
    with torch.no_grad():  # make sure we export our weights, not a copy of theirs
        model.layers[0].attention.wq.weight.mul_(1.5)
    save_model(model, tmp_path / "out")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_sharded_save_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, cfg = load_model("debug", n_outputs=2, seed=3)
    save_model(model, tmp_path / "m", max_shard_bytes=50_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    again, cfg2 = load_model(tmp_path / "m")
    assert cfg2.n_outputs == 2
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")  # the index reads too
    assert hf.config.num_hidden_layers == cfg.n_layers


def test_reward_model_matches_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, cfg = load_model("debug", n_outputs=1, seed=5)
    with torch.no_grad():
        model.score.bias.fill_(0.25)
    save_model(model, tmp_path / "rm")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    # Rows without padding: transformers finds the last token by searching for the pad id,
    # which is exactly what minirm avoids; here there is no pad to find.
    x = tokens(B=3, T=17, vocab=256)
    with torch.no_grad():
        ours = model.reward(x)
        theirs = hf(x).logits
    # LlamaForSequenceClassification has no bias: it drops score.bias on load.
    torch.testing.assert_close(ours, theirs + 0.25, atol=1e-4, rtol=1e-4)
    again, _ = load_model(tmp_path / "rm")
    torch.testing.assert_close(again.reward(x), ours, atol=1e-6, rtol=1e-6)
    assert again.score.weight.dtype == torch.float32


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_batch_do_not_change_outputs(side):
    cfg = preset("debug", n_outputs=3, pad_id=257)  # pad == eos
    model = Transformer(cfg).init_weights(seed=0).eval()
    lm = Transformer(preset("debug", pad_id=257)).init_weights(seed=0).eval()
    lengths = [9, 23, 15]
    rows = [tokens(1, n, 256, seed=n)[0].tolist() for n in lengths]
    rows[0][-1] = cfg.eos_ids[0]  # a real eos inside the sequence, same id as the padding
    T = max(lengths)
    x = torch.full((3, T), cfg.pad_id)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        x[i, sl], mask[i, sl] = torch.tensor(r), True
    with torch.no_grad():
        batch_reward = model.reward(x, mask)
        batch_logits = lm(x, mask)
        for i, r in enumerate(rows):
            alone = torch.tensor([r])
            torch.testing.assert_close(batch_reward[i], model.reward(alone)[0],
                                       atol=1e-5, rtol=1e-5)
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(batch_logits[i, sl], lm(alone)[0],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("backend", ["reference", "flash", "sdpa"])
def test_reading_one_position_equals_the_full_last_block(backend, checkpointing):
    """body(read=last) skips the last block's work at unread positions; the reward and every
    gradient equal those of the full computation indexed afterwards (float64, so exactly)."""
    cfg = preset("debug", n_outputs=2, attention=backend, flash_block=4)
    model = Transformer(cfg).init_weights(seed=3).double().train()
    model.activation_checkpointing = checkpointing
    x = tokens(4, 11, 256, seed=7)
    masks = {"none": None}
    for kind, cuts in {"left": [(1, 0, 4), (2, 0, 1)], "right": [(1, 7, 11), (3, 10, 11)],
                       "mixed": [(1, 7, 11), (2, 0, 3)]}.items():
        masks[kind] = torch.ones(4, 11, dtype=torch.bool)
        for row, a, b in cuts:
            masks[kind][row, a:b] = False
    for kind, mask in masks.items():
        last = last_token_index(mask, 11)
        full = model.body(x, mask)[torch.arange(4), last]
        read = model.body(x, mask, read=last)
        want = torch.autograd.grad(model.score(model.norm(full)).sum(), model.parameters())
        got = torch.autograd.grad(model.score(model.norm(read)).sum(), model.parameters())
        torch.testing.assert_close(read, full, rtol=0, atol=1e-12, msg=kind)
        for g_got, g_want in zip(got, want):
            torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12, msg=kind)
    # -1 reads the last position, as indexing does.
    torch.testing.assert_close(model.body(x, read=torch.tensor([-1])), model.body(x)[:, -1],
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="KV cache"):  # decoding needs every position
        model.body(x, cache=KVCache(cfg.n_layers, 4, 11), read=torch.tensor([-1]))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("backend", ["reference", "flash", "sdpa"])
def test_shared_prompts_equal_whole_sequences(backend, checkpointing):
    """Pairs whose prompt is computed once (`collate_pairs`, `reward(prompts=...)`) get the
    rewards and gradients of the whole sequences in one right-padded batch (float64, so
    exactly): prompts of several lengths (left-padded), a pair sharing nothing, a pair whose
    chosen sequence is a prefix of the rejected one, and continuations of 1 token."""
    cfg = preset("debug", n_outputs=2, attention=backend, flash_block=4)
    model = Transformer(cfg).init_weights(seed=3).double().train()
    model.activation_checkpointing = checkpointing
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 256, (n,), generator=g).tolist()

    pairs = []
    for prompt, chosen, rejected in [(5, 3, 7), (9, 1, 2), (2, 6, 6), (1, 4, 1)]:
        p = ids(prompt)
        pairs.append((p + ids(chosen), p + ids(rejected)))
    pairs.append(([7] + ids(5), [8] + ids(3)))                     # nothing shared
    pairs.append((pairs[0][0][:6], pairs[0][0]))                  # chosen inside rejected
    tokens, mask, prompts = collate_pairs(pairs, cfg.pad_id)
    assert prompts[0].shape == (6, 9) and tokens.shape == (12, 7)
    assert prompts[1].sum(-1).tolist() == [5, 9, 2, 1, 0, 5]
    whole, whole_mask = collate([c for c, _ in pairs] + [r for _, r in pairs], cfg.pad_id)
    got, want = model.reward(tokens, mask, prompts), model.reward(whole, whole_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), model.parameters())
    g_want = torch.autograd.grad((want * w).sum(), model.parameters())
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="not both"):
        model.reward(tokens, mask, prompts, embedded=model.tok_embeddings(tokens))


def test_compiled_blocks_compute_what_eager_blocks_do():
    """compile_blocks() (train.py --compile): the same rewards and gradients as the eager model,
    with activation checkpointing and padding, through compiled graphs, and the same weight
    names (checkpoints load). A pass with a cache (shared prompts) takes the plain blocks."""
    import copy

    from torch._dynamo.utils import counters

    cfg = preset("debug", n_outputs=1)
    eager = Transformer(cfg).init_weights(seed=0).train()
    compiled = copy.deepcopy(eager).compile_blocks()
    x = tokens(4, 24, 256, seed=5)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    graphs = counters["stats"]["unique_graphs"]
    results = []
    for model in (eager, compiled):
        model.activation_checkpointing = True
        rewards = model.reward(x, mask)
        (rewards * torch.tensor([[1.0], [-2.0], [0.5], [3.0]])).sum().backward()
        results.append((rewards.detach(), [p.grad for p in model.parameters()]))
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled model did compile
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    prompts = (tokens(2, 6, 256, seed=6), torch.ones(2, 6, dtype=torch.bool),
               torch.tensor([0, 1, 0, 1]))
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.reward(x, mask, prompts),
                                   eager.reward(x, mask, prompts), atol=1e-5, rtol=1e-5)
    # The prompts' pass and the continuations' (with the prompts' keys) compiled nothing.
    assert counters["stats"]["unique_graphs"] == graphs


def test_reading_one_position_in_bfloat16():
    """A bf16 model's read path (its one attention row in float32) agrees with the float64
    rewards to bf16 rounding, as the full computation does (errors ~1e-3 on rewards ~0.3)."""
    cfg = preset("debug", n_outputs=1, attention="sdpa")
    exact = Transformer(cfg).init_weights(seed=4).double().eval()
    bf16 = Transformer(cfg).init_weights(seed=4).cast(torch.bfloat16).eval()
    x = tokens(4, 30, 256, seed=2)
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[1, 20:] = False
    mask[2, :7] = False
    last = last_token_index(mask, 30)
    with torch.no_grad():
        want = exact.score(exact.norm(exact.body(x, mask, read=last)))
        full = bf16.score(bf16.norm(bf16.body(x, mask)[torch.arange(4), last]).float())
        read = bf16.reward(x, mask)
    torch.testing.assert_close(full.double(), want, atol=5e-3, rtol=0)
    torch.testing.assert_close(read.double(), want, atol=5e-3, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "flash", "sdpa"])
def test_cache_decode_equals_recompute(backend):
    cfg = preset("debug", attention=backend, flash_block=8)
    model = Transformer(cfg).init_weights(seed=1).eval()
    prompts = [tokens(1, n, 256, seed=n)[0].tolist() for n in (5, 12)]
    x, mask = left_pad(prompts, cfg.pad_id)
    new = tokens(2, 6, 256, seed=99)
    with torch.no_grad():
        cache = KVCache(cfg.n_layers, 2, x.shape[1] + new.shape[1])
        step_logits = [model(x, mask, cache)]
        for t in range(new.shape[1]):
            step_logits.append(model(new[:, t:t + 1], None, cache))
        full = model(torch.cat([x, new], 1),
                     torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1))
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_matches_argmax_and_seeded_sampling_repeats():
    cfg = preset("debug")
    model = Transformer(cfg).init_weights(seed=2).eval()
    prompts = [[256, 5, 6, 7], [256, 9]]
    out = generate(model, prompts, max_new_tokens=5, pad_id=cfg.pad_id)
    # Greedy continuation recomputed without a cache, one row at a time.
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(5):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out.tokens[i].tolist() == seq[len(p):]
    a = generate(model, prompts, 8, temperature=1.0, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(7), pad_id=cfg.pad_id)
    b = generate(model, prompts, 8, temperature=1.0, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(7), pad_id=cfg.pad_id)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


def test_generate_prefills_a_repeated_prompt_once():
    """REINFORCE samples each prompt k times: generate prefills each distinct prompt once and
    copies its cache rows (KVCache.rows). In float64, every row's greedy tokens and
    log-probabilities are those of the distinct prompts generated alone, and the prefill ran
    on the distinct prompts only."""
    cfg = preset("debug")
    model = Transformer(cfg).init_weights(seed=2).double().eval()
    a, b = [256, 5, 6, 7], [256, 9]
    alone = generate(model, [a, b], max_new_tokens=6, pad_id=cfg.pad_id)
    prefilled, body = [], model.body

    def spy(tokens, *args, **kwargs):
        prefilled.append(tokens.shape)
        return body(tokens, *args, **kwargs)

    model.body = spy
    shared = generate(model, [a, b, a, a], max_new_tokens=6, pad_id=cfg.pad_id)
    assert prefilled[0] == (2, 4) and all(shape[0] == 4 for shape in prefilled[1:])
    for row, source in zip(range(4), (0, 1, 0, 0)):
        assert shared.tokens[row].tolist() == alone.tokens[source].tolist()
        torch.testing.assert_close(shared.logprobs[row], alone.logprobs[source],
                                   atol=1e-12, rtol=0)


def test_generate_stops_per_sequence():
    cfg = preset("debug")
    model = Transformer(cfg).init_weights(seed=2).eval()
    prompts = [[256, 5, 6, 7], [256, 9]]
    free = generate(model, prompts, max_new_tokens=6, pad_id=cfg.pad_id)
    stop = free.tokens[0, 2].item()  # make row 0 stop at its third token
    out = generate(model, prompts, max_new_tokens=6, stop_ids={stop}, pad_id=cfg.pad_id)
    assert out.ended[0] and out.mask[0].tolist()[:3] == [True] * 3
    assert not out.mask[0, 3:].any()
    assert out.token_lists(stop_ids={stop})[0] == free.tokens[0, :2].tolist()
    row1_stops = stop in free.tokens[1].tolist()
    assert bool(out.ended[1]) == row1_stops


def test_ended_rows_leave_the_batch_and_the_samples_stay(monkeypatch):
    """Rows that ended leave the decoding batch (`generate.DROP_ENDED`). Sampling draws one
    number per output row every step, so in float64 every row's tokens and log-probs are those
    of a run in which no row leaves; the batch did shrink."""
    import minirm.generate as G

    cfg = preset("debug")
    model = Transformer(cfg).init_weights(seed=2).double().eval()
    prompts = [[256, 5, 6, 7], [256, 9], [256, 1, 2], [256, 40, 41, 42, 43], [256, 7]]
    stop = set(range(0, 259, 6))  # a sixth of the ids end a row: rows end at unlike steps
    rows, body = [], model.body

    def spy(tokens, *args, **kwargs):
        rows.append(tokens.shape[0])
        return body(tokens, *args, **kwargs)

    def run():
        rows.clear()
        return generate(model, prompts, 16, temperature=1.0, stop_ids=stop, pad_id=cfg.pad_id,
                        generator=torch.Generator().manual_seed(3))

    model.body = spy
    shrunk, shrunk_rows = run(), list(rows)
    monkeypatch.setattr(G, "DROP_ENDED", 2.0)  # never
    whole = run()
    assert rows[1:] == [5] * (len(rows) - 1) and shrunk_rows[-1] < 5
    assert torch.equal(shrunk.tokens, whole.tokens) and torch.equal(shrunk.mask, whole.mask)
    assert torch.equal(shrunk.ended, whole.ended)
    torch.testing.assert_close(shrunk.logprobs, whole.logprobs, atol=1e-12, rtol=0)
    lengths = shrunk.mask.sum(-1).tolist()
    assert len(set(lengths)) > 2 and max(lengths) > min(lengths) + 3, lengths


def test_sampling_logprobs_are_those_of_the_filtered_distribution():
    from minirm.generate import sample_next
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    tok, lp = sample_next(logits, temperature=1.0, top_k=2,
                          generator=torch.Generator().manual_seed(0))
    # top-2 keeps logits 2.0 and 1.0: p = softmax([2, 1]).
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    assert tok.item() in (0, 1)
    assert lp.item() == pytest.approx(torch.log(p[tok.item()]).item(), abs=1e-6)
    # top-p 0.5: token 0 alone holds p=0.57 of the full softmax, so it is always chosen.
    for seed in range(5):
        tok, lp = sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(seed))
        assert tok.item() == 0 and lp.item() == pytest.approx(0.0, abs=1e-6)


def test_packed_decoding_matches_the_plain_model(monkeypatch):
    """minirm.packed: every decoding layout (fused projections, oneDNN-packed, for 2 rows in
    MKL's packed form for torch's BLAS, or for the streamed kernel) gives the plain model's
    logits, in prefill and cached decode, tied and untied heads; a weight update is seen at the
    next call (the packed copy is rebuilt), and toy-sized models are left unpacked. Unforced, the layout is timed once and
    remembered, with never two copies of the weights alive while choosing."""
    from minirm import packed

    assert not packed.can_pack(Transformer(preset("toy")))
    for tied, layout in [(tied, layout) for layout in packed.layouts() for tied in (True, False)]:
        monkeypatch.setenv("MINIRM_CPU_MATMUL", layout)
        cfg = preset("debug", dim=384, ffn_dim=512, n_heads=6, n_kv_heads=2,
                     tie_embeddings=tied)
        model = Transformer(cfg).init_weights(seed=0).eval()
        assert packed.can_pack(model)
        tokens, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], cfg.pad_id)
        step = torch.tensor([[12], [13]])

        @torch.inference_mode()
        def run():
            cache = KVCache(cfg.n_layers, 2, 8)
            return torch.cat([model(tokens, mask, cache), model(step, None, cache)], 1)

        plain = run()
        with packed.packed_for_decoding(model, rows=2):
            assert model.layers[0].attention.packed is not None
            assert packed.layout_in_use(model) == layout
            torch.testing.assert_close(run(), plain, atol=1e-4, rtol=1e-4)
        assert model.layers[0].attention.packed is None  # plain again outside the block
        with torch.no_grad():
            model.layers[1].feed_forward.w2.weight.mul_(2)  # as an optimizer step would
        changed = run()
        assert not torch.allclose(changed, plain, atol=1e-3)
        with packed.packed_for_decoding(model, rows=2):
            torch.testing.assert_close(run(), changed, atol=1e-4, rtol=1e-4)
        packed.release(model)
        assert model._packed_cache is None

    monkeypatch.delenv("MINIRM_CPU_MATMUL")
    monkeypatch.setattr(packed, "_CHOSEN", {})
    copies, pack = [], packed._pack

    def one_copy_at_a_time(model, layout, rows):  # choosing times each layout alone
        assert all(c() is None for c in copies), f"{layout} packed beside another copy"
        packs, head = pack(model, layout, rows)
        copies.append(weakref.ref(packs[0][0][1]))
        return packs, head

    monkeypatch.setattr(packed, "_pack", one_copy_at_a_time)
    with packed.packed_for_decoding(model, rows=3):
        chosen = packed.layout_in_use(model)
    assert len(copies) >= len(packed.layouts()) and model.layers[0].attention.packed is None
    assert chosen in packed.layouts() and list(packed._CHOSEN.values()) == [chosen]
    monkeypatch.setattr(packed, "_pack", lambda *a: pytest.fail("packed again"))
    with packed.packed_for_decoding(model, rows=3):  # same weights, same rows: kept as it was
        assert packed.layout_in_use(model) == chosen


def test_packed_choice_times_a_close_call_twice(monkeypatch):
    """packed.choose: one round of timings when a layout leads the next fastest by CLEAR_LEAD,
    a second when the two fastest are close, keeping each layout's fastest; the fastest layout
    is chosen."""
    from minirm import packed

    cfg = preset("debug", dim=384, ffn_dim=512, n_heads=6, n_kv_heads=2)
    model = Transformer(cfg).init_weights(seed=0).eval()
    monkeypatch.delenv("MINIRM_CPU_MATMUL", raising=False)
    monkeypatch.setattr(packed, "layouts", lambda: list(packed.LAYOUTS))
    kinds = {packed.PackedLinear: "onednn", packed.RowsPackedLinear: "blas",
             packed.StreamedLinear: "streamed"}
    for timings, rounds, chosen in (
            ({"onednn": [2.0], "blas": [1.0], "streamed": [1.5]}, 1, "blas"),
            ({"onednn": [1.0, 0.7], "blas": [1.05, 0.9], "streamed": [3.0, 3.0]}, 2, "onednn"),
            ({"onednn": [1.0, 1.0], "blas": [1.2, 1.1], "streamed": [1.05, 0.8]}, 2, "streamed")):
        calls = []

        def timed(model, weights, rows, steps=5):
            name = kinds[type(weights[1])]
            calls.append(name)
            return timings[name][sum(c == name for c in calls) - 1]

        monkeypatch.setattr(packed, "_CHOSEN", {})
        monkeypatch.setattr(packed, "_fastest_step", timed)
        assert packed.choose(model, 2, {}) == chosen
        assert len(calls) == rounds * len(packed.LAYOUTS)


def test_blas_layout_packs_products_for_the_rows_of_a_step(monkeypatch):
    """The BLAS decoding layout: for one row, and for more than PAD_ROWS, the weights stored
    transposed; for 2 to PAD_ROWS rows MKL's packed product for that many rows, which serves
    fewer rows padded and more (a prefill) unpacked, and is packed again for another batch
    size. Sampling while rows end gives the unpacked model's tokens."""
    from minirm import packed

    if not packed.mkl_packing():
        pytest.skip("this torch has no MKL packed product")
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(96, 384, generator=g), torch.randn(32, 384, generator=g)
    pads, pad = [], F.pad
    monkeypatch.setattr(F, "pad", lambda x, *a: pads.append(len(x)) or pad(x, *a))
    product = packed.RowsPackedLinear(4, w1, w2)
    for n in (4, 3, 1, 9):  # packed, padded twice, unpacked
        x = torch.randn(n, 1, 384, generator=g)
        y1, y2 = product(x)
        assert y1.shape == (n, 1, 96) and y2.shape == (n, 1, 32)
        torch.testing.assert_close(y1, F.linear(x, w1), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(y2, F.linear(x, w2), atol=1e-4, rtol=1e-5)
    assert product.rows == 4 and pads == [3, 1]
    monkeypatch.undo()

    monkeypatch.setenv("MINIRM_CPU_MATMUL", "blas")
    cfg = preset("debug", dim=384, ffn_dim=512, n_heads=6, n_kv_heads=2)
    model = Transformer(cfg).init_weights(seed=0).eval()

    def first():
        return model.layers[0].attention.packed[0]

    for rows in (1, packed.PAD_ROWS + 1):
        with packed.packed_for_decoding(model, rows=rows):
            assert isinstance(first(), packed.TransposedLinear)
    with packed.packed_for_decoding(model, rows=4):
        assert isinstance(first(), packed.RowsPackedLinear) and first().rows == 4
        four = first()
    monkeypatch.setattr(packed, "_pack", lambda *a: pytest.fail("packed again"))
    with packed.packed_for_decoding(model, rows=5):  # the same products, packed for 5 rows
        assert first() is four and four.rows == 5 and model.packed_head.rows == 5

    prompts = [[256, 5, 6, 7], [256, 9], [256, 1, 2], [256, 40, 41, 42, 43], [256, 7]]
    stop = set(range(0, 259, 6))  # rows end at unlike steps and leave the batch

    def run():
        return generate(model, prompts, 16, temperature=1.0, stop_ids=stop, pad_id=cfg.pad_id,
                        generator=torch.Generator().manual_seed(3))

    pads.clear()
    monkeypatch.setattr(F, "pad", lambda x, *a: pads.append(len(x)) or pad(x, *a))
    fast = run()
    assert packed.layout_in_use(model) == "blas" and min(pads) < 5  # rows left, padded
    monkeypatch.setattr(packed, "can_pack", lambda model: False)
    plain = run()
    assert torch.equal(fast.tokens, plain.tokens) and torch.equal(fast.ended, plain.ended)
    assert len(set(plain.mask.sum(-1).tolist())) > 2
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)


def test_sample_categorical_follows_the_distribution():
    """Inverse-CDF sampling: frequencies match the probabilities (8,000 draws, 4 sigma), and
    entries of probability zero are never drawn."""
    from minirm.generate import sample_categorical

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, g) for _ in range(8000)])
    freq = torch.bincount(draws[:, 0], minlength=5).double() / 8000
    sigma = (probs[0].double() * (1 - probs[0].double()) / 8000).sqrt()
    assert ((freq - probs[0].double()).abs() <= 4 * sigma + 1e-12).all(), freq
    assert freq[1] == freq[4] == 0
    assert (draws[:, 1] == 4).all()


def test_sample_categorical_two_level_sum_is_the_whole_running_sum():
    """The block sums and one block's running sum pick the index that the whole row's running
    sum in float64 picks, unless the target lies within rounding (1e-6 of the total) of the
    picked entry's edge (the block sums are float32): vocabularies that are and are not
    multiples of the block, a fraction of the entries at zero probability (never picked),
    unnormalised weights, and u at 0 and next to 1."""
    from minirm.generate import CDF_BLOCK, sample_categorical

    g = torch.Generator().manual_seed(0)
    near = 0
    for V in (5, CDF_BLOCK - 1, CDF_BLOCK, CDF_BLOCK + 1, 1000, 49152):
        for spread in (1.0, 4.0, 12.0):
            logits = torch.randn(16, V, generator=g) * spread
            logits[:, torch.rand(V, generator=g) < 0.3] = float("-inf")
            logits[:, V // 2] = 0.0  # every row keeps some mass
            weights = (logits - logits.amax(-1, keepdim=True)).exp()
            u = torch.rand(16, 1, generator=g, dtype=torch.float64)
            u[0], u[1] = 0.0, 1 - 2**-53
            got = sample_categorical(weights, u=u)
            assert (weights.gather(1, got[:, None]) > 0).all()
            cdf = weights.double().cumsum(-1)
            target = u * cdf[:, -1:]
            want = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=V - 1)
            # The picked entry's span of the running sum, [lo, hi), holds the target, to within
            # rounding; and where the target is clear of every edge, the pick is the same.
            hi = cdf.gather(1, got[:, None])
            lo = hi - weights.double().gather(1, got[:, None])
            slack = 1e-6 * cdf[:, -1:]
            assert ((lo - slack <= target) & (target < hi + slack)).all(), (V, spread)
            w_hi = cdf.gather(1, want[:, None])
            w_lo = w_hi - weights.double().gather(1, want[:, None])
            clear = ((target - w_lo > slack) & (w_hi - target > slack))[:, 0]
            assert torch.equal(got[clear], want[clear]), (V, spread)
            near += int((~clear).sum())
    assert near < 40  # the rows at u = 0 and next to 1 (2 x 18 = 36 of them), and few others


def test_sampled_logprobs_are_log_softmax():
    from minirm.generate import sample_next

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 3000, generator=g) * 5
    for temperature in (1.0, 0.7):
        tok, lp = sample_next(logits, temperature, generator=torch.Generator().manual_seed(2))
        want = torch.log_softmax(logits / temperature, -1).gather(1, tok[:, None])[:, 0]
        torch.testing.assert_close(lp, want, atol=2e-6, rtol=0)


def test_onednn_linear_is_f_linear_forward_and_backward(monkeypatch):
    """minirm.onednn: the oneDNN products (forward, input and weight gradients, strided views
    included) give F.linear's numbers; a model step through them gives the same loss and
    gradients as through F.linear; small matrices keep F.linear, and so does a machine where
    BLAS is the faster (measured once, or set by MINIRM_CPU_MATMUL)."""
    from minirm import onednn
    from minirm.errors import UserError

    monkeypatch.setenv("MINIRM_CPU_MATMUL", "onednn")  # whichever is faster on this machine
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(320, 256, generator=g, requires_grad=True)
    assert onednn.applies(torch.zeros(1, 256), weight)
    assert not onednn.applies(torch.zeros(1, 64), torch.zeros(32, 64))  # toy-sized
    assert not onednn.applies(torch.zeros(1, 256, dtype=torch.float64), weight.double())
    x = torch.randn(3, 256, 7, generator=g).transpose(1, 2).requires_grad_()  # not contiguous
    dy = torch.randn(3, 7, 320, generator=g)
    got = onednn.linear(x, weight)
    want = torch.nn.functional.linear(x, weight)
    # Entries are sums of 256 products of N(0, 1) numbers (size ~16): float32 rounding ~1e-5.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, (x, weight), dy),
                    torch.autograd.grad(want, (x, weight), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, weight), want.detach(), rtol=1e-5, atol=1e-4)

    cfg = preset("debug", dim=384, ffn_dim=512, n_heads=6, n_kv_heads=2, n_outputs=1)
    tokens, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], cfg.pad_id)

    def step():
        model = Transformer(cfg).init_weights(seed=0)
        loss = model.reward(tokens, mask).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = step()
    monkeypatch.setattr(onednn, "applies", lambda x, w: False)
    plain_loss, plain_grads = step()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name in grads:  # float32 rounding, relative to each gradient's size
        diff = (grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
        assert diff < 1e-5, (name, diff.item())

    monkeypatch.undo()
    monkeypatch.setattr(onednn, "product", lambda a, b: pytest.fail("oneDNN called"))
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "blas")
    torch.testing.assert_close(onednn.linear(x, weight), want, rtol=0, atol=0)
    monkeypatch.delenv("MINIRM_CPU_MATMUL")
    monkeypatch.setattr(onednn, "_FASTER", {})
    monkeypatch.setattr(onednn, "fastest_of", lambda calls: [2.0, 2.0, 1.0, 1.0])
    assert onednn.faster_here() and onednn._FASTER == {torch.get_num_threads(): True}
    monkeypatch.setattr(onednn, "fastest_of", lambda calls: [1.0, 1.0, 0.99, 0.99])
    assert onednn.faster_here()  # measured once per thread count, then remembered
    monkeypatch.setattr(onednn, "_FASTER", {})
    assert not onednn.faster_here()  # under 5% faster: BLAS stays
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "mkl")
    with pytest.raises(UserError, match="MINIRM_CPU_MATMUL='mkl' is not a choice"):
        onednn.linear(x, weight)


def test_generate_command_prints_the_greedy_continuation(tmp_path, capsys):
    """python -m minirm.generate on a saved model: the greedy continuation generate() gives,
    the same with --no-cuda-graphs (on a GPU the other way of running the steps) and with
    --compile (the steps compiled: it compiles)."""
    from torch._dynamo.utils import counters

    from minirm import generate as G
    from minirm.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    model = Transformer(preset("debug")).init_weights(seed=4).eval()
    folder = save_model(model, tmp_path / "lm", tok)
    ids = tok.encode("ab")
    n = G.GRAPH_MIN_TOKENS  # enough tokens for static steps
    want = generate(model, [ids], n, pad_id=tok.pad_id).tokens[0].tolist()
    printed = []
    graphs = counters["stats"]["unique_graphs"]
    for extra in ([], ["--no-cuda-graphs"], ["--compile"]):
        G.main(["--model", str(folder), "--prompt", "ab", "--raw", "--max-new-tokens", str(n),
                "--device", "cpu", *extra])
        printed.append(capsys.readouterr().out.strip("\n"))
    assert counters["stats"]["unique_graphs"] > graphs
    assert printed[0] and printed[0] == printed[1] == printed[2] == tok.decode(want).strip("\n")
