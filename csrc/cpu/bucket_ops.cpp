// CPU kernels of the bucket ops: plain loops over the shared maths (lesam_math.h) that the
// compiler vectorises, split across threads with at::parallel_for. On the CPU the scalars (the
// norm, rho_t) are in host memory, so reading them is no synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../bucket_args.h"
#include "../lesam_math.h"

namespace fused_lesam {
namespace {

// Elements per task of the element-wise ops: enough to amortise handing out the task, few enough
// that one ResNet-sized bucket keeps every core busy.
constexpr int64_t kGrain = 32768;

// Independent running sums in a reduction chunk. Float addition is not associative, so the
// compiler may not vectorise one running sum; kLanes separate ones it maps onto vector registers.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t, bool weighted>
acc_t chunk_sq_sum(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w, int64_t n) {
  acc_t lane[kLanes] = {};
  auto term = [&](int64_t i) {
    if constexpr (weighted) {
      return math::sq_term(static_cast<acc_t>(g[i]), static_cast<acc_t>(w[i]));
    } else {
      return math::sq_term(static_cast<acc_t>(g[i]));
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += term(i + j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    lane[j] += term(i);
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) {
    sum += lane[j];
  }
  return sum;
}

// chunk(b, c) for every reduction chunk c of every bucket b, in one at::parallel_for over all the
// layout's chunks: a list of many small buckets (FSDP2's shards) shares tasks instead of paying for
// one parallel_for per bucket. Each chunk's partial is a function of its elements alone and the
// partials are summed in a fixed order after, so the tasks change no bit.
template <typename Chunk>
void parallel_over_chunks(const ReduceLayout& layout, const Chunk& chunk) {
  at::parallel_for(0, layout.total(), 1, [&](int64_t begin, int64_t end) {
    // The bucket of chunk `begin`: the last one starting at or before it (an empty bucket has none).
    size_t b = std::upper_bound(layout.first_chunk.begin(), layout.first_chunk.end(), begin) -
               layout.first_chunk.begin() - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (c >= layout.first_chunk[b + 1]) {
        ++b;
      }
      chunk(b, c - layout.first_chunk[b]);
    }
  });
}

at::Tensor sq_norm_cpu(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights) {
  check_sq_norm_args(grads, weights);
  const ReduceLayout layout = reduce_layout(grads);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::sq_norm", [&] {
    using out_t = scalar_t;
    std::vector<out_t> partials(layout.total());
    std::vector<const void*> weight_data(grads.size(), nullptr);  // c10::List hands out copies: read once
    for (size_t b = 0; b < grads.size(); ++b) {
      const std::optional<at::Tensor> weight = weights[b];
      weight_data[b] = weight.has_value() ? weight->const_data_ptr() : nullptr;
    }
    parallel_over_chunks(layout, [&](size_t b, int64_t c) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[b].scalar_type(), "fused_lesam::sq_norm", [&] {
        const int64_t start = c * math::kReduceChunk;
        const int64_t len = std::min(math::kReduceChunk, grads[b].numel() - start);
        const scalar_t* g = grads[b].const_data_ptr<scalar_t>() + start;
        const auto* w = static_cast<const scalar_t*>(weight_data[b]);
        partials[layout.first_chunk[b] + c] = w ? chunk_sq_sum<scalar_t, out_t, true>(g, w + start, len)
                                                : chunk_sq_sum<scalar_t, out_t, false>(g, nullptr, len);
      });
    });
    out_t total = 0;  // second stage, in a fixed order: the result does not depend on the threads
    for (const out_t p : partials) {
      total += p;
    }
    *out.data_ptr<out_t>() = total;
  });
  return out;
}

// ------------------------------------------------------------ element-wise ops over a list of buckets
// The element-wise ops run over a list of buckets: a per-bucket op over a list of one, a multi form
// (fused_lesam/backends/spec.py, "multi-tensor forms") over the engine's list, e.g. FSDP2's shards.
// One at::parallel_for covers every element of the list, its tasks' ranges cut at the buckets'
// ends, so that many small buckets share tasks instead of paying for one parallel_for each. Each
// element's value depends on that element alone, so where the cuts fall changes no bit.
class BucketRanges {
 public:
  explicit BucketRanges(at::TensorList buckets) {
    first_element_.reserve(buckets.size() + 1);
    first_element_.push_back(0);
    for (const auto& bucket : buckets) {
      first_element_.push_back(first_element_.back() + bucket.numel());
    }
  }

  // body(b, begin, end) on ranges [begin, end) of bucket b's elements that cover each element once.
  template <typename Body>
  void parallel_for(const Body& body) const {
    at::parallel_for(0, first_element_.back(), kGrain, [&](int64_t begin, int64_t end) {
      // The bucket holding element `begin`: the last one starting at or before it (an empty bucket
      // starts where the next one does, and holds none).
      size_t b = std::upper_bound(first_element_.begin(), first_element_.end(), begin) - first_element_.begin() - 1;
      for (; begin < end; ++b) {
        const int64_t stop = std::min(end, first_element_[b + 1]);
        if (stop > begin) {
          body(b, begin - first_element_[b], stop - first_element_[b]);
        }
        begin = stop;
      }
    });
  }

 private:
  std::vector<int64_t> first_element_;  // bucket b holds elements [first_element_[b], first_element_[b + 1])
};

// The data of each of the `count` buckets of a list (T: scalar_t, or const scalar_t for a read-only
// list), taken on the calling thread; nullptr for every bucket of a list that is None.
template <typename T>
std::vector<T*> data_of(const std::optional<at::TensorList>& buckets, size_t count) {
  std::vector<T*> data(count, nullptr);
  if (buckets.has_value()) {
    for (size_t b = 0; b < count; ++b) {
      if constexpr (std::is_const_v<T>) {
        data[b] = (*buckets)[b].const_data_ptr<std::remove_const_t<T>>();
      } else {
        data[b] = (*buckets)[b].data_ptr<T>();
      }
    }
  }
  return data;
}

// A per-bucket op's optional bucket as a list of one (or None), for the list implementations.
std::optional<at::TensorList> list_of(const std::optional<at::Tensor>& bucket) {
  return bucket.has_value() ? std::optional<at::TensorList>(at::TensorList(*bucket)) : std::nullopt;
}

template <typename scalar_t, typename acc_t, bool adaptive>
void perturb_range(scalar_t* __restrict__ w, const scalar_t* __restrict__ g, acc_t scale, int64_t begin,
                   int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    w[i] = static_cast<scalar_t>(
        math::perturbed(static_cast<acc_t>(w[i]), static_cast<acc_t>(g[i]), scale, adaptive));
  }
}

template <typename scalar_t>
void copy_range(const scalar_t* __restrict__ from, scalar_t* __restrict__ to, int64_t begin, int64_t end) {
  std::copy(from + begin, from + end, to + begin);
}

// perturb_ on each bucket of the lists (checked by the caller), with one radius, returned.
at::Tensor perturb_buckets(at::TensorList params, at::TensorList grads, const std::optional<at::TensorList>& backups,
                           const at::Tensor& sq, double sigma, double rho_max, double varrho, bool adaptive,
                           const std::optional<at::TensorList>& centers, const std::optional<at::Tensor>& sigma_t) {
  if (sigma_t.has_value()) {
    sigma = *sigma_t->const_data_ptr<double>();  // a CPU tensor: reading it is no sync
  }
  const auto acc_type = acc_scalar_type(params[0].scalar_type());
  at::Tensor rho = at::empty({}, params[0].options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto r = math::radius<acc_t>(sq.item().to<acc_t>(), static_cast<acc_t>(sigma),
                                       static_cast<acc_t>(rho_max), static_cast<acc_t>(varrho));
    *rho.data_ptr<acc_t>() = r.rho;
    const size_t count = params.size();
    const auto w = data_of<scalar_t>(params, count);
    const auto g = data_of<const scalar_t>(grads, count);
    const auto bak = data_of<scalar_t>(backups, count);
    const auto ctr = data_of<scalar_t>(centers, count);
    BucketRanges(params).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      // The backup and the center are plain copies of the task's range, made while it is in cache;
      // they are written whether or not the norm is finite.
      if (bak[b]) {
        copy_range(w[b], bak[b], begin, end);
      }
      if (ctr[b]) {
        copy_range(g[b], ctr[b], begin, end);
      }
      if (!r.finite) {  // no perturbation
        return;
      }
      if (adaptive) {
        perturb_range<scalar_t, acc_t, true>(w[b], g[b], r.scale, begin, end);
      } else {
        perturb_range<scalar_t, acc_t, false>(w[b], g[b], r.scale, begin, end);
      }
    });
  });
  return rho;
}

at::Tensor perturb_cpu(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& backup,
                       const at::Tensor& sq, double sigma, double rho_max, double varrho, bool adaptive,
                       const std::optional<at::Tensor>& center, const std::optional<at::Tensor>& sigma_t) {
  check_perturb_args(param, grad, backup, sq, center, sigma_t);
  return perturb_buckets(param, grad, list_of(backup), sq, sigma, rho_max, varrho, adaptive, list_of(center), sigma_t);
}

at::Tensor multi_perturb_cpu(at::TensorList params, at::TensorList grads, const std::optional<at::TensorList>& backups,
                             const at::Tensor& sq, double sigma, double rho_max, double varrho, bool adaptive,
                             const std::optional<at::TensorList>& centers, const std::optional<at::Tensor>& sigma_t) {
  check_multi_perturb_args(params, grads, backups, sq, centers, sigma_t);
  return perturb_buckets(params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers, sigma_t);
}

template <typename scalar_t, typename acc_t>
void combine_range(scalar_t* __restrict__ g, const scalar_t* __restrict__ center, acc_t ghat_coef,
                   acc_t center_coef, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    g[i] = static_cast<scalar_t>(
        math::combined(static_cast<acc_t>(g[i]), static_cast<acc_t>(center[i]), ghat_coef, center_coef));
  }
}

void restore_buckets(at::TensorList params, at::TensorList backups, at::TensorList grads,
                     const std::optional<at::TensorList>& centers, double ghat_coef, double center_coef) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t count = params.size();
    const auto w = data_of<scalar_t>(params, count);
    const auto bak = data_of<const scalar_t>(backups, count);
    const auto g = data_of<scalar_t>(grads, count);
    const auto ctr = data_of<const scalar_t>(centers, count);
    BucketRanges(params).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      copy_range(bak[b], w[b], begin, end);
      if (ctr[b]) {
        combine_range<scalar_t, acc_t>(g[b], ctr[b], static_cast<acc_t>(ghat_coef), static_cast<acc_t>(center_coef),
                                       begin, end);
      }
    });
  });
}

void restore_cpu(at::Tensor& param, const at::Tensor& backup, at::Tensor& grad, const std::optional<at::Tensor>& center,
                 double ghat_coef, double center_coef) {
  check_restore_args(param, backup, grad, center);
  restore_buckets(param, backup, grad, list_of(center), ghat_coef, center_coef);
}

void multi_restore_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                       const std::optional<at::TensorList>& centers, double ghat_coef, double center_coef) {
  check_multi_restore_args(params, backups, grads, centers);
  restore_buckets(params, backups, grads, centers, ghat_coef, center_coef);
}

// ------------------------------------------------------------------------------------------- XSAM
template <typename scalar_t, typename acc_t>
math::Dots<acc_t> chunk_dots(const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                             const scalar_t* __restrict__ g, int64_t n) {
  acc_t dd[kLanes] = {}, gg[kLanes] = {}, dg[kLanes] = {};
  auto add = [&](int64_t i, int j) {
    const math::Dots<acc_t> t = math::dots_term(static_cast<acc_t>(w[i]) - static_cast<acc_t>(b[i]),
                                                static_cast<acc_t>(g[i]));
    dd[j] += t.dd;
    gg[j] += t.gg;
    dg[j] += t.dg;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      add(i + j, j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    add(i, j);
  }
  math::Dots<acc_t> sum{0, 0, 0};
  for (int j = 0; j < kLanes; ++j) {
    sum.dd += dd[j];
    sum.gg += gg[j];
    sum.dg += dg[j];
  }
  return sum;
}

at::Tensor xsam_dots_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads) {
  check_xsam_dots_args(params, backups, grads);
  const ReduceLayout layout = reduce_layout(params);
  at::Tensor out = at::empty({3}, at::TensorOptions().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::xsam_dots", [&] {
    using out_t = scalar_t;
    std::vector<math::Dots<out_t>> partials(layout.total());
    parallel_over_chunks(layout, [&](size_t k, int64_t c) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[k].scalar_type(), "fused_lesam::xsam_dots", [&] {
        const int64_t start = c * math::kReduceChunk;
        const int64_t len = std::min(math::kReduceChunk, params[k].numel() - start);
        partials[layout.first_chunk[k] + c] =
            chunk_dots<scalar_t, out_t>(params[k].const_data_ptr<scalar_t>() + start,
                                        backups[k].const_data_ptr<scalar_t>() + start,
                                        grads[k].const_data_ptr<scalar_t>() + start, len);
      });
    });
    math::Dots<out_t> total{0, 0, 0};  // second stage, in a fixed order, as in sq_norm
    for (const auto& p : partials) {
      total.dd += p.dd;
      total.gg += p.gg;
      total.dg += p.dg;
    }
    out_t* o = out.data_ptr<out_t>();
    o[0] = total.dd;
    o[1] = total.gg;
    o[2] = total.dg;
  });
  return out;
}

void xsam_restore_buckets(at::TensorList params, at::TensorList backups, at::TensorList grads,
                          const std::optional<at::TensorList>& deltas, const at::Tensor& coefs) {
  const at::Tensor c = coefs.to(acc_scalar_type(params[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::xsam_restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t c0 = c.const_data_ptr<acc_t>()[0];
    const acc_t c1 = c.const_data_ptr<acc_t>()[1];
    const size_t count = params.size();
    const auto ws = data_of<scalar_t>(params, count);
    const auto baks = data_of<const scalar_t>(backups, count);
    const auto gs = data_of<scalar_t>(grads, count);
    const auto ds = data_of<const scalar_t>(deltas, count);
    BucketRanges(params).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      scalar_t* __restrict__ w = ws[b];
      const scalar_t* __restrict__ bak = baks[b];
      scalar_t* __restrict__ g = gs[b];
      const scalar_t* __restrict__ d = ds[b];
      for (int64_t i = begin; i < end; ++i) {
        const acc_t bi = static_cast<acc_t>(bak[i]);
        const acc_t di = d ? static_cast<acc_t>(d[i]) : static_cast<acc_t>(w[i]) - bi;
        g[i] = static_cast<scalar_t>(math::slerped(di, static_cast<acc_t>(g[i]), c0, c1));
        w[i] = bak[i];
      }
    });
  });
}

void xsam_restore_cpu(at::Tensor& param, const at::Tensor& backup, at::Tensor& grad,
                      const std::optional<at::Tensor>& delta, const at::Tensor& coefs) {
  check_xsam_restore_args(param, backup, grad, delta, coefs);
  xsam_restore_buckets(param, backup, grad, list_of(delta), coefs);
}

void multi_xsam_restore_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads,
                            const std::optional<at::TensorList>& deltas, const at::Tensor& coefs) {
  check_multi_xsam_restore_args(params, backups, grads, deltas, coefs);
  xsam_restore_buckets(params, backups, grads, deltas, coefs);
}

void xsam_probe_buckets(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList deltas,
                        const at::Tensor& coefs, bool save_delta) {
  const at::Tensor c = coefs.to(acc_scalar_type(params[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::xsam_probe_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t c0 = c.const_data_ptr<acc_t>()[0];
    const acc_t c1 = c.const_data_ptr<acc_t>()[1];
    const size_t count = params.size();
    const auto ws = data_of<scalar_t>(params, count);
    const auto baks = data_of<const scalar_t>(backups, count);
    const auto gs = data_of<const scalar_t>(grads, count);
    const auto ds = data_of<scalar_t>(deltas, count);
    BucketRanges(params).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      scalar_t* __restrict__ w = ws[b];
      const scalar_t* __restrict__ bak = baks[b];
      const scalar_t* __restrict__ g = gs[b];
      scalar_t* __restrict__ d = ds[b];
      for (int64_t i = begin; i < end; ++i) {
        const acc_t bi = static_cast<acc_t>(bak[i]);
        if (save_delta) {
          d[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) - bi);
        }
        w[i] = static_cast<scalar_t>(bi + math::slerped(static_cast<acc_t>(d[i]), static_cast<acc_t>(g[i]), c0, c1));
      }
    });
  });
}

void xsam_probe_cpu(at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad, at::Tensor& delta,
                    const at::Tensor& coefs, bool save_delta) {
  check_xsam_probe_args(param, backup, grad, delta, coefs);
  xsam_probe_buckets(param, backup, grad, delta, coefs, save_delta);
}

void multi_xsam_probe_cpu(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList deltas,
                          const at::Tensor& coefs, bool save_delta) {
  check_multi_xsam_probe_args(params, backups, grads, deltas, coefs);
  xsam_probe_buckets(params, backups, grads, deltas, coefs, save_delta);
}

// ---------------------------------------------------------------------------------------- LookSAM
template <typename scalar_t, typename acc_t>
math::LookDots<acc_t> chunk_look_dots(const scalar_t* __restrict__ ghat, const scalar_t* __restrict__ g, int64_t n) {
  acc_t hg[kLanes] = {}, gg[kLanes] = {};
  auto add = [&](int64_t i, int j) {
    const math::LookDots<acc_t> t = math::look_dots_term(static_cast<acc_t>(ghat[i]), static_cast<acc_t>(g[i]));
    hg[j] += t.hg;
    gg[j] += t.gg;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      add(i + j, j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    add(i, j);
  }
  math::LookDots<acc_t> sum{0, 0};
  for (int j = 0; j < kLanes; ++j) {
    sum.hg += hg[j];
    sum.gg += gg[j];
  }
  return sum;
}

at::Tensor look_dots_cpu(at::TensorList grads, at::TensorList centers) {
  check_look_dots_args(grads, centers);
  const ReduceLayout layout = reduce_layout(grads);
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::look_dots", [&] {
    using out_t = scalar_t;
    std::vector<math::LookDots<out_t>> partials(layout.total());
    parallel_over_chunks(layout, [&](size_t k, int64_t c) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[k].scalar_type(), "fused_lesam::look_dots", [&] {
        const int64_t start = c * math::kReduceChunk;
        const int64_t len = std::min(math::kReduceChunk, grads[k].numel() - start);
        partials[layout.first_chunk[k] + c] = chunk_look_dots<scalar_t, out_t>(
            grads[k].const_data_ptr<scalar_t>() + start, centers[k].const_data_ptr<scalar_t>() + start, len);
      });
    });
    math::LookDots<out_t> total{0, 0};  // second stage, in a fixed order, as in sq_norm
    for (const auto& p : partials) {
      total.hg += p.hg;
      total.gg += p.gg;
    }
    out_t* o = out.data_ptr<out_t>();
    o[0] = total.hg;
    o[1] = total.gg;
  });
  return out;
}

void look_store_buckets(at::TensorList look_dirs, at::TensorList grads, at::TensorList centers, const at::Tensor& coef,
                        const at::Tensor& found_inf) {
  if (*found_inf.const_data_ptr<float>() != 0.0f) {  // a CPU tensor: reading it is no sync
    return;
  }
  const at::Tensor c = coef.to(acc_scalar_type(look_dirs[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, look_dirs[0].scalar_type(), "fused_lesam::look_store_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = *c.const_data_ptr<acc_t>();
    const size_t count = look_dirs.size();
    const auto dirs = data_of<scalar_t>(look_dirs, count);
    const auto ghats = data_of<const scalar_t>(grads, count);
    const auto gs = data_of<const scalar_t>(centers, count);
    BucketRanges(look_dirs).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      scalar_t* __restrict__ dir = dirs[b];
      const scalar_t* __restrict__ ghat = ghats[b];
      const scalar_t* __restrict__ g = gs[b];
      for (int64_t i = begin; i < end; ++i) {
        dir[i] = static_cast<scalar_t>(math::look_dir(static_cast<acc_t>(ghat[i]), static_cast<acc_t>(g[i]), k));
      }
    });
  });
}

void look_store_cpu(at::Tensor& look_dir, const at::Tensor& grad, const at::Tensor& center, const at::Tensor& coef,
                    const at::Tensor& found_inf) {
  check_look_store_args(look_dir, grad, center, coef, found_inf);
  look_store_buckets(look_dir, grad, center, coef, found_inf);
}

void multi_look_store_cpu(at::TensorList look_dirs, at::TensorList grads, at::TensorList centers,
                          const at::Tensor& coef, const at::Tensor& found_inf) {
  check_multi_look_store_args(look_dirs, grads, centers, coef, found_inf);
  look_store_buckets(look_dirs, grads, centers, coef, found_inf);
}

void look_add_buckets(at::TensorList grads, at::TensorList look_dirs, const at::Tensor& coef) {
  const at::Tensor c = coef.to(acc_scalar_type(grads[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fused_lesam::look_add_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t k = *c.const_data_ptr<acc_t>();
    const size_t count = grads.size();
    const auto gs = data_of<scalar_t>(grads, count);
    const auto dirs = data_of<const scalar_t>(look_dirs, count);
    BucketRanges(grads).parallel_for([&](size_t b, int64_t begin, int64_t end) {
      scalar_t* __restrict__ g = gs[b];
      const scalar_t* __restrict__ dir = dirs[b];
      for (int64_t i = begin; i < end; ++i) {
        g[i] = static_cast<scalar_t>(math::look_added(static_cast<acc_t>(g[i]), static_cast<acc_t>(dir[i]), k));
      }
    });
  });
}

void look_add_cpu(at::Tensor& grad, const at::Tensor& look_dir, const at::Tensor& coef) {
  check_look_add_args(grad, look_dir, coef);
  look_add_buckets(grad, look_dir, coef);
}

void multi_look_add_cpu(at::TensorList grads, at::TensorList look_dirs, const at::Tensor& coef) {
  check_multi_look_add_args(grads, look_dirs, coef);
  look_add_buckets(grads, look_dirs, coef);
}

// ------------------------------------------------------ the base update, fused into the restore
// One instantiation per (momentum or not, center or not) for SGD and (amsgrad or not, center or
// not) for Adam: those decide which arrays the loop touches. Without a backup (a step that
// perturbed nothing) w0 is read from w itself, never through a second pointer to it: the loops'
// pointers are __restrict__, and an alias would be undefined behaviour. The other options are loop-invariant
// selects on plain arithmetic, which the compiler vectorises as they are. The loops are kept out
// of line (noinline): inlined into parallel_for's lambda, GCC lost their __restrict__ and left
// most of Adam's loops scalar (seen with -fopt-info-vec).
template <typename scalar_t, typename acc_t, bool with_momentum, bool with_center, bool with_backup>
[[gnu::noinline]] void sgd_step_range(scalar_t* __restrict__ w, const scalar_t* __restrict__ w0,
                                      const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
                                      const scalar_t* __restrict__ center, const math::SgdCoefs<acc_t> c,
                                      acc_t ghat_coef, acc_t center_coef, bool maximize, int64_t begin,
                                      int64_t end) {
  scalar_t no_buf{};
  for (int64_t i = begin; i < end; ++i) {
    const acc_t gi = math::step_grad<with_center>(static_cast<acc_t>(g[i]),
                                                  with_center ? static_cast<acc_t>(center[i]) : acc_t(0), ghat_coef,
                                                  center_coef, maximize);
    const acc_t start = static_cast<acc_t>(with_backup ? w0[i] : w[i]);
    w[i] = static_cast<scalar_t>(math::sgd_update<with_momentum>(start, gi, with_momentum ? buf[i] : no_buf, c));
  }
}

// The skipped step (found_inf nonzero): w <- w0 bit-exactly (without a backup w is w0 already),
// the state untouched. On the CPU the flag is in host memory, so reading it is no synchronisation.
bool skip_step(const at::Tensor& found_inf, at::Tensor& param, const std::optional<at::Tensor>& backup) {
  if (*found_inf.const_data_ptr<float>() == 0.0f) {
    return false;
  }
  if (!backup.has_value()) {
    return true;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::skip_step", [&] {
    const scalar_t* bak = backup->const_data_ptr<scalar_t>();
    scalar_t* w = param.data_ptr<scalar_t>();
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) { copy_range(bak, w, begin, end); });
  });
  return true;
}

void sgd_step_cpu(at::Tensor& param, const std::optional<at::Tensor>& backup, const at::Tensor& grad,
                  const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& center,
                  const at::Tensor& found_inf, double lr, double momentum, double dampening, double weight_decay,
                  bool nesterov, bool maximize, bool init_buffer, double ghat_coef, double center_coef) {
  check_sgd_step_args(param, backup, grad, momentum_buffer, center, found_inf, momentum);
  if (skip_step(found_inf, param, backup)) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::sgd_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coefs = math::sgd_coefs<acc_t>(lr, momentum, dampening, weight_decay, nesterov, init_buffer);
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.has_value() ? backup->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* buf = momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ctr = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
      auto range = [&](auto momentum_tag, auto center_tag) {
        auto run = [&](auto backup_tag) {
          sgd_step_range<scalar_t, acc_t, decltype(momentum_tag)::value, decltype(center_tag)::value,
                         decltype(backup_tag)::value>(w, bak, g, buf, ctr, coefs, static_cast<acc_t>(ghat_coef),
                                                      static_cast<acc_t>(center_coef), maximize, begin, end);
        };
        bak ? run(std::true_type{}) : run(std::false_type{});
      };
      if (buf) {
        ctr ? range(std::true_type{}, std::true_type{}) : range(std::true_type{}, std::false_type{});
      } else {
        ctr ? range(std::false_type{}, std::true_type{}) : range(std::false_type{}, std::false_type{});
      }
    });
  });
}

template <typename scalar_t, typename acc_t, bool amsgrad, bool with_center, bool with_backup>
[[gnu::noinline]] void adam_step_range(scalar_t* __restrict__ w, const scalar_t* __restrict__ w0,
                                       const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                                       scalar_t* __restrict__ v, scalar_t* __restrict__ vmax,
                                       const scalar_t* __restrict__ center, math::AdamCoefs<acc_t> c,
                                       acc_t ghat_coef, acc_t center_coef, bool maximize, int64_t begin,
                                       int64_t end) {
  // Two options of Adam are selects between two per-element values (the lerp's start, the L2
  // decay), which the compiler vectorises only on a constant condition, and this loop is too large
  // for it to unswitch itself: so each gets its own copy of the loop, where it is a constant.
  auto loop = [&](auto l2_decay, auto lerp_from_end) {
    c.l2_decay = decltype(l2_decay)::value;
    c.beta1_weight.from_end = decltype(lerp_from_end)::value;
    scalar_t no_vmax{};
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gi = math::step_grad<with_center>(static_cast<acc_t>(g[i]),
                                                    with_center ? static_cast<acc_t>(center[i]) : acc_t(0),
                                                    ghat_coef, center_coef, maximize);
      const acc_t start = static_cast<acc_t>(with_backup ? w0[i] : w[i]);
      w[i] = static_cast<scalar_t>(math::adam_update<amsgrad>(start, gi, m[i], v[i], amsgrad ? vmax[i] : no_vmax, c));
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (c.l2_decay) {
    c.beta1_weight.from_end ? loop(yes{}, yes{}) : loop(yes{}, no{});
  } else {
    c.beta1_weight.from_end ? loop(no{}, yes{}) : loop(no{}, no{});
  }
}

void adam_step_cpu(at::Tensor& param, const std::optional<at::Tensor>& backup, const at::Tensor& grad,
                   at::Tensor& exp_avg,
                   at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const std::optional<at::Tensor>& center, const at::Tensor& step, const at::Tensor& found_inf,
                   double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                   bool amsgrad, bool maximize, double ghat_coef, double center_coef) {
  check_adam_step_args(param, backup, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, center, step, found_inf, amsgrad);
  if (skip_step(found_inf, param, backup)) {
    return;
  }
  const double t = *step.const_data_ptr<float>();  // a CPU tensor: reading it is no sync
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::adam_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto coefs = math::adam_coefs<acc_t>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay);
    math::adam_bias_corrections(coefs, t, lr, beta1, beta2);
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.has_value() ? backup->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    scalar_t* vmax = max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ctr = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
      auto range = [&](auto amsgrad_tag, auto center_tag) {
        auto run = [&](auto backup_tag) {
          adam_step_range<scalar_t, acc_t, decltype(amsgrad_tag)::value, decltype(center_tag)::value,
                          decltype(backup_tag)::value>(w, bak, g, m, v, vmax, ctr, coefs,
                                                       static_cast<acc_t>(ghat_coef),
                                                       static_cast<acc_t>(center_coef), maximize, begin, end);
        };
        bak ? run(std::true_type{}) : run(std::false_type{});
      };
      if (vmax) {
        ctr ? range(std::true_type{}, std::true_type{}) : range(std::true_type{}, std::false_type{});
      } else {
        ctr ? range(std::false_type{}, std::true_type{}) : range(std::false_type{}, std::false_type{});
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lesam, CPU, m) {
  m.impl("sq_norm", &sq_norm_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("restore_", &restore_cpu);
  m.impl("xsam_dots", &xsam_dots_cpu);
  m.impl("xsam_restore_", &xsam_restore_cpu);
  m.impl("xsam_probe_", &xsam_probe_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("look_dots", &look_dots_cpu);
  m.impl("look_store_", &look_store_cpu);
  m.impl("look_add_", &look_add_cpu);
  m.impl("multi_perturb_", &multi_perturb_cpu);
  m.impl("multi_restore_", &multi_restore_cpu);
  m.impl("multi_xsam_restore_", &multi_xsam_restore_cpu);
  m.impl("multi_xsam_probe_", &multi_xsam_probe_cpu);
  m.impl("multi_look_store_", &multi_look_store_cpu);
  m.impl("multi_look_add_", &multi_look_add_cpu);
}

}  // namespace fused_lesam
