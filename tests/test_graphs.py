"""Static decoding steps (`minirm.graphs`): the static cache's numbers on the CPU, compiled
steps on the CPU, and the captured CUDA graph against the same steps run eagerly on a GPU
(skipped without one)."""

import pytest
import torch

from minirm.config import preset
from minirm.generate import generate, left_pad
from minirm.graphs import KEPT, StaticKVCache, can_graph, decoding_step
from minirm.model import KVCache, Transformer
from minirm.packed import layout_in_use, packed_for_decoding

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[256, 5, 6, 7, 8, 9], [256, 9], [256, 40, 41]]


def prefilled(model, prompts, steps, rows=None):
    """A KV cache after the prompts' prefill (copied to `rows` when given), and the logits at
    each prompt's last position."""
    x, mask = left_pad(prompts, model.cfg.pad_id, model.tok_embeddings.weight.device)
    cache = KVCache(len(model.layers), len(prompts), x.shape[1] + steps)
    logits = model(x, mask, cache)[:, -1]
    if rows is not None:
        cache, logits = cache.rows(torch.tensor(rows, device=x.device)), logits[rows]
    return cache, logits


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("rows", [None, [0, 1, 0, 2]])
def test_static_cache_steps_equal_the_plain_cache(backend, rows):
    """Steps through StaticKVCache (slot in a tensor, attention over every slot with the empty
    ones masked) give the plain cache's logits, also for a cache copied per sample, whose
    empty slots start uninitialised."""
    cfg = preset("debug", attention=backend)
    model = Transformer(cfg).init_weights(seed=3).double().eval()
    new = torch.randint(3, 256, (4 if rows else 3, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        plain, first = prefilled(model, PROMPTS, new.shape[1], rows)
        static, again = prefilled(model, PROMPTS, new.shape[1], rows)
        static.k[:, :, :, static.pos:] = float("nan")  # as uninitialised memory may hold
        static.v[:, :, :, static.pos:] = float("nan")
        step = decoding_step(model, static, graph=False)
        torch.testing.assert_close(first, again, atol=0, rtol=0)
        for t in range(new.shape[1]):
            want = model(new[:, t:t + 1], None, plain)[:, -1]
            torch.testing.assert_close(step(new[:, t]), want, atol=1e-12, rtol=0)
    # The static steps wrote the mask and lengths the plain steps did.
    assert torch.equal(step.cache.mask, plain.mask)
    assert torch.equal(step.cache.lengths, plain.lengths)
    with pytest.raises(ValueError, match="all are filled"):  # never past the cache's end
        step(new[:, 0])


def test_a_static_cache_with_more_slots_steps_the_same():
    """A static cache longer than the prefilled one (a CUDA graph's, rounded up to SLOT_BLOCK
    slots) attends over its empty slots too, masked: the same logits."""
    from minirm.graphs import static_step

    model = Transformer(preset("debug")).init_weights(seed=3).double().eval()
    new = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        plain, _ = prefilled(model, PROMPTS, new.shape[1])
        static = StaticKVCache.of(prefilled(model, PROMPTS, new.shape[1])[0], slots=40)
        assert static.k.shape[3] == 40 and static.max_len == 40
        for t in range(new.shape[1]):
            want = model(new[:, t:t + 1], None, plain)[:, -1]
            torch.testing.assert_close(static_step(model, static, new[:, t]), want, atol=1e-12,
                                       rtol=0)
    assert torch.equal(static.mask[:, :plain.max_len], plain.mask)
    assert not static.mask[:, plain.max_len:].any()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_a_prefill_into_the_static_cache_equals_the_plain_one(backend):
    """`prefilled_step`: left-padded prompts (padded further, to a multiple of PREFILL_ALIGN)
    straight into the first slots of the kept static cache give the plain prefill's logits,
    then the plain cache's steps; a second call of the same shape clears and reuses that
    cache."""
    from minirm.graphs import PREFILL_ALIGN, prefilled_step

    model = Transformer(preset("debug", attention=backend)).init_weights(seed=3).double().eval()
    new = torch.randint(3, 256, (3, 4), generator=torch.Generator().manual_seed(4))
    kept = None
    with torch.inference_mode():
        for prompts in (PROMPTS, [[256, 3, 4, 5, 6, 7], [256, 30, 31, 32], [256]]):
            plain, want = prefilled(model, prompts, new.shape[1])
            x, mask = left_pad(prompts, model.cfg.pad_id)
            got, step = prefilled_step(model, x, mask, plain.max_len, graph=False)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
            assert kept is None or step.cache is kept
            kept = step.cache
            pad = -x.shape[1] % PREFILL_ALIGN  # more left padding: the same outputs
            assert pad and kept.max_len == plain.max_len + pad and not kept.mask[:, :pad].any()
            assert torch.equal(kept.mask[:, pad:], plain.mask)
            assert torch.equal(kept.lengths, plain.lengths)
            for t in range(new.shape[1]):
                want = model(new[:, t:t + 1], None, plain)[:, -1]
                torch.testing.assert_close(step(new[:, t]), want, atol=1e-12, rtol=0)
            with pytest.raises(ValueError, match="all are filled"):
                step(new[:, 0])
        with pytest.raises(ValueError, match="only as a prefill from empty"):
            model(x, mask, step.cache)  # several tokens after the cache's filled slots
        with pytest.raises(ValueError, match="holds 5 positions; 6 needed"):
            prefilled_step(model, x, mask, 5, graph=False)


def test_the_static_step_is_kept_for_the_next_call():
    """The static step and its cache stay with the model: a call with a cache of the same shape
    takes them over (its own prompts and lengths: the plain cache's logits), in-place updates
    of the weights keep them (and are seen), while a cache of another length, weights moved
    or cast, or `release` make new ones."""
    from minirm.generate import release

    model = Transformer(preset("debug")).init_weights(seed=3).double().eval()
    other = [[256, 3, 4, 5, 6, 7], [256, 30, 31, 32], [256]]  # same padded length as PROMPTS
    new = torch.randint(3, 256, (3, 3), generator=torch.Generator().manual_seed(4))

    def check(prompts, steps):
        plain, _ = prefilled(model, prompts, steps)
        step = decoding_step(model, prefilled(model, prompts, steps)[0], graph=False)
        for t in range(new.shape[1]):
            want = model(new[:, t:t + 1], None, plain)[:, -1]
            atol = 1e-12 if want.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(step(new[:, t]), want, atol=atol, rtol=0)
        return step.cache

    with torch.inference_mode():
        first = check(PROMPTS, 3)
        assert check(other, 3) is first and KEPT[model][1] is first
        model.layers[0].attention.wq.weight.mul_(1.5)  # as an optimizer's step would
        assert check(PROMPTS, 3) is first
        longer = check(PROMPTS, 5)
        assert longer is not first and longer.k.shape[3] == longer.max_len == 11
    model.float()  # a cast drops the kept step (Transformer._apply)
    assert model not in KEPT
    with torch.inference_mode():
        cast = check(PROMPTS, 5)
        assert cast is not longer and cast.k.dtype == torch.float32
    with torch.no_grad():  # outside inference mode: not the inference tensors of inside it
        assert check(PROMPTS, 5) is not cast
    release(model)
    assert model not in KEPT


def test_a_step_whose_cache_a_later_call_took_over_refuses_to_run():
    """One static cache is kept per model: a step function made before the last call that took
    the cache over would decode that call's tokens, past its own count of free slots."""
    model = Transformer(preset("debug")).init_weights(seed=3).eval()
    with torch.inference_mode():
        first = decoding_step(model, prefilled(model, PROMPTS, 3)[0], graph=False)
        first(torch.tensor([5, 6, 7]))
        second = decoding_step(model, prefilled(model, PROMPTS, 3)[0], graph=False)
        assert second.cache is first.cache
        with pytest.raises(ValueError, match="took over this step's cache"):
            first(torch.tensor([5, 6, 7]))
        second(torch.tensor([5, 6, 7]))


def test_static_steps_refuse_the_flash_backend_and_torchrun(monkeypatch):
    """The flash backend builds its own mask, which would let a step see the cache's last,
    empty slot; under torchrun a shard's products end in collectives. Neither is graphed."""
    import minirm.graphs as G

    model = Transformer(preset("debug", attention="flash")).eval()
    assert not G.static_steps_apply(model)
    with torch.inference_mode():
        cache, _ = prefilled(model, PROMPTS, 2)
        with pytest.raises(ValueError, match="not flash"):
            decoding_step(model, cache, graph=False)
        with pytest.raises(NotImplementedError, match="keeps its batch"):
            StaticKVCache.of(cache).rows(torch.tensor([0]))
    sdpa = Transformer(preset("debug")).eval()
    assert G.static_steps_apply(sdpa)
    monkeypatch.setattr(G.dist, "is_initialized", lambda: True)
    assert not G.static_steps_apply(sdpa)
    with torch.inference_mode():
        cache, _ = prefilled(sdpa, PROMPTS, 2)
    assert not can_graph(sdpa, cache)  # and never on the CPU


def packable(seed=3):
    """A model whose projections are large enough for `minirm.packed` (dim^2 >= MIN_WEIGHTS)."""
    cfg = preset("debug", dim=384, n_heads=6, n_kv_heads=2, ffn_dim=1024, vocab_size=512)
    return Transformer(cfg).init_weights(seed=seed).eval()


@pytest.mark.parametrize("layout,rows", [("blas", None), ("blas", [0, 1, 0, 2]),
                                         ("onednn", [0, 1, 0, 2]), ("streamed", [0, 1, 0, 2])])
def test_compiled_steps_equal_the_plain_cache(monkeypatch, layout, rows):
    """Compiled static steps (`decoding_step(compile=True)`: attention as the reference formula,
    the packed products as custom operators, for one row, for MKL's packed rows and for the
    streamed kernel) give the plain cache's logits to float32 rounding, and a cache of another
    length runs the same compiled code."""
    from torch._dynamo.utils import counters
    from minirm import streamed

    if layout == "streamed" and not streamed.available():
        pytest.skip(f"the streamed kernel is not built here: {streamed.why_unavailable()}")
    monkeypatch.setenv("MINIRM_CPU_MATMUL", layout)
    model = packable()
    prompts = PROMPTS if rows else PROMPTS[:1]
    new = torch.randint(3, 512, (len(rows or [0]), 4), generator=torch.Generator().manual_seed(4))
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode(), packed_for_decoding(model, rows=len(new)):
        assert layout_in_use(model) == layout
        for extra in (0, 3):
            plain, _ = prefilled(model, prompts, new.shape[1] + extra, rows)
            static, _ = prefilled(model, prompts, new.shape[1] + extra, rows)
            step = decoding_step(model, static, graph=False, compile=True)
            for t in range(new.shape[1]):
                want = model(new[:, t:t + 1], None, plain)[:, -1]
                torch.testing.assert_close(step(new[:, t]), want, atol=1e-5, rtol=1e-5)
            if not extra:
                compiled = counters["stats"]["unique_graphs"]
                assert compiled > graphs
    assert counters["stats"]["unique_graphs"] == compiled  # the slots are dynamic
    assert torch.equal(step.cache.mask, plain.mask)
    assert torch.equal(step.cache.lengths, plain.lengths)


def test_generate_with_compiled_steps_samples_what_eager_decoding_samples(monkeypatch):
    """generate(compile=True) on the CPU runs the compiled steps (the batch whole) and gives the
    tokens, masks and ends of eager decoding, log-probs to float32 rounding, with stop ids and
    repeated prompts; the next call takes over the static cache; a batch over GRAPH_ROWS
    decodes eagerly. (The streamed layout's steps
    would run in one call to C++ instead: tests/test_decode.py.)"""
    import minirm.generate as G
    import minirm.graphs

    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    calls = []
    compiled = minirm.graphs.compiled_static_step
    monkeypatch.setattr(minirm.graphs, "compiled_static_step",
                        lambda: calls.append(1) or compiled())
    model = packable(seed=2)
    prompts = PROMPTS + [PROMPTS[0]]
    free = generate(model, prompts, 10, pad_id=0)
    stop = {int(free.tokens[0, 3]), int(free.tokens[2, 6])}
    for kwargs in (dict(stop_ids=stop), dict(temperature=1.0, top_k=30)):
        runs = [generate(model, prompts, 10, pad_id=0, compile=c,
                         generator=torch.Generator().manual_seed(5), **kwargs)
                for c in (False, True)]
        assert torch.equal(runs[0].tokens, runs[1].tokens), kwargs
        assert torch.equal(runs[0].mask, runs[1].mask) and torch.equal(runs[0].ended,
                                                                       runs[1].ended)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-4, rtol=0)
        if "stop_ids" in kwargs:  # they ended some rows, not all
            assert runs[1].ended.any() and not runs[1].ended.all()
        if "top_k" in kwargs:  # the second call took over the first one's static cache
            assert KEPT[model][1] is kept
        kept = KEPT[model][1]
    assert len(calls) == 2  # the whole step compiled, once per call
    monkeypatch.setattr(G, "GRAPH_ROWS", 3)
    generate(model, prompts, 10, pad_id=0, compile=True)
    assert len(calls) == 2


def test_generate_with_a_compiled_prefill_samples_what_eager_decoding_samples(monkeypatch):
    """With compiled steps on a GPU (`graphs.prefill_applies`, made true here on the CPU),
    distinct prompts are prefilled compiled, straight into the static cache, and prefill and
    steps run block by block, one compiled function for every block: generate gives eager
    decoding's tokens, masks and ends, log-probs to float32 rounding; prompts of another length
    run the same compiled code (its length is dynamic)."""
    import minirm.generate as G
    import minirm.graphs
    from torch._dynamo.utils import counters

    monkeypatch.setenv("MINIRM_CPU_STEP", "0")
    monkeypatch.setattr(G, "prefill_applies", lambda model, device, graphs, compile: compile)
    calls = []  # each compiled block's number of tokens a row
    compiled = minirm.graphs.compiled_block
    monkeypatch.setattr(minirm.graphs, "compiled_block",
                        lambda: lambda *a: calls.append(a[1].shape[1]) or compiled()(*a))
    model = packable(seed=2)
    longer = [[256, 3, 4, 5, 6, 7, 8, 9, 10], [256, 30], [256, 40, 41, 42]]
    for i, prompts in enumerate((PROMPTS, longer)):
        runs = [generate(model, prompts, 10, pad_id=0, temperature=1.0, compile=c,
                         generator=torch.Generator().manual_seed(5)) for c in (False, True)]
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        assert torch.equal(runs[0].mask, runs[1].mask)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-4, rtol=0)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    # The prompts padded to 8 and 16 tokens, then 9 steps each, every block compiled.
    layers = len(model.layers)
    assert calls == ([8] * layers + [1] * 9 * layers + [16] * layers + [1] * 9 * layers)


def test_one_compiled_block_serves_every_layer():
    """Compiled block by block, a model of 6 layers compiles two graphs in all, the prefill's
    and the steps', whatever the layer (each writes through its own view of the cache) and for
    a second call of other lengths; the numbers are the eager static cache's."""
    from torch._dynamo.utils import counters
    from minirm.graphs import prefilled_step

    cfg = preset("debug", n_layers=6, dim=96, n_heads=3, n_kv_heads=1, ffn_dim=160)
    model = Transformer(cfg).init_weights(seed=5).eval()
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for prompts, steps in ((PROMPTS, 3), ([[256, 7] * 5, [256]], 5)):
            x, mask = left_pad(prompts, cfg.pad_id)
            max_len = x.shape[1] + steps
            want, eager = prefilled_step(model, x, mask, max_len, graph=False)
            want_steps = [eager(torch.full((len(x),), 7 + t)).clone() for t in range(steps)]
            got, step = prefilled_step(model, x, mask, max_len, graph=False, compile=True)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for t in range(steps):
                torch.testing.assert_close(step(torch.full((len(x),), 7 + t)), want_steps[t],
                                           atol=1e-5, rtol=1e-5)
    # The prefill's and the steps' for each batch size (fewer when shapes that changed since an
    # earlier test's compiling are already dynamic); once per layer would be 12 at least.
    assert 2 <= counters["stats"]["unique_graphs"] - before <= 4


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_static_steps(dtype):
    """The captured step replays exactly the kernels of the same step run eagerly over a static
    cache of as many slots (SLOT_BLOCK's multiple)."""
    from minirm.graphs import static_step

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(preset("debug")).init_weights(seed=3).to(dtype).eval()
    new = torch.randint(3, 256, (4, 6), device="cuda")
    with torch.inference_mode():
        eager_cache, _ = prefilled(model, PROMPTS, new.shape[1], [0, 1, 0, 2])
        graph_cache, _ = prefilled(model, PROMPTS, new.shape[1], [0, 1, 0, 2])
        assert can_graph(model, graph_cache)
        graphed = decoding_step(model, graph_cache)
        eager = StaticKVCache.of(eager_cache, slots=graphed.cache.max_len)
        for t in range(new.shape[1]):
            want = static_step(model, eager, new[:, t]).clone()
            torch.testing.assert_close(graphed(new[:, t]), want, atol=0, rtol=0)


@CUDA
def test_generate_with_cuda_graphs_samples_what_eager_decoding_samples():
    """generate on a GPU, graphed and not: the same tokens and log-probs (to float rounding:
    the graph attends over the whole cache), with stop ids and repeated prompts."""
    with torch.device("cuda"):
        model = Transformer(preset("debug")).init_weights(seed=2).eval()
    prompts = PROMPTS + [PROMPTS[0], PROMPTS[0]]
    free = generate(model, prompts, 12, pad_id=0, cuda_graphs=False)
    stop = {int(free.tokens[0, 3]), int(free.tokens[2, 7])}
    for kwargs in (dict(), dict(temperature=1.0), dict(stop_ids=stop),
                   dict(temperature=1.0, top_k=30, stop_ids=stop)):
        runs = [generate(model, prompts, 12, pad_id=0, cuda_graphs=g,
                         generator=torch.Generator("cuda").manual_seed(5), **kwargs)
                for g in (False, True)]
        assert torch.equal(runs[0].tokens, runs[1].tokens), kwargs
        assert torch.equal(runs[0].mask, runs[1].mask) and torch.equal(runs[0].ended,
                                                                       runs[1].ended)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-4, rtol=0)


@CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_generate_keeps_its_graph_for_the_next_call(compile):
    """A second generate call of the same shape (other prompts of the same padded length, other
    new tokens within SLOT_BLOCK) replays the first call's graph, with or without compiled
    steps inside it, and samples what eager decoding samples; a cast makes a new graph."""
    from minirm.generate import release

    with torch.device("cuda"):
        model = Transformer(preset("debug")).init_weights(seed=2).eval()
    other = [[256, 3, 4, 5, 6, 7], [256, 30, 31, 32], [256]]
    graphs = []
    for prompts, n in ((PROMPTS, 12), (other, 9), (PROMPTS, 12)):
        runs = [generate(model, prompts, n, pad_id=0, temperature=1.0, cuda_graphs=g,
                         compile=compile and g, generator=torch.Generator("cuda").manual_seed(5))
                for g in (False, True)]
        assert torch.equal(runs[0].tokens, runs[1].tokens)
        torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=1e-4, rtol=0)
        graphs.append(KEPT[model][2])
    assert graphs[0] is graphs[1] is graphs[2]
    model.to(torch.bfloat16)
    generate(model, PROMPTS, 12, pad_id=0)
    assert KEPT[model][2] is not graphs[0]
    release(model)
    assert model not in KEPT
