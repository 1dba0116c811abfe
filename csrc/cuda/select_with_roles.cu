// CUDA kernel of hiprune::select_with_roles: one block per image runs the canonical algorithm of
// csrc/cpu/select_with_roles.cpp with the helpers of hiprune/selection.h:
//   keys = rank_key(object score, i); the n_anchor-th largest key by an 8-bit radix select (8 passes over the
//   keys, shared-memory histograms); anchors; buffers around them; kept count; register keys; radix select again;
//   registers; then the kept tokens compacted in index order with a block prefix sum.
// Keys (8 bytes) and roles (1 byte) per token live in shared memory up to kMaxSharedTokens tokens, else in a
// global workspace; the same code runs on either through a pointer.
//
// No host synchronisation and argument-only shapes, so it runs inside CUDA graphs. The one exception is official
// mode when 5 * n_anchor > budget (known on the host): anchors and buffers may then outnumber the budget, and the
// error needs the kept counts on the host, so they are read back (a sync; such calls cannot be graph-captured).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "block_select.cuh"
#include "cuda_kernels.cuh"
#include "hiprune/checks.h"
#include "hiprune/selection.h"

namespace hiprune {
namespace cuda {
namespace {

constexpr int kSelectThreads = 512;
constexpr int kScanItems = 4;  // consecutive tokens per thread in the compaction
constexpr int kMaxSharedTokens = 16384;

struct SelectParams {
  const float* object_scores;
  int64_t object_stride_b, object_stride_n;
  const float* deep_scores;
  int64_t deep_stride_b, deep_stride_n;
  int n, budget, n_anchor, neighborhood;
  int64_t grid_h, grid_w;
  bool official;
  bool in_shared;         // keys and roles in dynamic shared memory, else in the global workspaces below
  uint64_t* global_keys;  // (B, n) when !in_shared
  int8_t* global_roles;   // (B, n) when !in_shared
  int64_t* indices;       // (B, budget)
  int8_t* roles;          // (B, budget)
  int* kept_counts;       // (B,) or nullptr: anchors + buffers per image, for the official-mode overflow check
};

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectParams p) {
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ RadixState radix;
  extern __shared__ __align__(16) unsigned char dynamic_shared[];

  const int64_t b = blockIdx.x;
  const int64_t n = p.n;  // int64 loop indices: no overflow near N = 2^31
  uint64_t* keys;
  int8_t* role;
  if (p.in_shared) {
    keys = reinterpret_cast<uint64_t*>(dynamic_shared);
    role = reinterpret_cast<int8_t*>(keys + n);
  } else {
    keys = p.global_keys + b * n;
    role = p.global_roles + b * n;
  }
  const float* object = p.object_scores + b * p.object_stride_b;
  const float* deep = p.deep_scores + b * p.deep_stride_b;

  // Anchors: the n_anchor largest object keys. Each thread touches the same tokens i in every per-token loop.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) role[i] = kNotKept;
  if (p.n_anchor > 0) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) keys[i] = rank_key(object[i * p.object_stride_n], i);
    const uint64_t threshold = kth_largest_key(keys, n, p.n_anchor, radix);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (keys[i] >= threshold) role[i] = kAnchor;
    __syncthreads();  // every anchor marked before any neighbour test
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (role[i] == kAnchor) mark_buffers_around(i, role, p.grid_h, p.grid_w, p.neighborhood, p.official);
  }
  __syncthreads();  // roles of anchors and buffers final

  int kept_here = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) kept_here += role[i] != kNotKept;
  int ignored, kept;
  BlockScan(scan_storage).ExclusiveSum(kept_here, ignored, kept);
  __syncthreads();  // scan_storage is reused below
  if (p.kept_counts != nullptr && threadIdx.x == 0) p.kept_counts[b] = kept;

  // Registers: the budget - kept largest deep keys among the tokens not kept. Negative only on an official-mode
  // overflow, which the host reports; the compaction below then stops at the budget.
  const int n_register = p.budget - kept;
  if (n_register > 0) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) keys[i] = register_key(role[i], deep[i * p.deep_stride_n], i);
    const uint64_t threshold = kth_largest_key(keys, n, n_register, radix);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      if (role[i] == kNotKept && keys[i] >= threshold) role[i] = kRegister;
    __syncthreads();  // registers marked before the compaction reads other threads' tokens
  }

  // Kept tokens in increasing index order: thread t owns kScanItems consecutive tokens of each tile.
  int64_t* out_indices = p.indices + b * p.budget;
  int8_t* out_roles = p.roles + b * p.budget;
  int written = 0;
  for (int64_t tile = 0; tile < n; tile += kSelectThreads * kScanItems) {
    const int64_t first = tile + threadIdx.x * kScanItems;
    int flags[kScanItems], positions[kScanItems];
    for (int j = 0; j < kScanItems; ++j) flags[j] = first + j < n && role[first + j] != kNotKept;
    int tile_kept;
    BlockScan(scan_storage).ExclusiveSum(flags, positions, tile_kept);
    for (int j = 0; j < kScanItems; ++j) {
      const int slot = written + positions[j];
      if (flags[j] && slot < p.budget) {
        out_indices[slot] = first + j;
        out_roles[slot] = role[first + j];
      }
    }
    written += tile_kept;
    __syncthreads();  // scan_storage reused by the next tile
    if (written >= p.budget) break;  // the same for every thread
  }
}

int64_t shared_bytes_for(int64_t n) {
  return n * static_cast<int64_t>(sizeof(uint64_t)) + ((n + 15) / 16) * 16;  // keys, then roles
}

// Largest dynamic shared memory select_kernel may use on the current device (opting in once per device, outside
// any stream work, so that graph capture is unaffected).
int64_t shared_limit_for_current_device() {
  static std::mutex mutex;
  static std::unordered_map<int, int64_t> limits;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = limits.find(device);
  if (found != limits.end()) return found->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, select_kernel));
  const int64_t optin = at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin;
  const int64_t static_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
  const int64_t limit = std::min(shared_bytes_for(kMaxSharedTokens), optin - static_bytes);
  if (limit > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(limit)));
  }
  limits[device] = limit;
  return limit;
}

// Float32 scores: reduced from maps (contiguous), or the given (B, N) scores as float32, strides kept.
at::Tensor scores_of(const at::Tensor& input, int64_t num_prefix) {
  if (input.dim() == 4) return attention_scores(input, num_prefix);
  return input.to(at::kFloat);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_with_roles(const at::Tensor& object_attn, const at::Tensor& deep_attn,
                                                     int64_t budget, int64_t grid_h, int64_t grid_w, double alpha,
                                                     int64_t num_prefix, c10::string_view neighborhood,
                                                     bool official) {
  const SelectArgs args =
      check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official);
  TORCH_CHECK_VALUE(object_attn.is_cuda(), "object_attn must be a CUDA tensor here, got ", object_attn.device());
  TORCH_CHECK_VALUE(args.batch <= std::numeric_limits<int32_t>::max(), "object_attn batch is too large: ", args.batch);
  const c10::cuda::CUDAGuard guard(object_attn.device());
  at::Tensor indices = at::empty({args.batch, budget}, object_attn.options().dtype(at::kLong));
  at::Tensor roles = at::empty({args.batch, budget}, object_attn.options().dtype(at::kChar));
  if (args.batch == 0) return {indices, roles};

  const at::Tensor object_scores = scores_of(object_attn, num_prefix);
  const at::Tensor deep_scores = scores_of(deep_attn, num_prefix);
  const int64_t n = args.n;
  const int64_t wanted_shared = shared_bytes_for(n);
  const bool in_shared = n <= kMaxSharedTokens && wanted_shared <= shared_limit_for_current_device();
  at::Tensor key_workspace, role_workspace;
  if (!in_shared) {
    key_workspace = at::empty({args.batch, n}, object_attn.options().dtype(at::kLong));
    role_workspace = at::empty({args.batch, n}, object_attn.options().dtype(at::kChar));
  }
  const bool check_overflow = official_may_overflow(args.n_anchor, budget, official);
  at::Tensor kept_counts;
  if (check_overflow) kept_counts = at::empty({args.batch}, object_attn.options().dtype(at::kInt));

  SelectParams p;
  p.object_scores = object_scores.const_data_ptr<float>();
  p.object_stride_b = object_scores.stride(0);
  p.object_stride_n = object_scores.stride(1);
  p.deep_scores = deep_scores.const_data_ptr<float>();
  p.deep_stride_b = deep_scores.stride(0);
  p.deep_stride_n = deep_scores.stride(1);
  p.n = static_cast<int>(n);
  p.budget = static_cast<int>(budget);
  p.n_anchor = static_cast<int>(args.n_anchor);  // <= budget / 5 + 1 <= N
  p.neighborhood = args.neighborhood;
  p.grid_h = grid_h;
  p.grid_w = grid_w;
  p.official = official;
  p.in_shared = in_shared;
  p.global_keys = in_shared ? nullptr : reinterpret_cast<uint64_t*>(key_workspace.data_ptr<int64_t>());
  p.global_roles = in_shared ? nullptr : role_workspace.data_ptr<int8_t>();
  p.indices = indices.data_ptr<int64_t>();
  p.roles = roles.data_ptr<int8_t>();
  p.kept_counts = check_overflow ? kept_counts.data_ptr<int>() : nullptr;

  const size_t dynamic_bytes = in_shared ? static_cast<size_t>(wanted_shared) : 0;
  select_kernel<<<static_cast<unsigned>(args.batch), kSelectThreads, dynamic_bytes,
                  at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (check_overflow) check_official_kept(kept_counts.max().item<int64_t>(), budget);  // host sync, see top
  return {indices, roles};
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("select_with_roles", &hiprune::cuda::select_with_roles); }
