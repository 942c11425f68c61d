// The router on a CPU (model/routing.py): the k largest scores of each row (fair_topk's shortcut),
// and softmax top-k routing's work after the softmax in one pass per row, forward and backward
// (SoftmaxTopK and Switch, through cpu_kernel.SoftmaxTopKFn). Rows are shared out over torch's
// threads; each row is computed the same way wherever it falls. The top k: for up to 64 experts
// each score's rank (how many scores are larger: a vectorised count, no branches on the data), the k
// ranked 0..k-1 taking their places, (4,096 x 32) top-4 in ~0.14 ms on 2 threads where torch.topk
// of 5 took ~0.8; above 64 experts each row keeps its k + 1 largest in a short sorted list. The
// counting loops are compiled for AVX-512, AVX2 and the base ISA (GCC's target_clones).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TARGET_CLONES
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))

// the k largest of row (E <= 64 scores) into v, ix, descending, by rank: each score's place is the
// number of scores above it. false where a score is NaN or two of the k largest, or the k-th and
// the (k + 1)-th, are equal (a place taken twice: the order is not the scores' alone).
template <int64_t EC>  // EC > 0: E known at compile time (the loops unrolled, the ranks in registers)
ALWAYS_INLINE bool row_top_ranked_body(const float* row, int64_t E, int64_t k, float* v, int64_t* ix) {
  if (EC > 0) E = EC;
  int32_t rank[64] = {0};
  for (int64_t j = 0; j < E; j++) {  // every score against row[j], all at once
    const float y = row[j];
    for (int64_t e = 0; e < E; e++) rank[e] += row[e] < y;
  }
  uint64_t taken = 0;
  bool ok = true;
  for (int64_t e = 0; e < E; e++) {
    const float x = row[e];
    const int32_t r = rank[e];
    ok &= x == x;
    if (r < k) {
      ok &= !((taken >> r) & 1);
      taken |= uint64_t(1) << r;
      v[r] = x;
      ix[r] = e;
    }
  }
  return ok && taken == (k == 64 ? ~uint64_t(0) : (uint64_t(1) << k) - 1);
}

TARGET_CLONES bool row_top_ranked(const float* row, int64_t E, int64_t k, float* v, int64_t* ix) {
  switch (E) {  // the common expert counts, unrolled
    case 8: return row_top_ranked_body<8>(row, E, k, v, ix);
    case 16: return row_top_ranked_body<16>(row, E, k, v, ix);
    case 32: return row_top_ranked_body<32>(row, E, k, v, ix);
    case 64: return row_top_ranked_body<64>(row, E, k, v, ix);
    default: return row_top_ranked_body<0>(row, E, k, v, ix);
  }
}

// the same for any E: the m = min(k + 1, E) largest kept in a short sorted list, one pass
bool row_top_sorted(const float* row, int64_t E, int64_t m, float* v, int64_t* ix) {
  int64_t n = 0;
  bool nan = false;
  float lowest = -INFINITY;  // the smallest kept score once m are kept
  for (int64_t e = 0; e < E; e++) {
    const float x = row[e];
    nan |= x != x;  // NaN: never kept (every comparison is false), the row refused below
    if (n < m || x > lowest) {  // goes in: after every kept score >= x
      int64_t j = n < m ? n++ : m - 1;
      for (; j > 0 && v[j - 1] < x; j--) {
        v[j] = v[j - 1];
        ix[j] = ix[j - 1];
      }
      v[j] = x;
      ix[j] = e;
      if (n == m) lowest = v[m - 1];
    }
  }
  bool ok = !nan;
  for (int64_t j = 0; ok && j + 1 < n; j++) ok = v[j] != v[j + 1];
  return ok;
}

// the k largest of row into v[0, k), ix[0, k) (v, ix hold k + 1), descending; false where a score
// is NaN or two of the k + 1 largest are equal
bool row_top(const float* row, int64_t E, int64_t k, float* v, int64_t* ix) {
  return E <= 64 ? row_top_ranked(row, E, k, v, ix) : row_top_sorted(row, E, std::min(k + 1, E), v, ix);
}

// sum over e of p[e] (l[e] - top), the terms with p[e] = 0 left out, in 8 lanes summed in a fixed
// order (top: the row's largest logit, so large logits do not cancel in the entropy)
TARGET_CLONES float dot_where_positive(const float* p, const float* l, float top, int64_t E) {
  float acc[8] = {0.f};
  int64_t e = 0;
  for (; e + 8 <= E; e += 8)
    for (int q = 0; q < 8; q++) acc[q] += p[e + q] == 0.f ? 0.f : p[e + q] * (l[e + q] - top);
  for (; e < E; e++) acc[e % 8] += p[e] == 0.f ? 0.f : p[e] * (l[e] - top);
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

bool all_rows(const std::vector<char>& row_ok) {
  for (char ok : row_ok)
    if (!ok) return false;
  return true;
}

}  // namespace

// scores (T, E) float32 contiguous, 1 <= k <= E -> (indices (T, k) int64 of each row's k largest,
// in descending order of score; unique). unique is false where some row has a NaN, or two equal
// scores among its k + 1 largest: there the order is not the scores' alone, and the caller breaks
// the ties its own way (the indices are then not to be used). With unique true the answer is the
// only one: torch.topk's.
std::tuple<Tensor, bool> topk_unique(Tensor scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "topk_unique takes a contiguous (T, E) float32 tensor");
  const int64_t T = scores.size(0), E = scores.size(1), m = std::min(k + 1, E);
  TORCH_CHECK(k >= 1 && k <= E, "topk_unique needs 1 <= k <= E");
  Tensor idx = at::empty({T, k}, scores.options().dtype(at::kLong));
  const float* sp = scores.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<char> row_ok(T, 1);
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> v(m);
    std::vector<int64_t> ix(m);
    for (int64_t t = t0; t < t1; t++) {
      const bool ok = row_top(sp + t * E, E, k, v.data(), ix.data());
      row_ok[t] = ok;
      for (int64_t j = 0; j < k; j++) ip[t * k + j] = ok ? ix[j] : 0;
    }
  });
  return {idx, all_rows(row_ok)};
}

// Softmax top-k routing after the softmax, one pass per row. logits and probs = softmax(logits)
// (T, E) float32 contiguous; 1 <= k <= E; renorm: the kept k divided by their sum (top_k > 1).
// -> idx (T, k) int64 (topk_unique's), top_p (T, k) = probs at idx, weight (T, k) = top_p or
// top_p / sum(top_p), lse (T,) = logsumexp(logits) = logit - log(prob) at the row's largest prob,
// entropy (T,) = -sum p log p = (lse - top) - sum p (logit - top), top the row's largest logit
// (terms with p = 0 left out), unique (as
// topk_unique; where false the rest is not to be used).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, bool> softmax_topk_forward(Tensor logits, Tensor probs, int64_t k,
                                                                             bool renorm) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
              probs.sizes() == logits.sizes() && probs.scalar_type() == at::kFloat && probs.is_contiguous(),
              "softmax_topk_forward takes contiguous (T, E) float32 logits and probs");
  const int64_t T = logits.size(0), E = logits.size(1), m = std::min(k + 1, E);
  TORCH_CHECK(k >= 1 && k <= E, "softmax_topk_forward needs 1 <= k <= E");
  Tensor idx = at::empty({T, k}, logits.options().dtype(at::kLong)), top_p = at::empty({T, k}, logits.options()),
         weight = at::empty({T, k}, logits.options()), lse = at::empty({T}, logits.options()),
         ent = at::empty({T}, logits.options());
  const float *lp = logits.data_ptr<float>(), *pp = probs.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float *tp = top_p.data_ptr<float>(), *wp = weight.data_ptr<float>(), *lsep = lse.data_ptr<float>(),
        *entp = ent.data_ptr<float>();
  std::vector<char> row_ok(T, 1);
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> v(m);
    std::vector<int64_t> ix(m);
    for (int64_t t = t0; t < t1; t++) {
      const float *p = pp + t * E, *l = lp + t * E;
      const bool ok = row_top(p, E, k, v.data(), ix.data());
      row_ok[t] = ok;
      float sum = 0.f;
      for (int64_t j = 0; j < k; j++) {
        ip[t * k + j] = ok ? ix[j] : 0;
        tp[t * k + j] = ok ? v[j] : 0.f;
        sum += tp[t * k + j];
      }
      for (int64_t j = 0; j < k; j++) wp[t * k + j] = renorm ? tp[t * k + j] / sum : tp[t * k + j];
      const float top = ok ? l[ix[0]] : 0.f, log_p0 = ok ? std::log(v[0]) : 0.f;  // the largest p's logit
      lsep[t] = top - log_p0;
      entp[t] = -log_p0 - dot_where_positive(p, l, top, E);  // (lse - top) - sum p (l - top)
    }
  });
  return {idx, top_p, weight, lse, ent, all_rows(row_ok)};
}

// Its backward: dL/d logits (T, E) from dweight (T, k), dprobs (T, E) (any strides) and dlse (T,),
// each possibly undefined (no gradient). With d top_p = dweight (renorm: (dweight - sum dweight *
// weight) / sum top_p) added into dprobs at idx, and dlse's p: the softmax's backward,
// p * (dp - sum p dp) + dlse * p.
Tensor softmax_topk_backward(Tensor probs, Tensor idx, Tensor top_p, Tensor weight, bool renorm,
                             std::optional<Tensor> dweight_, std::optional<Tensor> dprobs_,
                             std::optional<Tensor> dlse_) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_contiguous(), "probs (T, E) float32");
  const Tensor dweight = dweight_.value_or(Tensor()), dprobs = dprobs_.value_or(Tensor()), dlse = dlse_.value_or(Tensor());
  const int64_t T = probs.size(0), E = probs.size(1), k = idx.size(1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == T && idx.scalar_type() == at::kLong && idx.is_contiguous() &&
              top_p.sizes() == idx.sizes() && top_p.is_contiguous() && weight.sizes() == idx.sizes() &&
              weight.is_contiguous(), "idx, top_p and weight (T, k), contiguous");
  TORCH_CHECK(!dweight.defined() || (dweight.sizes() == idx.sizes() && dweight.scalar_type() == at::kFloat),
              "dweight (T, k) float32");
  TORCH_CHECK(!dprobs.defined() || (dprobs.sizes() == probs.sizes() && dprobs.scalar_type() == at::kFloat),
              "dprobs (T, E) float32");
  TORCH_CHECK(!dlse.defined() || (dlse.dim() == 1 && dlse.size(0) == T && dlse.scalar_type() == at::kFloat),
              "dlse (T,) float32");
  Tensor dl = at::empty({T, E}, probs.options());
  const float *pp = probs.data_ptr<float>(), *tp = top_p.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* dwp = dweight.defined() ? dweight.data_ptr<float>() : nullptr;
  const float* dpp = dprobs.defined() ? dprobs.data_ptr<float>() : nullptr;
  const float* dlsep = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  const int64_t dw0 = dwp ? dweight.stride(0) : 0, dw1 = dwp ? dweight.stride(1) : 0;
  const int64_t dp0 = dpp ? dprobs.stride(0) : 0, dp1 = dpp ? dprobs.stride(1) : 0;
  const int64_t dl0 = dlsep ? dlse.stride(0) : 0;
  float* out = dl.data_ptr<float>();
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> dp(E);
    for (int64_t t = t0; t < t1; t++) {
      const float* p = pp + t * E;
      for (int64_t e = 0; e < E; e++) dp[e] = dpp ? dpp[t * dp0 + e * dp1] : 0.f;
      if (dwp) {
        float sum_tp = 0.f, dot = 0.f;
        for (int64_t j = 0; j < k; j++) {
          sum_tp += tp[t * k + j];
          dot += dwp[t * dw0 + j * dw1] * wp[t * k + j];
        }
        for (int64_t j = 0; j < k; j++) {
          const float g = dwp[t * dw0 + j * dw1];
          dp[ip[t * k + j]] += renorm ? (g - dot) / sum_tp : g;
        }
      }
      float pdp = 0.f;
      for (int64_t e = 0; e < E; e++) pdp += p[e] * dp[e];
      const float g_lse = dlsep ? dlsep[t * dl0] : 0.f;
      float* o = out + t * E;
      for (int64_t e = 0; e < E; e++) o[e] = p[e] * (dp[e] - pdp) + g_lse * p[e];
    }
  });
  return dl;
}
