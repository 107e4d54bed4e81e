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
            assert not decode.applies(model, StaticKVCache.of(prefilled(model, prompts, 4)), 3)
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
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8),
                                      dict(temperature=1.0, top_k=40)])
def test_generate_with_the_step_samples_what_the_model_samples(monkeypatch, sampling):
    """generate takes the step (with compile or not; its loop in C++ without top-k) and gives
    the tokens, masks and ends of the model's own steps, log-probs to float32 rounding: with
    stop ids that end rows (C++'s loop returns once a quarter of them have ended, and the
    Python loop drops them from the batch) and a prompt given twice (its prefill copied). The
    generator is left as the model's steps leave it."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3", seed=3)
    prompts = prompts_for(6, model.cfg.vocab_size, seed=4)
    prompts.append(prompts[0])
    shrunk = []
    rows = KVCache.rows
    monkeypatch.setattr(KVCache, "rows", lambda self, keep: shrunk.append(
        (len(self.lengths), len(keep))) or rows(self, keep))

    def run(**kwargs):
        generator = torch.Generator().manual_seed(5)
        out = generate(model, prompts, 12, pad_id=0, generator=generator, **sampling, **kwargs)
        return out, torch.rand(3, generator=generator)

    free, _ = run()
    stop = {int(free.tokens[0, 2]), int(free.tokens[3, 5]), int(free.tokens[5, 8])}
    counted = decode.steps_run
    shrunk.clear()
    ours, after = run(stop_ids=stop)
    assert decode.steps_run == counted + 11
    assert ours.ended.sum() >= 2 and not ours.ended.all()
    assert any(before > kept for before, kept in shrunk)  # ended rows left the batch
    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    theirs, their_after = run(stop_ids=stop)
    assert decode.steps_run == counted + 11  # the model's own steps
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(after, their_after)
    assert torch.equal(ours.mask, theirs.mask) and torch.equal(ours.ended, theirs.ended)
    torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-4, rtol=0)
    monkeypatch.delenv("MINIRM_CPU_STEP")
    assert torch.equal(run(stop_ids=stop, compile=True)[0].tokens, ours.tokens)
    assert decode.steps_run == counted + 22  # compile=True takes the step too, compiling nothing


@needs_step
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_in_cpp_ends_early_and_shows_progress(monkeypatch, temperature, rows):
    """Rows ending before max_new_tokens: one row's end stops C++'s loop there; of two, the
    first hands the rest to the Python loop (DROP_ENDED). Either way the tokens are the
    model's steps', and the generator is left where those leave it; with a progress bar the
    loop runs in chunks, to the same tokens."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3", seed=3)
    prompts = prompts_for(rows, model.cfg.vocab_size, seed=8)

    def run(**kwargs):
        generator = torch.Generator().manual_seed(11)
        out = generate(model, prompts, 20, pad_id=0, temperature=temperature,
                       generator=generator, **kwargs)
        return out, torch.rand(3, generator=generator)

    free, _ = run()
    stop = {int(free.tokens[0, 3]), int(free.tokens[-1, 9])}
    counted = decode.steps_run
    ours, after = run(stop_ids=stop)
    assert ours.ended.all() and ours.tokens.shape[1] < 20
    assert decode.steps_run - counted == ours.tokens.shape[1] - 1
    shown, _ = run(stop_ids=stop, progress=True)
    assert torch.equal(shown.tokens, ours.tokens)
    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    theirs, their_after = run(stop_ids=stop)
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(after, their_after)
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-4, rtol=0)
    assert torch.equal(run(progress=True)[0].tokens, free.tokens)  # chunks of 8 steps, and 4


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


@needs_step
def test_sampling_in_cpp_picks_what_the_whole_running_sum_picks(monkeypatch):
    """decode.sample (sample_next's path on the CPU without top-k or top-p): the pick holds the
    target u * total in its span of the float64 running sum of weights, to rounding, and where
    the target is clear of every edge it is the running sum's pick; zero-weight entries are
    never picked; log p is log-softmax's; temperature 0 takes the first largest logit; rows
    not all finite are left to sample_categorical, which sample_next then runs."""
    from minirm.generate import sample_next

    g = torch.Generator().manual_seed(0)
    near = 0
    for V in (5, 15, 16, 17, 1000, 49152):
        for spread, temperature in ((1.0, 1.0), (4.0, 0.7), (12.0, 1.3)):
            logits = torch.randn(16, V, generator=g) * spread
            logits[:, torch.rand(V, generator=g) < 0.3] = float("-inf")
            logits[:, V // 2] = 0.0  # every row keeps some mass
            u = torch.rand(16, 1, generator=g, dtype=torch.float64)
            u[0], u[1] = 0.0, 1 - 2**-53
            got, lp = decode.sample(logits, temperature, u)
            x = logits / temperature
            weights = (x - x.amax(-1, keepdim=True)).exp().double()
            assert (weights.gather(1, got[:, None]) > 0).all()
            want_lp = torch.log_softmax(x, -1).gather(1, got[:, None])[:, 0]
            torch.testing.assert_close(lp, want_lp, atol=2e-6, rtol=2e-6)
            cdf = weights.cumsum(-1)
            target = u * cdf[:, -1:]
            hi = cdf.gather(1, got[:, None])
            lo = hi - weights.gather(1, got[:, None])
            slack = 1e-6 * cdf[:, -1:]
            assert ((lo - slack <= target) & (target < hi + slack)).all(), (V, spread)
            want = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=V - 1)
            w_hi = cdf.gather(1, want[:, None])
            w_lo = w_hi - weights.gather(1, want[:, None])
            clear = ((target - w_lo > slack) & (w_hi - target > slack))[:, 0]
            assert torch.equal(got[clear], want[clear]), (V, spread)
            near += int((~clear).sum())
    assert near < 40  # the rows at u = 0 and next to 1 (2 x 18 = 36 of them), and few others
    tied = torch.tensor([[0.0, 2.0, -1.0, 2.0], [float("-inf"), -3.0, -3.0, -5.0]])
    tok, lp = decode.sample(tied, 0.0, None)
    assert tok.tolist() == [1, 1]
    torch.testing.assert_close(lp, torch.log_softmax(tied, -1)[:, 1])
    # Greedy takes the first largest logit, also where log-softmax rounds a smaller one equal
    # to it; and so does sample_next's torch path.
    close = torch.zeros(1, 1000)
    close[0, :10], close[0, 10] = -5.0, -1e-7
    assert decode.sample(close, 0.0, None)[0].item() == 11
    monkeypatch.setattr(decode, "sample", lambda *a: None)
    assert sample_next(close, 0.0)[0].item() == 11
    monkeypatch.undo()
    for bad in (float("nan"), float("inf")):
        row = tied.clone()
        row[1, 2] = bad
        assert decode.sample(row, 1.0, torch.rand(2, 1, dtype=torch.float64)) is None
        assert decode.sample(row, 0.0, None) is None
    assert decode.sample(torch.full((1, 4), float("-inf")), 1.0, u[:1]) is None
    assert decode.sample(tied.double(), 1.0, u[:2]) is None  # float32 only
    row = tied.clone()
    row[1, 2] = float("inf")
    ours = sample_next(row, 1.0, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(decode, "sample", lambda *a: None)
    theirs = sample_next(row, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours[0], theirs[0])  # the same number drawn, the same way


@needs_step
def test_cpp_loop_leaves_a_step_it_cannot_sample_to_the_python_loop(monkeypatch):
    """A head row of +inf makes every step's logits not all finite: C++'s loop returns at the
    first step, and generate's own loop takes every step (with the C++ step), giving the
    model's own tokens."""
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3", seed=3)
    with torch.no_grad():
        model.output.weight[7] = float("inf")
    prompts = prompts_for(3, model.cfg.vocab_size, seed=2)
    counted = decode.steps_run
    ours = generate(model, prompts, 6, pad_id=0, temperature=1.0,
                    generator=torch.Generator().manual_seed(1))
    assert decode.steps_run == counted + 5
    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    theirs = generate(model, prompts, 6, pad_id=0, temperature=1.0,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.tokens, theirs.tokens)


@needs_step
def test_step_loop_refuses_what_it_cannot_read(monkeypatch):
    monkeypatch.setenv("MINIRM_CPU_MATMUL", "streamed")
    model = model_of("gqa3")
    prompts = prompts_for(2, model.cfg.vocab_size)
    with torch.inference_mode(), packed.packed_for_decoding(model, 2):
        cache = prefilled(model, prompts, 4)
        step = decode.Step(model)
        logits = torch.zeros(2, model.cfg.vocab_size)
        out = torch.zeros(2, 8, dtype=torch.long)
        lp, valid, done = torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bool), torch.zeros(
            2, dtype=torch.bool)
        with pytest.raises(ValueError, match="u must be"):
            step.loop(cache, logits, 0, 8, 1.0, None, (), 0, out, lp, valid, done)
        with pytest.raises(ValueError, match="logprobs must be"):
            step.loop(cache, logits, 0, 8, 0.0, None, (), 0, out, lp.double(), valid, done)
        with pytest.raises(ValueError, match="logits must be"):
            step.loop(cache, logits[:, :5].contiguous(), 0, 8, 0.0, None, (), 0, out, lp, valid,
                      done)
        for i, wrong in [(1, lp[:, :2].contiguous()), (2, valid[:, :2].contiguous()),
                         (3, done[:1])]:  # shorter than the tokens' (2, 8): refused
            buffers = [out, lp, valid, done]
            buffers[i] = wrong
            with pytest.raises(ValueError, match="must be a contiguous"):
                step.loop(cache, logits, 0, 8, 0.0, None, (), 0, *buffers)
        with pytest.raises(ValueError, match=r"u must be \(2, 1\)"):
            decode.sample(logits, 1.0, torch.rand(3, 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="needs u"):
            decode.sample(logits, 1.0, None)
        # Eight tokens asked for, room for four more steps in the cache: it stops there.
        pos = cache.pos
        assert step.loop(cache, logits, 0, 8, 0.0, None, (), 0, out, lp, valid, done) == 4
        assert cache.pos == pos + 4 == cache.max_len and valid[:, :4].all()
