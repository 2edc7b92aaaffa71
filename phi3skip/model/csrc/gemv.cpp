// Few-row matrix-vector products for CPU decoding: y[t, n] = sum_k x[t, k] W[n, k], W row-major as nn.Linear
// stores it, in fp32, int8 (one scale per output row) or int4 (q4_1's blocks: 32 codes c for c * scale + offset,
// fp16 scale and offset, byte j holding code j in its low nibble and code j + 16 in its high one). Activations stay fp32: only the weights are
// quantized. Each weight row is read once per call whatever the number of rows of x (at most a few: decode
// and speculative verify steps); rows of W are split over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t GROUP = 32;   // int4 block size (q4_1's)
constexpr int64_t ROWS = 4;     // weight rows per inner loop: one load of x feeds four rows
#ifndef PREFETCH_CHUNKS
#define PREFETCH_CHUNKS 8  // how far ahead the explicit prefetches run, in chunks of ROWS rows (2-32 measured alike
                           // within the noise of a shared machine; 8 the steadiest)
#endif

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// 16 weights as fp32: loaded (fp32), or widened and converted (int8).
#if defined(__AVX512F__)
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
#endif

// fp32 or int8 weights: four weight rows at once against one row of x (one load of x feeds the four), any fewer
// rows and the tail of K in a plain loop. out[r] = x . w[r] (int8: before the row's scale).
template <typename W>
inline void dot_rows(const float* x, const W* w, int64_t K, int64_t rows, float* out) {
  int64_t k = 0;
  for (int64_t r = 0; r < rows; ++r) out[r] = 0.f;
#if defined(__AVX512F__)
  if (rows == ROWS) {
    // One weight row is too short for the hardware prefetcher to ramp up: fetch the chunk PREFETCH_CHUNKS ahead
    // explicitly, as many cache lines an iteration as the four rows consume (4 x 16 weights).
    const char* ahead = reinterpret_cast<const char*>(w + PREFETCH_CHUNKS * ROWS * K);
    constexpr int64_t per_iter = ROWS * 16 * sizeof(W);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 16 <= K; k += 16) {
      for (int64_t b = 0; b < per_iter; b += 64) _mm_prefetch(ahead + k / 16 * per_iter + b, _MM_HINT_T0);
      const __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(xv, load16(w + k), a0);
      a1 = _mm512_fmadd_ps(xv, load16(w + K + k), a1);
      a2 = _mm512_fmadd_ps(xv, load16(w + 2 * K + k), a2);
      a3 = _mm512_fmadd_ps(xv, load16(w + 3 * K + k), a3);
    }
    out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const W* wr = w + r * K;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = (rows == ROWS ? k : 0); j < K; ++j) s += x[j] * static_cast<float>(wr[j]);
    out[r] += s;
  }
}

// int4: up to four weight rows (K / 32 blocks of 16 bytes each) against one row of x. A block's codes c stand for
// c * scale + offset (fp16 each, q4_1's block): its dot product is scale * (x . c) + offset * sum(x over the
// block), the block sums `xsum` made once per row of x.
inline float half_to_float(at::Half h) { return static_cast<float>(h); }

inline void dot_q4(const float* x, const float* xsum, const uint8_t* q, const at::Half* scale,
                   const at::Half* offset, int64_t K, int64_t rows, float* out) {
  const int64_t G = K / GROUP, bytes = K / 2;
  float bias[ROWS] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512F__)
  if (rows == ROWS) {
    __m512 a[ROWS];
    for (int64_t r = 0; r < ROWS; ++r) a[r] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32(15);
    for (int64_t g = 0; g < G; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(q + PREFETCH_CHUNKS * ROWS * bytes + g * 64), _MM_HINT_T0);
      const __m512 xl = _mm512_loadu_ps(x + g * GROUP), xh = _mm512_loadu_ps(x + g * GROUP + 16);
      for (int64_t r = 0; r < ROWS; ++r) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * bytes + g * 16)));
        __m512 d = _mm512_mul_ps(xl, _mm512_cvtepi32_ps(_mm512_and_si512(b, mask)));
        d = _mm512_fmadd_ps(xh, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), d);
        a[r] = _mm512_fmadd_ps(d, _mm512_set1_ps(half_to_float(scale[r * G + g])), a[r]);
        bias[r] += half_to_float(offset[r * G + g]) * xsum[g];
      }
    }
    for (int64_t r = 0; r < ROWS; ++r) out[r] = hsum(a[r]) + bias[r];
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = q + r * bytes + g * GROUP / 2;
      const float* xg = x + g * GROUP;
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int64_t j = 0; j < GROUP / 2; ++j)
        d += xg[j] * static_cast<float>(b[j] & 15) + xg[j + 16] * static_cast<float>(b[j] >> 4);
      acc += d * half_to_float(scale[r * G + g]) + half_to_float(offset[r * G + g]) * xsum[g];
    }
    out[r] = acc;
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "weight: a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

// Rows of W in chunks of ROWS, split over threads; `body(n0, rows)` writes y[:, n0 : n0 + rows].
template <typename F>
void over_rows(int64_t N, F body) {
  const int64_t chunks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, chunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * ROWS;
      body(n0, std::min(ROWS, N - n0));
    }
  });
}

}  // namespace

torch::Tensor gemv_f32(const torch::Tensor& x_in, const torch::Tensor& w) {
  const auto x = x_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), T = x.size(0);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == torch::kFloat, "weight: float32");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(N, [&](int64_t n0, int64_t rows) {
    float out[ROWS];
    for (int64_t t = 0; t < T; ++t) {
      dot_rows(xp + t * K, wp + n0 * K, K, rows, out);
      for (int64_t r = 0; r < rows; ++r) yp[t * N + n0 + r] = out[r];
    }
  });
  return y;
}

torch::Tensor gemv_q8(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scale) {
  const auto x = x_in.contiguous();
  const int64_t N = q.size(0), K = q.size(1), T = x.size(0);
  check(x, q, K);
  TORCH_CHECK(q.scalar_type() == torch::kChar, "weight: int8");
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == torch::kFloat && scale.is_contiguous(),
              "scale: N float32");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(N, [&](int64_t n0, int64_t rows) {
    float out[ROWS];
    for (int64_t t = 0; t < T; ++t) {
      dot_rows(xp + t * K, qp + n0 * K, K, rows, out);
      for (int64_t r = 0; r < rows; ++r) yp[t * N + n0 + r] = out[r] * sp[n0 + r];
    }
  });
  return y;
}

torch::Tensor gemv_q4(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scale,
                      const torch::Tensor& offset) {
  const auto x = x_in.contiguous();
  const int64_t N = q.size(0), K = q.size(1) * 2, T = x.size(0);
  check(x, q, K);
  TORCH_CHECK(q.scalar_type() == torch::kByte, "weight: uint8 (two int4 values a byte)");
  TORCH_CHECK(K % GROUP == 0, "int4: the input width must be a multiple of ", GROUP);
  for (const auto& t : {scale, offset})
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == K / GROUP && t.scalar_type() == torch::kHalf &&
                t.is_contiguous(), "scale, offset: [N, K / 32] float16");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* op = offset.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t G = K / GROUP;
  std::vector<float> xsum(T * G);  // each block's sum of x, for every row of x
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t j = 0; j < GROUP; ++j) acc += xp[t * K + g * GROUP + j];
      xsum[t * G + g] = acc;
    }
  over_rows(N, [&](int64_t n0, int64_t rows) {
    float out[ROWS];
    for (int64_t t = 0; t < T; ++t) {
      dot_q4(xp + t * K, xsum.data() + t * G, qp + n0 * (K / 2), sp + n0 * G, op + n0 * G, K, rows, out);
      for (int64_t r = 0; r < rows; ++r) yp[t * N + n0 + r] = out[r];
    }
  });
  return y;
}

// Registered with the dispatcher, not as a Python module: calls (eager, or from torch.compile'd code) go straight to
// C++ without a Python frame. Shapes for tracing: phi3skip/model/kernels.py registers the fake kernels.
TORCH_LIBRARY(phi3skip_cpu, m) {
  m.def("gemv_f32(Tensor x, Tensor w) -> Tensor");
  m.def("gemv_q8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("gemv_q4(Tensor x, Tensor q, Tensor scale, Tensor offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(phi3skip_cpu, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_q8", &gemv_q8);
  m.impl("gemv_q4", &gemv_q4);
}
