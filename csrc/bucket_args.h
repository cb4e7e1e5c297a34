// Host-side helpers shared by the CPU and CUDA implementations of the bucket ops: the argument
// checks (both reject the same inputs with the same messages) and the chunk layout of the norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "lesam_math.h"

namespace fused_lesam {

// The type the arithmetic of a bucket is done in (lesam_math.h): double for fp64, else float.
inline at::ScalarType acc_scalar_type(at::ScalarType bucket) {
  return bucket == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor argument's name in the messages: `name` for a per-bucket op's argument; in a multi form,
// bucket `index` of the list of them (param -> params[3]). Written only when a check fails.
struct ArgName {
  // Implicit, so that a plain name (a per-bucket op's argument) is one.
  ArgName(const char* name, int64_t index = -1) : name(name), index(index) {}
  const char* name;
  int64_t index;
};

inline std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  return arg.index < 0 ? out << arg.name : out << arg.name << "s[" << arg.index << "]";
}

inline void check_bucket(const at::Tensor& t, const char* op, const ArgName& name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_lesam::", op, ": ", name, " has dtype ", dtype,
              "; buckets must be float32, float64, float16 or bfloat16");
  TORCH_CHECK(t.is_contiguous(), "fused_lesam::", op, ": ", name,
              " must be contiguous (a flat bucket), got strides ", t.strides());
}

// `t` is a bucket of the same dtype, size and device as `like`.
inline void check_same_bucket(const at::Tensor& t, const at::Tensor& like, const char* op, const ArgName& name,
                              const ArgName& like_name) {
  check_bucket(t, op, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fused_lesam::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", like_name, " has ", like.scalar_type());
  TORCH_CHECK(t.numel() == like.numel(), "fused_lesam::", op, ": ", name, " has ", t.numel(),
              " elements but ", like_name, " has ", like.numel());
  TORCH_CHECK(t.device() == like.device(), "fused_lesam::", op, ": ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
}

// How sq_norm cuts its buckets into math::kReduceChunk-element chunks, one partial sum each:
// bucket b's partials are [first_chunk[b], first_chunk[b + 1]). The sum is float64 if a bucket is.
struct ReduceLayout {
  std::vector<int64_t> first_chunk{0};
  at::ScalarType out_type = at::kFloat;
  int64_t chunks(size_t b) const { return first_chunk[b + 1] - first_chunk[b]; }
  int64_t total() const { return first_chunk.back(); }
};

inline ReduceLayout reduce_layout(at::TensorList grads) {
  ReduceLayout layout;
  for (const auto& grad : grads) {
    if (grad.scalar_type() == at::kDouble) {
      layout.out_type = at::kDouble;
    }
    layout.first_chunk.push_back(layout.first_chunk.back() +
                                 (grad.numel() + math::kReduceChunk - 1) / math::kReduceChunk);
  }
  return layout;
}

inline void check_sq_norm_args(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights) {
  TORCH_CHECK(grads.size() == weights.size(), "fused_lesam::sq_norm: got ", grads.size(), " grad buckets but ",
              weights.size(), " weights (one per bucket, None where the group is not adaptive)");
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string grad_name = "grads[" + std::to_string(i) + "]";
    check_bucket(grads[i], "sq_norm", grad_name.c_str());
    TORCH_CHECK(grads[i].device() == grads[0].device(), "fused_lesam::sq_norm: grads[", i, "] is on ",
                grads[i].device(), " but grads[0] is on ", grads[0].device(), "; one call sums one device");
    const std::optional<at::Tensor> weight = weights[i];
    if (weight.has_value()) {
      check_same_bucket(*weight, grads[i], "sq_norm", ("weights[" + std::to_string(i) + "]").c_str(), grad_name.c_str());
    }
  }
}

// The per-bucket checks take the op's name and, in a multi form, the bucket's index in its lists
// (the names in the messages are then the lists' elements: params[3]).
inline void check_perturb_args(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& backup,
                               const at::Tensor& sq, const std::optional<at::Tensor>& center,
                               const std::optional<at::Tensor>& sigma_t, const char* op = "perturb_",
                               int64_t index = -1) {
  const ArgName param_name{"param", index};
  check_bucket(param, op, param_name);
  check_same_bucket(grad, param, op, {"grad", index}, param_name);
  if (backup.has_value()) {
    check_same_bucket(*backup, param, op, {"backup", index}, param_name);
  }
  if (center.has_value()) {
    check_same_bucket(*center, param, op, {"center", index}, param_name);
  }
  TORCH_CHECK(sq.dim() == 0 && (sq.scalar_type() == at::kFloat || sq.scalar_type() == at::kDouble), "fused_lesam::", op,
              ": sq must be the 0-d float32/float64 tensor sq_norm returns, got a ", sq.scalar_type(),
              " tensor of shape ", sq.sizes());
  TORCH_CHECK(sq.device() == param.device(), "fused_lesam::", op, ": sq is on ", sq.device(), " but ", param_name,
              " is on ", param.device());
  if (sigma_t.has_value()) {
    TORCH_CHECK(sigma_t->dim() == 0 && sigma_t->scalar_type() == at::kDouble, "fused_lesam::", op,
                ": sigma_t must be a 0-d float64 tensor, got a ", sigma_t->scalar_type(), " tensor of shape ",
                sigma_t->sizes());
    TORCH_CHECK(sigma_t->device() == param.device(), "fused_lesam::", op, ": sigma_t is on ", sigma_t->device(),
                " but ", param_name, " is on ", param.device());
  }
}

inline void check_restore_args(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                               const std::optional<at::Tensor>& center, const char* op = "restore_",
                               int64_t index = -1) {
  const ArgName param_name{"param", index};
  check_bucket(param, op, param_name);
  check_same_bucket(backup, param, op, {"backup", index}, param_name);
  check_same_bucket(grad, param, op, {"grad", index}, param_name);
  if (center.has_value()) {
    check_same_bucket(*center, param, op, {"center", index}, param_name);
  }
}

inline void check_xsam_dots_args(at::TensorList params, at::TensorList backups, at::TensorList grads) {
  TORCH_CHECK(params.size() == backups.size() && params.size() == grads.size(), "fused_lesam::xsam_dots: got ",
              params.size(), " param, ", backups.size(), " backup and ", grads.size(),
              " grad buckets; they must match one to one");
  TORCH_CHECK(!params.empty(), "fused_lesam::xsam_dots: needs at least one bucket");
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    const std::string param_name = "params" + index;
    check_bucket(params[i], "xsam_dots", param_name.c_str());
    check_same_bucket(backups[i], params[i], "xsam_dots", ("backups" + index).c_str(), param_name.c_str());
    check_same_bucket(grads[i], params[i], "xsam_dots", ("grads" + index).c_str(), param_name.c_str());
    TORCH_CHECK(params[i].device() == params[0].device(), "fused_lesam::xsam_dots: params", index, " is on ",
                params[i].device(), " but params[0] is on ", params[0].device(), "; one call sums one device");
  }
}

inline void check_coefs(const at::Tensor& coefs, const at::Tensor& param, const char* op, const ArgName& param_name) {
  TORCH_CHECK(coefs.dim() == 1 && coefs.numel() == 2 &&
                  (coefs.scalar_type() == at::kFloat || coefs.scalar_type() == at::kDouble),
              "fused_lesam::", op, ": coefs must be a (2,) float32/float64 tensor, got a ", coefs.scalar_type(),
              " tensor of shape ", coefs.sizes());
  TORCH_CHECK(coefs.device() == param.device(), "fused_lesam::", op, ": coefs is on ", coefs.device(), " but ",
              param_name, " is on ", param.device());
}

inline void check_xsam_restore_args(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                                    const std::optional<at::Tensor>& delta, const at::Tensor& coefs,
                                    const char* op = "xsam_restore_", int64_t index = -1) {
  const ArgName param_name{"param", index};
  check_bucket(param, op, param_name);
  check_same_bucket(backup, param, op, {"backup", index}, param_name);
  check_same_bucket(grad, param, op, {"grad", index}, param_name);
  if (delta.has_value()) {
    check_same_bucket(*delta, param, op, {"delta", index}, param_name);
  }
  check_coefs(coefs, param, op, param_name);
}

inline void check_xsam_probe_args(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                                  const at::Tensor& delta, const at::Tensor& coefs, const char* op = "xsam_probe_",
                                  int64_t index = -1) {
  const ArgName param_name{"param", index};
  check_bucket(param, op, param_name);
  check_same_bucket(backup, param, op, {"backup", index}, param_name);
  check_same_bucket(grad, param, op, {"grad", index}, param_name);
  check_same_bucket(delta, param, op, {"delta", index}, param_name);
  check_coefs(coefs, param, op, param_name);
}

// ------------------------------------------------------------------------------------------ LookSAM
inline void check_look_dots_args(at::TensorList grads, at::TensorList centers) {
  TORCH_CHECK(grads.size() == centers.size(), "fused_lesam::look_dots: got ", grads.size(), " grad and ",
              centers.size(), " center buckets; they must match one to one");
  TORCH_CHECK(!grads.empty(), "fused_lesam::look_dots: needs at least one bucket");
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    const std::string grad_name = "grads" + index;
    check_bucket(grads[i], "look_dots", grad_name.c_str());
    check_same_bucket(centers[i], grads[i], "look_dots", ("centers" + index).c_str(), grad_name.c_str());
    TORCH_CHECK(grads[i].device() == grads[0].device(), "fused_lesam::look_dots: grads", index, " is on ",
                grads[i].device(), " but grads[0] is on ", grads[0].device(), "; one call sums one device");
  }
}

// coef: the 0-d float32/float64 coefficient, on the bucket's device, read by the kernel itself.
inline void check_look_coef(const at::Tensor& coef, const at::Tensor& bucket, const char* op) {
  TORCH_CHECK(coef.dim() == 0 && (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble),
              "fused_lesam::", op, ": coef must be a 0-d float32/float64 tensor, got a ", coef.scalar_type(),
              " tensor of shape ", coef.sizes());
  TORCH_CHECK(coef.device() == bucket.device(), "fused_lesam::", op, ": coef is on ", coef.device(), " but ",
              "the buckets are on ", bucket.device());
}

inline void check_look_store_args(const at::Tensor& look_dir, const at::Tensor& grad, const at::Tensor& center,
                                  const at::Tensor& coef, const at::Tensor& found_inf, const char* op = "look_store_",
                                  int64_t index = -1) {
  const ArgName dir_name{"look_dir", index};
  check_bucket(look_dir, op, dir_name);
  check_same_bucket(grad, look_dir, op, {"grad", index}, dir_name);
  check_same_bucket(center, look_dir, op, {"center", index}, dir_name);
  check_look_coef(coef, look_dir, op);
  TORCH_CHECK(found_inf.dim() == 0 && found_inf.scalar_type() == at::kFloat, "fused_lesam::", op,
              ": found_inf must be a 0-d float32 tensor, got a ", found_inf.scalar_type(), " tensor of shape ",
              found_inf.sizes());
  TORCH_CHECK(found_inf.device() == look_dir.device(), "fused_lesam::", op, ": found_inf is on ", found_inf.device(),
              " but ", dir_name, " is on ", look_dir.device());
}

inline void check_look_add_args(const at::Tensor& grad, const at::Tensor& look_dir, const at::Tensor& coef,
                                const char* op = "look_add_", int64_t index = -1) {
  const ArgName grad_name{"grad", index};
  check_bucket(grad, op, grad_name);
  check_same_bucket(look_dir, grad, op, {"look_dir", index}, grad_name);
  check_look_coef(coef, grad, op);
}

// ------------------------------------------------------------------------------ multi-tensor forms
// One call over a list of buckets that share the scalars (fused_lesam/backends/spec.py, "multi-tensor
// forms"): every bucket is checked as the per-bucket op checks it, after the lists themselves.

// A list argument of a multi form, by name; an optional list that is None is not given.
struct NamedList {
  const char* name;
  std::optional<at::TensorList> tensors;
};

// The given lists have one length, at least 1, and all their tensors one dtype on one device.
inline void check_multi_lists(const char* op, std::initializer_list<NamedList> lists) {
  const NamedList& first = *lists.begin();
  bool same_length = true;
  for (const NamedList& list : lists) {
    same_length = same_length && (!list.tensors.has_value() || list.tensors->size() == first.tensors->size());
  }
  if (!same_length || first.tensors->empty()) {
    std::string lengths;
    for (const NamedList& list : lists) {
      if (list.tensors.has_value()) {
        lengths += (lengths.empty() ? "" : ", ") + std::string(list.name) + ": " + std::to_string(list.tensors->size());
      }
    }
    TORCH_CHECK(false, "fused_lesam::", op, ": the lists must have one length, at least 1; got ", lengths);
  }
  const at::Tensor& like = (*first.tensors)[0];
  for (const NamedList& list : lists) {
    if (!list.tensors.has_value()) {
      continue;
    }
    for (size_t i = 0; i < list.tensors->size(); ++i) {
      const at::Tensor& t = (*list.tensors)[i];
      TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "fused_lesam::", op, ": ",
                  list.name, "[", i, "] is ", t.scalar_type(), " on ", t.device(), " but ", first.name, "[0] is ",
                  like.scalar_type(), " on ", like.device(), "; one call takes one dtype on one device");
    }
  }
}

// Bucket i of an optional list (None when the list is).
inline std::optional<at::Tensor> bucket_of(const std::optional<at::TensorList>& list, size_t i) {
  return list.has_value() ? std::optional<at::Tensor>((*list)[i]) : std::nullopt;
}

inline void check_multi_perturb_args(at::TensorList params, at::TensorList grads,
                                     const std::optional<at::TensorList>& backups, const at::Tensor& sq,
                                     const std::optional<at::TensorList>& centers,
                                     const std::optional<at::Tensor>& sigma_t) {
  constexpr const char* op = "multi_perturb_";
  check_multi_lists(op, {{"params", params}, {"grads", grads}, {"backups", backups}, {"centers", centers}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_perturb_args(params[i], grads[i], bucket_of(backups, i), sq, bucket_of(centers, i), sigma_t, op, static_cast<int64_t>(i));
  }
}

inline void check_multi_restore_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                     const std::optional<at::TensorList>& centers) {
  constexpr const char* op = "multi_restore_";
  check_multi_lists(op, {{"params", params}, {"backups", backups}, {"grads", grads}, {"centers", centers}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_restore_args(params[i], backups[i], grads[i], bucket_of(centers, i), op, static_cast<int64_t>(i));
  }
}

inline void check_multi_xsam_restore_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                          const std::optional<at::TensorList>& deltas, const at::Tensor& coefs) {
  constexpr const char* op = "multi_xsam_restore_";
  check_multi_lists(op, {{"params", params}, {"backups", backups}, {"grads", grads}, {"deltas", deltas}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_xsam_restore_args(params[i], backups[i], grads[i], bucket_of(deltas, i), coefs, op, static_cast<int64_t>(i));
  }
}

inline void check_multi_xsam_probe_args(at::TensorList params, at::TensorList backups, at::TensorList grads,
                                        at::TensorList deltas, const at::Tensor& coefs) {
  constexpr const char* op = "multi_xsam_probe_";
  check_multi_lists(op, {{"params", params}, {"backups", backups}, {"grads", grads}, {"deltas", deltas}});
  for (size_t i = 0; i < params.size(); ++i) {
    check_xsam_probe_args(params[i], backups[i], grads[i], deltas[i], coefs, op, static_cast<int64_t>(i));
  }
}

inline void check_multi_look_store_args(at::TensorList look_dirs, at::TensorList grads, at::TensorList centers,
                                        const at::Tensor& coef, const at::Tensor& found_inf) {
  constexpr const char* op = "multi_look_store_";
  check_multi_lists(op, {{"look_dirs", look_dirs}, {"grads", grads}, {"centers", centers}});
  for (size_t i = 0; i < look_dirs.size(); ++i) {
    check_look_store_args(look_dirs[i], grads[i], centers[i], coef, found_inf, op, static_cast<int64_t>(i));
  }
}

inline void check_multi_look_add_args(at::TensorList grads, at::TensorList look_dirs, const at::Tensor& coef) {
  constexpr const char* op = "multi_look_add_";
  check_multi_lists(op, {{"grads", grads}, {"look_dirs", look_dirs}});
  for (size_t i = 0; i < grads.size(); ++i) {
    check_look_add_args(grads[i], look_dirs[i], coef, op, static_cast<int64_t>(i));
  }
}

// ------------------------------------------------------ the base update, fused into the restore
// The step ops also ask for flat (1-D) buckets: their state tensors are the optimizer's state of a
// flat bucket, read and written element by element alongside param.
inline void check_flat_bucket(const at::Tensor& t, const char* op, const char* name) {
  check_bucket(t, op, name);
  TORCH_CHECK(t.dim() == 1, "fused_lesam::", op, ": ", name, " must be a flat (1-D) bucket, got shape ", t.sizes());
}

inline void check_step_bucket(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  check_flat_bucket(t, op, name);
  check_same_bucket(t, param, op, name, "param");
}

// found_inf and step: a 0-d float32 tensor on param's device, read by the kernel itself.
inline void check_device_scalar(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kFloat, "fused_lesam::", op, ": ", name,
              " must be a 0-d float32 tensor, got a ", t.scalar_type(), " tensor of shape ", t.sizes());
  TORCH_CHECK(t.device() == param.device(), "fused_lesam::", op, ": ", name, " is on ", t.device(),
              " but param is on ", param.device());
}

// An optional state tensor is given exactly when its option is on (`when` says which option).
inline void check_state_given(const std::optional<at::Tensor>& t, bool wanted, const at::Tensor& param, const char* op,
                              const char* name, const char* when) {
  TORCH_CHECK(t.has_value() == wanted, "fused_lesam::", op, ": ", name, " must be given exactly when ", when, " (",
              wanted ? "it is" : "it is not", "), but it was ", t.has_value() ? "given" : "None");
  if (t.has_value()) {
    check_step_bucket(*t, param, op, name);
  }
}

// backup: None reads w0 from param itself (a step that perturbed nothing).
inline void check_step_backup(const std::optional<at::Tensor>& backup, const at::Tensor& param, const char* op) {
  if (backup.has_value()) {
    check_step_bucket(*backup, param, op, "backup");
  }
}

inline void check_sgd_step_args(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                                const at::Tensor& grad,
                                const std::optional<at::Tensor>& momentum_buffer,
                                const std::optional<at::Tensor>& center, const at::Tensor& found_inf,
                                double momentum) {
  check_flat_bucket(param, "sgd_step_", "param");
  check_step_backup(backup, param, "sgd_step_");
  check_step_bucket(grad, param, "sgd_step_", "grad");
  check_state_given(momentum_buffer, momentum != 0, param, "sgd_step_", "momentum_buffer", "momentum != 0");
  if (center.has_value()) {
    check_step_bucket(*center, param, "sgd_step_", "center");
  }
  check_device_scalar(found_inf, param, "sgd_step_", "found_inf");
}

inline void check_adam_step_args(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                                 const at::Tensor& grad,
                                 const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                 const std::optional<at::Tensor>& max_exp_avg_sq,
                                 const std::optional<at::Tensor>& center, const at::Tensor& step,
                                 const at::Tensor& found_inf, bool amsgrad) {
  check_flat_bucket(param, "adam_step_", "param");
  check_step_backup(backup, param, "adam_step_");
  check_step_bucket(grad, param, "adam_step_", "grad");
  check_step_bucket(exp_avg, param, "adam_step_", "exp_avg");
  check_step_bucket(exp_avg_sq, param, "adam_step_", "exp_avg_sq");
  check_state_given(max_exp_avg_sq, amsgrad, param, "adam_step_", "max_exp_avg_sq", "amsgrad");
  if (center.has_value()) {
    check_step_bucket(*center, param, "adam_step_", "center");
  }
  check_device_scalar(step, param, "adam_step_", "step");
  check_device_scalar(found_inf, param, "adam_step_", "found_inf");
}

}  // namespace fused_lesam
