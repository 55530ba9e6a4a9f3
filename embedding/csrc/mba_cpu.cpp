// The MBA row update on the CPU (embedding/mba.py has the contract), two ways to one result.
//
// update_rows: touched row u is linear row rows[u] of table tab[u]; its occurrences' gradients
// are the dims[t] floats at grad[src[k]] for k in offsets[u] .. offsets[u+1]-1 (grouped by
// group_rows or a sort). One pass per row sums them, adds λ·w/n and applies the optimizer (mode:
// 0 SGD, 1 row-wise Adagrad, 2 Adam, 3 partial row-wise Adam; embedding.mba.RULES) to the row in
// place. Rows are split over threads (at::parallel_for); every row is written by exactly one
// thread.
// accumulate_update: the occurrences in their own order, summed into dense per-row buffers, then
// the same step on every touched row; no grouping, for groups with few rows per occurrence.
//
// Weights may be fp32, fp16 or bf16; the math and the states are fp32. Row-wise states
// (Adagrad's sum, partial Adam's v) at m_off[t] + row; the element-wise ones (Adam's m and v)
// laid out as the weights.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

enum Mode : int64_t { kSgd = 0, kRowwiseAdagrad = 1, kAdam = 2, kPartialRowwiseAdam = 3 };

struct Hyper {
  int64_t mode;
  float lr, lam, eps, beta1, beta2, bias1, bias2;  // bias_i = 1 − β_i^t
};

// The optimizer step of one touched row: acc (dim floats) holds ḡ_j, the sum of its occurrences'
// gradients; λ·w/n is added here. local: the row within table t; at: its first element.
template <typename W>
inline void apply_row(W* weight, float* momentum, float* exp_avg, float* exp_avg_sq, float* acc, int64_t t,
                      int64_t local, int64_t at, int64_t dim, float n, const int64_t* m_off, const Hyper& h) {
  W* w = weight + at;
  float sq = 0.0f;
  const float decay = h.lam / n;
  for (int64_t d = 0; d < dim; ++d) {
    acc[d] += decay * static_cast<float>(w[d]);
    sq += acc[d] * acc[d];
  }
  if (h.mode == kSgd || h.mode == kRowwiseAdagrad) {
    float step = h.lr;
    if (h.mode == kRowwiseAdagrad) {
      float& s = momentum[m_off[t] + local];
      s += sq / static_cast<float>(dim);
      step = h.lr / (std::sqrt(s) + h.eps);
    }
    for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<W>(static_cast<float>(w[d]) - step * acc[d]);
    return;
  }
  float* m = exp_avg + at;
  float v_hat_row = 0.0f;
  if (h.mode == kPartialRowwiseAdam) {
    float& v = momentum[m_off[t] + local];
    v = h.beta2 * v + (1.0f - h.beta2) * (sq / static_cast<float>(dim));
    v_hat_row = v / h.bias2;
  }
  for (int64_t d = 0; d < dim; ++d) {
    m[d] = h.beta1 * m[d] + (1.0f - h.beta1) * acc[d];
    float v_hat = v_hat_row;
    if (h.mode == kAdam) {
      float& v = exp_avg_sq[at + d];
      v = h.beta2 * v + (1.0f - h.beta2) * acc[d] * acc[d];
      v_hat = v / h.bias2;
    }
    w[d] = static_cast<W>(static_cast<float>(w[d]) - h.lr * (m[d] / h.bias1) / (std::sqrt(v_hat) + h.eps));
  }
}

// Rows grouped (group_rows or embedding.mba.segments): touched row u is linear row rows[u] of
// table tab[u], its occurrences' gradients at grad[src[k]] for k in offsets[u] .. offsets[u+1]-1.
template <typename W>
void update_rows_kernel(W* weight, float* momentum, float* exp_avg, float* exp_avg_sq, const int32_t* counts,
                        const int64_t* row_off, const int64_t* w_off, const int64_t* m_off, const int64_t* dims,
                        const int64_t* rows, const int64_t* tab, const int64_t* offsets, const int64_t* src,
                        const float* grad, int64_t num_rows, int64_t max_dim, const Hyper h) {
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
      const float n = std::max(static_cast<float>(counts[rows[u]]), 1.0f);
      apply_row(weight, momentum, exp_avg, exp_avg_sq, acc.data(), t, local, w_off[t] + local * dim, dim, n, m_off, h);
    }
  });
}

// The table of linear row r (row_off ascending, n_tables + 1 entries).
inline int64_t table_of(const int64_t* row_off, int64_t n_tables, int64_t r) {
  return std::upper_bound(row_off + 1, row_off + n_tables + 1, r) - (row_off + 1);
}

// accumulate_update's first pass: adds occurrences k0 .. k1-1 into their rows of `buf` (row r at
// r·stride) and marks the rows in `hit`. D > 0: every table is D wide (the width known to the
// compiler); D = 0: each occurrence's width is its table's.
template <int64_t D>
inline void sum_into(float* __restrict__ buf, uint8_t* __restrict__ hit, const int64_t* lin, const int64_t* src,
                     const float* __restrict__ grad, int64_t k0, int64_t k1, int64_t stride, int64_t num_rows,
                     const int64_t* row_off, int64_t n_tables, const int64_t* dims) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t r = lin[k];
    TORCH_CHECK(r >= 0 && r < num_rows, "lin: row ", r, " outside [0, ", num_rows, ")");
    const int64_t dim = D > 0 ? D : dims[table_of(row_off, n_tables, r)];
    float* __restrict__ a = buf + r * stride;
    const float* __restrict__ g = grad + src[k];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) a[d] += g[d];
    hit[r] = 1;
  }
}

// Occurrences in their own order (lin[k], grad at src[k]), summed into dense per-row buffers:
// the occurrences are cut into `parts` chunks, chunk c summed into its own num_rows × max_dim
// buffer (reads of the gradient in order, writes into a buffer that stays in cache for a small
// group), then the touched rows split over the threads, each row's parts added in chunk order
// and the row updated. For groups with few rows per occurrence (no sort, no grouping pass).
template <typename W>
void accumulate_update_kernel(W* weight, float* momentum, float* exp_avg, float* exp_avg_sq, const int32_t* counts,
                              const int64_t* row_off, int64_t n_tables, const int64_t* w_off, const int64_t* m_off,
                              const int64_t* dims, const int64_t* lin, const int64_t* src, int64_t n,
                              const float* grad, int64_t num_rows, int64_t max_dim, int64_t parts, const Hyper h) {
  int64_t same_dim = n_tables ? dims[0] : 0;  // every table of this dim (0: they differ)
  for (int64_t t = 1; t < n_tables; ++t) same_dim = dims[t] == same_dim ? same_dim : 0;
  std::vector<float> sums(static_cast<size_t>(parts * num_rows * max_dim), 0.0f);
  std::vector<uint8_t> touched(static_cast<size_t>(parts * num_rows), 0);
  at::parallel_for(0, parts, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* buf = sums.data() + c * num_rows * max_dim;
      uint8_t* hit = touched.data() + c * num_rows;
      const int64_t k0 = n * c / parts, k1 = n * (c + 1) / parts;
      if (same_dim == 16) {
        sum_into<16>(buf, hit, lin, src, grad, k0, k1, max_dim, num_rows, row_off, n_tables, dims);
      } else if (same_dim == 32) {
        sum_into<32>(buf, hit, lin, src, grad, k0, k1, max_dim, num_rows, row_off, n_tables, dims);
      } else {
        sum_into<0>(buf, hit, lin, src, grad, k0, k1, max_dim, num_rows, row_off, n_tables, dims);
      }
    }
  });
  at::parallel_for(0, num_rows, 512, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(max_dim);
    for (int64_t r = begin; r < end; ++r) {
      bool any = false;
      for (int64_t c = 0; c < parts; ++c) any |= touched[c * num_rows + r] != 0;
      if (!any) continue;
      const int64_t t = table_of(row_off, n_tables, r);
      const int64_t dim = dims[t];
      const int64_t local = r - row_off[t];
      std::fill(acc.begin(), acc.begin() + dim, 0.0f);
      for (int64_t c = 0; c < parts; ++c) {
        const float* a = sums.data() + (c * num_rows + r) * max_dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += a[d];
      }
      const float cnt = std::max(static_cast<float>(counts[r]), 1.0f);
      apply_row(weight, momentum, exp_avg, exp_avg_sq, acc.data(), t, local, w_off[t] + local * dim, dim, cnt, m_off,
                h);
    }
  });
}

void check_long(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.device().is_cpu(), name,
              ": contiguous int64 CPU tensor");
}

float* state_ptr(const std::optional<torch::Tensor>& t, const char* name, bool needed) {
  TORCH_CHECK(t.has_value() == needed, name, needed ? ": required by this optimizer" : ": not used by this optimizer");
  if (!needed) return nullptr;
  TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->device().is_cpu(), name,
              ": contiguous fp32 CPU tensor");
  return t->data_ptr<float>();
}

// The checked inputs of both row updates: the optimizer states' pointers and the hyper-parameters.
struct Step {
  float *momentum, *exp_avg, *exp_avg_sq;
  Hyper h;
  int64_t max_dim;
};

Step check_step(const torch::Tensor& weight, const std::optional<torch::Tensor>& momentum,
                const std::optional<torch::Tensor>& exp_avg, const std::optional<torch::Tensor>& exp_avg_sq,
                const torch::Tensor& counts, const torch::Tensor& row_off, const torch::Tensor& w_off,
                const torch::Tensor& m_off, const torch::Tensor& dims, const torch::Tensor& grad, int64_t mode,
                double lr, double lam, double eps, double beta1, double beta2, double bias1, double bias2) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous(), "weight: contiguous CPU storage");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous(), "grad: contiguous fp32");
  TORCH_CHECK(counts.scalar_type() == torch::kInt && counts.is_contiguous(), "counts: contiguous int32");
  for (auto& [t, name] :
       {std::pair{&row_off, "row_off"}, {&w_off, "w_off"}, {&m_off, "m_off"}, {&dims, "dims"}}) {
    check_long(*t, name);
  }
  TORCH_CHECK(row_off.numel() == dims.numel() + 1, "row_off: one entry per table and the end");
  TORCH_CHECK(mode >= kSgd && mode <= kPartialRowwiseAdam, "mode: 0..3, got ", mode);
  Step s{state_ptr(momentum, "momentum", mode == kRowwiseAdagrad || mode == kPartialRowwiseAdam),
         state_ptr(exp_avg, "exp_avg", mode == kAdam || mode == kPartialRowwiseAdam),
         state_ptr(exp_avg_sq, "exp_avg_sq", mode == kAdam),
         Hyper{mode, static_cast<float>(lr), static_cast<float>(lam), static_cast<float>(eps),
               static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(bias1),
               static_cast<float>(bias2)},
         dims.numel() ? dims.max().item<int64_t>() : 0};
  if (s.exp_avg != nullptr) TORCH_CHECK(exp_avg->numel() == weight.numel(), "exp_avg: the weights' size");
  if (s.exp_avg_sq != nullptr) TORCH_CHECK(exp_avg_sq->numel() == weight.numel(), "exp_avg_sq: the weights' size");
  return s;
}

void update_rows(torch::Tensor weight, std::optional<torch::Tensor> momentum, std::optional<torch::Tensor> exp_avg,
                 std::optional<torch::Tensor> exp_avg_sq, torch::Tensor counts, torch::Tensor row_off,
                 torch::Tensor w_off, torch::Tensor m_off, torch::Tensor dims, torch::Tensor rows, torch::Tensor tab,
                 torch::Tensor offsets, torch::Tensor src, torch::Tensor grad, int64_t mode, double lr, double lam,
                 double eps, double beta1, double beta2, double bias1, double bias2) {
  const Step s = check_step(weight, momentum, exp_avg, exp_avg_sq, counts, row_off, w_off, m_off, dims, grad, mode,
                            lr, lam, eps, beta1, beta2, bias1, bias2);
  for (auto& [t, name] : {std::pair{&rows, "rows"}, {&tab, "tab"}, {&offsets, "offsets"}, {&src, "src"}}) {
    check_long(*t, name);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, weight.scalar_type(), "mba_update_rows", [&] {
    update_rows_kernel<scalar_t>(weight.data_ptr<scalar_t>(), s.momentum, s.exp_avg, s.exp_avg_sq,
                                 counts.data_ptr<int32_t>(), row_off.data_ptr<int64_t>(), w_off.data_ptr<int64_t>(),
                                 m_off.data_ptr<int64_t>(), dims.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                 tab.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
                                 grad.data_ptr<float>(), rows.numel(), s.max_dim, s.h);
  });
}

// The same step from the occurrences in their own order (lin [N] linear rows, src [N] gradient
// offsets), summed into `parts` dense per-row buffers (accumulate_update_kernel).
void accumulate_update(torch::Tensor weight, std::optional<torch::Tensor> momentum,
                       std::optional<torch::Tensor> exp_avg, std::optional<torch::Tensor> exp_avg_sq,
                       torch::Tensor counts, torch::Tensor row_off, torch::Tensor w_off, torch::Tensor m_off,
                       torch::Tensor dims, torch::Tensor lin, torch::Tensor src, torch::Tensor grad, int64_t parts,
                       int64_t mode, double lr, double lam, double eps, double beta1, double beta2, double bias1,
                       double bias2) {
  const Step s = check_step(weight, momentum, exp_avg, exp_avg_sq, counts, row_off, w_off, m_off, dims, grad, mode,
                            lr, lam, eps, beta1, beta2, bias1, bias2);
  check_long(lin, "lin");
  check_long(src, "src");
  TORCH_CHECK(lin.numel() == src.numel(), "lin and src: one entry per occurrence");
  TORCH_CHECK(parts >= 1, "parts: at least 1, got ", parts);
  const int64_t num_rows = counts.numel(), n = lin.numel();
  TORCH_CHECK(row_off.data_ptr<int64_t>()[dims.numel()] <= num_rows, "row_off: rows beyond the counts");
  const int64_t* l = lin.data_ptr<int64_t>();  // each checked in [0, num_rows) before any row is written
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, weight.scalar_type(), "mba_accumulate_update", [&] {
    accumulate_update_kernel<scalar_t>(weight.data_ptr<scalar_t>(), s.momentum, s.exp_avg, s.exp_avg_sq,
                                       counts.data_ptr<int32_t>(), row_off.data_ptr<int64_t>(), dims.numel(),
                                       w_off.data_ptr<int64_t>(), m_off.data_ptr<int64_t>(), dims.data_ptr<int64_t>(),
                                       l, src.data_ptr<int64_t>(), n, grad.data_ptr<float>(), num_rows, s.max_dim,
                                       parts, s.h);
  });
}

// The occurrences (linear rows lin [N] in [0, num_rows), gradient offsets src [N]) grouped by row
// with a counting sort, O(N + num_rows): the touched rows [U] ascending, offsets [U+1], and src
// in row order (stable: a row's occurrences keep their order). embedding.mba.segments' result,
// without its sort.
std::vector<torch::Tensor> group_rows(const torch::Tensor& lin, const torch::Tensor& src, int64_t num_rows) {
  check_long(lin, "lin");
  check_long(src, "src");
  TORCH_CHECK(lin.numel() == src.numel(), "lin and src: one entry per occurrence");
  const int64_t n = lin.numel();
  const int64_t* l = lin.data_ptr<int64_t>();
  const int64_t* s = src.data_ptr<int64_t>();
  std::vector<int64_t> start(num_rows + 1, 0);  // occurrences per row, then where each row's begin
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(l[i] >= 0 && l[i] < num_rows, "lin: row ", l[i], " outside [0, ", num_rows, ")");
    ++start[l[i] + 1];
  }
  int64_t touched = 0;
  for (int64_t r = 0; r < num_rows; ++r) {
    touched += start[r + 1] > 0;
    start[r + 1] += start[r];
  }
  torch::Tensor rows = torch::empty({touched}, lin.options());
  torch::Tensor offsets = torch::empty({touched + 1}, lin.options());
  torch::Tensor grouped = torch::empty({n}, src.options());
  int64_t* ro = rows.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t r = 0, u = 0; r < num_rows; ++r) {
    if (start[r + 1] > start[r]) {
      ro[u] = r;
      off[u++] = start[r];
    }
  }
  off[touched] = n;
  int64_t* g = grouped.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) g[start[l[i]]++] = s[i];
  return {rows, offsets, grouped};
}

// The lookups of a batch as occurrences (embedding.mba.occurrences_torch in one pass): bag b of
// offsets [B·F + 1] is feature f = b / batch, sample s = b % batch; its lookups k get the linear
// row indices[k] + row_off[feature_table[f]], the gradient offset s·stride + feature_col[f]
// (pooled) or k·stride (sequence), and, with `samples`, the sample s. Bags in parallel.
std::vector<torch::Tensor> occurrences(const torch::Tensor& indices, const torch::Tensor& offsets, int64_t batch,
                                       const torch::Tensor& feature_table, const torch::Tensor& feature_col,
                                       const torch::Tensor& row_off, int64_t stride, bool pooled, bool samples) {
  for (auto& [t, name] : {std::pair{&indices, "indices"}, {&offsets, "offsets"}, {&feature_table, "feature_table"},
                          {&feature_col, "feature_col"}, {&row_off, "row_off"}}) {
    check_long(*t, name);
  }
  const int64_t n = indices.numel(), n_bags = offsets.numel() - 1, n_features = feature_table.numel();
  TORCH_CHECK(batch > 0 && n_bags == batch * n_features, "offsets: ", n_bags, " bags for ", n_features,
              " features of ", batch, " samples");
  TORCH_CHECK(feature_col.numel() == n_features, "feature_col: one entry per feature");
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ft = feature_table.data_ptr<int64_t>();
  const int64_t* fc = feature_col.data_ptr<int64_t>();
  const int64_t* ro = row_off.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[n_bags] == n, "offsets: must run from 0 to the ", n, " indices");
  for (int64_t f = 0; f < n_features; ++f) {
    TORCH_CHECK(ft[f] >= 0 && ft[f] < row_off.numel(), "feature_table: table ", ft[f], " out of range");
  }
  torch::Tensor lin = torch::empty({n}, indices.options());
  torch::Tensor src = torch::empty({n}, indices.options());
  torch::Tensor sample = samples ? torch::empty({n}, indices.options()) : torch::Tensor();
  int64_t* l = lin.data_ptr<int64_t>();
  int64_t* sr = src.data_ptr<int64_t>();
  int64_t* sm = samples ? sample.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, n_bags, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t f = b / batch, s = b - f * batch;
      const int64_t k0 = off[b], k1 = off[b + 1];
      TORCH_CHECK(k0 <= k1 && k1 <= n, "offsets: not ascending at bag ", b);
      const int64_t base = ro[ft[f]], to = s * stride + fc[f];
      for (int64_t k = k0; k < k1; ++k) {
        l[k] = idx[k] + base;
        sr[k] = pooled ? to : k * stride;
      }
      if (sm != nullptr) std::fill(sm + k0, sm + k1, s);
    }
  });
  return {lin, src, sample};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update_rows", &update_rows, "MBA SGD / row-wise Adagrad / Adam / partial row-wise Adam on the touched rows, in place");
  m.def("accumulate_update", &accumulate_update,
        "the same step from the occurrences in their order, summed into dense per-row buffers (few rows)");
  m.def("group_rows", &group_rows, "the occurrences grouped by row (counting sort): rows, offsets, src in row order");
  m.def("occurrences", &occurrences, "a batch's lookups as occurrences: linear row, gradient offset, sample");
}
