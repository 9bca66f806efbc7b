// Runs every kernel of /kernels on the CPU emulator (emu.h) against a float64 reference, on fresh
// random inputs (seed printed; SPINDLE_TEST_SEED replays), outputs poisoned with NaN first.
// Thresholds on ||out - ref|| / ||ref||: 1e-5 f32, 2e-3 f16, 1e-2 bf16. Exit status 1 on any
// failure. Built and run by scripts/check-cuda.sh; needs only g++ and the CUDA headers.
#include "emu.h"

#include "../activation.cu"
#include "../cache.cu"
#include "../paged_attention.cu"
#include "../prefill_attention.cu"
#include "../rms_norm.cu"
#include "../rotary.cu"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>
#include <string>

using spindle::bf16;
using spindle::f16;

static std::mt19937_64 rng;
static int failures = 0;
static int checks = 0;

static float uni(float a) { return std::uniform_real_distribution<float>(-a, a)(rng); }

template <typename T> static const char *tname();
template <> const char *tname<float>() { return "f32"; }
template <> const char *tname<f16>() { return "f16"; }
template <> const char *tname<bf16>() { return "bf16"; }
template <typename T> static double tol();
template <> double tol<float>() { return 1e-5; }
template <> double tol<f16>() { return 2e-3; }
template <> double tol<bf16>() { return 1e-2; }

template <typename T> static T poison() { return spindle::from_float<T>(NAN); }

template <typename T> static std::vector<T> rand_vec(size_t n, float scale) {
  std::vector<T> v(n);
  for (auto &x : v) x = spindle::from_float<T>(uni(scale));
  return v;
}
template <typename T> static std::vector<double> to_d(const std::vector<T> &v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = spindle::to_float(v[i]);
  return out;
}

static void check(const std::string &what, const std::vector<double> &out, const std::vector<double> &ref, double tolerance) {
  ++checks;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) {
      std::printf("FAIL %s: element %zu is %f (not written?)\n", what.c_str(), i, out[i]);
      ++failures;
      return;
    }
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double err = std::sqrt(num / std::max(den, 1e-300));
  if (!(err < tolerance)) {
    std::printf("FAIL %s: relative error %.3e >= %.0e\n", what.c_str(), err, tolerance);
    ++failures;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel symbols per (T, D).
template <typename T, int D> struct Attn;
#define REG(NAME, T, D)                                                                                      \
  template <> struct Attn<T, D> {                                                                            \
    static constexpr auto decode = paged_decode_##NAME##_d##D;                                               \
    static constexpr auto reduce = paged_decode_reduce_##NAME##_d##D;                                        \
    static constexpr auto prefill = prefill_attention_##NAME##_d##D;                                         \
  };
#define REG_ALL(NAME, T) REG(NAME, T, 64) REG(NAME, T, 80) REG(NAME, T, 96) REG(NAME, T, 128) REG(NAME, T, 256)
REG_ALL(f32, float)
REG_ALL(f16, f16)
REG_ALL(bf16, bf16)

template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr auto cache = reshape_and_cache_f32;
  static constexpr auto rms = rms_norm_f32;
  static constexpr auto add_rms = add_rms_norm_f32;
  static constexpr auto rotary = rotary_embedding_f32;
  static constexpr auto silu = silu_and_mul_f32;
};
template <> struct Elem<f16> {
  static constexpr auto cache = reshape_and_cache_f16;
  static constexpr auto rms = rms_norm_f16;
  static constexpr auto add_rms = add_rms_norm_f16;
  static constexpr auto rotary = rotary_embedding_f16;
  static constexpr auto silu = silu_and_mul_f16;
};
template <> struct Elem<bf16> {
  static constexpr auto cache = reshape_and_cache_bf16;
  static constexpr auto rms = rms_norm_bf16;
  static constexpr auto add_rms = add_rms_norm_bf16;
  static constexpr auto rotary = rotary_embedding_bf16;
  static constexpr auto silu = silu_and_mul_bf16;
};

// ---------------------------------------------------------------------------------------------
struct Seq {
  int qstart, qlen, ctx;
  std::vector<int> table;
};

// `window` > 0: sliding-window attention (a query at p sees keys p - window + 1 ..= p);
// `softcap` > 0: scaled scores become softcap * tanh(s / softcap).
template <typename T, int D>
static void test_attention(int num_heads, int num_kv_heads, bool split, int window = 0, float softcap = 0.f) {
  constexpr int BS = 16;
  const int group = num_heads / num_kv_heads;
  // (query_len, context_len): decode at block boundaries and across tiles, fresh prefill over
  // several CTAs and tiles, chunked prefill over a cached prefix.
  const std::vector<std::pair<int, int>> shapes = {{1, 1}, {1, 16}, {1, 17}, {1, 150}, {33, 33}, {20, 80}, {70, 70}};
  int num_blocks = 3;
  for (auto &s : shapes) num_blocks += (s.second + BS - 1) / BS;
  std::vector<int> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<Seq> seqs;
  int tokens = 0, next = 0;
  for (auto &s : shapes) {
    Seq q{tokens, s.first, s.second, {}};
    for (int b = 0; b < (s.second + BS - 1) / BS; ++b) q.table.push_back(ids[next++]);
    seqs.push_back(q);
    tokens += s.first;
  }
  const size_t cache_elems = (size_t)num_blocks * num_kv_heads * BS * D;
  auto kc = rand_vec<T>(cache_elems, 1.f), vc = rand_vec<T>(cache_elems, 1.f);
  const int q_stride = num_heads * D + 16 / (int)sizeof(T) * 8; // strided rows, like a qkv view
  auto q = rand_vec<T>((size_t)tokens * q_stride, 2.f);
  const float scale = 1.f / std::sqrt((float)D);

  // float64 reference
  std::vector<double> ref((size_t)tokens * num_heads * D, 0.0);
  auto kd = to_d(kc), vd = to_d(vc), qd = to_d(q);
  auto at = [&](int block, int h, int off) { return (((size_t)block * num_kv_heads + h) * BS + off) * D; };
  for (auto &s : seqs)
    for (int i = 0; i < s.qlen; ++i) {
      const int t = s.qstart + i, visible = s.ctx - s.qlen + i + 1;
      const int lo = window > 0 ? std::max(0, visible - window) : 0;
      for (int head = 0; head < num_heads; ++head) {
        const int kvh = head / group;
        std::vector<double> sc(visible, -INFINITY);
        double mx = -INFINITY;
        for (int p = lo; p < visible; ++p) {
          const size_t o = at(s.table[p / BS], kvh, p % BS);
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += qd[(size_t)t * q_stride + head * D + d] * kd[o + d];
          sc[p] = dot * scale;
          if (softcap > 0.f) sc[p] = softcap * std::tanh(sc[p] / softcap);
          mx = std::max(mx, sc[p]);
        }
        double den = 0;
        for (auto &x : sc) den += (x = std::exp(x - mx));
        for (int p = lo; p < visible; ++p) {
          const size_t o = at(s.table[p / BS], kvh, p % BS);
          for (int d = 0; d < D; ++d) ref[((size_t)t * num_heads + head) * D + d] += sc[p] / den * vd[o + d];
        }
      }
    }

  std::vector<T> out((size_t)tokens * num_heads * D, poison<T>());
  const float scale_log2 = scale * spindle::LOG2E;
  const float softcap_log2 = softcap * spindle::LOG2E;

  // Decode entries.
  std::vector<int> entry_token, entry_ctx, dtables;
  int max_ctx = 1, bt_stride = 1;
  for (auto &s : seqs)
    if (s.qlen == 1) bt_stride = std::max(bt_stride, (int)s.table.size());
  for (auto &s : seqs)
    if (s.qlen == 1) {
      entry_token.push_back(s.qstart);
      entry_ctx.push_back(s.ctx);
      max_ctx = std::max(max_ctx, s.ctx);
      auto row = s.table;
      row.resize(bt_stride, 0);
      dtables.insert(dtables.end(), row.begin(), row.end());
    }
  const int entries = (int)entry_token.size();
  const int heads_per_cta = std::min(group, 16);
  const int head_chunks = (group + heads_per_cta - 1) / heads_per_cta;
  const int partition = split ? 64 : (max_ctx + 63) / 64 * 64;
  const int parts = split ? (max_ctx + 63) / 64 : 1;
  std::vector<float> part_out((size_t)entries * num_heads * parts * D, NAN), part_ml((size_t)entries * num_heads * parts * 2, NAN);
  emu::launch(Attn<T, D>::decode, dim3(num_kv_heads * head_chunks, entries, parts), dim3(128), spindle::DecodeSmem<T, D>::BYTES,
              out.data(), (long long)num_heads * D, part_out.data(), part_ml.data(), (const T *)q.data(), (long long)q_stride,
              (const T *)kc.data(), (const T *)vc.data(), (const int *)entry_token.data(), (const int *)entry_ctx.data(),
              (const int *)dtables.data(), bt_stride, num_heads, num_kv_heads, BS, scale_log2, partition, parts, heads_per_cta,
              window, softcap_log2);
  if (split)
    emu::launch(Attn<T, D>::reduce, dim3(num_heads, entries, 1), dim3(128), (size_t)(parts + 32) * 4, out.data(),
                (long long)num_heads * D, (const float *)part_out.data(), (const float *)part_ml.data(),
                (const int *)entry_token.data(), (const int *)entry_ctx.data(), num_heads, partition, parts);

  // Prefill sequences and work items (most keys first).
  std::vector<int> pq, pl, pc, ptables, work_seq, work_qoff;
  int pstride = 1;
  for (auto &s : seqs)
    if (s.qlen > 1) pstride = std::max(pstride, (int)s.table.size());
  const int tpc = std::max(1, 64 / group);
  std::vector<std::tuple<int, int, int>> work;
  for (auto &s : seqs)
    if (s.qlen > 1) {
      const int idx = (int)pq.size();
      pq.push_back(s.qstart);
      pl.push_back(s.qlen);
      pc.push_back(s.ctx);
      auto row = s.table;
      row.resize(pstride, 0);
      ptables.insert(ptables.end(), row.begin(), row.end());
      for (int off = 0; off < s.qlen; off += tpc)
        work.emplace_back(-(s.ctx - s.qlen + off + std::min(tpc, s.qlen - off)), idx, off);
    }
  std::sort(work.begin(), work.end());
  for (auto &w : work) {
    work_seq.push_back(std::get<1>(w));
    work_qoff.push_back(std::get<2>(w));
  }
  emu::launch(Attn<T, D>::prefill, dim3((unsigned)work.size(), num_kv_heads, 1), dim3(256), spindle::PrefillSmem<T, D>::BYTES,
              out.data(), (long long)num_heads * D, (const T *)q.data(), (long long)q_stride, (const T *)kc.data(),
              (const T *)vc.data(), (const int *)pq.data(), (const int *)pl.data(), (const int *)pc.data(),
              (const int *)ptables.data(), pstride, (const int *)work_seq.data(), (const int *)work_qoff.data(), num_heads,
              num_kv_heads, BS, scale_log2, tpc, window, softcap_log2);

  check(std::string("attention ") + tname<T>() + " d" + std::to_string(D) + " heads " + std::to_string(num_heads) + "/" +
            std::to_string(num_kv_heads) + (split ? " split-K" : " v1") +
            (window > 0 ? " window " + std::to_string(window) : "") + (softcap > 0.f ? " softcap" : ""),
        to_d(out), ref, tol<T>());
}

template <typename T, int D> static void test_reshape_and_cache() {
  const int kvh = 2, bs = 16, blocks = 8, row = kvh * D;
  std::vector<uint32_t> slots = {0, 15, 16, 31, 32, 127};
  std::vector<uint32_t> rest;
  for (uint32_t s = 0; s < 128; ++s)
    if (std::find(slots.begin(), slots.end(), s) == slots.end()) rest.push_back(s);
  std::shuffle(rest.begin(), rest.end(), rng);
  slots.insert(slots.end(), rest.begin(), rest.begin() + 20);
  slots.push_back(0xffffffffu); // a padding token: skipped
  const int tokens = (int)slots.size();
  auto qkv = rand_vec<T>((size_t)tokens * 3 * row, 1.f);
  std::vector<T> kc((size_t)blocks * row * bs, poison<T>()), vc = kc;
  emu::launch(Elem<T>::cache, dim3(tokens), dim3(64), 0, (const T *)qkv.data() + row, (const T *)qkv.data() + 2 * row,
              kc.data(), vc.data(), (const uint32_t *)slots.data(), kvh, D, bs, (long long)3 * row, (long long)3 * row);
  std::vector<double> got, want;
  std::vector<bool> written((size_t)blocks * bs, false);
  for (int t = 0; t < tokens; ++t) {
    if (slots[t] == 0xffffffffu) continue;
    const int block = slots[t] / bs, off = slots[t] % bs;
    written[slots[t]] = true;
    for (int h = 0; h < kvh; ++h)
      for (int d = 0; d < D; ++d) {
        const size_t dst = (((size_t)block * kvh + h) * bs + off) * D + d;
        got.push_back(spindle::to_float(kc[dst]));
        got.push_back(spindle::to_float(vc[dst]));
        want.push_back(spindle::to_float(qkv[(size_t)t * 3 * row + row + h * D + d]));
        want.push_back(spindle::to_float(qkv[(size_t)t * 3 * row + 2 * row + h * D + d]));
      }
  }
  check(std::string("reshape_and_cache ") + tname<T>() + " d" + std::to_string(D), got, want, 1e-12);
  for (size_t slot = 0; slot < written.size(); ++slot)
    if (!written[slot]) {
      const int block = (int)slot / bs, off = (int)slot % bs;
      for (int h = 0; h < kvh; ++h)
        if (!std::isnan(spindle::to_float(kc[(((size_t)block * kvh + h) * bs + off) * D]))) {
          std::printf("FAIL reshape_and_cache %s: slot %zu was overwritten\n", tname<T>(), slot);
          ++failures;
          return;
        }
    }
}

template <typename T> static void test_rms_norm(int hidden) {
  const int rows = 5, stride = hidden + 8;
  const float eps = 1e-5f;
  constexpr int V = spindle::Vec<T>::N;
  auto xw = rand_vec<T>((size_t)rows * stride, 3.f);
  auto w = rand_vec<T>(hidden, 1.f);
  auto r = rand_vec<T>((size_t)rows * hidden, 3.f);
  const int vectorized = hidden % V == 0;
  auto xd = to_d(xw), wd = to_d(w);
  auto norm = [&](const std::vector<double> &x, int xs) {
    std::vector<double> out;
    for (int i = 0; i < rows; ++i) {
      double ms = 0;
      for (int j = 0; j < hidden; ++j) ms += x[(size_t)i * xs + j] * x[(size_t)i * xs + j];
      const double inv = 1.0 / std::sqrt(ms / hidden + eps);
      for (int j = 0; j < hidden; ++j) out.push_back(x[(size_t)i * xs + j] * inv * wd[j]);
    }
    return out;
  };
  std::vector<T> out((size_t)rows * hidden, poison<T>());
  const int threads = std::min(1024, std::max(32, ((vectorized ? hidden / V : hidden) + 31) / 32 * 32));
  // Strided input rows start 8 elements in (16-byte aligned for every dtype).
  emu::launch(Elem<T>::rms, dim3(rows), dim3(threads), 0, out.data(), (long long)hidden, (const T *)xw.data() + 8,
              (long long)stride, (const T *)w.data(), hidden, eps, vectorized);
  std::vector<double> xs(xd.begin() + 8, xd.end());
  check(std::string("rms_norm ") + tname<T>() + " " + std::to_string(hidden), to_d(out), norm(xs, stride), tol<T>());

  // add_rms_norm on contiguous rows, sum rounded to T as the unfused graph does.
  std::vector<T> x((size_t)rows * hidden);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < hidden; ++j) x[(size_t)i * hidden + j] = xw[(size_t)i * stride + 8 + j];
  std::vector<T> sum((size_t)rows * hidden, poison<T>()), normed = sum;
  emu::launch(Elem<T>::add_rms, dim3(rows), dim3(threads), 0, normed.data(), sum.data(), (long long)hidden,
              (const T *)x.data(), (const T *)r.data(), (const T *)w.data(), hidden, eps, vectorized);
  std::vector<double> sref;
  for (size_t i = 0; i < x.size(); ++i)
    sref.push_back(spindle::to_float(spindle::from_float<T>(spindle::to_float(x[i]) + spindle::to_float(r[i]))));
  check(std::string("add_rms_norm sum ") + tname<T>(), to_d(sum), sref, 1e-12);
  check(std::string("add_rms_norm ") + tname<T>() + " " + std::to_string(hidden), to_d(normed), norm(sref, hidden), tol<T>());
}

template <typename T> static void test_rotary(int head_dim) {
  const int tokens = 13, heads = 6, kvh = 2, max_pos = 300, half = head_dim / 2;
  const int qd = heads * head_dim, kd = kvh * head_dim, stride = qd + 2 * kd;
  std::vector<T> cos((size_t)max_pos * half), sin = cos;
  for (size_t i = 0; i < cos.size(); ++i) {
    const float a = uni(50.f);
    cos[i] = spindle::from_float<T>(std::cos(a));
    sin[i] = spindle::from_float<T>(std::sin(a));
  }
  std::vector<uint32_t> pos = {0, 15, 16, 17, 63, 64, 299};
  while ((int)pos.size() < tokens) pos.push_back(rng() % max_pos);
  auto qkv = rand_vec<T>((size_t)tokens * stride, 2.f);
  auto before = to_d(qkv);
  constexpr int V = spindle::Vec<T>::N;
  emu::launch(Elem<T>::rotary, dim3(tokens), dim3(128), 0, qkv.data(), (long long)stride, qkv.data() + qd, (long long)stride,
              (const T *)cos.data(), (const T *)sin.data(), (const uint32_t *)pos.data(), max_pos, heads, kvh, head_dim,
              (int)(half % V == 0));
  std::vector<double> ref = before;
  auto cd = to_d(cos), sd = to_d(sin);
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < heads + kvh; ++h) {
      const size_t base = (size_t)t * stride + (size_t)h * head_dim;
      for (int i = 0; i < half; ++i) {
        const double a = before[base + i], b = before[base + half + i];
        const double c = cd[(size_t)pos[t] * half + i], s = sd[(size_t)pos[t] * half + i];
        ref[base + i] = a * c - b * s;
        ref[base + half + i] = b * c + a * s;
      }
    }
  check(std::string("rotary ") + tname<T>() + " d" + std::to_string(head_dim), to_d(qkv), ref, tol<T>());
}

template <typename T> static void test_silu(int d) {
  const int rows = 4;
  constexpr int V = spindle::Vec<T>::N;
  auto x = rand_vec<T>((size_t)rows * 2 * d, 6.f);
  std::vector<T> out((size_t)rows * d, poison<T>());
  const int vectorized = d % V == 0;
  const int chunks = (d + V - 1) / V;
  emu::launch(Elem<T>::silu, dim3(rows, (chunks + 255) / 256), dim3(256), 0, out.data(), (long long)d, (const T *)x.data(),
              (long long)2 * d, d, vectorized);
  auto xd = to_d(x);
  std::vector<double> ref;
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < d; ++i) {
      const double g = xd[(size_t)r * 2 * d + i], u = xd[(size_t)r * 2 * d + d + i];
      ref.push_back(g / (1 + std::exp(-g)) * u);
    }
  check(std::string("silu_and_mul ") + tname<T>() + " " + std::to_string(d), to_d(out), ref, tol<T>());
}

static void test_copy_blocks() {
  const int blocks = 10;
  const long long block_bytes = 2 * 16 * 80 * 2;
  std::vector<std::vector<unsigned char>> bufs(4, std::vector<unsigned char>(blocks * block_bytes));
  for (auto &b : bufs)
    for (auto &x : b) x = (unsigned char)rng();
  auto expected = bufs;
  const std::vector<uint32_t> pairs = {1, 7, 2, 8, 1, 9};
  for (auto &e : expected)
    for (size_t p = 0; p < pairs.size(); p += 2)
      std::memcpy(&e[pairs[p + 1] * block_bytes], &e[pairs[p] * block_bytes], block_bytes);
  std::vector<unsigned long long> addrs;
  for (auto &b : bufs) addrs.push_back((unsigned long long)(uintptr_t)b.data());
  emu::launch(copy_blocks, dim3(3, 4), dim3(256), 0, (const unsigned long long *)addrs.data(), (const uint32_t *)pairs.data(),
              block_bytes);
  ++checks;
  if (bufs != expected) {
    std::printf("FAIL copy_blocks\n");
    ++failures;
  }
}

template <typename T, int D> static void attention_all() {
  for (auto hk : std::vector<std::pair<int, int>>{{2, 2}, {6, 2}, {20, 1}})
    for (bool split : {false, true}) test_attention<T, D>(hk.first, hk.second, split);
  test_reshape_and_cache<T, D>();
}

// Sliding windows at tile and block edges (1, 17, 65) and Gemma 2's soft-cap, on the head
// sizes of Gemma (256) and the common 64.
template <typename T, int D> static void windowed_all() {
  for (int window : {1, 17, 65})
    for (bool split : {false, true}) test_attention<T, D>(6, 2, split, window, window == 17 ? 2.5f : 0.f);
}

template <typename T> static void dtype_all() {
  windowed_all<T, 64>();
  windowed_all<T, 256>();
  attention_all<T, 64>();
  attention_all<T, 80>();
  attention_all<T, 96>();
  attention_all<T, 128>();
  attention_all<T, 256>();
  for (int h : {64, 576, 4096, 100}) test_rms_norm<T>(h);
  for (int d : {64, 80, 96, 128, 256}) test_rotary<T>(d);
  for (int d : {1536, 100, 8}) test_silu<T>(d);
}

int main() {
  unsigned long long seed = std::chrono::steady_clock::now().time_since_epoch().count();
  if (const char *s = std::getenv("SPINDLE_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  rng.seed(seed);
  std::printf("kernel emulator tests, seed %llu\n", seed);
  const auto t0 = std::chrono::steady_clock::now();
  dtype_all<float>();
  dtype_all<f16>();
  dtype_all<bf16>();
  test_copy_blocks();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d checks, %d failures, %.1f s\n", checks, failures, secs);
  return failures == 0 ? 0 : 1;
}
