// CPU kernel of hiprune::qk_scores: received attention straight from q and k, never holding the (L, L) map.
//
// A task is one chunk of query rows of one (softmax domain, head). It walks its rows in blocks: logits of the
// block against every key of the domain (one BLAS gemm, float32), an exact row softmax in place, then the
// column sums of the block added to the chunk's float32 accumulator (one gemv). Given the rows' log-sum-exp (lse),
// the softmax needs no row pass: one loop adds exp(logit - lse) straight into the accumulator. The working set
// per thread is one block (rows x keys, a few MiB: enough rows to keep the gemm efficient). The accumulators take
// heads x chunks x tokens floats, with the chunk count fixed by the shapes alone, so the result does not depend
// on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "hiprune/checks.h"

namespace hiprune {
namespace cpu {
namespace {

// Enough tasks to keep many threads busy when batch * heads is small; a constant, so results are reproducible.
constexpr int64_t kTargetTasks = 64;
// Floats in one block of logits (4 MiB), and the bounds on its rows. Fewer than 64 rows starve the gemm: it
// re-reads all keys for every block (measured: 30 GFLOP/s at 16 rows, 50 at 64+, L = 16384, D = 80, one core).
constexpr int64_t kBlockElements = int64_t(1) << 20;
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kMinChunkRows = 64;

// One softmax domain: `length` consecutive tokens of one image (or one packed segment), all heads.
struct Domain {
  at::Tensor q, k;      // (H, length, D) views
  at::Tensor lse;       // (H, length) view of the given lse, or undefined
  int64_t length;
  int64_t out_offset;   // where its scores start in the flat output
  int64_t first_chunk;  // index of its first (head, chunk) task
  int64_t acc_offset;   // where its (head, chunk) accumulators of `length` floats each start
  int64_t chunks;       // per head
};

int64_t block_rows_for(int64_t keys) {
  return std::clamp(kBlockElements / std::max<int64_t>(keys, 1), kMinBlockRows, kMaxBlockRows);
}

// BLAS reads a matrix in place when one of its strides is 1 and the other spans a row; else at::mm would copy
// it on every call, so the caller copies it once.
bool blas_ready(const at::Tensor& m) {
  return (m.stride(1) == 1 && m.stride(0) >= m.size(1)) || (m.stride(0) == 1 && m.stride(1) >= m.size(0));
}

// exp(x) in float32 within a few ulp, branch free so that the compiler vectorises the loop below (ATen's exp is
// the accurate, slower variant, and a separate pass). Cody-Waite: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its
// Taylor series to r^7 (error < 1e-8 relative), times 2^n built in the exponent bits. x is clamped to
// [-87, 0.5]: no denormals (exp(-87) = 1.6e-38 stands in for anything smaller, an absolute error far below the
// scores' scale of 1 / L), and x = logit - lse is never much above 0.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : (x > 0.5f ? 0.5f : x);  // (std::min / max would not inline into the clones)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent, sizeof(float));  // (std::bit_cast stops gcc 12 from vectorising)
  return p * two_to_n;
}

// column_sums[j] += exp(row[j] - lse): one row's softmax, given its log-sum-exp, added to the column sums.
// Compiled for AVX-512, AVX2 and plain x86-64; the loader picks by the features of the CPU.
__attribute__((target_clones("avx512f", "avx2", "default")))
void add_row_softmax(const float* __restrict row, float lse, int64_t n, float* __restrict column_sums) {
  for (int64_t j = 0; j < n; ++j) column_sums[j] += exp_nonpositive(row[j] - lse);
}

}  // namespace

at::Tensor qk_scores(const at::Tensor& q, const at::Tensor& k, double scale, int64_t num_prefix,
                     const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& lse) {
  check_qk_args(q, k, scale, num_prefix, cu_seqlens, lse);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor here, got ", q.device());
  const bool packed = cu_seqlens.has_value();
  // Plain tensors from here on: worker threads do not inherit the caller's autograd state.
  const at::Tensor q_in = q.detach(), k_in = k.detach();
  const int64_t heads = q.size(1), dim = q.size(-1);
  const bool with_lse = lse.has_value();
  const at::Tensor lse_in = with_lse ? lse->detach() : at::Tensor();

  std::vector<Domain> domains;
  at::Tensor out;
  if (packed) {
    out = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
    const at::Tensor bounds = cu_seqlens->contiguous();
    const int32_t* b = bounds.const_data_ptr<int32_t>();
    for (int64_t s = 0; s + 1 < bounds.size(0); ++s) {
      const int64_t begin = b[s], length = b[s + 1] - b[s];
      if (length == 0) continue;
      domains.push_back({q_in.narrow(0, begin, length).transpose(0, 1), k_in.narrow(0, begin, length).transpose(0, 1),
                         with_lse ? lse_in.narrow(1, begin, length) : at::Tensor(), length, begin, 0, 0, 0});
    }
  } else {
    out = at::empty({q.size(0), q.size(2) - num_prefix}, q.options().dtype(at::kFloat));
    const int64_t n = q.size(2) - num_prefix;
    for (int64_t b = 0; b < q.size(0); ++b) {
      domains.push_back({q_in[b], k_in[b], with_lse ? lse_in[b] : at::Tensor(), q.size(2), b * n, 0, 0, 0});
    }
  }
  if (domains.empty()) return out;

  // Chunks of query rows per (domain, head): enough tasks in all, but no chunk shorter than kMinChunkRows.
  const int64_t per_domain = (kTargetTasks + heads * int64_t(domains.size()) - 1) / (heads * int64_t(domains.size()));
  int64_t accumulators = 0, acc_floats = 0, max_length = 0, max_rows = 1, max_block = 1;
  std::vector<int64_t> task_domain;  // task -> domain, tasks ordered (domain, head, chunk)
  for (size_t d = 0; d < domains.size(); ++d) {
    Domain& dom = domains[d];
    dom.chunks = std::clamp((dom.length + kMinChunkRows - 1) / kMinChunkRows, int64_t(1), per_domain);
    dom.first_chunk = accumulators;
    dom.acc_offset = acc_floats;
    acc_floats += heads * dom.chunks * dom.length;
    accumulators += heads * dom.chunks;
    max_length = std::max(max_length, dom.length);
    const int64_t rows = std::min(block_rows_for(dom.length), dom.length);
    max_rows = std::max(max_rows, rows);
    max_block = std::max(max_block, rows * dom.length);
    task_domain.insert(task_domain.end(), heads * dom.chunks, int64_t(d));
  }
  // Accumulator of a task: over the chunk's query rows, the sum of softmax(row), one float per key of its domain.
  at::Tensor acc = at::zeros({acc_floats}, q.options().dtype(at::kFloat));
  const int64_t tasks = accumulators;

  // Workers run tensor ops: give them the caller's thread-local state (inference mode, grad mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    at::NoGradGuard no_grad;
    const auto f32 = q.options().dtype(at::kFloat);
    at::Tensor q_block = at::empty({max_rows, dim}, f32);
    at::Tensor logits_buffer = at::empty({max_block}, f32);
    at::Tensor ones = at::ones({max_rows}, f32);
    at::Tensor k_buffer;                 // float32 copy of one head's keys, when needed
    int64_t k_domain = -1, k_head = -1;  // what k_buffer holds
    at::Tensor keys;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task_domain[task];
      const Domain& dom = domains[d];
      const int64_t local = task - dom.first_chunk, head = local / dom.chunks, chunk = local % dom.chunks;
      const int64_t n = dom.length;
      if (d != k_domain || head != k_head) {
        keys = dom.k[head];  // (n, D)
        if (keys.scalar_type() != at::kFloat || !blas_ready(keys)) {
          if (!k_buffer.defined()) k_buffer = at::empty({max_length * dim}, f32);
          at::Tensor copy = k_buffer.narrow(0, 0, n * dim).view({n, dim});
          copy.copy_(keys);
          keys = copy;
        }
        k_domain = d;
        k_head = head;
      }
      const at::Tensor keys_t = keys.t();
      const at::Tensor queries = dom.q[head];  // (n, D)
      const int64_t rows_per_chunk = (n + dom.chunks - 1) / dom.chunks;
      const int64_t row_begin = chunk * rows_per_chunk, row_end = std::min(n, row_begin + rows_per_chunk);
      at::Tensor column_sums = acc.narrow(0, dom.acc_offset + local * n, n);
      const int64_t block_rows = block_rows_for(n);

      for (int64_t r0 = row_begin; r0 < row_end; r0 += block_rows) {
        const int64_t rows = std::min(block_rows, row_end - r0);
        at::Tensor scaled = q_block.narrow(0, 0, rows);
        scaled.copy_(queries.narrow(0, r0, rows));  // to float32 first, then scale: no rounding in half precision
        scaled.mul_(scale);
        at::Tensor logits = logits_buffer.narrow(0, 0, rows * n).view({rows, n});
        at::mm_out(logits, scaled, keys_t);
        if (with_lse) {
          const at::Tensor head_lse = dom.lse[head];
          const auto row_lse = head_lse.accessor<const float, 1>();
          const float* logit_rows = logits.const_data_ptr<float>();
          float* sums = column_sums.data_ptr<float>();
          for (int64_t i = 0; i < rows; ++i) add_row_softmax(logit_rows + i * n, row_lse[r0 + i], n, sums);
        } else {
          at::_softmax_out(logits, logits, 1, false);
          column_sums.addmv_(logits.t(), ones.narrow(0, 0, rows));
        }
      }
    }
  });

  // Sum the (head, chunk) accumulators of each domain in a fixed order, in float64; round the mean once.
  const float* acc_data = acc.const_data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t first_column = packed ? 0 : num_prefix;
  at::parallel_for(0, int64_t(domains.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> total;
    for (int64_t d = begin; d < end; ++d) {
      const Domain& dom = domains[d];
      total.assign(dom.length, 0.0);
      for (int64_t a = 0; a < heads * dom.chunks; ++a) {
        const float* row = acc_data + dom.acc_offset + a * dom.length;
        for (int64_t j = first_column; j < dom.length; ++j) total[j] += row[j];
      }
      const double count = double(heads) * double(dom.length);
      float* dst = out_data + dom.out_offset;
      for (int64_t j = first_column; j < dom.length; ++j) dst[j - first_column] = float(total[j] / count);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("qk_scores", &hiprune::cpu::qk_scores); }
