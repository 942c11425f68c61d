// The "cpu_kernel" dispatch path (moe_lm/model/cpu_kernel.py): the fused path's expert work for
// float32 on a CPU, one C++ call per direction and layer.
//
// Rows arrive sorted by expert (sizes[e] each). The experts are shared out over torch's threads by
// a counter: a thread takes the next expert and runs all of its work alone, in its own scratch
// memory while the expert's rows sit in its cache (forward: the gather, the gate/up product h, the
// activation, the down product y; backward: dL/d weight, the activation again, d w_down, dL/d act,
// the activation's backward, the gather again, d w_in and its rows of dL/dx), so a direction is two
// fork-joins (the experts, then the combine), not one per small operation per expert, and a
// thread that another program holds back just does fewer experts. Only h and y are kept for the
// backward. The products go to oneDNN's brgemm micro-kernels (at::native::cpublas::brgemm: the
// AVX-512 or AVX2 kernels this CPU has) in blocks of MB rows, so whatever the routing, a layer uses
// a handful of kernel shapes (each new shape is a ~40 us just-in-time build). The weight gradients
// A^T B sum the rows into register tiles (at_b), or for shapes that do not fit the tiles, brgemm on
// A^T copied in blocks of KB rows. The element-wise work (SwiGLU and ReLU and their backwards, the
// gate weights' dot products, the combine) and at_b are compiled three times, for AVX-512, AVX2 +
// FMA and the base ISA, and the CPU's best is taken at load; each row is computed the same way
// wherever it falls, and the combine sums each token's rows in their expert-sorted order (parallel
// over the tokens): the result does not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <cstdint>
#include <cstring>
#include <vector>

using at::Tensor;
namespace cb = at::native::cpublas;

namespace {

constexpr int64_t MB = 32;  // rows per product call
constexpr int64_t KB = 64;  // rows summed per weight-gradient call

enum Act : int64_t { SWIGLU = 0, RELU = 1, GELU = 2 };

// ---- element-wise row work, compiled once per instruction set (the ROW_OPS variants below) -------

#define ALWAYS_INLINE inline __attribute__((always_inline))

// exp(x) by Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times
// 2^n built in the exponent bits (relative error ~1e-7); +inf above 88 and 0 below -87 (just
// inside where float32's exp overflows, 88.72, and leaves the normal numbers, -87.34: so 2^n stays
// a normal float; silu(x) for x in (-88.72, -88) is then -0 where torch gives ~-1e-37), NaN for
// NaN. Selects, no branches, so the compiler vectorises the loops that call it (with
// -fno-trapping-math).
ALWAYS_INLINE float exp_poly(float x) {
  const bool over = x > 88.f, under = x < -87.f;
  x = over ? 88.f : x;
  x = under ? -87.f : x;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, in its low bits
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // Cephes' ln2 split in two
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  uint32_t tb;
  std::memcpy(&tb, &t, 4);
  const uint32_t sb = (tb - 0x4B400000u + 127u) << 23;  // 2^n
  float s;
  std::memcpy(&s, &sb, 4);
  const float e = p * s;
  return over ? __builtin_inff() : (under ? 0.f : e);
}

// SwiGLU on n rows of h = [gate | up] (n x 2H): a = silu(gate) * up (n x H), silu(gate) =
// gate / (1 + exp(-gate)); with sig (n x H) also sigmoid(gate) = 1 / (1 + exp(-gate)) there, for
// the backward
template <bool SIG>
ALWAYS_INLINE void swiglu_body(int64_t n, int64_t H, const float* h, float* a, float* sig) {
  for (int64_t i = 0; i < n; i++) {
    const float *gate = h + i * 2 * H, *up = gate + H;
    float *ai = a + i * H, *si = sig + i * H;
    for (int64_t j = 0; j < H; j++) {
      const float x = gate[j], e = exp_poly(-x);
      ai[j] = x / (1.f + e) * up[j];
      if (SIG) si[j] = 1.f / (1.f + e);
    }
  }
}

// its backward: dh = [d gate | d up] (n x 2H) from da (n x H) and sig = sigmoid(gate):
// d up = da * gate * sig, d gate = da * up * sig * (1 + gate * (1 - sig)) (ATen's silu_backward)
ALWAYS_INLINE void swiglu_backward_body(int64_t n, int64_t H, const float* h, const float* sig, const float* da,
                                        float* dh) {
  for (int64_t i = 0; i < n; i++) {
    const float *gate = h + i * 2 * H, *up = gate + H, *si = sig + i * H, *dai = da + i * H;
    float *dgate = dh + i * 2 * H, *dup = dgate + H;
    for (int64_t j = 0; j < H; j++) {
      const float x = gate[j], s = si[j];
      dup[j] = dai[j] * (x * s);
      dgate[j] = dai[j] * up[j] * (s * (1.f + x * (1.f - s)));
    }
  }
}

// ReLU on m elements (NaN stays NaN, as clamp_min), and its backward (threshold_backward: 0 where h <= 0)
ALWAYS_INLINE void relu_body(int64_t m, const float* h, float* a) {
  for (int64_t j = 0; j < m; j++) a[j] = h[j] < 0.f ? 0.f : h[j];
}
ALWAYS_INLINE void relu_backward_body(int64_t m, const float* h, const float* da, float* dh) {
  for (int64_t j = 0; j < m; j++) dh[j] = h[j] <= 0.f ? 0.f : da[j];
}

// for n rows of one expert: gb[i] = w[i] g[tok[i]] (dL/dy) and dw[i] = <g[tok[i]], y[i]> (dL/d weight),
// the dot product summed in 16 lanes, then the lanes in a fixed order
ALWAYS_INLINE void grad_rows_body(int64_t n, int64_t d, const int64_t* tok, const float* g, const float* y,
                                  const float* w, float* gb, float* dw) {
  for (int64_t i = 0; i < n; i++) {
    const float *gi = g + tok[i] * d, *yi = y + i * d;
    float* gbi = gb + i * d;
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
      for (int l = 0; l < 16; l++) acc[l] += gi[j + l] * yi[j + l];
    for (; j < d; j++) acc[j % 16] += gi[j] * yi[j];
    for (int l = 8; l > 0; l /= 2)
      for (int q = 0; q < l; q++) acc[q] += acc[q + l];
    dw[i] = acc[0];
    for (j = 0; j < d; j++) gbi[j] = gi[j] * w[i];
  }
}

// out[t] = sum over q in [first[t], first[t + 1]) of scale(order[q]) rows[order[q]], for t in [t0, t1),
// in increasing q; scale = w[i] (or 1 where w is null)
ALWAYS_INLINE void combine_body(int64_t t0, int64_t t1, int64_t d, const int64_t* first, const int64_t* order,
                                const float* rows, const float* w, float* out) {
  for (int64_t t = t0; t < t1; t++) {
    float* ot = out + t * d;
    for (int64_t j = 0; j < d; j++) ot[j] = 0.f;
    for (int64_t q = first[t]; q < first[t + 1]; q++) {
      const float* ri = rows + order[q] * d;
      const float s = w ? w[order[q]] : 1.f;
      for (int64_t j = 0; j < d; j++) ot[j] += ri[j] * s;
    }
  }
}

// G (P x Q) = A^T B for A (n x P) and B (n x Q) row-major: a weight gradient, without a transposed
// copy of A. G is made in tiles of PB rows x NV vectors V (GCC's vector extensions, the variant's
// register width) held in registers while the n rows stream by: per row, NV vectors of B, each of
// PB values of A broadcast, PB NV multiply-adds. Each element sums its rows in order. Needs
// P % PB == 0 and Q % (NV lanes) == 0.
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));

template <typename V, int PB, int NV>
ALWAYS_INLINE void at_b_body(int64_t n, int64_t P, int64_t Q, const float* A, const float* B, float* G) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  for (int64_t p0 = 0; p0 < P; p0 += PB)
    for (int64_t q0 = 0; q0 < Q; q0 += L * NV) {
      V acc[PB][NV];
#pragma GCC unroll 16
      for (int pp = 0; pp < PB; pp++)
#pragma GCC unroll 16
        for (int v = 0; v < NV; v++) acc[pp][v] = V{};
      for (int64_t i = 0; i < n; i++) {
        const float *a = A + i * P + p0, *b = B + i * Q + q0;
        V bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; v++) std::memcpy(&bv[v], b + L * v, sizeof(V));
#pragma GCC unroll 16
        for (int pp = 0; pp < PB; pp++) {
          const float ap = a[pp];
#pragma GCC unroll 16
          for (int v = 0; v < NV; v++) acc[pp][v] += ap * bv[v];
        }
      }
#pragma GCC unroll 16
      for (int pp = 0; pp < PB; pp++)
#pragma GCC unroll 16
        for (int v = 0; v < NV; v++) std::memcpy(G + (p0 + pp) * Q + q0 + L * v, &acc[pp][v], sizeof(V));
    }
}

struct RowOps {
  void (*swiglu)(int64_t, int64_t, const float*, float*, float*);  // sig null: not kept
  void (*swiglu_backward)(int64_t, int64_t, const float*, const float*, const float*, float*);
  void (*relu)(int64_t, const float*, float*);
  void (*relu_backward)(int64_t, const float*, const float*, float*);
  void (*grad_rows)(int64_t, int64_t, const int64_t*, const float*, const float*, const float*, float*, float*);
  void (*combine)(int64_t, int64_t, int64_t, const int64_t*, const int64_t*, const float*, const float*, float*);
  void (*at_b)(int64_t, int64_t, int64_t, const float*, const float*, float*);
  int64_t at_b_rows, at_b_cols;  // at_b's P and Q must be multiples of these
};

#define ROW_OPS(NS, TARGET, V, PB, NV)                                                                         \
  namespace NS {                                                                                            \
  TARGET void swiglu(int64_t n, int64_t H, const float* h, float* a, float* sig) {                          \
    if (sig)                                                                                                \
      swiglu_body<true>(n, H, h, a, sig);                                                                   \
    else                                                                                                    \
      swiglu_body<false>(n, H, h, a, sig);                                                                  \
  }                                                                                                         \
  TARGET void swiglu_backward(int64_t n, int64_t H, const float* h, const float* sig, const float* da, float* dh) { \
    swiglu_backward_body(n, H, h, sig, da, dh);                                                             \
  }                                                                                                         \
  TARGET void relu(int64_t m, const float* h, float* a) { relu_body(m, h, a); }                              \
  TARGET void relu_backward(int64_t m, const float* h, const float* da, float* dh) { relu_backward_body(m, h, da, dh); } \
  TARGET void grad_rows(int64_t n, int64_t d, const int64_t* tok, const float* g, const float* y, const float* w, \
                        float* gb, float* dw) {                                                             \
    grad_rows_body(n, d, tok, g, y, w, gb, dw);                                                             \
  }                                                                                                         \
  TARGET void combine(int64_t t0, int64_t t1, int64_t d, const int64_t* first, const int64_t* order,        \
                      const float* rows, const float* w, float* out) {                                      \
    combine_body(t0, t1, d, first, order, rows, w, out);                                                    \
  }                                                                                                         \
  TARGET void at_b(int64_t n, int64_t P, int64_t Q, const float* A, const float* B, float* G) {             \
    at_b_body<V, PB, NV>(n, P, Q, A, B, G);                                                                    \
  }                                                                                                         \
  const RowOps ops{swiglu, swiglu_backward, relu, relu_backward, grad_rows, combine, at_b, PB,                  \
                  NV * int64_t(sizeof(V) / sizeof(float))};                                                 \
  }

// at_b's tiles: AVX-512 4 x 4 zmm accumulators, AVX2 4 x 2 ymm, the base ISA 2 x 2 xmm
ROW_OPS(base_isa, , vf4, 2, 2)
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_VARIANTS 1
ROW_OPS(avx2_isa, __attribute__((target("avx2,fma"))), vf8, 4, 2)
ROW_OPS(avx512_isa, __attribute__((target("avx512f,avx2,fma,prefer-vector-width=512"))), vf16, 4, 4)
#endif

// the variants this CPU can run, best first
std::vector<std::pair<std::string, const RowOps*>> runnable_variants() {
  std::vector<std::pair<std::string, const RowOps*>> v;
#ifdef HAVE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) v.emplace_back("avx512", &avx512_isa::ops);
  if (avx2) v.emplace_back("avx2", &avx2_isa::ops);
#endif
  v.emplace_back("base", &base_isa::ops);
  return v;
}

std::atomic<const RowOps*> chosen_ops{nullptr};

// the variant in use: the CPU's best, unless variants() chose another
const RowOps& row_ops() {
  const RowOps* ops = chosen_ops.load(std::memory_order_relaxed);
  if (!ops) {
    ops = runnable_variants().front().second;
    chosen_ops.store(ops);
  }
  return *ops;
}

// ---- products -------------------------------------------------------------------------------------

// C (M x N) = A (M x K) @ B (K x N), row-major with leading dimensions lda, ldb, ldc
void mm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += MB)
    cb::brgemm(std::min(MB, M - m0), N, K, lda, ldb, ldc, false, A + m0 * lda, B, C + m0 * ldc, false);
}

// G (P x Q) = A^T B for A (n x P) and B (n x Q) row-major: by the variant's at_b where the shape
// fits its tiles, else by brgemm on A^T copied in blocks of KB rows
void weight_grad(int64_t n, int64_t P, int64_t Q, const float* A, const float* B, float* G,
                 std::vector<float>& at, std::vector<float>& bt) {
  const RowOps& ops = row_ops();
  if (P % ops.at_b_rows == 0 && Q % ops.at_b_cols == 0) {
    ops.at_b(n, P, Q, A, B, G);
    return;
  }
  if (n == 0) {
    std::memset(G, 0, sizeof(float) * P * Q);
    return;
  }
  at.assign(P * KB, 0.f);
  for (int64_t k0 = 0; k0 < n; k0 += KB) {
    const int64_t kc = std::min(KB, n - k0);
    for (int64_t i = 0; i < kc; i++)
      for (int64_t p = 0; p < P; p++) at[p * KB + i] = A[(k0 + i) * P + p];
    const float* b = B + k0 * Q;
    if (kc < KB) {  // the last block: zero rows after the real ones, in both operands
      for (int64_t p = 0; p < P; p++) std::memset(at.data() + p * KB + kc, 0, sizeof(float) * (KB - kc));
      bt.assign(KB * Q, 0.f);
      std::memcpy(bt.data(), b, sizeof(float) * kc * Q);
      b = bt.data();
    }
    cb::brgemm(P, Q, KB, KB, Q, Q, k0 > 0, at.data(), b, G, false);
  }
}

// f(e) for every expert e in [0, E), shared out over torch's threads by a counter
template <typename F>
void each_expert(int64_t E, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // NOTE: grad and inference mode are per thread, and OpenMP's workers do not inherit the
    // caller's: without these, an in-place op on an inference tensor fails in a worker
    c10::InferenceMode inference_mode(inference);
    at::NoGradGuard no_grad;
    for (int64_t e; (e = next.fetch_add(1)) < E;) f(e);
    cb::brgemm_release(false);
  });
}

// out (T, d): out[t] = the sum of w[i] rows[i] (w null: rows[i]) over the i with token[i] = t, in
// increasing i, from 0 (index_add's order), parallel over the tokens
Tensor combine(const Tensor& rows, const float* w, const Tensor& token_s, int64_t T) {
  const int64_t A = token_s.size(0), d = rows.size(1);
  const int64_t* tok = token_s.data_ptr<int64_t>();
  std::vector<int64_t> first(T + 1, 0), order(A);
  for (int64_t i = 0; i < A; i++) first[tok[i] + 1]++;  // tokens checked in range by check_inputs
  for (int64_t t = 0; t < T; t++) first[t + 1] += first[t];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < A; i++) order[fill[tok[i]]++] = i;  // each token's rows, in increasing i
  Tensor out = at::empty({T, d}, rows.options());
  const float* r = rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const RowOps& ops = row_ops();
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    ops.combine(t0, t1, d, first.data(), order.data(), r, w, o);
  });
  return out;
}

std::vector<int64_t> starts(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> s(sizes.size() + 1, 0);
  for (size_t e = 0; e < sizes.size(); e++) s[e + 1] = s[e] + sizes[e];
  return s;
}

// a view of n rows of w floats at p, for ATen's GELU
Tensor rows_view(float* p, int64_t n, int64_t w) { return at::from_blob(p, {n, w}, at::TensorOptions().dtype(at::kFloat)); }

// a (n x H) = activation(h) for one expert's n rows of h; SwiGLU also sigmoid(gate) into sig (n x H)
// where sig is not null. GELU is ATen's, on this thread (inside the parallel region ATen does not
// split it).
void activate_rows(int64_t n, int64_t H, const float* h, float* a, float* sig, int64_t act) {
  if (n == 0) return;
  const RowOps& ops = row_ops();
  if (act == SWIGLU) {
    ops.swiglu(n, H, h, a, sig);
  } else if (act == RELU) {
    ops.relu(n * H, h, a);
  } else {
    Tensor out = rows_view(a, n, H);
    at::gelu_out(out, rows_view(const_cast<float*>(h), n, H));
  }
}

// dh (n x W) = dL/dh from da = dL/d act (n x H), for one expert's rows; SwiGLU reads sig
void activate_backward_rows(int64_t n, int64_t H, const float* h, const float* sig, const float* da, float* dh,
                            int64_t act) {
  if (n == 0) return;
  const RowOps& ops = row_ops();
  if (act == SWIGLU) {
    ops.swiglu_backward(n, H, h, sig, da, dh);
  } else if (act == RELU) {
    ops.relu_backward(n * H, h, da, dh);
  } else {
    Tensor out = rows_view(dh, n, H);
    at::gelu_backward_out(out, rows_view(const_cast<float*>(da), n, H), rows_view(const_cast<float*>(h), n, H));
  }
}

// this thread's scratch of at least n floats (kept between calls: OpenMP's threads live on)
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// the shapes, dtypes and layouts both directions rely on, and every row's token in [0, T)
void check_inputs(int64_t T, int64_t d, const Tensor& token_s, const Tensor& weight_s, const Tensor& w_in,
                  const Tensor& w_down, const std::vector<int64_t>& sizes, int64_t act) {
  TORCH_CHECK(act == SWIGLU || act == RELU || act == GELU, "act must be 0 (SwiGLU), 1 (ReLU) or 2 (GELU)");
  TORCH_CHECK(w_in.dim() == 3 && w_down.dim() == 3 && w_in.scalar_type() == at::kFloat &&
              w_down.scalar_type() == at::kFloat && w_in.is_contiguous() && w_down.is_contiguous(),
              "w_in (E, d, W) and w_down (E, H, d): contiguous float32");
  const int64_t E = w_in.size(0), H = w_down.size(1);
  TORCH_CHECK(w_down.size(0) == E && w_in.size(1) == d && w_down.size(2) == d &&
              w_in.size(2) == (act == SWIGLU ? 2 * H : H), "w_in and w_down do not match each other or d");
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == E, "sizes must have one count per expert");
  TORCH_CHECK(token_s.dim() == 1 && token_s.scalar_type() == at::kLong && token_s.is_contiguous() &&
              weight_s.dim() == 1 && weight_s.scalar_type() == at::kFloat && weight_s.is_contiguous() &&
              weight_s.size(0) == token_s.size(0), "token_s (A,) int64 and weight_s (A,) float32, contiguous");
  int64_t A = 0;
  for (int64_t n : sizes) {
    TORCH_CHECK(n >= 0, "sizes must not be negative");
    A += n;
  }
  TORCH_CHECK(A == token_s.size(0), "sizes must add up to the number of assignments");
  const int64_t* tok = token_s.data_ptr<int64_t>();
  for (int64_t i = 0; i < A; i++) TORCH_CHECK(tok[i] >= 0 && tok[i] < T, "token index out of range");
}

}  // namespace

// x (T, d); token_s (A,) int64 and weight_s (A,) sorted by expert; w_in (E, d, W); w_down (E, H, d);
// all float32 and contiguous. -> out (T, d), then what the backward needs besides x: h (A, W) and
// y (A, d) (unscaled). Per expert, in this thread's scratch: the gather of its rows of x, h = the
// gate/up product, the activation, y = the down product; then the combine (the scaling by the
// gate weights in it). Only h and y are kept: the rest is remade in the backward, so a layer's
// forward writes ~12 MB instead of ~24 at the demo's shape, and each expert's work stays in cache.
std::vector<Tensor> forward(Tensor x, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                            std::vector<int64_t> sizes, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (T, d): contiguous float32");
  check_inputs(x.size(0), x.size(1), token_s, weight_s, w_in, w_down, sizes, act);
  const int64_t E = sizes.size(), d = x.size(1), W = w_in.size(2), H = w_down.size(1), A = token_s.size(0);
  const auto start = starts(sizes);
  const auto opt = x.options();
  Tensor h = at::empty({A, W}, opt), y = at::empty({A, d}, opt);
  const float *xp = x.data_ptr<float>(), *win = w_in.data_ptr<float>(), *wd = w_down.data_ptr<float>();
  const int64_t* tok = token_s.data_ptr<int64_t>();
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    float* xs = scratch(n * (d + H));  // this expert's rows of x, then of the activation
    float* a = xs + n * d;
    for (int64_t i = 0; i < n; i++) std::memcpy(xs + i * d, xp + tok[s + i] * d, sizeof(float) * d);
    mm_rows(n, W, d, xs, d, win + e * d * W, W, hp + s * W, W);
    activate_rows(n, H, hp + s * W, a, nullptr, act);
    mm_rows(n, d, H, a, H, wd + e * H * d, d, yp + s * d, d);
  });
  return {combine(y, weight_s.data_ptr<float>(), token_s, x.size(0)), h, y};
}

// g (T, d): dL/d out; x and the forward's h, y. -> dx (T, d), d weight_s (A,), d w_in (E, d, W),
// d w_down (E, H, d). Per expert, in this thread's scratch: dL/dy = weight * g and dL/d weight =
// <g, y>; the activation again (and SwiGLU's sigmoid); d w_down; dL/d act; the activation's
// backward; the rows of x again; d w_in and the rows of dL/dx. Then the combine.
std::vector<Tensor> backward(Tensor g, Tensor x, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                             std::vector<int64_t> sizes, int64_t act, Tensor h, Tensor y) {
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == at::kFloat && g.is_contiguous(), "g (T, d): contiguous float32");
  TORCH_CHECK(x.sizes() == g.sizes() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x (T, d): contiguous float32, g's shape");
  check_inputs(g.size(0), g.size(1), token_s, weight_s, w_in, w_down, sizes, act);
  const int64_t E = sizes.size(), d = g.size(1), W = w_in.size(2), H = w_down.size(1), A = token_s.size(0);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == A && h.size(1) == W && y.dim() == 2 && y.size(0) == A && y.size(1) == d &&
              h.is_contiguous() && y.is_contiguous(), "the saved tensors are not this call's");
  const auto start = starts(sizes);
  const auto opt = g.options();
  Tensor dw = at::empty({A}, opt), dwin = at::empty_like(w_in), dwd = at::empty_like(w_down), dxs = at::empty({A, d}, opt);
  Tensor wd_t = w_down.transpose(1, 2).contiguous(), win_t = w_in.transpose(1, 2).contiguous();  // (E, d, H), (E, W, d)
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wdt = wd_t.data_ptr<float>(),
              *wint = win_t.data_ptr<float>(), *wt = weight_s.data_ptr<float>(), *hp = h.data_ptr<float>(),
              *yp = y.data_ptr<float>();
  const int64_t* tok = token_s.data_ptr<int64_t>();
  float *dwp = dw.data_ptr<float>(), *dwinp = dwin.data_ptr<float>(), *dwdp = dwd.data_ptr<float>(),
        *dxp = dxs.data_ptr<float>();
  const RowOps& ops = row_ops();
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    std::vector<float> at_buf, bt_buf;
    float* gb = scratch(n * (d + 2 * H + W));  // dL/dy, then the rows of x
    float* a = gb + n * d;                       // the activation, then dL/d act
    float* sig = a + n * H;                      // SwiGLU: sigmoid(gate)
    float* dh = sig + n * H;                     // dL/dh
    const float* he = hp + s * W;
    ops.grad_rows(n, d, tok + s, gp, yp + s * d, wt + s, gb, dwp + s);     // dL/dy, dL/d weight = <g, y>
    activate_rows(n, H, he, a, act == SWIGLU ? sig : nullptr, act);
    weight_grad(n, H, d, a, gb, dwdp + e * H * d, at_buf, bt_buf);        // act^T dL/dy
    mm_rows(n, H, d, gb, d, wdt + e * d * H, H, a, H);                     // dL/d act = dL/dy w_down[e]^T
    activate_backward_rows(n, H, he, sig, a, dh, act);
    float* xs = gb;
    for (int64_t i = 0; i < n; i++) std::memcpy(xs + i * d, xp + tok[s + i] * d, sizeof(float) * d);
    weight_grad(n, d, W, xs, dh, dwinp + e * d * W, at_buf, bt_buf);      // x^T dL/dh
    mm_rows(n, d, W, dh, W, wint + e * W * d, d, dxp + s * d, d);          // dL/dh w_in[e]^T
  });
  return {combine(dxs, nullptr, token_s, g.size(0)), dw, dwin, dwd};
}

// The element-wise variants this CPU runs, best first; with a name, use that one from now on (for
// tests: each variant against the reference on one machine; not while a forward or backward runs,
// which would mix variants). "" = the best.
std::vector<std::string> variants(std::string use) {
  std::vector<std::string> names;
  const RowOps* pick = nullptr;
  for (const auto& [name, ops] : runnable_variants()) {
    names.push_back(name);
    if (name == use || (use.empty() && !pick)) pick = ops;
  }
  TORCH_CHECK(pick, "no element-wise variant named ", use, " runs on this CPU");
  chosen_ops.store(pick);
  return names;
}

// router_cpu.cpp
std::tuple<Tensor, bool> topk_unique(Tensor scores, int64_t k);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, bool> softmax_topk_forward(Tensor logits, Tensor probs, int64_t k,
                                                                             bool renorm);
Tensor softmax_topk_backward(Tensor probs, Tensor idx, Tensor top_p, Tensor weight, bool renorm,
                             std::optional<Tensor> dweight_, std::optional<Tensor> dprobs_,
                             std::optional<Tensor> dlse_);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_unique", &topk_unique, "the router's top-k where no row ties (router_cpu.cpp)");
  m.def("softmax_topk_forward", &softmax_topk_forward, "softmax top-k routing after the softmax (router_cpu.cpp)");
  m.def("softmax_topk_backward", &softmax_topk_backward, "its backward (router_cpu.cpp)");
  m.def("variants", &variants, "the element-wise variants this CPU runs, best first; use one (tests)");
  m.def("forward", &forward, "the experts' forward (see the file's head)");
  m.def("backward", &backward, "the experts' backward");
}
