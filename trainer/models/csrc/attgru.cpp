// DIEN's GRU family over a whole padded sequence, forward and hand-written backward, with the time
// loop in C++ (trainer/models/gru.py holds the math and the Python reference `run_sequence`).
//
// Per step t, with the input gates xg_t = W_ih x_t + b_ih computed outside for all steps at once:
//   hg = W_hh h + b_hh;  r = σ(xr + hr);  z = σ(xz + hz);  n = tanh(xn + r ∘ hn);  u = 1 − z
//   ũ = u (GRU, AIGRU),  a_t·u (AUGRU),  a_t (AGRU)
//   h_t = h + m_t·ũ ∘ (n − h)          m_t = 1 while t < length, else 0: padding leaves h unchanged
// Shapes: B rows, T steps, H hidden; tensors are time-major inside. On the CPU (`fused`) each
// step's elementwise pass runs on torch's threads over row blocks; elsewhere only ATen ops, so the same
// code runs on any device; autograd is bypassed (one node for the whole sequence).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <utility>
#include <vector>

namespace {

// Rows per parallel task of a step on the CPU. The row loops are functions of their own (with
// __restrict pointers) called from at::parallel_for: inside the lambda the pointers would be
// captures, and GCC would not vectorize the loops.
constexpr int64_t ROWS = 64;

enum Mode : int64_t { GRU = 0, AGRU = 1, AUGRU = 2 };

at::Tensor update_gate(const at::Tensor& u, const at::Tensor& a, int64_t mode) {
  if (mode == AUGRU) return u * a.unsqueeze(1);
  if (mode == AGRU) return a.unsqueeze(1).expand_as(u);
  return u;
}

// The elementwise part of one step on the CPU, one pass over [B, H] (the ATen composition below
// is the same math for other devices). x [B, 3H] input gates, g [B, 3H] W_hh h (bias added here).
template <typename T, int64_t MODE>
void step_cpu(const T* __restrict x, const T* __restrict g, const T* __restrict bias, const T* __restrict h,
              const T* __restrict a, const T* __restrict m, T* __restrict r, T* __restrict z, T* __restrict n,
              T* __restrict hn, T* __restrict out, int64_t b0, int64_t b1, int64_t H) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * 3 * H;
    const T* gb = g + b * 3 * H;
    const T ab = MODE == GRU ? T(1) : a[b], mb = m[b];
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const int64_t i = b * H + j;
      const T hnj = gb[2 * H + j] + bias[2 * H + j];
      const T rj = T(1) / (T(1) + std::exp(-(xb[j] + gb[j] + bias[j])));
      const T zj = T(1) / (T(1) + std::exp(-(xb[H + j] + gb[H + j] + bias[H + j])));
      const T nj = std::tanh(xb[2 * H + j] + rj * hnj);
      const T gate = (MODE == AGRU ? ab : (MODE == AUGRU ? ab * (T(1) - zj) : T(1) - zj)) * mb;
      r[i] = rj, z[i] = zj, n[i] = nj, hn[i] = hnj;
      out[i] = h[i] + gate * (nj - h[i]);
    }
  }
}

// Backward of one step. gh [B, H]: the gradient of the state after the step from later steps;
// gs [B, H] or null: that of this step's output. Writes dx, dhg [B, 3H], da [B] and
// direct = g ∘ (1 − gate), the gradient of the state before the step except through W_hh.
template <typename T, int64_t MODE>
void step_back_cpu(const T* __restrict gh, const T* __restrict gs, const T* __restrict h, const T* __restrict a,
                   const T* __restrict m, const T* __restrict r, const T* __restrict z, const T* __restrict n,
                   const T* __restrict hn, T* __restrict dx, T* __restrict dhg, T* __restrict da,
                   T* __restrict direct, int64_t b0, int64_t b1, int64_t H) {
  for (int64_t b = b0; b < b1; ++b) {
    const T ab = MODE == GRU ? T(1) : a[b], mb = m[b];
    T dab = 0;
#pragma omp simd reduction(+ : dab)
    for (int64_t j = 0; j < H; ++j) {
      const int64_t i = b * H + j, o = b * 3 * H + j;
      const T g = gs ? gh[i] + gs[i] * mb : gh[i];  // the step's output is m·h_{t+1}
      const T u = T(1) - z[i];
      const T gate = (MODE == AGRU ? ab : (MODE == AUGRU ? ab * u : u)) * mb;
      const T d_gate = g * (n[i] - h[i]) * mb;
      const T du = MODE == AUGRU ? d_gate * ab : (MODE == AGRU ? T(0) : d_gate);
      dab += MODE == AUGRU ? d_gate * u : d_gate;
      const T dn = g * gate * (T(1) - n[i] * n[i]);
      const T dz = -du * z[i] * (T(1) - z[i]);
      const T dr = dn * hn[i] * r[i] * (T(1) - r[i]);
      dx[o] = dr, dx[o + H] = dz, dx[o + 2 * H] = dn;
      dhg[o] = dr, dhg[o + H] = dz, dhg[o + 2 * H] = dn * r[i];
      direct[i] = g * (T(1) - gate);
    }
    if (MODE != GRU) da[b] = dab;
  }
}

// -> states [B, T, H] (zero at padding), last [B, H], and what backward needs.
std::vector<at::Tensor> forward(const at::Tensor& xg, const at::Tensor& w_hh, const at::Tensor& b_hh,
                                const at::Tensor& att, const at::Tensor& lengths, int64_t mode, bool fused) {
  TORCH_CHECK(xg.dim() == 3 && xg.size(2) == 3 * w_hh.size(1), "xg must be [B, T, 3H]");
  TORCH_CHECK(mode == GRU || att.sizes() == xg.sizes().slice(0, 2), "att must be [B, T]");
  const int64_t B = xg.size(0), T = xg.size(1), H = w_hh.size(1);
  at::NoGradGuard no_grad;
  const auto x = xg.transpose(0, 1).contiguous();  // [T, B, 3H]
  const auto a = mode == GRU ? at::Tensor() : att.t().contiguous().to(xg.dtype());  // [T, B]
  const auto mask = at::arange(T, lengths.options()).unsqueeze(1).lt(lengths.unsqueeze(0)).to(xg.dtype());
  auto hs = at::empty({T + 1, B, H}, xg.options());  // hs[t]: the state before step t
  hs[0].zero_();
  auto r = at::empty({T, B, H}, xg.options()), z = at::empty_like(r), n = at::empty_like(r),
       hn = at::empty_like(r);
  const auto w_t = w_hh.t();
  const bool cpu = fused && xg.device().is_cpu();
  const auto bias = b_hh.contiguous();
  auto hg_buf = cpu ? at::empty({B, 3 * H}, xg.options()) : at::Tensor();
  for (int64_t t = 0; t < T; ++t) {
    const auto h = hs[t];
    if (cpu) {
      at::mm_out(hg_buf, h, w_t);
      AT_DISPATCH_FLOATING_TYPES(xg.scalar_type(), "attgru_step", [&] {
        const auto step = mode == AUGRU ? step_cpu<scalar_t, AUGRU>
                          : mode == AGRU ? step_cpu<scalar_t, AGRU> : step_cpu<scalar_t, GRU>;
        at::parallel_for(0, B, ROWS, [&](int64_t b0, int64_t b1) {
          step(x[t].data_ptr<scalar_t>(), hg_buf.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
               h.data_ptr<scalar_t>(), mode == GRU ? nullptr : a[t].data_ptr<scalar_t>(),
               mask[t].data_ptr<scalar_t>(), r[t].data_ptr<scalar_t>(), z[t].data_ptr<scalar_t>(),
               n[t].data_ptr<scalar_t>(), hn[t].data_ptr<scalar_t>(), hs[t + 1].data_ptr<scalar_t>(), b0, b1, H);
        });
      });
      continue;
    }
    const auto hg = at::addmm(b_hh, h, w_t).chunk(3, 1);
    const auto xt = x[t].chunk(3, 1);
    auto rt = r[t], zt = z[t], nt = n[t], next = hs[t + 1];
    at::sigmoid_out(rt, xt[0] + hg[0]);
    at::sigmoid_out(zt, xt[1] + hg[1]);
    hn[t].copy_(hg[2]);
    at::tanh_out(nt, at::addcmul(xt[2], rt, hg[2]));
    const auto gate = update_gate(1 - zt, mode == GRU ? at::Tensor() : a[t], mode) * mask[t].unsqueeze(1);
    at::addcmul_out(next, h, gate, nt - h);
  }
  auto states = (hs.slice(0, 1) * mask.unsqueeze(2)).transpose(0, 1);
  return {states, hs[T].clone(), hs, r, z, n, hn, mask};
}

// Gradients of (states, last) -> (xg [B, T, 3H], w_hh, b_hh, att [B, T] or undefined).
std::vector<at::Tensor> backward(const at::Tensor& grad_states, const at::Tensor& grad_last,
                                 const at::Tensor& w_hh, const at::Tensor& att, int64_t mode,
                                 const at::Tensor& hs, const at::Tensor& r, const at::Tensor& z,
                                 const at::Tensor& n, const at::Tensor& hn, const at::Tensor& mask, bool fused) {
  at::NoGradGuard no_grad;
  const int64_t T = r.size(0), B = r.size(1), H = r.size(2);
  const auto a = mode == GRU ? at::Tensor() : att.t().contiguous().to(r.dtype());
  const bool cpu = fused && r.device().is_cpu();
  const auto gs = grad_states.defined() ? grad_states.transpose(0, 1) : at::Tensor();  // [T, B, H]
  const auto gs_c = cpu && gs.defined() ? gs.contiguous() : at::Tensor();
  auto gh = grad_last.defined() ? grad_last.contiguous().clone() : at::zeros({B, H}, r.options());
  auto next = cpu ? at::empty({B, H}, r.options()) : at::Tensor();
  auto dhg = at::empty({T, B, 3 * H}, r.options());  // gradients of the hidden gates (pre-activation)
  auto dxg = at::empty({T, B, 3 * H}, r.options());
  auto datt = mode == GRU ? at::Tensor() : at::zeros({T, B}, r.options());
  for (int64_t t = T - 1; t >= 0; --t) {
    const auto h = hs[t];
    if (cpu) {
      AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "attgru_step_back", [&] {
        const auto step = mode == AUGRU ? step_back_cpu<scalar_t, AUGRU>
                          : mode == AGRU ? step_back_cpu<scalar_t, AGRU> : step_back_cpu<scalar_t, GRU>;
        at::parallel_for(0, B, ROWS, [&](int64_t b0, int64_t b1) {
          step(gh.data_ptr<scalar_t>(), gs_c.defined() ? gs_c[t].data_ptr<scalar_t>() : nullptr,
               h.data_ptr<scalar_t>(), mode == GRU ? nullptr : a[t].data_ptr<scalar_t>(),
               mask[t].data_ptr<scalar_t>(), r[t].data_ptr<scalar_t>(), z[t].data_ptr<scalar_t>(),
               n[t].data_ptr<scalar_t>(), hn[t].data_ptr<scalar_t>(), dxg[t].data_ptr<scalar_t>(),
               dhg[t].data_ptr<scalar_t>(), mode == GRU ? nullptr : datt[t].data_ptr<scalar_t>(),
               next.data_ptr<scalar_t>(), b0, b1, H);
        });
      });
      next.addmm_(dhg[t], w_hh);
      std::swap(gh, next);
      continue;
    }
    const auto m = mask[t].unsqueeze(1);
    const auto g = gs.defined() ? at::addcmul(gh, gs[t], m) : gh;  // states[t] = m·h_{t+1}
    const auto u = 1 - z[t];
    const auto gate = update_gate(u, mode == GRU ? at::Tensor() : a[t], mode) * m;
    const auto d_gate = g * (n[t] - h) * m;  // through gate = m·ũ
    at::Tensor du;
    if (mode == AUGRU) {
      du = d_gate * a[t].unsqueeze(1);
      datt[t].copy_((d_gate * u).sum(1));
    } else if (mode == AGRU) {
      du = at::zeros_like(u);
      datt[t].copy_(d_gate.sum(1));
    } else {
      du = d_gate;
    }
    const auto dn = (g * gate) * (1 - n[t] * n[t]);                   // d pre-activation of n
    const auto dz = -du * z[t] * (1 - z[t]);                          // u = 1 − z
    const auto dr = dn * hn[t] * r[t] * (1 - r[t]);
    auto dx = dxg[t].chunk(3, 1), dh_gates = dhg[t].chunk(3, 1);
    dx[0].copy_(dr), dx[1].copy_(dz), dx[2].copy_(dn);
    dh_gates[0].copy_(dr), dh_gates[1].copy_(dz), at::mul_out(dh_gates[2], dn, r[t]);
    gh = at::addmm(g * (1 - gate), dhg[t], w_hh);
  }
  const auto dhg2 = dhg.reshape({T * B, 3 * H});
  auto dw = at::mm(dhg2.t(), hs.slice(0, 0, T).reshape({T * B, H}));
  auto db = dhg2.sum(0);
  return {dxg.transpose(0, 1), dw, db, mode == GRU ? at::Tensor() : datt.t()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GRU / AGRU / AUGRU over a padded sequence");
  m.def("backward", &backward, "its gradients");
}
