// Shared by jaxllm's CPU kernels: the sum of a vector's lanes, and splitting a kernel's outputs
// over XLA's intra-op threads.
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include "xla/ffi/api/ffi.h"

namespace jaxllm {

// The sum of the eight lanes of v.
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Calls fn(o0, o1) on chunks of [0, O) (each a multiple of ``align`` but the last) that the
// caller and the pool's threads claim in turn; the caller waits only for chunks already
// claimed, so a busy pool never blocks it.
inline void parallel_outputs(xla::ffi::ThreadPool& pool, int64_t O, int64_t align,
                             std::function<void(int64_t, int64_t)> fn) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks, chunk, O;
    std::function<void(int64_t, int64_t)> fn;
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto s = std::make_shared<Shared>();
  int64_t chunk = std::max<int64_t>(16, (O + threads * 4 - 1) / (threads * 4));
  s->chunk = (chunk + align - 1) / align * align;
  s->chunks = (O + s->chunk - 1) / s->chunk;
  s->O = O;
  s->fn = std::move(fn);
  auto work = [s]() {
    for (;;) {
      int64_t c = s->next.fetch_add(1);
      if (c >= s->chunks) return;
      s->fn(c * s->chunk, std::min(s->O, (c + 1) * s->chunk));
      s->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, s->chunks); ++t) pool.Schedule(std::function<void()>(work));
  work();
  while (s->done.load(std::memory_order_acquire) < s->chunks) std::this_thread::yield();
}

// Which layer of a stacked weight to read: the scalar operand, clamped as XLA clamps a
// dynamic slice's start.
inline int64_t layer_index(xla::ffi::Buffer<xla::ffi::S32>& layer, int64_t layers) {
  const int64_t l = layer.typed_data()[0];
  return std::min<int64_t>(std::max<int64_t>(l, 0), layers - 1);
}

}  // namespace jaxllm
