// The element-wise parts of a block on one row or range, shared by fused.cpp (which splits rows
// and ranges over torch's threads) and decode.cpp (whose threads are already in a parallel
// region): SwiGLU's silu(g) * u, rotary embeddings and RMSNorm. float32, contiguous.

#pragma once

#include "vec.h"

static inline vec sigmoid(vec g) { return splat(1.0f) / (splat(1.0f) + vexp(-g)); }

// h = silu(g) * u = g sigmoid(g) u, for items begin .. end.
static inline void swiglu_range(const float* g, const float* u, float* h, int64_t begin,
                                int64_t end) {
    int64_t i = begin;
    for (; i + L <= end; i += L) {
        vec gv = load(g + i);
        store(h + i, gv * sigmoid(gv) * load(u + i));
    }
    for (; i < end; i++) {  // the tail, in a vector padded with zeros
        vec gv = {}, uv = {};
        gv[0] = g[i];
        uv[0] = u[i];
        h[i] = (gv * sigmoid(gv) * uv)[0];
    }
}

// One head's vector of d in the rotate-half layout, with the cos and signed sin of its
// position (the sin's first half negated): y[j] = x[j] cos[j] + x[(j + d/2) % d] sin[j].
// With sign = -1 it rotates back, which is the gradient: dx = dy cos - roll(dy) sin.
static inline void rope_head(const float* x, const float* c, const float* s, float* y,
                             int64_t d, float sign) {
    const int64_t half = d / 2;
    if (half % L == 0 && d == 2 * half) {
        for (int64_t j = 0; j < half; j += L) {
            vec lo = load(x + j), hi = load(x + half + j);
            vec slo = load(s + j) * sign, shi = load(s + half + j) * sign;
            store(y + j, lo * load(c + j) + hi * slo);
            store(y + half + j, hi * load(c + half + j) + lo * shi);
        }
    } else {
        for (int64_t j = 0; j < d; j++) y[j] = x[j] * c[j] + x[(j + half) % d] * s[j] * sign;
    }
}

// RMSNorm of one row x of d with gain w: y = x r w, r = (mean(x^2) + eps)^-1/2; returns r.
static inline float rms_norm_row(const float* x, const float* w, float* y, int64_t d,
                                 float eps) {
    vec acc = {};
    int64_t j = 0;
    for (; j + L <= d; j += L) acc += load(x + j) * load(x + j);
    float squares = total(acc);
    for (; j < d; j++) squares += x[j] * x[j];
    const float r = 1.0f / __builtin_sqrtf(squares / d + eps);
    for (j = 0; j + L <= d; j += L) store(y + j, load(x + j) * r * load(w + j));
    for (; j < d; j++) y[j] = x[j] * r * w[j];
    return r;
}
