// Two forward passes of the model as XLA:CPU FFI handlers (built and registered by cpu_kernels.py).
// XLA:CPU runs them as many small kernels or as passes that leave the cache; each is one pass here.
//
// DpmambaZigzagScanForward: what `_recurrence_fn`'s forward computes in scan.py, without the states:
//   for each path position t and direction k, token l = paths[k, t]:
//     h_k = decay[l, k] h_k + dt[l, k] B[l, k] x_l;  out_l += C[l, k] . h_k + d_skip[k] x_l
//   with h_k (B, R, Dh, N) per direction, zero at t = 0. Layout (row-major, float32 unless said):
//   u, out (L * B, D), row l * B + b is token l of sample b; decay, dt (L, B, K, R); b_in, c_out
//   (L, B, K, N); d_skip (K, D); paths (K, L) int32. Channel c belongs to head c / Dh, Dh = D / R.
//
// DpmambaGroupedConv3x3: conv.py's `_shift_conv3x3`, a grouped 3x3 cross-correlation with zero
//   padding 1 and no bias: x (H, W, B, cin) ("HWNC") or (B, H, W, cin) ("NHWC", attribute
//   batch_major), kernel (3, 3, cin / groups, cout) HWIO -> (same layout, cout).

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 8 floats (one AVX register; two SSE ones), unaligned loads and stores (GCC / Clang vectors)
typedef float Vec8 __attribute__((vector_size(32), aligned(4)));
inline Vec8 Load(const float* p) { return *reinterpret_cast<const Vec8*>(p); }
inline void Store(float* p, Vec8 v) { *reinterpret_cast<Vec8*>(p) = v; }

// The common case, state size 1 and heads of a multiple of 8 channels, D = 8 * kVectors: one
// sample's state of one direction is kVectors registers for the whole path.
template <int kVectors>
void ScanSampleStateSize1(int64_t b, int64_t L, int64_t B, int64_t K, int64_t R,
                          const int32_t* path, const float* x_all, const float* decay_all,
                          const float* dt_all, const float* b_all, const float* c_all,
                          float* out_all) {
  constexpr int64_t D = 8 * kVectors;
  const int64_t vectors_per_head = kVectors / R;
  for (int64_t k = 0; k < K; ++k) {
    Vec8 h[kVectors] = {};
    for (int64_t t = 0; t < L; ++t) {
      const int64_t row = path[k * L + t] * B + b;
      const int64_t at = row * K + k;  // (l, b, k) in the coefficient arrays
      const float* x = x_all + row * D;
      float* o = out_all + row * D;
      const float bt = b_all[at], c = c_all[at];
      for (int v = 0; v < kVectors; ++v) {
        const int64_t r = v / vectors_per_head;
        const float a = decay_all[at * R + r], db = dt_all[at * R + r] * bt;
        h[v] = a * h[v] + db * Load(x + 8 * v);
        Store(o + 8 * v, Load(o + 8 * v) + c * h[v]);
      }
    }
  }
}

// Samples scanned together: their rows of every token stay in the L1/L2 cache across the four
// directions' visits.
constexpr int64_t kSampleBlock = 8;

// One head's update for a state size of 1: h = a h + db x;  o += c h.
inline void UpdateStateSize1(float* __restrict h, float* __restrict o, const float* __restrict x,
                             float a, float db, float c, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    const float hv = a * h[j] + db * x[j];
    h[j] = hv;
    o[j] += c * hv;
  }
}

// The same for a state size n: h (width, n); o += sum_n c_n h_n.
inline void UpdateStateSizeN(float* __restrict h, float* __restrict o, const float* __restrict x,
                             float a, float delta, const float* __restrict b,
                             const float* __restrict c, int64_t width, int64_t n) {
  for (int64_t j = 0; j < width; ++j) {
    const float dx = delta * x[j];
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float hv = a * h[j * n + i] + dx * b[i];
      h[j * n + i] = hv;
      acc += c[i] * hv;
    }
    o[j] += acc;
  }
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("cpu_kernels: " + what);
}

ffi::Error ZigzagScanForwardImpl(ffi::Buffer<ffi::F32, 2> u, ffi::Buffer<ffi::F32, 4> decay,
                                 ffi::Buffer<ffi::F32, 4> dt, ffi::Buffer<ffi::F32, 4> b_in,
                                 ffi::Buffer<ffi::F32, 4> c_out, ffi::Buffer<ffi::F32, 2> d_skip,
                                 ffi::Buffer<ffi::S32, 2> paths,
                                 ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto coef = decay.dimensions();
  const int64_t L = coef[0], B = coef[1], K = coef[2], R = coef[3];
  const int64_t N = b_in.dimensions()[3];
  const int64_t D = u.dimensions()[1];
  if (u.dimensions()[0] != L * B) return Invalid("u must have L * B rows");
  if (R < 1 || D % R != 0) return Invalid("the channels must split into the heads");
  for (int i = 0; i < 4; ++i) {
    if (dt.dimensions()[i] != coef[i]) return Invalid("dt must have decay's shape");
    if (i < 3 && (b_in.dimensions()[i] != coef[i] || c_out.dimensions()[i] != coef[i]))
      return Invalid("b_in and c_out must be (L, B, K, N)");
  }
  if (c_out.dimensions()[3] != N) return Invalid("b_in and c_out must be (L, B, K, N)");
  if (d_skip.dimensions()[0] != K || d_skip.dimensions()[1] != D)
    return Invalid("d_skip must be (K, D)");
  if (paths.dimensions()[0] != K || paths.dimensions()[1] != L)
    return Invalid("paths must be (K, L)");
  const int32_t* path = paths.typed_data();
  std::vector<char> seen(L);
  for (int64_t k = 0; k < K; ++k) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t t = 0; t < L; ++t) {
      const int32_t token = path[k * L + t];
      if (token < 0 || token >= L || seen[token]) return Invalid("each path must be a permutation");
      seen[token] = 1;
    }
  }

  const int64_t head_dim = D / R;
  const float* x_all = u.typed_data();
  const float* decay_all = decay.typed_data();
  const float* dt_all = dt.typed_data();
  const float* b_all = b_in.typed_data();
  const float* c_all = c_out.typed_data();
  const float* skip_all = d_skip.typed_data();
  float* out_all = out->typed_data();
  // the skip terms first: every direction visits every token once, so out = x sum_k d_skip[k]
  std::vector<float> skip_sum(D, 0.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < D; ++c) skip_sum[c] += skip_all[k * D + c];
  for (int64_t row = 0; row < L * B; ++row)
    for (int64_t c = 0; c < D; ++c) out_all[row * D + c] = skip_sum[c] * x_all[row * D + c];

  if (N == 1 && head_dim % 8 == 0) {
    void (*scan_sample)(int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*,
                        const float*, const float*, const float*, const float*, const float*,
                        float*) = nullptr;
    switch (D / 8) {
      case 1: scan_sample = ScanSampleStateSize1<1>; break;
      case 2: scan_sample = ScanSampleStateSize1<2>; break;
      case 4: scan_sample = ScanSampleStateSize1<4>; break;
      case 8: scan_sample = ScanSampleStateSize1<8>; break;
      case 12: scan_sample = ScanSampleStateSize1<12>; break;
      case 16: scan_sample = ScanSampleStateSize1<16>; break;
    }
    if (scan_sample != nullptr) {
      for (int64_t b = 0; b < B; ++b)
        scan_sample(b, L, B, K, R, path, x_all, decay_all, dt_all, b_all, c_all, out_all);
      return ffi::Error::Success();
    }
  }
  std::vector<float> state(K * kSampleBlock * D * N);  // (K, block, D, N)
  for (int64_t b0 = 0; b0 < B; b0 += kSampleBlock) {
    const int64_t b1 = std::min(B, b0 + kSampleBlock);
    std::fill(state.begin(), state.end(), 0.0f);
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t token = path[k * L + t];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row = token * B + b;
          const int64_t at = row * K + k;  // (l, b, k) in the coefficient arrays
          const float* x = x_all + row * D;
          float* o = out_all + row * D;
          float* h = state.data() + (k * kSampleBlock + (b - b0)) * D * N;
          for (int64_t r = 0; r < R; ++r) {
            const int64_t c0 = r * head_dim;
            const float a = decay_all[at * R + r], delta = dt_all[at * R + r];
            if (N == 1) {
              UpdateStateSize1(h + c0, o + c0, x + c0, a, delta * b_all[at], c_all[at],
                               head_dim);
            } else {
              UpdateStateSizeN(h + c0 * N, o + c0, x + c0, a, delta, b_all + at * N,
                               c_all + at * N, head_dim, N);
            }
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}


// Pixels of a row computed together: each weight vector loaded serves all of them.
constexpr int64_t kPixelBlock = 4;

// Output pixels (y, x0 .. x0 + kPixels - 1) of one sample: out[c] = sum over taps t of
// tap_w[t][c] * source[window + tap_at[t] + c], eight channels at a time (accumulators in
// registers), the channels beyond a multiple of 8 one at a time. out_at(x) -> the pixel's output.
template <int kPixels, typename OutAt>
void ConvPixels(int64_t y, int64_t x0, int64_t cout, int64_t channels, int64_t taps,
                const float* tap_w, const int64_t* tap_at, const float* source, int64_t Wp,
                OutAt out_at) {
  const float* window[kPixels];
  float* dst[kPixels];
  for (int p = 0; p < kPixels; ++p) {
    window[p] = source + (y * Wp + x0 + p) * channels;
    dst[p] = out_at(x0 + p);
  }
  int64_t c0 = 0;
  for (; c0 + 8 <= cout; c0 += 8) {
    Vec8 acc[kPixels] = {};
    for (int64_t t = 0; t < taps; ++t) {
      const Vec8 wt = Load(tap_w + t * cout + c0);
      for (int p = 0; p < kPixels; ++p) acc[p] += wt * Load(window[p] + tap_at[t] + c0);
    }
    for (int p = 0; p < kPixels; ++p) Store(dst[p] + c0, acc[p]);
  }
  for (; c0 < cout; ++c0)
    for (int p = 0; p < kPixels; ++p) {
      float acc = 0.0f;
      for (int64_t t = 0; t < taps; ++t) acc += tap_w[t * cout + c0] * window[p][tap_at[t] + c0];
      dst[p][c0] = acc;
    }
}


ffi::Error GroupedConv3x3Impl(ffi::Buffer<ffi::F32, 4> x, ffi::Buffer<ffi::F32, 4> kernel,
                              ffi::ResultBuffer<ffi::F32, 4> out, bool batch_major) {
  const auto xd = x.dimensions();
  const int64_t H = batch_major ? xd[1] : xd[0], W = batch_major ? xd[2] : xd[1];
  const int64_t B = batch_major ? xd[0] : xd[2], cin = xd[3];
  const auto kd = kernel.dimensions();
  const int64_t cin_g = kd[2], cout = kd[3];
  if (kd[0] != 3 || kd[1] != 3) return Invalid("the conv kernel must be (3, 3, cin_g, cout)");
  if (cin_g < 1 || cin % cin_g != 0) return Invalid("cin must be a multiple of the kernel's cin_g");
  const int64_t groups = cin / cin_g;
  if (cout % groups != 0) return Invalid("cout must be a multiple of the groups");
  const int64_t cout_g = cout / groups;
  const auto od = out->dimensions();
  if (od[3] != cout) return Invalid("the conv output must have cout channels");

  // pixel (y, x) of sample b starts at offset(y, x, b) * channels
  auto offset = [&](int64_t y, int64_t xx, int64_t b) {
    return batch_major ? (b * H + y) * W + xx : (y * W + xx) * B + b;
  };
  const float* in = x.typed_data();
  const float* w = kernel.typed_data();  // [dy][dx][j][c]
  float* o = out->typed_data();
  const int64_t Hp = H + 2, Wp = W + 2;

  // out[c] = sum over taps of tap_w[t][c] * source[pixel's window + tap_at[t] + c], where the
  // source holds one sample's input, zero-padded by a pixel on each side:
  // * cin_g == cout_g == G (depthwise, or the blocks' pairs): the input itself, (Hp, Wp, cin)
  //   with G - 1 zero channels on either end; output c reads input c + s for the channel shifts
  //   s in [-(G - 1), G - 1], with weight 0 where c + s is outside c's group (2G - 1 shifts a
  //   spatial tap, and no copies of the input).
  // * otherwise the input expanded to the output channels, one (Hp, Wp, cout) copy per j < cin_g,
  //   copy j holding at c the group's j-th input of output c.
  const bool same_groups = cin_g == cout_g;
  const int64_t edge = same_groups ? cin_g - 1 : 0;
  const int64_t channels = same_groups ? cin + 2 * edge : cout;  // per source pixel
  const int64_t copies = same_groups ? 1 : cin_g;
  const int64_t shifts = same_groups ? 2 * cin_g - 1 : cin_g;
  std::vector<float> source(copies * Hp * Wp * channels, 0.0f);
  std::vector<float> tap_w(9 * shifts * cout, 0.0f);
  std::vector<int64_t> tap_at(9 * shifts);
  for (int64_t dy = 0; dy < 3; ++dy)
    for (int64_t dx = 0; dx < 3; ++dx)
      for (int64_t i = 0; i < shifts; ++i) {
        const int64_t t = (dy * 3 + dx) * shifts + i;
        const float* w_tap = w + (dy * 3 + dx) * cin_g * cout;
        if (same_groups) {
          const int64_t shift = i - edge;
          tap_at[t] = (dy * Wp + dx) * channels + edge + shift;
          for (int64_t c = 0; c < cout; ++c) {
            const int64_t j = c % cin_g + shift;  // the group input that c + shift is
            if (j >= 0 && j < cin_g) tap_w[t * cout + c] = w_tap[j * cout + c];
          }
        } else {
          tap_at[t] = ((i * Hp + dy) * Wp + dx) * channels;
          for (int64_t c = 0; c < cout; ++c) tap_w[t * cout + c] = w_tap[i * cout + c];
        }
      }
  const int64_t taps = 9 * shifts;

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t y = 0; y < H; ++y)
      for (int64_t xx = 0; xx < W; ++xx) {
        const float* pixel = in + offset(y, xx, b) * cin;
        for (int64_t j = 0; j < copies; ++j) {
          float* dst = source.data() + ((j * Hp + y + 1) * Wp + xx + 1) * channels;
          if (same_groups) {
            std::copy(pixel, pixel + cin, dst + edge);
          } else {
            for (int64_t c = 0; c < cout; ++c) dst[c] = pixel[(c / cout_g) * cin_g + j];
          }
        }
      }
    for (int64_t y = 0; y < H; ++y) {
      int64_t x0 = 0;
      for (; x0 + kPixelBlock <= W; x0 += kPixelBlock)
        ConvPixels<kPixelBlock>(y, x0, cout, channels, taps, tap_w.data(), tap_at.data(),
                                source.data(), Wp, [&](int64_t xx) { return o + offset(y, xx, b) * cout; });
      for (; x0 < W; ++x0)
        ConvPixels<1>(y, x0, cout, channels, taps, tap_w.data(), tap_at.data(), source.data(), Wp,
                      [&](int64_t xx) { return o + offset(y, xx, b) * cout; });
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// (aliases: a comma inside a macro argument would split it)
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Coefficients = ffi::Buffer<ffi::F32, 4>;
using Paths = ffi::Buffer<ffi::S32, 2>;
using Image = ffi::Buffer<ffi::F32, 4>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpmambaZigzagScanForward, ZigzagScanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<Matrix>()         // u (L * B, D)
                                  .Arg<Coefficients>()   // decay (L, B, K, R)
                                  .Arg<Coefficients>()   // dt (L, B, K, R)
                                  .Arg<Coefficients>()   // b_in (L, B, K, N)
                                  .Arg<Coefficients>()   // c_out (L, B, K, N)
                                  .Arg<Matrix>()         // d_skip (K, D)
                                  .Arg<Paths>()          // paths (K, L)
                                  .Ret<Matrix>());       // out (L * B, D)

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpmambaGroupedConv3x3, GroupedConv3x3Impl,
                              ffi::Ffi::Bind()
                                  .Arg<Image>()                 // x
                                  .Arg<Image>()                 // kernel (3, 3, cin_g, cout)
                                  .Ret<Image>()                 // out
                                  .Attr<bool>("batch_major"));  // NHWC, else HWNC
