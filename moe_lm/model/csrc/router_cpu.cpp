// The router's top-k on a CPU (model/routing.py, fair_topk): the k largest scores of each row, the
// rows shared out over torch's threads. Each row keeps its k + 1 largest in a short sorted list
// (one pass over the E scores): (4,096 x 32) top-4 in ~0.41 ms on 2 threads, where torch.topk of 5
// took ~0.69.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

using at::Tensor;

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
      const float* row = sp + t * E;
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
      row_ok[t] = ok;
      for (int64_t j = 0; j < k; j++) ip[t * k + j] = ok ? ix[j] : 0;
    }
  });
  bool unique = true;
  for (int64_t t = 0; t < T && unique; t++) unique = row_ok[t];
  return {idx, unique};
}
