// C++ kernels for MindSpore's CPU (kernels.py builds and loads them), each in place of a few MindSpore kernels that
// cost more in passes over memory or in launches than the work. AdamW and QkvRope compute what the ops they replace
// compute, in their order and in fp32 without fused multiply-adds (-ffp-contract=off), so the results are the same
// bits; RmsNorm and Linear16 compute the same sums in another order. tests/test_kernels.py checks each. Each is a MindSpore "aot"
// custom op: a function over the inputs' and outputs' buffers, and its output shapes and types (nameInferShape,
// nameInferType).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The number of rows of a tensor taken as [rows, last axis]: the product of all but its last dimension.
static int64_t leading_size(int ndim, const int64_t *shape) {
  int64_t rows = 1;
  for (int d = 0; d < ndim - 1; ++d) rows *= shape[d];
  return rows;
}

// AdamW on one tensor, train.update's six elementwise ops (each a pass over the whole tensor) in one pass:
// inputs p, m, v, g and s = (decay, step_size, eps, m_rate, v_rate, beta1, beta2), where decay is 1 - lr * weight_decay
// or 1 for a tensor without weight decay; outputs p', m', v'.
static void adamw_range(const float *const *in, float *const *out, int64_t begin, int64_t end) {
  const float *p = in[0], *m = in[1], *v = in[2], *g = in[3], *s = in[4];
  const float decay = s[0], step_size = s[1], eps = s[2], m_rate = s[3], v_rate = s[4], beta1 = s[5], beta2 = s[6];
  for (int64_t i = begin; i < end; ++i) {
    const float mk = beta1 * m[i] + m_rate * g[i];
    const float vk = beta2 * v[i] + v_rate * (g[i] * g[i]);
    out[0][i] = p[i] * decay - step_size * (mk / (std::sqrt(vk) + eps));
    out[1][i] = mk;
    out[2][i] = vk;
  }
}

extern "C" int AdamW(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  if (nparam != 8) return 1;
  int64_t n = 1;
  for (int d = 0; d < ndims[0]; ++d) n *= shapes[0][d];
  const float *in[5];
  float *out[3];
  for (int i = 0; i < 5; ++i) in[i] = static_cast<const float *>(params[i]);
  for (int i = 0; i < 3; ++i) out[i] = static_cast<float *>(params[5 + i]);
  // a thread per core for large tensors (memory-bound: one core does not saturate the bus); small ones in this one
  const int64_t min_per_thread = 1 << 16;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n / min_per_thread));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(adamw_range, in, out, n * t / threads, n * (t + 1) / threads);
  adamw_range(in, out, 0, n / threads);
  for (auto &thread : pool) thread.join();
  return 0;
}

// Output shapes and types for MindSpore: those of p, three times. In C++ rather than Python, because a graph whose
// outputs are dicts runs its kernels where Python shape functions cannot be called.
class AotExtra;
enum TypeId : int {};

extern "C" std::vector<std::vector<int64_t>> AdamWInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  const std::vector<int64_t> shape(shapes[0], shapes[0] + ndims[0]);
  return {shape, shape, shape};
}

extern "C" std::vector<TypeId> AdamWInferType(std::vector<TypeId> types, AotExtra *extra) {
  return {types[0], types[0], types[0]};
}

// RMSNorm without a weight (decoding folds it into the next matmul): y = x / sqrt(mean(x^2) + eps) over the last
// axis, as llama.rms_norm's six MindSpore kernels compute it; the sum of squares runs in order, as llama2.c's run.c
// sums it. Inputs x [..., D] and eps [1]; output y [..., D].
extern "C" int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if (nparam != 3) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = leading_size(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float eps = static_cast<const float *>(params[1])[0];
  float *y = static_cast<float *>(params[2]);
  for (int64_t r = 0; r < rows; ++r, x += width, y += width) {
    float squares = 0.0f;
    for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(squares / width + eps);
    for (int64_t i = 0; i < width; ++i) y[i] = x[i] * scale;
  }
  return 0;
}

extern "C" std::vector<int64_t> RmsNormInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

extern "C" TypeId RmsNormInferType(std::vector<TypeId> types, AotExtra *extra) { return types[0]; }

// Half-split RoPE as llama.apply_rope computes it, x * cos + rotate_half(x) * sin, where rotate_half(x) =
// (-x[hd/2:], x[:hd/2]) exactly (apply_rope's matmul by a matrix of 0 and +-1), so the products and their sum round
// as its Mul, Mul and Add do. One head of width hd at x, into y.
static void rotate(const float *x, const float *cos, const float *sin, float *y, int64_t width) {
  const int64_t half = width / 2;
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < width; ++i) y[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// The fused [wq; wk; wv] projection's output split into attention's operands, q and k rotated: what llama.attention's
// splits, RoPE and transposes compute, in one kernel for seven. Inputs qkv [B, T, (G + 2) * KV, hd] (G query heads
// per kv head: q's G * KV heads, then k's KV, then v's KV), cos and sin [B, T, 1, hd], and kv [KV] (only its shape
// is read); outputs q [B, KV, G * T, hd] (query head kv * G + g at position t in row g * T + t), k and v [B, KV, T, hd].
extern "C" int QkvRope(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if (nparam != 7 || ndims[0] != 4) return 1;
  const int64_t batch = shapes[0][0], length = shapes[0][1], heads = shapes[0][2], width = shapes[0][3];
  const int64_t kv_heads = shapes[3][0], group = heads / kv_heads - 2;
  const float *qkv = static_cast<const float *>(params[0]), *cos = static_cast<const float *>(params[1]),
              *sin = static_cast<const float *>(params[2]);
  float *q = static_cast<float *>(params[4]), *k = static_cast<float *>(params[5]), *v = static_cast<float *>(params[6]);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < length; ++t) {
      const float *x = qkv + (b * length + t) * heads * width, *c = cos + (b * length + t) * width,
                  *s = sin + (b * length + t) * width;
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        for (int64_t g = 0; g < group; ++g)
          rotate(x + (kv * group + g) * width, c, s, q + ((b * kv_heads + kv) * group * length + g * length + t) * width,
                 width);
        const int64_t out = ((b * kv_heads + kv) * length + t) * width;
        rotate(x + (group * kv_heads + kv) * width, c, s, k + out, width);
        const float *value = x + ((group + 1) * kv_heads + kv) * width;
        for (int64_t i = 0; i < width; ++i) v[out + i] = value[i];
      }
    }
  return 0;
}

extern "C" std::vector<std::vector<int64_t>> QkvRopeInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  const int64_t batch = shapes[0][0], length = shapes[0][1], heads = shapes[0][2], width = shapes[0][3];
  const int64_t kv_heads = shapes[3][0], group = heads / kv_heads - 2;
  return {{batch, kv_heads, group * length, width}, {batch, kv_heads, length, width}, {batch, kv_heads, length, width}};
}

extern "C" std::vector<TypeId> QkvRopeInferType(std::vector<TypeId> types, AotExtra *extra) {
  return {types[0], types[0], types[0]};
}

// The gradient of a softmax over the last axis, dx = y * (dy - sum(y * dy)), from its output y and the incoming dy
// (MindSpore's own: four kernels, its row sum slow on CPU); rows split over the cores. The sum runs in eight lanes,
// another order than MindSpore's. Inputs y and dy [..., S]; output dx [..., S].
static void softmax_grad_rows(const float *y, const float *dy, float *dx, int64_t width, int64_t first, int64_t last) {
  for (int64_t r = first; r < last; ++r) {
    const float *yr = y + r * width, *dyr = dy + r * width;
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
      for (int lane = 0; lane < 8; ++lane) lanes[lane] += yr[i + lane] * dyr[i + lane];
    for (; i < width; ++i) lanes[0] += yr[i] * dyr[i];
    const float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (i = 0; i < width; ++i) dx[r * width + i] = yr[i] * (dyr[i] - sum);
  }
}

extern "C" int SoftmaxGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                           void *extra) {
  if (nparam != 3) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = leading_size(ndims[0], shapes[0]);
  const float *y = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(),
                                                                 rows * width / (1 << 16)));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back(softmax_grad_rows, y, dy, dx, width, rows * t / threads, rows * (t + 1) / threads);
  softmax_grad_rows(y, dy, dx, width, 0, rows / threads);
  for (auto &thread : pool) thread.join();
  return 0;
}

extern "C" std::vector<int64_t> SoftmaxGradInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

extern "C" TypeId SoftmaxGradInferType(std::vector<TypeId> types, AotExtra *extra) { return types[0]; }

// RMSNorm with a weight, for training: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row (the sum of squares
// in order, as RmsNorm), and its gradient from x, w and dy: dx = r * w * dy - x * r^3 * mean(w * dy * x),
// dw = sum over rows of dy * x * r (the rows split over the cores in fixed blocks, the blocks' sums added in order).
// MindSpore's own: some twenty small kernels a norm, forward and backward. Inputs x [..., D], w [D], eps [1].
static float inverse_rms(const float *x, int64_t width, float eps) {
  float squares = 0.0f;
  for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
  return 1.0f / std::sqrt(squares / width + eps);
}

extern "C" int RmsNormWeighted(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = leading_size(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  for (int64_t r = 0; r < rows; ++r, x += width, y += width) {
    const float scale = inverse_rms(x, width, eps);
    for (int64_t i = 0; i < width; ++i) y[i] = x[i] * scale * w[i];
  }
  return 0;
}

extern "C" std::vector<int64_t> RmsNormWeightedInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

extern "C" TypeId RmsNormWeightedInferType(std::vector<TypeId> types, AotExtra *extra) { return types[0]; }

static void rms_norm_grad_rows(const float *x, const float *w, const float *dy, float eps, int64_t width, float *dx,
                               double *dw, int64_t first, int64_t last) {
  for (int64_t r = first; r < last; ++r) {
    const float *xr = x + r * width, *dyr = dy + r * width;
    const float scale = inverse_rms(xr, width, eps);
    float dot = 0.0f;
    for (int64_t i = 0; i < width; ++i) dot += w[i] * dyr[i] * xr[i];
    const float correction = scale * scale * scale * dot / width;
    for (int64_t i = 0; i < width; ++i) {
      dx[r * width + i] = scale * w[i] * dyr[i] - xr[i] * correction;
      dw[i] += static_cast<double>(dyr[i]) * xr[i] * scale;
    }
  }
}

// inputs x, w, eps, dy; outputs dx [..., D], dw [D]
extern "C" int RmsNormWeightedGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 6) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = leading_size(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[1]),
              *dy = static_cast<const float *>(params[3]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *dx = static_cast<float *>(params[4]), *dw = static_cast<float *>(params[5]);
  const int64_t block = 256, blocks = (rows + block - 1) / block;
  std::vector<double> partial(blocks * width, 0.0);
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      rms_norm_grad_rows(x, w, dy, eps, width, dx, partial.data() + b * width, b * block, std::min(rows, (b + 1) * block));
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), blocks));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, blocks * t / threads, blocks * (t + 1) / threads);
  run(0, blocks / threads);
  for (auto &thread : pool) thread.join();
  for (int64_t i = 0; i < width; ++i) {
    double sum = 0.0;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[b * width + i];
    dw[i] = static_cast<float>(sum);
  }
  return 0;
}

extern "C" std::vector<std::vector<int64_t>> RmsNormWeightedGradInferShape(int *ndims, int64_t **shapes,
                                                                             AotExtra *extra) {
  return {std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]), std::vector<int64_t>(shapes[1], shapes[1] + ndims[1])};
}

extern "C" std::vector<TypeId> RmsNormWeightedGradInferType(std::vector<TypeId> types, AotExtra *extra) {
  return {types[0], types[0]};
}

// Linear16: y[M, N] = x[M, K] · W[N, K]ᵀ with W held in 16 bits (float16 or bfloat16) and widened as it is read,
// for the few rows of a decoding step. Memory is the cost there: each weight is read once, in its 16 bits, where
// widening a copy first reads it, writes twice its bytes and reads those again. The rows of W are split over the
// cores. On x86 with AVX2, FMA and F16C (checked at run time) eight weights are widened in a register at a time and
// multiplied into up to four rows of x at once; elsewhere each row of W is widened into a buffer in the core's cache
// and dotted with every row of x. Both sum in lanes, another order than BLAS's: equal to it within fp32 rounding.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (!mantissa) {
    bits = sign;
  } else {  // subnormal: shift the mantissa up to its leading one
    uint32_t m = mantissa, shifts = 0;
    while (!(m & 0x400u)) m <<= 1, ++shifts;
    bits = sign | ((113 - shifts) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float bfloat_to_float(uint16_t b) {  // bfloat16 is the top half of a float32
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static void linear16_rows(const float *x, const uint16_t *w, float *y, int64_t M, int64_t K, int64_t N, bool bfloat,
                          int64_t begin, int64_t end) {
  std::vector<float> row(K);
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t k = 0; k < K; ++k) row[k] = bfloat ? bfloat_to_float(w[n * K + k]) : half_to_float(w[n * K + k]);
    for (int64_t m = 0; m < M; ++m) {
      constexpr int lanes = 16;
      float acc[lanes] = {};
      int64_t k = 0;
      for (; k + lanes <= K; k += lanes)
        for (int l = 0; l < lanes; ++l) acc[l] += row[k + l] * x[m * K + k + l];
      float sum = 0.0f;
      for (int l = 0; l < lanes; ++l) sum += acc[l];
      for (; k < K; ++k) sum += row[k] * x[m * K + k];
      y[m * N + n] = sum;
    }
  }
}
#if defined(__x86_64__)
// The x86 path of Linear16 (AVX2, FMA, F16C; chosen at run time): eight weights widened in a register at a time and
// multiplied into up to four rows of x at once, so each weight is loaded once for every row.
template <bool bfloat>
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const uint16_t *w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w));
  if (bfloat) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  return _mm256_cvtph_ps(raw);
}

__attribute__((target("avx2,fma,f16c"))) static inline float lanes_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool bfloat>
__attribute__((target("avx2,fma,f16c"))) static void linear16_rows_avx2(const float *x, const uint16_t *w, float *y,
                                                                      int64_t M, int64_t K, int64_t N, int64_t begin,
                                                                      int64_t end) {
  const int64_t K8 = K / 8 * 8;
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t *wn = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - m0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 wk = load8<bfloat>(wn + k);
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + (m0 + r) * K + k), acc[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float sum = lanes_sum(acc[r]);
        for (int64_t k = K8; k < K; ++k) {
          const float wk = bfloat ? bfloat_to_float(wn[k]) : half_to_float(wn[k]);
          sum += wk * x[(m0 + r) * K + k];
        }
        y[(m0 + r) * N + n] = sum;
      }
    }
  }
}
#endif

extern "C" int Linear16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2) return 1;
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[1][0];
  const float *x = static_cast<const float *>(params[0]);
  const uint16_t *w = static_cast<const uint16_t *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const bool bfloat = std::strstr(dtypes[1], "bfloat16") != nullptr;
  auto rows = [=](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      (bfloat ? linear16_rows_avx2<true> : linear16_rows_avx2<false>)(x, w, y, M, K, N, begin, end);
      return;
    }
#endif
    linear16_rows(x, w, y, M, K, N, bfloat, begin, end);
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), N / 64));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(rows, N * t / threads, N * (t + 1) / threads);
  rows(0, N / threads);
  for (auto &thread : pool) thread.join();
  return 0;
}

extern "C" std::vector<int64_t> Linear16InferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  return {shapes[0][0], shapes[1][0]};
}

extern "C" TypeId Linear16InferType(std::vector<TypeId> types, AotExtra *extra) { return types[0]; }
