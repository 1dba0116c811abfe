// CPU kernel of hiprune::select_with_roles: fused scores, then per image anchors, buffers, registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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
  if (input.scalar_type() == at::kFloat && input.is_contiguous()) return input;  // no dispatcher round trips
  return input.to(at::kFloat).contiguous();
}

// Tokens selected serially before the batch is split across threads (a few hundred microseconds of work).
constexpr int64_t kSerialSelectTokens = 1 << 16;

// -- selection of one image ----------------------------------------------------------------------------------
// Branch-light: the passes over all N tokens are vectorizable loops (ranks, flags, counts) or data-independent
// scalar loops (histograms); data-dependent branches run over the few tokens that survive a pass.

constexpr int64_t kFlagWord = 64;            // flags are read 64 at a time
constexpr int kDigitBits = 8;                // radix select digit
constexpr int kDigits = 1 << kDigitBits;
constexpr int64_t kDirectSelectMax = 32;     // candidates left when the k-th is found by counting
constexpr int64_t kInsertionSelectMax = 16;  // largest k kept in a sorted list in one pass

int64_t padded_to_words(int64_t n) { return (n + kFlagWord - 1) / kFlagWord * kFlagWord; }

// 64 flags (bytes 0 or 1) as bits, flag j in bit j: each 8 bytes gathered into 8 bits by one multiply.
inline uint64_t flag_bits(const uint8_t* flags) {
  uint64_t bits = 0;
  for (int byte = 0; byte < 8; ++byte) {
    uint64_t eight;
    std::memcpy(&eight, flags + 8 * byte, sizeof(eight));
    bits |= ((eight * 0x0102040810204080ull) >> 56) << (8 * byte);
  }
  return bits;
}

// f(i) for each set flag, in increasing i; flags are zero from n up to a whole word.
template <class F>
inline void for_each_flagged(const uint8_t* flags, int64_t n, F&& f) {
  for (int64_t base = 0; base < n; base += kFlagWord)
    for (uint64_t bits = flag_bits(flags + base); bits != 0; bits &= bits - 1) f(base + __builtin_ctzll(bits));
}

constexpr int kBlock = 16;

// Whether any of kBlock ranks is above floor; a separate loop so that it vectorizes.
inline bool any_above(const uint32_t* ranks, uint32_t floor) {
  uint32_t any = 0;
  for (int h = 0; h < kBlock; ++h) any |= ranks[h] > floor;
  return any != 0;
}

// The k-th largest of m ranks (1 <= k <= m, m small) by counting, for each rank, those above it.
RankThreshold kth_largest_by_counting(const uint32_t* ranks, int64_t m, int64_t k) {
  for (int64_t i = 0;; ++i) {
    int64_t above = 0, at_least = 0;
    for (int64_t j = 0; j < m; ++j) {
      above += ranks[j] > ranks[i];
      at_least += ranks[j] >= ranks[i];
    }
    if (above < k && k <= at_least) return RankThreshold{ranks[i], k - above};
  }
}

struct ImageSelector {
  int64_t n, budget, grid_h, grid_w, n_anchor;
  int neighborhood;
  bool official;
  // Scratch reused across the task's images.
  std::vector<uint32_t> ranks, candidates;
  std::vector<uint8_t> flags;  // n rounded up to whole words; zero past the flags in use
  std::vector<int8_t> role;    // kNotKept, or a Role
  std::vector<int64_t> anchors;
  std::vector<uint32_t> top_ranks;
  uint32_t histograms[4][kDigits];  // four, so that runs of equal digits do not serialise on one counter

  ImageSelector(int64_t n, int64_t budget, int64_t grid_h, int64_t grid_w, int64_t n_anchor, int neighborhood,
                bool official)
      : n(n), budget(budget), grid_h(grid_h), grid_w(grid_w), n_anchor(n_anchor), neighborhood(neighborhood),
        official(official), ranks(n), candidates(n), flags(padded_to_words(n), 0), role(n), anchors(n_anchor),
        top_ranks(n_anchor) {}

  // The k-th largest of ranks[0, n) that are not kExcludedRank (1 <= k <= their number). Radix select, most
  // significant digit first, on the 8 bits below the highest bit in which the candidates differ: each pass counts
  // the candidates' digits, then keeps those of the digit holding the k-th, until they are all equal or few.
  RankThreshold kth_largest(int64_t k) {
    const uint32_t* source = ranks.data();
    uint32_t* next = candidates.data();
    uint8_t* flag = flags.data();
    // OR and AND of the candidates, which differ in the bits of any ^ all. Excluded ranks (0) are left out of
    // the AND so that digits span the candidates only; they fall in digit 0, which holds the k-th only when
    // that is the last digit with candidates, and are dropped there.
    uint32_t any = 0, all = ~0u;
    for (int64_t i = 0, end = n; i < end; ++i) {
      any |= source[i];
      all &= source[i] == kExcludedRank ? ~0u : source[i];
    }
    int64_t m = n;
    while (any != all) {
      if (m <= kDirectSelectMax) return kth_largest_by_counting(source, m, k);  // excluded ranks are below all
      const int top_bit = 31 - __builtin_clz(any ^ all);  // highest bit in which candidates differ
      const int shift = std::max(top_bit + 1 - kDigitBits, 0);
      std::memset(histograms, 0, sizeof(histograms));
      int64_t i = 0;
      for (; i + 4 <= m; i += 4)
        for (int h = 0; h < 4; ++h) ++histograms[h][(source[i + h] >> shift) % kDigits];
      for (; i < m; ++i) ++histograms[0][(source[i] >> shift) % kDigits];
      uint32_t digit = kDigits - 1;
      for (;; --digit) {
        const int64_t count = histograms[0][digit] + histograms[1][digit] + histograms[2][digit] + histograms[3][digit];
        if (count >= k) break;
        k -= count;
      }
      for (i = 0; i < m; ++i)
        flag[i] = (((source[i] >> shift) % kDigits) == digit) & (source[i] != kExcludedRank);
      int64_t m_next = 0;
      any = 0;
      all = ~0u;
      for_each_flagged(flag, m, [&](int64_t j) {
        const uint32_t r = source[j];  // in place once source is candidates: m_next <= j
        next[m_next++] = r;
        any |= r;
        all &= r;
      });
      std::memset(flag, 0, m);
      source = next;
      m = m_next;
    }
    return RankThreshold{any, k};
  }

  // anchors = the n_anchor best object scores.
  void find_anchors(const float* object_scores) {
    uint32_t* rank = ranks.data();
    for (int64_t i = 0, end = n; i < end; ++i) rank[i] = score_rank(object_scores[i]);
    if (n_anchor > kInsertionSelectMax) {
      RankThreshold threshold = kth_largest(n_anchor);
      for (int64_t i = 0, found = 0; found < n_anchor; ++i)
        if (take_ranked(threshold, rank[i])) anchors[found++] = i;
      return;
    }
    // Best first, equal ranks in index order, so a later token enters only above the last one: after the first
    // few tokens, few enter, and the branch is rarely taken.
    uint32_t* top = top_ranks.data();
    int64_t* best = anchors.data();
    const auto insert = [&](int64_t i, int64_t j) {
      for (; j > 0 && top[j - 1] < rank[i]; --j) {
        top[j] = top[j - 1];
        best[j] = best[j - 1];
      }
      top[j] = rank[i];
      best[j] = i;
    };
    for (int64_t i = 0; i < n_anchor; ++i) insert(i, i);
    uint32_t floor = top[n_anchor - 1];
    // Blocks compared at once (vectorized), tokens one by one only in the rare blocks with an entrant.
    int64_t i = n_anchor;
    for (const int64_t end = n; i + kBlock <= end; i += kBlock) {
      if (!any_above(rank + i, floor)) continue;
      for (int h = 0; h < kBlock; ++h)
        if (rank[i + h] > floor) {
          insert(i + h, n_anchor - 1);
          floor = top[n_anchor - 1];
        }
    }
    for (; i < n; ++i)
      if (rank[i] > floor) {
        insert(i, n_anchor - 1);
        floor = top[n_anchor - 1];
      }
  }

  // Returns the number of anchors and buffers; when it exceeds the budget (official mode) nothing is written.
  int64_t run(const float* object_scores, const float* deep_scores, int64_t* indices, int8_t* roles) {
    int8_t* token_role = role.data();
    uint32_t* rank = ranks.data();
    uint8_t* flag = flags.data();
    std::memset(token_role, kNotKept, n);
    if (n_anchor > 0) {
      find_anchors(object_scores);
      for (int64_t a = 0; a < n_anchor; ++a) token_role[anchors[a]] = kAnchor;
      for (int64_t a = 0; a < n_anchor; ++a)
        mark_buffers_around(anchors[a], token_role, grid_h, grid_w, neighborhood, official);
    }
    int64_t kept = 0;
    for (int64_t i = 0, end = n; i < end; ++i) kept += token_role[i] != kNotKept;
    if (kept > budget) return kept;
    for (int64_t i = 0, end = n; i < end; ++i) rank[i] = register_rank(token_role[i], deep_scores[i]);
    // n - kept >= budget - kept tokens are not excluded; without registers, a threshold above every rank.
    RankThreshold threshold = budget > kept ? kth_largest(budget - kept) : RankThreshold{~0u, 0};
    // Kept tokens (rank kExcludedRank = 0, which wraps to the top below) and register candidates at or above the
    // threshold, in index order; take_ranked drops the ties beyond the threshold's count.
    for (int64_t i = 0, end = n; i < end; ++i) flag[i] = rank[i] - 1u >= threshold.rank - 1u;
    int64_t out = 0;
    for_each_flagged(flag, n, [&](int64_t i) {
      const bool is_kept = rank[i] == kExcludedRank;
      if (!is_kept && !take_ranked(threshold, rank[i])) return;
      indices[out] = i;
      roles[out] = is_kept ? token_role[i] : static_cast<int8_t>(kRegister);
      ++out;
    });
    std::memset(flag, 0, n);
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
    ImageSelector selector(n, budget, grid_h, grid_w, args.n_anchor, args.neighborhood, official);
    for (int64_t b = begin; b < end; ++b)
      kept[b] = selector.run(object_data + b * n, deep_data + b * n, index_data + b * budget, role_data + b * budget);
  });
  if (!kept.empty()) check_official_kept(*std::max_element(kept.begin(), kept.end()), budget);
  return {indices, roles};
}

}  // namespace cpu
}  // namespace hiprune

TORCH_LIBRARY_IMPL(hiprune, CPU, m) { m.impl("select_with_roles", &hiprune::cpu::select_with_roles); }
