// Causal attention for the CPU, forward and backward (minirm/attention.py, the sdpa backend's
// kernel for float32 rows): FlashAttention's two passes, with whole rows.
//
// q, o, dout, dq: (B, T, H, D); k, v, dk, dv: (B, S, Hkv, D), S >= T; lse: (B, H, T); bias:
// (B, S) or null; float32, contiguous. Query head h reads key/value head h / (H / Hkv). The
// queries are the last T of the S positions (the keys before them a prompt's, computed once):
// query i sees keys 0 .. S - T + i, each with bias 0 (a real token) or -inf (padding), its own
// key always.
//
// Forward, for each block of QB query rows of one head: the scores Q K^T / sqrt(D) of every
// key the block sees (QB x S floats, which stay in the second-level cache), the exact softmax
// of each row (its max and sum at once: the row is whole, no online rescaling), O = P V, and
// the log-sum-exp of each row for the backward. Backward, for each batch element and key/value
// head, its query heads and blocks in turn: P again from the log-sum-exp, dP = dO V^T,
// dS = P (dP - rowsum(dO O)), dQ = dS K / sqrt(D), and dV += P^T dO, dK += dS^T Q / sqrt(D)
// summed in buffers of the head's own.
//
// The products are small matrix kernels on the compiler's vector types: a block of QB x L
// scores in QB vector registers (QB = L: 16 lanes and 16 rows with AVX-512's 32 registers, 8
// and 8 with AVX2's 16), and P V as 4 rows x CB vectors. K and V are transposed once per head
// (in L x L tiles) so that a vector of K^T holds L keys.

#include <cmath>

#include <omp.h>

#include "vec.h"

constexpr int QB = L;  // query rows a block
// Vectors of a row that the row-times-matrix kernels hold at once: 4 rows x CB accumulators.
constexpr int CB = L == 16 ? 4 : 2;

// xt (D, Tp) = the T rows of x (`stride` floats apart) transposed, zeros past T; in L x L
// tiles, so that reads and writes each touch L cache lines at a time (a column at a time, the
// writes Tp floats apart collided in the cache: a quarter of the backward's time at T = 256).
template <int D>
static void transpose(const float* x, int64_t stride, int64_t T, int64_t Tp, float* xt) {
    float tile[L][L];
    for (int64_t j0 = 0; j0 < Tp; j0 += L)
        for (int d0 = 0; d0 < D; d0 += L) {
            for (int jj = 0; jj < L; jj++)
                for (int dd = 0; dd < L; dd++)
                    tile[dd][jj] = j0 + jj < T ? x[(j0 + jj) * stride + d0 + dd] : 0.f;
            for (int dd = 0; dd < L; dd++)
                std::memcpy(xt + (d0 + dd) * Tp + j0, tile[dd], sizeof tile[dd]);
        }
}

// out[r][j] = sum_d a[r][d] bt[d][j] for r < QB, j < n (a multiple of L), where query r sits at
// key position i0 + r. With `causal`, -inf where key j is after it, and plus bias[j] (0, or
// -inf for a padding key) unless j is the query's own position: a padded query sees itself,
// so no row is empty.
template <int D>
static void scores(const float* a, const float* bt, int64_t Tp, int64_t n, int64_t i0,
                   bool causal, const float* bias, float* out) {
    for (int64_t j0 = 0; j0 < n; j0 += L) {
        vec acc[QB] = {};
        for (int d = 0; d < D; d++) {
            vec b = load(bt + d * Tp + j0);
            for (int r = 0; r < QB; r++) acc[r] += a[r * D + d] * b;
        }
        const bool diagonal = causal && j0 + L > i0;  // holds a key at or after query 0's
        float own[QB][L];  // the diagonal's scores before the bias
        if (diagonal && bias)
            for (int r = 0; r < QB; r++) store(own[r], acc[r]);
        const vec b = bias ? load(bias + j0) : vec{};
        for (int r = 0; r < QB; r++) store(out + r * Tp + j0, acc[r] + b);
        if (diagonal)  // masked after the store: acc stays in registers
            for (int r = 0; r < QB; r++)
                for (int c = 0; c < L; c++) {
                    if (j0 + c > i0 + r) out[r * Tp + j0 + c] = -INFINITY;
                    else if (bias && j0 + c == i0 + r) out[r * Tp + j0 + c] = own[r][c];
                }
    }
}

// out[r] = factor[r] * sum_{j <= i0 + r} p[r][j] m[j] for r < rows, query r at key position
// i0 + r (rows of m `ms` floats apart, rows of out `os` apart).
template <int D>
static void rows_times(const float* p, int64_t Tp, const float* m, int64_t ms, int64_t i0,
                       int rows, const float* factor, float* out, int64_t os) {
    for (int r0 = 0; r0 < rows; r0 += 4) {
        const int64_t n = i0 + (r0 + 4 < rows ? r0 + 4 : rows);  // p is 0 past each row's keys
        for (int c0 = 0; c0 < D; c0 += CB * L) {
            vec acc[4][CB] = {};
            for (int64_t j = 0; j < n; j++) {
                vec mv[CB];
                for (int c = 0; c < CB; c++) mv[c] = load(m + j * ms + c0 + c * L);
                for (int r = 0; r < 4; r++) {
                    const float pv = p[(r0 + r) * Tp + j];
                    for (int c = 0; c < CB; c++) acc[r][c] += pv * mv[c];
                }
            }
            for (int r = 0; r < 4 && r0 + r < rows; r++)
                for (int c = 0; c < CB; c++)
                    store(out + (r0 + r) * os + c0 + c * L, acc[r][c] * factor[r0 + r]);
        }
    }
}

// acc[j] += sum_{r < QB} p[r][j] a[r] for j < n (rows of a and acc D floats; p's rows past the
// block's are zeros).
template <int D>
static void outer_add(const float* p, int64_t Tp, const float* a, int64_t n, float* acc) {
    for (int64_t j0 = 0; j0 < n; j0 += 4)
        for (int c0 = 0; c0 < D; c0 += CB * L) {
            vec s[4][CB] = {};
            for (int r = 0; r < QB; r++) {
                vec av[CB];
                for (int c = 0; c < CB; c++) av[c] = load(a + r * D + c0 + c * L);
                for (int jj = 0; jj < 4; jj++) {
                    const float pv = p[r * Tp + j0 + jj];
                    for (int c = 0; c < CB; c++) s[jj][c] += pv * av[c];
                }
            }
            for (int jj = 0; jj < 4 && j0 + jj < n; jj++)
                for (int c = 0; c < CB; c++) {
                    float* at = acc + (j0 + jj) * D + c0 + c * L;
                    store(at, load(at) + s[jj][c]);
                }
        }
}

// The block's rows of x (B, T, heads, D) at (b, i0, h), times `factor`, into a (QB, D);
// zeros past `rows`.
template <int D>
static void gather(const float* x, int64_t heads, int64_t b, int64_t T, int64_t i0, int64_t h,
                   int rows, float factor, float* a) {
    for (int r = 0; r < QB; r++)
        for (int d = 0; d < D; d += L)
            store(a + r * D + d,
                  r < rows ? load(x + ((b * T + i0 + r) * heads + h) * D + d) * factor : vec{});
}

// A row of the key bias, padded with zeros to Tp.
static void keys(const float* bias, int64_t T, int64_t Tp, float* row) {
    std::memcpy(row, bias, sizeof(float) * T);
    for (int64_t j = T; j < Tp; j++) row[j] = 0.f;
}

template <int D>
static void forward(const float* q, const float* k, const float* v, const float* bias,
                    float* o, float* lse, int64_t B, int64_t T, int64_t S, int64_t H,
                    int64_t Hkv) {
    const int64_t G = H / Hkv, blocks = (T + QB - 1) / QB, Sp = (S + L - 1) / L * L;
    const int64_t at = S - T;  // the key position of query 0
    const float scale = 1.0f / std::sqrt((float)D);
    #pragma omp parallel
    {
        float* kt = new float[D * Sp];
        float* s = new float[QB * Sp];
        float* brow = bias ? new float[Sp] : nullptr;  // this row's bias, zeros past S
        float qs[QB * D], inv[QB];
        int64_t cur = -1;  // the key/value head whose K^T is in kt
        // Blocks of one head are consecutive tasks, the later (longer) blocks first.
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H * blocks; task++) {
            const int64_t bh = task / blocks, b = bh / H, h = bh % H, hk = h / G;
            const int64_t i0 = (blocks - 1 - task % blocks) * QB;
            const int rows = T - i0 < QB ? T - i0 : QB;
            const int64_t n = (at + i0 + rows + L - 1) / L * L;  // keys it sees, rounded up
            if (cur != b * Hkv + hk) {
                cur = b * Hkv + hk;
                transpose<D>(k + (b * S * Hkv + hk) * D, Hkv * D, S, Sp, kt);
                if (bias) keys(bias + b * S, S, Sp, brow);
            }
            gather<D>(q, H, b, T, i0, h, rows, scale, qs);
            scores<D>(qs, kt, Sp, n, at + i0, true, brow, s);
            for (int r = 0; r < rows; r++) {
                float* row = s + r * Sp;
                vec mv = splat(-INFINITY);
                for (int64_t j = 0; j < n; j += L) {  // the row's max (a NaN score is skipped
                    vec x = load(row + j);           // here, and makes its e and the sum NaN)
                    mv = x > mv ? x : mv;
                }
                float m = mv[0];
                for (int c = 1; c < L; c++) m = mv[c] > m ? mv[c] : m;
                vec sum = {};
                for (int64_t j = 0; j < n; j += L) {
                    vec e = vexp_nonpositive(load(row + j) - m);  // 0 where masked (-inf)
                    store(row + j, e);
                    sum += e;
                }
                float l = 0;
                for (int c = 0; c < L; c++) l += sum[c];
                inv[r] = 1.0f / l;  // P = e / l, applied to the output rows
                lse[bh * T + i0 + r] = m + std::log(l);
            }
            rows_times<D>(s, Sp, v + (b * S * Hkv + hk) * D, Hkv * D, at + i0, rows, inv,
                          o + ((b * T + i0) * H + h) * D, H * D);
        }
        delete[] kt;
        delete[] s;
        delete[] brow;
    }
}

template <int D>
static void backward(const float* q, const float* k, const float* v, const float* bias,
                     const float* o, const float* lse, const float* dout, float* dq, float* dk,
                     float* dv, int64_t B, int64_t T, int64_t S, int64_t H, int64_t Hkv) {
    const int64_t G = H / Hkv, Sp = (S + L - 1) / L * L;
    const int64_t at = S - T;  // the key position of query 0
    const float scale = 1.0f / std::sqrt((float)D);
    float scales[QB];
    for (int r = 0; r < QB; r++) scales[r] = scale;
    #pragma omp parallel
    {
        float* kt = new float[D * Sp];
        float* vt = new float[D * Sp];
        float* p = new float[QB * Sp];
        float* ds = new float[QB * Sp];
        float* dk_sum = new float[Sp * D];
        float* dv_sum = new float[Sp * D];
        float* brow = bias ? new float[Sp] : nullptr;
        float qs[QB * D], dos[QB * D], di[QB];
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            const int64_t b = task / Hkv, hk = task % Hkv;
            transpose<D>(k + (b * S * Hkv + hk) * D, Hkv * D, S, Sp, kt);
            transpose<D>(v + (b * S * Hkv + hk) * D, Hkv * D, S, Sp, vt);
            if (bias) keys(bias + b * S, S, Sp, brow);
            std::memset(dk_sum, 0, sizeof(float) * Sp * D);
            std::memset(dv_sum, 0, sizeof(float) * Sp * D);
            for (int64_t h = hk * G; h < (hk + 1) * G; h++)
                for (int64_t i0 = 0; i0 < T; i0 += QB) {
                    const int rows = T - i0 < QB ? T - i0 : QB;
                    const int64_t nk = at + i0 + rows, n = (nk + L - 1) / L * L;
                    gather<D>(q, H, b, T, i0, h, rows, scale, qs);
                    gather<D>(dout, H, b, T, i0, h, rows, 1.0f, dos);
                    for (int r = 0; r < QB; r++) {  // rowsum(dO O)
                        vec acc = {};
                        if (r < rows) {
                            const float* orow = o + ((b * T + i0 + r) * H + h) * D;
                            for (int d = 0; d < D; d += L)
                                acc += load(dos + r * D + d) * load(orow + d);
                        }
                        di[r] = 0;
                        for (int c = 0; c < L; c++) di[r] += acc[c];
                    }
                    scores<D>(qs, kt, Sp, n, at + i0, true, brow, p);
                    scores<D>(dos, vt, Sp, n, at + i0, false, nullptr, ds);
                    for (int r = 0; r < QB; r++) {
                        const float m = r < rows ? lse[(b * H + h) * T + i0 + r] : 0.f;
                        for (int64_t j = 0; j < n; j += L) {
                            vec x = load(p + r * Sp + j);
                            vec e = vexp_nonpositive(x - m);  // 0 where masked (-inf)
                            if (r >= rows) e = vec{};  // rows past T
                            store(p + r * Sp + j, e);
                            store(ds + r * Sp + j, e * (load(ds + r * Sp + j) - di[r]));
                        }
                    }
                    rows_times<D>(ds, Sp, k + (b * S * Hkv + hk) * D, Hkv * D, at + i0, rows,
                                  scales, dq + ((b * T + i0) * H + h) * D, H * D);
                    outer_add<D>(p, Sp, dos, nk, dv_sum);
                    outer_add<D>(ds, Sp, qs, nk, dk_sum);  // qs carries the 1 / sqrt(D)
                }
            for (int64_t j = 0; j < S; j++) {
                std::memcpy(dk + ((b * S + j) * Hkv + hk) * D, dk_sum + j * D, sizeof(float) * D);
                std::memcpy(dv + ((b * S + j) * Hkv + hk) * D, dv_sum + j * D, sizeof(float) * D);
            }
        }
        delete[] kt;
        delete[] vt;
        delete[] p;
        delete[] ds;
        delete[] dk_sum;
        delete[] dv_sum;
        delete[] brow;
    }
}

extern "C" void minirm_attention(const float* q, const float* k, const float* v,
                                 const float* bias, float* o, float* lse, int64_t B, int64_t T,
                                 int64_t S, int64_t H, int64_t Hkv, int64_t D) {
    if (D == 64) forward<64>(q, k, v, bias, o, lse, B, T, S, H, Hkv);
    else forward<128>(q, k, v, bias, o, lse, B, T, S, H, Hkv);
}

extern "C" void minirm_attention_backward(const float* q, const float* k, const float* v,
                                          const float* bias, const float* o, const float* lse,
                                          const float* dout, float* dq, float* dk, float* dv,
                                          int64_t B, int64_t T, int64_t S, int64_t H,
                                          int64_t Hkv, int64_t D) {
    if (D == 64) backward<64>(q, k, v, bias, o, lse, dout, dq, dk, dv, B, T, S, H, Hkv);
    else backward<128>(q, k, v, bias, o, lse, dout, dq, dk, dv, B, T, S, H, Hkv);
}
