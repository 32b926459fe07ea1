// The diffenergy operator library: schemas and CPU kernels.
//
//   linear_silu_laplacian(h, J, L, W, b) -> (h', J', L')
//   sparse_linear_silu_laplacian(h, vals, feat, coord, L, W, b, n_cols) -> (h', J', L')
//
// One SiLU layer a = silu(W h + b) of forward-Laplacian propagation on the value h
// (B, H_in), C directional derivatives J (B, C, H_in) and the second-order term L
// (B, H_in):  J' = silu'(z) (J W^T),  L' = silu'(z) (L W^T) + silu''(z) sum_c (J W^T)^2.
// The sparse variant takes the input Jacobian as entries vals[:, e] at (feat[e], coord[e])
// and gathers J W^T column by column instead of multiplying a mostly-zero matrix.
//
//   torsion_jet(p, quads, eps, soft) -> (value, jac, lap)
//
// The damped torsion cos/sin features of the energy network with their derivatives over
// the 12 coordinates each torsion touches and their Laplacians (torsion_jet.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "diffenergy_ops.h"
#include "torsion_jet.h"

namespace diffenergy {
namespace {

bool use_avx2() {
#if defined(DIFFENERGY_HAVE_AVX2)
  const char* forced = std::getenv("DIFFENERGY_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

#if defined(DIFFENERGY_HAVE_AVX2)
#define DIFFENERGY_CPU_CALL(avx2, fn, ...) \
  ((avx2) ? isa_avx2::fn(__VA_ARGS__) : isa_default::fn(__VA_ARGS__))
#else
#define DIFFENERGY_CPU_CALL(avx2, fn, ...) ((void)(avx2), isa_default::fn(__VA_ARGS__))
#endif

// Rows per task: enough work per task to amortize scheduling (at least ~32k values).
int64_t grain(int64_t C, int64_t H) {
  const int64_t per_row = std::max<int64_t>(1, (C + 1) * H);
  return std::max<int64_t>(1, 32768 / per_row);
}

Triple linear_silu_laplacian_cpu(const at::Tensor& h, const at::Tensor& J, const at::Tensor& L,
                                 const at::Tensor& W, const at::Tensor& b) {
  check_layer(h, J, L, W, b);
  auto [z, Jz, Lz] = linear_parts(h, J, L, W, b);
  auto h_out = at::empty_like(z);
  auto L_out = at::empty_like(z);
  const int64_t B = z.size(0), H = z.size(1), C = Jz.size(1);
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_silu_laplacian_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* Lzp = Lz.data_ptr<scalar_t>();
    scalar_t* Jp = Jz.data_ptr<scalar_t>();
    scalar_t* hp = h_out.data_ptr<scalar_t>();
    scalar_t* Lp = L_out.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(C, H), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(3 * H);
      DIFFENERGY_CPU_CALL(avx2, silu_rule_rows<scalar_t>, b0, b1, C, H, zp, Jp, Lzp, hp, Lp,
                          scratch.data());
    });
  });
  return {h_out, Jz, L_out};
}

Triple sparse_linear_silu_laplacian_cpu(const at::Tensor& h, const at::Tensor& vals,
                                        const at::Tensor& feat, const at::Tensor& coord,
                                        const at::Tensor& L, const at::Tensor& W,
                                        const at::Tensor& b, int64_t n_cols) {
  auto s = prepare_sparse(h, vals, feat, coord, L, W, b, n_cols);
  const int64_t B = s.B, H = s.H, E = s.E, C = s.C;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(s.z.scalar_type(), "sparse_linear_silu_laplacian_cpu", [&] {
    const scalar_t* vp = s.vals.data_ptr<scalar_t>();
    const int64_t* ptr = s.cols.ptr.data_ptr<int64_t>();
    const int64_t* order = s.cols.order.data_ptr<int64_t>();
    const int64_t* fp = s.feat.data_ptr<int64_t>();
    const scalar_t* wp = s.Wt.data_ptr<scalar_t>();
    const scalar_t* zp = s.z.data_ptr<scalar_t>();
    const scalar_t* Lzp = s.Lz.data_ptr<scalar_t>();
    scalar_t* Jp = s.J_out.data_ptr<scalar_t>();
    scalar_t* hp = s.h_out.data_ptr<scalar_t>();
    scalar_t* Lp = s.L_out.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(C, H), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(3 * H);
      DIFFENERGY_CPU_CALL(avx2, sparse_silu_rows<scalar_t>, b0, b1, C, H, E, vp, ptr, order, fp,
                          wp, zp, Lzp, Jp, hp, Lp, scratch.data());
    });
  });
  return {s.h_out, s.J_out, s.L_out};
}

Triple torsion_jet_cpu(const at::Tensor& p, const at::Tensor& quads, double eps, double soft) {
  auto s = prepare_torsion(p, quads);
  const int64_t B = s.B, N = s.N, Q = s.Q;
  AT_DISPATCH_FLOATING_TYPES(s.p.scalar_type(), "torsion_jet_cpu", [&] {
    const scalar_t* pp = s.p.data_ptr<scalar_t>();
    const int64_t* qp = s.quads.data_ptr<int64_t>();
    scalar_t* vp = s.value.data_ptr<scalar_t>();
    scalar_t* jp = s.jac.data_ptr<scalar_t>();
    scalar_t* lp = s.lap.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps), so = static_cast<scalar_t>(soft);
    at::parallel_for(0, B * Q, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        jet::torsion_item<scalar_t>(i / Q, i % Q, N, Q, pp, qp, e, so, vp, jp, lp);
    });
  });
  return {s.value, s.jac, s.lap};
}

}  // namespace

TORCH_LIBRARY(diffenergy, m) {
  m.def("linear_silu_laplacian(Tensor h, Tensor J, Tensor L, Tensor W, Tensor b) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sparse_linear_silu_laplacian(Tensor h, Tensor vals, Tensor feat, Tensor coord, "
        "Tensor L, Tensor W, Tensor b, int n_cols) -> (Tensor, Tensor, Tensor)");
  m.def("torsion_jet(Tensor p, Tensor quads, float eps, float soft) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(diffenergy, CPU, m) {
  m.impl("linear_silu_laplacian", &linear_silu_laplacian_cpu);
  m.impl("sparse_linear_silu_laplacian", &sparse_linear_silu_laplacian_cpu);
  m.impl("torsion_jet", &torsion_jet_cpu);
}

}  // namespace diffenergy
