// The element-wise parts of a block, forward and backward, one pass over memory each
// (minirm/fused.py): SwiGLU's silu(g) * u, rotary embeddings and RMSNorm. float32, contiguous.
//
// Written with the compiler's vector types and an exp of our own (vec.h). Each function splits
// its elements or rows over torch's OpenMP threads.

#include <omp.h>

#include "fused.h"

// The range [begin, end) of n items that thread t of `threads` takes, in whole vectors.
static inline void share(int64_t n, int64_t& begin, int64_t& end) {
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t vectors = (n + L - 1) / L;
    begin = vectors * t / threads * L;
    end = vectors * (t + 1) / threads * L;
    if (end > n) end = n;
}

// h = silu(g) * u = g sigmoid(g) u, over n floats.
extern "C" void minirm_swiglu(const float* g, const float* u, float* h, int64_t n) {
    #pragma omp parallel
    {
        int64_t begin, end;
        share(n, begin, end);
        swiglu_range(g, u, h, begin, end);
    }
}

// The gradients of h = silu(g) * u for an upstream dh, with s = sigmoid(g):
//   du = dh silu(g) = dh g s,   dg = dh u s (1 + g (1 - s))   (silu's derivative).
extern "C" void minirm_swiglu_backward(const float* g, const float* u, const float* dh,
                                       float* dg, float* du, int64_t n) {
    #pragma omp parallel
    {
        int64_t i, end;
        share(n, i, end);
        auto step = [](vec gv, vec uv, vec dv, vec& dgv, vec& duv) {
            vec s = sigmoid(gv);
            duv = dv * gv * s;
            dgv = dv * uv * s * (splat(1.0f) + gv * (splat(1.0f) - s));
        };
        for (; i + L <= end; i += L) {
            vec dgv, duv;
            step(load(g + i), load(u + i), load(dh + i), dgv, duv);
            store(dg + i, dgv);
            store(du + i, duv);
        }
        for (; i < end; i++) {
            vec gv = {}, uv = {}, dv = {}, dgv, duv;
            gv[0] = g[i];
            uv[0] = u[i];
            dv[0] = dh[i];
            step(gv, uv, dv, dgv, duv);
            dg[i] = dgv[0];
            du[i] = duv[0];
        }
    }
}

// Rotary embeddings in the rotate-half layout (rope_head), for x (rows, heads, d) and the cos
// and signed sin of each row's position (rows, d); sign = -1 rotates back (the gradient).
extern "C" void minirm_rope(const float* x, const float* cos, const float* sin, float* y,
                            int64_t rows, int64_t heads, int64_t d, float sign) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++)
            rope_head(x + (r * heads + h) * d, cos + r * d, sin + r * d,
                      y + (r * heads + h) * d, d, sign);
}

// RMSNorm of each row of x (rows, d) with gain w (rms_norm_row), keeping r (rows) for the
// backward.
extern "C" void minirm_rms_norm(const float* x, const float* w, float* y, float* r,
                                int64_t rows, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; row++)
        r[row] = rms_norm_row(x + row * d, w, y + row * d, d, eps);
}

// RMSNorm's gradients for an upstream dy, with x^ = x r and g = dy w:
//   dx = r (g - x^ mean(g x^)),   dw = sum over rows of dy x^.
// Each of the `threads` threads sums dw over its rows into its own row of dw_parts
// (threads, d); the caller adds those up.
extern "C" void minirm_rms_norm_backward(const float* x, const float* w, const float* r,
                                         const float* dy, float* dx, float* dw_parts,
                                         int64_t rows, int64_t d, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        float* dw = dw_parts + t * d;
        for (int64_t j = 0; j < d; j++) dw[j] = 0;
        for (int64_t row = rows * t / n; row < rows * (t + 1) / n; row++) {
            const float* xr = x + row * d;
            const float* dyr = dy + row * d;
            float* dxr = dx + row * d;
            const float rr = r[row];
            vec acc = {};
            int64_t j = 0;
            for (; j + L <= d; j += L) acc += load(dyr + j) * load(w + j) * load(xr + j);
            float dot = total(acc);
            for (; j < d; j++) dot += dyr[j] * w[j] * xr[j];
            const float mean = dot * rr / d;  // mean(g x^)
            for (j = 0; j + L <= d; j += L) {
                vec xh = load(xr + j) * rr, dv = load(dyr + j);
                store(dxr + j, (dv * load(w + j) - xh * mean) * rr);
                store(dw + j, load(dw + j) + dv * xh);
            }
            for (; j < d; j++) {
                const float xh = xr[j] * rr;
                dxr[j] = (dyr[j] * w[j] - xh * mean) * rr;
                dw[j] += dyr[j] * xh;
            }
        }
    }
}
