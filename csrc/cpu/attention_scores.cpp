// CPU kernel of hiprune::attention_scores: one pass over the map, column sums accumulated in float64 so that
// every backend rounds the same mean to the same float32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"
#include "hiprune/checks.h"

namespace hiprune {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 + F16C row adders, picked at run time: the build itself targets baseline x86-64, where fp16 -> fp32 is a
// slow scalar conversion.
bool cpu_has_avx2_f16c() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return supported;
}

__attribute__((target("avx2,f16c"))) inline void add_8_floats(__m256 v, double* acc) {
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

__attribute__((target("avx2,f16c"))) void add_row_avx2(const float* row, int64_t n, double* acc) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) add_8_floats(_mm256_loadu_ps(row + j), acc + j);
  for (; j < n; ++j) acc[j] += row[j];
}

__attribute__((target("avx2,f16c"))) void add_row_avx2(const c10::Half* row, int64_t n, double* acc) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    add_8_floats(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + j))), acc + j);
  for (; j < n; ++j) acc[j] += _cvtsh_ss(bits[j]);
}

__attribute__((target("avx2,f16c"))) void add_row_avx2(const c10::BFloat16* row, int64_t n, double* acc) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + j)));
    add_8_floats(_mm256_castsi256_ps(_mm256_slli_epi32(widened, 16)), acc + j);
  }
  for (; j < n; ++j) acc[j] += static_cast<float>(row[j]);
}

void add_row_avx2(const double*, int64_t, double*) {}  // never called: maps are float32/16/bf16
#endif

template <typename scalar_t>
void accumulate_rows(const scalar_t* first_row, int64_t rows, int64_t row_stride, int64_t n, int64_t col_stride,
                     double* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (col_stride == 1 && !std::is_same_v<scalar_t, double> && cpu_has_avx2_f16c()) {
    for (int64_t q = 0; q < rows; ++q) add_row_avx2(first_row + q * row_stride, n, acc);
    return;
  }
#endif
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
