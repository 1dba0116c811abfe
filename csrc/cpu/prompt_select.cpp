// CPU kernel of hiprune::prompt_select (HiPrune++): the cosine of every token HiPrune did not keep to its image's
// prompt embedding (float64 sums, rounded once), the `extra` best of them, merged with the kept tokens in index order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "hiprune/checks.h"
#include "hiprune/prompt.h"

namespace hiprune {
namespace cpu {
namespace {

// Independent float64 accumulators per sum: the compiler vectorizes across them (a single chain would wait on
// every add). The order of a float64 sum is not part of the contract: only its rounding to float32 is.
constexpr int kLanes = 8;

// Tokens per task of the cosine loop (each reads C channels).
constexpr int64_t kCosineGrain = 16;

double lane_total(const double* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// dot = sum f * p and ff = sum f * f over C channels, f read at any element type, p already in float64.
template <typename scalar_t>
void token_sums(const scalar_t* f, const double* p, int64_t channels, double& dot, double& ff) {
  double d[kLanes] = {}, s[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double x = static_cast<double>(static_cast<float>(f[c + l]));
      d[l] += x * p[c + l];
      s[l] += x * x;
    }
  }
  // The tail in scalars of its own: indexing the lanes with a variable would keep them in memory, not registers.
  double tail_dot = 0.0, tail_ff = 0.0;
  for (; c < channels; ++c) {
    const double x = static_cast<double>(static_cast<float>(f[c]));
    tail_dot += x * p[c];
    tail_ff += x * x;
  }
  dot = lane_total(d) + tail_dot;
  ff = lane_total(s) + tail_ff;
}

double squared_norm(const double* p, int64_t channels) {
  double s[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += p[c + l] * p[c + l];
  double tail = 0.0;
  for (; c < channels; ++c) tail += p[c] * p[c];
  return lane_total(s) + tail;
}

template <typename scalar_t>
void cosines_of_unkept(const at::Tensor& features, const double* prompt, const double* prompt_norms,
                       const int32_t* slots, float* cosines, const PromptArgs& args) {
  const scalar_t* base = features.const_data_ptr<scalar_t>();
  const int64_t stride_b = features.stride(0), stride_n = features.stride(1);
  const int64_t n = args.n, channels = args.channels;
  at::parallel_for(0, args.batch * n, kCosineGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (slots[row] != kNotKeptSlot) continue;  // kept tokens are never ranked: their features are not read
      const int64_t b = row / n, i = row % n;
      double dot, ff;
      token_sums(base + b * stride_b + i * stride_n, prompt + b * channels, channels, dot, ff);
      cosines[row] = prompt_cosine(dot, ff, prompt_norms[b]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prompt_select(const at::Tensor& features, const at::Tensor& prompt,
                                                 const at::Tensor& indices, const at::Tensor& roles, int64_t extra) {
  const PromptArgs args = check_prompt_args(features, prompt, indices, roles, extra);
  check_prompt_index_values(indices, args.n);
  const int64_t out_len = args.kept + extra;
  at::Tensor out_indices = at::empty({args.batch, out_len}, indices.options());
  at::Tensor out_roles = at::empty({args.batch, out_len}, roles.options());
  if (args.batch == 0 || out_len == 0) return {out_indices, out_roles};

  const int64_t n = args.n, kept = args.kept, channels = args.channels;
  const at::Tensor kept_indices = indices.contiguous();
  const at::Tensor kept_roles = roles.contiguous();
  const int64_t* kept_index_data = kept_indices.const_data_ptr<int64_t>();
  const int8_t* kept_role_data = kept_roles.const_data_ptr<int8_t>();

  // Slot of each token in its image's kept list, or kNotKeptSlot.
  std::vector<int32_t> slots(static_cast<size_t>(args.batch * n), kNotKeptSlot);
  for (int64_t b = 0; b < args.batch; ++b)
    for (int64_t j = 0; j < kept; ++j) slots[b * n + kept_index_data[b * kept + j]] = static_cast<int32_t>(j);

  std::vector<float> cosines(static_cast<size_t>(args.batch * n), 0.0f);
  if (extra > 0) {
    const at::Tensor prompt64 = prompt.to(at::kDouble).contiguous();  // exact: every input dtype fits in float64
    const double* prompt_data = prompt64.const_data_ptr<double>();
    std::vector<double> prompt_norms(static_cast<size_t>(args.batch));
    for (int64_t b = 0; b < args.batch; ++b) prompt_norms[b] = squared_norm(prompt_data + b * channels, channels);
    // Rows of features are read in place; channels must be adjacent for the vectorized sums.
    const at::Tensor rows = features.stride(2) == 1 ? features : features.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "prompt_select", [&] {
      cosines_of_unkept<scalar_t>(rows, prompt_data, prompt_norms.data(), slots.data(), cosines.data(), args);
    });
  }

  int64_t* index_out = out_indices.data_ptr<int64_t>();
  int8_t* role_out = out_roles.data_ptr<int8_t>();
  at::parallel_for(0, args.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(static_cast<size_t>(n)), candidates;
    for (int64_t b = begin; b < end; ++b) {
      const int32_t* slot = slots.data() + b * n;
      uint64_t threshold = kNoPromptThreshold;
      if (extra > 0) {
        candidates.clear();
        for (int64_t i = 0; i < n; ++i) {
          keys[i] = prompt_key(slot[i], cosines[b * n + i], i);
          if (keys[i] != kExcludedKey) candidates.push_back(keys[i]);
        }
        // extra <= N - kept = the number of candidates; their keys are distinct (the index is part of the key).
        std::nth_element(candidates.begin(), candidates.begin() + (extra - 1), candidates.end(),
                         std::greater<uint64_t>());
        threshold = candidates[extra - 1];
      }
      int64_t out = 0;
      for (int64_t i = 0; i < n && out < out_len; ++i) {
        if (!prompt_chosen(slot[i], extra > 0 ? keys[i] : kExcludedKey, threshold)) continue;
        index_out[b * out_len + out] = i;
        role_out[b * out_len + out] = prompt_role(slot[i], kept_role_data + b * kept);
        ++out;
      }
    }
  });
  return {out_indices, out_roles};
}

}  // namespace cpu
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("prompt_select", &hiprune::cpu::prompt_select); }
