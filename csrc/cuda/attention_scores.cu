// CUDA kernel of hiprune::attention_scores: one pass over the maps. A block reduces one 32-column tile over one
// chunk of the H * L (head, query row) rows; the threads of a warp read 32 consecutive columns of a row, so the
// loads are coalesced whatever H and L are. Per-chunk float64 partial sums go to a workspace and are reduced in
// a fixed order (no atomics): deterministic, and the float64 sums round to the CPU kernel's float32 means.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda_kernels.cuh"
#include "hiprune/checks.h"

namespace hiprune {
namespace cuda {
namespace {

constexpr int kTileColumns = 32;  // one warp spans a tile's columns
constexpr int kRowLanes = 8;      // warps per block, each summing every kRowLanes-th row of the chunk
constexpr int64_t kMinRowsPerChunk = 64;
constexpr int64_t kTargetBlocks = 1024;  // enough blocks to fill a GPU when B * tiles is small
constexpr int kFinishThreads = 256;

struct MapLayout {
  int64_t stride_b, stride_h, stride_q, stride_col;
  int64_t heads, length, n, num_prefix;
  int64_t tiles, chunks, rows_per_chunk;
};

// partial[b, chunk, j] = sum over the chunk's rows (h, q) of attn[b, h, q, num_prefix + j], in float64.
template <typename scalar_t, bool kUnitColumnStride>
__global__ void __launch_bounds__(kTileColumns* kRowLanes)
    column_partial_sums(const scalar_t* __restrict__ attn, MapLayout m, double* __restrict__ partial) {
  __shared__ double lane_sums[kRowLanes][kTileColumns];
  const int64_t block = blockIdx.x;
  const int64_t tile = block % m.tiles;
  const int64_t chunk = (block / m.tiles) % m.chunks;
  const int64_t b = block / (m.tiles * m.chunks);
  const int64_t col = tile * kTileColumns + threadIdx.x;
  const int64_t row_end = ::min(m.heads * m.length, (chunk + 1) * m.rows_per_chunk);
  double sum = 0.0;
  if (col < m.n) {
    const int64_t col_offset = kUnitColumnStride ? m.num_prefix + col : (m.num_prefix + col) * m.stride_col;
    const scalar_t* column = attn + b * m.stride_b + col_offset;
    const int64_t step = kRowLanes * m.stride_q;
    int64_t row = chunk * m.rows_per_chunk + threadIdx.y;
    while (row < row_end) {  // one iteration per head the chunk touches
      const int64_t h = row / m.length;
      const int64_t head_end = ::min(row_end, (h + 1) * m.length);
      const scalar_t* value = column + h * m.stride_h + (row - h * m.length) * m.stride_q;
#pragma unroll 4
      for (; row < head_end; row += kRowLanes, value += step) sum += static_cast<double>(static_cast<float>(*value));
    }
  }
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < m.n) {
    double total = 0.0;
    for (int lane = 0; lane < kRowLanes; ++lane) total += lane_sums[lane][threadIdx.x];
    partial[(b * m.chunks + chunk) * m.n + col] = total;
  }
}

template <typename scalar_t>
void launch_partial_sums(const at::Tensor& attn, const MapLayout& m, int64_t blocks, double* partial) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kTileColumns, kRowLanes);
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  if (m.stride_col == 1) {
    column_partial_sums<scalar_t, true><<<blocks, block, 0, stream>>>(data, m, partial);
  } else {
    column_partial_sums<scalar_t, false><<<blocks, block, 0, stream>>>(data, m, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[b, j] = float32(sum over chunks of partial[b, chunk, j] / count), chunks in increasing order.
__global__ void finish_means(const double* __restrict__ partial, int64_t batch, int64_t chunks, int64_t n,
                             double count, float* __restrict__ out) {
  const int64_t total = batch * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / n, j = idx % n;
    const double* column = partial + b * chunks * n + j;
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += column[c * n];
    out[idx] = static_cast<float>(sum / count);
  }
}

}  // namespace

at::Tensor attention_scores(const at::Tensor& attn, int64_t num_prefix) {
  const int64_t n = check_attention_map(attn, num_prefix, "attn");
  TORCH_CHECK_VALUE(attn.is_cuda(), "attn must be a CUDA tensor here, got ", attn.device());
  const c10::cuda::CUDAGuard guard(attn.device());
  const int64_t batch = attn.size(0), heads = attn.size(1), length = attn.size(2);
  at::Tensor out = at::empty({batch, n}, attn.options().dtype(at::kFloat));
  if (batch == 0) return out;

  // The chunking depends on the shape only, so results do not depend on the GPU model.
  MapLayout m{attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3), heads, length, n, num_prefix, 0, 0, 0};
  const int64_t rows = heads * length;
  m.tiles = (n + kTileColumns - 1) / kTileColumns;
  const int64_t max_chunks = (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk;
  const int64_t want_chunks = (kTargetBlocks + batch * m.tiles - 1) / (batch * m.tiles);
  m.chunks = std::max<int64_t>(1, std::min(max_chunks, want_chunks));
  m.rows_per_chunk = (rows + m.chunks - 1) / m.chunks;
  m.chunks = (rows + m.rows_per_chunk - 1) / m.rows_per_chunk;  // no empty chunk
  const int64_t blocks = batch * m.chunks * m.tiles;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "attn is too large for one launch: ", blocks,
                    " blocks");

  at::Tensor partial = at::empty({batch, m.chunks, n}, attn.options().dtype(at::kDouble));
  double* partial_data = partial.data_ptr<double>();
  AT_DISPATCH_SWITCH(attn.scalar_type(), "hiprune_attention_scores_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_partial_sums<scalar_t>(attn, m, blocks, partial_data); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch_partial_sums<scalar_t>(attn, m, blocks, partial_data); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { launch_partial_sums<scalar_t>(attn, m, blocks, partial_data); }));

  const int64_t total = batch * n;
  const int64_t finish_blocks = std::min<int64_t>((total + kFinishThreads - 1) / kFinishThreads, 65536);
  finish_means<<<finish_blocks, kFinishThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      partial_data, batch, m.chunks, n, static_cast<double>(heads) * static_cast<double>(length),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("attention_scores", &hiprune::cuda::attention_scores); }
