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
// batch row's sums (out, ∂P, ∂c) are written by one block. The weights' gradients are summed over
// PARTS fixed runs of consecutive blocks (each run in block order, on one thread), and the runs
// added in order: results do not depend on the number of threads.
//
// Types: T (float or double) of h, c, P, the parameters, the products' results and every
// elementwise step and sum; S the products' operands and the stored z_k: T, or bfloat16 (the
// mixed precision of autocast: operands in bfloat16, products accumulated in float, z_k rounded
// to bfloat16 once).
//
// The products are many small ones (a block's rows by at most a few hundred columns), each on one
// thread: they call the BLAS that torch links (MKL's sgemm_/dgemm_/cblas_gemm_bf16bf16f32, found
// at run time), without the dispatcher's cost per call, or ATen's mm where those are absent.
//
// Layer 1 folded (S = T): x_i·W1ᵀ = h_i·M_s with M_s[j, k] = W1[k, j] + c_s[j]·W1[k, D + j], one
// [D, H1] matrix per batch row, so layer 1 multiplies D columns instead of 2D, forward and
// backward (∂W1 from G_s = Σ_i h_iᵀ·∂z1_i, ∂h_i = ∂z1_i·M_sᵀ, ∂c_s from G_s). A batch row's
// products (about 50 behaviours) are too small for a BLAS call each: small_gemm keeps 4 rows by up
// to 80 columns in registers (float with AVX-512), else leaves the loop to the vectorizer. Under
// bfloat16 the block products of x stay.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;  // behaviours per block (whole histories are added until it is full)
constexpr int64_t ROW_PAD = 16;  // per-thread buffers hold a multiple of this many rows (products use a block's own)
constexpr int64_t PARTS = 32;    // the backward sums the weights' gradients in this many parts of consecutive blocks

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

// ---- products: C[M, N] (row-major, T) = op(A)·op(B) with A, B row-major in S ------------------

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
using bgemm_t = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float, float*,
                         int);

struct Blas {
  sgemm_t s = nullptr;
  dgemm_t d = nullptr;
  bgemm_t b = nullptr;
};

const Blas& blas() {
  static const Blas found = [] {
    Blas f;
    f.s = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    f.d = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
    f.b = reinterpret_cast<bgemm_t>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
    return f;
  }();
  return found;
}

// row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the Fortran call with the
// operands swapped
template <typename T, typename F>
bool fortran_gemm(F fn, bool ta, bool tb, int m, int n, int k, const T* a, int lda, const T* b, int ldb, T* c,
                  int ldc, bool add) {
  if (fn == nullptr) return false;
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const T one = 1, beta = add ? 1 : 0;
  fn(&tB, &tA, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
  return true;
}

// C = op(A)·op(B), or C += op(A)·op(B) with `add`
template <typename S, typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb, T* c,
          int64_t ldc, bool add = false) {
  const Blas& f = blas();
  bool done = false;
  if constexpr (std::is_same_v<S, float>) {
    done = fortran_gemm<float>(f.s, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, add);
  } else if constexpr (std::is_same_v<S, double>) {
    done = fortran_gemm<double>(f.d, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, add);
  } else {
    if (f.b != nullptr) {  // CblasRowMajor 101, CblasNoTrans 111, CblasTrans 112
      f.b(101, ta ? 112 : 111, tb ? 112 : 111, m, n, k, 1.0f, reinterpret_cast<const uint16_t*>(a), lda,
          reinterpret_cast<const uint16_t*>(b), ldb, add ? 1.0f : 0.0f, c, ldc);
      done = true;
    }
  }
  if (done) return;
  const auto st = c10::CppTypeToScalarType<S>::value;
  at::Tensor A = at::from_blob(const_cast<S*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, at::dtype(st));
  at::Tensor B = at::from_blob(const_cast<S*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, at::dtype(st));
  at::Tensor C = at::mm(ta ? A.t() : A, tb ? B.t() : B);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, at::dtype(c10::CppTypeToScalarType<T>::value));
  if (add) out.add_(C); else out.copy_(C);
}

// ---- small products of one batch row (layer 1 with the candidate folded in) ----------------------
//
// C[m, n] (= or +=) op(A)·B, row-major, op(A)[i, kk] = ta ? a[kk·lda + i] : a[i·lda + kk]. A batch
// row's behaviours (about 50) by a [D, H1] matrix are too small for a BLAS call each; these loops
// keep 4 rows × up to 80 columns of C in registers (float with AVX-512), or let the compiler
// vectorize over the columns (double, or a CPU without AVX-512).

#if defined(__AVX512F__)
template <bool TA, int R, int NV>
void micro_f32(int64_t k, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
               float* __restrict c, int64_t ldc, __mmask16 last, bool add) {
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 5
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb;
    __m512 bv[NV];
#pragma GCC unroll 5
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(TA ? a[kk * lda + r] : a[r * lda + kk]);
#pragma GCC unroll 5
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 5
    for (int v = 0; v < NV; ++v) {
      float* out = c + r * ldc + 16 * v;
      const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
      const __m512 sum = add ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), acc[r][v]) : acc[r][v];
      _mm512_mask_storeu_ps(out, mask, sum);
    }
}

template <bool TA, int R>
void micro_rows_f32(int nv, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                    int64_t ldc, __mmask16 last, bool add) {
  switch (nv) {
    case 1: return micro_f32<TA, R, 1>(k, a, lda, b, ldb, c, ldc, last, add);
    case 2: return micro_f32<TA, R, 2>(k, a, lda, b, ldb, c, ldc, last, add);
    case 3: return micro_f32<TA, R, 3>(k, a, lda, b, ldb, c, ldc, last, add);
    case 4: return micro_f32<TA, R, 4>(k, a, lda, b, ldb, c, ldc, last, add);
    default: return micro_f32<TA, R, 5>(k, a, lda, b, ldb, c, ldc, last, add);
  }
}

template <bool TA>
void small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool add) {
  for (int64_t j0 = 0; j0 < n; j0 += 80) {
    const int64_t cols = std::min<int64_t>(80, n - j0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = cols % 16 ? __mmask16((1u << (cols % 16)) - 1) : __mmask16(0xFFFF);
    for (int64_t i = 0; i < m; i += 4) {
      const float* ai = TA ? a + i : a + i * lda;
      float* ci = c + i * ldc + j0;
      switch (std::min<int64_t>(4, m - i)) {
        case 4: micro_rows_f32<TA, 4>(nv, k, ai, lda, b + j0, ldb, ci, ldc, last, add); break;
        case 3: micro_rows_f32<TA, 3>(nv, k, ai, lda, b + j0, ldb, ci, ldc, last, add); break;
        case 2: micro_rows_f32<TA, 2>(nv, k, ai, lda, b + j0, ldb, ci, ldc, last, add); break;
        default: micro_rows_f32<TA, 1>(nv, k, ai, lda, b + j0, ldb, ci, ldc, last, add); break;
      }
    }
  }
}
#endif

template <typename T>
void small_gemm(bool ta, int64_t m, int64_t n, int64_t k, const T* __restrict a, int64_t lda, const T* __restrict b,
                int64_t ldb, T* __restrict c, int64_t ldc, bool add) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (ta) small_gemm_f32<true>(m, n, k, a, lda, b, ldb, c, ldc, add);
    else small_gemm_f32<false>(m, n, k, a, lda, b, ldb, c, ldc, add);
    return;
  }
#endif
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (!add) std::fill(ci, ci + n, T(0));
    for (int64_t kk = 0; kk < k; ++kk) {
      const T av = ta ? a[kk * lda + i] : a[i * lda + kk];
      const T* bk = b + kk * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += av * bk[j];
    }
  }
}

// layer 1 of batch row s with its candidate folded in: [h, h ⊙ c]·W1ᵀ = h·M with
// M[j, k] = W1[k, j] + c[j]·W1[k, D + j] ([D, H1]), and Mt = Mᵀ ([H1, D]) for the backward
template <typename T>
void fold_m(const T* __restrict w1, const T* __restrict c, T* __restrict m, T* __restrict mt, int64_t d, int64_t h1) {
  for (int64_t k = 0; k < h1; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const T v = w1[k * 2 * d + j] + c[j] * w1[k * 2 * d + d + j];
      if (m) m[j * h1 + k] = v;
      if (mt) mt[k * d + j] = v;
    }
  }
}

// the backward of one batch row's folded layer 1, given ∂z1 [n, H1]: G = hᵀ·∂z1 ([D, H1]);
// ∂W1[k, j] += G[j, k], ∂W1[k, D + j] += c[j]·G[j, k]; ∂c[j] += Σ_k G[j, k]·W1[k, D + j];
// ∂h += ∂z1·Mᵀ; ∂P += Σ_i ∂z1_i
template <typename T>
void fold_back(const T* __restrict w1, const T* __restrict h, const T* __restrict c, const T* __restrict dz,
               int64_t n, int64_t d, int64_t h1, T* __restrict g, T* __restrict mt, T* __restrict gw,
               T* __restrict gh, T* __restrict gc, T* __restrict gp) {
  small_gemm<T>(true, d, h1, n, h, d, dz, h1, g, h1, false);
  for (int64_t k = 0; k < h1; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const T gjk = g[j * h1 + k];
      gw[k * 2 * d + j] += gjk;
      gw[k * 2 * d + d + j] += c[j] * gjk;
      gc[j] += gjk * w1[k * 2 * d + d + j];
    }
  }
  fold_m<T>(w1, c, nullptr, mt, d, h1);
  small_gemm<T>(false, n, d, h1, dz, h1, mt, d, gh, d, true);
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < h1; ++k) gp[k] += dz[i * h1 + k];
}

// ---- blocks -------------------------------------------------------------------------------------

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

// ---- elementwise steps (functions of their own with __restrict pointers: they vectorize) ---------

// x = [h, h ⊙ c] for `rows` behaviours of one batch row
template <typename S, typename T>
void fill_x(S* __restrict x, const T* __restrict h, const T* __restrict c, int64_t rows, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      x[i * 2 * d + j] = narrow<S>(h[i * d + j]);
      x[i * 2 * d + d + j] = narrow<S>(h[i * d + j] * c[j]);
    }
  }
}

// z = round_S(z + add) (stored in keep when given), a = prelu(z): `rows` rows of width w
template <typename S, typename T>
void activate(const T* __restrict zf, const T* __restrict add, const T* __restrict al, S* __restrict keep,
              S* __restrict a, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const S zr = narrow<S>(zf[i * w + j] + add[j]);
      if (keep) keep[i * w + j] = zr;
      const T t = widen(zr);
      a[i * w + j] = narrow<S>(std::max(t, T(0)) + al[j] * std::min(t, T(0)));
    }
  }
}

// a = prelu(z) from the stored z
template <typename S, typename T>
void reactivate_rows(const S* __restrict z, const T* __restrict al, S* __restrict a, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T t = widen(z[i * w + j]);
      a[i * w + j] = narrow<S>(std::max(t, T(0)) + al[j] * std::min(t, T(0)));
    }
  }
}

// dz = da·prelu'(z) (as S, for the products), and α's and the bias's gradients
template <typename S, typename T>
void through_prelu(const T* __restrict da, const S* __restrict z, const T* __restrict al, S* __restrict dz,
                   T* __restrict ga, T* __restrict gb, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const T g = da[i * w + j], t = widen(z[i * w + j]);
      const bool pos = t > T(0);
      const T d = pos ? g : al[j] * g;
      ga[j] += pos ? T(0) : g * t;
      gb[j] += d;
      dz[i * w + j] = narrow<S>(d);
    }
  }
}

// the weight of each behaviour, w_i = a_i·u + b_u, and out += Σ w_i·h_i (one batch row)
template <typename S, typename T>
void weigh(const S* __restrict a, const T* __restrict u, T bu, const T* __restrict h, T* __restrict wg,
           T* __restrict out, int64_t rows, int64_t w, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    T acc = bu;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < w; ++j) acc += T(widen(a[i * w + j])) * u[j];
    wg[i] = acc;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) out[j] += acc * h[i * d + j];
  }
}

// the backward of weigh for one batch row: ∂w_i = <g, h_i>, ∂h_i = w_i·g, ∂a_i = ∂w_i·u, u's and
// b_u's gradients
template <typename S, typename T>
void unweigh(const T* __restrict g, const T* __restrict h, const T* __restrict wg, const S* __restrict a,
             const T* __restrict u, T* __restrict gh, T* __restrict da, T* __restrict gu, int64_t rows, int64_t w,
             int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    T dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t j = 0; j < d; ++j) dw += g[j] * h[i * d + j];
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) gh[i * d + j] = wg[i] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      gu[j] += dw * T(widen(a[i * w + j]));
      da[i * w + j] = dw * u[j];
    }
    gu[w] += dw;
  }
}

// layer 1's input for one batch row: ∂P += Σ ∂z1, ∂h_i += ∂x[:D] + ∂x[D:] ⊙ c, ∂c += Σ ∂x[D:] ⊙ h_i
template <typename S, typename T>
void into_input(const S* __restrict dz, const T* __restrict dx, const T* __restrict h, const T* __restrict c,
                T* __restrict gp, T* __restrict gh, T* __restrict gc, int64_t rows, int64_t w, int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) gp[j] += widen(dz[i * w + j]);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const T e = dx[i * 2 * d + j], q = dx[i * 2 * d + d + j];
      gh[i * d + j] += e + q * c[j];
      gc[j] += q * h[i * d + j];
    }
  }
}

// ---- the op ---------------------------------------------------------------------------------------

struct Layers {  // the parameters as the kernels read them
  std::vector<at::Tensor> w;  // W_k [out, in] in S
  std::vector<const void*> bias, alpha;  // T*: b_k (k ≥ 2; b1 is in P), α_k
  std::vector<int64_t> width, in;  // H_k, in_k
  int64_t widest = 0;              // the widest layer input or output: the buffers' row width
};

template <typename S, typename T>
Layers layers_of(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                 const std::vector<at::Tensor>& alphas, at::ScalarType st) {
  Layers ly;
  for (size_t k = 0; k < weights.size(); ++k) {
    ly.w.push_back(weights[k].detach().to(st).contiguous());
    ly.alpha.push_back(alphas[k].data_ptr<T>());
    ly.bias.push_back(k && k <= biases.size() ? biases[k - 1].data_ptr<T>() : nullptr);
    ly.width.push_back(weights[k].size(0));
    ly.in.push_back(weights[k].size(1));
    ly.widest = std::max({ly.widest, weights[k].size(0), weights[k].size(1)});
  }
  return ly;
}

// layer 1 folded (small_gemm per batch row) where the products are in T; with bfloat16 operands
// the block products of [h, h ⊙ c] stay
template <typename S, typename T>
constexpr bool FOLD = std::is_same_v<S, T>;

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
  const int64_t widest = ly.widest;

  at::Tensor out = at::zeros({b, d}, hist.options());
  at::Tensor wgt = at::empty({n}, hist.options());
  std::vector<at::Tensor> zs;
  for (int64_t k = 0; k < nl; ++k) zs.push_back(at::empty({save ? n : 0, ly.width[k]}, hist.options().dtype(st)));
  T* o = out.data_ptr<T>();
  T* wg = wgt.data_ptr<T>();

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    // per thread: x, then each layer's activation (S, the next product's operand), and one
    // product result (T); rows past a block's stay zero or stale: no real row reads them
    std::vector<S> x(FOLD<S, T> ? 0 : m * 2 * d, S(0)), act0(m * widest, S(0)), act1(m * widest, S(0));
    std::vector<T> zf(m * widest), mf(FOLD<S, T> ? d * ly.width[0] : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s0 = bl.first[blk], s1 = bl.first[blk + 1], base = off[s0];
      const int64_t rows = off[s1] - base;
      if constexpr (!FOLD<S, T>)
        for (int64_t s = s0; s < s1; ++s)
          fill_x<S, T>(x.data() + (off[s] - base) * 2 * d, h + off[s] * d, c + s * d, off[s + 1] - off[s], d);
      const S* below = x.data();
      S* a = act0.data();
      for (int64_t k = 0; k < nl; ++k) {
        const int64_t w = ly.width[k];
        if (FOLD<S, T> && k == 0) {  // per batch row: h·M_s
          for (int64_t s = s0; s < s1; ++s) {
            fold_m<T>(ly.w[0].data_ptr<T>(), c + s * d, mf.data(), nullptr, d, w);
            small_gemm<T>(false, off[s + 1] - off[s], w, d, h + off[s] * d, d, mf.data(), w,
                          zf.data() + (off[s] - base) * w, w, false);
          }
        } else {
          gemm<S, T>(false, true, rows, w, ly.in[k], below, ly.in[k], ly.w[k].data_ptr<S>(), ly.in[k], zf.data(), w);
        }
        S* keep = save ? zs[k].data_ptr<S>() + base * w : nullptr;
        const T* al = static_cast<const T*>(ly.alpha[k]);
        if (k == 0) {  // P per batch row
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t r = off[s] - base;
            activate<S, T>(zf.data() + r * w, pp + s * w, al, keep ? keep + r * w : nullptr, a + r * w,
                           off[s + 1] - off[s], w);
          }
        } else {
          activate<S, T>(zf.data(), static_cast<const T*>(ly.bias[k]), al, keep, a, rows, w);
        }
        below = a;
        a = (a == act0.data()) ? act1.data() : act0.data();
      }
      const int64_t wl = ly.width[nl - 1];
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t r = off[s] - base;
        weigh<S, T>(below + r * wl, uu, bias_u, h + off[s] * d, wg + off[s], o + s * d, off[s + 1] - off[s], wl, d);
      }
    }
  });
  std::vector<at::Tensor> res{out, wgt};
  res.insert(res.end(), zs.begin(), zs.end());
  return res;
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
  const int64_t wl = ly.width[nl - 1], w1 = ly.width[0];
  const int64_t widest = ly.widest;

  // every part's share of the parameters' gradients (a part: a fixed run of consecutive blocks),
  // added in part order at the end: per layer W_k, then α_k and b_k of every layer, then u and b_u
  int64_t share = 0;
  std::vector<int64_t> at_w, at_a;
  for (int64_t k = 0; k < nl; ++k) {
    at_w.push_back(share);
    share += ly.width[k] * ly.in[k];
  }
  for (int64_t k = 0; k < nl; ++k) {
    at_a.push_back(share);
    share += 2 * ly.width[k];
  }
  const int64_t at_u = share;
  share += wl + 1;
  const int64_t at_small = at_a[0];  // α, b, u, b_u: summed elementwise, zeroed at a part's start
  const int64_t np = std::min(nb, PARTS);
  at::Tensor shares = at::empty({np, share}, hist.options());  // W_k's: the part's first product writes

  at::Tensor dh = at::empty({n, d}, hist.options());
  at::Tensor dc = at::zeros({b, d}, hist.options());
  at::Tensor dp = at::zeros({b, w1}, hist.options());
  T* gh = dh.data_ptr<T>();
  T* gc = dc.data_ptr<T>();
  T* gp = dp.data_ptr<T>();
  T* sh = shares.data_ptr<T>();

  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    // per thread: x and every layer's activation (S), ∂a (T, a product's result), ∂z (S)
    std::vector<S> x(FOLD<S, T> ? 0 : m * 2 * d, S(0)), dz(m * widest, S(0));
    std::vector<std::vector<S>> act(nl);
    for (int64_t k = 0; k < nl; ++k) act[k].assign(m * ly.width[k], S(0));
    std::vector<T> da(m * widest, T(0)), g(FOLD<S, T> ? d * w1 : 0), mt(FOLD<S, T> ? d * w1 : 0);
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t first = pi * nb / np, last = (pi + 1) * nb / np;  // the part's blocks
      T* part = sh + pi * share;
      std::fill(part + at_small, part + share, T(0));
      if constexpr (FOLD<S, T>) std::fill(part + at_w[0], part + at_w[0] + w1 * 2 * d, T(0));  // summed per row
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t s0 = bl.first[blk], s1 = bl.first[blk + 1], base = off[s0];
        const int64_t rows = off[s1] - base;
        const bool opens = blk == first;  // the part's first block: its products write, not add
        if constexpr (!FOLD<S, T>)
          for (int64_t s = s0; s < s1; ++s)
            fill_x<S, T>(x.data() + (off[s] - base) * 2 * d, h + off[s] * d, c + s * d, off[s + 1] - off[s], d);
        for (int64_t k = 0; k < nl; ++k)
          reactivate_rows<S, T>(zs[k].data_ptr<S>() + base * ly.width[k], static_cast<const T*>(ly.alpha[k]),
                                act[k].data(), rows, ly.width[k]);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t r = off[s] - base;
          unweigh<S, T>(go + s * d, h + off[s] * d, wg + off[s], act[nl - 1].data() + r * wl, uu, gh + off[s] * d,
                        da.data() + r * wl, part + at_u, off[s + 1] - off[s], wl, d);
        }
        for (int64_t k = nl - 1; k >= 0; --k) {
          const int64_t w = ly.width[k], in = ly.in[k];
          through_prelu<S, T>(da.data(), zs[k].data_ptr<S>() + base * w, static_cast<const T*>(ly.alpha[k]), dz.data(),
                              part + at_a[k], part + at_a[k] + w, rows, w);
          if constexpr (FOLD<S, T>) {
            if (k == 0) {
              for (int64_t s = s0; s < s1; ++s)
                fold_back<T>(ly.w[0].data_ptr<T>(), h + off[s] * d, c + s * d, dz.data() + (off[s] - base) * w,
                             off[s + 1] - off[s], d, w, g.data(), mt.data(), part + at_w[0], gh + off[s] * d,
                             gc + s * d, gp + s * w);
              break;
            }
          }
          const S* below = k ? act[k - 1].data() : x.data();
          gemm<S, T>(true, false, w, in, rows, dz.data(), w, below, in, part + at_w[k], in, !opens);  // ∂W_k += ∂zᵀ·below
          gemm<S, T>(false, false, rows, in, w, dz.data(), w, ly.w[k].data_ptr<S>(), in, da.data(), in);  // ∂below
        }
        if constexpr (!FOLD<S, T>) {  // da holds ∂x now
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t r = off[s] - base;
            into_input<S, T>(dz.data() + r * w1, da.data() + r * 2 * d, h + off[s] * d, c + s * d, gp + s * w1,
                             gh + off[s] * d, gc + s * d, off[s + 1] - off[s], w1, d);
          }
        }
      }
    }
  });

  // the parts' shares, added in order
  at::Tensor total = at::empty({share}, hist.options());
  T* tt = total.data_ptr<T>();
  at::parallel_for(0, share, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T acc = 0;
      for (int64_t pi = 0; pi < np; ++pi) acc += sh[pi * share + j];
      tt[j] = acc;
    }
  });
  std::vector<at::Tensor> res{dh, dc, dp};
  auto piece = [&](int64_t at, int64_t len) { return total.narrow(0, at, len).clone(); };  // no aliases
  for (int64_t k = 0; k < nl; ++k) res.push_back(piece(at_w[k], ly.width[k] * ly.in[k]).view({ly.width[k], ly.in[k]}));
  for (int64_t k = 1; k < nl; ++k) res.push_back(piece(at_a[k] + ly.width[k], ly.width[k]));  // b1's is P's
  for (int64_t k = 0; k < nl; ++k) res.push_back(piece(at_a[k], ly.width[k]));
  res.push_back(piece(at_u, wl));
  res.push_back(piece(at_u + wl, 1));
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
    TORCH_CHECK(alphas[k].dim() == 1 && alphas[k].size(0) == weights[k].size(0) && alphas[k].is_contiguous() &&
                    alphas[k].scalar_type() == hist.scalar_type(),
                "attention: layer ", k + 1, " alpha must be [H] of hist's type");
    in = weights[k].size(0);
  }
  TORCH_CHECK(u.dim() == 1 && u.size(0) == in && u.is_contiguous() && u.scalar_type() == hist.scalar_type(),
              "attention: u must be [H_L] of hist's type");
}

std::vector<at::Tensor> forward(const at::Tensor& hist, const at::Tensor& cand, const at::Tensor& p,
                                const at::Tensor& offsets, const std::vector<at::Tensor>& weights,
                                const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& alphas,
                                const at::Tensor& u, const at::Tensor& bu, bool save, bool bf16) {
  at::NoGradGuard no_grad;
  check(hist, cand, offsets, weights, alphas, u);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == cand.size(0) && p.size(1) == weights[0].size(0) && p.is_contiguous() &&
                  p.scalar_type() == hist.scalar_type(),
              "attention: P must be [B, H1] of hist's type");
  TORCH_CHECK(biases.size() + 1 == weights.size(), "attention: one bias per layer after the first");
  for (size_t k = 0; k < biases.size(); ++k)
    TORCH_CHECK(biases[k].dim() == 1 && biases[k].size(0) == weights[k + 1].size(0) && biases[k].is_contiguous() &&
                    biases[k].scalar_type() == hist.scalar_type(),
                "attention: layer ", k + 2, " bias must be [H] of hist's type");
  TORCH_CHECK(bu.numel() == 1 && bu.scalar_type() == hist.scalar_type(), "attention: b_u must be one value of hist's type");
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
  TORCH_CHECK(wgt.dim() == 1 && wgt.size(0) == hist.size(0) && wgt.is_contiguous() && wgt.scalar_type() == hist.scalar_type(),
              "attention: the weights must be [N] of hist's type");
  const auto st = bf16 ? at::kBFloat16 : hist.scalar_type();
  TORCH_CHECK(zs.size() == weights.size(), "attention: one stored z per layer");
  for (size_t k = 0; k < zs.size(); ++k)
    TORCH_CHECK(zs[k].dim() == 2 && zs[k].size(0) == hist.size(0) && zs[k].size(1) == weights[k].size(0) &&
                    zs[k].is_contiguous() && zs[k].scalar_type() == st,
                "attention: the stored z of layer ", k + 1, " must be [N, H] of the products' type");
  if (hist.scalar_type() == at::kDouble) {
    TORCH_CHECK(!bf16, "attention: bfloat16 products take float inputs");
    return backward_impl<double, double>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kDouble);
  }
  if (bf16) return backward_impl<at::BFloat16, float>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kBFloat16);
  return backward_impl<float, float>(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, at::kFloat);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "DIN's activation unit with PReLU, fused: out [B, D], the weights [N], the z_k");
  m.def("backward", &backward, "its gradients: h, c, P, the W_k, the b_k (k >= 2), the alpha_k, u, b_u");
  m.def("blas", [] {
    const Blas& f = blas();
    return std::vector<bool>{f.s != nullptr, f.d != nullptr, f.b != nullptr};
  }, "whether torch's BLAS exports sgemm_, dgemm_, cblas_gemm_bf16bf16f32 (else ATen's mm)");
}
