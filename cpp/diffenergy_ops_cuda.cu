// CUDA kernels of the diffenergy operators (schemas in diffenergy_ops.cpp). The linear
// parts run through ATen (cuBLAS); the activation rule, the sparse first-layer gather and
// the torsion feature jets are kernels here, launched on the current stream of the
// inputs' device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "diffenergy_ops.h"
#include "torsion_jet.h"

namespace diffenergy {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGridY = 65535;

// One thread per (sample b, unit i): silu, and the sum over the C columns of Jz^2 read
// down column i of sample b (neighbouring threads read neighbouring units: coalesced).
template <typename T>
__global__ void silu_rule_kernel(int64_t B, int64_t C, int64_t H, const T* __restrict__ z,
                                 T* __restrict__ J, const T* __restrict__ Lz,
                                 T* __restrict__ h_out, T* __restrict__ L_out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= H) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T zz = z[b * H + i];
    const T s = T(1) / (T(1) + exp(-zz));
    const T d1 = s * (T(1) + zz * (T(1) - s));
    const T d2 = s * (T(1) - s) * (T(2) + zz * (T(1) - T(2) * s));
    T acc = T(0);
    T* col = J + b * C * H + i;
    for (int64_t c = 0; c < C; ++c) {
      const T v = col[c * H];
      acc += v * v;
      col[c * H] = d1 * v;
    }
    h_out[b * H + i] = zz * s;
    L_out[b * H + i] = d1 * Lz[b * H + i] + d2 * acc;
  }
}

// One block per (column c, sample b): J[b, c, :] = sum over the entries of column c of
// vals[b, e] * W^T[feat[e], :], in the fixed order of the column index (deterministic).
template <typename T>
__global__ void sparse_gather_kernel(int64_t B, int64_t C, int64_t H, int64_t E,
                                     const T* __restrict__ vals, const int64_t* __restrict__ ptr,
                                     const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ feat, const T* __restrict__ Wt,
                                     T* __restrict__ J) {
  const int64_t c = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      T acc = T(0);
      for (int64_t e = ptr[c]; e < ptr[c + 1]; ++e) {
        const int64_t k = order[e];
        acc += vals[b * E + k] * Wt[feat[k] * H + i];
      }
      J[(b * C + c) * H + i] = acc;
    }
  }
}

// One thread per (sample, torsion).
template <typename T>
__global__ void torsion_jet_kernel(int64_t B, int64_t N, int64_t Q, const T* __restrict__ p,
                                   const int64_t* __restrict__ quads, T eps, T soft,
                                   T* __restrict__ value, T* __restrict__ jac,
                                   T* __restrict__ lap) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B * Q;
       i += stride)
    jet::torsion_item<T>(i / Q, i % Q, N, Q, p, quads, eps, soft, value, jac, lap);
}

void launch_silu_rule(const at::Tensor& z, at::Tensor& Jz, const at::Tensor& Lz,
                      at::Tensor& h_out, at::Tensor& L_out) {
  const int64_t B = z.size(0), H = z.size(1), C = Jz.size(1);
  if (B == 0 || H == 0) return;
  const dim3 grid(static_cast<unsigned>((H + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min(B, kMaxGridY)));
  auto stream = c10::cuda::getCurrentCUDAStream(z.device().index());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "silu_rule_kernel", [&] {
    silu_rule_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        B, C, H, z.data_ptr<scalar_t>(), Jz.data_ptr<scalar_t>(), Lz.data_ptr<scalar_t>(),
        h_out.data_ptr<scalar_t>(), L_out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Triple linear_silu_laplacian_cuda(const at::Tensor& h, const at::Tensor& J, const at::Tensor& L,
                                  const at::Tensor& W, const at::Tensor& b) {
  check_layer(h, J, L, W, b);
  const c10::cuda::CUDAGuard guard(h.device());
  auto [z, Jz, Lz] = linear_parts(h, J, L, W, b);
  auto h_out = at::empty_like(z);
  auto L_out = at::empty_like(z);
  launch_silu_rule(z, Jz, Lz, h_out, L_out);
  return {h_out, Jz, L_out};
}

Triple sparse_linear_silu_laplacian_cuda(const at::Tensor& h, const at::Tensor& vals,
                                         const at::Tensor& feat, const at::Tensor& coord,
                                         const at::Tensor& L, const at::Tensor& W,
                                         const at::Tensor& b, int64_t n_cols) {
  const c10::cuda::CUDAGuard guard(h.device());
  auto s = prepare_sparse(h, vals, feat, coord, L, W, b, n_cols);
  if (s.B > 0 && s.C > 0 && s.H > 0) {
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(std::min(s.B, kMaxGridY)));
    auto stream = c10::cuda::getCurrentCUDAStream(h.device().index());
    AT_DISPATCH_FLOATING_TYPES(s.z.scalar_type(), "sparse_gather_kernel", [&] {
      sparse_gather_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          s.B, s.C, s.H, s.E, s.vals.data_ptr<scalar_t>(), s.cols.ptr.data_ptr<int64_t>(),
          s.cols.order.data_ptr<int64_t>(), s.feat.data_ptr<int64_t>(),
          s.Wt.data_ptr<scalar_t>(), s.J_out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  launch_silu_rule(s.z, s.J_out, s.Lz, s.h_out, s.L_out);
  return {s.h_out, s.J_out, s.L_out};
}

Triple torsion_jet_cuda(const at::Tensor& p, const at::Tensor& quads, double eps, double soft) {
  const c10::cuda::CUDAGuard guard(p.device());
  auto s = prepare_torsion(p, quads);
  const int64_t items = s.B * s.Q;
  if (items > 0) {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads,
                                                                1 << 16));
    auto stream = c10::cuda::getCurrentCUDAStream(p.device().index());
    AT_DISPATCH_FLOATING_TYPES(s.p.scalar_type(), "torsion_jet_kernel", [&] {
      torsion_jet_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          s.B, s.N, s.Q, s.p.data_ptr<scalar_t>(), s.quads.data_ptr<int64_t>(),
          static_cast<scalar_t>(eps), static_cast<scalar_t>(soft), s.value.data_ptr<scalar_t>(),
          s.jac.data_ptr<scalar_t>(), s.lap.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {s.value, s.jac, s.lap};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffenergy, CUDA, m) {
  m.impl("linear_silu_laplacian", &linear_silu_laplacian_cuda);
  m.impl("sparse_linear_silu_laplacian", &sparse_linear_silu_laplacian_cuda);
  m.impl("torsion_jet", &torsion_jet_cuda);
}

}  // namespace diffenergy
