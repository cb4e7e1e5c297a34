// CUDA kernels of the bucket ops: the maths of lesam_math.h, laid out like ATen's and apex's
// multi-tensor kernels. Loads and stores are 16 bytes wide where every pointer of the call is
// 16-byte aligned (a scalar loop otherwise, and for the tail); the norm is reduced in fixed chunks
// to one partial per chunk, then by one small kernel (no atomics: the same input gives the same
// bits); the scalars (the norm in, rho_t out) stay in device memory and only kernels touch them.
// Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include "../bucket_args.h"
#include "../lesam_math.h"

namespace fused_lesam {
namespace {

constexpr int kThreads = 256;  // per block, a power of two (the block reduction halves it)
constexpr int kVecBytes = 16;  // one 128-bit load or store

template <typename T>
constexpr int vec_len() {
  return kVecBytes / static_cast<int>(sizeof(T));  // 4 fp32, 8 fp16/bf16, 2 fp64
}

template <typename T>
struct alignas(kVecBytes) Vec {
  T v[vec_len<T>()];
};

bool all_aligned(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % kVecBytes != 0) {
      return false;
    }
  }
  return true;
}

// Blocks for a grid-stride loop over `units`: enough to fill the GPU, no more.
int grid_for(int64_t units) {
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t needed = (units + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, fill)));
}

// Sum of `x` over the block, in a fixed tree order; the result is valid in every thread.
template <typename acc_t>
__device__ acc_t block_sum(acc_t x) {
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] += shared[threadIdx.x + half];
    }
    __syncthreads();
  }
  const acc_t sum = shared[0];
  __syncthreads();
  return sum;
}

// --------------------------------------------------------------------- multi-tensor launches
// A multi-tensor launch runs one kernel over every bucket of a list (the multi forms, and the first
// stage of the reductions), in the style of ATen's and apex's multi-tensor kernels: each block
// works on one chunk of one bucket, which it finds in a table built on the host for the call.
//
// The table, one int64 array: per bucket its first block (a prefix sum of the buckets' chunk
// counts; an empty bucket has no block), its size, where its partial sums start (the reductions:
// reduce_layout's first chunk), whether every pointer it has is 16-byte aligned (the vectorized
// path), and its pointers, `roles` of them (0 for an absent optional). A table that fits in
// kInlineWords travels in the kernel's arguments, as ATen's and apex's do (a flat bucket, or a few
// shards: no copy, nothing outside the launch for a CUDA graph to capture); a longer one is copied
// to device memory, so that any number of buckets still takes one launch.
constexpr int64_t kInlineWords = 96;  // 768 bytes of kernel arguments: 8 buckets of 5 roles

struct MultiTable {
  const int64_t* on_device;  // the table in device memory, or nullptr: it is inline_words
  int64_t inline_words[kInlineWords];
  int64_t count;
  int64_t roles;

  __device__ int64_t word(int64_t i) const { return on_device != nullptr ? on_device[i] : inline_words[i]; }
  // bucket b has blocks [first_block(b), first_block(b + 1))
  __device__ int64_t first_block(int64_t b) const { return word(b); }
  __device__ int64_t numel(int64_t b) const { return word(count + 1 + b); }
  __device__ int64_t first_out(int64_t b) const { return word(2 * count + 1 + b); }
  __device__ bool vectorized(int64_t b) const { return word(3 * count + 1 + b) != 0; }
  __device__ int64_t blocks() const { return first_block(count); }

  // The bucket that block `block` (< blocks()) works on: the one whose blocks hold it, found by
  // binary search over the first blocks (an empty bucket's range of blocks is empty: never found).
  __device__ int64_t bucket_of(int64_t block) const {
    int64_t lo = 0, hi = count;  // first_block(lo) <= block < first_block(hi)
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (first_block(mid) <= block) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  template <typename T>
  __device__ T* ptr(int64_t b, int role) const {
    return reinterpret_cast<T*>(static_cast<std::uintptr_t>(word(4 * count + 1 + b * roles + role)));
  }
};

// The table of a multi-tensor launch, collected on the host: add() each bucket, then upload().
class TableBuilder {
 public:
  // roles: pointers per bucket; chunk: elements per block.
  TableBuilder(int64_t roles, int64_t chunk) : roles_(roles), chunk_(chunk) {}

  // A bucket of `numel` elements and its pointers (nullptr for an absent optional), its partial
  // sums from first_out on (the reductions); vectorized: every pointer of it is 16-byte aligned.
  void add(std::initializer_list<const void*> ptrs, int64_t numel, bool vectorized, int64_t first_out = 0) {
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(ptrs.size()) == roles_);
    for (const void* p : ptrs) {
      ptrs_.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p)));
    }
    numel_.push_back(numel);
    first_out_.push_back(first_out);
    vectorized_.push_back(vectorized ? 1 : 0);
    first_block_.push_back(first_block_.back() + (numel + chunk_ - 1) / chunk_);
  }

  // The grid of the launch: one block per chunk of every bucket.
  int64_t blocks() const { return first_block_.back(); }

  // The table for the kernel: inline when it fits, else in device memory, from one non-blocking
  // copy out of pinned memory (torch's caching host allocator keeps the pinned block until the copy
  // has run, and during a CUDA graph capture for good). `memory` then holds the device copy: kept
  // until the launch is queued (the caching allocator reuses freed memory in stream order).
  MultiTable upload(at::Device device, at::Tensor& memory) const {
    TORCH_CHECK(blocks() <= std::numeric_limits<int32_t>::max(), "fused_lesam: a multi-tensor launch of ", blocks(),
                " blocks is more than one grid holds");
    const int64_t count = static_cast<int64_t>(numel_.size());
    const int64_t words = (count + 1) + 3 * count + roles_ * count;
    MultiTable table{};
    table.count = count;
    table.roles = roles_;
    at::Tensor host;
    int64_t* out = table.inline_words;
    if (words > kInlineWords) {
      host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      out = host.data_ptr<int64_t>();
    }
    for (const std::vector<int64_t>* part : {&first_block_, &numel_, &first_out_, &vectorized_, &ptrs_}) {
      out = std::copy(part->begin(), part->end(), out);
    }
    if (host.defined()) {
      memory = host.to(device, at::kLong, /*non_blocking=*/true);
      table.on_device = memory.const_data_ptr<int64_t>();
    }
    return table;
  }

 private:
  int64_t roles_;
  int64_t chunk_;
  std::vector<int64_t> first_block_{0};
  std::vector<int64_t> numel_;
  std::vector<int64_t> first_out_;
  std::vector<int64_t> vectorized_;
  std::vector<int64_t> ptrs_;
};

template <typename scalar_t, typename acc_t, bool weighted>
__device__ acc_t sq_term_at(const scalar_t* g, const scalar_t* w, int64_t i) {
  if constexpr (weighted) {
    return math::sq_term(static_cast<acc_t>(g[i]), static_cast<acc_t>(w[i]));
  } else {
    return math::sq_term(static_cast<acc_t>(g[i]));
  }
}

// One thread's part of the sum of a norm chunk of len elements (g, and w where weighted, start at
// the chunk). Chunk starts are multiples of 16 elements, so an aligned bucket's chunks are aligned.
template <typename scalar_t, typename acc_t, bool weighted>
__device__ acc_t thread_sq_sum(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w, int64_t len,
                               bool vectorized) {
  acc_t sum = 0;
  int64_t done = 0;
  if (vectorized) {
    constexpr int V = vec_len<scalar_t>();
    for (int64_t k = threadIdx.x; k < len / V; k += kThreads) {
      const Vec<scalar_t> gv = reinterpret_cast<const Vec<scalar_t>*>(g)[k];
      Vec<scalar_t> wv;
      if constexpr (weighted) {
        wv = reinterpret_cast<const Vec<scalar_t>*>(w)[k];
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sum += sq_term_at<scalar_t, acc_t, weighted>(gv.v, wv.v, j);
      }
    }
    done = len / V * V;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += kThreads) {
    sum += sq_term_at<scalar_t, acc_t, weighted>(g, w, i);
  }
  return sum;
}

// Stage 1 of the norm, over the buckets of one dtype (table roles: grad, weight or none): each
// block sums one math::kReduceChunk-element chunk of one bucket into its partial, at
// partials[first_out + the chunk's index in its bucket] (reduce_layout's place for it).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sq_partials_kernel(MultiTable table, acc_t* __restrict__ partials) {
  const int64_t b = table.bucket_of(blockIdx.x);
  const int64_t chunk = blockIdx.x - table.first_block(b);
  const int64_t start = chunk * math::kReduceChunk;
  const int64_t len = table.numel(b) - start < math::kReduceChunk ? table.numel(b) - start : math::kReduceChunk;
  const scalar_t* g = table.ptr<const scalar_t>(b, 0) + start;
  const scalar_t* w = table.ptr<const scalar_t>(b, 1);
  const bool vectorized = table.vectorized(b);
  acc_t sum = w != nullptr ? thread_sq_sum<scalar_t, acc_t, true>(g, w + start, len, vectorized)
                           : thread_sq_sum<scalar_t, acc_t, false>(g, nullptr, len, vectorized);
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partials[table.first_out(b) + chunk] = sum;
  }
}

// Stage 2: block j sums the count partials of reduction j (every bucket's) into out[j].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* __restrict__ partials, int64_t count,
                                                                acc_t* __restrict__ out) {
  partials += blockIdx.x * count;
  out += blockIdx.x;
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    sum += partials[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    *out = sum;
  }
}

// The first stage of a reduction over a list that may mix dtypes: launch(dtype, members) once per
// dtype present, members the buckets of that dtype that have elements (in the list's order).
template <typename Launch>
void for_each_dtype(at::TensorList buckets, const Launch& launch) {
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    std::vector<size_t> members;
    for (size_t b = 0; b < buckets.size(); ++b) {
      if (buckets[b].scalar_type() == dtype && buckets[b].numel() > 0) {
        members.push_back(b);
      }
    }
    if (!members.empty()) {
      launch(dtype, members);
    }
  }
}

at::Tensor sq_norm_cuda(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& weights) {
  check_sq_norm_args(grads, weights);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ReduceLayout layout = reduce_layout(grads);
  at::Tensor out = at::empty({}, grads[0].options().dtype(layout.out_type));
  at::Tensor partials = at::empty({layout.total()}, grads[0].options().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::sq_norm", [&] {
    using out_t = scalar_t;
    for_each_dtype(grads, [&](at::ScalarType dtype, const std::vector<size_t>& members) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_lesam::sq_norm", [&] {
        TableBuilder rows(2, math::kReduceChunk);
        for (const size_t b : members) {
          const std::optional<at::Tensor> weight = weights[b];
          const scalar_t* g = grads[b].const_data_ptr<scalar_t>();
          const scalar_t* w = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
          rows.add({g, w}, grads[b].numel(), all_aligned({g, w}), layout.first_chunk[b]);
        }
        at::Tensor table_memory;
        const MultiTable table = rows.upload(grads[0].device(), table_memory);
        sq_partials_kernel<scalar_t, out_t>
            <<<static_cast<unsigned>(rows.blocks()), kThreads, 0, stream>>>(table, partials.data_ptr<out_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    sum_partials_kernel<out_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<out_t>(), layout.total(),
                                                           out.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename acc_t, bool adaptive, bool save_center>
__device__ void perturb_element(scalar_t& w, scalar_t g, scalar_t& backup, scalar_t& center,
                                const math::Radius<acc_t>& r) {
  backup = w;
  if constexpr (save_center) {
    center = g;
  }
  if (r.finite) {
    w = static_cast<scalar_t>(math::perturbed(static_cast<acc_t>(w), static_cast<acc_t>(g), r.scale, adaptive));
  }
}

// Spreads a bucket of n elements over the grid: vec_op(k) for every whole 16-byte vector k, then
// elem_op(i) for the elements after the last vector; elem_op for every element when the call's
// pointers are not all 16-byte aligned.
template <typename scalar_t, typename VecOp, typename ElemOp>
__device__ void grid_stride(int64_t n, bool vectorized, VecOp vec_op, ElemOp elem_op) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  constexpr int V = vec_len<scalar_t>();
  const int64_t done = vectorized ? n / V * V : 0;
  for (int64_t k = first; k < done / V; k += stride) {
    vec_op(k);
  }
  for (int64_t i = done + first; i < n; i += stride) {
    elem_op(i);
  }
}

// The element-wise ops are written once per op as a struct over one bucket's pointers and the
// call's scalars, with vec(k) (16-byte vector k) and elem(i) (element i); the per-bucket kernels
// spread one bucket over the grid (grid_stride), the multi kernels one chunk per block (run_chunk).
template <typename scalar_t, typename Op>
__device__ void grid_stride(int64_t n, bool vectorized, const Op& op) {
  grid_stride<scalar_t>(n, vectorized, [&](int64_t k) { op.vec(k); }, [&](int64_t i) { op.elem(i); });
}

// Elements per block of an element-wise multi launch: a multiple of every vector length, so that
// every chunk of an aligned bucket is aligned.
constexpr int64_t kMultiChunk = int64_t{kThreads} * 16;

// This block's chunk of a multi launch: op_of(b) is the op on bucket b (its table row), run on the
// chunk's elements across the block's threads, vectorized where the bucket's pointers all are.
// Blocks past the table's (the single block of a launch whose buckets are all empty) do nothing.
template <typename scalar_t, typename OpOf>
__device__ void run_chunk(const MultiTable& table, const OpOf& op_of) {
  const int64_t block = blockIdx.x;
  if (block >= table.blocks()) {
    return;
  }
  const int64_t b = table.bucket_of(block);
  const int64_t begin = (block - table.first_block(b)) * kMultiChunk;
  const int64_t end = table.numel(b) - begin < kMultiChunk ? table.numel(b) : begin + kMultiChunk;
  const auto op = op_of(b);
  constexpr int V = vec_len<scalar_t>();
  const int64_t vec_end = table.vectorized(b) ? begin + (end - begin) / V * V : begin;
  for (int64_t k = begin / V + threadIdx.x; k < vec_end / V; k += kThreads) {
    op.vec(k);
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads) {
    op.elem(i);
  }
}

// The host side of an element-wise multi launch: add_rows(rows) adds every bucket to the table, then
// launch(table, grid) queues the one kernel, unless every bucket is empty and at_least_one_block is
// false (multi_perturb_'s kernel also stores rho_t, so it runs even then).
template <typename AddRows, typename Launch>
void multi_launch(at::Device device, int64_t roles, bool at_least_one_block, const AddRows& add_rows,
                  const Launch& launch) {
  TableBuilder rows(roles, kMultiChunk);
  add_rows(rows);
  if (rows.blocks() == 0 && !at_least_one_block) {
    return;
  }
  at::Tensor table_memory;
  const MultiTable table = rows.upload(device, table_memory);
  launch(table, static_cast<unsigned>(std::max<int64_t>(1, rows.blocks())));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One bucket of perturb_: backup <- w where given (a uniform branch: XSAM's later ascent steps
// have none), center <- g (save_center), w <- w + eps unless the radius is not finite.
template <typename scalar_t, typename acc_t, bool adaptive, bool save_center>
struct PerturbOp {
  scalar_t* w;
  const scalar_t* g;
  scalar_t* backup;
  scalar_t* center;
  math::Radius<acc_t> r;

  __device__ void vec(int64_t k) const {
    using VecT = Vec<scalar_t>;
    VecT wv = reinterpret_cast<VecT*>(w)[k];
    const VecT gv = reinterpret_cast<const VecT*>(g)[k];
    VecT bv, cv;
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      perturb_element<scalar_t, acc_t, adaptive, save_center>(wv.v[j], gv.v[j], bv.v[j], cv.v[j], r);
    }
    if (backup != nullptr) {
      reinterpret_cast<VecT*>(backup)[k] = bv;
    }
    if constexpr (save_center) {
      reinterpret_cast<VecT*>(center)[k] = cv;
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
  }

  __device__ void elem(int64_t i) const {
    scalar_t unused, b;
    perturb_element<scalar_t, acc_t, adaptive, save_center>(w[i], g[i], b, save_center ? center[i] : unused, r);
    if (backup != nullptr) {
      backup[i] = b;
    }
  }
};

// Every thread back-solves rho_t from *sq itself (a few flops, no second kernel); block 0 stores it.
// sigma comes from device memory when sigma_t is given (a schedule computed on the device).
template <typename acc_t>
__device__ math::Radius<acc_t> device_radius(const acc_t* sq, const double* sigma_t, acc_t sigma, acc_t rho_max,
                                             acc_t varrho, acc_t* rho_out) {
  const acc_t s = sigma_t != nullptr ? static_cast<acc_t>(*sigma_t) : sigma;
  const math::Radius<acc_t> r = math::radius(*sq, s, rho_max, varrho);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *rho_out = r.rho;
  }
  return r;
}

template <typename scalar_t, typename acc_t, bool adaptive, bool save_center>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ g, scalar_t* __restrict__ backup,
                   scalar_t* __restrict__ center, const acc_t* __restrict__ sq, const double* __restrict__ sigma_t,
                   acc_t sigma, acc_t rho_max, acc_t varrho, acc_t* __restrict__ rho_out, int64_t n, bool vectorized) {
  const math::Radius<acc_t> r = device_radius(sq, sigma_t, sigma, rho_max, varrho, rho_out);
  grid_stride<scalar_t>(n, vectorized, PerturbOp<scalar_t, acc_t, adaptive, save_center>{w, g, backup, center, r});
}

// Table roles: param, grad, backup, center.
template <typename scalar_t, typename acc_t, bool adaptive, bool save_center>
__global__ void __launch_bounds__(kThreads)
    multi_perturb_kernel(MultiTable table, const acc_t* __restrict__ sq, const double* __restrict__ sigma_t,
                         acc_t sigma, acc_t rho_max, acc_t varrho, acc_t* __restrict__ rho_out) {
  const math::Radius<acc_t> r = device_radius(sq, sigma_t, sigma, rho_max, varrho, rho_out);
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return PerturbOp<scalar_t, acc_t, adaptive, save_center>{table.ptr<scalar_t>(b, 0), table.ptr<const scalar_t>(b, 1),
                                                             table.ptr<scalar_t>(b, 2), table.ptr<scalar_t>(b, 3), r};
  });
}

at::Tensor perturb_cuda(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& backup,
                        const at::Tensor& sq,
                        double sigma, double rho_max, double varrho, bool adaptive,
                        const std::optional<at::Tensor>& center, const std::optional<at::Tensor>& sigma_t) {
  check_perturb_args(param, grad, backup, sq, center, sigma_t);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = acc_scalar_type(param.scalar_type());
  const at::Tensor sq_acc = sq.to(acc_type);  // no copy when sq already has the bucket's accumulation type
  at::Tensor rho = at::empty({}, param.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* bak = backup.has_value() ? backup->data_ptr<scalar_t>() : nullptr;
    scalar_t* ctr = center.has_value() ? center->data_ptr<scalar_t>() : nullptr;
    const int64_t n = param.numel();
    const bool vectorized = all_aligned({w, g, bak, ctr});
    const int grid = grid_for(vectorized ? n / vec_len<scalar_t>() : n);
    auto launch = [&](auto adaptive_tag, auto center_tag) {
      perturb_kernel<scalar_t, acc_t, decltype(adaptive_tag)::value, decltype(center_tag)::value>
          <<<grid, kThreads, 0, stream>>>(w, g, bak, ctr, sq_acc.const_data_ptr<acc_t>(),
                                          sigma_t.has_value() ? sigma_t->const_data_ptr<double>() : nullptr,
                                          static_cast<acc_t>(sigma),
                                          static_cast<acc_t>(rho_max), static_cast<acc_t>(varrho),
                                          rho.data_ptr<acc_t>(), n, vectorized);
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (adaptive) {
      ctr ? launch(yes{}, yes{}) : launch(yes{}, no{});
    } else {
      ctr ? launch(no{}, yes{}) : launch(no{}, no{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rho;
}

// One launch over every bucket, even when all are empty: its first block stores rho_t.
at::Tensor multi_perturb_cuda(at::TensorList params, at::TensorList grads,
                              const std::optional<at::TensorList>& backups, const at::Tensor& sq, double sigma,
                              double rho_max, double varrho, bool adaptive, const std::optional<at::TensorList>& centers,
                              const std::optional<at::Tensor>& sigma_t) {
  check_multi_perturb_args(params, grads, backups, sq, centers, sigma_t);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = acc_scalar_type(params[0].scalar_type());
  const at::Tensor sq_acc = sq.to(acc_type);  // no copy when sq already has the buckets' accumulation type
  at::Tensor rho = at::empty({}, params[0].options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::multi_perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto add_rows = [&](TableBuilder& rows) {
      for (size_t b = 0; b < params.size(); ++b) {
        scalar_t* w = params[b].data_ptr<scalar_t>();
        const scalar_t* g = grads[b].const_data_ptr<scalar_t>();
        scalar_t* bak = backups.has_value() ? (*backups)[b].data_ptr<scalar_t>() : nullptr;
        scalar_t* ctr = centers.has_value() ? (*centers)[b].data_ptr<scalar_t>() : nullptr;
        rows.add({w, g, bak, ctr}, params[b].numel(), all_aligned({w, g, bak, ctr}));
      }
    };
    auto launch = [&](const MultiTable& table, unsigned grid) {
      auto run = [&](auto adaptive_tag, auto center_tag) {
        multi_perturb_kernel<scalar_t, acc_t, decltype(adaptive_tag)::value, decltype(center_tag)::value>
            <<<grid, kThreads, 0, stream>>>(table, sq_acc.const_data_ptr<acc_t>(),
                                            sigma_t.has_value() ? sigma_t->const_data_ptr<double>() : nullptr,
                                            static_cast<acc_t>(sigma), static_cast<acc_t>(rho_max),
                                            static_cast<acc_t>(varrho), rho.data_ptr<acc_t>());
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (adaptive) {
        centers.has_value() ? run(yes{}, yes{}) : run(yes{}, no{});
      } else {
        centers.has_value() ? run(no{}, yes{}) : run(no{}, no{});
      }
    };
    multi_launch(params[0].device(), 4, /*at_least_one_block=*/true, add_rows, launch);
  });
  return rho;
}

template <typename scalar_t, typename acc_t, bool combine>
__device__ void restore_element(scalar_t& w, scalar_t backup, scalar_t& g, scalar_t center, acc_t ghat_coef,
                                acc_t center_coef) {
  w = backup;
  if constexpr (combine) {
    g = static_cast<scalar_t>(
        math::combined(static_cast<acc_t>(g), static_cast<acc_t>(center), ghat_coef, center_coef));
  }
}

// One bucket of restore_: w <- backup; with combine, g <- ghat_coef g - center_coef center.
template <typename scalar_t, typename acc_t, bool combine>
struct RestoreOp {
  scalar_t* w;
  const scalar_t* backup;
  scalar_t* g;
  const scalar_t* center;
  acc_t ghat_coef;
  acc_t center_coef;

  __device__ void vec(int64_t k) const {
    using VecT = Vec<scalar_t>;
    const VecT bv = reinterpret_cast<const VecT*>(backup)[k];
    VecT wv, gv, cv;
    if constexpr (combine) {
      gv = reinterpret_cast<const VecT*>(g)[k];
      cv = reinterpret_cast<const VecT*>(center)[k];
    }
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      restore_element<scalar_t, acc_t, combine>(wv.v[j], bv.v[j], gv.v[j], cv.v[j], ghat_coef, center_coef);
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
    if constexpr (combine) {
      reinterpret_cast<VecT*>(g)[k] = gv;
    }
  }

  __device__ void elem(int64_t i) const {
    scalar_t unused;
    restore_element<scalar_t, acc_t, combine>(w[i], backup[i], combine ? g[i] : unused,
                                              combine ? center[i] : scalar_t(0), ghat_coef, center_coef);
  }
};

template <typename scalar_t, typename acc_t, bool combine>
__global__ void __launch_bounds__(kThreads)
    restore_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ backup, scalar_t* __restrict__ g,
                   const scalar_t* __restrict__ center, acc_t ghat_coef, acc_t center_coef, int64_t n,
                   bool vectorized) {
  grid_stride<scalar_t>(n, vectorized, RestoreOp<scalar_t, acc_t, combine>{w, backup, g, center, ghat_coef, center_coef});
}

// Table roles: param, backup, grad, center.
template <typename scalar_t, typename acc_t, bool combine>
__global__ void __launch_bounds__(kThreads)
    multi_restore_kernel(MultiTable table, acc_t ghat_coef, acc_t center_coef) {
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return RestoreOp<scalar_t, acc_t, combine>{table.ptr<scalar_t>(b, 0), table.ptr<const scalar_t>(b, 1),
                                               table.ptr<scalar_t>(b, 2), table.ptr<const scalar_t>(b, 3), ghat_coef,
                                               center_coef};
  });
}

void restore_cuda(at::Tensor& param, const at::Tensor& backup, at::Tensor& grad,
                  const std::optional<at::Tensor>& center, double ghat_coef, double center_coef) {
  check_restore_args(param, backup, grad, center);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* ctr = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    const int64_t n = param.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = ctr ? all_aligned({w, bak, g, ctr}) : all_aligned({w, bak});
    const int grid = grid_for(vectorized ? n / vec_len<scalar_t>() : n);
    if (ctr) {
      restore_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
          w, bak, g, ctr, static_cast<acc_t>(ghat_coef), static_cast<acc_t>(center_coef), n, vectorized);
    } else {
      restore_kernel<scalar_t, acc_t, false>
          <<<grid, kThreads, 0, stream>>>(w, bak, g, ctr, acc_t(1), acc_t(0), n, vectorized);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void multi_restore_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                        const std::optional<at::TensorList>& centers, double ghat_coef, double center_coef) {
  check_multi_restore_args(params, backups, grads, centers);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::multi_restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto add_rows = [&](TableBuilder& rows) {
      for (size_t b = 0; b < params.size(); ++b) {
        scalar_t* w = params[b].data_ptr<scalar_t>();
        const scalar_t* bak = backups[b].const_data_ptr<scalar_t>();
        scalar_t* g = grads[b].data_ptr<scalar_t>();
        const scalar_t* ctr = centers.has_value() ? (*centers)[b].const_data_ptr<scalar_t>() : nullptr;
        rows.add({w, bak, g, ctr}, params[b].numel(), ctr ? all_aligned({w, bak, g, ctr}) : all_aligned({w, bak}));
      }
    };
    auto launch = [&](const MultiTable& table, unsigned grid) {
      if (centers.has_value()) {
        multi_restore_kernel<scalar_t, acc_t, true>
            <<<grid, kThreads, 0, stream>>>(table, static_cast<acc_t>(ghat_coef), static_cast<acc_t>(center_coef));
      } else {
        multi_restore_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(table, acc_t(1), acc_t(0));
      }
    };
    multi_launch(params[0].device(), 4, /*at_least_one_block=*/false, add_rows, launch);
  });
}

// ------------------------------------------------------------------------------------------- XSAM
// Stage 1 of the three XSAM reductions, over the buckets of one dtype (table roles: param, backup,
// grad): each block sums one chunk of one bucket into partials[j * total + c] for j = D^2, g^2, D g
// (D = w - b), c its place in reduce_layout (as in sq_partials_kernel); stage 2 is
// sum_partials_kernel with one block per j.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dots_partials_kernel(MultiTable table, acc_t* __restrict__ partials, int64_t total) {
  const int64_t bucket = table.bucket_of(blockIdx.x);
  const int64_t chunk = blockIdx.x - table.first_block(bucket);
  const int64_t start = chunk * math::kReduceChunk;
  const int64_t n = table.numel(bucket);
  const int64_t len = n - start < math::kReduceChunk ? n - start : math::kReduceChunk;
  const bool vectorized = table.vectorized(bucket);
  const scalar_t* __restrict__ w = table.ptr<const scalar_t>(bucket, 0) + start;
  const scalar_t* __restrict__ b = table.ptr<const scalar_t>(bucket, 1) + start;
  const scalar_t* __restrict__ g = table.ptr<const scalar_t>(bucket, 2) + start;
  math::Dots<acc_t> sum{0, 0, 0};
  auto add = [&](scalar_t wi, scalar_t bi, scalar_t gi) {
    const math::Dots<acc_t> t =
        math::dots_term(static_cast<acc_t>(wi) - static_cast<acc_t>(bi), static_cast<acc_t>(gi));
    sum.dd += t.dd;
    sum.gg += t.gg;
    sum.dg += t.dg;
  };
  int64_t done = 0;
  if (vectorized) {
    constexpr int V = vec_len<scalar_t>();
    for (int64_t k = threadIdx.x; k < len / V; k += kThreads) {
      const Vec<scalar_t> wv = reinterpret_cast<const Vec<scalar_t>*>(w)[k];
      const Vec<scalar_t> bv = reinterpret_cast<const Vec<scalar_t>*>(b)[k];
      const Vec<scalar_t> gv = reinterpret_cast<const Vec<scalar_t>*>(g)[k];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        add(wv.v[j], bv.v[j], gv.v[j]);
      }
    }
    done = len / V * V;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += kThreads) {
    add(w[i], b[i], g[i]);
  }
  const acc_t dd = block_sum(sum.dd);
  const acc_t gg = block_sum(sum.gg);
  const acc_t dg = block_sum(sum.dg);
  if (threadIdx.x == 0) {
    const int64_t c = table.first_out(bucket) + chunk;
    partials[c] = dd;
    partials[total + c] = gg;
    partials[2 * total + c] = dg;
  }
}

at::Tensor xsam_dots_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads) {
  check_xsam_dots_args(params, backups, grads);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ReduceLayout layout = reduce_layout(params);
  const int64_t total = layout.total();
  at::Tensor out = at::empty({3}, params[0].options().dtype(layout.out_type));
  at::Tensor partials = at::empty({3 * total}, params[0].options().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::xsam_dots", [&] {
    using out_t = scalar_t;
    for_each_dtype(params, [&](at::ScalarType dtype, const std::vector<size_t>& members) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_lesam::xsam_dots", [&] {
        TableBuilder rows(3, math::kReduceChunk);
        for (const size_t k : members) {
          const scalar_t* w = params[k].const_data_ptr<scalar_t>();
          const scalar_t* b = backups[k].const_data_ptr<scalar_t>();
          const scalar_t* g = grads[k].const_data_ptr<scalar_t>();
          rows.add({w, b, g}, params[k].numel(), all_aligned({w, b, g}), layout.first_chunk[k]);
        }
        at::Tensor table_memory;
        const MultiTable table = rows.upload(params[0].device(), table_memory);
        dots_partials_kernel<scalar_t, out_t><<<static_cast<unsigned>(rows.blocks()), kThreads, 0, stream>>>(
            table, partials.data_ptr<out_t>(), total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    sum_partials_kernel<out_t><<<3, kThreads, 0, stream>>>(partials.const_data_ptr<out_t>(), total,
                                                           out.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One bucket of xsam_restore_: g <- c0 D + c1 g, w <- backup; D from delta when given, else
// w - backup.
template <typename scalar_t, typename acc_t>
struct XsamRestoreOp {
  scalar_t* w;
  const scalar_t* backup;
  scalar_t* g;
  const scalar_t* delta;
  acc_t c0;
  acc_t c1;

  __device__ void element(scalar_t& wi, scalar_t bi, scalar_t& gi, scalar_t di) const {
    const acc_t d = delta != nullptr ? static_cast<acc_t>(di) : static_cast<acc_t>(wi) - static_cast<acc_t>(bi);
    gi = static_cast<scalar_t>(math::slerped(d, static_cast<acc_t>(gi), c0, c1));
    wi = bi;
  }

  __device__ void vec(int64_t k) const {
    using VecT = Vec<scalar_t>;
    VecT wv = reinterpret_cast<VecT*>(w)[k];
    const VecT bv = reinterpret_cast<const VecT*>(backup)[k];
    VecT gv = reinterpret_cast<VecT*>(g)[k];
    VecT dv;
    if (delta != nullptr) {
      dv = reinterpret_cast<const VecT*>(delta)[k];
    }
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      element(wv.v[j], bv.v[j], gv.v[j], dv.v[j]);
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
    reinterpret_cast<VecT*>(g)[k] = gv;
  }

  __device__ void elem(int64_t i) const { element(w[i], backup[i], g[i], delta != nullptr ? delta[i] : scalar_t(0)); }
};

// coefs read on the device.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    xsam_restore_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ backup, scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ delta, const acc_t* __restrict__ coefs, int64_t n,
                        bool vectorized) {
  grid_stride<scalar_t>(n, vectorized, XsamRestoreOp<scalar_t, acc_t>{w, backup, g, delta, coefs[0], coefs[1]});
}

// Table roles: param, backup, grad, delta.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) multi_xsam_restore_kernel(MultiTable table, const acc_t* __restrict__ coefs) {
  const acc_t c0 = coefs[0];
  const acc_t c1 = coefs[1];
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return XsamRestoreOp<scalar_t, acc_t>{table.ptr<scalar_t>(b, 0), table.ptr<const scalar_t>(b, 1),
                                          table.ptr<scalar_t>(b, 2), table.ptr<const scalar_t>(b, 3), c0, c1};
  });
}

void xsam_restore_cuda(at::Tensor& param, const at::Tensor& backup, at::Tensor& grad,
                       const std::optional<at::Tensor>& delta, const at::Tensor& coefs) {
  check_xsam_restore_args(param, backup, grad, delta, coefs);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coefs.to(acc_scalar_type(param.scalar_type()));  // no copy when it has the type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::xsam_restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* d = delta.has_value() ? delta->const_data_ptr<scalar_t>() : nullptr;
    const int64_t n = param.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({w, bak, g, d});
    xsam_restore_kernel<scalar_t, acc_t><<<grid_for(vectorized ? n / vec_len<scalar_t>() : n), kThreads, 0, stream>>>(
        w, bak, g, d, c.const_data_ptr<acc_t>(), n, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One bucket of xsam_probe_: w <- backup + (c0 D + c1 g); with save_delta, D = w - backup is first
// stored (rounded) in delta.
template <typename scalar_t, typename acc_t>
struct XsamProbeOp {
  scalar_t* w;
  const scalar_t* backup;
  const scalar_t* g;
  scalar_t* delta;
  acc_t c0;
  acc_t c1;
  bool save_delta;

  __device__ void element(scalar_t& wi, scalar_t bi, scalar_t gi, scalar_t& di) const {
    const acc_t b = static_cast<acc_t>(bi);
    if (save_delta) {
      di = static_cast<scalar_t>(static_cast<acc_t>(wi) - b);
    }
    wi = static_cast<scalar_t>(b + math::slerped(static_cast<acc_t>(di), static_cast<acc_t>(gi), c0, c1));
  }

  __device__ void vec(int64_t k) const {
    using VecT = Vec<scalar_t>;
    VecT wv = reinterpret_cast<VecT*>(w)[k];
    const VecT bv = reinterpret_cast<const VecT*>(backup)[k];
    const VecT gv = reinterpret_cast<const VecT*>(g)[k];
    VecT dv = reinterpret_cast<VecT*>(delta)[k];
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      element(wv.v[j], bv.v[j], gv.v[j], dv.v[j]);
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
    if (save_delta) {
      reinterpret_cast<VecT*>(delta)[k] = dv;
    }
  }

  __device__ void elem(int64_t i) const { element(w[i], backup[i], g[i], delta[i]); }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    xsam_probe_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ backup, const scalar_t* __restrict__ g,
                      scalar_t* __restrict__ delta, const acc_t* __restrict__ coefs, bool save_delta, int64_t n,
                      bool vectorized) {
  grid_stride<scalar_t>(n, vectorized,
                        XsamProbeOp<scalar_t, acc_t>{w, backup, g, delta, coefs[0], coefs[1], save_delta});
}

// Table roles: param, backup, grad, delta.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    multi_xsam_probe_kernel(MultiTable table, const acc_t* __restrict__ coefs, bool save_delta) {
  const acc_t c0 = coefs[0];
  const acc_t c1 = coefs[1];
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return XsamProbeOp<scalar_t, acc_t>{table.ptr<scalar_t>(b, 0),       table.ptr<const scalar_t>(b, 1),
                                        table.ptr<const scalar_t>(b, 2), table.ptr<scalar_t>(b, 3),
                                        c0,                              c1,
                                        save_delta};
  });
}

void xsam_probe_cuda(at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad, at::Tensor& delta,
                     const at::Tensor& coefs, bool save_delta) {
  check_xsam_probe_args(param, backup, grad, delta, coefs);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coefs.to(acc_scalar_type(param.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::xsam_probe_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* d = delta.data_ptr<scalar_t>();
    const int64_t n = param.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({w, bak, g, d});
    xsam_probe_kernel<scalar_t, acc_t><<<grid_for(vectorized ? n / vec_len<scalar_t>() : n), kThreads, 0, stream>>>(
        w, bak, g, d, c.const_data_ptr<acc_t>(), save_delta, n, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void multi_xsam_restore_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                             const std::optional<at::TensorList>& deltas, const at::Tensor& coefs) {
  check_multi_xsam_restore_args(params, backups, grads, deltas, coefs);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coefs.to(acc_scalar_type(params[0].scalar_type()));  // no copy when it has the type
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::multi_xsam_restore_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        multi_launch(
            params[0].device(), 4, /*at_least_one_block=*/false,
            [&](TableBuilder& rows) {
              for (size_t b = 0; b < params.size(); ++b) {
                scalar_t* w = params[b].data_ptr<scalar_t>();
                const scalar_t* bak = backups[b].const_data_ptr<scalar_t>();
                scalar_t* g = grads[b].data_ptr<scalar_t>();
                const scalar_t* d = deltas.has_value() ? (*deltas)[b].const_data_ptr<scalar_t>() : nullptr;
                rows.add({w, bak, g, d}, params[b].numel(), all_aligned({w, bak, g, d}));
              }
            },
            [&](const MultiTable& table, unsigned grid) {
              multi_xsam_restore_kernel<scalar_t, acc_t>
                  <<<grid, kThreads, 0, stream>>>(table, c.const_data_ptr<acc_t>());
            });
      });
}

void multi_xsam_probe_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads,
                           at::TensorList deltas, const at::Tensor& coefs, bool save_delta) {
  check_multi_xsam_probe_args(params, backups, grads, deltas, coefs);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coefs.to(acc_scalar_type(params[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_lesam::multi_xsam_probe_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        multi_launch(
            params[0].device(), 4, /*at_least_one_block=*/false,
            [&](TableBuilder& rows) {
              for (size_t b = 0; b < params.size(); ++b) {
                scalar_t* w = params[b].data_ptr<scalar_t>();
                const scalar_t* bak = backups[b].const_data_ptr<scalar_t>();
                const scalar_t* g = grads[b].const_data_ptr<scalar_t>();
                scalar_t* d = deltas[b].data_ptr<scalar_t>();
                rows.add({w, bak, g, d}, params[b].numel(), all_aligned({w, bak, g, d}));
              }
            },
            [&](const MultiTable& table, unsigned grid) {
              multi_xsam_probe_kernel<scalar_t, acc_t>
                  <<<grid, kThreads, 0, stream>>>(table, c.const_data_ptr<acc_t>(), save_delta);
            });
      });
}

// ---------------------------------------------------------------------------------------- LookSAM
// Stage 1 of LookSAM's two reductions, over the buckets of one dtype (table roles: grad, center):
// each block sums one chunk of one bucket into partials[j * total + c] for j = g_hat g, g^2, c its
// place in reduce_layout; stage 2 is sum_partials_kernel with one block per j.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    look_dots_partials_kernel(MultiTable table, acc_t* __restrict__ partials, int64_t total) {
  const int64_t bucket = table.bucket_of(blockIdx.x);
  const int64_t chunk = blockIdx.x - table.first_block(bucket);
  const int64_t start = chunk * math::kReduceChunk;
  const int64_t n = table.numel(bucket);
  const int64_t len = n - start < math::kReduceChunk ? n - start : math::kReduceChunk;
  const bool vectorized = table.vectorized(bucket);
  const scalar_t* __restrict__ ghat = table.ptr<const scalar_t>(bucket, 0) + start;
  const scalar_t* __restrict__ g = table.ptr<const scalar_t>(bucket, 1) + start;
  math::LookDots<acc_t> sum{0, 0};
  auto add = [&](scalar_t hi, scalar_t gi) {
    const math::LookDots<acc_t> t = math::look_dots_term(static_cast<acc_t>(hi), static_cast<acc_t>(gi));
    sum.hg += t.hg;
    sum.gg += t.gg;
  };
  int64_t done = 0;
  if (vectorized) {
    constexpr int V = vec_len<scalar_t>();
    for (int64_t k = threadIdx.x; k < len / V; k += kThreads) {
      const Vec<scalar_t> hv = reinterpret_cast<const Vec<scalar_t>*>(ghat)[k];
      const Vec<scalar_t> gv = reinterpret_cast<const Vec<scalar_t>*>(g)[k];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        add(hv.v[j], gv.v[j]);
      }
    }
    done = len / V * V;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += kThreads) {
    add(ghat[i], g[i]);
  }
  const acc_t hg = block_sum(sum.hg);
  const acc_t gg = block_sum(sum.gg);
  if (threadIdx.x == 0) {
    const int64_t c = table.first_out(bucket) + chunk;
    partials[c] = hg;
    partials[total + c] = gg;
  }
}

at::Tensor look_dots_cuda(at::TensorList grads, at::TensorList centers) {
  check_look_dots_args(grads, centers);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ReduceLayout layout = reduce_layout(grads);
  const int64_t total = layout.total();
  at::Tensor out = at::empty({2}, grads[0].options().dtype(layout.out_type));
  at::Tensor partials = at::empty({2 * total}, grads[0].options().dtype(layout.out_type));
  AT_DISPATCH_FLOATING_TYPES(layout.out_type, "fused_lesam::look_dots", [&] {
    using out_t = scalar_t;
    for_each_dtype(grads, [&](at::ScalarType dtype, const std::vector<size_t>& members) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_lesam::look_dots", [&] {
        TableBuilder rows(2, math::kReduceChunk);
        for (const size_t k : members) {
          const scalar_t* ghat = grads[k].const_data_ptr<scalar_t>();
          const scalar_t* g = centers[k].const_data_ptr<scalar_t>();
          rows.add({ghat, g}, grads[k].numel(), all_aligned({ghat, g}), layout.first_chunk[k]);
        }
        at::Tensor table_memory;
        const MultiTable table = rows.upload(grads[0].device(), table_memory);
        look_dots_partials_kernel<scalar_t, out_t><<<static_cast<unsigned>(rows.blocks()), kThreads, 0, stream>>>(
            table, partials.data_ptr<out_t>(), total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    sum_partials_kernel<out_t><<<2, kThreads, 0, stream>>>(partials.const_data_ptr<out_t>(), total,
                                                           out.data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One bucket of look_store_: dir <- g_hat - k g.
template <typename scalar_t, typename acc_t>
struct LookStoreOp {
  scalar_t* dir;
  const scalar_t* ghat;
  const scalar_t* g;
  acc_t k;

  __device__ scalar_t element(scalar_t hi, scalar_t gi) const {
    return static_cast<scalar_t>(math::look_dir(static_cast<acc_t>(hi), static_cast<acc_t>(gi), k));
  }

  __device__ void vec(int64_t i) const {
    using VecT = Vec<scalar_t>;
    const VecT hv = reinterpret_cast<const VecT*>(ghat)[i];
    const VecT gv = reinterpret_cast<const VecT*>(g)[i];
    VecT dv;
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      dv.v[j] = element(hv.v[j], gv.v[j]);
    }
    reinterpret_cast<VecT*>(dir)[i] = dv;
  }

  __device__ void elem(int64_t i) const { dir[i] = element(ghat[i], g[i]); }
};

// Unless *found_inf (a uniform branch, read on the device); coef read there too.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    look_store_kernel(scalar_t* __restrict__ dir, const scalar_t* __restrict__ ghat, const scalar_t* __restrict__ g,
                      const acc_t* __restrict__ coef, const float* __restrict__ found_inf, int64_t n,
                      bool vectorized) {
  if (*found_inf != 0.0f) {
    return;
  }
  grid_stride<scalar_t>(n, vectorized, LookStoreOp<scalar_t, acc_t>{dir, ghat, g, *coef});
}

// Table roles: look_dir, grad, center.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) multi_look_store_kernel(MultiTable table, const acc_t* __restrict__ coef,
                                                                    const float* __restrict__ found_inf) {
  if (*found_inf != 0.0f) {
    return;
  }
  const acc_t k = *coef;
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return LookStoreOp<scalar_t, acc_t>{table.ptr<scalar_t>(b, 0), table.ptr<const scalar_t>(b, 1),
                                        table.ptr<const scalar_t>(b, 2), k};
  });
}

void look_store_cuda(at::Tensor& look_dir, const at::Tensor& grad, const at::Tensor& center, const at::Tensor& coef,
                     const at::Tensor& found_inf) {
  check_look_store_args(look_dir, grad, center, coef, found_inf);
  const c10::cuda::CUDAGuard guard(look_dir.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coef.to(acc_scalar_type(look_dir.scalar_type()));  // no copy when it has the type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, look_dir.scalar_type(), "fused_lesam::look_store_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dir = look_dir.data_ptr<scalar_t>();
    const scalar_t* ghat = grad.const_data_ptr<scalar_t>();
    const scalar_t* g = center.const_data_ptr<scalar_t>();
    const int64_t n = look_dir.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({dir, ghat, g});
    look_store_kernel<scalar_t, acc_t><<<grid_for(vectorized ? n / vec_len<scalar_t>() : n), kThreads, 0, stream>>>(
        dir, ghat, g, c.const_data_ptr<acc_t>(), found_inf.const_data_ptr<float>(), n, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One bucket of look_add_: g <- g + k dir.
template <typename scalar_t, typename acc_t>
struct LookAddOp {
  scalar_t* g;
  const scalar_t* dir;
  acc_t k;

  __device__ scalar_t element(scalar_t gi, scalar_t di) const {
    return static_cast<scalar_t>(math::look_added(static_cast<acc_t>(gi), static_cast<acc_t>(di), k));
  }

  __device__ void vec(int64_t i) const {
    using VecT = Vec<scalar_t>;
    VecT gv = reinterpret_cast<const VecT*>(g)[i];
    const VecT dv = reinterpret_cast<const VecT*>(dir)[i];
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      gv.v[j] = element(gv.v[j], dv.v[j]);
    }
    reinterpret_cast<VecT*>(g)[i] = gv;
  }

  __device__ void elem(int64_t i) const { g[i] = element(g[i], dir[i]); }
};

// coef read on the device.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    look_add_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ dir, const acc_t* __restrict__ coef,
                    int64_t n, bool vectorized) {
  grid_stride<scalar_t>(n, vectorized, LookAddOp<scalar_t, acc_t>{g, dir, *coef});
}

// Table roles: grad, look_dir.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) multi_look_add_kernel(MultiTable table, const acc_t* __restrict__ coef) {
  const acc_t k = *coef;
  run_chunk<scalar_t>(table, [&](int64_t b) {
    return LookAddOp<scalar_t, acc_t>{table.ptr<scalar_t>(b, 0), table.ptr<const scalar_t>(b, 1), k};
  });
}

void look_add_cuda(at::Tensor& grad, const at::Tensor& look_dir, const at::Tensor& coef) {
  check_look_add_args(grad, look_dir, coef);
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coef.to(acc_scalar_type(grad.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_lesam::look_add_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* dir = look_dir.const_data_ptr<scalar_t>();
    const int64_t n = grad.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({g, dir});
    look_add_kernel<scalar_t, acc_t><<<grid_for(vectorized ? n / vec_len<scalar_t>() : n), kThreads, 0, stream>>>(
        g, dir, c.const_data_ptr<acc_t>(), n, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void multi_look_store_cuda(at::TensorList look_dirs, at::TensorList grads, at::TensorList centers,
                           const at::Tensor& coef, const at::Tensor& found_inf) {
  check_multi_look_store_args(look_dirs, grads, centers, coef, found_inf);
  const c10::cuda::CUDAGuard guard(look_dirs[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coef.to(acc_scalar_type(look_dirs[0].scalar_type()));  // no copy when it has the type
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, look_dirs[0].scalar_type(), "fused_lesam::multi_look_store_", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        multi_launch(
            look_dirs[0].device(), 3, /*at_least_one_block=*/false,
            [&](TableBuilder& rows) {
              for (size_t b = 0; b < look_dirs.size(); ++b) {
                scalar_t* dir = look_dirs[b].data_ptr<scalar_t>();
                const scalar_t* ghat = grads[b].const_data_ptr<scalar_t>();
                const scalar_t* g = centers[b].const_data_ptr<scalar_t>();
                rows.add({dir, ghat, g}, look_dirs[b].numel(), all_aligned({dir, ghat, g}));
              }
            },
            [&](const MultiTable& table, unsigned grid) {
              multi_look_store_kernel<scalar_t, acc_t>
                  <<<grid, kThreads, 0, stream>>>(table, c.const_data_ptr<acc_t>(), found_inf.const_data_ptr<float>());
            });
      });
}

void multi_look_add_cuda(at::TensorList grads, at::TensorList look_dirs, const at::Tensor& coef) {
  check_multi_look_add_args(grads, look_dirs, coef);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor c = coef.to(acc_scalar_type(grads[0].scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "fused_lesam::multi_look_add_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_launch(
        grads[0].device(), 2, /*at_least_one_block=*/false,
        [&](TableBuilder& rows) {
          for (size_t b = 0; b < grads.size(); ++b) {
            scalar_t* g = grads[b].data_ptr<scalar_t>();
            const scalar_t* dir = look_dirs[b].const_data_ptr<scalar_t>();
            rows.add({g, dir}, grads[b].numel(), all_aligned({g, dir}));
          }
        },
        [&](const MultiTable& table, unsigned grid) {
          multi_look_add_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(table, c.const_data_ptr<acc_t>());
        });
  });
}

// ------------------------------------------------------ the base update, fused into the restore
// found_inf (and Adam's step) are read by every thread from device memory: nothing here waits for
// the host, so a whole step can be captured in a CUDA graph. A skipped step (found_inf nonzero, a
// uniform branch) copies w0 into w and writes no state. One instantiation per (momentum or not,
// center or not) for SGD and (amsgrad or not, center or not) for Adam: those decide which arrays
// are loaded and stored; the other options are uniform branches on kernel arguments. Without a
// backup (with_backup false: a step that perturbed nothing) w0 is read from w itself, never
// through a second pointer to it (the pointers are __restrict__), and a skipped step writes nothing.
template <typename scalar_t>
__device__ void copy_bucket(scalar_t* __restrict__ w, const scalar_t* __restrict__ w0, int64_t n, bool vectorized) {
  using VecT = Vec<scalar_t>;
  grid_stride<scalar_t>(
      n, vectorized, [&](int64_t k) { reinterpret_cast<VecT*>(w)[k] = reinterpret_cast<const VecT*>(w0)[k]; },
      [&](int64_t i) { w[i] = w0[i]; });
}

template <typename scalar_t, typename acc_t, bool with_momentum, bool with_center, bool with_backup>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ w0, const scalar_t* __restrict__ g,
                    scalar_t* __restrict__ buf, const scalar_t* __restrict__ center,
                    const float* __restrict__ found_inf, math::SgdCoefs<acc_t> c, acc_t ghat_coef, acc_t center_coef,
                    bool maximize, int64_t n, bool vectorized) {
  if (*found_inf != 0.0f) {
    if constexpr (with_backup) {
      copy_bucket(w, w0, n, vectorized);
    }
    return;
  }
  auto element = [&](scalar_t& wi, scalar_t w0i, scalar_t gi, scalar_t& bi, scalar_t ci) {
    const acc_t ct = with_center ? static_cast<acc_t>(ci) : acc_t(0);
    const acc_t gf = math::step_grad<with_center>(static_cast<acc_t>(gi), ct, ghat_coef, center_coef, maximize);
    wi = static_cast<scalar_t>(math::sgd_update<with_momentum>(static_cast<acc_t>(w0i), gf, bi, c));
  };
  using VecT = Vec<scalar_t>;
  auto vec_op = [&](int64_t k) {
    const VecT w0v = reinterpret_cast<const VecT*>(with_backup ? w0 : w)[k];
    const VecT gv = reinterpret_cast<const VecT*>(g)[k];
    VecT wv, bv, cv;
    if constexpr (with_momentum) {
      bv = reinterpret_cast<const VecT*>(buf)[k];
    }
    if constexpr (with_center) {
      cv = reinterpret_cast<const VecT*>(center)[k];
    }
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      element(wv.v[j], w0v.v[j], gv.v[j], bv.v[j], cv.v[j]);
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
    if constexpr (with_momentum) {
      reinterpret_cast<VecT*>(buf)[k] = bv;
    }
  };
  auto elem_op = [&](int64_t i) {
    scalar_t no_buf;
    element(w[i], with_backup ? w0[i] : w[i], g[i], with_momentum ? buf[i] : no_buf,
            with_center ? center[i] : scalar_t(0));
  };
  grid_stride<scalar_t>(n, vectorized, vec_op, elem_op);
}

void sgd_step_cuda(at::Tensor& param, const std::optional<at::Tensor>& backup, const at::Tensor& grad,
                   const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& center,
                   const at::Tensor& found_inf, double lr, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool init_buffer, double ghat_coef, double center_coef) {
  check_sgd_step_args(param, backup, grad, momentum_buffer, center, found_inf, momentum);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::sgd_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.has_value() ? backup->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* buf = momentum_buffer.has_value() ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ctr = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    const int64_t n = param.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({w, bak, g, buf, ctr});
    const int grid = grid_for(vectorized ? n / vec_len<scalar_t>() : n);
    const auto coefs = math::sgd_coefs<acc_t>(lr, momentum, dampening, weight_decay, nesterov, init_buffer);
    auto launch = [&](auto momentum_tag, auto center_tag) {
      auto run = [&](auto backup_tag) {
        sgd_step_kernel<scalar_t, acc_t, decltype(momentum_tag)::value, decltype(center_tag)::value,
                        decltype(backup_tag)::value>
            <<<grid, kThreads, 0, stream>>>(w, bak, g, buf, ctr, found_inf.const_data_ptr<float>(), coefs,
                                            static_cast<acc_t>(ghat_coef), static_cast<acc_t>(center_coef), maximize,
                                            n, vectorized);
      };
      bak ? run(std::true_type{}) : run(std::false_type{});
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (buf) {
      ctr ? launch(yes{}, yes{}) : launch(yes{}, no{});
    } else {
      ctr ? launch(no{}, yes{}) : launch(no{}, no{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Every thread computes the bias corrections from *step itself (two double pows, no second kernel).
template <typename scalar_t, typename acc_t, bool amsgrad, bool with_center, bool with_backup>
__global__ void __launch_bounds__(kThreads)
    adam_step_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ w0, const scalar_t* __restrict__ g,
                     scalar_t* __restrict__ m, scalar_t* __restrict__ v, scalar_t* __restrict__ vmax,
                     const scalar_t* __restrict__ center, const float* __restrict__ step,
                     const float* __restrict__ found_inf, math::AdamCoefs<acc_t> c, double lr, double beta1,
                     double beta2, acc_t ghat_coef, acc_t center_coef, bool maximize, int64_t n, bool vectorized) {
  if (*found_inf != 0.0f) {
    if constexpr (with_backup) {
      copy_bucket(w, w0, n, vectorized);
    }
    return;
  }
  math::adam_bias_corrections(c, static_cast<double>(*step), lr, beta1, beta2);
  auto element = [&](scalar_t& wi, scalar_t w0i, scalar_t gi, scalar_t& mi, scalar_t& vi, scalar_t& vmaxi,
                     scalar_t ci) {
    const acc_t ct = with_center ? static_cast<acc_t>(ci) : acc_t(0);
    const acc_t gf = math::step_grad<with_center>(static_cast<acc_t>(gi), ct, ghat_coef, center_coef, maximize);
    wi = static_cast<scalar_t>(math::adam_update<amsgrad>(static_cast<acc_t>(w0i), gf, mi, vi, vmaxi, c));
  };
  using VecT = Vec<scalar_t>;
  auto vec_op = [&](int64_t k) {
    const VecT w0v = reinterpret_cast<const VecT*>(with_backup ? w0 : w)[k];
    const VecT gv = reinterpret_cast<const VecT*>(g)[k];
    VecT mv = reinterpret_cast<const VecT*>(m)[k];
    VecT vv = reinterpret_cast<const VecT*>(v)[k];
    VecT wv, vmaxv, cv;
    if constexpr (amsgrad) {
      vmaxv = reinterpret_cast<const VecT*>(vmax)[k];
    }
    if constexpr (with_center) {
      cv = reinterpret_cast<const VecT*>(center)[k];
    }
#pragma unroll
    for (int j = 0; j < vec_len<scalar_t>(); ++j) {
      element(wv.v[j], w0v.v[j], gv.v[j], mv.v[j], vv.v[j], vmaxv.v[j], cv.v[j]);
    }
    reinterpret_cast<VecT*>(w)[k] = wv;
    reinterpret_cast<VecT*>(m)[k] = mv;
    reinterpret_cast<VecT*>(v)[k] = vv;
    if constexpr (amsgrad) {
      reinterpret_cast<VecT*>(vmax)[k] = vmaxv;
    }
  };
  auto elem_op = [&](int64_t i) {
    scalar_t no_vmax;
    element(w[i], with_backup ? w0[i] : w[i], g[i], m[i], v[i], amsgrad ? vmax[i] : no_vmax,
            with_center ? center[i] : scalar_t(0));
  };
  grid_stride<scalar_t>(n, vectorized, vec_op, elem_op);
}

void adam_step_cuda(at::Tensor& param, const std::optional<at::Tensor>& backup, const at::Tensor& grad,
                    at::Tensor& exp_avg,
                    at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                    const std::optional<at::Tensor>& center, const at::Tensor& step, const at::Tensor& found_inf,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay, bool amsgrad, bool maximize, double ghat_coef, double center_coef) {
  check_adam_step_args(param, backup, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, center, step, found_inf, amsgrad);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fused_lesam::adam_step_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = param.data_ptr<scalar_t>();
    const scalar_t* bak = backup.has_value() ? backup->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    scalar_t* vmax = max_exp_avg_sq.has_value() ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ctr = center.has_value() ? center->const_data_ptr<scalar_t>() : nullptr;
    const int64_t n = param.numel();
    if (n == 0) {
      return;
    }
    const bool vectorized = all_aligned({w, bak, g, m, v, vmax, ctr});
    const int grid = grid_for(vectorized ? n / vec_len<scalar_t>() : n);
    const auto coefs = math::adam_coefs<acc_t>(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay);
    auto launch = [&](auto amsgrad_tag, auto center_tag) {
      auto run = [&](auto backup_tag) {
        adam_step_kernel<scalar_t, acc_t, decltype(amsgrad_tag)::value, decltype(center_tag)::value,
                         decltype(backup_tag)::value>
            <<<grid, kThreads, 0, stream>>>(w, bak, g, m, v, vmax, ctr, step.const_data_ptr<float>(),
                                            found_inf.const_data_ptr<float>(), coefs, lr, beta1, beta2,
                                            static_cast<acc_t>(ghat_coef), static_cast<acc_t>(center_coef),
                                            maximize, n, vectorized);
      };
      bak ? run(std::true_type{}) : run(std::false_type{});
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (vmax) {
      ctr ? launch(yes{}, yes{}) : launch(yes{}, no{});
    } else {
      ctr ? launch(no{}, yes{}) : launch(no{}, no{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lesam, CUDA, m) {
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("restore_", &restore_cuda);
  m.impl("xsam_dots", &xsam_dots_cuda);
  m.impl("xsam_restore_", &xsam_restore_cuda);
  m.impl("xsam_probe_", &xsam_probe_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("look_dots", &look_dots_cuda);
  m.impl("look_store_", &look_store_cuda);
  m.impl("look_add_", &look_add_cuda);
  m.impl("multi_perturb_", &multi_perturb_cuda);
  m.impl("multi_restore_", &multi_restore_cuda);
  m.impl("multi_xsam_restore_", &multi_xsam_restore_cuda);
  m.impl("multi_xsam_probe_", &multi_xsam_probe_cuda);
  m.impl("multi_look_store_", &multi_look_store_cuda);
  m.impl("multi_look_add_", &multi_look_add_cuda);
}

}  // namespace fused_lesam
