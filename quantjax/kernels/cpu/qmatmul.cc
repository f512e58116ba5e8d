// quantjax CPU kernel: `x [M, K] @ W` for a quantized weight W, registered with
// XLA through its FFI. The weight is decoded in registers, 16 values at a time,
// and never exists in memory as floats: a decode step reads each weight byte once.
//
// Built from source by `python -m quantjax.kernels.cpu_build` (the Makefile's
// install step, or lazily on first use); loaded and registered by
// `quantjax/kernels/cpu_matmul.py`, which also holds the Python reference and
// the description of the formats and layouts (read that docstring first).
//
// Weight value at logical [k, n] (k: contraction index, n: output index):
//   w = s[g, n] * (c + code_offset) + off[g, n],   g = k / group
// where c is the stored code decoded as a float (packed 4-bit, int8, uint8,
// 4-bit codes through a 16-entry table of levels: NF4, IQ4_NL, MXFP4 / NVFP4's
// E2M1, FP8, BF16/FP16), s is read as f32, f16, bf16, E8M0 or E4M3, and off is -s*z for an
// integer zero point z, the float minimum m for GGUF-style Q4_1, else 0. The
// product is accumulated per group and scaled once per group:
//   out[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] c[k, n]
//             + sum_g (s[g, n] * code_offset + off[g, n]) * sum_{k in g} x[m, k].
//
// Layouts: "kn" (contract_axis 0): codes [K / per, N], row-major, one packed
// row holds `per` consecutive k (4-bit: low nibble k = 2r, high k = 2r + 1);
// scales [groups, N]. "nk" (contract_axis 1, an [out, in] matrix such as a
// tied embedding used as the output head): codes [N, K / per]; scales
// [N, groups]. The kn kernel, for up to kStreamMaxRows rows of x (decode),
// reads the codes in storage order and updates 16-column vectors of partial
// sums (one sequential stream per task, see kn_stream); for more rows it
// tiles outputs in registers (kn_tile). The nk kernel forms dot products
// along contiguous rows. Work is split over the kernel's own spinning helper
// threads (class Helpers).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

// Code kinds (must match cpu_matmul.py).
enum Kind : int64_t {
  kU4 = 0, kS8 = 1, kU8 = 2, kNF4 = 3, kE4M3 = 4, kE5M2 = 5, kBF16 = 6, kF16 = 7, kF32 = 8
};
enum ZpMode : int64_t { kNone = 0, kIntZp = 1, kFloatMin = 2 };
enum Layout : int64_t { kKN = 0, kNK = 1 };
// Types of the scale / zero-point operands. E8M0 (MXFP4's power-of-two block scales)
// and E4M3 (NVFP4's) are read as scales only.
enum Elem : int {
  kF32e = 0, kF16e = 1, kBF16e = 2, kU8e = 3, kS8e = 4, kE8M0e = 5, kE4M3e = 6, kOther = 7
};

inline v16f zero16() { return v16f{}; }

inline v16f as_f(v16u u) { return (v16f)u; }

// 16 bytes / 16 halfwords widened to 32-bit lanes. GCC scalarizes
// `__builtin_convertvector` from 8-bit vectors, so the widening loads use the
// ISA's extend instructions (AVX-512 or AVX2), with a portable loop otherwise.
#if defined(__AVX512F__)
inline v16u widen_u8(const uint8_t* p) {
  return (v16u)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline v16i widen_s8(const uint8_t* p) {
  return (v16i)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline v16u widen_u16(const uint8_t* p) {
  return (v16u)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__)
inline v16u join(__m256i a, __m256i b) {
  v16u r;
  std::memcpy(&r, &a, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &b, 32);
  return r;
}
inline v16u widen_u8(const uint8_t* p) {
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return join(_mm256_cvtepu8_epi32(x), _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8)));
}
inline v16i widen_s8(const uint8_t* p) {
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (v16i)join(_mm256_cvtepi8_epi32(x), _mm256_cvtepi8_epi32(_mm_srli_si128(x, 8)));
}
inline v16u widen_u16(const uint8_t* p) {
  return join(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
}
#else
inline v16u widen_u8(const uint8_t* p) {
  v16u r;
  for (int i = 0; i < 16; ++i) r[i] = p[i];
  return r;
}
inline v16i widen_s8(const uint8_t* p) {
  v16i r;
  for (int i = 0; i < 16; ++i) r[i] = static_cast<int8_t>(p[i]);
  return r;
}
inline v16u widen_u16(const uint8_t* p) {
  v16u r;
  for (int i = 0; i < 16; ++i) {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    r[i] = h;
  }
  return r;
}
#endif

// Non-negative 32-bit lanes to float (the signed conversion is native everywhere).
inline v16f to_f(v16u u) { return __builtin_convertvector((v16i)u, v16f); }
inline v16f to_f(v16i i) { return __builtin_convertvector(i, v16f); }

// IEEE half bits -> float (finite values; subnormals exact).
inline v16f half_bits_to_f(v16u u) {
  v16u sign = (u & 0x8000u) << 16;
  v16u em = u & 0x7fffu;
  v16u normal = (em << 13) + (112u << 23);
  v16f sub = to_f(em) * (1.0f / 16777216.0f);
  v16f r = (em < 0x400u) ? sub : as_f(normal);
  return (v16f)((v16u)r | sign);
}

// 16 IEEE halves -> floats: the ISA's conversion where there is one (exact for
// every half, subnormals included), else the bit arithmetic above.
inline v16f load_half(const uint8_t* p) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return half_bits_to_f(widen_u16(p));
#endif
}

inline v16f load_bf16(const uint8_t* p) { return as_f(widen_u16(p) << 16); }

// FP8 e4m3fn byte -> float (finite values; subnormals exact).
inline v16f e4m3_to_f(v16u b) {
  v16u sign = (b & 0x80u) << 24;
  v16u em = b & 0x7fu;
  v16u normal = (em << 20) + (120u << 23);
  v16f sub = to_f(em) * (1.0f / 512.0f);
  v16f r = (em < 0x8u) ? sub : as_f(normal);
  return (v16f)((v16u)r | sign);
}

// E8M0 byte e -> 2^(e - 127), as ml_dtypes' float8_e8m0fnu (byte 0 is the subnormal
// 2^-127, byte 255 NaN).
inline v16f e8m0_to_f(v16u b) {
  v16u u = b << 23;
  u = (b == 0u) ? v16u{} + 0x00400000u : u;
  u = (b == 255u) ? v16u{} + 0x7fc00000u : u;
  return as_f(u);
}

// 16 consecutive values of a float operand (f32 / f16 / bf16 / e8m0 / e4m3) as floats.
inline v16f load_vals(const void* base, int elem, int64_t idx) {
  const uint8_t* p = static_cast<const uint8_t*>(base);
  switch (elem) {
    case kF32e: {
      v16f v;
      std::memcpy(&v, p + 4 * idx, 64);
      return v;
    }
    case kF16e: return load_half(p + 2 * idx);
    case kBF16e: return load_bf16(p + 2 * idx);
    case kU8e: return to_f(widen_u8(p + idx));
    case kS8e: return to_f(widen_s8(p + idx));
    case kE8M0e: return e8m0_to_f(widen_u8(p + idx));
    case kE4M3e: return e4m3_to_f(widen_u8(p + idx));
  }
  return zero16();
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  float f;
  if (em < 0x400u) {
    f = float(em) * (1.0f / 16777216.0f);
  } else {
    const uint32_t bits = (em << 13) + (112u << 23);
    std::memcpy(&f, &bits, 4);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}


// One value of a float operand.
inline float load_val(const void* base, int elem, int64_t idx) {
  const uint8_t* p = static_cast<const uint8_t*>(base);
  switch (elem) {
    case kF32e: {
      float f;
      std::memcpy(&f, p + 4 * idx, 4);
      return f;
    }
    case kF16e: {
      uint16_t h;
      std::memcpy(&h, p + 2 * idx, 2);
      return half_to_float(h);
    }
    case kBF16e: {
      uint16_t h;
      std::memcpy(&h, p + 2 * idx, 2);
      uint32_t u = uint32_t(h) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case kU8e: return float(p[idx]);
    case kS8e: return float(int8_t(p[idx]));
    case kE8M0e: {
      const uint32_t e = p[idx];
      const uint32_t u = e == 0 ? 0x00400000u : (e == 255 ? 0x7fc00000u : e << 23);
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case kE4M3e: {
      const uint32_t b = p[idx], em = b & 0x7fu;
      float f;
      if (em < 0x8u) {
        f = float(em) * (1.0f / 512.0f);
      } else {
        const uint32_t u = (em << 20) + (120u << 23);
        std::memcpy(&f, &u, 4);
      }
      return (b & 0x80u) ? -f : f;
    }
  }
  return 0.0f;
}

// Decoders: 16 stored codes (at `p`) -> `per` vectors of float codes.
// per = codes per stored element along the contraction axis (2 for 4-bit);
// esize = bytes per stored element.
template <int64_t K>
struct Dec;

template <>
struct Dec<kU4> {
  static constexpr int per = 2, esize = 1;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) {
    v16u i = widen_u8(p);
    o[0] = to_f(i & 15u);
    o[1] = to_f(i >> 4);
  }
};

template <>
struct Dec<kNF4> {
  static constexpr int per = 2, esize = 1;
  static inline void run(const uint8_t* p, const v16f& lut, v16f* o) {
    v16i i = (v16i)widen_u8(p);
    o[0] = __builtin_shuffle(lut, i & 15);
    o[1] = __builtin_shuffle(lut, i >> 4);
  }
};

template <>
struct Dec<kS8> {
  static constexpr int per = 1, esize = 1;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) { o[0] = to_f(widen_s8(p)); }
};

template <>
struct Dec<kU8> {
  static constexpr int per = 1, esize = 1;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) { o[0] = to_f(widen_u8(p)); }
};

template <>
struct Dec<kE4M3> {
  static constexpr int per = 1, esize = 1;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) {
    o[0] = e4m3_to_f(widen_u8(p));
  }
};

template <>
struct Dec<kE5M2> {
  static constexpr int per = 1, esize = 1;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) {
    o[0] = half_bits_to_f(widen_u8(p) << 8);
  }
};

template <>
struct Dec<kBF16> {
  static constexpr int per = 1, esize = 2;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) { o[0] = load_bf16(p); }
};

template <>
struct Dec<kF32> {
  static constexpr int per = 1, esize = 4;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) { std::memcpy(o, p, 64); }
};

template <>
struct Dec<kF16> {
  static constexpr int per = 1, esize = 2;
  static inline void run(const uint8_t* p, const v16f&, v16f* o) { o[0] = load_half(p); }
};

struct Args {
  const float* x;       // [M, K]
  const float* xsum;    // [M, groups]: sums of x over each group
  const float* xe;      // nk, 4-bit: x[:, 0::2] [M, K/2]
  const float* xo;      // nk, 4-bit: x[:, 1::2] [M, K/2]
  int64_t M, K, N;
  const uint8_t* codes;
  int64_t row_bytes;    // bytes per stored row (kn: one packed K row; nk: one output row)
  const void* scale;    // kn [groups, N], nk [N, groups]; null for casts
  int scale_elem;
  const void* zero;     // same shape as scale, or null
  int zero_elem;
  int64_t zp_mode;
  int64_t group, groups;
  float code_offset;
  v16f lut;             // the table kind's 16 levels (NF4, IQ4_NL, MXFP4, NVFP4)
  float* out;           // [M, N]
};

// Per-group scale and offset (the coefficient of the group's x-sum) for 16 columns.
inline void kn_scale(const Args& a, int64_t g, int64_t n, v16f& s, v16f& o) {
  const int64_t idx = g * a.N + n;
  s = load_vals(a.scale, a.scale_elem, idx);
  o = s * a.code_offset;
  if (a.zp_mode == kIntZp) {
    o -= s * load_vals(a.zero, a.zero_elem, idx);
  } else if (a.zp_mode == kFloatMin) {
    o += load_vals(a.zero, a.zero_elem, idx);
  }
}

inline void nk_scale(const Args& a, int64_t n, int64_t g, float& s, float& o) {
  const int64_t idx = n * a.groups + g;
  s = load_val(a.scale, a.scale_elem, idx);
  o = s * a.code_offset;
  if (a.zp_mode == kIntZp) {
    o -= s * load_val(a.zero, a.zero_elem, idx);
  } else if (a.zp_mode == kFloatMin) {
    o += load_val(a.zero, a.zero_elem, idx);
  }
}

// kn: rows m0..m0+MT, columns n0..n0+16V.
template <int64_t KIND, int MT, int V>
void kn_tile(const Args& a, int64_t m0, int64_t n0) {
  using D = Dec<KIND>;
  constexpr int P = D::per;
  const v16f lut = a.lut;  // a local: stores to the float sums cannot alias it
  v16f acc[MT][V];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = zero16();
  const int64_t rows_g = a.group / P;
  const float* xrow[MT];
  for (int m = 0; m < MT; ++m) xrow[m] = a.x + (m0 + m) * a.K;
  for (int64_t g = 0; g < a.groups; ++g) {
    v16f t[MT][V];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < V; ++v) t[m][v] = zero16();
    const int64_t r0 = g * rows_g;
    const uint8_t* row = a.codes + r0 * a.row_bytes + n0 * D::esize;
    for (int64_t r = r0; r < r0 + rows_g; ++r, row += a.row_bytes) {
      v16f c[V][P];
      for (int v = 0; v < V; ++v) D::run(row + v * 16 * D::esize, lut, c[v]);
      for (int m = 0; m < MT; ++m) {
        for (int j = 0; j < P; ++j) {
          const float xs = xrow[m][r * P + j];
          for (int v = 0; v < V; ++v) t[m][v] += xs * c[v][j];
        }
      }
    }
    if (a.scale == nullptr) {
      for (int m = 0; m < MT; ++m)
        for (int v = 0; v < V; ++v) acc[m][v] += t[m][v];
      continue;
    }
    for (int v = 0; v < V; ++v) {
      v16f s, o;
      kn_scale(a, g, n0 + 16 * v, s, o);
      for (int m = 0; m < MT; ++m) {
        acc[m][v] += s * t[m][v] + o * a.xsum[(m0 + m) * a.groups + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < V; ++v) std::memcpy(a.out + (m0 + m) * a.N + n0 + 16 * v, &acc[m][v], 64);
}

inline float hsum(v16f v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// nk: rows m0..m0+MT, outputs n0..n0+NR (NR rows of codes share each load of x).
template <int64_t KIND, int MT, int NR>
void nk_tile(const Args& a, int64_t m0, int64_t n0) {
  using D = Dec<KIND>;
  constexpr int P = D::per;
  const v16f lut = a.lut;
  v16f acc[MT][NR];
  float off[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) {
      acc[m][r] = zero16();
      off[m][r] = 0.0f;
    }
  const int64_t vecs = a.group / (16 * P);  // 16-element vectors of stored codes per group
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = a.codes + (n0 + r) * a.row_bytes;
  const int64_t kstride = P == 2 ? a.K / 2 : a.K;
  const float* x0 = P == 2 ? a.xe : a.x;
  const float* x1 = a.xo;
  for (int64_t g = 0; g < a.groups; ++g) {
    v16f t[MT][NR];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r) t[m][r] = zero16();
    for (int64_t q = 0; q < vecs; ++q) {
      const int64_t e = (g * vecs + q) * 16;  // stored element index along the row
      v16f c[NR][P];
      for (int r = 0; r < NR; ++r) D::run(rows[r] + e * D::esize, lut, c[r]);
      for (int m = 0; m < MT; ++m) {
        v16f xv;
        std::memcpy(&xv, x0 + (m0 + m) * kstride + e, 64);
        for (int r = 0; r < NR; ++r) t[m][r] += xv * c[r][0];
        if constexpr (P == 2) {
          v16f xw;
          std::memcpy(&xw, x1 + (m0 + m) * kstride + e, 64);
          for (int r = 0; r < NR; ++r) t[m][r] += xw * c[r][1];
        }
      }
    }
    if (a.scale == nullptr) {
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < NR; ++r) acc[m][r] += t[m][r];
      continue;
    }
    for (int r = 0; r < NR; ++r) {
      float sc, o;
      nk_scale(a, n0 + r, g, sc, o);
      for (int m = 0; m < MT; ++m) {
        acc[m][r] += sc * t[m][r];
        off[m][r] += o * a.xsum[(m0 + m) * a.groups + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) a.out[(m0 + m) * a.N + n0 + r] = hsum(acc[m][r]) + off[m][r];
}

// Multiply-adds below which a call runs on the calling thread alone: handing
// work to the helper threads costs more than it saves there.
constexpr int64_t kSmallWork = 1 << 17;

// The kernel's own helper threads (one fewer than the hardware threads). A
// decode step makes a few hundred calls of 10-100 us each, one after another.
// Handing half of such a call to XLA's intra-op pool gained nothing on the
// 2-core development machine: the pool's worker had gone to sleep between
// calls, and waking it took about as long as the call. These helpers spin for
// a short while after each job (`kSpinIters` pauses: tens of us to about
// 0.5 ms, by CPU) before they block, so in a decode loop they are awake when
// the next call comes.
// One job runs at a time; a call that finds the helpers busy (two XLA threads
// in the kernel at once) runs on its own thread. The caller takes items too,
// so a job finishes even when no helper shows up (e.g. after fork()).
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* h = new Helpers();  // never destroyed: the threads outlive main()
    return *h;
  }

  template <class F>
  void run(int64_t total, const F& body) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || n_ == 0) {
      for (int64_t i = 0; i < total; ++i) body(i);
      return;
    }
    Job job;
    job.total = total;
    job.ctx = &body;
    job.call = [](const void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); };
    job_.store(&job);
    gen_.fetch_add(1);
    if (sleepers_.load() > 0) {  // a helper that blocked (or is about to) needs a wake-up
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    work(&job);
    while (job.done.load() < total) pause();
    job_.store(nullptr);
    while (active_.load() != 0) pause();
  }

  int64_t threads() const { return static_cast<int64_t>(n_) + 1; }

 private:
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    const void* ctx = nullptr;
    void (*call)(const void*, int64_t) = nullptr;
  };
  static constexpr int kSpinIters = 4000;

  static inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  Helpers() {
    const unsigned hw = std::thread::hardware_concurrency();
    n_ = hw > 1 ? std::min<unsigned>(hw - 1, 15) : 0;
    for (unsigned t = 0; t < n_; ++t) std::thread([this] { loop(); }).detach();
  }

  static void work(Job* j) {
    for (;;) {
      const int64_t i = j->next.fetch_add(1);
      if (i >= j->total) return;
      j->call(j->ctx, i);
      j->done.fetch_add(1);
    }
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      int spins = 0;
      while (gen_.load() == seen) {
        if (++spins < kSpinIters) {
          pause();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);  // before the predicate's check: run() reads it after gen_
        cv_.wait(lock, [&] { return gen_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = gen_.load();
      active_.fetch_add(1);
      Job* j = job_.load();
      if (j != nullptr) work(j);
      active_.fetch_sub(1);
    }
  }

  unsigned n_ = 0;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> active_{0};
  std::atomic<int> sleepers_{0};
};

// Runs `body(i)` for i in [0, total): serially for small work, else on the
// caller and the helper threads.
template <class F>
void parallel_for(int64_t total, const F& body, bool small = false) {
  if (total <= 1 || small) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  Helpers::get().run(total, body);
}

template <int64_t KIND>
void run_kn(const Args& a) {
  // Column blocks of 64 (V = 4) for one row, 32 (V = 2) for up to 4 rows at a time,
  // 16 (V = 1) for 8 rows; a last partial block of 16-column vectors uses V = 1.
  const int64_t M = a.M;
  const int mt = M >= 8 ? 8 : (M >= 4 ? 4 : (M >= 2 ? 2 : 1));
  const int64_t width = mt == 1 ? 64 : (mt == 8 ? 16 : 32);
  const int64_t blocks = a.N / width;
  const int64_t tail = (a.N - blocks * width) / 16;  // leftover 16-column vectors
  const int64_t per_task = std::max<int64_t>(1, (blocks + 7) / 8);
  const int64_t tasks = (blocks + per_task - 1) / per_task + (tail > 0 ? 1 : 0);
  auto rows = [&](int64_t n0, bool narrow) {
    int64_t m = 0;
    for (; m + 8 <= M && mt == 8; m += 8) kn_tile<KIND, 8, 1>(a, m, n0);
    for (; m + 4 <= M && mt >= 4; m += 4) {
      if (narrow || mt == 8) kn_tile<KIND, 4, 1>(a, m, n0); else kn_tile<KIND, 4, 2>(a, m, n0);
    }
    for (; m + 2 <= M && mt >= 2; m += 2) {
      if (narrow || mt == 8) kn_tile<KIND, 2, 1>(a, m, n0); else kn_tile<KIND, 2, 2>(a, m, n0);
    }
    for (; m < M; ++m) {
      if (narrow) {
        kn_tile<KIND, 1, 1>(a, m, n0);
      } else if (mt == 1) {
        kn_tile<KIND, 1, 4>(a, m, n0);
      } else if (mt == 8) {
        kn_tile<KIND, 1, 1>(a, m, n0);
      } else {
        kn_tile<KIND, 1, 2>(a, m, n0);
      }
    }
  };
  auto body = [&](int64_t t) {
    const int64_t b0 = t * per_task;
    if (b0 >= blocks) {  // the tail task
      for (int64_t v = 0; v < tail; ++v) rows(blocks * width + 16 * v, true);
      return;
    }
    const int64_t b1 = std::min(blocks, b0 + per_task);
    for (int64_t b = b0; b < b1; ++b) rows(b * width, false);
  };
  parallel_for(tasks, body, a.M * a.K * a.N < kSmallWork);
}

// kn, few rows of x (decode): the codes in storage order. A task takes a
// contiguous range of stored rows and reads each row whole, left to right,
// into partial sums `t` [M, N] kept in L1/L2, so the weight is one sequential
// stream per task. The tiled path above reads a 64-column block down every row
// first (one cache line per row, strided): fast while the weight sits in
// cache, but in a decode step, where every weight comes from DRAM once, each
// of those lines is its own cache miss. Tasks' partial outputs [M, N] are
// summed at the end; a group split between two tasks is scaled in each (the
// scale is linear in the partial sums) and its zero-point term is added by
// the task that holds the group's first row.
constexpr int64_t kStreamMaxRows = 4;   // rows of x up to which run_kn streams
constexpr int64_t kStreamTaskRows = 64; // stored rows per task, at least
// How far ahead of the read the codes are prefetched: the hardware prefetcher
// stops at 4 KiB pages; measured best of 0.5-4 KiB on the development machine.
constexpr int64_t kPrefetchBytes = 2048;

template <int64_t KIND>
void kn_stream(const Args& a, int64_t ra, int64_t rb, float* acc, float* t) {
  using D = Dec<KIND>;
  constexpr int P = D::per;
  const int64_t M = a.M, N = a.N, nv = N / 16;
  const int64_t rows_g = a.group / P;
  const v16f lut = a.lut;  // a local: stores to `t` cannot alias it
  std::fill(acc, acc + M * N, 0.0f);
  for (int64_t r0 = ra; r0 < rb;) {
    const int64_t g = r0 / rows_g;
    const int64_t r1 = std::min(rb, (g + 1) * rows_g);
    std::fill(t, t + M * N, 0.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = a.codes + r * a.row_bytes;
      float xs[kStreamMaxRows][P];
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < P; ++j) xs[m][j] = a.x[m * a.K + r * P + j];
      for (int64_t v = 0; v < nv; ++v) {
        v16f c[P];
#if defined(__x86_64__) || defined(__i386__)
        if (((v * 16 * D::esize) & 63) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(row + v * 16 * D::esize + kPrefetchBytes),
                       _MM_HINT_T0);
#endif
        D::run(row + v * 16 * D::esize, lut, c);
        for (int64_t m = 0; m < M; ++m) {
          v16f tv;
          std::memcpy(&tv, t + m * N + 16 * v, 64);
          for (int j = 0; j < P; ++j) tv += xs[m][j] * c[j];
          std::memcpy(t + m * N + 16 * v, &tv, 64);
        }
      }
    }
    const bool first = r0 == g * rows_g;
    for (int64_t v = 0; v < nv; ++v) {
      v16f sc, o;
      if (a.scale != nullptr) kn_scale(a, g, 16 * v, sc, o);
      for (int64_t m = 0; m < M; ++m) {
        v16f tv, av;
        std::memcpy(&tv, t + m * N + 16 * v, 64);
        std::memcpy(&av, acc + m * N + 16 * v, 64);
        if (a.scale == nullptr) {
          av += tv;
        } else {
          av += sc * tv;
          if (first) av += o * a.xsum[m * a.groups + g];
        }
        std::memcpy(acc + m * N + 16 * v, &av, 64);
      }
    }
    r0 = r1;
  }
}

template <int64_t KIND>
void run_kn_stream(const Args& a) {
  const int64_t rows = a.K / Dec<KIND>::per;
  const int64_t threads = a.M * a.K * a.N < kSmallWork ? 1 : Helpers::get().threads();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(threads, rows / kStreamTaskRows));
  const int64_t MN = a.M * a.N;
  if (tasks == 1) {
    std::vector<float> t(MN);
    kn_stream<KIND>(a, 0, rows, a.out, t.data());
    return;
  }
  // Per task: its partial output, then its scratch sums.
  std::vector<float> buf(2 * tasks * MN);
  auto body = [&](int64_t i) {
    kn_stream<KIND>(a, rows * i / tasks, rows * (i + 1) / tasks, buf.data() + 2 * i * MN,
                    buf.data() + (2 * i + 1) * MN);
  };
  parallel_for(tasks, body);
  for (int64_t j = 0; j < MN; ++j) {
    float s = 0.0f;
    for (int64_t i = 0; i < tasks; ++i) s += buf[2 * i * MN + j];
    a.out[j] = s;
  }
}

template <int64_t KIND>
void run_nk(const Args& a) {
  const int64_t M = a.M;
  constexpr int64_t kRows = 4;  // output rows per step (a multiple of every NR below)
  const int64_t steps = a.N / kRows;
  const int64_t per_task = std::max<int64_t>(1, (steps + 15) / 16);
  const int64_t tasks = (steps + per_task - 1) / per_task + (a.N % kRows ? 1 : 0);
  auto block = [&](int64_t n0, int64_t nr) {  // outputs n0..n0+nr, every row of x
    for (int64_t n = n0; n < n0 + nr;) {
      int64_t m = 0;
      if (nr - (n - n0) >= 4) {
        for (; m + 4 <= M; m += 4) nk_tile<KIND, 4, 1>(a, m, n), nk_tile<KIND, 4, 1>(a, m, n + 1),
                                   nk_tile<KIND, 4, 1>(a, m, n + 2), nk_tile<KIND, 4, 1>(a, m, n + 3);
        for (; m + 2 <= M; m += 2) nk_tile<KIND, 2, 2>(a, m, n), nk_tile<KIND, 2, 2>(a, m, n + 2);
        for (; m < M; ++m) nk_tile<KIND, 1, 4>(a, m, n);
        n += 4;
      } else {
        for (; m < M; ++m) nk_tile<KIND, 1, 1>(a, m, n);
        n += 1;
      }
    }
  };
  auto body = [&](int64_t t) {
    const int64_t s0 = t * per_task;
    if (s0 >= steps) {  // the tail task: the last N % 4 outputs
      block(steps * kRows, a.N - steps * kRows);
      return;
    }
    const int64_t s1 = std::min(steps, s0 + per_task);
    block(s0 * kRows, (s1 - s0) * kRows);
  };
  parallel_for(tasks, body, a.M * a.K * a.N < kSmallWork);
}

int elem_of(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return kF32e;
    case ffi::DataType::F16: return kF16e;
    case ffi::DataType::BF16: return kBF16e;
    case ffi::DataType::U8: return kU8e;
    case ffi::DataType::S8: return kS8e;
    case ffi::DataType::F8E8M0FNU: return kE8M0e;
    case ffi::DataType::F8E4M3FN: return kE4M3e;
    default: return kOther;
  }
}

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

int64_t per_of(int64_t kind) { return (kind == kU4 || kind == kNF4) ? 2 : 1; }
int64_t esize_of(int64_t kind) {
  return kind == kF32 ? 4 : ((kind == kBF16 || kind == kF16) ? 2 : 1);
}

ffi::Error QMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                       ffi::AnyBuffer scale, ffi::AnyBuffer zero, ffi::Buffer<ffi::F32> lut,
                       ffi::ResultBuffer<ffi::F32> out, int64_t layout, int64_t kind,
                       int64_t group, int64_t zp_mode, int64_t has_scale, float code_offset) {
  auto xd = x.dimensions();
  auto od = out->dimensions();
  auto cd = codes.dimensions();
  if (xd.size() != 2 || od.size() != 2 || cd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "quantjax_qmatmul: expected 2-D x, codes and output; got x " + dims_str(xd) +
        ", codes " + dims_str(cd) + ", output " + dims_str(od));
  }
  const int64_t M = xd[0], K = xd[1], N = od[1];
  const int64_t per = per_of(kind), esize = esize_of(kind);
  const int64_t rows = layout == kKN ? K / per : N;
  const int64_t cols = layout == kKN ? N : K / per;
  if (od[0] != M || K % per || cd[0] != rows ||
      cd[1] * static_cast<int64_t>(ffi::ByteWidth(codes.element_type())) != cols * esize) {
    return ffi::Error::InvalidArgument(
        "quantjax_qmatmul: x " + dims_str(xd) + " does not contract with codes " + dims_str(cd) +
        " into output " + dims_str(od) + " (layout " + std::to_string(layout) + ", kind " +
        std::to_string(kind) + ")");
  }
  if (group <= 0 || K % group || group % per) {
    return ffi::Error::InvalidArgument("quantjax_qmatmul: group " + std::to_string(group) +
                                       " does not divide K = " + std::to_string(K));
  }
  const int64_t groups = K / group;
  if (layout == kKN ? (N % 16) : (group % (16 * per))) {
    return ffi::Error::InvalidArgument(
        "quantjax_qmatmul: unsupported shape: N = " + std::to_string(N) + ", group = " +
        std::to_string(group) + " (kn needs N % 16 == 0, nk needs group % " +
        std::to_string(16 * per) + " == 0)");
  }
  Args a{};
  a.x = x.typed_data();
  a.M = M;
  a.K = K;
  a.N = N;
  a.codes = static_cast<const uint8_t*>(codes.untyped_data());
  a.row_bytes = cols * esize;
  a.group = group;
  a.groups = groups;
  a.zp_mode = zp_mode;
  a.code_offset = code_offset;
  a.out = out->typed_data();
  a.lut = zero16();
  if (kind == kNF4) {  // NF4, IQ4_NL, MXFP4, NVFP4: the format's 16 levels
    if (lut.element_count() != 16) {
      return ffi::Error::InvalidArgument("quantjax_qmatmul: a table kind needs 16 levels, got " +
                                         std::to_string(lut.element_count()));
    }
    std::memcpy(&a.lut, lut.typed_data(), 64);
  }
  if (has_scale) {
    const int64_t want = groups * N;
    if (static_cast<int64_t>(scale.element_count()) != want) {
      return ffi::Error::InvalidArgument(
          "quantjax_qmatmul: scale " + dims_str(scale.dimensions()) + " has " +
          std::to_string(scale.element_count()) + " values, expected " + std::to_string(want));
    }
    a.scale = scale.untyped_data();
    a.scale_elem = elem_of(scale.element_type());
    if (a.scale_elem != kF32e && a.scale_elem != kF16e && a.scale_elem != kBF16e &&
        a.scale_elem != kE8M0e && a.scale_elem != kE4M3e) {
      return ffi::Error::InvalidArgument(
          "quantjax_qmatmul: scales must be f32, f16, bf16, e8m0 or e4m3");
    }
    if (zp_mode != kNone) {
      if (static_cast<int64_t>(zero.element_count()) != want) {
        return ffi::Error::InvalidArgument(
            "quantjax_qmatmul: zero point " + dims_str(zero.dimensions()) + " does not match " +
            "scale " + dims_str(scale.dimensions()));
      }
      a.zero = zero.untyped_data();
      a.zero_elem = elem_of(zero.element_type());
      if (a.zero_elem > kS8e) {
        return ffi::Error::InvalidArgument("quantjax_qmatmul: unsupported zero-point dtype");
      }
    }
  }
  // Per-group sums of x (and, for 4-bit nk, x split into even / odd columns).
  std::vector<float> xsum(M * groups, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      const float* p = a.x + m * K + g * group;
      for (int64_t j = 0; j < group; ++j) s += p[j];
      xsum[m * groups + g] = s;
    }
  a.xsum = xsum.data();
  std::vector<float> xe, xo;
  if (layout == kNK && per == 2) {
    xe.resize(M * K / 2);
    xo.resize(M * K / 2);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < K / 2; ++i) {
        xe[m * K / 2 + i] = a.x[m * K + 2 * i];
        xo[m * K / 2 + i] = a.x[m * K + 2 * i + 1];
      }
    a.xe = xe.data();
    a.xo = xo.data();
  }
#define QJ_CASE(KIND)                                       \
  case KIND:                                                \
    if (layout == kNK) run_nk<KIND>(a);               \
    else if (M <= kStreamMaxRows) run_kn_stream<KIND>(a); \
    else run_kn<KIND>(a);                             \
    break;
  switch (kind) {
    QJ_CASE(kU4)
    QJ_CASE(kS8)
    QJ_CASE(kU8)
    QJ_CASE(kNF4)
    QJ_CASE(kE4M3)
    QJ_CASE(kE5M2)
    QJ_CASE(kBF16)
    QJ_CASE(kF16)
    QJ_CASE(kF32)
    default:
      return ffi::Error::InvalidArgument("quantjax_qmatmul: unknown code kind " +
                                         std::to_string(kind));
  }
#undef QJ_CASE
  return ffi::Error::Success();
}

}  // namespace

#define QJ_EXPORT __attribute__((visibility("default")))

extern "C" QJ_EXPORT XLA_FFI_Error* QuantjaxQMatmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantjaxQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::AnyBuffer>()         // scale
                                  .Arg<ffi::AnyBuffer>()         // zero point / minimum
                                  .Arg<ffi::Buffer<ffi::F32>>()  // 16 levels (table kind)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("zp_mode")
                                  .Attr<int64_t>("has_scale")
                                  .Attr<float>("code_offset"));

// Version of the calling convention, checked by the loader. 2: E8M0 / E4M3 scales
// (MXFP4, NVFP4), IQ4_NL / MXFP4 / NVFP4 levels as the table kind's.
extern "C" QJ_EXPORT int quantjax_qmatmul_abi() { return 2; }
