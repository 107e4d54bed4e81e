// y = x W^T for a few rows of x, reading each weight once for all of them: the kernel of
// streamed.cpp (minirm/streamed.py) and of the whole decoding step, decode.cpp.
//
// x: (rows, k), W: (n, k) as nn.Linear stores it, y: (rows, n); float32, contiguous.
// Each thread takes W's rows four at a time (outputs o .. o + 3; two for one short row of x,
// below) and, for up to 8 rows of x at a time, keeps 4 x 8 running sums in vector registers
// while it walks the columns (in chunks, below): one load of W serves every row of x, and the
// four W rows give independent chains of adds even for a single row of x. While it reads one
// block of rows it asks the memory system for the next (a prefetch): without that, the hardware
// brought W in at half the speed (measured on a 2-core Xeon, 8 rows: 14 -> 26 GB/s for a 113 MB
// matrix). In 4 KiB pages four rows a block read 4-5% faster than two at 1 to 8 rows of x, with
// 16 or 8 lanes, though 4 x 8 sums fill the registers; in 2 MiB pages two are faster for one
// row of a short W (streamed_share).

#pragma once

#include "vec.h"

// y[r, o .. o + OB) for r < R, from columns begin .. end of x and W, added to what y holds
// unless begin is 0.
template <int R, int OB>
static inline void block(const float* x, const float* w, float* y, int64_t o, int64_t n,
                         int64_t k, int64_t begin, int64_t end) {
    vec acc[R][OB] = {};
    const float* rows = w + o * k;
    const float* next = rows + OB * k;  // the next block's rows
    int64_t i = begin;
    for (; i + L <= end; i += L) {
        vec wv[OB];
        for (int j = 0; j < OB; j++) wv[j] = load(rows + j * k + i);
        for (int j = 0; j < OB; j++) __builtin_prefetch(next + j * k + i, 0, 3);
        for (int r = 0; r < R; r++) {
            vec xv = load(x + r * k + i);
            for (int j = 0; j < OB; j++) acc[r][j] += wv[j] * xv;
        }
    }
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < OB; j++) {
            float s = total(acc[r][j]);
            for (int64_t t = i; t < end; t++) s += rows[j * k + t] * x[r * k + t];
            float* out = y + r * n + o + j;
            *out = begin ? *out + s : s;
        }
    }
}

// All rows of x for outputs o .. o + OB, eight rows at a time (the block's W rows stay in the
// first-level cache between the groups).
template <int OB>
static void outputs(const float* x, const float* w, float* y, int64_t o, int64_t rows,
                    int64_t n, int64_t k, int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; r += 8) {
        const float* xr = x + r * k;
        float* yr = y + r * n;
        switch (rows - r < 8 ? rows - r : 8) {
            case 1: block<1, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 2: block<2, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 3: block<3, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 4: block<4, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 5: block<5, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 6: block<6, OB>(xr, w, yr, o, n, k, begin, end); break;
            case 7: block<7, OB>(xr, w, yr, o, n, k, begin, end); break;
            default: block<8, OB>(xr, w, yr, o, n, k, begin, end); break;
        }
    }
}

// Thread t of `threads` computes its share of y = x W^T: a contiguous range of W's rows, in
// blocks of OB rows.
template <int OB>
static void share(const float* x, const float* w, float* y, int64_t rows, int64_t n, int64_t k,
                  int t, int threads) {
    // Columns are taken in chunks of x that stay in the first-level cache (24 KB of its 48)
    // while the weights stream past: with all 1536 columns of 8 rows (48 KB) at once, SwiGLU's
    // down projection read at 12 GB/s, against 19-23 for the 576-column matrices.
    // Not under 768 columns: for 16 rows, 576 columns in two chunks read slower than in one.
    const int64_t chunk = rows <= 8 ? 6144 / rows / L * L : 768;
    const int64_t blocks = n / OB;
    const int64_t first = blocks * t / threads, last = blocks * (t + 1) / threads;
    for (int64_t begin = 0; begin < k; begin += chunk) {
        const int64_t end = begin + chunk < k ? begin + chunk : k;
        for (int64_t b = first; b < last; b++)
            outputs<OB>(x, w, y, OB * b, rows, n, k, begin, end);
        if (t == threads - 1)  // the last n % OB outputs, one at a time
            for (int64_t o = OB * blocks; o < n; o++)
                outputs<1>(x, w, y, o, rows, n, k, begin, end);
    }
}

// Blocks of two rows for a single row of x and short rows of W: SmolLM2-135M's weights (576 and
// 1536 columns) in 2 MiB pages streamed at one row in 18.1-18.3 ms against 18.9-19.0 with four
// (Xeon, in turns), where at 8 rows four were 2% faster, and at one row of llama-3.2-1b's
// (2048 and 8192 columns) 2% faster too.
static void streamed_share(const float* x, const float* w, float* y, int64_t rows, int64_t n,
                           int64_t k, int t, int threads) {
    if (rows == 1 && k < 2048)
        share<2>(x, w, y, rows, n, k, t, threads);
    else
        share<4>(x, w, y, rows, n, k, t, threads);
}
