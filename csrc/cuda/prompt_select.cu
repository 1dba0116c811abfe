// CUDA kernel of hiprune::prompt_select (HiPrune++), three launches on the current stream, no host synchronisation:
//   mark_kept_kernel (one block per image): each token's slot in the kept list, or kNotKeptSlot;
//   cosine_kernel (one warp per token): float64 sums over the channels for the tokens not kept, rounded once;
//   merge_kernel (one block per image): keys (hiprune/prompt.h), the extra-th largest by the shared radix select,
//   then the kept and the added tokens compacted in index order with a block prefix sum.
// The values of indices are trusted (checking them would synchronise): any value stays in bounds.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>

#include "block_select.cuh"
#include "hiprune/checks.h"
#include "hiprune/prompt.h"

namespace hiprune {
namespace cuda {
namespace {

constexpr int kMarkThreads = 256;
constexpr int kCosineWarps = 8;  // tokens per block of cosine_kernel
constexpr int kMergeThreads = 512;
constexpr int kMergeItems = 4;  // consecutive tokens per thread in the compaction

__global__ void __launch_bounds__(kMarkThreads)
    mark_kept_kernel(const int64_t* indices, int32_t* slots, int64_t n, int64_t kept) {
  const int64_t b = blockIdx.x;
  int32_t* slot = slots + b * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) slot[i] = kNotKeptSlot;
  __syncthreads();  // every slot cleared before any is set
  for (int64_t j = threadIdx.x; j < kept; j += blockDim.x) {
    const int64_t i = indices[b * kept + j];
    if (i >= 0 && i < n) slot[i] = static_cast<int32_t>(j);
  }
}

template <typename feature_t, typename prompt_t>
__global__ void __launch_bounds__(kCosineWarps * 32)
    cosine_kernel(const feature_t* features, int64_t f_sb, int64_t f_sn, int64_t f_sc, const prompt_t* prompt,
                  int64_t p_sb, int64_t p_sc, const int32_t* slots, float* cosines, int64_t batch, int64_t n,
                  int64_t channels) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kCosineWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n) return;  // per warp, as every branch below: the shuffles need the whole warp
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {  // gridDim.y is at most 65535
    if (slots[b * n + i] != kNotKeptSlot) continue;          // kept tokens' features are never read
    const feature_t* f = features + b * f_sb + i * f_sn;
    const prompt_t* p = prompt + b * p_sb;
    // Each warp also sums the prompt's norm: the same lanes in the same order, so every warp gets the same value.
    double dot = 0.0, ff = 0.0, pp = 0.0;
    for (int64_t c = lane; c < channels; c += 32) {
      const double x = static_cast<double>(static_cast<float>(f[c * f_sc]));
      const double y = static_cast<double>(static_cast<float>(p[c * p_sc]));
      dot += x * y;  // products of float32 values are exact in float64: a fused multiply-add rounds the same
      ff += x * x;
      pp += y * y;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      dot += __shfl_xor_sync(0xFFFFFFFFu, dot, offset);
      ff += __shfl_xor_sync(0xFFFFFFFFu, ff, offset);
      pp += __shfl_xor_sync(0xFFFFFFFFu, pp, offset);
    }
    if (lane == 0) cosines[b * n + i] = prompt_cosine(dot, ff, pp);
  }
}

__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const float* cosines, const int32_t* slots, uint64_t* keys_workspace, const int8_t* roles,
                 int64_t* out_indices, int8_t* out_roles, int64_t n, int64_t kept, int64_t extra) {
  using BlockScan = cub::BlockScan<int, kMergeThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ RadixState radix;
  const int64_t b = blockIdx.x;
  const int32_t* slot = slots + b * n;
  const float* cosine = cosines + b * n;
  uint64_t* keys = keys_workspace + b * n;
  const int64_t out_len = kept + extra;

  uint64_t threshold = kNoPromptThreshold;
  if (extra > 0) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) keys[i] = prompt_key(slot[i], cosine[i], i);
    threshold = kth_largest_key(keys, n, static_cast<int>(extra), radix);  // its first barrier publishes the keys
  }

  // Chosen tokens in increasing index order: thread t owns kMergeItems consecutive tokens of each tile.
  const int8_t* kept_roles = roles + b * kept;
  int64_t written = 0;
  for (int64_t tile = 0; tile < n; tile += kMergeThreads * kMergeItems) {
    const int64_t first = tile + threadIdx.x * kMergeItems;
    int flags[kMergeItems], positions[kMergeItems];
    for (int j = 0; j < kMergeItems; ++j) {
      const int64_t i = first + j;
      flags[j] = i < n && prompt_chosen(slot[i], extra > 0 ? keys[i] : kExcludedKey, threshold);
    }
    int tile_chosen;
    BlockScan(scan_storage).ExclusiveSum(flags, positions, tile_chosen);
    for (int j = 0; j < kMergeItems; ++j) {
      const int64_t position = written + positions[j];
      if (flags[j] && position < out_len) {
        out_indices[b * out_len + position] = first + j;
        out_roles[b * out_len + position] = prompt_role(slot[first + j], kept_roles);
      }
    }
    written += tile_chosen;
    __syncthreads();  // scan_storage reused by the next tile
    if (written >= out_len) break;  // the same for every thread
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prompt_select(const at::Tensor& features, const at::Tensor& prompt,
                                                 const at::Tensor& indices, const at::Tensor& roles, int64_t extra) {
  const PromptArgs args = check_prompt_args(features, prompt, indices, roles, extra);
  TORCH_CHECK_VALUE(features.is_cuda(), "features must be a CUDA tensor here, got ", features.device());
  TORCH_CHECK_VALUE(args.batch <= std::numeric_limits<int32_t>::max() / 2, "features batch is too large: ",
                    args.batch);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t out_len = args.kept + extra;
  at::Tensor out_indices = at::empty({args.batch, out_len}, indices.options());
  at::Tensor out_roles = at::empty({args.batch, out_len}, roles.options());
  if (args.batch == 0 || out_len == 0) return {out_indices, out_roles};

  const int64_t n = args.n;
  const at::Tensor kept_indices = indices.contiguous();
  const at::Tensor kept_roles = roles.contiguous();
  at::Tensor slots = at::empty({args.batch, n}, features.options().dtype(at::kInt));
  at::Tensor cosines = at::empty({args.batch, n}, features.options().dtype(at::kFloat));
  at::Tensor keys = at::empty({args.batch, extra > 0 ? n : 0}, features.options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid_b = static_cast<unsigned>(args.batch);

  mark_kept_kernel<<<grid_b, kMarkThreads, 0, stream>>>(kept_indices.const_data_ptr<int64_t>(),
                                                        slots.data_ptr<int32_t>(), n, args.kept);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (extra > 0) {
    const dim3 grid(static_cast<unsigned>((n + kCosineWarps - 1) / kCosineWarps),
                    static_cast<unsigned>(std::min<int64_t>(args.batch, 65535)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prompt_select", [&] {
      using feature_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt.scalar_type(), "prompt_select", [&] {
        cosine_kernel<feature_t, scalar_t><<<grid, kCosineWarps * 32, 0, stream>>>(
            features.const_data_ptr<feature_t>(), features.stride(0), features.stride(1), features.stride(2),
            prompt.const_data_ptr<scalar_t>(), prompt.stride(0), prompt.stride(1), slots.const_data_ptr<int32_t>(),
            cosines.data_ptr<float>(), args.batch, n, args.channels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  merge_kernel<<<grid_b, kMergeThreads, 0, stream>>>(
      cosines.const_data_ptr<float>(), slots.const_data_ptr<int32_t>(),
      reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), kept_roles.const_data_ptr<int8_t>(),
      out_indices.data_ptr<int64_t>(), out_roles.data_ptr<int8_t>(), n, args.kept, extra);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_indices, out_roles};
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("prompt_select", &hiprune::cuda::prompt_select); }
