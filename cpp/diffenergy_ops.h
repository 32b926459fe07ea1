// Shared host-side pieces of the diffenergy operators: input checks, the linear
// parts of a layer (GEMMs through ATen, so MKL/OpenBLAS on CPU and cuBLAS on CUDA),
// and the column-sorted view of a sparse feature Jacobian. Included by the CPU
// (diffenergy_ops.cpp) and CUDA (diffenergy_ops_cuda.cu) implementations.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace diffenergy {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline void check_float(const at::Tensor& x, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "diffenergy: ", name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "diffenergy: ", name, " has dtype ",
              x.scalar_type(), " but h has ", ref.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), "diffenergy: ", name, " is on ", x.device(),
              " but h is on ", ref.device());
}

// h (B, Hin), J (B, C, Hin), L (B, Hin), W (Hout, Hin), b (Hout)
inline void check_layer(const at::Tensor& h, const at::Tensor& J, const at::Tensor& L,
                        const at::Tensor& W, const at::Tensor& b) {
  TORCH_CHECK(h.dim() == 2, "diffenergy: h must have shape (B, H_in), got ", h.sizes());
  TORCH_CHECK(J.dim() == 3 && J.size(0) == h.size(0) && J.size(2) == h.size(1),
              "diffenergy: J must have shape (B, C, H_in) = (", h.size(0), ", C, ", h.size(1),
              "), got ", J.sizes());
  TORCH_CHECK(L.sizes() == h.sizes(), "diffenergy: L must have the shape of h ", h.sizes(),
              ", got ", L.sizes());
  TORCH_CHECK(W.dim() == 2 && W.size(1) == h.size(1),
              "diffenergy: W must have shape (H_out, H_in) with H_in = ", h.size(1), ", got ",
              W.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == W.size(0), "diffenergy: b must have shape (",
              W.size(0), ",), got ", b.sizes());
  check_float(h, "h", h);
  check_float(J, "J", h);
  check_float(L, "L", h);
  check_float(W, "W", h);
  check_float(b, "b", h);
}

// h (B, F), vals (B, E), feat (E,), coord (E,), L (B, F), W (H, F), b (H,)
inline void check_sparse(const at::Tensor& h, const at::Tensor& vals, const at::Tensor& feat,
                         const at::Tensor& coord, const at::Tensor& L, const at::Tensor& W,
                         const at::Tensor& b, int64_t n_cols) {
  TORCH_CHECK(h.dim() == 2, "diffenergy: h must have shape (B, F), got ", h.sizes());
  TORCH_CHECK(vals.dim() == 2 && vals.size(0) == h.size(0),
              "diffenergy: vals must have shape (B, E) with B = ", h.size(0), ", got ",
              vals.sizes());
  TORCH_CHECK(feat.dim() == 1 && feat.size(0) == vals.size(1) && feat.scalar_type() == at::kLong,
              "diffenergy: feat must be an int64 tensor of shape (E,) = (", vals.size(1),
              ",), got ", feat.scalar_type(), " ", feat.sizes());
  TORCH_CHECK(coord.dim() == 1 && coord.size(0) == vals.size(1) &&
                  coord.scalar_type() == at::kLong,
              "diffenergy: coord must be an int64 tensor of shape (E,) = (", vals.size(1),
              ",), got ", coord.scalar_type(), " ", coord.sizes());
  TORCH_CHECK(feat.device() == h.device() && coord.device() == h.device(),
              "diffenergy: feat and coord must be on ", h.device());
  TORCH_CHECK(L.sizes() == h.sizes(), "diffenergy: L must have the shape of h ", h.sizes(),
              ", got ", L.sizes());
  TORCH_CHECK(W.dim() == 2 && W.size(1) == h.size(1),
              "diffenergy: W must have shape (H, F) with F = ", h.size(1), ", got ", W.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == W.size(0), "diffenergy: b must have shape (",
              W.size(0), ",), got ", b.sizes());
  TORCH_CHECK(n_cols >= 0, "diffenergy: n_cols must be >= 0, got ", n_cols);
  check_float(vals, "vals", h);
  check_float(L, "L", h);
  check_float(W, "W", h);
  check_float(b, "b", h);
  if (feat.numel() > 0) {
    TORCH_CHECK(feat.min().item<int64_t>() >= 0 && feat.max().item<int64_t>() < h.size(1),
                "diffenergy: feat entries must lie in [0, ", h.size(1), ")");
    TORCH_CHECK(coord.min().item<int64_t>() >= 0 && coord.max().item<int64_t>() < n_cols,
                "diffenergy: coord entries must lie in [0, n_cols = ", n_cols, ")");
  }
}

// z = h W^T + b, Jz = J W^T (contiguous (B, C, Hout)), Lz = L W^T.
inline Triple linear_parts(const at::Tensor& h, const at::Tensor& J, const at::Tensor& L,
                           const at::Tensor& W, const at::Tensor& b) {
  const auto Wt = W.t();
  auto z = at::addmm(b, h, Wt).contiguous();
  auto Jz = at::matmul(J, Wt).contiguous();
  auto Lz = at::mm(L, Wt).contiguous();
  return {z, Jz, Lz};
}

// Entries of a sparse Jacobian grouped by column: entry order[ptr[c] .. ptr[c+1]) are
// those with coord == c (stable, so sums run in a fixed order).
struct ColumnIndex {
  at::Tensor ptr;    // (n_cols + 1,) int64
  at::Tensor order;  // (E,) int64
};

inline ColumnIndex column_index(const at::Tensor& coord, int64_t n_cols) {
  auto order = at::argsort(coord, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto counts = at::bincount(coord, /*weights=*/{}, /*minlength=*/n_cols);
  auto ptr = at::zeros({n_cols + 1}, coord.options());
  if (n_cols > 0) ptr.narrow(0, 1, n_cols).copy_(at::cumsum(counts, 0));
  return {ptr.contiguous(), order.contiguous()};
}

// Everything a sparse first layer needs besides its kernels: checked inputs, W^T (F, H),
// z = h W^T + b, Lz = L W^T, the column index and the (uninitialized) outputs.
struct SparseLayer {
  at::Tensor Wt, z, Lz, vals, feat, J_out, h_out, L_out;
  ColumnIndex cols;
  int64_t B, H, E, C;
};

inline SparseLayer prepare_sparse(const at::Tensor& h, const at::Tensor& vals,
                                  const at::Tensor& feat, const at::Tensor& coord,
                                  const at::Tensor& L, const at::Tensor& W, const at::Tensor& b,
                                  int64_t n_cols) {
  check_sparse(h, vals, feat, coord, L, W, b, n_cols);
  SparseLayer s;
  s.Wt = W.t().contiguous();
  s.z = at::addmm(b, h, s.Wt).contiguous();
  s.Lz = at::mm(L, s.Wt).contiguous();
  s.cols = column_index(coord, n_cols);
  s.vals = vals.contiguous();
  s.feat = feat.contiguous();
  s.B = s.z.size(0);
  s.H = s.z.size(1);
  s.E = s.vals.size(1);
  s.C = n_cols;
  s.J_out = at::empty({s.B, s.C, s.H}, s.z.options());
  s.h_out = at::empty_like(s.z);
  s.L_out = at::empty_like(s.z);
  return s;
}

// Checked inputs and outputs of torsion_jet: p (B, N, 3), quads (Q, 4) int64 ->
// value (B, 2, Q), jac (B, 2, Q, 12), lap (B, 2, Q) (index 0 cos, 1 sin).
struct TorsionJet {
  at::Tensor p, quads, value, jac, lap;
  int64_t B, N, Q;
};

inline TorsionJet prepare_torsion(const at::Tensor& p, const at::Tensor& quads) {
  TORCH_CHECK(p.dim() == 3 && p.size(2) == 3, "diffenergy: p must have shape (B, N, 3), got ",
              p.sizes());
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
              "diffenergy: p must be float32 or float64, got ", p.scalar_type());
  TORCH_CHECK(quads.dim() == 2 && quads.size(1) == 4 && quads.scalar_type() == at::kLong,
              "diffenergy: quads must be an int64 tensor of shape (Q, 4), got ",
              quads.scalar_type(), " ", quads.sizes());
  TORCH_CHECK(quads.device() == p.device(), "diffenergy: quads must be on ", p.device());
  if (quads.numel() > 0) {
    TORCH_CHECK(quads.min().item<int64_t>() >= 0 && quads.max().item<int64_t>() < p.size(1),
                "diffenergy: quads entries must lie in [0, N = ", p.size(1), ")");
  }
  TorsionJet s;
  s.p = p.contiguous();
  s.quads = quads.contiguous();
  s.B = p.size(0);
  s.N = p.size(1);
  s.Q = quads.size(0);
  s.value = at::empty({s.B, 2, s.Q}, p.options());
  s.jac = at::empty({s.B, 2, s.Q, 12}, p.options());
  s.lap = at::empty({s.B, 2, s.Q}, p.options());
  return s;
}

}  // namespace diffenergy
