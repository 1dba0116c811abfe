// Selection logic shared by the CPU and CUDA kernels (and restated by the Triton and torch backends).
// Everything here is __host__ __device__ so that the CPU tests exercise the code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HIPRUNE_HD __host__ __device__ __forceinline__
#else
#define HIPRUNE_HD inline
#endif

namespace hiprune {

// kPrompt: a token HiPrune++ adds because it matches the prompt (csrc/include/hiprune/prompt.h).
enum Role : int8_t { kAnchor = 0, kBuffer = 1, kRegister = 2, kPrompt = 3 };

enum Neighborhood : int { kCross = 0, kSquare = 1 };

// Tokens per anchor: itself plus its 4 (cross) or 8 (square) grid neighbours.
HIPRUNE_HD int tokens_per_anchor(int neighborhood) { return neighborhood == kSquare ? 9 : 5; }

// round() with ties to even, as Python's round() on the same double.
HIPRUNE_HD int64_t round_half_even(double x) {
  double r = floor(x);
  double diff = x - r;
  if (diff > 0.5 || (diff == 0.5 && fmod(r, 2.0) != 0.0)) r += 1.0;
  return static_cast<int64_t>(r);
}

// Number of anchors. Official mode has no cap (the release computes round(budget * alpha / 5)).
HIPRUNE_HD int64_t anchor_count(int64_t budget, double alpha, int neighborhood, bool official) {
  const int per = tokens_per_anchor(neighborhood);
  const int64_t n = round_half_even(static_cast<double>(budget) * alpha / per);
  if (official) return n;
  const int64_t cap = budget / per;
  return n < cap ? n : cap;
}

// Maps a score to 32 bits whose unsigned order is the score order: NaN (1) below every number (-inf is
// 0x007FFFFF), -0.0 equal to +0.0. Rank 0 is free for "excluded".
HIPRUNE_HD uint32_t score_rank(float score) {
  uint32_t bits;
  memcpy(&bits, &score, sizeof(bits));
  bits = score == 0.0f ? 0u : bits;                                      // fold -0.0 into +0.0
  const uint32_t ordered = bits ^ ((0u - (bits >> 31)) | 0x80000000u);  // negative: all bits flipped; else sign
  return score != score ? 1u : ordered;  // branch-free, so that loops over scores vectorize
}

constexpr uint32_t kExcludedRank = 0;

// Maps a score and its token index to a key whose unsigned order is the ranking order: higher score first,
// equal scores lower index first, NaN below every number. -0.0 equals +0.0. Key 0 is free for "excluded".
HIPRUNE_HD uint64_t rank_key(float score, int64_t index) {
  return (static_cast<uint64_t>(score_rank(score)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

constexpr uint64_t kExcludedKey = 0;

// Number of neighbour slots an anchor has.
HIPRUNE_HD int neighbor_slots(int neighborhood) { return tokens_per_anchor(neighborhood) - 1; }

// The slot-th neighbour of token `anchor` on a grid_h x grid_w raster grid, or -1 when it is off the grid.
// Official mode reproduces the authors' release: flattened i-1, i+1, i-grid_w, i+grid_w clamped into [0, N-1].
HIPRUNE_HD int64_t neighbor_of(int64_t anchor, int slot, int64_t grid_h, int64_t grid_w, int neighborhood,
                               bool official) {
  const int64_t n = grid_h * grid_w;
  if (official) {
    const int64_t delta[4] = {-1, 1, -grid_w, grid_w};
    int64_t j = anchor + delta[slot];
    return j < 0 ? 0 : (j > n - 1 ? n - 1 : j);
  }
  // up, down, left, right, then the diagonals for "square"
  const int dr[8] = {-1, 1, 0, 0, -1, -1, 1, 1};
  const int dc[8] = {0, 0, -1, 1, -1, 1, -1, 1};
  (void)neighborhood;
  const int64_t r = anchor / grid_w + dr[slot];
  const int64_t c = anchor % grid_w + dc[slot];
  if (r < 0 || r >= grid_h || c < 0 || c >= grid_w) return -1;
  return r * grid_w + c;
}

// Role of a token that is not (yet) kept.
constexpr int8_t kNotKept = -1;

// Phase 2 of the selection: marks the neighbours of one anchor as buffers. Anchors are fixed before this phase
// and never overwritten, so concurrent calls for different anchors only ever store kBuffer (race-free in effect).
HIPRUNE_HD void mark_buffers_around(int64_t anchor, int8_t* role, int64_t grid_h, int64_t grid_w, int neighborhood,
                                    bool official) {
  const int slots = neighbor_slots(neighborhood);
// Unrolled on the GPU: constant slots keep neighbor_of's offset tables in registers rather than on the stack.
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int slot = 0; slot < 8; ++slot) {
    if (slot >= slots) break;
    const int64_t j = neighbor_of(anchor, slot, grid_h, grid_w, neighborhood, official);
    if (j >= 0 && role[j] != kAnchor) role[j] = kBuffer;
  }
}

// Key of token i in the register ranking: kept tokens (anchors, buffers) are excluded.
HIPRUNE_HD uint64_t register_key(int8_t role, float deep_score, int64_t index) {
  return role != kNotKept ? kExcludedKey : rank_key(deep_score, index);
}

// Rank of token i in the register ranking: kept tokens (anchors, buffers) are excluded. Branch-free, to vectorize.
HIPRUNE_HD uint32_t register_rank(int8_t role, float deep_score) {
  return score_rank(deep_score) & (0u - static_cast<uint32_t>(role == kNotKept));
}

// Whether anchors and buffers can exceed the budget: only in official mode (no anchor cap), and only when
// n_anchor anchors with their 4 neighbours each could outnumber the budget. Host-known, so a GPU backend needs
// to read the kept counts back (a host sync) only when this is true.
HIPRUNE_HD bool official_may_overflow(int64_t n_anchor, int64_t budget, bool official) {
  return official && tokens_per_anchor(kCross) * n_anchor > budget;
}

// The k largest of ranks visited in index order, ties to the lower index: every rank above `rank`, then the
// first `ties` equal to it.
struct RankThreshold {
  uint32_t rank;
  int64_t ties;
};

// Whether the next token (in index order) of rank r is among the k largest; counts the ties taken.
HIPRUNE_HD bool take_ranked(RankThreshold& t, uint32_t r) {
  const bool tie = r == t.rank;
  const bool take = r > t.rank || (tie && t.ties > 0);
  t.ties -= tie;
  return take;
}

}  // namespace hiprune
