// The segment sum of trainer/models/jagged.py on the CPU: values [N, H] whose rows [N] are
// nondecreasing (a jagged batch's behaviours, each tagged with its batch row) summed per row into
// [R, H]. Parallel over chunks of output rows, each finding its values by binary search; a row's
// values are added in order, in float for bfloat16 values (double for double), and the result is
// written once in the values' type. Float values give index_add_'s result bit for bit (it adds
// them in the same order); bfloat16 ones are rounded once instead of at every addition.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "bf16.h"

#include <algorithm>
#include <cstdint>

namespace {

using dinrec::widen;

template <typename S, typename T>
void segment_sum_impl(const at::Tensor& values_, const int64_t* rows, at::Tensor& out_) {
  const int64_t n = values_.size(0), h = values_.size(1), r = out_.size(0);
  const S* values = values_.data_ptr<S>();
  S* out = out_.data_ptr<S>();
  const int64_t grain = std::max<int64_t>(1, r * 16384 / std::max<int64_t>(n * h, 1));  // ~16k values a task
  at::parallel_for(0, r, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(h);
    int64_t i = std::lower_bound(rows, rows + n, r0) - rows;
    for (int64_t row = r0; row < r1; ++row) {
      std::fill(acc.begin(), acc.end(), T(0));
      T* a = acc.data();
      for (; i < n && rows[i] == row; ++i) {
        const S* v = values + i * h;
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) a[j] += widen(v[j]);
      }
      S* o = out + row * h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) o[j] = S(a[j]);
    }
  });
}

at::Tensor segment_sum(const at::Tensor& values, const at::Tensor& rows, int64_t n_rows) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 2 && values.is_contiguous(),
              "segment_sum: values must be a contiguous [N, H] CPU tensor");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == values.size(0) && rows.is_contiguous(),
              "segment_sum: rows must be a contiguous int64 [N] tensor");
  const int64_t n = rows.size(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  bool sorted = true;
  for (int64_t i = 1; i < n; ++i) sorted &= r[i - 1] <= r[i];
  TORCH_CHECK(sorted && (n == 0 || (r[0] >= 0 && r[n - 1] < n_rows)),
              "segment_sum: rows must be nondecreasing and in [0, ", n_rows, ")");
  at::Tensor out = at::empty({n_rows, values.size(1)}, values.options());
  if (values.scalar_type() == at::kBFloat16) {
    segment_sum_impl<at::BFloat16, float>(values, r, out);
  } else if (values.scalar_type() == at::kFloat) {
    segment_sum_impl<float, float>(values, r, out);
  } else {
    TORCH_CHECK(values.scalar_type() == at::kDouble, "segment_sum: values must be bfloat16, float or double");
    segment_sum_impl<double, double>(values, r, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_sum", &segment_sum, "values [N, H] summed per (nondecreasing) row into [n_rows, H]");
}
