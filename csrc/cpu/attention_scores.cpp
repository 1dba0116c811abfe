// CPU kernel of hiprune::attention_scores: one pass over the map, column sums accumulated in float64 so that
// every backend rounds the same mean to the same float32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "hiprune/checks.h"

namespace hiprune {
namespace cpu {
namespace {

template <typename scalar_t>
void accumulate_rows(const scalar_t* first_row, int64_t rows, int64_t row_stride, int64_t n, int64_t col_stride,
                     double* acc) {
  for (int64_t q = 0; q < rows; ++q) {
    const scalar_t* row = first_row + q * row_stride;
    if (col_stride == 1) {
      for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(static_cast<float>(row[j]));
    } else {
      for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<double>(static_cast<float>(row[j * col_stride]));
    }
  }
}

}  // namespace

at::Tensor attention_scores(const at::Tensor& attn, int64_t num_prefix) {
  const int64_t n = check_attention_map(attn, num_prefix, "attn");
  TORCH_CHECK(attn.device().is_cpu(), "attn must be a CPU tensor here, got ", attn.device());
  const int64_t batch = attn.size(0), heads = attn.size(1), length = attn.size(2);
  auto out = at::empty({batch, n}, attn.options().dtype(at::kFloat));
  if (batch == 0) return out;

  // Split each head's query rows into chunks so that small batches still use every thread.
  const int64_t want_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::min(length, std::max<int64_t>(1, (want_tasks + batch * heads - 1) / (batch * heads)));
  const int64_t rows_per_chunk = (length + chunks - 1) / chunks;
  const int64_t tasks_per_image = heads * chunks;
  std::vector<double> partial(static_cast<size_t>(batch * tasks_per_image * n), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "hiprune_attention_scores_cpu", [&] {
    const scalar_t* data = attn.const_data_ptr<scalar_t>();
    const auto s = attn.strides();
    at::parallel_for(0, batch * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tasks_per_image, h = (task / chunks) % heads, chunk = task % chunks;
        const int64_t q0 = chunk * rows_per_chunk, q1 = std::min(length, q0 + rows_per_chunk);
        if (q0 >= q1) continue;
        const scalar_t* first_row = data + b * s[0] + h * s[1] + q0 * s[2] + num_prefix * s[3];
        accumulate_rows(first_row, q1 - q0, s[2], n, s[3], partial.data() + task * n);
      }
    });
  });

  // Reduce the partials in a fixed order, then round the mean once.
  const double count = static_cast<double>(heads) * static_cast<double>(length);
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const double* image_partial = partial.data() + b * tasks_per_image * n;
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0.0;
        for (int64_t t = 0; t < tasks_per_image; ++t) sum += image_partial[t * n + j];
        out_data[b * n + j] = static_cast<float>(sum / count);
      }
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("attention_scores", &hiprune::cpu::attention_scores); }
