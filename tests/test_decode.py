"""The decoding step in one call to C++ (minirm.decode) against the model's own forward, and
where generate takes it."""

import pytest
import torch

from minirm import decode, native, packed
from minirm.config import preset
from minirm.generate import generate, left_pad
from minirm.graphs import StaticKVCache
from minirm.model import KVCache, Transformer

CI = __import__("os").environ.get("CI") == "true"


def test_the_step_builds_where_a_compiler_is():
    if not CI:
        pytest.skip("checked on CI, whose machines have a C++ compiler")
    assert decode.available(), decode.LIBRARY.why


needs_step = pytest.mark.skipif(not decode.available(),
                                reason="the decoding step is not built here (no C++ compiler)")

# Shapes for each path of the kernel: head sizes 64, 128 and 40 (not whole vectors), groups of
# 3, 1 and 5 query heads per key/value head, heads * head_dim above and below dim, a
# feed-forward width and a vocabulary that leave scalar tails, tied and untied heads.
SHAPES = {
    "gqa3": dict(dim=384, n_heads=6, n_kv_heads=2, ffn_dim=1024, vocab_size=512),
    "d128": dict(dim=384, n_heads=4, n_kv_heads=4, ffn_dim=1000, vocab_size=517,
                 head_dim=128, tie_embeddings=True),
    "d40": dict(dim=400, n_heads=5, n_kv_heads=1, ffn_dim=1000, vocab_size=301,
                head_dim=40),
}


def model_of(shape, seed=0):
    cfg = preset("debug", n_layers=3, **SHAPES[shape])
    return Transformer(cfg).init_weights(seed=seed).eval()


def prefilled(model, prompts, room):
    tokens, mask = left_pad(prompts, model.cfg.pad_id)
    cache = KVCache(len(model.layers), len(prompts), tokens.shape[1] + room)
    model(tokens, mask, cache)
    return cache


def prompts_for(rows, vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (rows,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def check_steps(model, rows, steps=4):
    """`steps` decoding steps of `rows` left-padded rows: the C++ step's logits, cache, mask
    and lengths against the model's forward over a twin cache."""
    prompts = prompts_for(rows, model.cfg.vocab_size)
    with torch.inference_mode(), packed.packed_for_decoding(model, rows):
        assert packed.layout_in_use(model) == "streamed"
        plain, ours = prefilled(model, prompts, steps), prefilled(model, prompts, steps)
        assert decode.applies(model, ours, rows)
        step = decode.Step(model)
        gen = torch.Generator().manual_seed(2)
        for _ in range(steps):
            tok = torch.randint(3, model.cfg.vocab_size, (rows,), generator=gen)
            want = model(tok[:, None], None, plain)[:, -1]
            torch.testing.assert_close(step(tok, ours), want, atol=2e-5, rtol=1e-5)
        assert ours.pos == plain.pos and not decode.applies(model, ours, rows)  # cache full
        with pytest.raises(ValueError, match="all are filled"):
            step(tok, ours)
        torch.testing.assert_close(ours.k, plain.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.v, plain.v, atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.mask, plain.mask) and torch.equal(ours.lengths, plain.lengths)


@needs_step
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_steps_equal_the_models_forward(monkeypatch, shape, rows):
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    check_steps(model_of(shape), rows)


@needs_step
def test_the_8_lane_build_steps_as_the_model(monkeypatch, tmp_path):
    """Without AVX-512 the kernel takes 8 floats a vector: its tails and sums differ."""
    if "avx512f" not in native.machine():
        pytest.skip("the default build here is already the 8-lane one")
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    monkeypatch.setenv("MINIRM_CACHE", str(tmp_path))
    monkeypatch.setattr(decode.LIBRARY, "flags", native.FLAGS + ["-mno-avx512f"])
    monkeypatch.setattr(decode.LIBRARY, "lib", decode.LIBRARY.load())
    for shape in SHAPES:
        check_steps(model_of(shape), 3)


@needs_step
def test_threads_split_the_work_not_the_sums(monkeypatch):
    """Each output is one thread's sum whatever the number of threads: the same bits."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3")
    prompts = prompts_for(5, model.cfg.vocab_size)
    threads = torch.get_num_threads()
    out = []
    with torch.inference_mode(), packed.packed_for_decoding(model, 5):
        cache = prefilled(model, prompts, 2)
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                twin = cache.rows(torch.arange(5))
                out.append(decode.Step(model)(torch.arange(3, 8), twin))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


@needs_step
def test_where_the_step_applies(monkeypatch):
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3")
    prompts = prompts_for(3, model.cfg.vocab_size)
    with torch.inference_mode():
        with packed.packed_for_decoding(model, 3):
            cache = prefilled(model, prompts, 4)
            assert decode.applies(model, cache, 3)
            assert not decode.applies(model, cache, 17)  # past streamed.MAX_ROWS
            assert not decode.applies(model, KVCache(3, 3, 8), 3)  # nothing prefilled
            monkeypatch.setenv("MINIRM_CPU_STEP", "0")
            assert not decode.applies(model, cache, 3)
            monkeypatch.delenv("MINIRM_CPU_STEP")
            assert not decode.applies(model, StaticKVCache(prefilled(model, prompts, 4)), 3)
            odd = prefilled(model, prompts, 4)
            odd.mask = odd.mask.t().contiguous().t()  # the same mask, laid out by columns
            assert not decode.applies(model, odd, 3)
            with pytest.raises(ValueError, match="needs a prefilled KVCache of 3 rows"):
                decode.Step(model)(torch.ones(3, dtype=torch.long), odd)
            with pytest.raises(ValueError, match="of 2 rows"):
                decode.Step(model)(torch.ones(2, dtype=torch.long), cache)
            before = cache.pos, cache.mask.clone(), cache.lengths.clone(), cache.k.clone()
            with pytest.raises(IndexError, match=r"token ids must be in \[0, 512\)"):
                decode.Step(model)(torch.tensor([3, 512, 4]), cache)
            assert cache.pos == before[0] and torch.equal(cache.mask, before[1])
            assert torch.equal(cache.lengths, before[2]) and torch.equal(cache.k, before[3])
            model.norm.weight.data = model.norm.weight.data.bfloat16()
            assert not decode.applies(model, cache, 3)  # a norm in another dtype
            model.norm.weight.data = model.norm.weight.data.float()
        assert not decode.applies(model, cache, 3)  # outside the layout: the model's weights
        monkeypatch.setenv("MINIRM_CPU_MATMUL", "blas")
        with packed.packed_for_decoding(model, 3):
            assert not decode.applies(model, prefilled(model, prompts, 4), 3)
    reward = Transformer(preset("debug", n_outputs=1, **SHAPES["gqa3"])).eval()
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    with torch.inference_mode(), packed.packed_for_decoding(reward, 3):
        cache = KVCache(len(reward.layers), 3, 8)
        reward.body(torch.ones(3, 2, dtype=torch.long), None, cache)
        assert not decode.applies(reward, cache, 3)  # no language-model head


@needs_step
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_k=40)])
def test_generate_with_the_step_samples_what_the_model_samples(monkeypatch, sampling):
    """generate takes the step (with compile or not) and gives the tokens, masks and ends of
    the model's own steps, log-probs to float32 rounding: with stop ids that end rows (which
    then leave the batch) and a prompt given twice (its prefill copied)."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3", seed=3)
    prompts = prompts_for(6, model.cfg.vocab_size, seed=4)
    prompts.append(prompts[0])
    calls = []
    step = decode.Step.__call__
    monkeypatch.setattr(decode.Step, "__call__", lambda *a: calls.append(1) or step(*a))

    def run(**kwargs):
        return generate(model, prompts, 12, pad_id=0, generator=torch.Generator().manual_seed(5),
                        **sampling, **kwargs)

    free = run()
    stop = {int(free.tokens[0, 2]), int(free.tokens[3, 5]), int(free.tokens[5, 8])}
    ours = run(stop_ids=stop)
    assert calls and ours.ended.any() and not ours.ended.all()
    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    n = len(calls)
    theirs = run(stop_ids=stop)
    assert len(calls) == n  # the model's own steps
    assert torch.equal(ours.tokens, theirs.tokens)
    assert torch.equal(ours.mask, theirs.mask) and torch.equal(ours.ended, theirs.ended)
    torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-4, rtol=0)
    monkeypatch.delenv("MINIRM_CPU_STEP")
    assert torch.equal(run(stop_ids=stop, compile=True).tokens, ours.tokens)
    assert len(calls) > n  # compile=True takes the step too, compiling nothing


@needs_step
def test_generate_takes_the_step_once_few_enough_rows_are_left(monkeypatch):
    """A batch over streamed.MAX_ROWS decodes through the model until ended rows leave it, and
    then through the step: the same tokens as the model's steps throughout."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3", seed=3)
    prompts = prompts_for(20, model.cfg.vocab_size, seed=6)
    free = generate(model, prompts, 8, pad_id=0)
    stop = {int(t) for t in free.tokens[:8, 1]}  # at least 8 of the 20 rows end at step 2
    counted = decode.steps_run
    ours = generate(model, prompts, 8, stop_ids=stop, pad_id=0)
    assert decode.steps_run > counted and ours.ended.sum() >= 8
    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    theirs = generate(model, prompts, 8, stop_ids=stop, pad_id=0)
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.ended, theirs.ended)
    torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-4, rtol=0)
