// jaxllm's CPU matmul for quantized weights, called from JAX through XLA's FFI
// (jaxllm/cpu_kernels.py builds and registers it; jaxllm/quantize.py says when it runs).
//
// y[r, o] = sum_i x[r, i] * w[o, i] for few rows r (decode), with w int8 or packed int4 and a
// float32 scale per group of input channels. XLA:CPU turns an int8 weight into floats inside
// its vector-matrix loop at ~10 G weights/s here and int4 at a third of that (slower than
// reading float32); this reads each weight byte once for all rows and multiplies in integers,
// as llama.cpp's Q8_0/Q4_0 dot products do: the activations are rounded to int8 per block of
// 32 (scale max|x| / 127), and each block of products is two multiply-adds (maddubs, madd).
// Needs AVX2 and FMA (built with -march=native on the machine that runs it).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include "common.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;  // elements per packed block (and the smallest group)

// Activations are quantized per block of 32 to int8 (as llama.cpp's Q8_0 does), so one block
// of products is two integer multiply-adds instead of 32 float conversions and FMAs.
struct Problem {
  const int8_t* xq;    // [R, I]: x / xs, rounded
  const float* xs;     // [R, I / 32]: each block's scale
  const float* xsum;   // [R, I / group]: each group's sum of dequantized x (for mins)
  const uint8_t* w;    // [O, I * BITS / 8]
  const float* scale;  // [O, I / group]
  const float* mins;   // [O, I / group] or null: w = scale * u + min with u in 0..15
  float* y;            // [R, O]
  int64_t R, I, O, group;
};

// Eight int32 sums of the products of 32 unsigned bytes u with 32 signed bytes s.
inline __m256i dot_us(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// Block b of a weight row as unsigned magnitudes u, and (signed formats) the signs the
// activations take, so that maddubs(u, sign(x, s)) sums the signed products.
template <int BITS>
inline void load_block(const uint8_t* wb, bool has_min, __m256i& u, __m256i& sign_of) {
  if constexpr (BITS == 8) {
    sign_of = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
    u = _mm256_sign_epi8(sign_of, sign_of);  // |w|
  } else {  // byte j: element j in the low nibble, element j + 16 in the high one
    const __m128i nibble = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
    __m256i n = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble),
                                 _mm_and_si128(raw, nibble));
    if (has_min) {
      u = n;
    } else {  // symmetric: w = scale * (n - 8)
      sign_of = _mm256_sub_epi8(n, _mm256_set1_epi8(8));
      u = _mm256_sign_epi8(sign_of, sign_of);
    }
  }
}

// Rows [r0, r0 + TR) of outputs [o0, o1). ``group_of[b]``: block b's scale group.
template <int BITS, int TR>
void run_rows(const Problem& p, const int32_t* group_of, int64_t r0, int64_t o0, int64_t o1) {
  const int64_t blocks = p.I / kBlock, groups = p.I / p.group;
  const int64_t row_bytes = p.I * BITS / 8, block_bytes = kBlock * BITS / 8;
  const bool has_min = p.mins != nullptr, signed_w = !(BITS == 4 && has_min);
  // Two sums per row that blocks take in turn, so that consecutive FMAs of a row do not wait
  // on each other (one was bound by the FMA's latency). The same for every TR, so a row's
  // result does not depend on the rows beside it (batch invariance).
  constexpr int NA = 2;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* wrow = p.w + o * row_bytes;
    const float* srow = p.scale + o * groups;
    __m256 acc[TR][NA];
    for (int t = 0; t < TR; ++t)
      for (int a = 0; a < NA; ++a) acc[t][a] = _mm256_setzero_ps();
    auto step = [&](int64_t b, int a) __attribute__((always_inline)) {
      __m256i u, sign_of;
      load_block<BITS>(wrow + b * block_bytes, has_min, u, sign_of);
      const float ws = srow[group_of[b]];
      for (int t = 0; t < TR; ++t) {
        const int8_t* xb = p.xq + (r0 + t) * p.I + b * kBlock;
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        if (signed_w) x = _mm256_sign_epi8(x, sign_of);
        __m256 d = _mm256_cvtepi32_ps(dot_us(u, x));
        acc[t][a] = _mm256_fmadd_ps(d, _mm256_set1_ps(ws * p.xs[(r0 + t) * blocks + b]), acc[t][a]);
      }
    };
    int64_t b = 0;
    for (; b + NA <= blocks; b += NA) {
#pragma GCC unroll 2
      for (int a = 0; a < NA; ++a) step(b + a, a);
    }
    for (; b < blocks; ++b) step(b, 0);
    for (int t = 0; t < TR; ++t) {
      __m256 total = acc[t][0];
      for (int a = 1; a < NA; ++a) total = _mm256_add_ps(total, acc[t][a]);
      float v = jaxllm::hsum(total);
      if (has_min) {
        const float* gs = p.xsum + (r0 + t) * groups;
        const float* mrow = p.mins + o * groups;
        for (int64_t g = 0; g < groups; ++g) v += mrow[g] * gs[g];
      }
      p.y[(r0 + t) * p.O + o] = v;
    }
  }
}

template <int BITS>
void run(const Problem& p, int64_t o0, int64_t o1) {
  std::unique_ptr<int32_t[]> group_of(new int32_t[p.I / kBlock]);
  for (int64_t b = 0; b < p.I / kBlock; ++b) group_of[b] = static_cast<int32_t>(b * kBlock / p.group);
  int64_t r = 0;
  for (; r + 4 <= p.R; r += 4) run_rows<BITS, 4>(p, group_of.get(), r, o0, o1);
  switch (p.R - r) {
    case 3: run_rows<BITS, 3>(p, group_of.get(), r, o0, o1); break;
    case 2: run_rows<BITS, 2>(p, group_of.get(), r, o0, o1); break;
    case 1: run_rows<BITS, 1>(p, group_of.get(), r, o0, o1); break;
    default: break;
  }
}

// ``w``, ``scale`` and ``mins`` may hold a scanned model's layers stacked on a leading axis
// (then ``layer`` says which one is read, in place); else ``layer`` is 0.
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mins,
                   ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t bits,
                   int32_t group, int32_t has_min) {
  auto xd = x.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || (sd.size() != 2 && sd.size() != 3))
    return ffi::Error::InvalidArgument("x must be [R, I] and scale [O, G] or [L, O, G]");
  Problem p;
  p.R = xd[0];
  p.I = xd[1];
  p.O = sd[sd.size() - 2];
  p.group = group;
  const int64_t L = sd.size() == 3 ? sd[0] : 1, groups_per_layer = p.O * sd[sd.size() - 1];
  if (group % kBlock || p.I % group || sd[sd.size() - 1] != p.I / group)
    return ffi::Error::InvalidArgument("group must be a multiple of 32 dividing the input width");
  const int64_t layer_bytes = p.O * p.I * bits / 8;
  if ((bits != 4 && bits != 8) || (int64_t)w.size_bytes() != L * layer_bytes)
    return ffi::Error::InvalidArgument("weight size does not match its bits");
  const int64_t l = jaxllm::layer_index(layer, L);
  p.w = static_cast<const uint8_t*>(w.untyped_data()) + l * layer_bytes;
  p.scale = scale.typed_data() + l * groups_per_layer;
  p.mins = has_min ? mins.typed_data() + l * groups_per_layer : nullptr;
  p.y = y->typed_data();
  // Activations to int8 per block of 32: xs = max|x| / 127, q = nearest(x * (1 / xs)); the
  // group sums (for mins) are of the rounded values, as the products are.
  const float* xf = x.typed_data();
  const int64_t blocks = p.I / kBlock, groups = p.I / group;
  std::unique_ptr<int8_t[]> xq(new int8_t[p.R * p.I]);
  std::unique_ptr<float[]> xs(new float[p.R * blocks]), xsum(new float[p.R * groups]());
  for (int64_t r = 0; r < p.R; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = xf + r * p.I + b * kBlock;
      float amax = 0.f;
      for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int k = 0; k < kBlock; ++k) {
        const int q = static_cast<int>(std::nearbyint(v[k] * inv));
        xq[r * p.I + b * kBlock + k] = static_cast<int8_t>(q);
        sum += q;
      }
      xs[r * blocks + b] = d;
      xsum[r * groups + b * kBlock / group] += d * sum;
    }
  p.xq = xq.get();
  p.xs = xs.get();
  p.xsum = xsum.get();
  auto fn = bits == 4 ? &run<4> : &run<8>;
  jaxllm::parallel_outputs(pool, p.O, 1, [fn, p](int64_t o0, int64_t o1) { fn(p, o0, o1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group")
                                  .Attr<int32_t>("has_min"));
