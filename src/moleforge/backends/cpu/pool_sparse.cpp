// A routed LoRA pool's training step over its (token, slot) pairs, forward and backward: each
// pair runs its own expert's factors only, with no gathered copy of the token rows and no
// scatter of per-pair results. The dense form computes all E experts (E·r wide GEMMs) and gates
// afterwards; a top-k router with k ≪ E selects k·r of those E·r values per token.
//
// Pairs are token-major: pair q = t·k + j is token t's slot j, with expert index[t, j] and
// weight w[t, j] (the gate times the pool's scale). With A (E, r, d_in) and B given transposed,
// Bt = Bᵀ (E, r, d_out):
//
//   forward   h_q = A_e x_t                          (r values per pair)
//             y_t (+)= Σ_j w_q Bt_eᵀ h_q            (added in place to the frozen output when asked)
//   backward  u_q = Bt_e gy_t,   dw_q = u_q · h_q,   dh_q = w_q u_q
//             dx_t = Σ_j A_eᵀ dh_q
//             dA_e = Σ_{q of e} dh_q x_tᵀ,   dBt_e = Σ_{q of e} (w_q h_q) gy_tᵀ
//
// Three loops do all of it:
//   rows_dot      out_q = W_e v_t        for every pair (pairs sorted by expert, so that an
//                                        expert's rows stay in cache across its tokens)
//   rows_combine  out_t = acc_t + Σ_j W_eᵀ c_q   per block of columns, token by token
//   outer_sum     G_e = Σ_{q of e} c_q v_tᵀ      per expert and column block, in registers
// The semantics are ops.grouped_mix's (ir/interpret.py's PoolMix under a top-k routing).
// routed_pool (below) also computes the router and its softmax top-k gate, and their backward.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

template <typename T>
struct Vec {
  static constexpr int L = 32 / sizeof(T);  // lanes of a 256-bit vector
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using vec = typename Vec<T>::type;

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline T lanes_sum(vec<T> v) {
  T s = T(0);
  for (int i = 0; i < Vec<T>::L; ++i) s += v[i];
  return s;
}

// The pairs sorted by expert (stable: ascending token within an expert).
struct Pairs {
  std::vector<int64_t> order;   // sorted position -> pair q
  std::vector<int64_t> expert;  // sorted position -> its expert
  std::vector<int64_t> start;   // expert e's pairs: sorted positions start[e] .. start[e + 1] - 1
};

Pairs sort_pairs(const at::Tensor& index, int64_t E) {
  const int64_t P = index.numel();
  const int64_t* idx = index.data_ptr<int64_t>();
  Pairs p;
  p.start.assign(E + 1, 0);
  for (int64_t q = 0; q < P; ++q) {
    TORCH_CHECK(idx[q] >= 0 && idx[q] < E, "moleforge_cpu::pool_sparse: expert index ", idx[q],
                " out of range for ", E, " experts");
    ++p.start[idx[q] + 1];
  }
  for (int64_t e = 0; e < E; ++e) p.start[e + 1] += p.start[e];
  std::vector<int64_t> next(p.start.begin(), p.start.end() - 1);
  p.order.resize(P);
  p.expert.resize(P);
  for (int64_t q = 0; q < P; ++q) {
    const int64_t i = next[idx[q]]++;
    p.order[i] = q;
    p.expert[i] = idx[q];
  }
  return p;
}

// acc[i] += Σ_c w[i·n + c] v[c] over columns c0 .. c1 - 1, for RB rows of w.
template <typename T, int RB>
inline void dot_block(const T* v, const T* w, int64_t n, int64_t c0, int64_t c1, T* acc) {
  constexpr int L = Vec<T>::L;
  vec<T> a[RB];
  for (int i = 0; i < RB; ++i) a[i] = vec<T>{};
  int64_t c = c0;
  for (; c + L <= c1; c += L) {
    const vec<T> vv = load<T>(v + c);
    for (int i = 0; i < RB; ++i) a[i] += load<T>(w + i * n + c) * vv;
  }
  for (int i = 0; i < RB; ++i) {
    T s = lanes_sum<T>(a[i]);
    for (int64_t cc = c; cc < c1; ++cc) s += w[i * n + cc] * v[cc];
    acc[i] += s;
  }
}

template <typename T>
inline void dot_rows_range(const T* v, const T* w, int64_t r, int64_t n, int64_t c0, int64_t c1, T* acc) {
  int64_t i = 0;
  for (; i + 8 <= r; i += 8) dot_block<T, 8>(v, w + i * n, n, c0, c1, acc + i);
  if (i + 4 <= r) {
    dot_block<T, 4>(v, w + i * n, n, c0, c1, acc + i);
    i += 4;
  }
  if (i + 2 <= r) {
    dot_block<T, 2>(v, w + i * n, n, c0, c1, acc + i);
    i += 2;
  }
  if (i < r) dot_block<T, 1>(v, w + i * n, n, c0, c1, acc + i);
}

// out (P, r): out_q = W_e V_t, W (E, r, n), V (T, n). The columns go in blocks whose r rows of
// W fit the L1 cache, each block over every pair of the thread's range.
template <typename T>
void rows_dot(const T* V, const T* W, const Pairs& p, int64_t k, int64_t r, int64_t n, T* out) {
  const int64_t P = p.order.size();
  const int64_t block = std::max<int64_t>(64, (16384 / int64_t(sizeof(T))) / r / 64 * 64);
  at::parallel_for(0, P, 32, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::fill(out + p.order[i] * r, out + (p.order[i] + 1) * r, T(0));
    for (int64_t c0 = 0; c0 < n; c0 += block) {
      const int64_t c1 = std::min(n, c0 + block);
      for (int64_t i = b; i < e; ++i) {
        const int64_t q = p.order[i];
        dot_rows_range(V + (q / k) * n, W + p.expert[i] * r * n, r, n, c0, c1, out + q * r);
      }
    }
  });
}

// out (T, n): out_t = acc_t (or 0) + Σ_j Σ_i C[q, i] W[e_q, i, :] (+ Σ_e D[t, e] V[e, :] with a dense
// term D (T, m), V (m, n): the router's part of dx). One job per block of U vectors of columns,
// every token through it: the block of every expert's rows of W stays in the L1 cache, each
// output row segment is written once, and no two jobs write the same values.
template <typename T>
void rows_combine(const T* C, const T* W, const int64_t* index, const T* acc, int64_t tokens, int64_t k, int64_t r,
                  int64_t n, T* out, const T* D = nullptr, const T* V = nullptr, int64_t m = 0) {
  constexpr int L = Vec<T>::L, U = 8;
  constexpr int64_t CB = L * U;
  const int64_t blocks = n / CB;
  at::parallel_for(0, blocks + 1, 1, [&](int64_t b, int64_t e_) {
    for (int64_t blk = b; blk < e_; ++blk) {
      const int64_t c0 = blk * CB;
      if (blk == blocks) {  // the columns past the last whole block
        for (int64_t t = 0; t < tokens; ++t)
          for (int64_t cc = c0; cc < n; ++cc) {
            T s = acc == nullptr ? T(0) : acc[t * n + cc];
            for (int64_t j = 0; j < k; ++j) {
              const int64_t q = t * k + j;
              const T* w = W + index[q] * r * n + cc;
              for (int64_t i = 0; i < r; ++i) s += C[q * r + i] * w[i * n];
            }
            for (int64_t i = 0; i < m; ++i) s += D[t * m + i] * V[i * n + cc];
            out[t * n + cc] = s;
          }
        continue;
      }
      for (int64_t t = 0; t < tokens; ++t) {
        T* o = out + t * n + c0;
        vec<T> v[U];
        for (int u = 0; u < U; ++u) v[u] = acc == nullptr ? vec<T>{} : load<T>(acc + t * n + c0 + u * L);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t q = t * k + j;
          const T* w = W + index[q] * r * n + c0;
          const T* c = C + q * r;
          for (int64_t i = 0; i < r; ++i) {
            const T ci = c[i];
            const T* wi = w + i * n;
            for (int u = 0; u < U; ++u) v[u] += ci * load<T>(wi + u * L);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          const T di = D[t * m + i];
          const T* vi = V + i * n + c0;
          for (int u = 0; u < U; ++u) v[u] += di * load<T>(vi + u * L);
        }
        for (int u = 0; u < U; ++u) store<T>(o + u * L, v[u]);
      }
    }
  });
}

// G[e, i0 .. i0 + RB, c .. c + VB·L] = Σ_{q of e} C[q, i] V[t_q, c .. c + VB·L]: RB·VB accumulators
template <typename T, int RB, int VB>
inline void outer_block(const T* C, const T* V, const Pairs& p, int64_t e, int64_t i0, int64_t k, int64_t r,
                        int64_t n, int64_t c, T* G) {
  constexpr int L = Vec<T>::L;
  vec<T> a[RB][VB];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < VB; ++v) a[i][v] = vec<T>{};
  for (int64_t s = p.start[e]; s < p.start[e + 1]; ++s) {
    const int64_t q = p.order[s];
    const T* row = V + (q / k) * n + c;
    vec<T> vv[VB];
    for (int v = 0; v < VB; ++v) vv[v] = load<T>(row + v * L);
    const T* cq = C + q * r + i0;
    for (int i = 0; i < RB; ++i) {
      const T ci = cq[i];
      for (int v = 0; v < VB; ++v) a[i][v] += ci * vv[v];
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < VB; ++v) store<T>(G + (e * r + i0 + i) * n + c + v * L, a[i][v]);
}

template <typename T, int VB>
inline void outer_rows(const T* C, const T* V, const Pairs& p, int64_t e, int64_t k, int64_t r, int64_t n, int64_t c,
                       T* G) {
  int64_t i = 0;
  for (; i + 4 <= r; i += 4) outer_block<T, 4, VB>(C, V, p, e, i, k, r, n, c, G);
  if (i + 2 <= r) {
    outer_block<T, 2, VB>(C, V, p, e, i, k, r, n, c, G);
    i += 2;
  }
  if (i < r) outer_block<T, 1, VB>(C, V, p, e, i, k, r, n, c, G);
}

// G (E, r, n): G_e = Σ_{q of e} C_q V_tᵀ, one job per (expert, two column vectors: a cache line of
// floats), four rows of G at a time in registers.
template <typename T>
void outer_sum(const T* C, const T* V, const Pairs& p, int64_t E, int64_t k, int64_t r, int64_t n, T* G) {
  constexpr int L = Vec<T>::L;
  const int64_t vectors = n / L, pairs_of = (vectors + 1) / 2, jobs = E * pairs_of;
  at::parallel_for(0, jobs, 4, [&](int64_t b, int64_t e_) {
    for (int64_t job = b; job < e_; ++job) {
      const int64_t e = job / pairs_of, v = (job % pairs_of) * 2;
      if (v + 2 <= vectors)
        outer_rows<T, 2>(C, V, p, e, k, r, n, v * L, G);
      else
        outer_rows<T, 1>(C, V, p, e, k, r, n, v * L, G);
    }
  });
  if (vectors * L == n) return;
  for (int64_t e = 0; e < E; ++e)  // the columns past the last whole vector
    for (int64_t i = 0; i < r; ++i)
      for (int64_t c = vectors * L; c < n; ++c) {
        T s = T(0);
        for (int64_t j = p.start[e]; j < p.start[e + 1]; ++j) {
          const int64_t q = p.order[j];
          s += C[q * r + i] * V[(q / k) * n + c];
        }
        G[(e * r + i) * n + c] = s;
      }
}

// out[q, i] = w[q] · v[q, i] over the P pairs' r values (the gate applied to a pair's values).
template <typename S>
at::Tensor gated(const at::Tensor& v, const at::Tensor& w) {
  at::Tensor out = at::empty_like(v);
  const int64_t P = w.numel(), r = v.numel() / std::max<int64_t>(P, 1);
  const S* vs = v.data_ptr<S>();
  const S* ws = w.data_ptr<S>();
  S* o = out.data_ptr<S>();
  for (int64_t q = 0; q < P; ++q)
    for (int64_t i = 0; i < r; ++i) o[q * r + i] = ws[q] * vs[q * r + i];
  return out;
}

// out[q] = Σ_i u[q, i] h[q, i]: each pair's gate gradient, shaped like w.
template <typename S>
at::Tensor pair_dots(const at::Tensor& u, const at::Tensor& h, const at::Tensor& w) {
  at::Tensor out = at::empty_like(w);
  const int64_t P = w.numel(), r = u.numel() / std::max<int64_t>(P, 1);
  const S* us = u.data_ptr<S>();
  const S* hs = h.data_ptr<S>();
  S* o = out.data_ptr<S>();
  for (int64_t q = 0; q < P; ++q) {
    S s = S(0);
    for (int64_t i = 0; i < r; ++i) s += us[q * r + i] * hs[q * r + i];
    o[q] = s;
  }
  return out;
}

// The factors' gradients asked for: dA_e = Σ_{q of e} dh_q x_tᵀ and dBt_e = Σ_{q of e} (w_q h_q) gy_tᵀ.
template <typename S>
void factor_grads(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& w, const at::Tensor& x,
                  const at::Tensor& gy, const Pairs& p, int64_t E, int64_t k, int64_t r, bool need_a, bool need_b,
                  at::Tensor& da, at::Tensor& dbt) {
  const int64_t d_in = x.size(1), d_out = gy.numel() / x.size(0);
  if (need_a) {
    da = at::empty({E, r, d_in}, x.options());
    outer_sum<S>(dh.data_ptr<S>(), x.data_ptr<S>(), p, E, k, r, d_in, da.data_ptr<S>());
  }
  if (need_b) {
    dbt = at::empty({E, r, d_out}, x.options());
    const at::Tensor wh = gated<S>(h, w);
    outer_sum<S>(wh.data_ptr<S>(), gy.data_ptr<S>(), p, E, k, r, d_out, dbt.data_ptr<S>());
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moleforge_cpu::pool_sparse: ", what); }

void check_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& index,
                const at::Tensor& w) {
  for (const at::Tensor* t : {&x, &A, &Bt, &w})
    check(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
          "x, A, Bt and w must be contiguous CPU tensors of one dtype");
  check(x.dim() == 2 && A.dim() == 3 && Bt.dim() == 3 && index.dim() == 2,
        "expected x (T, d_in), A (E, r, d_in), Bt (E, r, d_out), index (T, k)");
  check(index.scalar_type() == at::kLong && index.is_contiguous() && index.device().is_cpu(),
        "index must be a contiguous CPU int64 tensor");
  check(A.size(0) == Bt.size(0) && A.size(1) == Bt.size(1) && A.size(2) == x.size(1),
        "A and Bt must hold the same experts and rank, A the width of x");
  check(index.size(0) == x.size(0) && w.sizes() == index.sizes(), "index and w must be (T, k) for x's T tokens");
}

void check_out(const at::Tensor& y, const at::Tensor& x, int64_t d_out) {
  check(y.device().is_cpu() && y.scalar_type() == x.scalar_type() && y.is_contiguous() && y.dim() == 2 &&
            y.size(0) == x.size(0) && y.size(1) == d_out,
        "y must be a contiguous (T, d_out) CPU tensor of x's dtype");
}

// y = acc + Σ (acc may be y itself, or undefined: y = Σ); returns h (T, k, r).
at::Tensor pool_sparse_into(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& index,
                            const at::Tensor& w, const at::Tensor& acc, at::Tensor y) {
  check_args(x, A, Bt, index, w);
  const int64_t T = x.size(0), E = A.size(0), r = A.size(1), d_in = x.size(1), d_out = Bt.size(2),
                k = index.size(1);
  check_out(y, x, d_out);
  const Pairs p = sort_pairs(index, E);
  at::Tensor h = at::empty({T, k, r}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_sparse", [&] {
    using S = scalar_t;
    rows_dot<S>(x.data_ptr<S>(), A.data_ptr<S>(), p, k, r, d_in, h.data_ptr<S>());
    const at::Tensor wh = gated<S>(h, w);  // (T, k, r)
    rows_combine<S>(wh.data_ptr<S>(), Bt.data_ptr<S>(), index.data_ptr<int64_t>(),
                    acc.defined() ? acc.data_ptr<S>() : nullptr, T, k, r, d_out, y.data_ptr<S>());
  });
  return h;
}

// The op: y = acc + Σ in a new tensor (the functional form, for torch.compile).
std::tuple<at::Tensor, at::Tensor> pool_sparse(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                                               const at::Tensor& index, const at::Tensor& w,
                                               const std::optional<at::Tensor>& acc) {
  at::Tensor y = at::empty({x.size(0), Bt.size(2)}, x.options());
  if (acc.has_value()) check_out(*acc, x, Bt.size(2));
  at::Tensor h = pool_sparse_into(x, A, Bt, index, w, acc.has_value() ? *acc : at::Tensor(), y);
  return {y, h};
}

// The op adding into y in place.
at::Tensor pool_sparse_(const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& index,
                        const at::Tensor& w, at::Tensor& y) {
  return pool_sparse_into(x, A, Bt, index, w, y, y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_sparse_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& index,
    const at::Tensor& w, const at::Tensor& h, bool need_x, bool need_a, bool need_b, bool need_w) {
  check_args(x, A, Bt, index, w);
  const int64_t T = x.size(0), E = A.size(0), r = A.size(1), d_in = x.size(1), d_out = Bt.size(2),
                k = index.size(1);
  check(gy.is_contiguous() && gy.numel() == T * d_out && gy.scalar_type() == x.scalar_type(),
        "the output's gradient must be a contiguous tensor of T x d_out values");
  check(h.is_contiguous() && h.numel() == T * k * r, "h must be the forward's (T, k, r) values");
  const Pairs p = sort_pairs(index, E);
  at::Tensor u = at::empty({T, k, r}, x.options());
  at::Tensor dx, da, dbt, dw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_sparse_backward", [&] {
    using S = scalar_t;
    rows_dot<S>(gy.data_ptr<S>(), Bt.data_ptr<S>(), p, k, r, d_out, u.data_ptr<S>());
    const at::Tensor dh = gated<S>(u, w);  // (T, k, r)
    if (need_w) dw = pair_dots<S>(u, h, w);
    if (need_x) {
      dx = at::empty({T, d_in}, x.options());
      rows_combine<S>(dh.data_ptr<S>(), A.data_ptr<S>(), index.data_ptr<int64_t>(), nullptr, T, k, r, d_in,
                      dx.data_ptr<S>());
    }
    factor_grads<S>(dh, h, w, x, gy, p, E, k, r, need_a, need_b, da, dbt);
  });
  auto none = at::empty({0}, x.options());
  return {need_x ? dx : none, need_a ? da : none, need_b ? dbt : none, need_w ? dw : none};
}

// ---- the router, its softmax top-k gate and the pool in one op ---------------------------------
//
//   z_t = W_r x_t,   p_t = softmax(z_t / τ),   S_t = the k largest p (ties to the lower index),
//   g_tj = p_{e_j} / Σ_{S_t} p when renormalising, else p_{e_j};   w_tj = scale · g_tj,
//   y_t = acc_t + Σ_j w_tj B_e A_e x_t   (ops.route_softmax_topk, then ops.grouped_mix)
//
// Backward, with the gradients of the probabilities and the dense gates (aux losses) when given:
//   dg_j = scale · (u_q · h_q) + dG[t, e_j];   renormalised: dp_{e_j} += (dg_j − Σ_i dg_i g_i) / Σ_S p,
//   else dp_{e_j} += dg_j;   dz = p ⊙ (dp − Σ dp ⊙ p) / τ;   dx_t += W_rᵀ dz_t;   dW_r = Σ_t dz_t x_tᵀ

// The k largest of p (E values), ties to the lower index, into sel.
template <typename T>
inline void top_k(const T* p, int64_t E, int64_t k, int64_t* sel) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || sel[i] == e;
      if (!taken && (best < 0 || p[e] > p[best])) best = e;
    }
    sel[j] = best;
  }
}

template <typename T>
void route_tokens(const T* z, int64_t tokens, int64_t E, int64_t k, bool renormalize, double temperature,
                  double scale, T* probs, T* gates, int64_t* index, T* w) {
  const T inv_t = T(1.0 / temperature);
  at::parallel_for(0, tokens, 64, [&](int64_t b, int64_t e_) {
    for (int64_t t = b; t < e_; ++t) {
      const T* zt = z + t * E;
      T* p = probs + t * E;
      T top = zt[0] * inv_t;
      for (int64_t e = 1; e < E; ++e) top = std::max(top, zt[e] * inv_t);
      T total = T(0);
      for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(zt[e] * inv_t - top));
      for (int64_t e = 0; e < E; ++e) p[e] /= total;
      int64_t* sel = index + t * k;
      top_k(p, E, k, sel);
      T kept = T(0);
      for (int64_t j = 0; j < k; ++j) kept += p[sel[j]];
      T* g = gates + t * E;
      std::fill(g, g + E, T(0));
      for (int64_t j = 0; j < k; ++j) {
        const T gj = renormalize ? p[sel[j]] / kept : p[sel[j]];
        g[sel[j]] = gj;
        w[t * k + j] = T(scale) * gj;
      }
    }
  });
}

// The trivial pairing of all tokens with one group, for the router's dW_r = Σ_t dz_t x_tᵀ.
Pairs all_tokens(int64_t tokens) {
  Pairs p;
  p.order.resize(tokens);
  for (int64_t t = 0; t < tokens; ++t) p.order[t] = t;
  p.expert.assign(tokens, 0);
  p.start = {0, tokens};
  return p;
}

void check_routed(const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, int64_t k) {
  check(router_w.device().is_cpu() && router_w.scalar_type() == x.scalar_type() && router_w.is_contiguous() &&
            router_w.dim() == 2 && router_w.size(1) == x.size(1),
        "router_w must be a contiguous (E, d_in) CPU tensor of x's dtype");
  check(router_w.size(0) == A.size(0), "the router must score every expert of A and Bt");
  check(k >= 1 && k <= A.size(0), "k must be between 1 and the number of experts");
}

// The router and its gate, then the pool over the selected pairs (pool_sparse_into): y = acc + Σ (acc
// may be y itself, or undefined: y = Σ); returns (probs, gates, index, w, h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_pool_into(
    const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& acc,
    at::Tensor y, int64_t k, bool renormalize, double temperature, double scale) {
  const int64_t T = x.size(0), E = A.size(0), d_in = x.size(1);
  at::Tensor index = at::empty({T, k}, x.options().dtype(at::kLong));
  at::Tensor w = at::empty({T, k}, x.options());
  check_args(x, A, Bt, index, w);
  check_routed(x, router_w, A, k);
  check(temperature > 0, "temperature must be positive");
  at::Tensor z = at::empty({T, E}, x.options()), probs = at::empty({T, E}, x.options()),
             gates = at::empty({T, E}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "routed_pool", [&] {
    using S = scalar_t;
    rows_dot<S>(x.data_ptr<S>(), router_w.data_ptr<S>(), all_tokens(T), 1, E, d_in, z.data_ptr<S>());
    route_tokens<S>(z.data_ptr<S>(), T, E, k, renormalize, temperature, scale, probs.data_ptr<S>(),
                    gates.data_ptr<S>(), index.data_ptr<int64_t>(), w.data_ptr<S>());
  });
  at::Tensor h = pool_sparse_into(x, A, Bt, index, w, acc, y);
  return {probs, gates, index, w, h};
}

// The op: y = acc + Σ in a new tensor (the functional form, for torch.compile).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_pool(
    const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt,
    const std::optional<at::Tensor>& acc, int64_t k, bool renormalize, double temperature, double scale) {
  at::Tensor y = at::empty({x.size(0), Bt.size(2)}, x.options());
  if (acc.has_value()) check_out(*acc, x, Bt.size(2));
  auto [probs, gates, index, w, h] =
      routed_pool_into(x, router_w, A, Bt, acc.has_value() ? *acc : at::Tensor(), y, k, renormalize, temperature,
                       scale);
  return {y, probs, gates, index, w, h};
}

// The op adding into y in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_pool_(
    const at::Tensor& x, const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt, at::Tensor& y,
    int64_t k, bool renormalize, double temperature, double scale) {
  return routed_pool_into(x, router_w, A, Bt, y, y, k, renormalize, temperature, scale);
}

// dz (T, E) of the gate from dw (T, k) = u · h and the given gradients of probs and gates.
template <typename T>
void gate_backward(const T* dw, const T* gprobs, const T* ggates, const T* probs, const T* w, const int64_t* index,
                   int64_t tokens, int64_t E, int64_t k, bool renormalize, double temperature, double scale, T* dz) {
  const T inv_t = T(1.0 / temperature), sc = T(scale);
  at::parallel_for(0, tokens, 64, [&](int64_t b, int64_t e_) {
    std::vector<T> dp(E), dg(k);
    for (int64_t t = b; t < e_; ++t) {
      const T* p = probs + t * E;
      const int64_t* sel = index + t * k;
      for (int64_t e = 0; e < E; ++e) dp[e] = gprobs == nullptr ? T(0) : gprobs[t * E + e];
      T kept = T(0), dot = T(0);
      for (int64_t j = 0; j < k; ++j) {
        dg[j] = sc * dw[t * k + j] + (ggates == nullptr ? T(0) : ggates[t * E + sel[j]]);
        kept += p[sel[j]];
      }
      if (renormalize) {
        for (int64_t j = 0; j < k; ++j) dot += dg[j] * (p[sel[j]] / kept);
        for (int64_t j = 0; j < k; ++j) dp[sel[j]] += (dg[j] - dot) / kept;
      } else {
        for (int64_t j = 0; j < k; ++j) dp[sel[j]] += dg[j];
      }
      T s = T(0);
      for (int64_t e = 0; e < E; ++e) s += dp[e] * p[e];
      for (int64_t e = 0; e < E; ++e) dz[t * E + e] = p[e] * (dp[e] - s) * inv_t;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_pool_backward(const at::Tensor& gy, const std::optional<at::Tensor>& gprobs,
                                             const std::optional<at::Tensor>& ggates, const at::Tensor& x,
                                             const at::Tensor& router_w, const at::Tensor& A, const at::Tensor& Bt,
                                             const at::Tensor& index, const at::Tensor& probs, const at::Tensor& w,
                                             const at::Tensor& h, bool renormalize, double temperature, double scale,
                                             bool need_x, bool need_router, bool need_a, bool need_b) {
  check_args(x, A, Bt, index, w);
  const int64_t T = x.size(0), E = A.size(0), r = A.size(1), d_in = x.size(1), d_out = Bt.size(2),
                k = index.size(1);
  check_routed(x, router_w, A, k);
  check(gy.is_contiguous() && gy.numel() == T * d_out && gy.scalar_type() == x.scalar_type(),
        "the output's gradient must be a contiguous tensor of T x d_out values");
  for (const std::optional<at::Tensor>* g : {&gprobs, &ggates})
    check(!g->has_value() || ((*g)->is_contiguous() && (*g)->numel() == T * E),
          "the gradients of probs and gates must be contiguous (T, E) tensors");
  const Pairs p = sort_pairs(index, E);
  at::Tensor u = at::empty({T, k, r}, x.options()), dz = at::empty({T, E}, x.options());
  at::Tensor dx, dwr, da, dbt;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "routed_pool_backward", [&] {
    using S = scalar_t;
    rows_dot<S>(gy.data_ptr<S>(), Bt.data_ptr<S>(), p, k, r, d_out, u.data_ptr<S>());
    const at::Tensor dw = pair_dots<S>(u, h, w);  // (T, k): dL/dw
    const at::Tensor dh = gated<S>(u, w);         // (T, k, r)
    gate_backward<S>(dw.data_ptr<S>(), gprobs.has_value() ? gprobs->data_ptr<S>() : nullptr,
                     ggates.has_value() ? ggates->data_ptr<S>() : nullptr, probs.data_ptr<S>(), w.data_ptr<S>(),
                     index.data_ptr<int64_t>(), T, E, k, renormalize, temperature, scale, dz.data_ptr<S>());
    if (need_x) {
      dx = at::empty({T, d_in}, x.options());
      rows_combine<S>(dh.data_ptr<S>(), A.data_ptr<S>(), index.data_ptr<int64_t>(), nullptr, T, k, r, d_in,
                      dx.data_ptr<S>(), dz.data_ptr<S>(), router_w.data_ptr<S>(), E);
    }
    if (need_router) {
      dwr = at::empty({E, d_in}, x.options());
      outer_sum<S>(dz.data_ptr<S>(), x.data_ptr<S>(), all_tokens(T), 1, 1, E, d_in, dwr.data_ptr<S>());
    }
    factor_grads<S>(dh, h, w, x, gy, p, E, k, r, need_a, need_b, da, dbt);
  });
  auto none = at::empty({0}, x.options());
  return {need_x ? dx : none, need_router ? dwr : none, need_a ? da : none, need_b ? dbt : none};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moleforge_cpu, m) {
  m.def(
      "routed_pool(Tensor x, Tensor router_w, Tensor A, Tensor Bt, Tensor? acc, int k, bool renormalize, "
      "float temperature, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "routed_pool_(Tensor x, Tensor router_w, Tensor A, Tensor Bt, Tensor(a!) y, int k, bool renormalize, "
      "float temperature, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "routed_pool_backward(Tensor grad_y, Tensor? grad_probs, Tensor? grad_gates, Tensor x, Tensor router_w, "
      "Tensor A, Tensor Bt, Tensor index, Tensor probs, Tensor w, Tensor h, bool renormalize, float temperature, "
      "float scale, bool need_x, bool need_router, bool need_a, bool need_b) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pool_sparse(Tensor x, Tensor A, Tensor Bt, Tensor index, Tensor w, Tensor? acc) -> (Tensor, Tensor)");
  m.def("pool_sparse_(Tensor x, Tensor A, Tensor Bt, Tensor index, Tensor w, Tensor(a!) y) -> Tensor");
  m.def(
      "pool_sparse_backward(Tensor grad_y, Tensor x, Tensor A, Tensor Bt, Tensor index, Tensor w, Tensor h, "
      "bool need_x, bool need_a, bool need_b, bool need_w) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moleforge_cpu, CPU, m) {
  m.impl("pool_sparse", &pool_sparse);
  m.impl("pool_sparse_", &pool_sparse_);
  m.impl("pool_sparse_backward", &pool_sparse_backward);
  m.impl("routed_pool", &routed_pool);
  m.impl("routed_pool_", &routed_pool_);
  m.impl("routed_pool_backward", &routed_pool_backward);
}
