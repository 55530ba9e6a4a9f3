// DIN's local activation unit with PReLU (trainer/models/attention.py holds the math), fused over
// blocks of whole histories, forward and backward, on the CPU.
//
// Per behaviour i of batch row s (rows i of s are offsets[s] .. offsets[s+1]), hidden layers
// k = 1..L, PReLU with one α per channel:
//   x_i   = [h_i, h_i ⊙ c_s]                      (2D)
//   z1_i  = x_i·W1ᵀ + P_s                          (P: the candidate's part and b1, per batch row)
//   a_k   = prelu(z_k, α_k);  z_{k+1} = a_k·W_{k+1}ᵀ + b_{k+1}
//   w_i   = a_L·u + b_u                            (the behaviour's weight, a scalar)
//   out_s = Σ_i w_i·h_i
//
// The unfused unit writes [N, H] activations to memory and reads them back in every elementwise
// pass; here a block of about BLOCK behaviours goes through every layer while it is in cache,
// and only the pre-activations z_k (for the backward) and w are written. The backward recomputes
// x and a_k from h, c and the z_k, one block at a time. A block holds whole histories, so each
// batch row's sums (out, ∂P, ∂c) are written by one block; the weights' gradients are summed per
// block and the blocks added in order: results do not depend on the number of threads.
//
// Types: T (float or double) of h, c, P and the parameters, in which every elementwise step and
// sum is computed; S the matrix products' operands and the stored z_k: T, or bfloat16 (the
// mixed precision of autocast: products in bfloat16, z_k rounded to bfloat16 once, as the
// unfused unit under autocast rounds each layer's output).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;   // behaviours per block (whole histories are added until it is full)
constexpr int64_t ROW_PAD = 64;  // a block's matrices have a multiple of this many rows (zero-padded):
                                 // bfloat16 products of new shapes are slow the first time

template <typename T>
inline T widen(T v) { return v; }
inline float widen(at::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename S, typename T>
inline S narrow(T v) { return S(v); }
template <>
inline at::BFloat16 narrow<at::BFloat16, float>(float f) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return at::BFloat16(uint16_t(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}
template <typename T>
inline T prelu(T z, T a) { return std::max(z, T(0)) + a * std::min(z, T(0)); }

struct Blocks {
  std::vector<int64_t> first;  // batch row starting each block, then B
  int64_t rows = 0;            // the most behaviours in one block, rounded up to ROW_PAD
};

Blocks blocks_of(const int64_t* off, int64_t b) {
  Blocks bl;
  int64_t s = 0, most = 0;
  while (s < b) {
    bl.first.push_back(s);
    const int64_t start = off[s];
    while (s < b && (off[s] - start < BLOCK || s == bl.first.back())) ++s;
    most = std::max(most, off[s] - start);
  }
  bl.first.push_back(b);
  bl.rows = std::max<int64_t>(ROW_PAD, (most + ROW_PAD - 1) / ROW_PAD * ROW_PAD);
  return bl;
}

struct Layers {  // the parameters as the kernels read them
  std::vector<at::Tensor> wt;  // W_kᵀ [in, out] in S: the forward products
  std::vector<at::Tensor> w;   // W_k [out, in] in S: the backward's
  std::vector<const void*> bias, alpha;  // T*: b_k (k ≥ 2; b1 is in P), α_k
  std::vector<int64_t> width;  // H_k
};

template <typename S, typename T>
Layers layers_of(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                 const std::vector<at::Tensor>& alphas, at::ScalarType st) {
  Layers ly;
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor w = weights[k].detach();  // the products below take out= (no autograd)
    ly.w.push_back(w.to(st).contiguous());
    ly.wt.push_back(w.t().to(st).contiguous());
    ly.alpha.push_back(alphas[k].data_ptr<T>());
    ly.bias.push_back(k && k <= biases.size() ? biases[k - 1].data_ptr<T>() : nullptr);
    ly.width.push_back(weights[k].size(0));
  }
  return ly;
}

// x = [h, h ⊙ c_s] for the block's behaviours (rows past n stay zero)
template <typename S, typename T>
void fill_x(S* x, const T* h, const T* c, const int64_t* off, int64_t s0, int64_t s1, int64_t d) {
  const int64_t base = off[s0];
  for (int64_t s = s0; s < s1; ++s) {
    const T* cs = c + s * d;
    for (int64_t i = off[s]; i < off[s + 1]; ++i) {
      const T* hi = h + i * d;
      S* xi = x + (i - base) * 2 * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        xi[j] = narrow<S>(hi[j]);
        xi[d + j] = narrow<S>(hi[j] * cs[j]);
      }
    }
  }
}

template <typename S, typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& hist, const at::Tensor& cand, const at::Tensor& p,
                                     const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                     const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& alphas,
                                     const at::Tensor& u, const at::Tensor& bu, bool save, at::ScalarType st) {
  const int64_t n = hist.size(0), d = hist.size(1), b = cand.size(0);
  const int64_t nl = weights.size();
  const T* h = hist.data_ptr<T>();
  const T* c = cand.data_ptr<T>();
  const T* pp = p.data_ptr<T>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* uu = u.data_ptr<T>();
  const T bias_u = bu.data_ptr<T>()[0];
  const Layers ly = layers_of<S, T>(weights, biases, alphas, st);
  const Blocks bl = blocks_of(off, b);
  const int64_t nb = bl.first.size() - 1, m = bl.rows;

  at::Tensor out = at::zeros({b, d}, hist.options());
  at::Tensor wgt = at::empty({n}, hist.options());
  std::vector<at::Tensor> zs;
  for (int64_t k = 0; k < nl; ++k) zs.push_back(at::empty({save ? n : 0, ly.width[k]}, hist.options().dtype(st)));
  T* o = out.data_ptr<T>();
  T* wg = wgt.data_ptr<T>();

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const auto opt = hist.options().dtype(st);
    at::Tensor x = at::zeros({m, 2 * d}, opt);
    std::vector<at::Tensor> z, a;  // per layer [m, H_k]: the product, then the activation
    for (int64_t k = 0; k < nl; ++k) {
      z.push_back(at::empty({m, ly.width[k]}, opt));
      a.push_back(at::zeros({m, ly.width[k]}, opt));
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s0 = bl.first[blk], s1 = bl.first[blk + 1], base = off[s0];
      fill_x<S, T>(x.data_ptr<S>(), h, c, off, s0, s1, d);
      for (int64_t k = 0; k < nl; ++k) {
        const int64_t hk = ly.width[k];
        at::mm_out(z[k], k ? a[k - 1] : x, ly.wt[k]);
        const S* zk = z[k].data_ptr<S>();
        S* ak = a[k].data_ptr<S>();
        S* keep = save ? zs[k].data_ptr<S>() + base * hk : nullptr;
        const T* al = static_cast<const T*>(ly.alpha[k]);
        const T* bias = static_cast<const T*>(ly.bias[k]);
        for (int64_t s = s0; s < s1; ++s) {
          const T* add = k ? bias : pp + s * hk;  // layer 1: the batch row's P
          for (int64_t i = off[s] - base; i < off[s + 1] - base; ++i) {
#pragma omp simd
            for (int64_t j = 0; j < hk; ++j) {
              const S zr = narrow<S>(T(widen(zk[i * hk + j])) + add[j]);
              if (save) keep[i * hk + j] = zr;
              ak[i * hk + j] = narrow<S>(prelu(T(widen(zr)), al[j]));
            }
          }
        }
      }
      const S* al = a[nl - 1].data_ptr<S>();
      const int64_t hl = ly.width[nl - 1];
      for (int64_t s = s0; s < s1; ++s) {
        T* os = o + s * d;
        for (int64_t i = off[s]; i < off[s + 1]; ++i) {
          T acc = bias_u;
          const S* ai = al + (i - base) * hl;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < hl; ++j) acc += T(widen(ai[j])) * uu[j];
          wg[i] = acc;
          const T* hi = h + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) os[j] += acc * hi[j];
        }
      }
    }
  });
  std::vector<at::Tensor> res{out, wgt};
  res.insert(res.end(), zs.begin(), zs.end());
  return res;
}

// ∂L/∂z from ∂L/∂a (in place in da's buffer, as S) for the block's rows; α's and the bias's
// gradients added to ga, gb (T, [H])
template <typename S, typename T>
void through_prelu(S* da, const S* z, const T* al, int64_t rows, int64_t hk, T* ga, T* gb) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < hk; ++j) {
      const T g = widen(da[i * hk + j]), t = widen(z[i * hk + j]);
      const T dz = t > T(0) ? g : al[j] * g;
      ga[j] += t > T(0) ? T(0) : g * t;
      gb[j] += dz;
      da[i * hk + j] = narrow<S>(dz);
    }
  }
}

template <typename S, typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& gout, const at::Tensor& hist, const at::Tensor& cand,
                                      const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& alphas, const at::Tensor& u,
                                      const at::Tensor& wgt, const std::vector<at::Tensor>& zs, at::ScalarType st) {
  const int64_t n = hist.size(0), d = hist.size(1), b = cand.size(0);
  const int64_t nl = weights.size();
  const T* h = hist.data_ptr<T>();
  const T* c = cand.data_ptr<T>();
  const T* go = gout.data_ptr<T>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* uu = u.data_ptr<T>();
  const T* wg = wgt.data_ptr<T>();
  const Layers ly = layers_of<S, T>(weights, {}, alphas, st);  // biases are not read here
  const Blocks bl = blocks_of(off, b);
  const int64_t nb = bl.first.size() - 1, m = bl.rows;
  const int64_t hl = ly.width[nl - 1], h1 = ly.width[0];

  // every block's share of the parameters' gradients, added in block order at the end:
  // per layer W_k [H_k, in_k] (S: the block's product), α_k, b_k [H_k] (T), then u [H_L], b_u
  std::vector<at::Tensor> gw;
  for (int64_t k = 0; k < nl; ++k) gw.push_back(at::empty({nb, ly.width[k], k ? ly.width[k - 1] : 2 * d}, hist.options().dtype(st)));
  int64_t small = 0;
  for (int64_t k = 0; k < nl; ++k) small += 2 * ly.width[k];
  small += hl + 1;
  at::Tensor gsmall = at::zeros({nb, small}, hist.options());

  at::Tensor dh = at::empty({n, d}, hist.options());
  at::Tensor dc = at::zeros({b, d}, hist.options());
  at::Tensor dp = at::zeros({b, h1}, hist.options());
  T* gh = dh.data_ptr<T>();
  T* gc = dc.data_ptr<T>();
  T* gp = dp.data_ptr<T>();

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    const auto opt = hist.options().dtype(st);
    at::Tensor x = at::zeros({m, 2 * d}, opt), dx = at::empty({m, 2 * d}, opt);
    std::vector<at::Tensor> a, da;  // per layer [m, H_k]
    for (int64_t k = 0; k < nl; ++k) {
      a.push_back(at::zeros({m, ly.width[k]}, opt));
      da.push_back(at::zeros({m, ly.width[k]}, opt));
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s0 = bl.first[blk], s1 = bl.first[blk + 1], base = off[s0], rows = off[s1] - base;
      T* part = gsmall.data_ptr<T>() + blk * small;
      fill_x<S, T>(x.data_ptr<S>(), h, c, off, s0, s1, d);
      for (int64_t k = 0; k < nl; ++k) {  // a_k from the stored z_k
        const int64_t hk = ly.width[k];
        const S* zk = zs[k].data_ptr<S>() + base * hk;
        S* ak = a[k].data_ptr<S>();
        const T* al = static_cast<const T*>(ly.alpha[k]);
        for (int64_t i = 0; i < rows; ++i)
#pragma omp simd
          for (int64_t j = 0; j < hk; ++j) ak[i * hk + j] = narrow<S>(prelu(T(widen(zk[i * hk + j])), al[j]));
      }
      // the weighted sum: ∂w_i = <∂out_s, h_i>, ∂h_i = w_i·∂out_s; then ∂a_L = ∂w_i·u
      T* gu = part + small - hl - 1;
      const S* aL = a[nl - 1].data_ptr<S>();
      S* daL = da[nl - 1].data_ptr<S>();
      // ∂a_L's rows past this block's stay zero (the products below run over all m rows; the
      // other layers' ∂a are products of it, zero there too)
      std::memset(static_cast<void*>(daL + rows * hl), 0, sizeof(S) * (m - rows) * hl);
      for (int64_t s = s0; s < s1; ++s) {
        const T* gs = go + s * d;
        for (int64_t i = off[s]; i < off[s + 1]; ++i) {
          const T* hi = h + i * d;
          T* ghi = gh + i * d;
          T dw = 0;
#pragma omp simd reduction(+ : dw)
          for (int64_t j = 0; j < d; ++j) dw += gs[j] * hi[j];
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) ghi[j] = wg[i] * gs[j];
          const int64_t r = i - base;
#pragma omp simd
          for (int64_t j = 0; j < hl; ++j) {
            gu[j] += dw * T(widen(aL[r * hl + j]));
            daL[r * hl + j] = narrow<S>(dw * uu[j]);
          }
          gu[hl] += dw;
        }
      }
      // the layers, last to first
      T* ga = part;
      for (int64_t k = 0; k < nl; ++k) ga += 2 * ly.width[k];
      for (int64_t k = nl - 1; k >= 0; --k) {
        const int64_t hk = ly.width[k];
        ga -= 2 * hk;
        const S* zk = zs[k].data_ptr<S>() + base * hk;
        through_prelu<S, T>(da[k].data_ptr<S>(), zk, static_cast<const T*>(ly.alpha[k]), rows, hk, ga, ga + hk);
        const at::Tensor& below = k ? a[k - 1] : x;
        at::Tensor share = gw[k][blk];
        at::mm_out(share, da[k].t(), below);  // padded rows of da are zero
        at::mm_out(k ? da[k - 1] : dx, da[k], ly.w[k]);
      }
      // layer 1's input: ∂P_s = Σ ∂z1, ∂h_i += ∂x[:D] + ∂x[D:] ⊙ c_s, ∂c_s = Σ ∂x[D:] ⊙ h_i
      const S* dz1 = da[0].data_ptr<S>();
      const S* dxx = dx.data_ptr<S>();
      for (int64_t s = s0; s < s1; ++s) {
        const T* cs = c + s * d;
        T* gps = gp + s * h1;
        T* gcs = gc + s * d;
        for (int64_t i = off[s]; i < off[s + 1]; ++i) {
          const int64_t r = i - base;
#pragma omp simd
          for (int64_t j = 0; j < h1; ++j) gps[j] += widen(dz1[r * h1 + j]);
          const T* hi = h + i * d;
          T* ghi = gh + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            const T e = widen(dxx[r * 2 * d + j]), q = widen(dxx[r * 2 * d + d + j]);
            ghi[j] += e + q * cs[j];
            gcs[j] += q * hi[j];
          }
        }
      }
    }
  });

  // the blocks' shares, added in order
  std::vector<at::Tensor> res{dh, dc, dp};
  std::vector<at::Tensor> gws, gas, gbs;
  const T* gsm = gsmall.data_ptr<T>();
  int64_t col = 0;
  for (int64_t k = 0; k < nl; ++k) {
    const int64_t hk = ly.width[k], in = k ? ly.width[k - 1] : 2 * d;
    at::Tensor w = at::zeros({hk, in}, hist.options()), al = at::zeros({hk}, hist.options()),
               bias = at::zeros({hk}, hist.options());
    T* ww = w.data_ptr<T>();
    const S* src = gw[k].data_ptr<S>();
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t j = 0; j < hk * in; ++j) ww[j] += widen(src[blk * hk * in + j]);
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t j = 0; j < hk; ++j) {
        al.data_ptr<T>()[j] += gsm[blk * small + col + j];
        bias.data_ptr<T>()[j] += gsm[blk * small + col + hk + j];
      }
    col += 2 * hk;
    gws.push_back(w);
    gas.push_back(al);
    gbs.push_back(bias);
  }
  at::Tensor gu = at::zeros({hl}, hist.options()), gbu = at::zeros({1}, hist.options());
  for (int64_t blk = 0; blk < nb; ++blk) {
    for (int64_t j = 0; j < hl; ++j) gu.data_ptr<T>()[j] += gsm[blk * small + col + j];
    gbu.data_ptr<T>()[0] += gsm[blk * small + col + hl];
  }
  res.insert(res.end(), gws.begin(), gws.end());
  res.insert(res.end(), gbs.begin() + 1, gbs.end());  // b1's gradient reaches P, not here
  res.insert(res.end(), gas.begin(), gas.end());
  res.push_back(gu);
  res.push_back(gbu);
  (void)n;
  return res;
}

void check(const at::Tensor& hist, const at::Tensor& cand, const at::Tensor& offsets,
           const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& alphas, const at::Tensor& u) {
  TORCH_CHECK(hist.device().is_cpu() && hist.dim() == 2 && hist.is_contiguous(), "attention: hist must be a contiguous [N, D] CPU tensor");
  TORCH_CHECK(hist.scalar_type() == at::kFloat || hist.scalar_type() == at::kDouble, "attention: hist must be float or double");
  TORCH_CHECK(cand.dim() == 2 && cand.size(1) == hist.size(1) && cand.is_contiguous() && cand.scalar_type() == hist.scalar_type(),
              "attention: cand must be [B, D] of hist's type");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == cand.size(0) + 1 && offsets.is_contiguous(),
              "attention: offsets must be int64 [B + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  bool ok = off[0] == 0 && off[cand.size(0)] == hist.size(0);
  for (int64_t s = 0; s < cand.size(0); ++s) ok &= off[s] <= off[s + 1];
  TORCH_CHECK(ok, "attention: offsets must rise from 0 to N");
  TORCH_CHECK(!weights.empty() && weights.size() == alphas.size(), "attention: one alpha per layer, at least one layer");
  int64_t in = 2 * hist.size(1);
  for (size_t k = 0; k < weights.size(); ++k) {
    TORCH_CHECK(weights[k].dim() == 2 && weights[k].size(1) == in && weights[k].scalar_type() == hist.scalar_type(),
                "attention: layer ", k + 1, " weight must be [H, ", in, "] of hist's type");
    TORCH_CHECK(alphas[k].dim() == 1 && alphas[k].size(0) == weights[k].size(0) && alphas[k].is_contiguous(),
                "attention: layer ", k + 1, " alpha must be [H]");
    in = weights[k].size(0);
  }
  TORCH_CHECK(u.dim() == 1 && u.size(0) == in && u.is_contiguous(), "attention: u must be [H_L]");
}

std::vector<at::Tensor> forward(const at::Tensor& hist, const at::Tensor& cand, const at::Tensor& p,
                                const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& alphas,
                                const at::Tensor& u, const at::Tensor& bu, bool save, bool bf16) {
  at::NoGradGuard no_grad;
  check(hist, cand, offsets, weights, alphas, u);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == cand.size(0) && p.size(1) == weights[0].size(0) && p.is_contiguous(),
              "attention: P must be [B, H1]");
  TORCH_CHECK(biases.size() + 1 == weights.size(), "attention: one bias per layer after the first");
  if (hist.scalar_type() == at::kDouble) {
    TORCH_CHECK(!bf16, "attention: bfloat16 products take float inputs");
    return forward_impl<double, double>(hist, cand, p, offsets, weights, biases, alphas, u, bu, save, at::kDouble);
  }
  if (bf16) return forward_impl<at::BFloat16, float>(hist, cand, p, offsets, weights, biases, alphas, u, bu, save, at::kBFloat16);
  return forward_impl<float, float>(hist, cand, p, offsets, weights, biases, alphas, u, bu, save, at::kFloat);
}

std::vector<at::Tensor> backward(const at::Tensor& gout, const at::Tensor& hist, const at::Tensor& cand,
                                 const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                 const std::vector<at::Tensor>& alphas, const at::Tensor& u, const at::Tensor& wgt,
                                 const std::vector<at::Tensor>& zs, bool bf16) {
  at::NoGradGuard no_grad;
  check(hist, cand, offsets, weights, alphas, u);
  TORCH_CHECK(gout.sizes() == cand.sizes() && gout.is_contiguous() && gout.scalar_type() == hist.scalar_type(),
              "attention: the output's gradient must be [B, D] of hist's type");
  TORCH_CHECK(zs.size() == weights.size(), "attention: one stored z per layer");
  for (size_t k = 0; k < zs.size(); ++k)
    TORCH_CHECK(zs[k].dim() == 2 && zs[k].size(0) == hist.size(0) && zs[k].size(1) == weights[k].size(0) && zs[k].is_contiguous(),
                "attention: the stored z of layer ", k + 1, " must be [N, H]");
  if (hist.scalar_type() == at::kDouble)
    return backward_impl<double, double>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kDouble);
  if (bf16) return backward_impl<at::BFloat16, float>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kBFloat16);
  return backward_impl<float, float>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kFloat);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "DIN's activation unit with PReLU, fused: out [B, D], the weights [N], the z_k");
  m.def("backward", &backward, "its gradients: h, c, P, the W_k, the b_k (k >= 2), the alpha_k, u, b_u");
}
