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
// at run time), without the dispatcher's cost per call, or ATen's mm where those are absent. Where
// the CPU has AVX512-BF16, every bfloat16 product runs on our own loops of its pair instruction
// instead (dp_gemm; on the AMD EPYC of docs/results.md MKL's bfloat16 GEMM made the unit slower
// than the unfused one).
//
// Layer 1 folded (S = T): x_i·W1ᵀ = h_i·M_s with M_s[j, k] = W1[k, j] + c_s[j]·W1[k, D + j], one
// [D, H1] matrix per batch row, so layer 1 multiplies D columns instead of 2D, forward and
// backward (∂W1 from G_s = Σ_i h_iᵀ·∂z1_i, ∂h_i = ∂z1_i·M_sᵀ, ∂c_s from G_s). A batch row's
// products (about 50 behaviours) are too small for a BLAS call each: small_gemm keeps 4 rows by up
// to 80 columns in registers (float with AVX-512), else leaves the loop to the vectorizer. Under
// bfloat16 the same with pair products where the CPU has AVX512-BF16; without them the block
// products of x stay.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/extension.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 256;  // behaviours per block (whole histories are added until it is full)
constexpr int64_t ROW_PAD = 16;  // per-thread buffers hold a multiple of this many rows (products use a block's own)
constexpr int64_t PARTS = 32;    // the backward sums the weights' gradients in this many parts of consecutive blocks

using dinrec::narrow;
using dinrec::widen;

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
// A tile of C in registers: R rows (at most 4) by NV vectors of 16 floats (at most 5, 80 columns),
// the last vector's columns masked by `last`. Shared by the float loops here and the bfloat16 pair
// loops below.
template <int R, int NV>
inline void zero_tile(__m512 (&acc)[R][NV]) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 5
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
}

// C's tile = acc, or += acc with `add`
template <int R, int NV>
inline void store_tile(__m512 (&acc)[R][NV], float* __restrict c, int64_t ldc, __mmask16 last, bool add) {
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

// the lanes of 16 floats that `left` values fill (all 16 from 16 on, none from 0 down)
inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
}

template <int N>
using Const = std::integral_constant<int, N>;

// C [m, n] tile by tile: tile(i, j0, R, NV, last) for the tile at row i and column j0, R and NV as
// Const<…> (the loops' template arguments)
template <typename Tile>
void each_tile(int64_t m, int64_t n, Tile&& tile) {
  for (int64_t j0 = 0; j0 < n; j0 += 80) {
    const int64_t cols = std::min<int64_t>(80, n - j0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = tail16(cols - 16 * (nv - 1));  // the last vector's columns
    for (int64_t i = 0; i < m; i += 4) {
      auto with_rows = [&](auto r) {
        switch (nv) {
          case 1: return tile(i, j0, r, Const<1>{}, last);
          case 2: return tile(i, j0, r, Const<2>{}, last);
          case 3: return tile(i, j0, r, Const<3>{}, last);
          case 4: return tile(i, j0, r, Const<4>{}, last);
          default: return tile(i, j0, r, Const<5>{}, last);
        }
      };
      switch (std::min<int64_t>(4, m - i)) {
        case 4: with_rows(Const<4>{}); break;
        case 3: with_rows(Const<3>{}); break;
        case 2: with_rows(Const<2>{}); break;
        default: with_rows(Const<1>{}); break;
      }
    }
  }
}

template <bool TA, int R, int NV>
void micro_f32(int64_t k, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
               float* __restrict c, int64_t ldc, __mmask16 last, bool add) {
  __m512 acc[R][NV];
  zero_tile<R, NV>(acc);
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
  store_tile<R, NV>(acc, c, ldc, last, add);
}

template <bool TA>
void small_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool add) {
  each_tile(m, n, [&](int64_t i, int64_t j0, auto r, auto v, __mmask16 last) {
    micro_f32<TA, decltype(r)::value, decltype(v)::value>(k, TA ? a + i : a + i * lda, lda, b + j0, ldb,
                                                          c + i * ldc + j0, ldc, last, add);
  });
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

// ∂W1 and ∂c of one batch row's folded layer 1 from G = hᵀ·∂z1 ([D, H1]):
// ∂W1[k, j] += G[j, k], ∂W1[k, D + j] += c[j]·G[j, k]; ∂c[j] += Σ_k G[j, k]·W1[k, D + j]
template <typename T>
void fold_grads(const T* __restrict w1, const T* __restrict c, const T* __restrict g, int64_t d, int64_t h1,
                T* __restrict gw, T* __restrict gc) {
  for (int64_t k = 0; k < h1; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const T gjk = g[j * h1 + k];
      gw[k * 2 * d + j] += gjk;
      gw[k * 2 * d + d + j] += c[j] * gjk;
      gc[j] += gjk * w1[k * 2 * d + d + j];
    }
  }
}

// ∂P += Σ_i ∂z1_i
template <typename S, typename T>
void sum_rows(const S* __restrict dz, int64_t n, int64_t h1, T* __restrict gp) {
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t k = 0; k < h1; ++k) gp[k] += widen(dz[i * h1 + k]);
}

// the backward of one batch row's folded layer 1, given ∂z1 [n, H1]: G = hᵀ·∂z1, ∂W1 and ∂c from
// G, ∂h += ∂z1·Mᵀ, ∂P += Σ_i ∂z1_i
template <typename T>
void fold_back(const T* __restrict w1, const T* __restrict h, const T* __restrict c, const T* __restrict dz,
               int64_t n, int64_t d, int64_t h1, T* __restrict g, T* __restrict mt, T* __restrict gw,
               T* __restrict gh, T* __restrict gc, T* __restrict gp) {
  small_gemm<T>(true, d, h1, n, h, d, dz, h1, g, h1, false);
  fold_grads<T>(w1, c, g, d, h1, gw, gc);
  fold_m<T>(w1, c, nullptr, mt, d, h1);
  small_gemm<T>(false, n, d, h1, dz, h1, mt, d, gh, d, true);
  sum_rows<T, T>(dz, n, h1, gp);
}

// ---- bfloat16 pair products (AVX512-BF16) ---------------------------------------------------------
//
// vdpbf16ps multiplies pairs of bfloat16 and adds both products to one float lane, twice the
// multiply-adds of a float FMA per instruction. C[i, j] (= or +=) Σ_p A(i, p)·B(p, j) over the
// pairs p of the inner dimension k: A(i, p) the two values at a + i·ra + p·pa (a row-major A:
// ra = lda, pa = 2; A packed by pack_pairs: ra = 2, pa = 2·ldo); B packed by pack_pairs, pair p
// of column j at b + p·2·ldb + 2·j. With k odd the last pair's second value is taken as zero.
// Used where the CPU has AVX512-BF16 (HAVE_DP), for every product of the unit under bfloat16.

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

#if defined(__AVX512BF16__)
constexpr bool HAVE_DP = true;

inline __m256i bf16x16(const float* p, __mmask16 mk) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, p));  // round to nearest even
}
inline __m256i bf16x16(const at::BFloat16* p, __mmask16 mk) { return _mm256_maskz_loadu_epi16(mk, p); }

// out[p·2·ldo + 2·j + e] = x[(2p + e)·ldx + j] in bfloat16, for the k rows and n columns of x;
// a missing last row (k odd) and the columns n .. ldo (a multiple of 16) are zero
template <typename X>
void pack_pairs(const X* __restrict x, int64_t k, int64_t n, int64_t ldx, at::BFloat16* __restrict out, int64_t ldo) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const X* r0 = x + 2 * p * ldx;
    const bool second = 2 * p + 1 < k;
    at::BFloat16* o = out + p * 2 * ldo;
    for (int64_t j = 0; j < ldo; j += 16) {
      const __mmask16 mk = tail16(n - j);
      const __m256i v0 = bf16x16(r0 + j, mk);
      const __m256i v1 = second ? bf16x16(r0 + ldx + j, mk) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
      _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// out[i] = x[i] in bfloat16, i < n
void to_bf16(const float* __restrict x, int64_t n, at::BFloat16* __restrict out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail16(n - i);
    _mm256_mask_storeu_epi16(out + i, mk, bf16x16(x + i, mk));
  }
}

template <int R, int NV>
void micro_dp(int64_t k, const at::BFloat16* a, int64_t ra, int64_t pa, const at::BFloat16* b, int64_t ldb2,
              float* __restrict c, int64_t ldc, __mmask16 last, bool add) {
  __m512 acc[R][NV];
  zero_tile<R, NV>(acc);
  auto step = [&](int64_t p, auto pair_of) {
    const at::BFloat16* bp = b + p * ldb2;
    __m512bh bv[NV];
#pragma GCC unroll 5
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bp + 32 * v);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair_of(a + r * ra + p * pa));
#pragma GCC unroll 5
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  };
  for (int64_t p = 0; p < k / 2; ++p)
    step(p, [](const at::BFloat16* q) {
      int32_t v;
      std::memcpy(&v, q, 4);
      return v;
    });
  if (k % 2)  // the last pair has one value (read no further)
    step(k / 2, [](const at::BFloat16* q) { return int32_t(q->x); });
  store_tile<R, NV>(acc, c, ldc, last, add);
}

// C[m, n] (= or +=) A·B over an inner dimension k, A and B as above (ldb: B's padded columns)
void dp_gemm(int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t ra, int64_t pa, const at::BFloat16* b,
             int64_t ldb, float* c, int64_t ldc, bool add) {
  each_tile(m, n, [&](int64_t i, int64_t j0, auto r, auto v, __mmask16 last) {
    micro_dp<decltype(r)::value, decltype(v)::value>(k, a + i * ra, ra, pa, b + 2 * j0, 2 * ldb, c + i * ldc + j0, ldc,
                                                     last, add);
  });
}
#else
constexpr bool HAVE_DP = false;  // never called: the bfloat16 unit keeps its block products
template <typename X>
void pack_pairs(const X*, int64_t, int64_t, int64_t, at::BFloat16*, int64_t) { TORCH_CHECK(false, "attention: no AVX512-BF16"); }
inline void to_bf16(const float*, int64_t, at::BFloat16*) { TORCH_CHECK(false, "attention: no AVX512-BF16"); }
inline void dp_gemm(int64_t, int64_t, int64_t, const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, int64_t, float*,
                    int64_t, bool) { TORCH_CHECK(false, "attention: no AVX512-BF16"); }
#endif

// packed B operands of the weights, per layer k ≥ 2 (index k - 1): W_kᵀ for the forward (z = a·W_kᵀ),
// W_k for the backward (∂a = ∂z·W_k)
std::vector<std::vector<at::BFloat16>> packed_weights(const std::vector<at::Tensor>& weights, bool transposed) {
  std::vector<std::vector<at::BFloat16>> out(weights.size());
  for (size_t k = 1; k < weights.size(); ++k) {
    const at::Tensor w = (transposed ? weights[k].t() : weights[k]).to(at::kFloat).contiguous();
    const int64_t rows = w.size(0), cols = w.size(1);
    out[k].resize((rows + 1) / 2 * 2 * pad16(cols));
    pack_pairs<float>(w.data_ptr<float>(), rows, cols, cols, out[k].data(), pad16(cols));
  }
  return out;
}

// fold_back with bfloat16 pair products (dz: the batch row's ∂z1 in bfloat16, n rows); pa holds
// max(n + 1, H1 + 1)·pad16(D) values, pb (n + 1)·pad16(H1)
void fold_back_dp(const float* __restrict w1, const float* __restrict h, const float* __restrict c,
                  const at::BFloat16* __restrict dz, int64_t n, int64_t d, int64_t h1, float* __restrict g,
                  float* __restrict mt, at::BFloat16* __restrict pa, at::BFloat16* __restrict pb,
                  float* __restrict gw, float* __restrict gh, float* __restrict gc, float* __restrict gp) {
  const int64_t ld = pad16(d), lh = pad16(h1);
  pack_pairs<float>(h, n, d, d, pa, ld);  // G = hᵀ·∂z1: pairs of behaviours on both sides
  pack_pairs<at::BFloat16>(dz, n, h1, h1, pb, lh);
  dp_gemm(d, h1, n, pa, 2, 2 * ld, pb, lh, g, h1, false);
  fold_grads<float>(w1, c, g, d, h1, gw, gc);
  fold_m<float>(w1, c, nullptr, mt, d, h1);
  pack_pairs<float>(mt, h1, d, d, pa, ld);  // ∂h += ∂z1·Mᵀ
  dp_gemm(n, d, h1, dz, h1, 2, pa, ld, gh, d, true);
  sum_rows<at::BFloat16, float>(dz, n, h1, gp);
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

#if defined(__AVX512BF16__)
// the same three steps with bfloat16 S, in vectors (the scalar rounding above does not vectorize):
// vcvtneps2bf16 rounds to nearest even, as narrow does
inline __m512 widen16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline __m256i round16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 prelu16(__m512 t, __m512 al) {
  const __m512 zero = _mm512_setzero_ps();
  return _mm512_add_ps(_mm512_max_ps(t, zero), _mm512_mul_ps(al, _mm512_min_ps(t, zero)));
}

template <>
void activate<at::BFloat16, float>(const float* __restrict zf, const float* __restrict add, const float* __restrict al,
                                   at::BFloat16* __restrict keep, at::BFloat16* __restrict a, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 mk = tail16(w - j);
      const __m256i zr = round16(_mm512_add_ps(_mm512_maskz_loadu_ps(mk, zf + i * w + j), _mm512_maskz_loadu_ps(mk, add + j)));
      if (keep) _mm256_mask_storeu_epi16(keep + i * w + j, mk, zr);
      _mm256_mask_storeu_epi16(a + i * w + j, mk, round16(prelu16(widen16(zr), _mm512_maskz_loadu_ps(mk, al + j))));
    }
}

template <>
void reactivate_rows<at::BFloat16, float>(const at::BFloat16* __restrict z, const float* __restrict al,
                                          at::BFloat16* __restrict a, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 mk = tail16(w - j);
      const __m512 t = widen16(_mm256_maskz_loadu_epi16(mk, z + i * w + j));
      _mm256_mask_storeu_epi16(a + i * w + j, mk, round16(prelu16(t, _mm512_maskz_loadu_ps(mk, al + j))));
    }
}

template <>
void through_prelu<at::BFloat16, float>(const float* __restrict da, const at::BFloat16* __restrict z,
                                        const float* __restrict al, at::BFloat16* __restrict dz, float* __restrict ga,
                                        float* __restrict gb, int64_t rows, int64_t w) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 mk = tail16(w - j);
      const __m512 g = _mm512_maskz_loadu_ps(mk, da + i * w + j);
      const __m512 t = widen16(_mm256_maskz_loadu_epi16(mk, z + i * w + j));
      const __mmask16 pos = _mm512_cmp_ps_mask(t, zero, _CMP_GT_OQ);
      const __m512 d = _mm512_mask_blend_ps(pos, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, al + j), g), g);
      const __m512 gt = _mm512_maskz_mul_ps(__mmask16(~pos), g, t);
      _mm512_mask_storeu_ps(ga + j, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, ga + j), gt));
      _mm512_mask_storeu_ps(gb + j, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, gb + j), d));
      _mm256_mask_storeu_epi16(dz + i * w + j, mk, round16(d));
    }
}
#endif

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
  at::Tensor w1;              // W1 in T (the folded layer 1 builds M_s from it)
  std::vector<const void*> bias, alpha;  // T*: b_k (k ≥ 2; b1 is in P), α_k
  std::vector<int64_t> width, in;  // H_k, in_k
  int64_t widest = 0;              // the widest layer input or output: the buffers' row width
};

template <typename S, typename T>
Layers layers_of(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                 const std::vector<at::Tensor>& alphas, at::ScalarType st) {
  Layers ly;
  ly.w1 = weights[0].detach().contiguous();
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

// every product in bfloat16 pairs (dp_gemm) where S is bfloat16 and the CPU has AVX512-BF16
template <typename S, typename T>
constexpr bool DP = HAVE_DP && std::is_same_v<S, at::BFloat16> && std::is_same_v<T, float>;
// layer 1 folded where the products are in T (small_gemm per batch row) or in bfloat16 pairs;
// under bfloat16 without AVX512-BF16 the block products of x = [h, h ⊙ c] stay
template <typename S, typename T>
constexpr bool FOLD = std::is_same_v<S, T> || DP<S, T>;

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

  const auto wtp = DP<S, T> ? packed_weights(weights, true) : std::vector<std::vector<at::BFloat16>>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    // per thread: x, then each layer's activation (S, the next product's operand), and one
    // product result (T); rows past a block's stay zero or stale: no real row reads them. With
    // DP: the block's h in bfloat16 and one batch row's M_s packed
    std::vector<S> x(FOLD<S, T> ? 0 : m * 2 * d, S(0)), act0(m * widest, S(0)), act1(m * widest, S(0));
    std::vector<T> zf(m * widest), mf(FOLD<S, T> ? d * ly.width[0] : 0);
    std::vector<at::BFloat16> hb(DP<S, T> ? m * d : 0), mp(DP<S, T> ? (d + 1) * pad16(ly.width[0]) : 0);
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
          if constexpr (DP<S, T>) to_bf16(h + base * d, rows * d, hb.data());
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t r = off[s] - base, len = off[s + 1] - off[s];
            fold_m<T>(ly.w1.data_ptr<T>(), c + s * d, mf.data(), nullptr, d, w);
            if constexpr (DP<S, T>) {
              pack_pairs<float>(mf.data(), d, w, w, mp.data(), pad16(w));
              dp_gemm(len, w, d, hb.data() + r * d, d, 2, mp.data(), pad16(w), zf.data() + r * w, w, false);
            } else {
              small_gemm<T>(false, len, w, d, h + off[s] * d, d, mf.data(), w, zf.data() + r * w, w, false);
            }
          }
        } else if constexpr (DP<S, T>) {
          dp_gemm(rows, w, ly.in[k], below, ly.in[k], 2, wtp[k].data(), pad16(w), zf.data(), w, false);
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

  const auto wp = DP<S, T> ? packed_weights(weights, false) : std::vector<std::vector<at::BFloat16>>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    // per thread: x and every layer's activation (S), ∂a (T, a product's result), ∂z (S)
    std::vector<S> x(FOLD<S, T> ? 0 : m * 2 * d, S(0)), dz(m * widest, S(0));
    std::vector<std::vector<S>> act(nl);
    for (int64_t k = 0; k < nl; ++k) act[k].assign(m * ly.width[k], S(0));
    std::vector<T> da(m * widest, T(0)), g(FOLD<S, T> ? d * w1 : 0), mt(FOLD<S, T> ? d * w1 : 0);
    // with DP: two products' operands packed in pairs (pack_pairs)
    const int64_t packed = DP<S, T> ? (std::max(m, widest) + 1) * pad16(widest) : 0;
    std::vector<at::BFloat16> pa(packed), pb(packed);
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
              for (int64_t s = s0; s < s1; ++s) {
                const int64_t r = off[s] - base, len = off[s + 1] - off[s];
                if constexpr (DP<S, T>)
                  fold_back_dp(ly.w1.data_ptr<T>(), h + off[s] * d, c + s * d, dz.data() + r * w, len, d, w, g.data(),
                               mt.data(), pa.data(), pb.data(), part + at_w[0], gh + off[s] * d, gc + s * d, gp + s * w);
                else
                  fold_back<T>(ly.w1.data_ptr<T>(), h + off[s] * d, c + s * d, dz.data() + r * w, len, d, w, g.data(),
                               mt.data(), part + at_w[0], gh + off[s] * d, gc + s * d, gp + s * w);
              }
              break;
            }
          }
          const S* below = k ? act[k - 1].data() : x.data();
          if constexpr (DP<S, T>) {  // ∂W_k += ∂zᵀ·below: pairs of behaviours on both sides; ∂below
            pack_pairs<S>(dz.data(), rows, w, w, pa.data(), pad16(w));
            pack_pairs<S>(below, rows, in, in, pb.data(), pad16(in));
            dp_gemm(w, in, rows, pa.data(), 2, 2 * pad16(w), pb.data(), pad16(in), part + at_w[k], in, !opens);
            dp_gemm(rows, in, w, dz.data(), w, 2, wp[k].data(), pad16(in), da.data(), in, false);
          } else {
            gemm<S, T>(true, false, w, in, rows, dz.data(), w, below, in, part + at_w[k], in, !opens);  // ∂W_k += ∂zᵀ·below
            gemm<S, T>(false, false, rows, in, w, dz.data(), w, ly.w[k].data_ptr<S>(), in, da.data(), in);  // ∂below
          }
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
  m.def("pairs", [] { return HAVE_DP; }, "whether bfloat16 products run as AVX512-BF16 pair products (built for this CPU)");
}
