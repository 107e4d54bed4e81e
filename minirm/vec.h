// What minirm's C++ kernels share (streamed.cpp, fused.cpp, attention.cpp, decode.cpp): the
// compiler's vector types of L floats (16 with AVX-512, else 8), unaligned loads and stores, a
// sum of lanes, and an exp of our own, so that no -ffast-math is needed for a vector exp.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int L = 16;  // floats in a vector register
#else
constexpr int L = 8;
#endif
typedef float vec __attribute__((vector_size(L * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(L * sizeof(int32_t))));

static inline vec load(const float* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
}

static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

static inline vec splat(float a) { return vec{} + a; }

typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

// The sum of a vector's lanes, a few vector adds first: 16 scalar adds in a row took longer
// than the streamed product's loop over k that they end.
static inline float total(vec v) {
    vec4 part[L / 4];
    std::memcpy(part, &v, sizeof v);
    vec4 s = part[0];
    for (int i = 1; i < L / 4; i++) s += part[i];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

constexpr float EXP_HI = 88.3762626647949f, EXP_LO = -87.3365447505531f;  // normal floats

// e^x to about one unit in the last place for x in [EXP_LO, EXP_HI]: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-6 polynomial (the Cephes coefficients), 2^n put in the
// exponent bits. x is clamped to that range first, in an order that lets NaN through.
static inline vec exp_inside(vec in) {
    vec x = in > splat(EXP_HI) ? splat(EXP_HI) : in;
    x = x < splat(EXP_LO) ? splat(EXP_LO) : x;
    // n = round(x / ln2), by adding 1.5 * 2^23: the sum's low bits are then n.
    const vec magic = splat(12582912.0f);
    vec t = x * splat(1.44269504088896341f) + magic;
    vec n = t - magic;
    vec r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);  // ln2 in two parts
    vec p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    ivec bits = (ivec)t - (ivec)magic;  // n, as an integer
    ivec scale = (bits + 127) << 23;    // 2^n
    return p * (vec)scale;
}

// e^x: inf above the range of normal floats, 0 below it (-inf included), NaN for NaN.
static inline vec vexp(vec in) {
    vec e = exp_inside(in);
    e = in > splat(EXP_HI) ? splat(__builtin_inff()) : e;
    return in < splat(EXP_LO) ? vec{} : e;
}

// e^x for x <= 0 (a score minus its row's max): 0 below the range (-inf: a masked score), NaN
// for NaN. One select fewer than vexp: in attention's forward at SmolLM2's training shape,
// vexp's selects (then three) took 3.8 ms where this takes 3.3.
static inline vec vexp_nonpositive(vec in) {
    return in < splat(EXP_LO) ? vec{} : exp_inside(in);
}
