// The k-th largest of a block's 64-bit keys, by an 8-bit radix select (8 passes, shared-memory histograms): shared by
// the selection kernels of hiprune::select_with_roles and hiprune::prompt_select.
#pragma once

#include <cstdint>

namespace hiprune {
namespace cuda {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
static_assert(kRadixBins == 8 * 32, "the digit search gives each lane of one warp 8 bins");

struct RadixState {
  int histogram[kRadixBins];
  uint64_t prefix;
  int rank;
};

// The k-th largest of keys[0, n) (1 <= k <= n; keys of rank <= k are distinct, which rank_key guarantees for every
// key but kExcludedKey). Every thread of the block calls it and gets the result. Most significant digit first:
// each pass counts the keys that share the digits found so far, then warp 0 finds the digit holding the k-th.
__device__ inline uint64_t kth_largest_key(const uint64_t* keys, int64_t n, int k, RadixState& state) {
  uint64_t prefix = 0, mask = 0;
  for (int shift = 64 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int d = threadIdx.x; d < kRadixBins; d += blockDim.x) state.histogram[d] = 0;
    __syncthreads();  // histogram cleared; keys written by the caller visible
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = keys[i];
      if ((key & mask) == prefix) atomicAdd(&state.histogram[(key >> shift) & (kRadixBins - 1)], 1);
    }
    __syncthreads();  // histogram complete
    if (threadIdx.x < 32) {
      // Lane l owns digits 255 - 8l down to 248 - 8l, so lane order is descending digit order.
      const int lane = threadIdx.x;
      int own = 0;
      for (int j = 0; j < 8; ++j) own += state.histogram[kRadixBins - 1 - 8 * lane - j];
      int inclusive = own;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int below = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
        if (lane >= offset) inclusive += below;
      }
      int before = inclusive - own;
      if (before < k && k <= inclusive) {  // exactly one lane
        for (int j = 0; j < 8; ++j) {
          const int digit = kRadixBins - 1 - 8 * lane - j;
          const int count = state.histogram[digit];
          if (before + count >= k) {
            state.prefix = prefix | (static_cast<uint64_t>(digit) << shift);
            state.rank = k - before;
            break;
          }
          before += count;
        }
      }
    }
    __syncthreads();  // digit found; the next writes of state come after the next pass's first barrier
    prefix = state.prefix;
    k = state.rank;
    mask |= static_cast<uint64_t>(kRadixBins - 1) << shift;
  }
  return prefix;
}

}  // namespace cuda
}  // namespace hiprune
