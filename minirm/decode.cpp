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

// weights: for each layer its attention norm, q/k/v stacked, output projection, feed-forward
// norm, gate/up stacked and down projection (six pointers), then the final norm and the head.
// Returns -1, having changed nothing, when a token is outside the embedding; else 0.
extern "C" int minirm_decode_step(const float* const* weights, const int64_t* dims_in,
                                  float eps, const int64_t* tokens, const float* embedding,
                                  const float* inv_freq, float* k_cache, float* v_cache,
                                  uint8_t* mask, int64_t* lengths, float* logits) {
    Dims n;
    std::memcpy(&n, dims_in, sizeof n);
    const int64_t D = n.head_dim, H = n.n_heads, Hkv = n.n_kv_heads, B = n.rows;
    const int64_t qkv_n = (H + 2 * Hkv) * D, att_n = H * D, F = n.ffn_dim;
    const int64_t padded = (n.slot + 1 + L - 1) / L * L;
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= n.embedding_rows) return -1;
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
    return 0;
}
