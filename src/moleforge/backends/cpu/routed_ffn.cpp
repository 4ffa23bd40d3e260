// Routed FFN-block experts on the CPU, fused token by token.
//
// For token t and each of its k routed slots (t, j) with expert e = index[t, j] and gate
// weight w = weights[t, j]:
//
//   U = up_base[t] + s_u Σ_i zu[t, e, i] bu[e, i]          (bu: (E, r, F), rows of B_eᵀ)
//   G = gate_base[t] + s_g Σ_i zg[t, e, i] bg[e, i]
//   h = act(G) ⊙ U            (or act(U) for a block without a gate)
//   y[t] += w h,   zd[t, j, i] = h · da[e, i]              (da: (E, r_d, F))
//   yd[t] += w s_d Σ_i zd[t, j, i] bd[e, i]               (bd: (E, r_d, D), rows of the down-LoRA's B_eᵀ)
//
// Tokens are split across the intra-op threads and taken in blocks of kBlock; a block's slots are
// grouped by expert, so each expert's factor rows are read once per block, and its rows are
// processed in tiles of kTile columns. A token's slots are summed into its row in place, so the
// (slots × F) work needs no gather, scatter or zero fill, and nothing of that size is stored: the
// backward recomputes U and G, then one pass per slot gives h, the pre-activations' gradients and
// their sums into the token's rows. The expert factors' gradients are summed per thread, then
// across threads.
//
// In training with dropout (MixLoRA's lora_dropout) the down LoRA reads h ⊙ m, m = keep[t, j] the slot's
// keep factors ([ν >= p] / (1 - p), drawn upstream, (T, k, F)): zd[t, j, i] = (h ⊙ m) · da[e, i], and in the
// backward ∂h = w ∂y + m ⊙ Σ_i ∂zd_i da[e, i], ∂da[e, i] += ∂zd_i (h ⊙ m). y reads h undropped. The gate and
// up LoRAs' dropout is in their z, computed upstream from the dropped inputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

// glibc's vector math (libmvec) has SIMD forms of these; declaring them lets the compiler
// vectorise the loops below that call them, with IEEE semantics kept elsewhere.
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) double exp(double) noexcept;
__attribute__((simd("notinbranch"))) float erff(float) noexcept;
__attribute__((simd("notinbranch"))) double erf(double) noexcept;
}

namespace {

enum Activation : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kQuickGelu = 4 };

inline float vexp(float v) { return expf(v); }
inline double vexp(double v) { return exp(v); }
inline float verf(float v) { return erff(v); }
inline double verf(double v) { return erf(v); }

// act(x), and act(x) with act'(x), per value; inlined into the loops below, which the compiler vectorises
template <int64_t A, typename T>
inline T act_value(T x) {
  if constexpr (A == kSilu) {
    return x / (T(1) + vexp(-x));
  } else if constexpr (A == kQuickGelu) {
    return x / (T(1) + vexp(T(-1.702) * x));
  } else if constexpr (A == kGelu) {
    return T(0.5) * x * (T(1) + verf(x * T(M_SQRT1_2)));
  } else if constexpr (A == kGeluTanh) {
    const T u = T(M_2_SQRTPI * M_SQRT1_2) * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(2) - T(2) / (T(1) + vexp(T(2) * u)));  // 0.5 x (1 + tanh u)
  } else {
    return x > T(0) ? x : T(0);
  }
}

template <int64_t A, typename T>
inline T act_value_grad(T x, T& grad) {
  if constexpr (A == kSilu || A == kQuickGelu) {
    const T c = A == kSilu ? T(1) : T(1.702);
    const T s = T(1) / (T(1) + vexp(-c * x));
    grad = s + c * x * s * (T(1) - s);
    return x * s;
  } else if constexpr (A == kGelu) {
    const T cdf = T(0.5) * (T(1) + verf(x * T(M_SQRT1_2)));
    grad = cdf + x * T(0.5 * M_2_SQRTPI * M_SQRT1_2) * vexp(T(-0.5) * x * x);
    return x * cdf;
  } else if constexpr (A == kGeluTanh) {
    const T c = T(M_2_SQRTPI * M_SQRT1_2);
    const T th = T(1) - T(2) / (T(1) + vexp(T(2) * c * (x + T(0.044715) * x * x * x)));  // tanh
    grad = T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * c * (T(1) + T(3 * 0.044715) * x * x);
    return T(0.5) * x * (T(1) + th);
  } else {
    grad = x > T(0) ? T(1) : T(0);
    return x > T(0) ? x : T(0);
  }
}

// One slot's forward from its pre-activations u (and g): h = act(g) ⊙ u (or act(u)); y = w h on the
// token's first slot, y += w h on the others.
template <int64_t A, typename T>
void slot_forward(const T* __restrict u, const T* __restrict g, T w, bool first, T* __restrict h, T* __restrict y,
                  int64_t n) {
  if (g) {
#pragma omp simd
    for (int64_t f = 0; f < n; ++f) h[f] = act_value<A>(g[f]) * u[f];
  } else {
#pragma omp simd
    for (int64_t f = 0; f < n; ++f) h[f] = act_value<A>(u[f]);
  }
  if (first) {
#pragma omp simd
    for (int64_t f = 0; f < n; ++f) y[f] = w * h[f];
  } else {
#pragma omp simd
    for (int64_t f = 0; f < n; ++f) y[f] += w * h[f];
  }
}

// One slot's backward from dh (the gradient of its hidden state h, complete): recomputes h = act(g) ⊙ u
// (or act(u)) into hout, writes the pre-activations' gradients du = dh ⊙ act(g), dg = dh ⊙ u ⊙ act'(g)
// (plain blocks: du = dh ⊙ act'(u)) and adds them into the token's rows dub, dgb (the first slot of a
// token sets them); returns gy · h, the gate weight's gradient.
template <int64_t A, bool kFirst, typename T>
T slot_backward(const T* __restrict u, const T* __restrict g, const T* __restrict gy, const T* __restrict dh,
                T* __restrict hout, T* __restrict du, T* __restrict dg, T* __restrict dub, T* __restrict dgb,
                int64_t n) {
  T dw = 0;
  if (g) {
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < n; ++f) {
      T grad;
      const T a = act_value_grad<A>(g[f], grad);
      const T h = a * u[f];
      hout[f] = h;
      dw += gy[f] * h;
      const T dU = dh[f] * a, dG = dh[f] * grad * u[f];
      du[f] = dU;
      dg[f] = dG;
      if constexpr (kFirst) {
        dub[f] = dU;
        dgb[f] = dG;
      } else {
        dub[f] += dU;
        dgb[f] += dG;
      }
    }
  } else {
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < n; ++f) {
      T grad;
      const T h = act_value_grad<A>(u[f], grad);
      hout[f] = h;
      dw += gy[f] * h;
      const T dU = dh[f] * grad;
      du[f] = dU;
      if constexpr (kFirst)
        dub[f] = dU;
      else
        dub[f] += dU;
    }
  }
  return dw;
}

#define MOLEFORGE_ACT_SWITCH(act, ...)    \
  switch (act) {                           \
    case kSilu: {                          \
      constexpr int64_t A_ = kSilu;        \
      __VA_ARGS__;                                \
    } break;                               \
    case kGelu: {                          \
      constexpr int64_t A_ = kGelu;        \
      __VA_ARGS__;                                \
    } break;                               \
    case kGeluTanh: {                      \
      constexpr int64_t A_ = kGeluTanh;    \
      __VA_ARGS__;                                \
    } break;                               \
    case kQuickGelu: {                     \
      constexpr int64_t A_ = kQuickGelu;   \
      __VA_ARGS__;                                \
    } break;                               \
    default: {                             \
      constexpr int64_t A_ = kRelu;        \
      __VA_ARGS__;                                \
    }                                      \
  }

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t f = 0; f < n; ++f) acc += a[f] * b[f];
  return acc;
}

// One pass over out for up to four rows: out = in + Σ_j c[j] rows[j] (kFrom: in = base, or 0 when base is
// null; else in = out)
template <bool kFrom, typename T>
inline void combine_pass(const T* c, const T* const* rows, int64_t m, T* __restrict out, const T* __restrict base,
                         int64_t n) {
  const T c0 = c[0], c1 = m > 1 ? c[1] : T(0), c2 = m > 2 ? c[2] : T(0), c3 = m > 3 ? c[3] : T(0);
  const T* __restrict r0 = rows[0];
  const T* __restrict r1 = rows[m > 1 ? 1 : 0];
  const T* __restrict r2 = rows[m > 2 ? 2 : 0];
  const T* __restrict r3 = rows[m > 3 ? 3 : 0];
#define MOLEFORGE_PASS(expr)                                       \
  if constexpr (kFrom) {                                           \
    if (base) {                                                    \
      _Pragma("omp simd") for (int64_t f = 0; f < n; ++f) out[f] = base[f] + (expr); \
    } else {                                                       \
      _Pragma("omp simd") for (int64_t f = 0; f < n; ++f) out[f] = (expr); \
    }                                                              \
  } else {                                                         \
    _Pragma("omp simd") for (int64_t f = 0; f < n; ++f) out[f] += (expr); \
  }
  switch (m) {
    case 1:
      MOLEFORGE_PASS(c0 * r0[f])
      break;
    case 2:
      MOLEFORGE_PASS(c0 * r0[f] + c1 * r1[f])
      break;
    case 3:
      MOLEFORGE_PASS(c0 * r0[f] + c1 * r1[f] + c2 * r2[f])
      break;
    default:
      MOLEFORGE_PASS(c0 * r0[f] + c1 * r1[f] + c2 * r2[f] + c3 * r3[f])
  }
#undef MOLEFORGE_PASS
}

// out += Σ_j c[j] rows[j] over m rows, or out = base + Σ_j c[j] rows[j] when base is given, or
// out = Σ_j c[j] rows[j] when set; up to four rows per pass over out
template <typename T>
void combine(const T* c, const T* const* rows, int64_t m, T* out, int64_t n, const T* base = nullptr,
             bool set = false) {
  int64_t j = 0;
  if (base || set) {
    if (m == 0) {
      if (base)
        std::copy(base, base + n, out);
      else
        std::fill(out, out + n, T(0));
      return;
    }
    combine_pass<true>(c, rows, std::min<int64_t>(m, 4), out, base, n);
    j = 4;
  }
  for (; j < m; j += 4) combine_pass<false>(c + j, rows + j, std::min<int64_t>(m - j, 4), out, out, n);
}

// out[j] = a · rows[j] over m rows, four at a time (independent sums)
template <typename T>
void dots(const T* __restrict a, const T* const* rows, int64_t m, T* out, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    const T* __restrict r0 = rows[j];
    const T* __restrict r1 = rows[j + 1];
    const T* __restrict r2 = rows[j + 2];
    const T* __restrict r3 = rows[j + 3];
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t f = 0; f < n; ++f) {
      s0 += a[f] * r0[f];
      s1 += a[f] * r1[f];
      s2 += a[f] * r2[f];
      s3 += a[f] * r3[f];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
  }
  for (; j < m; ++j) out[j] = dot(a, rows[j], n);
}

// The low-rank part of one projection: z (T, E, r) with a row stride of its own (z may be a slice of a
// wider GEMM output), b (E, r, F), scale s; r = 0 when absent.
template <typename T>
struct LowRank {
  const T* z;
  const T* b;
  T s;
  int64_t r;
  int64_t zstride;

  const T* z_row(int64_t t, int64_t e) const { return z + t * zstride + e * r; }
};

template <typename T>
LowRank<T> low_rank(const at::Tensor& z, const at::Tensor& b, double s) {
  if (b.numel() == 0) return {nullptr, nullptr, T(0), 0, 0};
  return {z.data_ptr<T>(), b.data_ptr<T>(), T(s), b.size(1), z.stride(0)};
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "moleforge_cpu::routed_ffn: ", what); }

// The down LoRA's dropout keep factors (T, k, F), or an empty tensor without dropout
at::Tensor checked_keep(const std::optional<at::Tensor>& keep, const at::Tensor& index, const at::Tensor& up_base,
                        int64_t rd) {
  if (!keep.has_value() || keep->numel() == 0) return at::empty({0}, up_base.options());
  check(rd > 0, "down_keep needs the down LoRA (down_a, down_b)");
  check(keep->sizes() == at::IntArrayRef({index.size(0), index.size(1), up_base.size(1)}) && keep->is_contiguous() &&
            keep->device().is_cpu() && keep->scalar_type() == up_base.scalar_type(),
        "down_keep must be a contiguous CPU (T, k, F) tensor of up_base's dtype");
  return *keep;
}

// The down LoRA's input for one slot over a tile: h, or h ⊙ m into out (m null: no dropout)
template <typename T>
inline const T* dropped(const T* __restrict h, const T* __restrict m, T* __restrict out, int64_t n) {
  if (!m) return h;
#pragma omp simd
  for (int64_t f = 0; f < n; ++f) out[f] = h[f] * m[f];
  return out;
}

// dh = dh ⊙ m + w g: the down LoRA's part of a slot's ∂h through its dropout, plus the gated ∂y
template <typename T>
inline void keep_then_add(T* __restrict dh, const T* __restrict m, T w, const T* __restrict g, int64_t n) {
#pragma omp simd
  for (int64_t f = 0; f < n; ++f) dh[f] = dh[f] * m[f] + w * g[f];
}

void check_inputs(const at::Tensor& index, const at::Tensor& weights, const at::Tensor& up_base,
                  const at::Tensor& zu, const at::Tensor& bu, const at::Tensor& gate_base, const at::Tensor& zg,
                  const at::Tensor& bg, const at::Tensor& down_a) {
  check(index.dim() == 2 && index.scalar_type() == at::kLong, "index must be (T, k) int64");
  const int64_t T = index.size(0), k = index.size(1);
  check(weights.sizes() == index.sizes(), "weights must have index's shape (T, k)");
  check(up_base.dim() == 2 && up_base.size(0) == T, "up_base must be (T, F)");
  const auto dtype = up_base.scalar_type();
  for (const auto* t : {&weights, &zu, &bu, &gate_base, &zg, &bg, &down_a})
    check(t->numel() == 0 || t->scalar_type() == dtype, "all float inputs must share up_base's dtype");
  for (const auto* t : {&index, &weights, &up_base, &bu, &gate_base, &bg, &down_a})
    check(t->is_contiguous() && t->device().is_cpu(), "inputs must be contiguous CPU tensors");
  for (const auto* z : {&zu, &zg})
    check(z->numel() == 0 || (z->dim() == 3 && z->device().is_cpu() && z->stride(2) == 1 &&
                              z->stride(1) == z->size(2) && z->stride(0) >= z->size(1) * z->size(2)),
          "z must be a CPU (T, E, r) tensor whose rows are contiguous (E, r) blocks");
  const int64_t F = up_base.size(1);
  check(gate_base.numel() == 0 || gate_base.sizes() == up_base.sizes(), "gate_base must be (T, F) like up_base");
  for (const auto& [z, b] : {std::pair{&zu, &bu}, std::pair{&zg, &bg}}) {
    if (b->numel() == 0) continue;
    check(b->dim() == 3 && b->size(2) == F, "B factors must be (E, r, F)");
    check(z->dim() == 3 && z->size(0) == T && z->size(1) == b->size(0) && z->size(2) == b->size(1),
          "z must be (T, E, r) matching its B factor (E, r, F)");
  }
  check(down_a.numel() == 0 || (down_a.dim() == 3 && down_a.size(2) == F), "down_a must be (E, r, F)");
  (void)k;
}

constexpr int64_t kBlock = 16;  // tokens per block: the block's slots, grouped by expert, share factor rows in cache
constexpr int64_t kTile = 512;  // columns per tile

// A block's slots grouped by expert: slot[order[g0..g1)] all have expert group_expert[g].
struct Groups {
  std::vector<int64_t> order, start, expert, count;

  explicit Groups(int64_t E) : count(E) {}

  void build(const int64_t* ex, int64_t n) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t q = 0; q < n; ++q) ++count[ex[q]];
    start.clear();
    expert.clear();
    std::vector<int64_t> pos(count.size());
    int64_t at = 0;
    for (size_t e = 0; e < count.size(); ++e) {
      pos[e] = at;
      if (count[e]) {
        start.push_back(at);
        expert.push_back(int64_t(e));
      }
      at += count[e];
    }
    start.push_back(at);
    order.resize(n);
    for (int64_t q = 0; q < n; ++q) order[pos[ex[q]]++] = q;
  }

  int64_t size() const { return int64_t(expert.size()); }
};

// This thread's scratch of at least n values, kept across calls: freeing and reallocating it on every
// call would return its pages to the system and fault them back in.
template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// A tile of columns [f0, f0 + len) of the F-wide rows: every step below except the dot products is
// independent per column, so a block runs tile by tile with its per-slot rows (stride kTile) and the
// factor rows it reads kept in L1; the dot products add up over the tiles.
struct Tile {
  int64_t f0, len;
};

// rows[q] = base[t_q] + s Σ_i z[t_q, e, i] b[e, i] over the tile, for the block's slots q (t_q: q's token)
template <typename T>
void add_low_rank(const LowRank<T>& lr, const Groups& groups, int64_t t0, int64_t k, int64_t F, Tile tile,
                  const T* base, T* rows, std::vector<const T*>& b, std::vector<T>& c) {
  b.resize(lr.r);
  c.resize(lr.r);
  for (int64_t g = 0; g < groups.size(); ++g) {
    const int64_t e = groups.expert[g];
    for (int64_t i = 0; i < lr.r; ++i) b[i] = lr.b + (e * lr.r + i) * F + tile.f0;
    for (int64_t p = groups.start[g]; p < groups.start[g + 1]; ++p) {
      const int64_t q = groups.order[p], t = t0 + q / k;
      const T* z = lr.z_row(t, e);
      for (int64_t i = 0; i < lr.r; ++i) c[i] = lr.s * z[i];
      combine(c.data(), b.data(), lr.r, rows + q * kTile, tile.len, base + t * F + tile.f0);
    }
  }
}

// The low-rank part's gradients over the tile from the slots' pre-activation gradients d (rows d[q]):
// dz[t_q, e, i] += s d[q] · b[e, i] and, per thread, acc[e, i] += s Σ_q z[t_q, e, i] d[q].
template <typename T>
void low_rank_grads(const LowRank<T>& lr, const Groups& groups, int64_t t0, int64_t k, int64_t E, int64_t F,
                    Tile tile, const T* d, T* dz, T* acc, std::vector<const T*>& b, std::vector<const T*>& slots,
                    std::vector<T>& c) {
  b.resize(lr.r);
  c.resize(std::max<int64_t>(lr.r, kBlock * k));
  for (int64_t g = 0; g < groups.size(); ++g) {
    const int64_t e = groups.expert[g];
    for (int64_t i = 0; i < lr.r; ++i) b[i] = lr.b + (e * lr.r + i) * F + tile.f0;
    slots.clear();
    for (int64_t p = groups.start[g]; p < groups.start[g + 1]; ++p) {
      const int64_t q = groups.order[p];
      slots.push_back(d + q * kTile);
      dots(d + q * kTile, b.data(), lr.r, c.data(), tile.len);
      T* z = dz + ((t0 + q / k) * E + e) * lr.r;
      for (int64_t i = 0; i < lr.r; ++i) z[i] += lr.s * c[i];
    }
    for (int64_t i = 0; i < lr.r; ++i) {
      for (int64_t p = groups.start[g]; p < groups.start[g + 1]; ++p)
        c[p - groups.start[g]] = lr.s * lr.z_row(t0 + groups.order[p] / k, e)[i];
      combine(c.data(), slots.data(), int64_t(slots.size()), acc + (e * lr.r + i) * F + tile.f0, tile.len);
    }
  }
}

// The number of experts: the factors' (which must agree), or the routing's when there are none; every
// index must name one of them.
int64_t experts(const at::Tensor& index, const at::Tensor& bu, const at::Tensor& bg, const at::Tensor& down_a) {
  int64_t E = 0;
  for (const auto* f : {&bu, &bg, &down_a}) {
    if (f->numel() == 0) continue;
    check(E == 0 || f->size(0) == E, "the expert factors must have the same number of experts (dim 0)");
    E = f->size(0);
  }
  if (index.numel()) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    check(lo >= 0 && (E == 0 || hi < E), "index names an expert outside [0, E) of the factors");
    E = std::max(E, hi + 1);
  }
  return std::max<int64_t>(E, 1);
}

// A gradient that is absent (no such factor): an empty tensor
at::Tensor summed_or_empty(const at::Tensor& acc, int64_t r) { return r ? acc.sum(0) : at::empty({0}, acc.options()); }

// The down-LoRA's up-projection for a block's slots: yd[t_q] += w_q s Σ_i zd[q, i] bd[e_q, i] (yd rows zeroed first)
template <typename T>
void add_down_lora(const Groups& groups, int64_t t0, int64_t n, int64_t k, int64_t rd, int64_t D, const T* w,
                   const T* zd, const T* bd, T s, T* yd, std::vector<const T*>& factor, std::vector<T>& c) {
  std::fill(yd + t0 * D, yd + (t0 + n / k) * D, T(0));
  factor.resize(rd);
  c.resize(rd);
  for (int64_t g = 0; g < groups.size(); ++g) {
    const int64_t e = groups.expert[g];
    for (int64_t i = 0; i < rd; ++i) factor[i] = bd + (e * rd + i) * D;
    for (int64_t p = groups.start[g]; p < groups.start[g + 1]; ++p) {
      const int64_t q = groups.order[p], sq = t0 * k + q;
      for (int64_t i = 0; i < rd; ++i) c[i] = w[sq] * s * zd[sq * rd + i];
      combine(c.data(), factor.data(), rd, yd + (t0 + q / k) * D, D);
    }
  }
}

void check_down(const at::Tensor& down_a, const at::Tensor& down_b) {
  check((down_a.numel() == 0) == (down_b.numel() == 0), "down_a and down_b come together");
  check(down_b.numel() == 0 || (down_b.dim() == 3 && down_b.sizes().slice(0, 2) == down_a.sizes().slice(0, 2) &&
                                down_b.is_contiguous() && down_b.scalar_type() == down_a.scalar_type()),
        "down_b must be contiguous (E, r, D) with down_a's (E, r)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& index, const at::Tensor& weights, int64_t act, const at::Tensor& up_base, const at::Tensor& zu,
    const at::Tensor& bu, double su, const at::Tensor& gate_base, const at::Tensor& zg, const at::Tensor& bg,
    double sg, const at::Tensor& down_a, const at::Tensor& down_b, double sd,
    const std::optional<at::Tensor>& down_keep) {
  check_inputs(index, weights, up_base, zu, bu, gate_base, zg, bg, down_a);
  check_down(down_a, down_b);
  const int64_t T = index.size(0), k = index.size(1), F = up_base.size(1);
  const bool gated = gate_base.numel() > 0;
  const int64_t rd = down_a.numel() ? down_a.size(1) : 0, Dd = rd ? down_b.size(2) : 0;
  const auto keep = checked_keep(down_keep, index, up_base, rd);
  const int64_t E = experts(index, bu, bg, down_a);
  auto y = k ? at::empty({T, F}, up_base.options()) : at::zeros({T, F}, up_base.options());
  auto zd = at::zeros({T, k, rd}, up_base.options());
  auto yd = rd ? at::empty({T, Dd}, up_base.options()) : at::empty({0}, up_base.options());
  AT_DISPATCH_FLOATING_TYPES(up_base.scalar_type(), "moleforge_cpu::routed_ffn", [&] {
    using T_ = scalar_t;
    const int64_t* idx = index.data_ptr<int64_t>();
    const T_* w = weights.data_ptr<T_>();
    const T_* ub = up_base.data_ptr<T_>();
    const T_* gb = gated ? gate_base.data_ptr<T_>() : nullptr;
    const T_* da = rd ? down_a.data_ptr<T_>() : nullptr;
    const T_* bd = rd ? down_b.data_ptr<T_>() : nullptr;
    const auto lu = low_rank<T_>(zu, bu, su), lg = low_rank<T_>(zg, bg, sg);
    T_* yp = y.data_ptr<T_>();
    T_* zdp = zd.data_ptr<T_>();
    T_* ydp = rd ? yd.data_ptr<T_>() : nullptr;
    const T_* kp = keep.numel() ? keep.data_ptr<T_>() : nullptr;
    at::parallel_for(0, T, kBlock, [&](int64_t lo, int64_t hi) {
      const int64_t rows = kBlock * k * kTile;  // slot rows of one tile, stride kTile
      T_* U = scratch<T_>(3 * rows + kTile);
      T_* G = U + rows;
      T_* H = G + rows;
      T_* HK = H + rows;  // one slot's h ⊙ m (dropout)
      std::vector<T_> c, part(rd);
      std::vector<const T_*> factor;
      Groups groups(E);
      for (int64_t t0 = lo; t0 < hi; t0 += kBlock) {
        const int64_t n = (std::min(t0 + kBlock, hi) - t0) * k, s0 = t0 * k;
        groups.build(idx + s0, n);
        for (Tile tile{0, 0}; tile.f0 < F; tile.f0 += kTile) {
          tile.len = std::min(kTile, F - tile.f0);
          add_low_rank(lu, groups, t0, k, F, tile, ub, U, factor, c);
          if (gated) add_low_rank(lg, groups, t0, k, F, tile, gb, G, factor, c);
          for (int64_t q = 0; q < n; ++q) {
            const T_* gq = gated ? G + q * kTile : nullptr;
            T_* yt = yp + (t0 + q / k) * F + tile.f0;
            MOLEFORGE_ACT_SWITCH(act, slot_forward<A_>(U + q * kTile, gq, w[s0 + q], q % k == 0,
                                                       H + q * kTile, yt, tile.len))
          }
          for (int64_t gi = 0; rd && gi < groups.size(); ++gi) {
            const int64_t e = groups.expert[gi];
            factor.resize(rd);
            for (int64_t i = 0; i < rd; ++i) factor[i] = da + (e * rd + i) * F + tile.f0;
            for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p) {
              const int64_t q = groups.order[p];
              const T_* hq = dropped(H + q * kTile, kp ? kp + (s0 + q) * F + tile.f0 : nullptr, HK, tile.len);
              dots(hq, factor.data(), rd, part.data(), tile.len);
              for (int64_t i = 0; i < rd; ++i) zdp[(s0 + q) * rd + i] += part[i];
            }
          }
        }
        if (rd) add_down_lora(groups, t0, n, k, rd, Dd, w, zdp, bd, T_(sd), ydp, factor, c);
      }
    });
  });
  return {y, yd, zd};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& grad_yd, const at::Tensor& index,
                                 const at::Tensor& weights, int64_t act, const at::Tensor& up_base,
                                 const at::Tensor& zu, const at::Tensor& bu, double su, const at::Tensor& gate_base,
                                 const at::Tensor& zg, const at::Tensor& bg, double sg, const at::Tensor& down_a,
                                 const at::Tensor& down_b, double sd, const at::Tensor& zd,
                                 const std::optional<at::Tensor>& down_keep) {
  check_inputs(index, weights, up_base, zu, bu, gate_base, zg, bg, down_a);
  check_down(down_a, down_b);
  const int64_t T = index.size(0), k = index.size(1), F = up_base.size(1);
  check(grad_y.sizes() == at::IntArrayRef({T, F}) && grad_y.is_contiguous(), "grad_y must be contiguous (T, F)");
  const bool gated = gate_base.numel() > 0;
  const int64_t rd = down_a.numel() ? down_a.size(1) : 0;
  const int64_t Dd = rd ? down_b.size(2) : 0;
  check(rd == 0 || (grad_yd.sizes() == at::IntArrayRef({T, Dd}) && grad_yd.is_contiguous()),
        "grad_yd must be contiguous (T, D)");
  check(rd == 0 || (zd.sizes() == at::IntArrayRef({T, k, rd}) && zd.is_contiguous()), "zd must be (T, k, r)");
  const int64_t E = experts(index, bu, bg, down_a);
  const auto keep = checked_keep(down_keep, index, up_base, rd);
  const int64_t ru = bu.numel() ? bu.size(1) : 0, rg = bg.numel() ? bg.size(1) : 0;
  const int64_t threads = at::get_num_threads();
  const auto opt = up_base.options();
  auto d_w = at::zeros({T, k}, opt);
  auto d_ub = k ? at::empty({T, F}, opt) : at::zeros({T, F}, opt);
  auto d_gb = gated ? (k ? at::empty({T, F}, opt) : at::zeros({T, F}, opt)) : at::empty({0}, opt);
  auto d_zu = ru ? at::zeros({T, E, ru}, opt) : at::empty({0}, opt);
  auto d_zg = rg ? at::zeros({T, E, rg}, opt) : at::empty({0}, opt);
  // per-thread sums of the expert factors' gradients, (threads, E, r, F)
  auto acc_bu = at::zeros({ru ? threads : 0, E, ru, F}, opt);
  auto acc_bg = at::zeros({rg ? threads : 0, E, rg, F}, opt);
  auto acc_da = at::zeros({rd ? threads : 0, E, rd, F}, opt);
  auto acc_bd = at::zeros({rd ? threads : 0, E, rd, Dd}, opt);
  AT_DISPATCH_FLOATING_TYPES(up_base.scalar_type(), "moleforge_cpu::routed_ffn_backward", [&] {
    using T_ = scalar_t;
    const T_* gy = grad_y.data_ptr<T_>();
    const T_* gyd = rd ? grad_yd.data_ptr<T_>() : nullptr;
    const T_* zdp = rd ? zd.data_ptr<T_>() : nullptr;
    const T_* bd = rd ? down_b.data_ptr<T_>() : nullptr;
    const int64_t* idx = index.data_ptr<int64_t>();
    const T_* w = weights.data_ptr<T_>();
    const T_* ub = up_base.data_ptr<T_>();
    const T_* gb = gated ? gate_base.data_ptr<T_>() : nullptr;
    const T_* da = rd ? down_a.data_ptr<T_>() : nullptr;
    const auto lu = low_rank<T_>(zu, bu, su), lg = low_rank<T_>(zg, bg, sg);
    T_* dwp = d_w.data_ptr<T_>();
    T_* dub = d_ub.data_ptr<T_>();
    T_* dgb = gated ? d_gb.data_ptr<T_>() : nullptr;
    T_* dzu = ru ? d_zu.data_ptr<T_>() : nullptr;
    T_* dzg = rg ? d_zg.data_ptr<T_>() : nullptr;
    const T_* kp = keep.numel() ? keep.data_ptr<T_>() : nullptr;
    at::parallel_for(0, T, kBlock, [&](int64_t lo, int64_t hi) {
      const int64_t tid = at::get_thread_num();
      T_* abu = ru ? acc_bu.data_ptr<T_>() + tid * E * ru * F : nullptr;
      T_* abg = rg ? acc_bg.data_ptr<T_>() + tid * E * rg * F : nullptr;
      T_* ada = rd ? acc_da.data_ptr<T_>() + tid * E * rd * F : nullptr;
      T_* abd = rd ? acc_bd.data_ptr<T_>() + tid * E * rd * Dd : nullptr;
      std::vector<T_> gzd_block(kBlock * k * rd), dots_i(rd);
      // per slot of a block, over a tile: pre-activations u and g, h, dh, and the gradients of u and g
      const int64_t rows = kBlock * k * kTile;  // slot rows of one tile, stride kTile
      T_* U = scratch<T_>(7 * rows);
      T_* G = U + rows;
      T_* H = G + rows;
      T_* DH = H + rows;
      T_* DU = DH + rows;
      T_* DG = DU + rows;
      T_* HK = DG + rows;  // h ⊙ m per slot (dropout)
      std::vector<T_> c;
      std::vector<const T_*> factor, slots;
      Groups groups(E);
      for (int64_t t0 = lo; t0 < hi; t0 += kBlock) {
        const int64_t n = (std::min(t0 + kBlock, hi) - t0) * k, s0 = t0 * k;
        groups.build(idx + s0, n);
        // the down-LoRA's up-projection: ∂zd = w s_d (∂yd · bd_i), ∂w += s_d Σ_i zd_i (∂yd · bd_i),
        // ∂bd_i += w s_d zd_i ∂yd
        for (int64_t gi = 0; rd && gi < groups.size(); ++gi) {
          const int64_t e = groups.expert[gi];
          factor.resize(rd);
          for (int64_t i = 0; i < rd; ++i) factor[i] = bd + (e * rd + i) * Dd;
          slots.clear();
          for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p) {
            const int64_t q = groups.order[p], sq = s0 + q;
            const T_* g = gyd + (t0 + q / k) * Dd;
            slots.push_back(g);
            dots(g, factor.data(), rd, dots_i.data(), Dd);
            T_ dw = 0;
            for (int64_t i = 0; i < rd; ++i) {
              gzd_block[q * rd + i] = w[sq] * T_(sd) * dots_i[i];
              dw += zdp[sq * rd + i] * dots_i[i];
            }
            dwp[sq] += T_(sd) * dw;
          }
          c.resize(slots.size());
          for (int64_t i = 0; i < rd; ++i) {
            for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p) {
              const int64_t sq = s0 + groups.order[p];
              c[p - groups.start[gi]] = w[sq] * T_(sd) * zdp[sq * rd + i];
            }
            combine(c.data(), slots.data(), int64_t(slots.size()), abd + (e * rd + i) * Dd, Dd);
          }
        }
        for (Tile tile{0, 0}; tile.f0 < F; tile.f0 += kTile) {
          const int64_t f0 = tile.f0, len = tile.len = std::min(kTile, F - f0);
          add_low_rank(lu, groups, t0, k, F, tile, ub, U, factor, c);
          if (gated) add_low_rank(lg, groups, t0, k, F, tile, gb, G, factor, c);
          // dh = w gy + Σ_i ∂zd_i a_i (the down-LoRA's A rows of the slot's expert)
          factor.resize(rd + 1);
          c.resize(std::max<int64_t>(rd + 1, kBlock * k));
          for (int64_t gi = 0; gi < groups.size(); ++gi) {
            const int64_t e = groups.expert[gi];
            for (int64_t i = 0; i < rd; ++i) factor[i + 1] = da + (e * rd + i) * F + f0;
            for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p) {
              const int64_t q = groups.order[p];
              factor[0] = gy + (t0 + q / k) * F + f0;
              c[0] = w[s0 + q];
              for (int64_t i = 0; i < rd; ++i) c[i + 1] = gzd_block[q * rd + i];
              if (kp) {  // dh = w gy + m ⊙ Σ_i ∂zd_i a_i
                T_* dh = DH + q * kTile;
                const T_* m = kp + (s0 + q) * F + f0;
                const T_* g = factor[0];
                combine(c.data() + 1, factor.data() + 1, rd, dh, len, static_cast<const T_*>(nullptr), true);
                keep_then_add(dh, m, c[0], g, len);
              } else {
                combine(c.data(), factor.data(), rd + 1, DH + q * kTile, len, static_cast<const T_*>(nullptr), true);
              }
            }
          }
          for (int64_t q = 0; q < n; ++q) {
            const int64_t t = t0 + q / k, o = q * kTile;
            const T_* gq = gated ? G + o : nullptr;
            T_* dgbt = gated ? dgb + t * F + f0 : nullptr;
            if (q % k == 0) {
              MOLEFORGE_ACT_SWITCH(act, dwp[s0 + q] += slot_backward<A_, true>(U + o, gq, gy + t * F + f0, DH + o,
                                                                               H + o, DU + o, DG + o, dub + t * F + f0,
                                                                               dgbt, len))
            } else {
              MOLEFORGE_ACT_SWITCH(act, dwp[s0 + q] += slot_backward<A_, false>(U + o, gq, gy + t * F + f0, DH + o,
                                                                                H + o, DU + o, DG + o, dub + t * F + f0,
                                                                                dgbt, len))
            }
          }
          const T_* HD = kp ? HK : H;  // what the down LoRA read: h ⊙ m, or h
          for (int64_t q = 0; kp && q < n; ++q) dropped(H + q * kTile, kp + (s0 + q) * F + f0, HK + q * kTile, len);
          for (int64_t gi = 0; rd && gi < groups.size(); ++gi) {  // ∂a_i += Σ_q ∂zd_qi (h_q ⊙ m_q)
            const int64_t e = groups.expert[gi];
            slots.clear();
            for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p) slots.push_back(HD + groups.order[p] * kTile);
            for (int64_t i = 0; i < rd; ++i) {
              for (int64_t p = groups.start[gi]; p < groups.start[gi + 1]; ++p)
                c[p - groups.start[gi]] = gzd_block[groups.order[p] * rd + i];
              combine(c.data(), slots.data(), int64_t(slots.size()), ada + (e * rd + i) * F + f0, len);
            }
          }
          low_rank_grads(lu, groups, t0, k, E, F, tile, DU, dzu, abu, factor, slots, c);
          if (gated) low_rank_grads(lg, groups, t0, k, E, F, tile, DG, dzg, abg, factor, slots, c);
        }
      }
    });
  });
  return {d_w, d_ub, d_zu, summed_or_empty(acc_bu, ru), d_gb, d_zg, summed_or_empty(acc_bg, rg),
          summed_or_empty(acc_da, rd), summed_or_empty(acc_bd, rd)};
}

}  // namespace

TORCH_LIBRARY(moleforge_cpu, m) {
  m.def(
      "routed_ffn(Tensor index, Tensor weights, int activation, Tensor up_base, Tensor zu, Tensor bu, float su, "
      "Tensor gate_base, Tensor zg, Tensor bg, float sg, Tensor down_a, Tensor down_b, float sd, "
      "Tensor? down_keep=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "routed_ffn_backward(Tensor grad_y, Tensor grad_yd, Tensor index, Tensor weights, int activation, "
      "Tensor up_base, Tensor zu, Tensor bu, float su, Tensor gate_base, Tensor zg, Tensor bg, float sg, "
      "Tensor down_a, Tensor down_b, float sd, Tensor zd, Tensor? down_keep=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(moleforge_cpu, CPU, m) {
  m.impl("routed_ffn", &forward);
  m.impl("routed_ffn_backward", &backward);
}
