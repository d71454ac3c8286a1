// Row machinery shared by the softmax losses (cross-entropy, softmax focal, and any loss over
// class rows): the [N, C, D] geometry, the target check, the one-read row statistics and the
// gradient sweep.
//
// Confident rows: with m the row max and S = sum_{j != y} exp(x_j - m) accumulated without the
// target (in the same read), e_y = exp(x_y - m) and
//   lse = m + log(S + e_y),  nll = lse - x_y = log1p(S / e_y),  q = 1 - p_y = S / (S + e_y)
// so the loss and 1 - p_y of a confident row keep their relative precision; lse - x_y and
// 1 - exp(x_y - lse) would cancel (torch's fp32 error reaches 100% there).
#pragma once

#include <atomic>
#include <utility>

#include "common.h"

namespace fusedloss {

// Logits viewed as [N, C, D]: row r is (n, d) = (r / D, r % D), its C classes sC apart.
template <typename scalar_t>
struct RowGeom {
  int64_t N, C, D, sN, sC, sD;
  const scalar_t* x;

  explicit RowGeom(const at::Tensor& logits)
      : N(logits.size(0)), C(logits.size(1)), D(logits.size(2)), sN(logits.stride(0)),
        sC(logits.stride(1)), sD(logits.stride(2)), x(logits.const_data_ptr<scalar_t>()) {}
  int64_t rows() const { return N * D; }
  const scalar_t* row(int64_t r) const { return x + (r / D) * sN + (r % D) * sD; }
  // Rows per task: about 32k elements, so that small-C rows are not one task each.
  int64_t grain() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }
};

// Class-index targets [N*D]: a row's class, or -1 for an ignored or out-of-range row (loss and
// gradient 0). The first out-of-range class seen is kept and raised after the parallel loop
// (`raise_if_bad`): the C++ kernels check the range while they read, at no extra cost.
struct Targets {
  const int64_t* t;
  int64_t C, ignore_index;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::min()};

  Targets(const at::Tensor& target, int64_t n_classes, int64_t ignore)
      : t(target.const_data_ptr<int64_t>()), C(n_classes), ignore_index(ignore) {}
  int64_t operator()(int64_t r) {
    const int64_t y = t[r];
    if (y == ignore_index) return -1;
    if (y < 0 || y >= C) {
      int64_t none = std::numeric_limits<int64_t>::min();
      bad.compare_exchange_strong(none, y);
      return -1;
    }
    return y;
  }
  void raise_if_bad(const char* fn) const {
    const int64_t b = bad.load();
    TORCH_CHECK_INDEX(b == std::numeric_limits<int64_t>::min(), fn, ": target ", b,
                      " is out of bounds for ", C, " classes");
  }
};

template <typename T>
struct RowStats {
  T lse, nll, q;  // log-sum-exp, lse - x_y, 1 - p_y (see the header)
};

// The row statistics from the max m (over all classes, target included), S (the sum of
// exp(x_j - m) over j != y) and x_y. Branch-free, so that it vectorises in per-pixel loops.
// e_y < 2^-60 (x_y far below the max): the loss is > 41 and lse - x_y loses nothing, while
// S / e_y could overflow.
template <typename T>
__attribute__((always_inline)) inline RowStats<T> row_finish(T m, T S, T x_y) {
  const T e_y = fast_exp(x_y - m);
  const T s = S + e_y;
  // (fast_log(NaN) is finite garbage: a NaN logit must give a NaN lse, and so a NaN gradient row)
  const T lse = s != s ? s : m + fast_log(s);
  const bool near = e_y > T(8.673617379884035e-19);  // 2^-60
  const T nll = near ? fast_log1p(S / (near ? e_y : T(1))) : lse - x_y;
  return {lse, nll, S / s};
}

// Short rows go through the kBlock buffer (one copy, the target set to -inf, one block call)
// rather than in place (a call for each side of the target, each mostly tail). The kernels alone,
// one thread, AVX-512, 1024 rows, builds alternated 3x, buffered vs in place: forward 80 classes
// 115-124 vs 148-161 us, 128: 117-129 vs 164-173, 255: 150-152 vs 175-185; backward 80: 86-101
// vs 114-122, 128: 79-118 vs 125-141, but 159: 137-186 vs 128-155 and 255: 186-231 vs 154-163.
constexpr int64_t kStatsBufferMaxC = 255;
constexpr int64_t kGradBufferMaxC = 128;

// One read of a row (C values sC apart) with valid target y: its statistics, and into *swx (if
// not null) sum_c w_c x_c (w null: sum_c x_c) for label smoothing. buf: kBlock scratch.
template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* xr, int64_t sC, int64_t C, int64_t y, const acc_t* w,
                          acc_t* swx, acc_t* buf) {
  const acc_t x_y = static_cast<acc_t>(xr[y * sC]);
  OnlineLSE<acc_t> acc;  // over j != y, seeded with m = x_y so that e_y <= 1
  acc.m = x_y;
  // Longer fp32 and bf16 rows (bf16 without label smoothing's dot) are read in place, no copy
  // into buf
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  if constexpr (std::is_same_v<scalar_t, acc_t> || kBf16) {
    if (sC == 1 && C > kStatsBufferMaxC && !(kBf16 && swx)) {  // the classes before and after y
      for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, y}, {y + 1, C}}) {
        for (int64_t c0 = lo; c0 < hi; c0 += kBlock) acc.add(xr + c0, std::min(kBlock, hi - c0));
      }
      if constexpr (!kBf16) {
        if (swx) {
          acc_t dot = 0;
          for (int64_t c0 = 0; c0 < C; c0 += kBlock)
            dot += block_dot<acc_t>(xr + c0, w ? w + c0 : nullptr, std::min(kBlock, C - c0));
          *swx = dot;
        }
      }
      return row_finish(acc.m, acc.s, x_y);
    }
  }
  acc_t dot = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t nb = std::min(kBlock, C - c0);
    load_block(xr + c0 * sC, sC, nb, buf);
    if (swx) dot += block_dot<acc_t>(buf, w ? w + c0 : nullptr, nb);
    if (y >= c0 && y < c0 + nb) buf[y - c0] = -std::numeric_limits<acc_t>::infinity();
    acc.add(buf, nb);
  }
  if (swx) *swx = dot;
  return row_finish(acc.m, acc.s, x_y);
}

// Vectorised (common.cpp): g = scale * (a exp(x - lse) - k w) (w null: - k), returns the block's
// sum of exp(x - lse).
float block_softmax_grad(const float* x, const float* w, int64_t n, float lse, float a, float k,
                         float scale, float* g);
double block_softmax_grad(const double* x, const double* w, int64_t n, double lse, double a,
                          double k, double scale, double* g);
// bf16 rows read and written in place (fp32 math; x == g allowed).
float block_softmax_grad(const c10::BFloat16* x, const float* w, int64_t n, float lse, float a,
                         float k, float scale, c10::BFloat16* g);

// The gradient sweep of a row with valid target y: writes scale * (a p_j - k w_j) through gr (C
// values gC apart; gr may be xr itself: each element is read before it is overwritten) for every
// j, the target column included or not (the caller writes it), and returns q = sum_{j != y} p_j,
// which is 1 - p_y without cancellation. bufs: 2 * kBlock scratch.
template <typename scalar_t, typename acc_t>
acc_t row_grad(const scalar_t* xr, int64_t sC, int64_t C, int64_t y, acc_t lse, acc_t a, acc_t k,
               const acc_t* w, acc_t scale, scalar_t* gr, int64_t gC, acc_t* buf, acc_t* gbuf) {
  acc_t q = 0;
  // Longer fp32 and bf16 rows read and written in place, no copies
  if constexpr (std::is_same_v<scalar_t, acc_t> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (sC == 1 && gC == 1 && C > kGradBufferMaxC) {  // the classes before and after y
      for (const auto& [lo, hi] : {std::pair<int64_t, int64_t>{0, y}, {y + 1, C}}) {
        for (int64_t c0 = lo; c0 < hi; c0 += kBlock) {
          q += block_softmax_grad(xr + c0, w ? w + c0 : nullptr, std::min(kBlock, hi - c0), lse,
                                  a, k, scale, gr + c0);
        }
      }
      return q;
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t nb = std::min(kBlock, C - c0);
    load_block(xr + c0 * sC, sC, nb, buf);
    if (y >= c0 && y < c0 + nb) buf[y - c0] = -std::numeric_limits<acc_t>::infinity();
    q += block_softmax_grad(buf, w ? w + c0 : nullptr, nb, lse, a, k, scale, gbuf);
    store_block(gbuf, nb, gr + c0 * gC, gC);
  }
  return q;
}

// ---- tiles: many rows at once, one lane per row ------------------------------------------------
// Where a row's classes are strided ((N, C, H, W) logits: C values H*W apart) or few ((N, C) with
// small C), a row-by-row sweep pays more per row than per element: every load is a gather, and the
// vector loops run on a handful of classes. A tile instead takes kTile rows and sweeps them class by
// class, one lane per row, so that the per-row math is vectorised across rows. The logits are seen
// as [images, C, P]: (N, C, D) with D > 1 is N images of D pixels (lanes 1 apart when the spatial
// stride is 1); (N, C) is one image of N rows (lanes sN apart).
constexpr int64_t kTile = 256;
// (N, C) logits take tiles up to this many classes. Cross-entropy forward / backward, one thread,
// AVX-512, tiles vs rows: 3-7x faster at C <= 16, forward 1.6-2x and backward level at 32 (first
// measured); since rows pay a fixed cost per row and per segment around the target (2026-12-02,
// the kernels alone, builds alternated): 128x40 forward 8.4-9.1 vs 21-25 us, backward 10-14 vs
// 14-16; 4096x48 forward 211-230 vs 555-570, backward 316-324 vs 373; 1024x64 forward 98-111 vs
// 142-152, backward level (104-112 vs 101); at C = 100-128 the tiles lose (backward 1.5x slower:
// the tile outgrows L1), so rows from 65 classes on. (Contiguous fp32 and bf16 rows take the row
// sweeps below from 32 classes.)
constexpr int64_t kTileMaxC = 64;

struct Tile {
  int64_t r0, S;      // first row (n * D + d) and lanes
  int64_t xoff, goff; // offsets of its first lane in the logits and in the gradient
};

// Contiguous (N, C) rows of fp32 or bf16 logits (and gradient) from kRowSweepMinC to
// kRowSweepMaxC classes take tiles too, swept row by row instead of class by class (rows_lse,
// rows_softmax_grad): each row in a few vector steps from L1, and the row statistics finished
// vectorised across the tile's rows rather than one scalar row at a time. (Those rows' other
// paths above: the class sweeps to 64 classes, then the row buffer or the in-place segments.)
// The kernels alone, one thread, fp32, builds alternated, min of 7x100 calls, forward / backward
// in us: AVX-512 Zen 4, 256x64 8.5-12.4 / 9.1-14.0 vs 26.7-37.1 / 28.3-34.1, 256x100 11.7-16.8 /
// 12.2-17.9 vs 33.9-37.4 / 21.1-32.9, 128x512 17.2-20.2 / 18.8-22.0 vs 28.6-37.0 / 28.7-35.9,
// 64x1000 level; the AVX2 code on the same CPU: 256x64 9.8-14.5 / 10.2-15.0 vs 29.0-29.7 /
// 30.3-32.8, 96x700 23.3-29.7 / 22.4-26.9 vs 30.1-39.5 / 36.7-37.3, but 64x1000 26.7-31.5 /
// 22.4-32.0 vs 24.8-25.3 / 23.3-23.6 (two reads of a row cost more than one online pass there).
// Below 32 classes (one AVX-512 step) the class sweeps are faster.
constexpr int64_t kRowSweepMinC = 32;
constexpr int64_t kRowSweepMaxC = 768;

struct TileGeom {
  int64_t C, sC, gC, lane, glane, P, sImg, gImg, T, per_img, count;
  bool rows;  // lanes are whole contiguous rows: the row sweeps
  // x: [N, C, D]; g: the gradient's strides (or x's when there is none).
  TileGeom(const at::Tensor& x, at::IntArrayRef g)
      : C(x.size(1)), sC(x.stride(1)), gC(g[1]), rows(row_sweeps(x, g)) {
    const bool pixels = x.size(2) > 1;
    lane = pixels ? x.stride(2) : x.stride(0);
    glane = pixels ? g[2] : g[0];
    P = pixels ? x.size(2) : x.size(0);
    sImg = pixels ? x.stride(0) : 0;
    gImg = pixels ? g[0] : 0;
    // Rows per tile: about 32k elements of long rows, so that a few hundred rows still make
    // several tasks.
    T = rows ? std::clamp<int64_t>(32768 / C, 8, kTile) : kTile;
    per_img = (P + T - 1) / T;
    count = (pixels ? x.size(0) : 1) * per_img;
  }
  Tile at(int64_t k) const {
    const int64_t img = k / per_img, p0 = (k % per_img) * T;
    return {img * P + p0, std::min(T, P - p0), img * sImg + p0 * lane, img * gImg + p0 * glane};
  }
  // Tiles per task: about 16k elements.
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C * T, 1)); }
  static bool row_sweeps(const at::Tensor& x, at::IntArrayRef g) {
    const auto dt = x.scalar_type();
    return x.size(2) == 1 && x.stride(1) == 1 && g[1] == 1 && x.size(1) >= kRowSweepMinC &&
           x.size(1) <= kRowSweepMaxC && (dt == at::kFloat || dt == at::kBFloat16);
  }
  // Whether the tile sweeps suit x (and g): unit-stride pixels, (N, C) rows with few classes, or
  // the row sweeps. (C < 2^24: the tiles hold class indices as acc_t.)
  static bool suits(const at::Tensor& x, at::IntArrayRef g) {
    if (x.size(2) > 1) return x.stride(2) == 1 && g[2] == 1 && x.size(1) < (1 << 24);
    return x.size(1) <= kTileMaxC || row_sweeps(x, g);
  }
};

// The row sweeps (common.cpp, per ISA), over n rows of C classes, row r at x + r ld:
//   rows_lse:          m[r] = max of the row, s[r] = sum of exp(x - m[r]) over its classes
//                      other than tv[r] (tv < 0: all)
//   rows_softmax_grad: for tv[r] >= 0, g = a[r] p - b[r] w_c (b null: no such term; w null:
//                      w_c = 1; w only for float) through g + r gld (g may be x), with p =
//                      exp(x - lse[r]), and q[r] = the sum of p over the classes other than
//                      tv[r]; other rows are not written (q 0), nor is the target column.
void rows_lse(const float* x, int64_t ld, int64_t C, int64_t n, const float* tv, float* m,
              float* s);
void rows_lse(const c10::BFloat16* x, int64_t ld, int64_t C, int64_t n, const float* tv, float* m,
              float* s);
void rows_softmax_grad(const float* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                       const float* lse, const float* a, const float* b, const float* w, float* g,
                       int64_t gld, float* q);
void rows_softmax_grad(const c10::BFloat16* x, int64_t ld, int64_t C, int64_t n, const float* tv,
                       const float* lse, const float* a, const float* b, const float* w,
                       c10::BFloat16* g, int64_t gld, float* q);
template <typename scalar_t>
constexpr bool has_row_sweeps_v =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// The class-by-class sweeps of a tile (common.cpp; float per ISA, double plain). x: one class of
// the tile's n lanes.
//   tile_max:      m = max(m, x)
//   tile_sum_exp:  s += exp(x - m) on the lanes whose target tv is not class c
//   tile_softmax_grad: p = exp(x - lse); q += p on the lanes whose target is not c;
//                      g = a p - b wc (b null: g = a p)
//   tile_dot:      d += wc x
void tile_max(const float* x, int64_t n, float* m);
void tile_max(const double* x, int64_t n, double* m);
void tile_sum_exp(const float* x, int64_t n, const float* m, const float* tv, float c, float* s);
void tile_sum_exp(const double* x, int64_t n, const double* m, const double* tv, double c,
                  double* s);
void tile_softmax_grad(const float* x, int64_t n, const float* lse, const float* a,
                       const float* b, float wc, const float* tv, float c, float* q, float* g);
void tile_softmax_grad(const double* x, int64_t n, const double* lse, const double* a,
                       const double* b, double wc, const double* tv, double c, double* q,
                       double* g);

void tile_dot(const float* x, int64_t n, float wc, float* d);  // d += wc x
void tile_dot(const double* x, int64_t n, double wc, double* d);

// A tile's targets, per lane: tv the class as acc_t (-1: ignored or out of range; exact for
// C < 2^24 classes), w_y into wv (1 without w; 0 for an ignored lane: no loss, no gradient), and
// if xv is given x at the target (0 for an ignored lane). xt: the tile's first lane.
template <typename scalar_t, typename acc_t>
void tile_targets(const TileGeom& G, const Tile& t, Targets& T, const scalar_t* xt,
                  const acc_t* w, acc_t* tv, acc_t* xv, acc_t* wv) {
  for (int64_t i = 0; i < t.S; ++i) {
    const int64_t y = T(t.r0 + i);
    tv[i] = static_cast<acc_t>(y);
    if (xv) xv[i] = y >= 0 ? static_cast<acc_t>(xt[i * G.lane + y * G.sC]) : acc_t(0);
    wv[i] = y >= 0 ? (w ? w[y] : acc_t(1)) : acc_t(0);
  }
}

// The statistics sweeps of a tile's S lanes, class by class: m the max, s the sum of exp(x - m)
// over the classes other than each lane's target, and if d is given d = sum_c w_c x_c (w null:
// sum_c x_c) for label smoothing. buf: kTile scratch; the tile stays in cache between sweeps.
template <typename scalar_t, typename acc_t>
void tile_stats(const TileGeom& G, int64_t S, const scalar_t* xt, const acc_t* tv, const acc_t* w,
                acc_t* m, acc_t* s, acc_t* d, acc_t* buf) {
  if constexpr (has_row_sweeps_v<scalar_t>) {
    if (G.rows) {
      rows_lse(xt, G.lane, G.C, S, tv, m, s);
      for (int64_t i = 0; d && i < S; ++i) {  // label smoothing's sum_c w_c x_c, row by row
        const scalar_t* xr = xt + i * G.lane;
        d[i] = 0;
        for (int64_t c0 = 0; c0 < G.C; c0 += kTile) {
          const int64_t nb = std::min(kTile, G.C - c0);
          load_block(xr + c0, 1, nb, buf);
          d[i] += block_dot<acc_t>(buf, w ? w + c0 : nullptr, nb);
        }
      }
      return;
    }
  }
  std::fill_n(m, S, -std::numeric_limits<acc_t>::infinity());
  std::fill_n(s, S, acc_t(0));
  if (d) std::fill_n(d, S, acc_t(0));
  for (int64_t c = 0; c < G.C; ++c) {
    load_block(xt + c * G.sC, G.lane, S, buf);
    tile_max(buf, S, m);
    if (d) tile_dot(buf, S, w ? w[c] : acc_t(1), d);
  }
  for (int64_t c = 0; c < G.C; ++c) {
    load_block(xt + c * G.sC, G.lane, S, buf);
    tile_sum_exp(buf, S, m, tv, static_cast<acc_t>(c), s);
  }
}

// The gradient of a tile's S lanes: g = a p - b w_c (p = exp(x - lse); b null: no such term; w
// null: w_c = 1) through gt, q the sum of p over each lane's classes other than its target, the
// ignored lanes (tv < 0) written as zeros; the target column is left to the caller. buf, gbuf:
// kTile scratch.
template <typename scalar_t, typename acc_t>
void tile_grad(const TileGeom& G, int64_t S, const scalar_t* xt, const acc_t* lse, const acc_t* a,
               const acc_t* b, const acc_t* w, const acc_t* tv, acc_t* q, scalar_t* gt,
               acc_t* buf, acc_t* gbuf) {
  bool swept = false;
  if constexpr (has_row_sweeps_v<scalar_t>) {
    // (bf16 rows with class weights in the gradient, label smoothing's: the class sweeps)
    if (G.rows && !(std::is_same_v<scalar_t, c10::BFloat16> && b && w)) {
      rows_softmax_grad(xt, G.lane, G.C, S, tv, lse, a, b, b ? w : nullptr, gt, G.glane, q);
      swept = true;
    }
  }
  if (!swept) {
    std::fill_n(q, S, acc_t(0));
    for (int64_t c = 0; c < G.C; ++c) {
      load_block(xt + c * G.sC, G.lane, S, buf);
      tile_softmax_grad(buf, S, lse, a, b, w ? w[c] : acc_t(1), tv, static_cast<acc_t>(c), q,
                        gbuf);
      store_block(gbuf, S, gt + c * G.gC, G.glane);
    }
  }
  for (int64_t i = 0; i < S; ++i) {
    if (tv[i] >= 0) continue;
    for (int64_t c = 0; c < G.C; ++c) gt[i * G.glane + c * G.gC] = scalar_t(0);
  }
}

}  // namespace fusedloss
