// The maths of the bucket ops, written once for every compiled backend.
//
// The CPU kernels (cpu/bucket_ops.cpp) and the CUDA kernels (cuda/bucket_ops.cu) both call these
// inline functions, so the CPU tests run the arithmetic the GPU runs. The specification they are
// tested against is fused_lesam/backends/reference.py (DESIGN.md §1).
//
// `acc_t` is the type the arithmetic is done in: float for fp32/fp16/bf16 buckets, double for
// fp64 ones. Values are loaded from the bucket's dtype, computed in acc_t, rounded back once.
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fused_lesam {
namespace math {

// Added to the norm before dividing by it: eps = rho_t * g / (||g|| + 1e-12).
constexpr double kNormEps = 1e-12;

// Elements per partial of the squared-norm reduction. Fixed (not per thread or per block), so
// the partials, and hence the bits of the result, do not depend on thread count or GPU size.
constexpr int64_t kReduceChunk = 16384;

FL_HOST_DEVICE float sqrt_(float x) { return ::sqrtf(x); }
FL_HOST_DEVICE double sqrt_(double x) { return ::sqrt(x); }

// True for finite x; false for inf and NaN (inf - inf and NaN - NaN are NaN, and NaN != 0).
template <typename acc_t>
FL_HOST_DEVICE bool is_finite(acc_t x) {
  return x - x == acc_t(0);
}

// One element's contribution to the squared norm: g^2, or (|w| g)^2 in adaptive (ASAM) groups.
template <typename acc_t>
FL_HOST_DEVICE acc_t sq_term(acc_t g) {
  return g * g;
}
template <typename acc_t>
FL_HOST_DEVICE acc_t sq_term(acc_t g, acc_t w) {
  const acc_t x = g * w;  // (|w| g)^2 = (w g)^2
  return x * x;
}

// The radius back-solve, from the global squared norm `sq`:
//   rho_t = min(sigma / (n + varrho), rho_max),  scale = rho_t / (n + 1e-12),  n = sqrt(sq).
// sigma = inf is SAM's fixed radius rho_max. A zero norm gives scale 0 (eps = 0 exactly, whatever
// varrho); a non-finite norm gives rho_t = 0, scale 0 and finite = false: leave w untouched.
template <typename acc_t>
struct Radius {
  acc_t rho;
  acc_t scale;
  bool finite;
};

template <typename acc_t>
FL_HOST_DEVICE Radius<acc_t> radius(acc_t sq, acc_t sigma, acc_t rho_max, acc_t varrho) {
  const acc_t norm = sqrt_(sq);
  Radius<acc_t> r{acc_t(0), acc_t(0), is_finite(norm)};
  if (!r.finite) {
    return r;
  }
  const acc_t rho = sigma / (norm + varrho);
  r.rho = rho < rho_max ? rho : rho_max;  // inf / finite = inf, so sigma = inf gives rho_max
  r.scale = norm > acc_t(0) ? r.rho / (norm + acc_t(kNormEps)) : acc_t(0);
  return r;
}

// w + eps, with eps = scale * g, or scale * w^2 g in adaptive groups.
template <typename acc_t>
FL_HOST_DEVICE acc_t perturbed(acc_t w, acc_t g, acc_t scale, bool adaptive) {
  const acc_t direction = adaptive ? w * w * g : g;
  return w + direction * scale;
}

// The LE-SAM+ gradient: ghat_coef * g_hat - center_coef * g (paper: 1 + alpha and alpha).
template <typename acc_t>
FL_HOST_DEVICE acc_t combined(acc_t ghat, acc_t center, acc_t ghat_coef, acc_t center_coef) {
  return ghat * ghat_coef - center * center_coef;
}

// XSAM: one element's terms of the three reductions [D^2, g^2, D g], D = w_k - w_0.
template <typename acc_t>
struct Dots {
  acc_t dd, gg, dg;
};

template <typename acc_t>
FL_HOST_DEVICE Dots<acc_t> dots_term(acc_t delta, acc_t g) {
  return {delta * delta, g * g, delta * g};
}

// XSAM's update gradient ||g_hat|| d(alpha), or a probe's step rho_max d(alpha), as c0 D + c1 g:
// the slerp coefficients c0, c1 are computed on the device from the dots, once per call.
template <typename acc_t>
FL_HOST_DEVICE acc_t slerped(acc_t delta, acc_t g, acc_t c0, acc_t c1) {
  return delta * c0 + g * c1;
}

}  // namespace math
}  // namespace fused_lesam
