// The fused_lesam operator library: the schemas of the bucket ops, declared once.
// Each device adds its kernels with TORCH_LIBRARY_IMPL in its own file (cpu/, cuda/); the fake
// (meta) kernels that torch.compile traces with are in fused_lesam/backends/compiled.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_lesam, m) {
  // sum over buckets of sum(g^2), or sum((|w| g)^2) where weights[i] is given: a 0-d float32
  // tensor (float64 when a bucket is float64) on the buckets' device.
  m.def("sq_norm(Tensor[] grads, Tensor?[] weights) -> Tensor");
  // backup <- w if given (XSAM's later ascent steps keep the first one's); center <- g if given;
  // w <- w + eps with rho_t, eps computed on the device from the squared norm sq. Returns rho_t
  // (0-d). A non-finite sq leaves w untouched. sigma_t, a 0-d float64 tensor on param's device,
  // is read on the device in place of sigma when given (so a schedule computed on the device
  // needs no host sync and can run inside a CUDA graph).
  m.def(
      "perturb_(Tensor(a!) param, Tensor grad, Tensor(b!)? backup, Tensor sq, float sigma, float rho_max, "
      "float varrho, bool adaptive, Tensor(c!)? center=None, Tensor? sigma_t=None) -> Tensor");
  // w <- backup (bit-exact); with a center gradient, g <- ghat_coef * g - center_coef * center.
  m.def("restore_(Tensor(a!) param, Tensor backup, Tensor(b!) grad, Tensor? center, float ghat_coef, "
        "float center_coef) -> ()");
  // XSAM. [sum (w - b)^2, sum g^2, sum (w - b) g] over buckets (D = w - b = w_k - w_0): a (3,)
  // float32 tensor (float64 when a bucket is float64) on the buckets' device.
  m.def("xsam_dots(Tensor[] params, Tensor[] backups, Tensor[] grads) -> Tensor");
  // g <- coefs[0] * D + coefs[1] * g with D = delta if given, else w - backup; then w <- backup.
  // coefs: (2,) float32/float64 on the device (the slerp coefficients, never read on the host).
  m.def("xsam_restore_(Tensor(a!) param, Tensor backup, Tensor(b!) grad, Tensor? delta, Tensor coefs) -> ()");
  // A point of the alpha search: w <- backup + coefs[0] * D + coefs[1] * g, D = delta; with
  // save_delta, first delta <- w - backup (rounded to the bucket's dtype, then used).
  m.def("xsam_probe_(Tensor(a!) param, Tensor backup, Tensor grad, Tensor(b!) delta, Tensor coefs, "
        "bool save_delta) -> ()");
  // LookSAM. [sum g_hat g, sum g^2] over buckets (g_hat = grads, g = centers, the first
  // gradient): a (2,) float32 tensor (float64 when a bucket is float64) on the buckets' device.
  m.def("look_dots(Tensor[] grads, Tensor[] centers) -> Tensor");
  // look_dir <- g_hat - coef * g (g_hat = grad, g = center) unless found_inf (0-d float32 on the
  // device, read there) is nonzero, which leaves look_dir unchanged. coef: 0-d float32/float64 on
  // the device (the projection coefficient, never read on the host).
  m.def("look_store_(Tensor(a!) look_dir, Tensor grad, Tensor center, Tensor coef, Tensor found_inf) -> ()");
  // g <- g + coef * look_dir (LookSAM's reuse step); coef as in look_store_.
  m.def("look_add_(Tensor(a!) grad, Tensor look_dir, Tensor coef) -> ()");
  // The multi-tensor forms: multi_X is X on every bucket of the lists, in one call (one kernel
  // launch on CUDA) per device and dtype, for FSDP2's one bucket per parameter shard. The lists have
  // one length (at least 1); every tensor of a call has one dtype and one device; an optional list
  // is given for every bucket or is None. Each computes on every element exactly what the
  // per-bucket op computes there (fused_lesam/backends/spec.py, "multi-tensor forms").
  // multi_perturb_ uses one radius for all buckets and returns it (0-d) as perturb_ does.
  m.def(
      "multi_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[]? backups, Tensor sq, float sigma, "
      "float rho_max, float varrho, bool adaptive, Tensor(c!)[]? centers=None, Tensor? sigma_t=None) -> Tensor");
  m.def("multi_restore_(Tensor(a!)[] params, Tensor[] backups, Tensor(b!)[] grads, Tensor[]? centers, "
        "float ghat_coef, float center_coef) -> ()");
  m.def("multi_xsam_restore_(Tensor(a!)[] params, Tensor[] backups, Tensor(b!)[] grads, Tensor[]? deltas, "
        "Tensor coefs) -> ()");
  m.def("multi_xsam_probe_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] deltas, "
        "Tensor coefs, bool save_delta) -> ()");
  m.def("multi_look_store_(Tensor(a!)[] look_dirs, Tensor[] grads, Tensor[] centers, Tensor coef, "
        "Tensor found_inf) -> ()");
  m.def("multi_look_add_(Tensor(a!)[] grads, Tensor[] look_dirs, Tensor coef) -> ()");
  // The base update fused into the restore: w <- torch.optim.SGD's step from w0 = backup (None: w0
  // is param itself, a step that perturbed nothing; no aliasing of param) with the
  // final gradient (combined with center as in restore_ when given, negated with maximize), and
  // momentum_buffer (given iff momentum != 0; init_buffer: it starts as a copy of the gradient).
  // found_inf (0-d float32 on param's device, read there): nonzero skips the step, w <- backup
  // bit-exactly and no state written. The gradient is not written.
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor? backup, Tensor grad, Tensor(b!)? momentum_buffer, Tensor? center, "
      "Tensor found_inf, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool init_buffer, float ghat_coef, float center_coef) -> ()");
  // w <- torch.optim.Adam's step (AdamW's with decoupled_weight_decay) from w0 = backup, with the
  // final gradient as in sgd_step_, writing exp_avg, exp_avg_sq and max_exp_avg_sq (given iff
  // amsgrad). step: 0-d float32 on param's device holding t (already advanced), read there for the
  // bias corrections (in float64). found_inf as in sgd_step_.
  m.def(
      "adam_step_(Tensor(a!) param, Tensor? backup, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor? center, Tensor step, Tensor found_inf, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, "
      "float ghat_coef, float center_coef) -> ()");
}

namespace fused_lesam {
extern PyMethodDef kBucketCheckMethods[];  // bucket_checks.cpp
}

// `import fused_lesam._C` loads this library, which registers the ops above (reached through
// torch.ops.fused_lesam); the module itself holds the per-step bucket checks.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fused_lesam::kBucketCheckMethods};
  return PyModule_Create(&module);
}
