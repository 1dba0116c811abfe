// HiPrune++ (hiprune::prompt_select): the ranking and merge rules the CPU and CUDA kernels share (restated by the
// Triton and torch backends). Everything is __host__ __device__ so that the CPU tests exercise the GPU's code.
#pragma once

#include <cmath>
#include <cstdint>

#include "hiprune/selection.h"

namespace hiprune {

// Slot of a token that HiPrune did not keep (kept tokens hold their position in the input indices, >= 0).
constexpr int32_t kNotKeptSlot = -1;

// Threshold key above every rank key: no token is added (extra == 0). Rank keys stay below it because the score
// part of a key is at most that of +inf, 0xFF800000.
constexpr uint64_t kNoPromptThreshold = ~uint64_t(0);

// Cosine similarity from float64 sums over the channels: dot = sum f * p, ff = sum f * f, pp = sum p * p.
// Products of float32 (or narrower) values are exact in float64, so only the sums round; the quotient is rounded
// once to float32. A zero vector on either side gives 0 / 0 = NaN, which ranks below every number.
HIPRUNE_HD float prompt_cosine(double dot, double ff, double pp) { return static_cast<float>(dot / sqrt(ff * pp)); }

// Key of a token in the prompt ranking: tokens HiPrune kept are excluded, the rest rank as select's scores do
// (higher cosine first, equal cosines lower index first, NaN last, -0.0 == +0.0).
HIPRUNE_HD uint64_t prompt_key(int32_t kept_slot, float cosine, int64_t index) {
  return kept_slot >= 0 ? kExcludedKey : rank_key(cosine, index);
}

// Whether a token is in the output: kept by HiPrune, or its key reaches the threshold (the extra-th largest key).
HIPRUNE_HD bool prompt_chosen(int32_t kept_slot, uint64_t key, uint64_t threshold) {
  return kept_slot >= 0 || key >= threshold;
}

// Role of an output token: the role HiPrune gave it, or kPrompt for an added one.
HIPRUNE_HD int8_t prompt_role(int32_t kept_slot, const int8_t* kept_roles) {
  return kept_slot >= 0 ? kept_roles[kept_slot] : static_cast<int8_t>(kPrompt);
}

}  // namespace hiprune
