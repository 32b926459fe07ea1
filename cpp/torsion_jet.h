// Forward-Laplacian jets of the damped torsion features, shared by the CPU loop
// (diffenergy_ops.cpp) and the CUDA kernel (diffenergy_ops_cuda.cu).
//
// A Jet carries a value, its derivatives along the 12 coordinates of the torsion's four
// atoms and its Laplacian over them. The formula is that of _torsion_cos_sin in
// openmm_diffenergy/models/molecule.py:
//   b1 = b - a, b2 = c - b, b3 = d - c, n1 = b1 x b2, n2 = b2 x b3,
//   m1 = n1 x b2 / sqrt(|b2|^2 + eps^2), x = n1.n2, y = m1.n2,
//   r = sqrt(x^2 + y^2 + eps^4 + soft^2), cos = x / r, sin = y / r.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DIFFENERGY_HD __host__ __device__ inline
#else
#define DIFFENERGY_HD inline
#endif

namespace diffenergy {
namespace jet {

constexpr int kCols = 12;

DIFFENERGY_HD float sqrt_(float x) { return sqrtf(x); }
DIFFENERGY_HD double sqrt_(double x) { return sqrt(x); }

template <typename T>
struct Jet {
  T v;
  T j[kCols];
  T l;
};

template <typename T>
DIFFENERGY_HD Jet<T> add(const Jet<T>& a, const Jet<T>& b, T sign = T(1)) {
  Jet<T> o;
  o.v = a.v + sign * b.v;
  for (int c = 0; c < kCols; ++c) o.j[c] = a.j[c] + sign * b.j[c];
  o.l = a.l + sign * b.l;
  return o;
}

template <typename T>
DIFFENERGY_HD Jet<T> mul(const Jet<T>& a, const Jet<T>& b) {
  Jet<T> o;
  T cross = T(0);
  o.v = a.v * b.v;
  for (int c = 0; c < kCols; ++c) {
    o.j[c] = a.j[c] * b.v + b.j[c] * a.v;
    cross += a.j[c] * b.j[c];
  }
  o.l = a.l * b.v + b.l * a.v + T(2) * cross;
  return o;
}

// f(a) from f, f' and f'' at a.v
template <typename T>
DIFFENERGY_HD Jet<T> apply(const Jet<T>& a, T f, T d1, T d2) {
  Jet<T> o;
  T sq = T(0);
  o.v = f;
  for (int c = 0; c < kCols; ++c) {
    o.j[c] = d1 * a.j[c];
    sq += a.j[c] * a.j[c];
  }
  o.l = d1 * a.l + d2 * sq;
  return o;
}

template <typename T>
DIFFENERGY_HD Jet<T> rsqrt_plus(const Jet<T>& a, T shift) {  // 1 / sqrt(a + shift)
  const T s = sqrt_(a.v + shift);
  const T f = T(1) / s;
  return apply(a, f, T(-0.5) * f * f * f, T(0.75) * f * f * f * f * f);
}

template <typename T>
struct Vec3 {
  Jet<T> x[3];
};

template <typename T>
DIFFENERGY_HD Vec3<T> sub3(const Vec3<T>& a, const Vec3<T>& b) {
  Vec3<T> o;
  for (int k = 0; k < 3; ++k) o.x[k] = add(a.x[k], b.x[k], T(-1));
  return o;
}

template <typename T>
DIFFENERGY_HD Vec3<T> cross3(const Vec3<T>& a, const Vec3<T>& b) {
  Vec3<T> o;
  for (int k = 0; k < 3; ++k) {
    const int i = (k + 1) % 3, m = (k + 2) % 3;
    o.x[k] = add(mul(a.x[i], b.x[m]), mul(a.x[m], b.x[i]), T(-1));
  }
  return o;
}

template <typename T>
DIFFENERGY_HD Jet<T> dot3(const Vec3<T>& a, const Vec3<T>& b) {
  return add(add(mul(a.x[0], b.x[0]), mul(a.x[1], b.x[1])), mul(a.x[2], b.x[2]));
}

// Atom m (0..3) at position q: its coordinates are columns 3m..3m+2.
template <typename T>
DIFFENERGY_HD Vec3<T> atom(const T* q, int m) {
  Vec3<T> o;
  for (int k = 0; k < 3; ++k) {
    o.x[k].v = q[k];
    for (int c = 0; c < kCols; ++c) o.x[k].j[c] = T(0);
    o.x[k].j[3 * m + k] = T(1);
    o.x[k].l = T(0);
  }
  return o;
}

// cos and sin of one torsion with derivatives over the 12 coordinates of (a, b, c, d).
template <typename T>
DIFFENERGY_HD void torsion(const T* a, const T* b, const T* c, const T* d, T eps, T soft,
                           Jet<T>& cos_out, Jet<T>& sin_out) {
  const Vec3<T> pa = atom(a, 0), pb = atom(b, 1), pc = atom(c, 2), pd = atom(d, 3);
  const Vec3<T> b1 = sub3(pb, pa), b2 = sub3(pc, pb), b3 = sub3(pd, pc);
  const Vec3<T> n1 = cross3(b1, b2), n2 = cross3(b2, b3);
  const Jet<T> inv = rsqrt_plus(dot3(b2, b2), eps * eps);
  Vec3<T> b2n;
  for (int k = 0; k < 3; ++k) b2n.x[k] = mul(b2.x[k], inv);
  const Vec3<T> m1 = cross3(n1, b2n);
  const Jet<T> x = dot3(n1, n2), y = dot3(m1, n2);
  const Jet<T> inv_r = rsqrt_plus(add(mul(x, x), mul(y, y)), eps * eps * eps * eps + soft * soft);
  cos_out = mul(x, inv_r);
  sin_out = mul(y, inv_r);
}

// Writes the features of torsion q of sample b: value[b, s, q], jac[b, s, q, :],
// lap[b, s, q] for s = 0 (cos) and 1 (sin); p is (B, N, 3), quads (Q, 4).
template <typename T>
DIFFENERGY_HD void torsion_item(int64_t b, int64_t q, int64_t N, int64_t Q, const T* p,
                                const int64_t* quads, T eps, T soft, T* value, T* jac, T* lap) {
  const T* pb = p + b * N * 3;
  const int64_t* iq = quads + q * 4;
  Jet<T> out[2];
  torsion(pb + 3 * iq[0], pb + 3 * iq[1], pb + 3 * iq[2], pb + 3 * iq[3], eps, soft, out[0],
          out[1]);
  for (int s = 0; s < 2; ++s) {
    const int64_t o = (b * 2 + s) * Q + q;
    value[o] = out[s].v;
    lap[o] = out[s].l;
    for (int c = 0; c < kCols; ++c) jac[o * kCols + c] = out[s].j[c];
  }
}

}  // namespace jet
}  // namespace diffenergy
