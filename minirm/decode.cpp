// One decoding step of a Llama model on the CPU, for a few rows, in one call
// (minirm/decode.py): every layer's norms, products, RoPE, cache writes, attention and SwiGLU,
// then the final norm and the output layer, for one new token per row.
//
// The threads stay in one parallel region for the whole step. Each product is split by weight
// rows between them (the kernel of streamed.h) and ends at a barrier; the small parts between
// the products (a norm of a few rows, a head's attention over the cache) are shared out by
// rows or heads, with fused.cpp's row functions (fused.h).
//
// tokens: (rows,), the new token of each row. k_cache, v_cache: (n_layers, rows, n_kv_heads,
// max_len, head_dim), written at `slot`. mask: (rows, max_len), the slots that hold real
// tokens, and lengths: (rows,), how many each row has: the step marks its slot and adds one, as
// KVCache.start and KVCache.advance do. logits: (rows, vocab).
//
// After the step: a token sampled from a row of logits (sample_row), and generate's whole loop
// of sampling, bookkeeping and steps (minirm_decode_loop), so that Python is left nothing to
// do a token.

#include <omp.h>

#include <cmath>
#include <vector>

#include "fused.h"
#include "streamed.h"

// The dimensions, in the order decode.py passes them.
struct Dims {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, rows, max_len, slot,
        embedding_rows;
};

static float dot(const float* a, const float* b, int64_t d) {
    vec acc = {};
    int64_t j = 0;
    for (; j + L <= d; j += L) acc += load(a + j) * load(b + j);
    float s = total(acc);
    for (; j < d; j++) s += a[j] * b[j];
    return s;
}

// One query head of one row against its key/value head's slots 0 .. slot: the slots the row's
// mask marks, and its own. scores has room for the slots rounded up to whole vectors.
static void attend(const float* q, const float* k, const float* v, const uint8_t* mask,
                   int64_t slot, int64_t d, float* scores, float* out) {
    const int64_t S = slot + 1, padded = (S + L - 1) / L * L;
    const float scale = 1.0f / std::sqrt((float)d);
    float top = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        scores[s] = (mask[s] || s == slot) ? dot(q, k + s * d, d) * scale : -INFINITY;
        top = scores[s] > top ? scores[s] : top;
    }
    for (int64_t s = S; s < padded; s++) scores[s] = -INFINITY;
    // e^(score - top): exactly 0 for the masked slots, NaN throughout if a score is NaN.
    vec sums = {};
    for (int64_t s = 0; s < padded; s += L) {
        vec e = vexp_nonpositive(load(scores + s) - splat(top));
        store(scores + s, e);
        sums += e;
    }
    const float inv = 1.0f / total(sums);
    for (int64_t j = 0; j < d; j++) out[j] = 0;
    for (int64_t s = 0; s < S; s++) {
        const float p = scores[s] * inv;
        if (p == 0) continue;  // a masked slot: its value is not read
        const float* vs = v + s * d;
        int64_t j = 0;
        for (; j + L <= d; j += L) store(out + j, load(out + j) + splat(p) * load(vs + j));
        for (; j < d; j++) out[j] += p * vs[j];
    }
}

// One step for n.rows rows at cache slot n.slot, tokens already checked (see minirm_decode_step).
static void step(const float* const* weights, const Dims& n, float eps, const int64_t* tokens,
                 const float* embedding, const float* inv_freq, float* k_cache, float* v_cache,
                 uint8_t* mask, int64_t* lengths, float* logits) {
    const int64_t D = n.head_dim, H = n.n_heads, Hkv = n.n_kv_heads, B = n.rows;
    const int64_t qkv_n = (H + 2 * Hkv) * D, att_n = H * D, F = n.ffn_dim;
    const int64_t padded = (n.slot + 1 + L - 1) / L * L;
    std::vector<float> x(B * n.dim), cos(B * D), sin(B * D);
    std::vector<float> h(B * n.dim), qkv(B * qkv_n), att(B * att_n), gu(B * 2 * F),
        act(B * F), out(B * n.dim);
    for (int64_t b = 0; b < B; b++) {
        std::memcpy(&x[b * n.dim], embedding + tokens[b] * n.dim, n.dim * sizeof(float));
        // The rotation at the row's position, its real tokens so far (Transformer.body's rule),
        // in model.rope_cos_sin's form: the angles in float32, sin's first half negated.
        const float position = (float)lengths[b];
        for (int64_t j = 0; j < D / 2; j++) {
            const float angle = position * inv_freq[j], c = std::cos(angle), s = std::sin(angle);
            cos[b * D + j] = cos[b * D + D / 2 + j] = c;
            sin[b * D + j] = -s;
            sin[b * D + D / 2 + j] = s;
        }
        mask[b * n.max_len + n.slot] = 1;
        lengths[b] += 1;
    }
    const int threads = omp_get_max_threads();
    std::vector<float> scratch(threads * (padded + D));  // scores and a rotated query a thread
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float* scores = scratch.data() + t * (padded + D);
        float* q = scores + padded;
        for (int64_t l = 0; l < n.n_layers; l++) {
            const float* const* w = weights + 6 * l;
            const int64_t layer = l * B * Hkv * n.max_len * D;  // this layer's cache
            #pragma omp for
            for (int64_t b = 0; b < B; b++)
                rms_norm_row(&x[b * n.dim], w[0], h.data() + b * n.dim, n.dim, eps);
            streamed_share(h.data(), w[1], qkv.data(), B, qkv_n, n.dim, t, T);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < B * Hkv; i++) {  // this position's key and value
                const int64_t b = i / Hkv, g = i % Hkv;
                const float* kv = qkv.data() + b * qkv_n + (H + g) * D;
                const int64_t at = layer + (i * n.max_len + n.slot) * D;
                rope_head(kv, &cos[b * D], &sin[b * D], k_cache + at, D, 1.0f);
                std::memcpy(v_cache + at, kv + Hkv * D, D * sizeof(float));
            }
            #pragma omp for
            for (int64_t i = 0; i < B * H; i++) {  // one query head of one row
                const int64_t b = i / H, head = i % H, g = head / (H / Hkv);
                rope_head(qkv.data() + b * qkv_n + head * D, &cos[b * D], &sin[b * D], q, D,
                          1.0f);
                const int64_t slots = layer + (b * Hkv + g) * n.max_len * D;
                attend(q, k_cache + slots, v_cache + slots, mask + b * n.max_len, n.slot, D,
                       scores, att.data() + b * att_n + head * D);
            }
            streamed_share(att.data(), w[2], out.data(), B, n.dim, att_n, t, T);
            #pragma omp barrier
            #pragma omp for
            for (int64_t b = 0; b < B; b++) {  // the residual, and the feed-forward's norm
                float* xb = &x[b * n.dim];
                for (int64_t j = 0; j < n.dim; j++) xb[j] += out[b * n.dim + j];
                rms_norm_row(xb, w[3], h.data() + b * n.dim, n.dim, eps);
            }
            streamed_share(h.data(), w[4], gu.data(), B, 2 * F, n.dim, t, T);
            #pragma omp barrier
            #pragma omp for
            for (int64_t b = 0; b < B; b++)
                swiglu_range(gu.data() + b * 2 * F, gu.data() + b * 2 * F + F,
                             act.data() + b * F, 0, F);
            streamed_share(act.data(), w[5], out.data(), B, n.dim, F, t, T);
            #pragma omp barrier
            #pragma omp for
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < n.dim; j++) x[b * n.dim + j] += out[b * n.dim + j];
        }
        const float* const* last = weights + 6 * n.n_layers;
        #pragma omp for
        for (int64_t b = 0; b < B; b++)
            rms_norm_row(&x[b * n.dim], last[0], h.data() + b * n.dim, n.dim, eps);
        streamed_share(h.data(), last[1], logits, B, n.vocab, n.dim, t, T);
    }
}

static bool in_embedding(const int64_t* tokens, const Dims& n) {
    for (int64_t b = 0; b < n.rows; b++)
        if (tokens[b] < 0 || tokens[b] >= n.embedding_rows) return false;
    return true;
}

// weights: for each layer its attention norm, q/k/v stacked, output projection, feed-forward
// norm, gate/up stacked and down projection (six pointers), then the final norm and the head.
// Returns -1, having changed nothing, when a token is outside the embedding; else 0.
extern "C" int minirm_decode_step(const float* const* weights, const int64_t* dims,
                                  float eps, const int64_t* tokens, const float* embedding,
                                  const float* inv_freq, float* k_cache, float* v_cache,
                                  uint8_t* mask, int64_t* lengths, float* logits) {
    Dims n;
    std::memcpy(&n, dims, sizeof n);
    if (!in_embedding(tokens, n)) return -1;
    step(weights, n, eps, tokens, embedding, inv_freq, k_cache, v_cache, mask, lengths, logits);
    return 0;
}

// One token from a row of logits, as generate.py's sample_next draws it without top-k or
// top-p: at temperature > 0 the weights e^(x - max x) of x = logits / temperature, and the
// first token whose running sum of weights passes u times their total (u: a uniform number in
// [0, 1)); at temperature 0 the first token of largest logit. logprob: log p of the token,
// x - max x - log(total). The running sum is in double precision: the sums of whole vectors of
// weights first, to find the vector, then that vector's own entries. Returns false, writing
// nothing, for a row with a NaN or +inf, or nothing above -inf.
static bool sample_row(const float* row, int64_t vocab, float temperature, double u,
                       int64_t* token, float* logprob) {
    const int64_t blocks = (vocab + L - 1) / L;
    static thread_local std::vector<float> w;
    static thread_local std::vector<double> sums;
    w.resize(blocks * L);
    sums.resize(blocks);
    const bool greedy = !(temperature > 0);
    const vec scale = splat(greedy ? 1.0f : temperature);
    vec tops = splat(-INFINITY);
    for (int64_t b = 0; b < blocks; b++) {
        vec x;
        if ((b + 1) * L <= vocab) {
            x = load(row + b * L) / scale;
        } else {  // the lanes past the vocabulary are -inf: no mass
            x = splat(-INFINITY);
            for (int64_t i = b * L; i < vocab; i++) x[i - b * L] = row[i] / scale[0];
        }
        store(&w[b * L], x);
        tops = x > tops ? x : tops;  // NaN is caught by the total below
    }
    float top = tops[0];
    for (int i = 1; i < L; i++) top = tops[i] > top ? tops[i] : top;
    double all = 0;
    for (int64_t b = 0; b < blocks; b++) {
        vec e = vexp(load(&w[b * L]) - splat(top));
        store(&w[b * L], e);
        sums[b] = total(e);
        all += sums[b];
    }
    if (!std::isfinite(top) || !std::isfinite(all) || !(all > 0)) return false;
    int64_t pick = -1;
    if (greedy) {
        for (int64_t i = 0; pick < 0; i++)
            if (row[i] == top) pick = i;  // the first largest
    } else {
        const double target = u * all;
        double before = 0;
        int64_t b = 0, last = -1;  // last: the last block with mass passed
        for (; b < blocks && before + sums[b] <= target; b++) {
            if (sums[b] > 0) last = b;
            before += sums[b];
        }
        if (b == blocks) {  // rounding put the target at the total: the last entry with mass
            for (int64_t i = (last + 1) * L - 1; pick < 0; i--)
                if (w[i] > 0) pick = i;
        } else {  // the block's first entry whose running sum passes the target, or should
                  // rounding keep it short, its last entry with mass
            for (int64_t i = b * L; i < (b + 1) * L; i++) {
                before += w[i];
                if (w[i] > 0) pick = i;
                if (w[i] > 0 && before > target) break;
            }
        }
    }
    *token = pick;
    *logprob = (row[pick] / scale[0] - top) - (float)std::log(all);
    return true;
}

// sample_row for each of `rows` rows of logits (rows, vocab), u: one number a row (unread at
// temperature 0). Returns the first row sample_row refuses, its token left unwritten (the
// caller samples such rows its own way), or -1.
extern "C" int minirm_sample(const float* logits, int64_t rows, int64_t vocab,
                             float temperature, const double* u, int64_t* tokens,
                             float* logprobs) {
    int bad = -1;
    #pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        if (!sample_row(logits + r * vocab, vocab, temperature, u ? u[r] : 0.0, tokens + r,
                        logprobs + r)) {
            #pragma omp critical
            bad = (bad < 0 || r < bad) ? (int)r : bad;
        }
    }
    return bad;
}


// Steps of generate's loop (generate.py's _sample) for a batch that keeps all its rows, from
// the logits of step loop[0] on: sample each row's token (sample_row), record it (pad_id after
// a row has ended: tokens, logprobs and valid are (rows, max_new)), end the rows that drew a
// stop id (done), and take the step that gives the next logits, until step loop[2] is reached,
// every row has ended, max_new tokens are drawn, or (after the step) loop[6] rows have ended, so
// that the caller can drop them from the batch. u: (max_new, rows), one number a row a step.
// loop: {the next step to sample, the cache slot, the step to stop before, max_new, the number
// of stop ids, pad_id, ended rows to stop at}; the first two are advanced. Returns 1, with
// logits still those of step loop[0] and nothing of it recorded, at a row that cannot be
// sampled (sample_row) or would feed a token outside the embedding: the caller takes that step
// its own way. Else 0.
extern "C" int minirm_decode_loop(const float* const* weights, const int64_t* dims, float eps,
                                  const float* embedding, const float* inv_freq, float* k_cache,
                                  float* v_cache, uint8_t* mask, int64_t* lengths,
                                  float* logits, int64_t* loop, float temperature,
                                  const double* u, const int64_t* stop, int64_t* tokens,
                                  float* logprobs, uint8_t* valid, uint8_t* done) {
    Dims n;
    std::memcpy(&n, dims, sizeof n);
    const int64_t B = n.rows, last = loop[2], max_new = loop[3], n_stop = loop[4];
    const int64_t pad = loop[5], enough = loop[6];
    std::vector<int64_t> drawn(B), fed(B);
    std::vector<float> lp(B);
    for (int64_t s = loop[0]; s < last; s++) {
        const double* us = u ? u + s * B : nullptr;
        if (minirm_sample(logits, B, n.vocab, temperature, us, drawn.data(), lp.data()) >= 0)
            return 1;
        for (int64_t b = 0; b < B; b++) fed[b] = done[b] ? pad : drawn[b];
        if (s < max_new - 1 && !in_embedding(fed.data(), n)) return 1;
        int64_t ended = 0;
        for (int64_t b = 0; b < B; b++) {
            tokens[b * max_new + s] = fed[b];
            logprobs[b * max_new + s] = lp[b];
            valid[b * max_new + s] = !done[b];
            for (int64_t i = 0; i < n_stop && !done[b]; i++) done[b] = fed[b] == stop[i];
            ended += done[b];
        }
        loop[0] = s + 1;
        if (s == max_new - 1 || (n_stop > 0 && ended == B)) return 0;
        n.slot = loop[1]++;
        step(weights, n, eps, fed.data(), embedding, inv_freq, k_cache, v_cache, mask, lengths,
             logits);
        if (n_stop > 0 && ended >= enough) return 0;
    }
    return 0;
}
