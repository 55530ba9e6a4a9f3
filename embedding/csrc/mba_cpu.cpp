// The MBA row update on the CPU: one pass per touched row (embedding/mba.py has the contract).
//
// Touched row u is linear row rows[u] of table tab[u]; its occurrences' gradients are the
// dims[t] floats at grad[src[k]] for k in offsets[u] .. offsets[u+1]-1. The pass sums them, adds
// λ·w/n and applies SGD or row-wise Adagrad to the row in place. Rows are split over threads
// (at::parallel_for); every row is written by exactly one thread. Weights may be fp32, fp16 or
// bf16; the math is fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

template <typename W>
void update_rows_kernel(W* weight, float* momentum, const int32_t* counts, const int64_t* row_off,
                        const int64_t* w_off, const int64_t* m_off, const int64_t* dims, const int64_t* rows,
                        const int64_t* tab, const int64_t* offsets, const int64_t* src, const float* grad,
                        int64_t num_rows, int64_t max_dim, float lr, float lam, float eps) {
  at::parallel_for(0, num_rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(max_dim);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t t = tab[u];
      const int64_t dim = dims[t];
      const int64_t local = rows[u] - row_off[t];
      std::fill(acc.begin(), acc.begin() + dim, 0.0f);
      for (int64_t k = offsets[u]; k < offsets[u + 1]; ++k) {
        const float* g = grad + src[k];
        for (int64_t d = 0; d < dim; ++d) acc[d] += g[d];
      }
      W* w = weight + w_off[t] + local * dim;
      const float n = std::max(static_cast<float>(counts[rows[u]]), 1.0f);
      float sq = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        acc[d] += lam * static_cast<float>(w[d]) / n;
        sq += acc[d] * acc[d];
      }
      float step = lr;
      if (momentum != nullptr) {
        float& s = momentum[m_off[t] + local];
        s += sq / static_cast<float>(dim);
        step = lr / (std::sqrt(s) + eps);
      }
      for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<W>(static_cast<float>(w[d]) - step * acc[d]);
    }
  });
}

void check_long(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.device().is_cpu(), name,
              ": contiguous int64 CPU tensor");
}

void update_rows(torch::Tensor weight, std::optional<torch::Tensor> momentum, torch::Tensor counts,
                 torch::Tensor row_off, torch::Tensor w_off, torch::Tensor m_off, torch::Tensor dims,
                 torch::Tensor rows, torch::Tensor tab, torch::Tensor offsets, torch::Tensor src, torch::Tensor grad,
                 double lr, double lam, double eps) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous(), "weight: contiguous CPU storage");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous(), "grad: contiguous fp32");
  TORCH_CHECK(counts.scalar_type() == torch::kInt && counts.is_contiguous(), "counts: contiguous int32");
  for (auto& [t, name] : {std::pair{&row_off, "row_off"}, {&w_off, "w_off"}, {&m_off, "m_off"}, {&dims, "dims"},
                          {&rows, "rows"}, {&tab, "tab"}, {&offsets, "offsets"}, {&src, "src"}}) {
    check_long(*t, name);
  }
  float* mom = nullptr;
  if (momentum.has_value()) {
    TORCH_CHECK(momentum->scalar_type() == torch::kFloat && momentum->is_contiguous(), "momentum: contiguous fp32");
    mom = momentum->data_ptr<float>();
  }
  const int64_t max_dim = dims.numel() ? dims.max().item<int64_t>() : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, weight.scalar_type(), "mba_update_rows", [&] {
    update_rows_kernel<scalar_t>(weight.data_ptr<scalar_t>(), mom, counts.data_ptr<int32_t>(),
                                 row_off.data_ptr<int64_t>(), w_off.data_ptr<int64_t>(), m_off.data_ptr<int64_t>(),
                                 dims.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), tab.data_ptr<int64_t>(),
                                 offsets.data_ptr<int64_t>(), src.data_ptr<int64_t>(), grad.data_ptr<float>(),
                                 rows.numel(), max_dim, static_cast<float>(lr), static_cast<float>(lam),
                                 static_cast<float>(eps));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update_rows", &update_rows, "MBA SGD / row-wise Adagrad on the touched rows, in place");
}
