// The MBA row update on the CPU: one pass per touched row (embedding/mba.py has the contract).
//
// For touched row u (rows[u], its occurrences src[offsets[u]:offsets[u+1]] as rows of the
// [M, D] gradient matrix `grad`): sum the occurrences' gradients, add λ·w/n, and apply SGD or
// row-wise Adagrad to the row in place. Rows are split over threads (at::parallel_for); every
// row is written by exactly one thread. Weights may be fp32, fp16 or bf16; the math is fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename W>
void update_rows_kernel(W* weight, float* momentum, const int32_t* counts, const int64_t* rows,
                        const int64_t* offsets, const int64_t* src, const float* grad, int64_t num_rows,
                        int64_t dim, float lr, float lam, float eps) {
  at::parallel_for(0, num_rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t u = begin; u < end; ++u) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = offsets[u]; k < offsets[u + 1]; ++k) {
        const float* g = grad + src[k] * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += g[d];
      }
      const int64_t r = rows[u];
      W* w = weight + r * dim;
      const float n = std::max(static_cast<float>(counts[r]), 1.0f);
      float sq = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        acc[d] += lam * static_cast<float>(w[d]) / n;
        sq += acc[d] * acc[d];
      }
      float step = lr;
      if (momentum != nullptr) {
        const float s = momentum[r] + sq / static_cast<float>(dim);
        momentum[r] = s;
        step = lr / (std::sqrt(s) + eps);
      }
      for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<W>(static_cast<float>(w[d]) - step * acc[d]);
    }
  });
}

void update_rows(torch::Tensor weight, std::optional<torch::Tensor> momentum, torch::Tensor counts,
                 torch::Tensor rows, torch::Tensor offsets, torch::Tensor src, torch::Tensor grad, double lr,
                 double lam, double eps) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.dim() == 2, "weight: contiguous 2-D CPU");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous() && grad.size(1) == weight.size(1),
              "grad: contiguous fp32 [M, D]");
  TORCH_CHECK(counts.scalar_type() == torch::kInt && counts.is_contiguous(), "counts: contiguous int32");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong &&
                  src.scalar_type() == torch::kLong,
              "rows, offsets, src: int64");
  float* mom = nullptr;
  if (momentum.has_value()) {
    TORCH_CHECK(momentum->scalar_type() == torch::kFloat && momentum->is_contiguous(), "momentum: contiguous fp32");
    mom = momentum->data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, weight.scalar_type(), "mba_update_rows", [&] {
    update_rows_kernel<scalar_t>(weight.data_ptr<scalar_t>(), mom, counts.data_ptr<int32_t>(),
                                 rows.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
                                 grad.data_ptr<float>(), rows.numel(), weight.size(1), static_cast<float>(lr),
                                 static_cast<float>(lam), static_cast<float>(eps));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update_rows", &update_rows, "MBA SGD / row-wise Adagrad on the touched rows, in place");
}
