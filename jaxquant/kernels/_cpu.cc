// The CPU lookup matmul of jaxquant.kernels.cpu: y[M, N] = x[M, K] @ W[K, N] in float32 for a
// weight W[k, n] = codebook[c[k, n]] * scale[k / B, n] stored in jaxquant's packed layout
// ("bitstream-u32" version 1, packed along K: see jaxquant/packing.py), registered with XLA
// as an FFI custom call.
//
// Layout. Codes are packed along K in groups of 32: group g of column n is the `bits` words
// codes[g * bits + t, n], t < bits, a little-endian bit stream in which code i of the group
// occupies stream bits [i * bits, (i + 1) * bits). Every column is laid out the same way, so a
// SIMD register holding the words of 8 consecutive columns decodes 8 codes with the same shifts:
// the kernels vectorise over N.
//
// Lookup. A 2^b-entry codebook is looked up in registers, as bitsandbytes and llama.cpp do:
// AVX2's vpermps picks 8 lanes from an 8-entry table by the low 3 bits of each lane; 4- and
// 5-bit codes pick from 2 and 4 tables and blend on the higher code bits (moved to the sign
// bit, which vblendvps reads), so no mask is needed below 6 bits. 6 to 8 bits gather from the
// codebook in memory.
//
// Three loop nests:
//  - M = 1, 1-, 2- or 4-bit codes, blocks of whole groups: the byte-table GEMV (gemv_tables),
//    threaded over ranges of K blocks into partial outputs.
//  - other M = 1 products with blocks of whole groups, on AVX2: a GEMV that accumulates
//    Σ_k x[k] codebook[c[k, n]] over each block in registers and adds scale[b, n] times it to
//    y[n] at the block's end: per code a shift, the lookup and one FMA. K runs in the outer
//    loop over blocks, so each word row is read contiguously across the column range.
//  - otherwise, on AVX2: a K chunk of a 16-column strip is decoded and scaled into a small
//    buffer (L1-resident), then multiplied into all M rows by a 6 x 16 register-blocked
//    micro-kernel.
// The last two are threaded over column ranges. A scalar version of the arithmetic serves CPUs
// without AVX2 and the last N % 8 (or N % 16) columns. All threads run on XLA's intra-op pool.
//
// Scales are float32, bfloat16 or float16 (others are decoded to float32 by the caller);
// activations float32 or bfloat16 (converted to float32 once, before the loops).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JAXQUANT_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

enum class ScaleKind { kF32, kBF16, kF16 };
enum Isa : int64_t { kBest = 0, kScalar = 1, kAvx2 = 2 };

struct Problem {
  const float* x;          // [m, k] float32, k the stored (padded) length
  const uint32_t* codes;   // [k * bits / 32, n]
  const void* scales;      // [ceil(k / block), n], of `scale_kind`
  ScaleKind scale_kind;
  const float* codebook;   // 256 entries, zero past 2^bits
  float* y;                // [m, n], zeroed before the loops
  int64_t m, k, n, bits, block;
};

// A kernel over the column range [n0, n1) of y.
using Range = void (*)(const Problem&, int64_t, int64_t);

// ---------------------------------------------------------------------------------------------
// Scalar arithmetic: the fallback, and the columns the vector loops leave over.

float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

float scale_at(const Problem& p, int64_t row, int64_t col) {
  const int64_t i = row * p.n + col;
  switch (p.scale_kind) {
    case ScaleKind::kF32: return static_cast<const float*>(p.scales)[i];
    case ScaleKind::kBF16:
      return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p.scales)[i]) << 16);
    case ScaleKind::kF16: return half_to_float(static_cast<const uint16_t*>(p.scales)[i]);
  }
  return 0.0f;
}

uint32_t code_at(const Problem& p, int64_t k, int64_t col) {
  const int64_t start = (k % 32) * p.bits;  // stream bit within the group
  const int64_t row = (k / 32) * p.bits + start / 32;
  const int64_t offset = start % 32;
  uint64_t word = p.codes[row * p.n + col] >> offset;
  if (offset + p.bits > 32) word |= static_cast<uint64_t>(p.codes[(row + 1) * p.n + col]) << (32 - offset);
  return static_cast<uint32_t>(word) & ((1u << p.bits) - 1u);
}

void matmul_scalar(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t k = 0; k < p.k; ++k) {
    const int64_t scale_row = k / p.block;
    for (int64_t col = n0; col < n1; ++col) {
      const float w = p.codebook[code_at(p, k, col)] * scale_at(p, scale_row, col);
      for (int64_t r = 0; r < p.m; ++r) p.y[r * p.n + col] += p.x[r * p.k + k] * w;
    }
  }
}

// The GEMV (M = 1) for codes that tile bytes (1, 2 and 4 bits) and blocks of whole groups, by
// byte tables: byte j of a group's stream holds codes i in [j C, (j + 1) C), C = 8 / bits, so
// its share of Σ_k x[k] codebook[c[k, n]] is T_j[byte], a 256-entry table of Σ_i x[i] cb[code i]
// built once per group for every column (T_j[16 h + l] = L_j[l] + H_j[h], the tables of its two
// nibbles). A column then costs one load and one add per byte, 8 / bits weights, and no
// cross-lane permute (AMD Zen 1 runs vpermps at one per 4 cycles): it beats the register lookup
// (benchmarks/RESULTS.md).

// out[v] = Σ_i x[i] codebook[(v >> i bits) & mask] over the 4 / BITS codes of a nibble v.
template <int BITS>
void nibble_table(const float* x, const float* codebook, float (&out)[16]) {
  constexpr uint32_t kMask = (1u << BITS) - 1;
  for (uint32_t v = 0; v < 16; ++v) {
    float sum = 0.0f;
    for (int i = 0; i < 4 / BITS; ++i) sum += x[i] * codebook[(v >> (i * BITS)) & kMask];
    out[v] = sum;
  }
}

// Σ_j T_j[byte j of the stream] over one group, for the two adjacent columns whose words start
// at `words` (row stride `stride`): one 64-bit load holds a word of each, shifted in a register.
template <int BITS>
inline void group_sums(const float* tables, const uint32_t* words, int64_t stride, float* out) {
  float sums[2][4] = {};  // four chains of adds per column
  for (int w = 0; w < BITS; ++w) {
    uint64_t pair;
    std::memcpy(&pair, words + w * stride, sizeof pair);
#if defined(__GNUC__)
    asm("" : "+r"(pair));  // keep it in a register: GCC would load it again for each byte
#endif
    for (int c = 0; c < 2; ++c) {
      for (int b = 0; b < 4; ++b, pair >>= 8) {
        sums[c][b] += tables[1024 * w + 256 * b + (pair & 0xffu)];
      }
    }
  }
  out[0] += (sums[0][0] + sums[0][1]) + (sums[0][2] + sums[0][3]);
  out[1] += (sums[1][0] + sums[1][1]) + (sums[1][2] + sums[1][3]);
}

// y[:] += s[block, :] * acc (a loop the compiler vectorises for float32 and bfloat16).
template <ScaleKind S>
void add_scaled(const Problem& p, int64_t block, const float* acc, float* y) {
  const int64_t row = block * p.n;
  for (int64_t col = 0; col < p.n; ++col) {
    float scale;
    if constexpr (S == ScaleKind::kF32) {
      scale = static_cast<const float*>(p.scales)[row + col];
    } else if constexpr (S == ScaleKind::kBF16) {
      scale = bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p.scales)[row + col]) << 16);
    } else {
      scale = half_to_float(static_cast<const uint16_t*>(p.scales)[row + col]);
    }
    y[col] += scale * acc[col];
  }
}

// y[:] += x[K_r] @ W[K_r, :] for the rows K_r of blocks [b0, b1), by the byte tables.
template <int BITS, ScaleKind S>
void gemv_tables(const Problem& p, int64_t b0, int64_t b1, float* y) {
  constexpr int kBytes = 4 * BITS, kPerNibble = 4 / BITS;  // stream bytes per group
  alignas(64) float tables[kBytes * 256];
  std::vector<float> acc(p.n, 0.0f);
  const int64_t per_block = p.block / 32, groups = p.k / 32;
  const int64_t g1 = std::min(groups, b1 * per_block);
  for (int64_t g = b0 * per_block; g < g1; ++g) {
    const float* x = p.x + 32 * g;
    for (int j = 0; j < kBytes; ++j) {
      float low[16], high[16];
      nibble_table<BITS>(x + 2 * kPerNibble * j, p.codebook, low);
      nibble_table<BITS>(x + 2 * kPerNibble * j + kPerNibble, p.codebook, high);
      float* table = tables + 256 * j;
      for (int h = 0; h < 16; ++h) {
        for (int l = 0; l < 16; ++l) table[16 * h + l] = low[l] + high[h];
      }
    }
    const uint32_t* words = p.codes + g * BITS * p.n;
    int64_t col = 0;
    for (; col + 1 < p.n; col += 2) group_sums<BITS>(tables, words + col, p.n, &acc[col]);
    if (col < p.n) {  // the last column of an odd N: its neighbour's word is not read
      float pair[2] = {0.0f, 0.0f};
      uint32_t lone[BITS * 2] = {};
      for (int w = 0; w < BITS; ++w) lone[2 * w] = words[w * p.n + col];
      group_sums<BITS>(tables, lone, 2, pair);
      acc[col] += pair[0];
    }
    if ((g + 1) % per_block == 0 || g + 1 == groups) {
      add_scaled<S>(p, g / per_block, acc.data(), y);
      std::fill(acc.begin(), acc.end(), 0.0f);
    }
  }
}

bool takes_tables(const Problem& p) {
  return p.m == 1 && p.block % 32 == 0 && (p.bits == 1 || p.bits == 2 || p.bits == 4);
}

// A table GEMV over the blocks [b0, b1) of K, adding into y [N].
using BlockRange = void (*)(const Problem&, int64_t, int64_t, float*);

template <ScaleKind S>
BlockRange table_kernel_for(int64_t bits) {
  return bits == 1 ? gemv_tables<1, S> : bits == 2 ? gemv_tables<2, S> : gemv_tables<4, S>;
}

BlockRange table_kernel(int64_t bits, ScaleKind kind) {
  switch (kind) {
    case ScaleKind::kF32: return table_kernel_for<ScaleKind::kF32>(bits);
    case ScaleKind::kBF16: return table_kernel_for<ScaleKind::kBF16>(bits);
    case ScaleKind::kF16: return table_kernel_for<ScaleKind::kF16>(bits);
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// AVX2.

#ifdef JAXQUANT_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

struct Tables {
  __m256 t[4];  // codebook entries 0-7, 8-15, 16-23, 24-31
};

// The codebook in registers. Below 3 bits the 8-entry table repeats the codebook, so the code
// bits above BITS that vpermps reads do not matter.
template <int BITS>
AVX2 INLINE Tables load_tables(const float* codebook) {
  alignas(32) float entries[32];
  for (int i = 0; i < 32; ++i) entries[i] = codebook[BITS < 3 ? i % (1 << BITS) : i];
  Tables tables;
  for (int i = 0; i < 4; ++i) tables.t[i] = _mm256_load_ps(entries + 8 * i);
  return tables;
}

// Lanes whose code bit `bit` is set, as the sign bits vblendvps reads (the code may carry
// higher garbage bits: they are shifted out).
template <int BIT>
AVX2 INLINE __m256 bit_as_sign(__m256i code) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(code, 31 - BIT));
}

// codebook[code] per lane. Below 6 bits only the low BITS bits of `code` are read.
template <int BITS>
AVX2 INLINE __m256 lookup(const Tables& tables, const float* codebook, __m256i code) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(tables.t[0], code);
  } else if constexpr (BITS == 4) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.t[0], code),
                            _mm256_permutevar8x32_ps(tables.t[1], code), bit_as_sign<3>(code));
  } else if constexpr (BITS == 5) {
    const __m256 high = bit_as_sign<3>(code);
    const __m256 low_half = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.t[0], code),
                                             _mm256_permutevar8x32_ps(tables.t[1], code), high);
    const __m256 high_half = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tables.t[2], code),
                                              _mm256_permutevar8x32_ps(tables.t[3], code), high);
    return _mm256_blendv_ps(low_half, high_half, bit_as_sign<4>(code));
  } else {
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    return _mm256_i32gather_ps(codebook, _mm256_and_si256(code, mask), 4);
  }
}

// Code I of a group for 8 columns: `words` points at the group's first word of the first column,
// `stride` is N. Higher bits than BITS may be set.
template <int BITS, int I>
AVX2 INLINE __m256i extract(const uint32_t* words, int64_t stride) {
  constexpr int kStart = I * BITS, kWord = kStart / 32, kOffset = kStart % 32;
  const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + kWord * stride));
  __m256i code = kOffset ? _mm256_srli_epi32(word, kOffset) : word;
  if constexpr (kOffset + BITS > 32) {
    const __m256i next =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + (kWord + 1) * stride));
    code = _mm256_or_si256(code, _mm256_slli_epi32(next, 32 - kOffset));
  }
  return code;
}

template <ScaleKind S>
AVX2 INLINE __m256 load_scales(const void* scales, int64_t i) {
  if constexpr (S == ScaleKind::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(scales) + i);
  } else {
    const __m128i halves =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(scales) + i));
    if constexpr (S == ScaleKind::kF16) return _mm256_cvtph_ps(halves);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  }
}

// Code I of a group for V vectors of 8 columns, times x[I], added to acc.
template <int BITS, int V, int I>
AVX2 INLINE void gemv_step(const Tables& tables, const float* codebook, const uint32_t* words,
                           int64_t stride, const float* x, __m256 (&acc)[V]) {
  const __m256 xi = _mm256_broadcast_ss(x + I);
  for (int v = 0; v < V; ++v) {
    const __m256 w = lookup<BITS>(tables, codebook, extract<BITS, I>(words + 8 * v, stride));
    acc[v] = _mm256_fmadd_ps(xi, w, acc[v]);
  }
}

template <int BITS, int V, int... I>
AVX2 INLINE void gemv_group(const Tables& tables, const float* codebook, const uint32_t* words,
                            int64_t stride, const float* x, __m256 (&acc)[V],
                            std::integer_sequence<int, I...>) {
  (gemv_step<BITS, V, I>(tables, codebook, words, stride, x, acc), ...);
}

// One block of y[col : col + 8V] += scale * Σ_k x[k] codebook[c[k, col:]].
template <int BITS, ScaleKind S, int V>
AVX2 void gemv_columns(const Problem& p, const Tables& tables, int64_t block, int64_t col) {
  const int64_t groups = p.block / 32;
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t g = block * groups; g < (block + 1) * groups && g * 32 < p.k; ++g) {
    gemv_group<BITS, V>(tables, p.codebook, p.codes + g * BITS * p.n + col, p.n, p.x + g * 32,
                        acc, std::make_integer_sequence<int, 32>{});
  }
  for (int v = 0; v < V; ++v) {
    float* y = p.y + col + 8 * v;
    const __m256 s = load_scales<S>(p.scales, block * p.n + col + 8 * v);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(s, acc[v], _mm256_loadu_ps(y)));
  }
}

template <int BITS, ScaleKind S>
AVX2 void gemv_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const Tables tables = load_tables<BITS>(p.codebook);
  const int64_t blocks = (p.k + p.block - 1) / p.block;
  const int64_t wide_end = n0 + (n1 - n0) / 32 * 32, end = n0 + (n1 - n0) / 8 * 8;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t col = n0; col < wide_end; col += 32) gemv_columns<BITS, S, 4>(p, tables, block, col);
    for (int64_t col = wide_end; col < end; col += 8) gemv_columns<BITS, S, 1>(p, tables, block, col);
  }
  matmul_scalar(p, end, n1);
}

constexpr int kStrip = 16;     // columns per strip: two vectors
constexpr int kChunk = 128;    // rows of K per decoded chunk (a multiple of 32)
constexpr int kMicroRows = 6;  // rows of x per micro-kernel call

// Code I of group g for the strip at `col`, times its scales (s0, s1 for the strip's two
// vectors; looked up here when the scale row changes within the group), into buffer[I, :].
template <int BITS, ScaleKind S, bool UNIFORM, int I>
AVX2 INLINE void decode_step(const Problem& p, const Tables& tables, int64_t g, int64_t col,
                             __m256 s0, __m256 s1, float* buffer) {
  const uint32_t* words = p.codes + g * BITS * p.n + col;
  if constexpr (!UNIFORM) {
    const int64_t row = (g * 32 + I) / p.block;
    s0 = load_scales<S>(p.scales, row * p.n + col);
    s1 = load_scales<S>(p.scales, row * p.n + col + 8);
  }
  const __m256 w0 = lookup<BITS>(tables, p.codebook, extract<BITS, I>(words, p.n));
  const __m256 w1 = lookup<BITS>(tables, p.codebook, extract<BITS, I>(words + 8, p.n));
  _mm256_storeu_ps(buffer + I * kStrip, _mm256_mul_ps(w0, s0));
  _mm256_storeu_ps(buffer + I * kStrip + 8, _mm256_mul_ps(w1, s1));
}

// W[32g + i, col + j] (scaled) into buffer[i * kStrip + j] for the 32 codes i of group g.
template <int BITS, ScaleKind S, bool UNIFORM, int... I>
AVX2 INLINE void decode_group(const Problem& p, const Tables& tables, int64_t g, int64_t col,
                              float* buffer, std::integer_sequence<int, I...>) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  if constexpr (UNIFORM) {
    const int64_t row = g * 32 / p.block;
    s0 = load_scales<S>(p.scales, row * p.n + col);
    s1 = load_scales<S>(p.scales, row * p.n + col + 8);
  }
  (decode_step<BITS, S, UNIFORM, I>(p, tables, g, col, s0, s1, buffer), ...);
}

// y[r, :kStrip] += x[r, :rows] @ buffer[:rows, :kStrip] for r < R.
template <int R>
AVX2 void micro_kernel(const float* x, int64_t x_stride, const float* buffer, int64_t rows,
                       float* y, int64_t y_stride) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_ps(y + r * y_stride);
    acc[r][1] = _mm256_loadu_ps(y + r * y_stride + 8);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 w0 = _mm256_loadu_ps(buffer + i * kStrip);
    const __m256 w1 = _mm256_loadu_ps(buffer + i * kStrip + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xi = _mm256_broadcast_ss(x + r * x_stride + i);
      acc[r][0] = _mm256_fmadd_ps(xi, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xi, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * y_stride, acc[r][0]);
    _mm256_storeu_ps(y + r * y_stride + 8, acc[r][1]);
  }
}

template <int... R>
AVX2 void micro_rows(int64_t rows_of_x, const float* x, int64_t x_stride, const float* buffer,
                     int64_t rows, float* y, int64_t y_stride, std::integer_sequence<int, R...>) {
  using Kernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);
  static constexpr Kernel kKernels[] = {micro_kernel<R + 1>...};
  kKernels[rows_of_x - 1](x, x_stride, buffer, rows, y, y_stride);
}

template <int BITS, ScaleKind S>
AVX2 void matmul_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const Tables tables = load_tables<BITS>(p.codebook);
  alignas(64) float buffer[kChunk * kStrip];
  const bool uniform = p.block % 32 == 0;
  const int64_t end = n0 + (n1 - n0) / kStrip * kStrip;
  for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
    const int64_t rows = std::min<int64_t>(kChunk, p.k - k0);
    for (int64_t col = n0; col < end; col += kStrip) {
      for (int64_t i = 0; i < rows; i += 32) {
        const int64_t g = (k0 + i) / 32;
        if (uniform) {
          decode_group<BITS, S, true>(p, tables, g, col, buffer + i * kStrip,
                                      std::make_integer_sequence<int, 32>{});
        } else {
          decode_group<BITS, S, false>(p, tables, g, col, buffer + i * kStrip,
                                       std::make_integer_sequence<int, 32>{});
        }
      }
      for (int64_t r = 0; r < p.m; r += kMicroRows) {
        micro_rows(std::min<int64_t>(kMicroRows, p.m - r), p.x + r * p.k + k0, p.k, buffer, rows,
                   p.y + r * p.n + col, p.n, std::make_integer_sequence<int, kMicroRows>{});
      }
    }
  }
  matmul_scalar(p, end, n1);
}

template <int BITS, ScaleKind S>
void run_avx2(const Problem& p, int64_t n0, int64_t n1) {
  if (p.m == 1 && p.block % 32 == 0) {
    gemv_avx2<BITS, S>(p, n0, n1);
  } else {
    matmul_avx2<BITS, S>(p, n0, n1);
  }
}

template <int BITS>
Range avx2_for_scales(ScaleKind kind) {
  switch (kind) {
    case ScaleKind::kF32: return run_avx2<BITS, ScaleKind::kF32>;
    case ScaleKind::kBF16: return run_avx2<BITS, ScaleKind::kBF16>;
    case ScaleKind::kF16: return run_avx2<BITS, ScaleKind::kF16>;
  }
  return nullptr;
}

Range avx2_kernel(int64_t bits, ScaleKind kind) {
  switch (bits) {
    case 1: return avx2_for_scales<1>(kind);
    case 2: return avx2_for_scales<2>(kind);
    case 3: return avx2_for_scales<3>(kind);
    case 4: return avx2_for_scales<4>(kind);
    case 5: return avx2_for_scales<5>(kind);
    case 6: return avx2_for_scales<6>(kind);
    case 7: return avx2_for_scales<7>(kind);
    case 8: return avx2_for_scales<8>(kind);
  }
  return nullptr;
}

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#else
Range avx2_kernel(int64_t, ScaleKind) { return nullptr; }
bool has_avx2() { return false; }
#endif

// ---------------------------------------------------------------------------------------------
// Threads: ranges (of columns, or of K blocks for the table GEMV) claimed from a counter by the
// calling thread and by tasks on XLA's intra-op pool. The caller waits only for ranges another
// thread has claimed, so the call finishes even if no task ever starts; late tasks find nothing
// left and return.

struct Work {
  Work(std::function<void(int64_t)> range, int64_t ranges) : range(std::move(range)), ranges(ranges) {}
  const std::function<void(int64_t)> range;
  const int64_t ranges;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void run() {
    for (int64_t i = next.fetch_add(1); i < ranges; i = next.fetch_add(1)) {
      range(i);
      if (done.fetch_add(1) + 1 == ranges) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

// range(i) for i < ranges, on the calling thread and up to ranges - 1 pool tasks.
void run_ranges(ffi::ThreadPool& pool, std::function<void(int64_t)> range, int64_t ranges) {
  auto work = std::make_shared<Work>(std::move(range), ranges);
  for (int64_t t = 1; t < ranges; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == work->ranges; });
}

constexpr int64_t kMinWeightsPerThread = int64_t{1} << 18;

ffi::Error LookupMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> codes,
                        ffi::AnyBuffer scales, ffi::Buffer<ffi::F32> codebook,
                        ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t block_size,
                        int64_t threads, int64_t isa) {
  const auto x_dims = x.dimensions(), code_dims = codes.dimensions(),
             scale_dims = scales.dimensions();
  if (x_dims.size() != 2 || code_dims.size() != 2 || scale_dims.size() != 2) {
    return ffi::Error::InvalidArgument("x, codes and scales must be matrices");
  }
  if (bits < 1 || bits > 8) return ffi::Error::InvalidArgument("bits must be in 1..8");
  Problem p;
  p.m = x_dims[0];
  p.k = x_dims[1];
  p.n = code_dims[1];
  p.bits = bits;
  p.block = block_size;
  if (p.k % 32 || code_dims[0] != p.k * bits / 32 || block_size < 1 ||
      scale_dims[0] != (p.k + block_size - 1) / block_size || scale_dims[1] != p.n ||
      codebook.element_count() < (size_t{1} << bits)) {
    return ffi::Error::InvalidArgument(
        "shapes disagree: x [M, K] with K a multiple of 32, codes [K * bits / 32, N], scales "
        "[ceil(K / block_size), N], codebook >= 2^bits entries");
  }
  switch (scales.element_type()) {
    case ffi::DataType::F32: p.scale_kind = ScaleKind::kF32; break;
    case ffi::DataType::BF16: p.scale_kind = ScaleKind::kBF16; break;
    case ffi::DataType::F16: p.scale_kind = ScaleKind::kF16; break;
    default: return ffi::Error::InvalidArgument("scales must be float32, bfloat16 or float16");
  }
  std::vector<float> x_f32;
  if (x.element_type() == ffi::DataType::F32) {
    p.x = static_cast<const float*>(x.untyped_data());
  } else if (x.element_type() == ffi::DataType::BF16) {
    const auto* halves = static_cast<const uint16_t*>(x.untyped_data());
    x_f32.resize(p.m * p.k);
    for (size_t i = 0; i < x_f32.size(); ++i) {
      x_f32[i] = bits_to_float(static_cast<uint32_t>(halves[i]) << 16);
    }
    p.x = x_f32.data();
  } else {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
  float table[256] = {};
  std::memcpy(table, codebook.typed_data(), sizeof(float) << bits);
  p.codebook = table;
  p.codes = codes.typed_data();
  p.scales = scales.untyped_data();
  p.y = y->typed_data();
  std::fill(p.y, p.y + p.m * p.n, 0.0f);
  if (p.m == 0 || p.n == 0 || p.k == 0) return ffi::Error::Success();

  if (isa != kBest && isa != kScalar && isa != kAvx2) {
    return ffi::Error::InvalidArgument("isa must be 0 (best), 1 (scalar) or 2 (avx2)");
  }
  if (isa == kAvx2 && !has_avx2()) {
    return ffi::Error::InvalidArgument("this CPU has no AVX2, FMA and F16C");
  }
  // Waking a pool thread costs tens of microseconds: by default a thread gets at least
  // kMinWeightsPerThread multiply-adds (measured on SmolLM2's layer shapes).
  const int64_t workers =
      threads > 0 ? threads
                  : std::clamp<int64_t>(p.m * p.k * p.n / kMinWeightsPerThread, 1,
                                        std::max<int64_t>(1, pool.num_threads()));
  if (takes_tables(p)) {
    // Plain C++, the fastest GEMV for these codes everywhere. Threads take K blocks (each builds
    // only its own tables) into partial outputs, summed at the end.
    const BlockRange kernel = table_kernel(bits, p.scale_kind);
    const int64_t blocks = scale_dims[0];
    const int64_t per = (blocks + std::min(workers, blocks) - 1) / std::min(workers, blocks);
    const int64_t ranges = (blocks + per - 1) / per;
    std::vector<float> partials((ranges - 1) * p.n, 0.0f);
    run_ranges(pool, [&](int64_t i) {
      kernel(p, i * per, (i + 1) * per, i == 0 ? p.y : partials.data() + (i - 1) * p.n);
    }, ranges);
    for (int64_t i = 1; i < ranges; ++i) {
      const float* partial = partials.data() + (i - 1) * p.n;
      for (int64_t col = 0; col < p.n; ++col) p.y[col] += partial[col];
    }
    return ffi::Error::Success();
  }
  Range kernel = matmul_scalar;
  if (isa == kAvx2 || (isa == kBest && has_avx2())) kernel = avx2_kernel(bits, p.scale_kind);
  const int64_t units = (p.n + 31) / 32;  // ranges are whole multiples of 32 columns
  const int64_t width = (units + std::min(workers, units) - 1) / std::min(workers, units) * 32;
  run_ranges(pool, [&](int64_t i) { kernel(p, i * width, std::min(p.n, (i + 1) * width)); },
             (p.n + width - 1) / width);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxquant_lookup_matmul, LookupMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("isa"));

// ---------------------------------------------------------------------------------------------
// The Python module: the handler as a capsule for jax.ffi.register_ffi_target, and the ISAs
// this CPU runs.

static PyObject* handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(jaxquant_lookup_matmul), nullptr, nullptr);
}

static PyObject* isas(PyObject*, PyObject*) {
  return has_avx2() ? Py_BuildValue("(ss)", "scalar", "avx2") : Py_BuildValue("(s)", "scalar");
}

static PyMethodDef kMethods[] = {
    {"handler", handler, METH_NOARGS, "The XLA FFI handler of the lookup matmul (a capsule)."},
    {"isas", isas, METH_NOARGS, "The instruction sets this CPU can run the kernel with."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu",
                              "jaxquant's CPU lookup matmul, an XLA FFI handler.", -1, kMethods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
