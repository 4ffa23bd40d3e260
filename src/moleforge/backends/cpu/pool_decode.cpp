// A routed LoRA pool's decode step for a few tokens, without autograd: the router, the gate and
// the selected experts' low-rank products of each token in one call. The graph's dense form
// reads every expert's factors (E·r rows of A and columns of B) and runs about ten small torch
// ops per site; here a token reads the router and its k experts' factors only.
//
// pool_decode: for token t with input x (d_in),
//
//   z = W_r x,   p = softmax(z / temperature),
//   softmax top-k: the k largest p (ties to the lower expert index), renormalised to sum 1 when
//   asked (g_e = p_e / Σ_kept p); dense: every expert, g_e = p_e;
//   y = acc + Σ_{kept e} scale · g_e · B_e (A_e x)
//
// with A (E_a, r, d_in) and B given transposed, Bt = Bᵀ (E_b, r, d_out) (rows of d_out values:
// the up-projection is r contiguous axpys); E_a or E_b = 1 for a factor that all experts share
// (it is applied once: A x before the experts, B after their gated sum). The semantics
// are those of ops.route_softmax_topk / ops.route_dense followed by the pool's mix
// (ir/interpret.py's PoolMix).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

namespace {

enum PoolGate : int64_t { kSoftmaxTopK = 0, kDenseSoftmax = 1 };

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += Mᵀ w, M (rows, cols) row-major: y (cols) gets rows w_i-weighted
template <typename T>
inline void axpys(const T* M, int64_t rows, int64_t cols, const T* w, T* y) {
  for (int64_t i = 0; i < rows; ++i) {
    const T c = w[i];
    const T* row = M + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) y[j] += c * row[j];
  }
}

// The kept experts and their gates of one token's router scores.
template <typename T>
void gate_token(std::vector<T>& z, int64_t gate, int64_t k, bool renormalize, double temperature,
                std::vector<int64_t>& order, std::vector<T>& g) {
  const int64_t E = z.size();
  const T inv_t = T(1.0 / temperature);
  T top = -INFINITY;
  for (int64_t e = 0; e < E; ++e) top = std::max(top, z[e] * inv_t);
  T total = T(0);
  for (int64_t e = 0; e < E; ++e) {
    z[e] = std::exp(z[e] * inv_t - top);
    total += z[e];
  }
  for (int64_t e = 0; e < E; ++e) z[e] /= total;  // probabilities
  order.resize(E);
  std::iota(order.begin(), order.end(), 0);
  if (gate == kDenseSoftmax) {
    g.assign(z.begin(), z.end());
    return;
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  order.resize(k);
  g.resize(k);
  T kept = T(0);
  for (int64_t j = 0; j < k; ++j) kept += z[order[j]];
  for (int64_t j = 0; j < k; ++j) g[j] = renormalize ? z[order[j]] / kept : z[order[j]];
}

template <typename T>
void decode_impl(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt,
                 at::Tensor& y, int64_t gate, int64_t k, bool renormalize, double temperature,
                 double scale) {
  const int64_t n_tok = x.size(0), d_in = x.size(1), E = router_w.size(0), r = A.size(1), d_out = Bt.size(2);
  const bool shared_a = A.size(0) == 1, shared_b = Bt.size(0) == 1;
  const T* xs = x.data_ptr<T>();
  const T* wr = router_w.data_ptr<T>();
  const T* as = A.data_ptr<T>();
  const T* bs = Bt.data_ptr<T>();
  T* ys = y.data_ptr<T>();
  at::parallel_for(0, n_tok, 4, [&](int64_t begin, int64_t end) {
    std::vector<T> z(E), g, za(r), w(r), wsum(r);
    std::vector<int64_t> order;
    for (int64_t t = begin; t < end; ++t) {
      const T* xt = xs + t * d_in;
      T* yt = ys + t * d_out;
      for (int64_t e = 0; e < E; ++e) z[e] = dot(wr + e * d_in, xt, d_in);
      gate_token(z, gate, k, renormalize, temperature, order, g);
      if (shared_a)
        for (int64_t j = 0; j < r; ++j) za[j] = dot(as + j * d_in, xt, d_in);
      std::fill(wsum.begin(), wsum.end(), T(0));
      for (size_t i = 0; i < order.size(); ++i) {
        const int64_t e = order[i];
        const T c = T(scale) * g[i];
        if (c == T(0)) continue;
        if (!shared_a) {
          const T* ae = as + e * r * d_in;
          for (int64_t j = 0; j < r; ++j) za[j] = dot(ae + j * d_in, xt, d_in);
        }
        if (shared_b) {
          for (int64_t j = 0; j < r; ++j) wsum[j] += c * za[j];
        } else {
          for (int64_t j = 0; j < r; ++j) w[j] = c * za[j];
          axpys(bs + e * r * d_out, r, d_out, w.data(), yt);
        }
      }
      if (shared_b) axpys(bs, r, d_out, wsum.data(), yt);
    }
  });
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moleforge_cpu::pool_decode: ", what); }

at::Tensor pool_decode(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt,
                       const std::optional<at::Tensor>& acc_in, int64_t gate, int64_t k, bool renormalize,
                       double temperature, double scale) {
  const at::Tensor acc = acc_in.has_value() ? *acc_in : at::empty({0}, x.options());
  for (const at::Tensor* t : {&x, &router_w, &A, &Bt, &acc})
    check(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), "every tensor must be a CPU tensor of x's dtype");
  check(x.dim() == 2 && router_w.dim() == 2 && A.dim() == 3 && Bt.dim() == 3, "expected x (T, d_in), router_w "
        "(E, d_in), A (E|1, r, d_in), Bt (E|1, r, d_out)");
  const int64_t E = router_w.size(0), d_in = x.size(1), r = A.size(1), d_out = Bt.size(2);
  check(router_w.size(1) == d_in && A.size(2) == d_in && Bt.size(1) == r,
        "the factors' widths do not match x");
  check((A.size(0) == E || A.size(0) == 1) && (Bt.size(0) == E || Bt.size(0) == 1),
        "A and Bt need E or 1 experts");
  check(gate != kSoftmaxTopK || (k >= 1 && k <= E), "k must be between 1 and the number of experts");
  check(gate == kSoftmaxTopK || gate == kDenseSoftmax, "unknown gate code");
  check(temperature > 0, "temperature must be positive");
  check(acc.numel() == 0 || acc.numel() == x.size(0) * d_out, "acc must hold T x d_out values");
  at::Tensor y = acc.numel() > 0 ? acc.reshape({x.size(0), d_out}).clone(at::MemoryFormat::Contiguous)
                                 : at::zeros({x.size(0), d_out}, x.options());
  const at::Tensor xc = x.contiguous(), wc = router_w.contiguous(), ac = A.contiguous(),
                   bbc = Bt.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_decode", [&] {
    decode_impl<scalar_t>(xc, wc, ac, bbc, y, gate, k, renormalize, temperature, scale);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moleforge_cpu, m) {
  m.def(
      "pool_decode(Tensor x, Tensor router_w, Tensor A, Tensor Bt, Tensor? acc, int gate, int k, "
      "bool renormalize, float temperature, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(moleforge_cpu, CPU, m) { m.impl("pool_decode", &pool_decode); }
