// Argument validation shared by every C++ backend (host side only). Each error names the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "hiprune/selection.h"

namespace hiprune {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

// Validates an attention map (B, H, L, L) and returns N = L - num_prefix.
inline int64_t check_attention_map(const at::Tensor& attn, int64_t num_prefix, const char* name) {
  TORCH_CHECK_VALUE(attn.dim() == 4, name, " must be (B, H, L, L) attention maps, got ", attn.dim(), "-D");
  check_float_dtype(attn, name);
  TORCH_CHECK_VALUE(attn.size(2) == attn.size(3), name, " must be square in its last two dims, got (", attn.size(2),
              ", ", attn.size(3), ")");
  TORCH_CHECK_VALUE(attn.size(1) >= 1, name, " must have at least one head");
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix < attn.size(3), "num_prefix must be in [0, L - 1] = [0, ",
              attn.size(3) - 1, "], got ", num_prefix);
  return attn.size(3) - num_prefix;
}

// Validates one selection input: attention maps (B, H, L, L) or scores (B, N). Returns N.
inline int64_t check_selection_input(const at::Tensor& t, int64_t num_prefix, const char* name) {
  if (t.dim() == 2) {
    check_float_dtype(t, name);
    return t.size(1);
  }
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be (B, H, L, L) attention maps or (B, N) scores, got ", t.dim(), "-D");
  return check_attention_map(t, num_prefix, name);
}

inline int parse_neighborhood(c10::string_view neighborhood) {
  if (neighborhood == "cross") return kCross;
  if (neighborhood == "square") return kSquare;
  TORCH_CHECK_VALUE(false, "neighborhood must be 'cross' or 'square', got '", std::string(neighborhood), "'");
  return kCross;
}

struct SelectArgs {
  int64_t batch;
  int64_t n;  // patch tokens
  int neighborhood;
  int64_t n_anchor;
};

inline SelectArgs check_select_args(const at::Tensor& object_attn, const at::Tensor& deep_attn, int64_t budget,
                                    int64_t grid_h, int64_t grid_w, double alpha, int64_t num_prefix,
                                    c10::string_view neighborhood, bool official) {
  const int64_t n_object = check_selection_input(object_attn, num_prefix, "object_attn");
  const int64_t n_deep = check_selection_input(deep_attn, num_prefix, "deep_attn");
  TORCH_CHECK_VALUE(object_attn.size(0) == deep_attn.size(0), "deep_attn batch ", deep_attn.size(0),
              " does not match object_attn batch ", object_attn.size(0));
  TORCH_CHECK_VALUE(object_attn.device() == deep_attn.device(), "deep_attn is on ", deep_attn.device(),
              " but object_attn is on ", object_attn.device());
  TORCH_CHECK_VALUE(n_object == n_deep, "deep_attn has ", n_deep, " patch tokens but object_attn has ", n_object);
  TORCH_CHECK_VALUE(grid_h >= 1 && grid_w >= 1, "grid_h and grid_w must be positive, got ", grid_h, " x ", grid_w);
  TORCH_CHECK_VALUE(grid_h * grid_w == n_object, "grid_h * grid_w = ", grid_h, " * ", grid_w,
              " must equal the number of patch tokens N = ", n_object);
  TORCH_CHECK_VALUE(n_object < (int64_t(1) << 31), "object_attn has too many patch tokens: ", n_object);
  TORCH_CHECK_VALUE(budget >= 1 && budget <= n_object, "budget must be in [1, N] = [1, ", n_object, "], got ", budget);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  const int nb = parse_neighborhood(neighborhood);
  TORCH_CHECK_VALUE(!official || nb == kCross, "official=True reproduces the release, which supports neighborhood='cross' "
              "only, got '", std::string(neighborhood), "'");
  return SelectArgs{object_attn.size(0), n_object, nb, anchor_count(budget, alpha, nb, official)};
}

inline void check_prune_features(const at::Tensor& features, const SelectArgs& args, const at::Tensor& object_attn) {
  TORCH_CHECK_VALUE(features.dim() == 3, "features must be (B, N, C), got ", features.dim(), "-D");
  TORCH_CHECK_VALUE(features.size(0) == args.batch, "features batch ", features.size(0), " does not match object_attn batch ",
              args.batch);
  TORCH_CHECK_VALUE(features.size(1) == args.n, "features has ", features.size(1), " tokens but the grid has N = ", args.n);
  TORCH_CHECK_VALUE(features.device() == object_attn.device(), "features is on ", features.device(),
              " but object_attn is on ", object_attn.device());
}

// Official mode: anchors and buffers alone must fit in the budget (same wording as
// _validation.official_overflow_message).
inline void check_official_kept(int64_t kept, int64_t budget) {
  TORCH_CHECK_VALUE(kept <= budget, "official=True keeps ", kept, " anchors and buffers, more than budget ", budget,
                    "; raise budget or lower alpha");
}

// A shape as Python prints a tuple, so that messages read the same as hiprune_ops/_validation.py's.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + (sizes.size() == 1 ? ",)" : ")");
}

// Validates the optional lse of qk_scores: float32 on q's device, (B, H, L) dense or (H, T) packed, any strides.
inline void check_qk_lse(const at::Tensor& q, bool packed, const c10::optional<at::Tensor>& lse) {
  if (!lse.has_value()) return;
  const std::vector<int64_t> expected =
      packed ? std::vector<int64_t>{q.size(1), q.size(0)} : std::vector<int64_t>{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK_VALUE(lse->sizes() == at::IntArrayRef(expected), "lse must be ", packed ? "(H, T) = " : "(B, H, L) = ",
                    shape_str(expected), " for q of shape ", shape_str(q.sizes()), ", got ", shape_str(lse->sizes()));
  TORCH_CHECK_TYPE(lse->scalar_type() == at::kFloat, "lse must be float32, got ", lse->scalar_type());
  TORCH_CHECK_VALUE(lse->device() == q.device(), "lse is on ", lse->device(), " but q is on ", q.device());
}

// Validates qk_scores arguments. q, k: (B, H, L, D), or (T, H, D) with int32 cu_seqlens (S + 1,); lse as above.
// The values of cu_seqlens are checked only on the CPU: reading them from a GPU would synchronise, so GPU kernels
// clamp instead.
inline void check_qk_args(const at::Tensor& q, const at::Tensor& k, double scale, int64_t num_prefix,
                          const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& lse) {
  const bool packed = cu_seqlens.has_value();
  const int64_t rank = packed ? 3 : 4;
  const char* layout = packed ? "(T, H, D) with cu_seqlens" : "(B, H, L, D)";
  const auto check_operand = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == rank, name, " must be ", layout, ", got ", t.dim(), "-D");
    check_float_dtype(t, name);
  };
  check_operand(q, "q");
  check_operand(k, "k");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k shape ", shape_str(k.sizes()), " must equal q shape ",
                    shape_str(q.sizes()));
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k dtype ", k.scalar_type(), " must equal q dtype ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), "k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(q.size(1) >= 1 && q.size(-1) >= 1, "q must have at least one head and one channel, got shape ",
                    shape_str(q.sizes()));
  if (!packed) {
    TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix < q.size(2), "num_prefix must be in [0, L - 1] = [0, ",
                      q.size(2) - 1, "], got ", num_prefix);
    check_qk_lse(q, false, lse);
    return;
  }
  TORCH_CHECK_VALUE(num_prefix == 0, "num_prefix must be 0 with cu_seqlens (packed sequences), got ", num_prefix);
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, "cu_seqlens must be 1-D (S + 1,) with S >= 1, got shape ",
                    shape_str(cu.sizes()));
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device() == q.device(), "cu_seqlens is on ", cu.device(), " but q is on ", q.device());
  check_qk_lse(q, true, lse);
  if (!cu.device().is_cpu()) return;
  const at::Tensor bounds = cu.contiguous();
  const int32_t* b = bounds.const_data_ptr<int32_t>();
  const int64_t last = cu.size(0) - 1;
  TORCH_CHECK_VALUE(b[0] == 0 && b[last] == q.size(0), "cu_seqlens must start at 0 and end at T = ", q.size(0),
                    ", got ", b[0], " .. ", b[last]);
  for (int64_t s = 0; s < last; ++s) {
    TORCH_CHECK_VALUE(b[s + 1] >= b[s], "cu_seqlens must be non-decreasing");
  }
}

struct PromptArgs {
  int64_t batch;
  int64_t n;         // visual tokens
  int64_t channels;
  int64_t kept;      // tokens HiPrune kept (columns of indices)
};

// Validates the arguments of prompt_select (shapes, dtypes, devices, extra); the values of indices are checked by
// check_prompt_index_values, on the CPU only.
inline PromptArgs check_prompt_args(const at::Tensor& features, const at::Tensor& prompt, const at::Tensor& indices,
                                    const at::Tensor& roles, int64_t extra) {
  TORCH_CHECK_VALUE(features.dim() == 3, "features must be (B, N, C), got ", features.dim(), "-D");
  check_float_dtype(features, "features");
  TORCH_CHECK_VALUE(prompt.dim() == 2, "prompt must be (B, C), got ", prompt.dim(), "-D");
  check_float_dtype(prompt, "prompt");
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be (B, kept), got ", indices.dim(), "-D");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(roles.scalar_type() == at::kChar, "roles must be int8, got ", roles.scalar_type());
  const int64_t batch = features.size(0), n = features.size(1), channels = features.size(2);
  TORCH_CHECK_VALUE(prompt.size(0) == batch, "prompt batch ", prompt.size(0), " does not match features batch ", batch);
  TORCH_CHECK_VALUE(prompt.size(1) == channels, "prompt has ", prompt.size(1), " channels but features has ", channels);
  TORCH_CHECK_VALUE(indices.size(0) == batch, "indices batch ", indices.size(0), " does not match features batch ",
                    batch);
  TORCH_CHECK_VALUE(roles.sizes() == indices.sizes(), "roles shape ", shape_str(roles.sizes()),
                    " must equal indices shape ", shape_str(indices.sizes()));
  const auto check_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == features.device(), name, " is on ", t.device(), " but features is on ",
                      features.device());
  };
  check_device(prompt, "prompt");
  check_device(indices, "indices");
  check_device(roles, "roles");
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31), "features has too many tokens: ", n);
  const int64_t kept = indices.size(1);
  TORCH_CHECK_VALUE(kept <= n, "indices has ", kept, " kept tokens but features has only N = ", n);
  TORCH_CHECK_VALUE(extra >= 0 && extra <= n - kept, "extra must be in [0, N - kept] = [0, ", n - kept, "], got ",
                    extra);
  return PromptArgs{batch, n, channels, kept};
}

// The kept indices of each image must be strictly increasing in [0, N - 1]: read on the CPU only (reading a GPU
// tensor would synchronise; the GPU kernels trust the values and never index out of bounds with them).
inline void check_prompt_index_values(const at::Tensor& indices, int64_t n) {
  if (!indices.device().is_cpu()) return;
  const at::Tensor values = indices.contiguous();
  const int64_t* v = values.const_data_ptr<int64_t>();
  const int64_t rows = values.size(0), cols = values.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t previous = -1;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = v[r * cols + c];
      TORCH_CHECK_VALUE(i > previous && i < n, "indices must be strictly increasing in [0, N - 1] = [0, ", n - 1,
                        "], row ", r, " has ", i, " after ", previous);
      previous = i;
    }
  }
}

}  // namespace hiprune
