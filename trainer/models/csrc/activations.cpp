// DIN's activations on the CPU (trainer/models/activations.py holds the math and the same
// computation in ATen ops for other devices), parallel over blocks of rows of [N, H]:
//
// PReLU (Eq. 8), one α per channel: y = s > 0 ? s : α·s; one pass each way,
//   ∂L/∂s = g·(s > 0 ? 1 : α),  ∂L/∂α = Σ g·s·[s ≤ 0]
//
// Dice in training (Eq. 9, batch statistics): two passes each way,
//   c = s − μ,  r = sqrt(max(σ², ε²)),  d = r + ε,  p = σ(c / d),  y = s·(α + (1 − α)·p)
//   q = g·s·(1 − α)·p·(1 − p)
//   ∂L/∂s = g·(α + (1 − α)·p) + (q − mean(q) − c·mean(q·c)·[σ² ≥ ε²] / (d·r)) / d
//   ∂L/∂α = Σ g·s·(1 − p)
//
// s, y and g may be bfloat16 (under autocast) with α in float; everything is computed in α's
// type. Column sums are taken per block of BLOCK rows and the blocks added in order: the result
// does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 512;

using dinrec::narrow;
using dinrec::widen;

int64_t blocks(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

// row(i) for every row i < n, blocks of BLOCK rows in parallel
template <typename F>
void each_row(int64_t n, const F& row) {
  at::parallel_for(0, blocks(n), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * BLOCK; i < std::min(n, b1 * BLOCK); ++i) row(i);
  });
}

// k per-column sums [k, H] over the rows: row(i, sums) adds row i's terms to its block's sums
// (type T), and the blocks' sums are added in block order, in double
template <typename T, typename F>
std::vector<double> column_sums(int64_t n, int64_t h, int64_t k, const F& row) {
  const int64_t nb = blocks(n);
  std::vector<T> part(nb * k * h, T(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    // each block sums into a buffer of its own thread: blocks' sums side by side in `part` share
    // a cache line at their border, which the threads would pass back and forth on every row
    std::vector<T> sums(k * h);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(sums.begin(), sums.end(), T(0));
      for (int64_t i = b * BLOCK; i < std::min(n, (b + 1) * BLOCK); ++i) row(i, sums.data());
      std::copy(sums.begin(), sums.end(), part.begin() + b * k * h);
    }
  });
  std::vector<double> acc(k * h, 0.0);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < k * h; ++i) acc[i] += double(part[b * k * h + i]);
  return acc;
}

template <typename S, typename T>
std::vector<at::Tensor> dice_forward_impl(const at::Tensor& s_, const at::Tensor& alpha_, double eps) {
  const int64_t n = s_.size(0), h = s_.size(1);
  const S* s = s_.data_ptr<S>();
  const T* alpha = alpha_.data_ptr<T>();
  // the column sums of s − s[0] and of their squares (shifted by the first row: no cancellation)
  const auto acc = column_sums<T>(n, h, 2, [&](int64_t i, T* sums) {
    const S* row = s + i * h;
    T* sq = sums + h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T x = widen(row[j]) - widen(s[j]);
      sums[j] += x, sq[j] += x * x;
    }
  });
  auto opts = alpha_.options();
  at::Tensor mean_ = at::empty({h}, opts), var_ = at::empty({h}, opts), root_ = at::empty({h}, opts);
  T *mean = mean_.data_ptr<T>(), *var = var_.data_ptr<T>(), *root = root_.data_ptr<T>();
  for (int64_t j = 0; j < h; ++j) {
    const double m = acc[j] / double(n);
    mean[j] = T(m + double(widen(s[j])));
    var[j] = T(std::max(acc[h + j] / double(n) - m * m, 0.0));
    root[j] = std::sqrt(std::max(var[j], T(eps * eps)));
  }
  at::Tensor y_ = at::empty({n, h}, s_.options());
  S* y = y_.data_ptr<S>();
  each_row(n, [&](int64_t i) {
    const S* row = s + i * h;
    S* out = y + i * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T t = widen(row[j]);
      const T p = T(1) / (T(1) + std::exp(-(t - mean[j]) / (root[j] + T(eps))));
      out[j] = narrow<S, T>(t * (alpha[j] + (T(1) - alpha[j]) * p));
    }
  });
  return {y_, mean_, var_, root_};
}

template <typename S, typename T>
std::vector<at::Tensor> dice_backward_impl(const at::Tensor& g_, const at::Tensor& s_, const at::Tensor& alpha_,
                                           const at::Tensor& mean_, const at::Tensor& var_, const at::Tensor& root_,
                                           double eps) {
  const int64_t n = s_.size(0), h = s_.size(1);
  const S *g = g_.data_ptr<S>(), *s = s_.data_ptr<S>();
  const T *alpha = alpha_.data_ptr<T>(), *mean = mean_.data_ptr<T>(), *var = var_.data_ptr<T>();
  const T* root = root_.data_ptr<T>();
  // per column: Σ q, Σ q·c, Σ g·s·(1 − p)
  const auto acc = column_sums<T>(n, h, 3, [&](int64_t i, T* sums) {
    const S* row = s + i * h;
    const S* grow = g + i * h;
    T *sqc = sums + h, *sa = sums + 2 * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T t = widen(row[j]), c = t - mean[j];
      const T p = T(1) / (T(1) + std::exp(-c / (root[j] + T(eps))));
      const T gs = widen(grow[j]) * t;
      const T q = gs * (T(1) - alpha[j]) * p * (T(1) - p);
      sums[j] += q, sqc[j] += q * c, sa[j] += gs * (T(1) - p);
    }
  });
  std::vector<T> mq(h), through(h);
  at::Tensor dalpha_ = at::empty({h}, alpha_.options());
  T* dalpha = dalpha_.data_ptr<T>();
  for (int64_t j = 0; j < h; ++j) {
    const T d = root[j] + T(eps);
    mq[j] = T(acc[j] / double(n));
    through[j] = var[j] >= T(eps * eps) ? T(acc[h + j] / double(n)) / (d * root[j]) : T(0);
    dalpha[j] = T(acc[2 * h + j]);
  }
  at::Tensor ds_ = at::empty({n, h}, s_.options());
  S* ds = ds_.data_ptr<S>();
  each_row(n, [&](int64_t i) {
    const S* row = s + i * h;
    const S* grow = g + i * h;
    S* out = ds + i * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T t = widen(row[j]), c = t - mean[j], d = root[j] + T(eps);
      const T p = T(1) / (T(1) + std::exp(-c / d));
      const T gj = widen(grow[j]), q = gj * t * (T(1) - alpha[j]) * p * (T(1) - p);
      out[j] = narrow<S, T>(gj * (alpha[j] + (T(1) - alpha[j]) * p) + (q - mq[j] - c * through[j]) / d);
    }
  });
  return {ds_, dalpha_};
}

// PReLU's loops are branch-free (max/min, a 0/1 factor; exact): with -fopenmp, GCC compiled the
// same loops written with `?:` to code about 20 times slower
template <typename S, typename T>
at::Tensor prelu_forward_impl(const at::Tensor& s_, const at::Tensor& alpha_) {
  const int64_t n = s_.size(0), h = s_.size(1);
  const S* s = s_.data_ptr<S>();
  const T* alpha = alpha_.data_ptr<T>();
  at::Tensor y_ = at::empty({n, h}, s_.options());
  S* y = y_.data_ptr<S>();
  each_row(n, [&](int64_t i) {
    const S* row = s + i * h;
    S* out = y + i * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T t = widen(row[j]);
      out[j] = narrow<S, T>(std::max(t, T(0)) + alpha[j] * std::min(t, T(0)));
    }
  });
  return y_;
}

template <typename S, typename T>
std::vector<at::Tensor> prelu_backward_impl(const at::Tensor& g_, const at::Tensor& s_, const at::Tensor& alpha_) {
  const int64_t n = s_.size(0), h = s_.size(1);
  const S *g = g_.data_ptr<S>(), *s = s_.data_ptr<S>();
  const T* alpha = alpha_.data_ptr<T>();
  at::Tensor ds_ = at::empty({n, h}, s_.options());
  S* ds = ds_.data_ptr<S>();
  // one pass: ∂L/∂s written, Σ g·s·[s ≤ 0] summed
  const auto acc = column_sums<T>(n, h, 1, [&](int64_t i, T* sa) {
    const S* row = s + i * h;
    const S* grow = g + i * h;
    S* out = ds + i * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const T t = widen(row[j]), gj = widen(grow[j]);
      const T neg = T(t <= T(0)), slope = neg * alpha[j] + (T(1) - neg);  // exact: neg is 0 or 1
      out[j] = narrow<S, T>(gj * slope);
      sa[j] += neg * gj * t;
    }
  });
  at::Tensor dalpha_ = at::empty({h}, alpha_.options());
  T* dalpha = dalpha_.data_ptr<T>();
  for (int64_t j = 0; j < h; ++j) dalpha[j] = T(acc[j]);
  return {ds_, dalpha_};
}

void check(const at::Tensor& s, const at::Tensor& alpha) {
  TORCH_CHECK(s.device().is_cpu() && s.dim() == 2 && s.is_contiguous(), "activation: s must be a contiguous [N, H] CPU tensor");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == s.size(1) && alpha.is_contiguous(), "activation: alpha must be [H]");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "activation: s must be bfloat16, float or double");
  const auto want = s.scalar_type() == at::kBFloat16 ? at::kFloat : s.scalar_type();
  TORCH_CHECK(alpha.scalar_type() == want, "activation: alpha must be float for bfloat16 s, else of s's type");
}

void check_grad(const at::Tensor& g, const at::Tensor& s) {
  TORCH_CHECK(g.sizes() == s.sizes() && g.scalar_type() == s.scalar_type() && g.is_contiguous(),
              "activation: the gradient must be contiguous, of s's shape and type");
}

// the (S, T) pair of s's dtype: bf16 -> (BFloat16, float), float -> (float, float), double -> (double, double)
#define DISPATCH(s, CALL)                                                        \
  if ((s).scalar_type() == at::kBFloat16) { using S = at::BFloat16; using T = float; return CALL; } \
  if ((s).scalar_type() == at::kFloat) { using S = float; using T = float; return CALL; }           \
  { using S = double; using T = double; return CALL; }

at::Tensor prelu_forward(const at::Tensor& s, const at::Tensor& alpha) {
  check(s, alpha);
  DISPATCH(s, (prelu_forward_impl<S, T>(s, alpha)))
}

std::vector<at::Tensor> prelu_backward(const at::Tensor& g, const at::Tensor& s, const at::Tensor& alpha) {
  check(s, alpha), check_grad(g, s);
  DISPATCH(s, (prelu_backward_impl<S, T>(g, s, alpha)))
}

std::vector<at::Tensor> dice_forward(const at::Tensor& s, const at::Tensor& alpha, double eps) {
  check(s, alpha);
  TORCH_CHECK(s.size(0) > 0, "dice: an empty batch has no statistics");
  DISPATCH(s, (dice_forward_impl<S, T>(s, alpha, eps)))
}

std::vector<at::Tensor> dice_backward(const at::Tensor& g, const at::Tensor& s, const at::Tensor& alpha,
                                      const at::Tensor& mean, const at::Tensor& var, const at::Tensor& root,
                                      double eps) {
  check(s, alpha), check_grad(g, s);
  DISPATCH(s, (dice_backward_impl<S, T>(g, s, alpha, mean, var, root, eps)))
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prelu_forward", &prelu_forward, "PReLU, one alpha per channel");
  m.def("prelu_backward", &prelu_backward, "its gradients with respect to s and alpha");
  m.def("dice_forward", &dice_forward, "Dice with batch statistics: y, mean, biased variance, sqrt(max(var, eps^2))");
  m.def("dice_backward", &dice_backward, "its gradients with respect to s and alpha");
}
