// 2x2 max pooling, stride 2, over channels_last (NHWC) maps of float32 or bfloat16, with an
// optional ReLU after it, for training on a CPU (cifar4/models/native.py builds it, layers.py
// uses it). Each output keeps one byte: the window position of its first maximum (0-3, the
// library's choice at ties: a later value replaces the maximum only when larger, or NaN), 4 when
// the ReLU clipped it. The backward writes every input position: the window's gradient at that
// position, zero elsewhere (an odd map's last row or column belongs to no window).
// The same values and gradients as the library's max_pool2d (+ relu) bit for bit, with a byte
// of index per output instead of 8, no zero-fill pass and no scatter.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <cstring>
#include <cmath>
#include <tuple>

namespace {

inline float bf16_to_float(uint16_t u) {
  uint32_t w = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

template <typename T> inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
template <typename T> inline void store(T* p, int64_t i, float v);
template <> inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
// exact: every value stored is one of the inputs (or zero), already a bf16
template <> inline void store<uint16_t>(uint16_t* p, int64_t i, float v) {
  uint32_t w;
  std::memcpy(&w, &v, sizeof w);
  p[i] = static_cast<uint16_t>(w >> 16);
}

template <typename T>
void forward_rows(const T* x, T* out, uint8_t* idx, int64_t H, int64_t W, int64_t C,
                  int64_t Ho, int64_t Wo, bool relu, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {  // r = n * Ho + i
    const int64_t n = r / Ho, i = r % Ho;
    const T* row0 = x + ((n * H + 2 * i) * W) * C;
    const T* row1 = row0 + W * C;
    T* o = out + r * Wo * C;
    uint8_t* k = idx + r * Wo * C;
    for (int64_t j = 0; j < Wo; ++j) {
      const T* a = row0 + 2 * j * C;
      const T* b = a + C;
      const T* c = row1 + 2 * j * C;
      const T* d = c + C;
      T* oj = o + j * C;
      uint8_t* kj = k + j * C;
      for (int64_t ch = 0; ch < C; ++ch) {  // 32-bit lanes throughout, so it vectorizes
        float m = load(a, ch);
        int32_t p = 0;
        float v = load(b, ch);
        bool t = v > m || v != v;
        m = t ? v : m; p = t ? 1 : p;
        v = load(c, ch);
        t = v > m || v != v;
        m = t ? v : m; p = t ? 2 : p;
        v = load(d, ch);
        t = v > m || v != v;
        m = t ? v : m; p = t ? 3 : p;
        if (relu) { t = m <= 0.0f; m = t ? 0.0f : m; p = t ? 4 : p; }
        store(oj, ch, m);
        kj[ch] = static_cast<uint8_t>(p);
      }
    }
  }
}

// U: the element's bits (uint16_t for bf16, uint32_t for float): the gradient is copied or masked to zero
template <typename U>
void backward_rows(const U* __restrict__ g, const uint8_t* __restrict__ idx, U* __restrict__ gx,
                   int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / Ho, i = r % Ho;
    U* __restrict__ row0 = gx + ((n * H + 2 * i) * W) * C;
    U* __restrict__ row1 = row0 + W * C;
    const U* __restrict__ gr = g + r * Wo * C;
    const uint8_t* __restrict__ k = idx + r * Wo * C;
    for (int64_t j = 0; j < Wo; ++j) {
      U* __restrict__ a = row0 + 2 * j * C;
      U* __restrict__ b = a + C;
      U* __restrict__ c = row1 + 2 * j * C;
      U* __restrict__ d = c + C;
      const U* __restrict__ gj = gr + j * C;
      const uint8_t* __restrict__ kj = k + j * C;
#pragma GCC ivdep
      for (int64_t ch = 0; ch < C; ++ch) {
        const U v = gj[ch];
        const U p = kj[ch];
        a[ch] = v & static_cast<U>(-static_cast<U>(p == 0));
        b[ch] = v & static_cast<U>(-static_cast<U>(p == 1));
        c[ch] = v & static_cast<U>(-static_cast<U>(p == 2));
        d[ch] = v & static_cast<U>(-static_cast<U>(p == 3));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pool_forward(const at::Tensor& x, bool relu) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pool2x2: expected a 4-d channels_last tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = H / 2, Wo = W / 2;
  auto out = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto idx = at::empty({N, Ho, Wo, C}, x.options().dtype(at::kByte));
  uint8_t* k = idx.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
    auto* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) { forward_rows<uint16_t>(xp, op, k, H, W, C, Ho, Wo, relu, b, e); });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "pool2x2: expected float32 or bfloat16");
    auto* xp = x.const_data_ptr<float>();
    auto* op = out.mutable_data_ptr<float>();
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) { forward_rows<float>(xp, op, k, H, W, C, Ho, Wo, relu, b, e); });
  }
  return {out, idx};
}

at::Tensor pool_backward(const at::Tensor& grad, const at::Tensor& idx, int64_t H, int64_t W) {
  TORCH_CHECK(grad.dim() == 4 && idx.scalar_type() == at::kByte && idx.dim() == 4 &&
              idx.size(0) == grad.size(0) && idx.size(1) == grad.size(2) && idx.size(2) == grad.size(3) &&
              idx.size(3) == grad.size(1) && H / 2 == grad.size(2) && W / 2 == grad.size(3),
              "pool2x2: the gradient, the indices and the input size do not match");
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kFloat,
              "pool2x2: expected float32 or bfloat16");
  const int64_t N = grad.size(0), C = grad.size(1), Ho = grad.size(2), Wo = grad.size(3);
  auto g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  auto opts = g.options().memory_format(at::MemoryFormat::ChannelsLast);
  // the rows and columns no window covers (an odd map's last) get no gradient
  auto gx = at::empty({N, C, H, W}, opts);  // at::zeros would drop the memory format
  if (H % 2 || W % 2) gx.zero_();
  const uint8_t* k = idx.const_data_ptr<uint8_t>();
  if (g.scalar_type() == at::kBFloat16) {
    auto* gp = reinterpret_cast<const uint16_t*>(g.const_data_ptr());
    auto* xp = reinterpret_cast<uint16_t*>(gx.mutable_data_ptr());
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) { backward_rows<uint16_t>(gp, k, xp, H, W, C, Ho, Wo, b, e); });
  } else {
    auto* gp = reinterpret_cast<const uint32_t*>(g.const_data_ptr());
    auto* xp = reinterpret_cast<uint32_t*>(gx.mutable_data_ptr());
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) { backward_rows<uint32_t>(gp, k, xp, H, W, C, Ho, Wo, b, e); });
  }
  return gx;
}

}  // namespace

TORCH_LIBRARY(cifar4, m) {
  m.def("pool2x2_forward(Tensor x, bool relu) -> (Tensor, Tensor)", &pool_forward);
  m.def("pool2x2_backward(Tensor grad, Tensor idx, int H, int W) -> Tensor", &pool_backward);
}
