// CPU kernel of hiprune::select_with_roles: fused scores, then per image anchors, buffers, registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu_kernels.h"
#include "hiprune/checks.h"
#include "hiprune/selection.h"

namespace hiprune {
namespace cpu {
namespace {

// Float32 scores (B, N), contiguous: reduced from maps, or the given scores converted exactly.
at::Tensor scores_of(const at::Tensor& input, int64_t num_prefix) {
  if (input.dim() == 4) return attention_scores(input, num_prefix);
  return input.to(at::kFloat).contiguous();
}

// Tokens selected serially before the batch is split across threads (about a millisecond of work).
constexpr int64_t kSerialSelectTokens = 1 << 16;

// Smallest key among the k largest (k >= 1); reorders `keys`.
uint64_t kth_largest(std::vector<uint64_t>& keys, int64_t k) {
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
  return keys[k - 1];
}

struct ImageSelector {
  int64_t n, budget, grid_h, grid_w, n_anchor;
  int neighborhood;
  bool official;
  std::vector<uint64_t> keys, scratch;
  std::vector<int8_t> role;  // kNotKept, or a Role

  // Returns the number of anchors and buffers; when it exceeds the budget (official mode) nothing is written.
  int64_t run(const float* object_scores, const float* deep_scores, int64_t* indices, int8_t* roles) {
    keys.resize(n);
    role.assign(n, kNotKept);
    if (n_anchor > 0) {
      for (int64_t i = 0; i < n; ++i) keys[i] = rank_key(object_scores[i], i);
      scratch = keys;
      const uint64_t threshold = kth_largest(scratch, n_anchor);
      for (int64_t i = 0; i < n; ++i)
        if (keys[i] >= threshold) role[i] = kAnchor;
      for (int64_t i = 0; i < n; ++i)
        if (role[i] == kAnchor) mark_buffers_around(i, role.data(), grid_h, grid_w, neighborhood, official);
    }
    const int64_t kept = std::count_if(role.begin(), role.end(), [](int8_t r) { return r != kNotKept; });
    if (kept > budget) return kept;
    const int64_t n_register = budget - kept;
    if (n_register > 0) {
      for (int64_t i = 0; i < n; ++i) keys[i] = register_key(role[i], deep_scores[i], i);
      scratch = keys;
      const uint64_t threshold = kth_largest(scratch, n_register);
      for (int64_t i = 0; i < n; ++i)
        if (role[i] == kNotKept && keys[i] >= threshold) role[i] = kRegister;
    }
    int64_t out = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (role[i] == kNotKept) continue;
      indices[out] = i;
      roles[out] = role[i];
      ++out;
    }
    return kept;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_with_roles(const at::Tensor& object_attn, const at::Tensor& deep_attn,
                                                     int64_t budget, int64_t grid_h, int64_t grid_w, double alpha,
                                                     int64_t num_prefix, c10::string_view neighborhood,
                                                     bool official) {
  const SelectArgs args =
      check_select_args(object_attn, deep_attn, budget, grid_h, grid_w, alpha, num_prefix, neighborhood, official);
  const at::Tensor object_scores = scores_of(object_attn, num_prefix);
  const at::Tensor deep_scores = scores_of(deep_attn, num_prefix);
  auto indices = at::empty({args.batch, budget}, object_attn.options().dtype(at::kLong));
  auto roles = at::empty({args.batch, budget}, object_attn.options().dtype(at::kChar));
  const float* object_data = object_scores.const_data_ptr<float>();
  const float* deep_data = deep_scores.const_data_ptr<float>();
  int64_t* index_data = indices.data_ptr<int64_t>();
  int8_t* role_data = roles.data_ptr<int8_t>();
  const int64_t n = args.n;
  // Errors are raised after the parallel region, never inside a worker, and name the batch's largest count.
  std::vector<int64_t> kept(static_cast<size_t>(args.batch), 0);
  // An image takes microseconds: a small batch runs on this thread, because waking the pool costs more (and, on a
  // loaded machine, a whole scheduler slice).
  const int64_t images_per_task = std::max<int64_t>(1, kSerialSelectTokens / std::max<int64_t>(n, 1));
  at::parallel_for(0, args.batch, images_per_task, [&](int64_t begin, int64_t end) {
    ImageSelector selector{n, budget, grid_h, grid_w, args.n_anchor, args.neighborhood, official, {}, {}, {}};
    for (int64_t b = begin; b < end; ++b)
      kept[b] = selector.run(object_data + b * n, deep_data + b * n, index_data + b * budget, role_data + b * budget);
  });
  if (!kept.empty()) check_official_kept(*std::max_element(kept.begin(), kept.end()), budget);
  return {indices, roles};
}

}  // namespace cpu
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("select_with_roles", &hiprune::cpu::select_with_roles); }
