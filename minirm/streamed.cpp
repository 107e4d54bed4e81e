// y = x W^T for a few rows of x, reading each weight once for all of them (minirm/streamed.py):
// the kernel of streamed.h on torch's threads.

#include <omp.h>

#include "streamed.h"

extern "C" void minirm_streamed_product(const float* x, const float* w, float* y, int64_t rows,
                                        int64_t n, int64_t k) {
    // The threads are torch's own: this library links the OpenMP runtime torch has loaded, so
    // torch.set_num_threads applies here too.
    #pragma omp parallel
    streamed_share(x, w, y, rows, n, k, omp_get_thread_num(), omp_get_num_threads());
}
