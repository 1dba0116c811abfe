// CUDA kernel of hiprune::qk_scores: received attention from q and k, flash-style, never holding the (L, L) map.
//
//   token_segment_kernel (packed input only): the segment of each token, from cu_seqlens read on the device.
//   row_lse_kernel:    per (query row, head), the base-2 log-sum-exp of its logits over the keys of its segment;
//                      skipped when the caller passes lse (natural log, converted to base 2 here).
//   column_sum_kernel: per (key, head), the sum over the queries of its segment of exp2(logit - lse): the logits
//                      are recomputed tile by tile; each block owns its key columns, so no atomics are needed and
//                      the result is deterministic.
//   finalize_kernel:   the sum over heads in a fixed order, divided by H x (queries of the segment).
// Extra memory: 2 x H x tokens floats (and tokens ints when packed). No host sync: cu_seqlens is never read on
// the host; its values are clamped into [0, T] on the device, so any values keep every access in bounds (bad
// values give meaningless scores, NaN for tokens outside every segment, never a fault).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "hiprune/checks.h"

namespace hiprune {
namespace cuda {
namespace {

constexpr int kTile = 64;                   // query rows and key columns per tile
constexpr int kChunk = 32;                  // channels of q and k staged in shared memory at a time
constexpr int kThreads = 256;               // 16 x 16 threads, each owning 4 rows x 4 columns of a tile
constexpr int kLanesPerRow = 16;            // threads sharing a row: one half-warp
constexpr int kFinalizeThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

// Strides of q or k: element (z, h, t, d) sits at z * Layout::z + h * Layout::h + t * Layout::t + d * Layout::d.
struct Layout {
  int64_t z, h, t, d;
};

// Segment bounds from cu_seqlens, clamped into [0, tokens]. cu == nullptr: all tokens form one segment.
struct Segments {
  const int32_t* cu;
  int64_t stride;
  int count;   // S
  int tokens;  // T (packed) or L

  __device__ int bound(int s) const {
    const int v = cu[s * stride];
    return v < 0 ? 0 : (v > tokens ? tokens : v);
  }
  // Segment id of token t (-1: none, or t out of range); token_segment holds them when packed.
  __device__ int of(const int32_t* token_segment, int64_t t) const {
    if (t < 0 || t >= tokens) return -1;
    return cu == nullptr ? 0 : token_segment[t];
  }
  __device__ int begin(int s) const { return cu == nullptr ? 0 : bound(s); }
  __device__ int end(int s) const { return cu == nullptr ? tokens : bound(s + 1); }
};

// Largest s in [0, S - 1] with bound(s) <= t; the token belongs to it only if t < bound(s + 1). Terminates, and
// stays in bounds, whatever cu_seqlens holds.
__global__ void token_segment_kernel(Segments seg, int32_t* token_segment) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= seg.tokens) return;
  int lo = 0, hi = seg.count - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (seg.bound(mid) <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  token_segment[t] = (seg.bound(lo) <= t && t < seg.bound(lo + 1)) ? lo : -1;
}

// Stages channels [d0, d0 + kChunk) of tokens [first, first + kTile) as float, times factor; zeros outside.
template <typename scalar_t>
__device__ void stage_chunk(float (*dst)[kChunk + 1], const scalar_t* base, const Layout& layout, int64_t first,
                            int tokens, int d0, int dim, float factor) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t t = first + r;
    const int d = d0 + c;
    float value = 0.f;
    if (t < tokens && d < dim) value = static_cast<float>(base[t * layout.t + d * layout.d]) * factor;
    dst[r][c] = value;
  }
}

// acc[i][c] = logit(row0 + 4 * ty + i, col0 + tx + 16 * c) in base 2 (q is staged times scale * log2(e)).
// Starts and ends with a barrier: shared data written before the call is visible after it, and the staged chunks
// may be overwritten as soon as it returns.
template <typename scalar_t>
__device__ void tile_logits(float acc[4][4], float (*s_q)[kChunk + 1], float (*s_k)[kChunk + 1],
                            const scalar_t* q_base, const Layout& lq, const scalar_t* k_base, const Layout& lk,
                            int64_t row0, int64_t col0, int tokens, int dim, float factor) {
  const int tx = threadIdx.x % kLanesPerRow, ty = threadIdx.x / kLanesPerRow;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;
  }
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();  // every thread is done with the previous chunk
    stage_chunk(s_q, q_base, lq, row0, tokens, d0, dim, factor);
    stage_chunk(s_k, k_base, lk, col0, tokens, d0, dim, 1.f);
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < kChunk; ++dd) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = s_q[4 * ty + i][dd];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = s_k[tx + kLanesPerRow * c][dd];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(a[i], b[c], acc[i][c]);
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The token range [lo, hi) covering the segments of tokens [first, first + kTile) (empty if none has one).
__device__ void segment_span(const Segments& seg, const int32_t* token_segment, int64_t first, int* s_lo, int* s_hi) {
  if (threadIdx.x == 0) {
    *s_lo = seg.tokens;
    *s_hi = 0;
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int s = seg.of(token_segment, first + threadIdx.x);
    if (s >= 0) {
      atomicMin(s_lo, seg.begin(s));
      atomicMax(s_hi, seg.end(s));
    }
  }
  __syncthreads();
}

// Grid (query tiles, H, Z). lse[(z, h, t)] = log2(sum over keys of its segment of exp2(logit)); +inf if none.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_lse_kernel(const scalar_t* __restrict__ q, Layout lq, const scalar_t* __restrict__ k, Layout lk, int dim,
                   float factor, Segments seg, const int32_t* __restrict__ token_segment, float* __restrict__ lse) {
  __shared__ float s_q[kTile][kChunk + 1];
  __shared__ float s_k[kTile][kChunk + 1];
  __shared__ int s_key_segment[kTile];
  __shared__ int s_lo, s_hi;
  const int z = blockIdx.z, h = blockIdx.y;
  const int tx = threadIdx.x % kLanesPerRow, ty = threadIdx.x / kLanesPerRow;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const scalar_t* q_base = q + z * lq.z + h * lq.h;
  const scalar_t* k_base = k + z * lk.z + h * lk.h;

  int row_segment[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) row_segment[i] = seg.of(token_segment, row0 + 4 * ty + i);
  segment_span(seg, token_segment, row0, &s_lo, &s_hi);
  const int key_lo = s_lo, key_hi = s_hi;

  float m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  for (int64_t col0 = key_lo; col0 < key_hi; col0 += kTile) {
    __syncthreads();  // the previous tile's masks are no longer read
    if (threadIdx.x < kTile) s_key_segment[threadIdx.x] = seg.of(token_segment, col0 + threadIdx.x);
    float acc[4][4];
    tile_logits(acc, s_q, s_k, q_base, lq, k_base, lk, row0, col0, seg.tokens, dim, factor);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s[4];
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool valid = row_segment[i] >= 0 && s_key_segment[tx + kLanesPerRow * c] == row_segment[i];
        s[c] = valid ? acc[i][c] : -INFINITY;
        tile_max = fmaxf(tile_max, s[c]);
      }
      const float new_m = fmaxf(m[i], half_warp_max(tile_max));
      float partial = 0.f;
      if (new_m != -INFINITY) {
#pragma unroll
        for (int c = 0; c < 4; ++c) partial += exp2f(s[c] - new_m);
      }
      partial = half_warp_sum(partial);  // every lane takes part: the shuffles are outside the branches
      if (new_m != -INFINITY) {
        l[i] = l[i] * exp2f(m[i] - new_m) + partial;
        m[i] = new_m;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t t = row0 + 4 * ty + i;
      if (t < seg.tokens) lse[(int64_t(z) * gridDim.y + h) * seg.tokens + t] = l[i] > 0.f ? m[i] + log2f(l[i]) : INFINITY;
    }
  }
}

// Grid (key tiles, H, Z). col_sum[(z, h, j)] = sum over the queries t of j's segment of exp2(logit(t, j) - lse[t]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const scalar_t* __restrict__ q, Layout lq, const scalar_t* __restrict__ k, Layout lk, int dim,
                      float factor, Segments seg, const int32_t* __restrict__ token_segment,
                      const float* __restrict__ lse, float* __restrict__ col_sum) {
  __shared__ float s_q[kTile][kChunk + 1];
  __shared__ float s_k[kTile][kChunk + 1];
  __shared__ int s_row_segment[kTile];
  __shared__ float s_row_lse[kTile];
  __shared__ float s_partial[kThreads / kLanesPerRow][kTile + 1];
  __shared__ int s_lo, s_hi;
  const int z = blockIdx.z, h = blockIdx.y;
  const int tx = threadIdx.x % kLanesPerRow, ty = threadIdx.x / kLanesPerRow;
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const scalar_t* q_base = q + z * lq.z + h * lq.h;
  const scalar_t* k_base = k + z * lk.z + h * lk.h;
  const float* head_lse = lse + (int64_t(z) * gridDim.y + h) * seg.tokens;

  int key_segment[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) key_segment[c] = seg.of(token_segment, col0 + tx + kLanesPerRow * c);
  segment_span(seg, token_segment, col0, &s_lo, &s_hi);
  const int query_lo = s_lo, query_hi = s_hi;

  float column[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t row0 = query_lo; row0 < query_hi; row0 += kTile) {
    __syncthreads();  // the previous tile's rows are no longer read
    if (threadIdx.x < kTile) {
      const int64_t t = row0 + threadIdx.x;
      s_row_segment[threadIdx.x] = seg.of(token_segment, t);
      s_row_lse[threadIdx.x] = t < seg.tokens ? head_lse[t] : INFINITY;
    }
    float acc[4][4];
    tile_logits(acc, s_q, s_k, q_base, lq, k_base, lk, row0, col0, seg.tokens, dim, factor);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * ty + i;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool valid = key_segment[c] >= 0 && s_row_segment[r] == key_segment[c];
        column[c] += valid ? exp2f(acc[i][c] - s_row_lse[r]) : 0.f;
      }
    }
  }
  // Sum the 16 row groups of each column in a fixed order.
#pragma unroll
  for (int c = 0; c < 4; ++c) s_partial[ty][tx + kLanesPerRow * c] = column[c];
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int64_t j = col0 + threadIdx.x;
    float total = 0.f;
    for (int g = 0; g < kThreads / kLanesPerRow; ++g) total += s_partial[g][threadIdx.x];
    if (j < seg.tokens) col_sum[(int64_t(z) * gridDim.y + h) * seg.tokens + j] = total;
  }
}

// out[z, j - first_column] = sum over heads of col_sum[z, h, j] / (heads x queries of j's segment).
__global__ void finalize_kernel(const float* __restrict__ col_sum, int heads, int64_t batch, int first_column,
                                Segments seg, const int32_t* __restrict__ token_segment, float* __restrict__ out) {
  const int64_t columns = seg.tokens - first_column;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * columns) return;
  const int64_t z = index / columns, j = first_column + index % columns;
  const int s = seg.of(token_segment, j);
  if (s < 0) {
    out[index] = NAN;  // only with bad cu_seqlens: the token lies in no segment
    return;
  }
  double total = 0.0;
  for (int h = 0; h < heads; ++h) total += col_sum[(z * heads + h) * seg.tokens + j];
  const double queries = double(seg.end(s) - seg.begin(s));
  out[index] = float(total / (double(heads) * queries));
}

int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

}  // namespace

at::Tensor qk_scores(const at::Tensor& q, const at::Tensor& k, double scale, int64_t num_prefix,
                     const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& lse) {
  check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor here, got ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  const bool packed = cu_seqlens.has_value();
  const int64_t batch = packed ? 1 : q.size(0);
  const int64_t tokens = packed ? q.size(0) : q.size(2);
  const int64_t heads = q.size(1), dim = q.size(-1);
  at::Tensor out = packed ? at::empty({tokens}, q.options().dtype(at::kFloat))
                          : at::empty({batch, tokens - num_prefix}, q.options().dtype(at::kFloat));
  if (batch == 0 || tokens == 0) return out;
  TORCH_CHECK_VALUE(heads <= 65535, "q has ", heads, " heads; the CUDA kernel takes at most 65535");
  TORCH_CHECK_VALUE(batch <= 65535, "q has batch ", batch, "; the CUDA kernel takes at most 65535");
  TORCH_CHECK_VALUE(tokens <= std::numeric_limits<int32_t>::max() - kTile, "q has too many tokens: ", tokens);
  TORCH_CHECK_VALUE(dim <= std::numeric_limits<int32_t>::max(), "q has too many channels: ", dim);
  TORCH_CHECK_VALUE(!packed || cu_seqlens->size(0) <= std::numeric_limits<int32_t>::max(),
                    "cu_seqlens has too many segments: ", cu_seqlens->size(0) - 1);

  const auto layout = [packed](const at::Tensor& t) {
    return packed ? Layout{0, t.stride(1), t.stride(0), t.stride(2)}
                  : Layout{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  };
  const Layout lq = layout(q), lk = layout(k);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = q.options().dtype(at::kFloat);

  Segments seg{nullptr, 0, 1, int(tokens)};
  at::Tensor token_segment;
  if (packed) {
    seg.cu = cu_seqlens->const_data_ptr<int32_t>();
    seg.stride = cu_seqlens->stride(0);
    seg.count = int(cu_seqlens->size(0) - 1);
    token_segment = at::empty({tokens}, q.options().dtype(at::kInt));
    token_segment_kernel<<<unsigned(blocks_for(tokens, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
        seg, token_segment.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int32_t* token_segment_data = packed ? token_segment.const_data_ptr<int32_t>() : nullptr;

  // Base-2 row LSE in (batch, heads, tokens) order: the given lse (dense (B, H, L), packed (H, T)) times log2(e),
  // or computed by row_lse_kernel.
  const bool with_lse = lse.has_value();
  const at::Tensor row_lse = with_lse ? at::mul(packed ? lse->unsqueeze(0) : *lse, double(kLog2e)).contiguous()
                                      : at::empty({batch, heads, tokens}, f32);
  at::Tensor col_sum = at::empty({batch, heads, tokens}, f32);
  const float factor = float(scale * double(kLog2e));
  const dim3 grid(unsigned(blocks_for(tokens, kTile)), unsigned(heads), unsigned(batch));
  const auto launch = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* q_data = static_cast<const scalar_t*>(q.const_data_ptr());
    const scalar_t* k_data = static_cast<const scalar_t*>(k.const_data_ptr());
    if (!with_lse) {
      row_lse_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(q_data, lq, k_data, lk, int(dim), factor, seg,
                                                              token_segment_data, row_lse.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    column_sum_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(q_data, lq, k_data, lk, int(dim), factor, seg,
                                                               token_segment_data, row_lse.const_data_ptr<float>(),
                                                               col_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      launch(float{});
      break;
    case at::kHalf:
      launch(at::Half{});
      break;
    case at::kBFloat16:
      launch(at::BFloat16{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "q must be float32, float16 or bfloat16, got ", q.scalar_type());
  }
  const int64_t outputs = out.numel();
  if (outputs > 0) {
    finalize_kernel<<<unsigned(blocks_for(outputs, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
        col_sum.const_data_ptr<float>(), int(heads), batch, packed ? 0 : int(num_prefix), seg, token_segment_data,
        out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CUDA, m) { m.impl("qk_scores", &hiprune::cuda::qk_scores); }
