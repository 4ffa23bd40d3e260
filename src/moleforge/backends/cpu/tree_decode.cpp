// Residual-tree (S'MoRE) routing and propagation for a few tokens, without autograd: the
// decode step of a tree site, where the torch ops' fixed costs (some hundred small kernels per
// site and token) outweigh the arithmetic, which is a few thousand multiply-adds.
//
// tree_route: top-down routing with the switch or dense gate, from the weight tables that
// ops_tree_route._tables builds (the token part of every pool's first query layer, the
// ancestor key tables, the keys folded with the second query layer). Pool l routes C_l
// contexts per token; context c reads
//
//   pre = W1_tok x_down + b1 + Σ_j table_{l,j}[e_j(c)],   h = act(pre),
//   logits = ((K W2) h + K b2) / temperature,   probs = softmax(logits)
//
// and keeps its f_l most probable experts (switch: renormalised, or raw at fanout 1 with the
// official conventions; dense: all, in expert order). Context c, position p becomes context
// c·f_l + p of pool l − 1.
//
// tree_propagate: bottom-up propagation with the activation on every node (position "all"):
// node n = c·f + p of pool l with expert e computes
//
//   pre = scale_l (B_e h_{l,e} + b_e) + W h_{l−1}[n] + w,   h_l[c] += weight[c, p] act(pre)
//
// where h_{l,e} is the expert's down-projection (r values of h_all) and h_{l−1}[n] the
// hidden of pool l − 1's context n. Only the nodes a token routes to are computed.
//
// The semantics are those of ops_tree_route._route and ops_tree_prop._propagate_forward (and
// ir/interpret_tree.py); tanh is std::tanh here, 2σ(2v) − 1 there.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

enum TreeActivation : int64_t { kIdentity = 0, kRelu = 1, kTanh = 2 };

template <typename T>
inline T activate(int64_t act, T v) {
  if (act == kTanh) return std::tanh(v);
  if (act == kRelu) return v > T(0) ? v : T(0);
  return v;
}

// y = M v (+ y when accumulate), M (rows, cols) with row stride ld
template <typename T>
inline void gemv(const T* M, int64_t rows, int64_t cols, int64_t ld, const T* v, T* y, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = M + i * ld;
    T acc = accumulate ? y[i] : T(0);
    for (int64_t j = 0; j < cols; ++j) acc += row[j] * v[j];
    y[i] = acc;
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moleforge_cpu tree ops: ", name, " must be a CPU tensor, got ", t.device());
}

// The f largest of probs (s values), largest first, ties to the lower expert index.
void top_f(const std::vector<double>& probs, int64_t f, std::vector<int64_t>& order) {
  order.resize(probs.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + f, order.end(),
                    [&](int64_t a, int64_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); });
}

template <typename T>
void route_impl(const at::Tensor& xd, const at::Tensor& w_tok, const at::Tensor& b_tok, at::TensorList kw2,
                at::TensorList kb2, at::TensorList anc, at::IntArrayRef fanouts, bool dense, bool official,
                int64_t act, double temperature, std::vector<at::Tensor>& out) {
  const int64_t L = fanouts.size(), n_tok = xd.size(0), m = xd.size(1), G = w_tok.size(0);
  std::vector<int64_t> g(L), s(L), off(L), C(L), f(L), anc_base(L);
  for (int64_t l = 0, o = 0, a = 0; l < L; ++l) {
    s[l] = kw2[l].size(0);
    g[l] = kw2[l].size(1);
    off[l] = o;
    o += g[l];
    anc_base[l] = a;
    a += L - 1 - l;
    f[l] = dense ? s[l] : fanouts[l];
  }
  for (int64_t l = L - 1, c = 1; l >= 0; --l) {
    C[l] = c;
    c *= f[l];
  }
  std::vector<T*> idx_p(L), w_p(L), p_p(L);
  std::vector<int64_t*> idx_i(L);
  for (int64_t l = 0; l < L; ++l) {
    out[l] = at::empty({n_tok, C[l], f[l]}, xd.options().dtype(at::kLong));
    out[L + l] = at::empty({n_tok, C[l], f[l]}, xd.options());
    out[2 * L + l] = at::empty({n_tok, C[l], s[l]}, xd.options());
    idx_i[l] = out[l].data_ptr<int64_t>();
    w_p[l] = out[L + l].data_ptr<T>();
    p_p[l] = out[2 * L + l].data_ptr<T>();
  }
  const T* x = xd.data_ptr<T>();
  const int64_t x_ld = xd.stride(0);
  std::vector<T> tp(G), pre, h;
  std::vector<double> probs;
  std::vector<int64_t> order, ancestors, next;
  for (int64_t t = 0; t < n_tok; ++t) {
    gemv(w_tok.data_ptr<T>(), G, m, m, x + t * x_ld, tp.data(), false);
    const T* bt = b_tok.data_ptr<T>();
    for (int64_t i = 0; i < G; ++i) tp[i] += bt[i];
    ancestors.clear();  // per context of the current pool: its ancestors' experts, from the top
    int64_t na = 0;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t gl = g[l], sl = s[l], fl = f[l];
      const T* K = kw2[l].data_ptr<T>();
      const T* kb = kb2[l].data_ptr<T>();
      pre.resize(gl);
      h.resize(gl);
      probs.resize(sl);
      next.resize(C[l] * fl * (na + 1));
      for (int64_t c = 0; c < C[l]; ++c) {
        std::copy(tp.begin() + off[l], tp.begin() + off[l] + gl, pre.begin());
        for (int64_t a = 0; a < na; ++a) {
          const at::Tensor& table = anc[anc_base[l] + a];
          const T* row = table.data_ptr<T>() + ancestors[c * na + a] * gl;
          for (int64_t i = 0; i < gl; ++i) pre[i] += row[i];
        }
        for (int64_t i = 0; i < gl; ++i) h[i] = activate(act, pre[i]);
        double mx = -INFINITY;
        for (int64_t e = 0; e < sl; ++e) {
          T v = kb[e];
          for (int64_t i = 0; i < gl; ++i) v += K[e * gl + i] * h[i];
          if (temperature != 1.0) v = v / T(temperature);
          probs[e] = double(v);
          mx = std::max(mx, probs[e]);
        }
        double total = 0;
        for (int64_t e = 0; e < sl; ++e) total += probs[e] = std::exp(probs[e] - mx);
        T* pr = p_p[l] + (t * C[l] + c) * sl;
        for (int64_t e = 0; e < sl; ++e) pr[e] = T(probs[e] / total);
        int64_t* ix = idx_i[l] + (t * C[l] + c) * fl;
        T* wt = w_p[l] + (t * C[l] + c) * fl;
        if (dense) {
          for (int64_t e = 0; e < sl; ++e) ix[e] = e, wt[e] = pr[e];
        } else {
          for (int64_t e = 0; e < sl; ++e) probs[e] = double(pr[e]);
          top_f(probs, fl, order);
          T sum = 0;
          for (int64_t p = 0; p < fl; ++p) sum += pr[order[p]];
          const bool raw = official && fl == 1;
          for (int64_t p = 0; p < fl; ++p) ix[p] = order[p], wt[p] = raw ? pr[order[p]] : pr[order[p]] / sum;
        }
        for (int64_t p = 0; p < fl; ++p) {  // the children's ancestors: this context's, then its choice
          int64_t* dst = next.data() + (c * fl + p) * (na + 1);
          std::copy(ancestors.begin() + c * na, ancestors.begin() + (c + 1) * na, dst);
          dst[na] = ix[p];
        }
      }
      ancestors.swap(next);
      ++na;
    }
  }
}

std::vector<at::Tensor> tree_route(const at::Tensor& xd, const at::Tensor& w_tok, const at::Tensor& b_tok,
                                   at::TensorList kw2, at::TensorList kb2, at::TensorList anc,
                                   at::IntArrayRef fanouts, bool dense, bool official, int64_t act,
                                   double temperature) {
  const int64_t L = fanouts.size();
  TORCH_CHECK(L > 0 && int64_t(kw2.size()) == L && int64_t(kb2.size()) == L,
              "moleforge_cpu::tree_route: expected one folded key table per pool (", L, "), got ", kw2.size());
  TORCH_CHECK(int64_t(anc.size()) == L * (L - 1) / 2, "moleforge_cpu::tree_route: expected ", L * (L - 1) / 2,
              " ancestor tables, got ", anc.size());
  TORCH_CHECK(xd.dim() == 2 && xd.stride(1) == 1, "moleforge_cpu::tree_route: x_down must be (T, m) with unit "
              "column stride");
  check_cpu(xd, "x_down");
  std::vector<at::Tensor> out(3 * L);
  AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "tree_route", [&] {
    std::vector<at::Tensor> k2, kb, an;
    for (const auto& t : kw2) k2.push_back(t.contiguous());
    for (const auto& t : kb2) kb.push_back(t.contiguous());
    for (const auto& t : anc) an.push_back(t.contiguous());
    route_impl<scalar_t>(xd, w_tok.contiguous(), b_tok.contiguous(), k2, kb, an, fanouts, dense, official, act,
                         temperature, out);
  });
  return out;
}

template <typename T>
at::Tensor propagate_impl(const at::Tensor& h_all, at::TensorList idx, at::TensorList weights, at::TensorList B,
                          at::TensorList b, at::TensorList W, at::TensorList wb, at::ArrayRef<double> scales,
                          int64_t act) {
  const int64_t L = B.size(), n_tok = h_all.size(0), ld = h_all.stride(0);
  const int64_t d_root = B[L - 1].size(1);
  at::Tensor root = at::empty({n_tok, d_root}, h_all.options());
  const T* hp = h_all.data_ptr<T>();
  std::vector<T> prev, cur, pre;
  for (int64_t t = 0; t < n_tok; ++t) {
    int64_t off = 0, d_prev = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t s = B[l].size(0), d = B[l].size(1), r = B[l].size(2);
      const int64_t C = idx[l].size(1), f = idx[l].size(2);
      const T scale = T(scales[l]);
      const T* Bl = B[l].data_ptr<T>();
      const T* bl = b[l].numel() ? b[l].data_ptr<T>() : nullptr;
      const T* Wl = (l > 0 && W[l].numel()) ? W[l].data_ptr<T>() : nullptr;
      const T* wbl = wb[l].numel() ? wb[l].data_ptr<T>() : nullptr;
      const int64_t* ix = idx[l].data_ptr<int64_t>() + t * C * f;
      const T* wt = weights[l].data_ptr<T>() + t * C * f;
      cur.assign(C * d, T(0));
      pre.resize(d);
      for (int64_t n = 0; n < C * f; ++n) {
        const int64_t e = ix[n];
        TORCH_CHECK(e >= 0 && e < s, "moleforge_cpu::tree_propagate: expert index ", e, " outside pool ", l,
                    " of ", s, " experts");
        gemv(Bl + e * d * r, d, r, r, hp + t * ld + off + e * r, pre.data(), false);
        for (int64_t i = 0; i < d; ++i) {
          T v = pre[i] + (bl ? bl[e * d + i] : T(0));
          pre[i] = scale * v + (wbl ? wbl[i] : T(0));
        }
        if (Wl) gemv(Wl, d, d_prev, d_prev, prev.data() + n * d_prev, pre.data(), true);
        T* hc = cur.data() + (n / f) * d;
        for (int64_t i = 0; i < d; ++i) hc[i] += wt[n] * activate(act, pre[i]);
      }
      off += s * r;
      prev.swap(cur);
      d_prev = d;
    }
    std::copy(prev.begin(), prev.begin() + d_root, root.data_ptr<T>() + t * d_root);
  }
  return root;
}

at::Tensor tree_propagate(const at::Tensor& h_all, at::TensorList idx, at::TensorList weights, at::TensorList B,
                          at::TensorList b, at::TensorList W, at::TensorList wb, at::ArrayRef<double> scales,
                          int64_t act) {
  const int64_t L = B.size();
  TORCH_CHECK(L > 0 && int64_t(idx.size()) == L && int64_t(weights.size()) == L && int64_t(b.size()) == L &&
                  int64_t(W.size()) == L && int64_t(wb.size()) == L && int64_t(scales.size()) == L,
              "moleforge_cpu::tree_propagate: expected ", L, " entries per argument list");
  TORCH_CHECK(h_all.dim() == 2 && h_all.stride(1) == 1, "moleforge_cpu::tree_propagate: h_all must be (T, n) with "
              "unit column stride");
  TORCH_CHECK(idx[L - 1].size(1) == 1, "moleforge_cpu::tree_propagate: the top pool must route one context");
  check_cpu(h_all, "h_all");
  at::Tensor root;
  AT_DISPATCH_FLOATING_TYPES(h_all.scalar_type(), "tree_propagate", [&] {
    std::vector<at::Tensor> ix, w, Bc, bc, Wc, wbc;
    for (int64_t l = 0; l < L; ++l) {
      ix.push_back(idx[l].contiguous());
      w.push_back(weights[l].contiguous());
      Bc.push_back(B[l].contiguous());
      bc.push_back(b[l].contiguous());
      Wc.push_back(W[l].contiguous());
      wbc.push_back(wb[l].contiguous());
    }
    root = propagate_impl<scalar_t>(h_all, ix, w, Bc, bc, Wc, wbc, scales, act);
  });
  return root;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moleforge_cpu, m) {
  m.def(
      "tree_route(Tensor x_down, Tensor w_tok, Tensor b_tok, Tensor[] kw2, Tensor[] kb2, Tensor[] ancestors, "
      "int[] fanouts, bool dense, bool official, int activation, float temperature) -> Tensor[]");
  m.def(
      "tree_propagate(Tensor h_all, Tensor[] indices, Tensor[] weights, Tensor[] B, Tensor[] b, Tensor[] W, "
      "Tensor[] w, float[] scales, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(moleforge_cpu, CPU, m) {
  m.impl("tree_route", &tree_route);
  m.impl("tree_propagate", &tree_propagate);
}
