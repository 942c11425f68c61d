// The "cpu_kernel" dispatch path (moe_lm/model/cpu_kernel.py): the fused path's expert work for
// float32 on a CPU, one C++ call per direction and layer.
//
// Rows arrive sorted by expert (sizes[e] each). The experts are shared out over torch's threads by
// a counter: a thread takes the next expert and runs its part of the work alone (its gather and
// gate/up product; later its down product and scaling; the backward likewise), so a direction is
// four fork-joins (two expert phases, the activation, the combine), not one per small operation
// per expert, and a thread that another program holds back just does fewer experts. Between the
// two expert phases the activation (or its backward) runs in ATen's vectorised kernels over fixed
// blocks of rows. The products go to oneDNN's
// brgemm micro-kernels (at::native::cpublas::brgemm: the AVX-512 or AVX2 kernels this CPU has) in
// blocks of MB rows, so whatever the routing, a layer uses a handful of kernel shapes (each new
// shape is a ~40 us just-in-time build). Weight gradients sum KB rows per call, the rows of A^T
// turned into a (P x KB) buffer (zero-padded in the last block) for the same reason. The combine
// sums each token's rows in their expert-sorted order (index_add's arithmetic, parallel over the
// tokens): the result does not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

using at::Tensor;
namespace cb = at::native::cpublas;

namespace {

constexpr int64_t MB = 32;  // rows per product call
constexpr int64_t KB = 64;  // rows summed per weight-gradient call

enum Act : int64_t { SWIGLU = 0, RELU = 1, GELU = 2 };

// C (M x N) = A (M x K) @ B (K x N), row-major with leading dimensions lda, ldb, ldc
void mm_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += MB)
    cb::brgemm(std::min(MB, M - m0), N, K, lda, ldb, ldc, false, A + m0 * lda, B, C + m0 * ldc, false);
}

// G (P x Q) = A^T B for A (n x P) and B (n x Q) row-major
void weight_grad(int64_t n, int64_t P, int64_t Q, const float* A, const float* B, float* G,
                 std::vector<float>& at, std::vector<float>& bt) {
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

// out (T, d): out[t] = the sum of rows[i] over the i with token[i] = t, in increasing i, from 0:
// index_add's arithmetic (the same bits), parallel over the tokens instead of serial over the rows
Tensor combine(const Tensor& rows, const Tensor& token_s, int64_t T) {
  const int64_t A = token_s.size(0), d = rows.size(1);
  const int64_t* tok = token_s.data_ptr<int64_t>();
  std::vector<int64_t> first(T + 1, 0), order(A);
  for (int64_t i = 0; i < A; i++) {
    TORCH_CHECK(tok[i] >= 0 && tok[i] < T, "token index out of range");
    first[tok[i] + 1]++;
  }
  for (int64_t t = 0; t < T; t++) first[t + 1] += first[t];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < A; i++) order[fill[tok[i]]++] = i;  // each token's rows, in increasing i
  Tensor out = at::empty({T, d}, rows.options());
  const float* r = rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      float* ot = o + t * d;
      for (int64_t j = 0; j < d; j++) ot[j] = 0.f;
      for (int64_t q = first[t]; q < first[t + 1]; q++) {
        const float* ri = r + order[q] * d;
        for (int64_t j = 0; j < d; j++) ot[j] += ri[j];
      }
    }
  });
  return out;
}

std::vector<int64_t> starts(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> s(sizes.size() + 1, 0);
  for (size_t e = 0; e < sizes.size(); e++) s[e + 1] = s[e] + sizes[e];
  return s;
}


constexpr int64_t RB = 1024;  // rows per block of the activation

// f(first row, rows) for fixed blocks of RB rows, shared out over the threads. ATen's elementwise
// kernels run single-threaded inside (a parallel region), each on whole rows starting at the same
// place whatever the thread count: left to split one call over the threads, ATen cut rows at
// places that depend on the thread count, and the elements there took its scalar tail instead of
// its vector loop (other bits).
template <typename F>
void each_row_block(int64_t A, const F& f) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, (A + RB - 1) / RB, 1, [&](int64_t b0, int64_t b1) {
    c10::InferenceMode inference_mode(inference);
    at::NoGradGuard no_grad;
    for (int64_t b = b0; b < b1; b++) f(b * RB, std::min(RB, A - b * RB));
  });
}

// act = activation(h); SwiGLU also keeps silu(gate) in sg for the backward
void activate(const Tensor& h, const Tensor& a, const Tensor& sg, int64_t act, int64_t H) {
  each_row_block(h.size(0), [&](int64_t r, int64_t n) {
    Tensor hb = h.narrow(0, r, n), ab = a.narrow(0, r, n);
    if (act == SWIGLU) {
      Tensor sgb = sg.narrow(0, r, n);
      at::silu_out(sgb, hb.narrow(1, 0, H));
      at::mul_out(ab, sgb, hb.narrow(1, H, H));
    } else if (act == RELU) {
      at::clamp_min_out(ab, hb, 0);
    } else {
      at::gelu_out(ab, hb);
    }
  });
}

// dh = dL/dh from da = dL/d act (da is overwritten)
void activate_backward(const Tensor& h, const Tensor& sg, const Tensor& da, const Tensor& dh, int64_t act,
                       int64_t H) {
  each_row_block(h.size(0), [&](int64_t r, int64_t n) {
    Tensor hb = h.narrow(0, r, n), dab = da.narrow(0, r, n), dhb = dh.narrow(0, r, n);
    if (act == SWIGLU) {
      Tensor gate = hb.narrow(1, 0, H), up = hb.narrow(1, H, H);
      Tensor d_up = dhb.narrow(1, H, H), d_gate = dhb.narrow(1, 0, H);
      at::mul_out(d_up, dab, sg.narrow(0, r, n));
      at::silu_backward_out(d_gate, dab.mul_(up), gate);
    } else if (act == RELU) {
      at::threshold_backward_out(dhb, dab, hb, 0);
    } else {
      at::gelu_backward_out(dhb, dab, hb);
    }
  });
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
// all float32 and contiguous. -> out (T, d), then what the backward needs: x's rows (A, d),
// h (A, W), act (A, H), y (A, d) (unscaled), silu(gate) (A, H) (SwiGLU; else empty).
// Per expert: gather and gate/up product; the activation over all rows; per expert: the down
// product and the scaling; the combine.
std::vector<Tensor> forward(Tensor x, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                            std::vector<int64_t> sizes, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (T, d): contiguous float32");
  check_inputs(x.size(0), x.size(1), token_s, weight_s, w_in, w_down, sizes, act);
  const int64_t E = sizes.size(), d = x.size(1), W = w_in.size(2), H = w_down.size(1), A = token_s.size(0);
  const auto start = starts(sizes);
  const auto opt = x.options();
  Tensor xs = at::empty({A, d}, opt), h = at::empty({A, W}, opt), a = at::empty({A, H}, opt),
         y = at::empty({A, d}, opt), scaled = at::empty({A, d}, opt),
         sg = at::empty({act == SWIGLU ? A : 0, H}, opt);
  const float *xp = x.data_ptr<float>(), *win = w_in.data_ptr<float>(), *wd = w_down.data_ptr<float>(),
              *wt = weight_s.data_ptr<float>();
  const int64_t* tok = token_s.data_ptr<int64_t>();
  float *xsp = xs.data_ptr<float>(), *hp = h.data_ptr<float>(), *ap = a.data_ptr<float>(),
        *yp = y.data_ptr<float>(), *sp = scaled.data_ptr<float>();
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    for (int64_t i = s; i < s + n; i++) std::memcpy(xsp + i * d, xp + tok[i] * d, sizeof(float) * d);
    mm_rows(n, W, d, xsp + s * d, d, win + e * d * W, W, hp + s * W, W);
  });
  activate(h, a, sg, act, H);
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    mm_rows(n, d, H, ap + s * H, H, wd + e * H * d, d, yp + s * d, d);
    for (int64_t i = s; i < s + n; i++)
      for (int64_t j = 0; j < d; j++) sp[i * d + j] = yp[i * d + j] * wt[i];
  });
  return {combine(scaled, token_s, x.size(0)), xs, h, a, y, sg};
}

// g (T, d): dL/d out. -> dx (T, d), d weight_s (A,), d w_in (E, d, W), d w_down (E, H, d)
// Per expert: dL/d weight, dL/dy, d w_down and dL/d act; the activation's backward over all rows;
// per expert: d w_in and the rows of dL/dx; the combine.
std::vector<Tensor> backward(Tensor g, Tensor token_s, Tensor weight_s, Tensor w_in, Tensor w_down,
                             std::vector<int64_t> sizes, int64_t act, Tensor xs, Tensor h, Tensor a, Tensor y,
                             Tensor sg) {
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == at::kFloat && g.is_contiguous(), "g (T, d): contiguous float32");
  check_inputs(g.size(0), g.size(1), token_s, weight_s, w_in, w_down, sizes, act);
  const int64_t E = sizes.size(), d = g.size(1), W = w_in.size(2), H = w_down.size(1), A = token_s.size(0);
  TORCH_CHECK(xs.size(0) == A && h.size(0) == A && a.size(0) == A && y.size(0) == A &&
              sg.size(0) == (act == SWIGLU ? A : 0), "the saved tensors are not this call's");
  const auto start = starts(sizes);
  const auto opt = g.options();
  Tensor dw = at::empty({A}, opt), dwin = at::empty_like(w_in), dwd = at::empty_like(w_down),
         dxs = at::empty({A, d}, opt), gbs = at::empty({A, d}, opt), das = at::empty({A, H}, opt),
         dhs = at::empty({A, W}, opt);
  Tensor wd_t = w_down.transpose(1, 2).contiguous(), win_t = w_in.transpose(1, 2).contiguous();  // (E, d, H), (E, W, d)
  const float *gp = g.data_ptr<float>(), *wdt = wd_t.data_ptr<float>(), *wint = win_t.data_ptr<float>(),
              *wt = weight_s.data_ptr<float>(), *xsp = xs.data_ptr<float>(), *ap = a.data_ptr<float>(),
              *yp = y.data_ptr<float>();
  const int64_t* tok = token_s.data_ptr<int64_t>();
  float *dwp = dw.data_ptr<float>(), *dwinp = dwin.data_ptr<float>(), *dwdp = dwd.data_ptr<float>(),
        *dxp = dxs.data_ptr<float>(), *gbp = gbs.data_ptr<float>(), *dap = das.data_ptr<float>(),
        *dhp = dhs.data_ptr<float>();
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    std::vector<float> at_buf, bt_buf;
    float* gb = gbp + s * d;  // this expert's rows of g; then dL/dy = weight * g
    for (int64_t i = 0; i < n; i++) {
      const float *gi = gp + tok[s + i] * d, *yi = yp + (s + i) * d;
      float dot = 0.f;
      for (int64_t j = 0; j < d; j++) {
        dot += gi[j] * yi[j];
        gb[i * d + j] = gi[j] * wt[s + i];
      }
      dwp[s + i] = dot;  // dL/d weight = <g, y>
    }
    weight_grad(n, H, d, ap + s * H, gb, dwdp + e * H * d, at_buf, bt_buf);  // act^T dL/dy
    mm_rows(n, H, d, gb, d, wdt + e * d * H, H, dap + s * H, H);          // dL/d act = dL/dy w_down[e]^T
  });
  activate_backward(h, sg, das, dhs, act, H);
  each_expert(E, [&](int64_t e) {
    const int64_t s = start[e], n = sizes[e];
    std::vector<float> at_buf, bt_buf;
    weight_grad(n, d, W, xsp + s * d, dhp + s * W, dwinp + e * d * W, at_buf, bt_buf);  // x^T dL/dh
    mm_rows(n, d, W, dhp + s * W, W, wint + e * W * d, d, dxp + s * d, d);           // dL/dh w_in[e]^T
  });
  return {combine(dxs, token_s, g.size(0)), dw, dwin, dwd};
}

std::tuple<Tensor, bool> topk_unique(Tensor scores, int64_t k);  // router_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_unique", &topk_unique, "the router's top-k where no row ties (router_cpu.cpp)");
  m.def("forward", &forward, "the experts' forward (see the file's head)");
  m.def("backward", &backward, "the experts' backward");
}
