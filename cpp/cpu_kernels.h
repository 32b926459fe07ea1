// Raw-pointer CPU loops of the diffenergy operators. cpu_kernels.cpp is compiled once
// per instruction set (plain, and AVX2+FMA where the compiler supports it), each copy in
// its own namespace; diffenergy_ops.cpp picks one at run time. The loops run over rows
// [b0, b1) of the batch so that at::parallel_for can split the batch between threads.
#pragma once

#include <cstdint>

#define DIFFENERGY_DECLARE_CPU_KERNELS(NS)                                                  \
  namespace diffenergy {                                                                    \
  namespace NS {                                                                            \
  /* Activation rule on rows of Jz (B, C, H), in place; scratch holds 3 H values. */        \
  template <typename T>                                                                     \
  void silu_rule_rows(int64_t b0, int64_t b1, int64_t C, int64_t H, const T* z, T* J,       \
                      const T* Lz, T* h_out, T* L_out, T* scratch);                         \
  /* Gather J[b, c, :] = sum over entries e of column c of vals[b, e] W^T[feat[e], :],      \
     then the activation rule, row by row. */                                               \
  template <typename T>                                                                     \
  void sparse_silu_rows(int64_t b0, int64_t b1, int64_t C, int64_t H, int64_t E,            \
                        const T* vals, const int64_t* ptr, const int64_t* order,            \
                        const int64_t* feat, const T* Wt, const T* z, const T* Lz, T* J,    \
                        T* h_out, T* L_out, T* scratch);                                    \
  }                                                                                         \
  }

DIFFENERGY_DECLARE_CPU_KERNELS(isa_default)
DIFFENERGY_DECLARE_CPU_KERNELS(isa_avx2)
