// jaxllm's float32 CPU matmul for a scanned model's layer weights, called through XLA's FFI
// (jaxllm/cpu_kernels.py builds and registers it; jaxllm/quantize.py says when it runs).
//
// y[r, o] = sum_i x[r, i] * w[layer, o, i] for few rows r (decode). Why: a scanned model
// keeps each weight as one [L, O, I] array, and XLA:CPU copies layer ``layer`` out of it
// before every matmul (its dot kernels need their own buffer), which tripled the traffic of
// a decode step; this reads the layer where it lies, each weight once for all rows.
// Each (r, o) sums its products in the same order whatever the other rows are (batch
// invariance). Needs AVX2 and FMA (built with -march=native on the machine that runs it).
#include <immintrin.h>
#include <cstdint>
#include "common.h"

namespace ffi = xla::ffi;

namespace {

// Outputs [o0, o0 + TO) of rows [r0, r0 + TR): TO * TR sums of eight lanes, so the FMAs of
// one step do not wait on each other, and each weight vector loaded once for TR rows.
template <int TO, int TR>
inline void tile(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t r0,
                 int64_t o0) {
  __m256 acc[TO][TR];
  for (int u = 0; u < TO; ++u)
    for (int t = 0; t < TR; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    __m256 xv[TR];
    for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + (r0 + t) * I + i);
    for (int u = 0; u < TO; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + (o0 + u) * I + i);
      for (int t = 0; t < TR; ++t) acc[u][t] = _mm256_fmadd_ps(wv, xv[t], acc[u][t]);
    }
  }
  for (int u = 0; u < TO; ++u)
    for (int t = 0; t < TR; ++t) {
      float v = jaxllm::hsum(acc[u][t]);
      for (int64_t j = i; j < I; ++j) v += x[(r0 + t) * I + j] * w[(o0 + u) * I + j];
      y[(r0 + t) * O + o0 + u] = v;
    }
}

// All rows of outputs [o0, o1): each group of TO weight rows stays in cache while every
// row of x passes over it.
template <int TO>
void outputs(const float* x, const float* w, float* y, int64_t R, int64_t I, int64_t O,
             int64_t o) {
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) tile<TO, 3>(x, w, y, I, O, r, o);
  if (R - r == 2) tile<TO, 2>(x, w, y, I, O, r, o);
  if (R - r == 1) tile<TO, 1>(x, w, y, I, O, r, o);
}

ffi::Error FMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || (wd.size() != 2 && wd.size() != 3))
    return ffi::Error::InvalidArgument("x must be [R, I] and w [O, I] or [L, O, I]");
  const int64_t R = xd[0], I = xd[1], O = wd[wd.size() - 2];
  const int64_t L = wd.size() == 3 ? wd[0] : 1;
  if (wd[wd.size() - 1] != I) return ffi::Error::InvalidArgument("x and w widths differ");
  const float* wl = w.typed_data() + jaxllm::layer_index(layer, L) * O * I;
  const float* xf = x.typed_data();
  float* yf = y->typed_data();
  constexpr int TO = 4;
  jaxllm::parallel_outputs(pool, O, TO, [=](int64_t o0, int64_t o1) {
    int64_t o = o0;
    for (; o + TO <= o1; o += TO) outputs<TO>(xf, wl, yf, R, I, O, o);
    for (; o < o1; ++o) outputs<1>(xf, wl, yf, R, I, O, o);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmFMatmul, FMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
