// CPU loops of the diffenergy operators, written over contiguous rows so that the
// compiler vectorizes the inner loops (over the hidden units). This file includes no
// torch header and calls only C library functions: it is compiled once per instruction
// set (DIFFENERGY_ISA_NS names the copy), and nothing in it may be shared with the copy
// built for another instruction set.
#include <math.h>

#include "cpu_kernels.h"

#ifndef DIFFENERGY_ISA_NS
#define DIFFENERGY_ISA_NS isa_default
#endif

namespace diffenergy {
namespace DIFFENERGY_ISA_NS {
namespace {

inline float exp_(float x) { return expf(x); }
inline double exp_(double x) { return exp(x); }

// silu(z), silu'(z) and silu''(z) of one row; d1, d2 and acc live in scratch.
template <typename T>
inline void row_prelude(int64_t H, const T* z, T* h_out, T* d1, T* d2, T* acc) {
  for (int64_t i = 0; i < H; ++i) {
    const T zz = z[i];
    const T s = T(1) / (T(1) + exp_(-zz));
    h_out[i] = zz * s;
    d1[i] = s * (T(1) + zz * (T(1) - s));
    d2[i] = s * (T(1) - s) * (T(2) + zz * (T(1) - T(2) * s));
    acc[i] = T(0);
  }
}

// acc += col^2, col *= d1 (one column of one sample).
template <typename T>
inline void scale_column(int64_t H, T* __restrict__ col, const T* __restrict__ d1,
                         T* __restrict__ acc) {
  for (int64_t i = 0; i < H; ++i) {
    const T v = col[i];
    acc[i] += v * v;
    col[i] = d1[i] * v;
  }
}

template <typename T>
inline void row_finish(int64_t H, const T* Lz, const T* d1, const T* d2, const T* acc,
                       T* L_out) {
  for (int64_t i = 0; i < H; ++i) L_out[i] = d1[i] * Lz[i] + d2[i] * acc[i];
}

}  // namespace

template <typename T>
void silu_rule_rows(int64_t b0, int64_t b1, int64_t C, int64_t H, const T* z, T* J,
                    const T* Lz, T* h_out, T* L_out, T* scratch) {
  T* d1 = scratch;
  T* d2 = scratch + H;
  T* acc = scratch + 2 * H;
  for (int64_t b = b0; b < b1; ++b) {
    row_prelude(H, z + b * H, h_out + b * H, d1, d2, acc);
    T* Jb = J + b * C * H;
    for (int64_t c = 0; c < C; ++c) scale_column(H, Jb + c * H, d1, acc);
    row_finish(H, Lz + b * H, d1, d2, acc, L_out + b * H);
  }
}

template <typename T>
void sparse_silu_rows(int64_t b0, int64_t b1, int64_t C, int64_t H, int64_t E,
                      const T* vals, const int64_t* ptr, const int64_t* order,
                      const int64_t* feat, const T* Wt, const T* z, const T* Lz, T* J,
                      T* h_out, T* L_out, T* scratch) {
  T* d1 = scratch;
  T* d2 = scratch + H;
  T* acc = scratch + 2 * H;
  for (int64_t b = b0; b < b1; ++b) {
    row_prelude(H, z + b * H, h_out + b * H, d1, d2, acc);
    const T* vb = vals + b * E;
    for (int64_t c = 0; c < C; ++c) {
      T* __restrict__ col = J + (b * C + c) * H;
      for (int64_t i = 0; i < H; ++i) col[i] = T(0);
      for (int64_t e = ptr[c]; e < ptr[c + 1]; ++e) {
        const int64_t k = order[e];
        const T v = vb[k];
        const T* __restrict__ w = Wt + feat[k] * H;
        for (int64_t i = 0; i < H; ++i) col[i] += v * w[i];
      }
      scale_column(H, col, d1, acc);
    }
    row_finish(H, Lz + b * H, d1, d2, acc, L_out + b * H);
  }
}

#define DIFFENERGY_INSTANTIATE(T)                                                           \
  template void silu_rule_rows<T>(int64_t, int64_t, int64_t, int64_t, const T*, T*,         \
                                  const T*, T*, T*, T*);                                    \
  template void sparse_silu_rows<T>(int64_t, int64_t, int64_t, int64_t, int64_t, const T*,  \
                                    const int64_t*, const int64_t*, const int64_t*,         \
                                    const T*, const T*, const T*, T*, T*, T*, T*);
DIFFENERGY_INSTANTIATE(float)
DIFFENERGY_INSTANTIATE(double)

}  // namespace DIFFENERGY_ISA_NS
}  // namespace diffenergy
