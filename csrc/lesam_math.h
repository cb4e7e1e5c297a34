// The maths of the bucket ops, written once for every compiled backend.
//
// The CPU kernels (cpu/bucket_ops.cpp) and the CUDA kernels (cuda/bucket_ops.cu) both call these
// inline functions, so the CPU tests run the arithmetic the GPU runs. The specification they are
// tested against is fused_lesam/backends/spec.py (docs/design.md §1).
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
  // inf / finite = inf, so sigma = inf gives rho_max. A NaN rho stays NaN, as torch.clamp(max=)
  // keeps it in the torch backend (`rho < rho_max ? rho : rho_max` would turn it into rho_max).
  r.rho = rho > rho_max ? rho_max : rho;
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

// LookSAM: one element's terms of [g_hat g, g^2] (g_hat: the gradient at the perturbed point, g:
// the first one); g_v = g_hat - c g, the part of g_hat orthogonal to g; the reuse step's gradient
// g + c g_v.
template <typename acc_t>
struct LookDots {
  acc_t hg, gg;
};

template <typename acc_t>
FL_HOST_DEVICE LookDots<acc_t> look_dots_term(acc_t ghat, acc_t g) {
  return {ghat * g, g * g};
}

template <typename acc_t>
FL_HOST_DEVICE acc_t look_dir(acc_t ghat, acc_t g, acc_t coef) {
  return ghat - g * coef;
}

template <typename acc_t>
FL_HOST_DEVICE acc_t look_added(acc_t g, acc_t dir, acc_t coef) {
  return g + dir * coef;
}

// ------------------------------------------------------ the base update, fused into the restore
// One element of torch.optim.SGD / Adam / AdamW's step taken from the saved weights w0, with the
// final gradient (specification: sgd_step_ / adam_step_ in spec.py). State values are rounded
// to the bucket's dtype (scalar_t) once when stored, and the rest of the step uses the stored
// value, as torch's later reads of its state do. Scalars that are 1 - x or a product of two
// hyperparameters are formed in double on the host, as the spec's Python floats are.

// The gradient the base optimizer steps with: the LE-SAM+ combine (with a center), then maximize.
template <bool with_center, typename acc_t>
FL_HOST_DEVICE acc_t step_grad(acc_t ghat, acc_t center, acc_t ghat_coef, acc_t center_coef, bool maximize) {
  acc_t g = ghat;
  if constexpr (with_center) {
    g = combined(ghat, center, ghat_coef, center_coef);
  }
  return g * (maximize ? acc_t(-1) : acc_t(1));  // a product, not a branch: the CPU loops vectorise
}

// Weight decay in the gradient (torch's L2 form): g + weight_decay * w0 when `decay`, else g.
template <typename acc_t>
FL_HOST_DEVICE acc_t decayed(acc_t g, acc_t w0, bool decay, acc_t weight_decay) {
  return decay ? g + w0 * weight_decay : g;
}

// torch.lerp's two-branch form (ATen's): a + w (b - a) for small weights, b - (b - a)(1 - w) for
// large ones, so that the result is exact at both ends. Written as one expression, bit for bit the
// same: w - 1 = -(1 - w) exactly, so the large-weight form is b + (w - 1)(b - a). The branch and
// the coefficient depend on the weight only, so they are made once per call (lerp_weight) and each
// element is a select and a multiply-add, which loops vectorise.
template <typename acc_t>
struct LerpWeight {
  bool from_end;  // weight >= 0.5: start from b
  acc_t coef;     // weight, or weight - 1 from b
};

template <typename acc_t>
FL_HOST_DEVICE LerpWeight<acc_t> lerp_weight(acc_t weight) {
  const bool from_end = !(weight < acc_t(0.5));
  return {from_end, from_end ? weight - acc_t(1) : weight};
}

template <typename acc_t>
FL_HOST_DEVICE acc_t lerp(acc_t a, acc_t b, LerpWeight<acc_t> weight) {
  return (weight.from_end ? b : a) + weight.coef * (b - a);
}

// torch.maximum: NaN in either argument gives NaN. `|`, not `||`: no branch, so loops vectorise.
template <typename acc_t>
FL_HOST_DEVICE acc_t maximum(acc_t a, acc_t b) {
  const bool take_a = (a > b) | (a != a);
  return take_a ? a : b;
}

template <typename acc_t>
struct SgdCoefs {
  acc_t lr;
  acc_t momentum;
  acc_t dampening_keep;  // 1 - dampening
  acc_t weight_decay;
  bool decay;  // weight_decay != 0, decided on the double (w0 * 0 is NaN for a non-finite w0)
  bool nesterov;
  bool init_buffer;  // torch's first step of a parameter: the buffer starts as a copy of g
};

// From the op's arguments (doubles): 1 - dampening is formed in double, as the spec's Python float.
template <typename acc_t>
FL_HOST_DEVICE SgdCoefs<acc_t> sgd_coefs(double lr, double momentum, double dampening, double weight_decay,
                                         bool nesterov, bool init_buffer) {
  SgdCoefs<acc_t> c;
  c.lr = static_cast<acc_t>(lr);
  c.momentum = static_cast<acc_t>(momentum);
  c.dampening_keep = static_cast<acc_t>(1.0 - dampening);
  c.weight_decay = static_cast<acc_t>(weight_decay);
  c.decay = weight_decay != 0.0;
  c.nesterov = nesterov;
  c.init_buffer = init_buffer;
  return c;
}

// The new weight w0 - lr d; with momentum, `buf` holds the stored buffer on entry and the new one,
// rounded, on exit (`buf` is not touched without momentum).
template <bool with_momentum, typename scalar_t, typename acc_t>
FL_HOST_DEVICE acc_t sgd_update(acc_t w0, acc_t g, scalar_t& buf, const SgdCoefs<acc_t>& c) {
  g = decayed(g, w0, c.decay, c.weight_decay);
  acc_t d = g;
  if constexpr (with_momentum) {
    buf = static_cast<scalar_t>(c.init_buffer ? g : static_cast<acc_t>(buf) * c.momentum + g * c.dampening_keep);
    const acc_t b = static_cast<acc_t>(buf);
    d = c.nesterov ? g + b * c.momentum : b;
  }
  return w0 - d * c.lr;
}

template <typename acc_t>
struct AdamCoefs {
  LerpWeight<acc_t> beta1_weight;  // the lerp's weight, 1 - beta1
  acc_t beta2;
  acc_t beta2_keep;  // 1 - beta2
  acc_t eps;
  acc_t weight_decay;  // L2 decay (Adam): g + weight_decay w0, when l2_decay
  acc_t decay_factor;  // decoupled decay (AdamW): w0 (1 - lr weight_decay); else 1, which is exact
  bool l2_decay;
  acc_t step_size;   // lr / (1 - beta1^t), from adam_bias_corrections
  acc_t bias2_sqrt;  // sqrt(1 - beta2^t)
};

// From the op's arguments, all but the bias corrections (which depend on the step, read later).
template <typename acc_t>
FL_HOST_DEVICE AdamCoefs<acc_t> adam_coefs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                           bool decoupled_weight_decay) {
  AdamCoefs<acc_t> c;
  c.beta1_weight = lerp_weight(static_cast<acc_t>(1.0 - beta1));
  c.beta2 = static_cast<acc_t>(beta2);
  c.beta2_keep = static_cast<acc_t>(1.0 - beta2);
  c.eps = static_cast<acc_t>(eps);
  c.weight_decay = static_cast<acc_t>(weight_decay);
  const bool decoupled_decay = weight_decay != 0.0 && decoupled_weight_decay;
  c.decay_factor = decoupled_decay ? static_cast<acc_t>(1.0 - lr * weight_decay) : acc_t(1);
  c.l2_decay = weight_decay != 0.0 && !decoupled_weight_decay;
  c.step_size = acc_t(0);
  c.bias2_sqrt = acc_t(1);
  return c;
}

// Adam's bias corrections for step t, in double (in float, 1 - beta2^t loses most of its digits
// for beta2 = 0.999 and small t), then rounded to acc_t as the spec does. On the GPU t is read from
// device memory, so every thread computes these itself (two pows, once per thread).
template <typename acc_t>
FL_HOST_DEVICE void adam_bias_corrections(AdamCoefs<acc_t>& c, double t, double lr, double beta1, double beta2) {
  c.step_size = static_cast<acc_t>(lr / (1.0 - ::pow(beta1, t)));
  c.bias2_sqrt = static_cast<acc_t>(::sqrt(1.0 - ::pow(beta2, t)));
}

// The new weight; m, v (and vmax with amsgrad) hold the stored state on entry and the new state,
// rounded, on exit (`vmax` is not touched without amsgrad).
template <bool amsgrad, typename scalar_t, typename acc_t>
FL_HOST_DEVICE acc_t adam_update(acc_t w0, acc_t g, scalar_t& m, scalar_t& v, scalar_t& vmax,
                                 const AdamCoefs<acc_t>& c) {
  g = decayed(g, w0, c.l2_decay, c.weight_decay);
  w0 = w0 * c.decay_factor;
  m = static_cast<scalar_t>(lerp(static_cast<acc_t>(m), g, c.beta1_weight));
  v = static_cast<scalar_t>(static_cast<acc_t>(v) * c.beta2 + g * g * c.beta2_keep);
  acc_t second = static_cast<acc_t>(v);
  if constexpr (amsgrad) {
    vmax = static_cast<scalar_t>(maximum(static_cast<acc_t>(vmax), second));
    second = static_cast<acc_t>(vmax);
  }
  const acc_t denom = sqrt_(second) / c.bias2_sqrt + c.eps;
  return w0 - c.step_size * (static_cast<acc_t>(m) / denom);
}

}  // namespace math
}  // namespace fused_lesam
