"""Native CPU kernels for the few-bit codec, built lazily with the system C compiler and loaded with ctypes.

Why plain C + ctypes rather than a torch C++ extension: one C file without torch headers compiles
quickly, needs no build step at install, and the kernels only touch raw buffers. When no compiler is
found or the build fails, `available()` is False and `tightfit.fewbit.codec` falls back to its pure-torch
path.

Two fused kernels (the layout and code semantics are those of `tightfit.fewbit.codec`):

- ``encode``: one pass over x: a branchless binary search over the borders (fp32 with AVX-512: 16 lanes,
  probes from an in-register table; a count for tables with fewer borders than bits), pack 8 codes into
  b bytes, write ceil(n*b/8) bytes. One copy is compiled per code width, so the search and the
  packing unroll for a constant width (the codec table of benchmarks/fewbit/ops.py times the kernels
  against the pure-torch codec).
- ``decode_mul``: one pass: read b bytes per 8 codes, gather the level, multiply by the gradient in the
  gradient's dtype (fp16/bf16 products are formed exactly in fp32 and rounded once, as torch does).

Threads: the range is split over ``torch.get_num_threads()`` pthreads for large inputs. The compiled
library is cached under ``$TIGHTFIT_CACHE`` (default ``~/.cache/tightfit``), keyed by source, flags and CPU.

Output buffers (`empty`): a large tensor fresh from the allocator is a new mapping, and writing it costs
one page fault per 4 KiB page, which at tens of MiB costs more than the kernels themselves (the operator
benchmark measures it). The buffers these kernels allocate (codes, the backward's gradient, the fused
SiLU's output) are therefore advised as transparent huge pages (``madvise(MADV_HUGEPAGE)``, Linux; one
fault per 2 MiB) when they are at least `HUGE_MIN_BYTES`. ``TIGHTFIT_HUGEPAGES=0`` turns that off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

static inline float ld_f32(const void* p, int64_t i) { return ((const float*)p)[i]; }
static inline float ld_bf16(const void* p, int64_t i) {
  uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float ld_f16(const void* p, int64_t i) { return (float)((const _Float16*)p)[i]; }
static inline double ld_f64(const void* p, int64_t i) { return ((const double*)p)[i]; }

static inline void st_f32(void* p, int64_t i, float v) { ((float*)p)[i] = v; }
static inline void st_f64(void* p, int64_t i, double v) { ((double*)p)[i] = v; }
static inline void st_f16(void* p, int64_t i, float v) { ((_Float16*)p)[i] = (_Float16)v; }
static inline void st_bf16(void* p, int64_t i, float v) {
  uint32_t u; memcpy(&u, &v, 4);
  uint16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) r = 0x7fc0;
  else { u += 0x7fffu + ((u >> 16) & 1u); r = (uint16_t)(u >> 16); }
  ((uint16_t*)p)[i] = r; }

/* Work is split in blocks of 64 elements (8 groups of 8 codes = 8*bits bytes). Full blocks take a
   branch-free path the compiler vectorises; the one partial block at the end takes the padded path. */
#define ENCODE_FN(NAME, LD, CT)                                                                       \
static void NAME(const void* x, int64_t n, int64_t b0, int64_t b1, const CT* B, int K, int bits,      \
                 int right, int nan_code, uint8_t* out) {                                           \
  CT pad[256];                                                                                      \
  int P = (1 << bits) - 1;                                                                          \
  if (K > 16) { for (int k = 0; k < P; k++) pad[k] = k < K ? B[k] : (CT)NAN; }                      \
  for (int64_t blk = b0; blk < b1; blk++) {                                                         \
    CT xv[64]; uint8_t c[64];                                                                       \
    int64_t base = blk * 64;                                                                        \
    int cnt = n - base >= 64 ? 64 : (int)(n - base);                                                \
    if (cnt == 64) { for (int j = 0; j < 64; j++) xv[j] = LD(x, base + j); }                        \
    else { for (int j = 0; j < 64; j++) xv[j] = j < cnt ? LD(x, base + j) : (CT)0; }                \
    for (int j = 0; j < 64; j++) c[j] = 0;                                                          \
    if (K <= 16) {                                                                                  \
      for (int k = 0; k < K; k++) {                                                                 \
        CT b = B[k];                                                                                \
        if (right) { for (int j = 0; j < 64; j++) c[j] += xv[j] >= b; }                             \
        else { for (int j = 0; j < 64; j++) c[j] += xv[j] > b; }                                    \
      }                                                                                             \
    } else {                                                                                        \
      for (int j = 0; j < 64; j++) {                                                                \
        uint32_t idx = 0;                                                                           \
        for (uint32_t s = 1u << (bits - 1); s; s >>= 1)                                             \
          idx += (right ? (xv[j] >= pad[idx + s - 1]) : (xv[j] > pad[idx + s - 1])) ? s : 0;        \
        c[j] = (uint8_t)idx;                                                                        \
      }                                                                                             \
    }                                                                                               \
    for (int j = 0; j < 64; j++) c[j] = xv[j] != xv[j] ? (uint8_t)nan_code : c[j];                  \
    uint8_t* o = out + blk * 8 * bits;                                                              \
    if (cnt == 64) {                                                                                \
      for (int gi = 0; gi < 8; gi++) {                                                              \
        uint64_t w = 0;                                                                             \
        for (int j = 0; j < 8; j++) w |= (uint64_t)c[gi * 8 + j] << (j * bits);                     \
        for (int t = 0; t < bits; t++) o[gi * bits + t] = (uint8_t)(w >> (8 * t));                 \
      }                                                                                             \
    } else {                                                                                        \
      for (int j = cnt; j < 64; j++) c[j] = 0;                                                      \
      int64_t nbytes = ((int64_t)cnt * bits + 7) / 8;                                               \
      for (int gi = 0; gi * 8 < cnt; gi++) {                                                        \
        uint64_t w = 0;                                                                             \
        for (int j = 0; j < 8; j++) w |= (uint64_t)c[gi * 8 + j] << (j * bits);                     \
        for (int t = 0; t < bits && gi * bits + t < nbytes; t++) o[gi * bits + t] = (uint8_t)(w >> (8 * t)); \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
}

ENCODE_FN(enc_f32, ld_f32, float)
ENCODE_FN(enc_bf16, ld_bf16, float)
ENCODE_FN(enc_f16, ld_f16, float)
ENCODE_FN(enc_f64, ld_f64, double)

/* a product rounded to the tensor dtype, as torch's fp16/bf16 mul rounds its fp32 product */
static inline float rnd_f32(float v) { return v; }
static inline double rnd_f64(double v) { return v; }
static inline float rnd_f16(float v) { return (float)(_Float16)v; }
static inline float rnd_bf16(float v) { uint16_t b; st_bf16(&b, 0, v); return ld_bf16(&b, 0); }

/* ---------------- decode_mul: out = levels[code] * grad, or levels[code] * (grad * g2) ---------------- */
#define DECODE_FN(NAME, LD, ST, RND, CT)                                                              \
static void NAME(const uint8_t* in, int64_t n, int64_t b0, int64_t b1, const CT* L, int bits,        \
                 const void* grad, const void* g2, void* out) {                                     \
  uint64_t mask = (bits == 8) ? 0xffu : ((1u << bits) - 1u);                                        \
  int64_t nbytes_all = (n * bits + 7) / 8;                                                          \
  for (int64_t blk = b0; blk < b1; blk++) {                                                         \
    int64_t base = blk * 64;                                                                        \
    int cnt = n - base >= 64 ? 64 : (int)(n - base);                                                \
    const uint8_t* p = in + blk * 8 * bits;                                                         \
    uint32_t c[64];                                                                                 \
    for (int gi = 0; gi < 8; gi++) {                                                                \
      uint64_t w = 0;                                                                               \
      if (cnt == 64) { for (int t = 0; t < bits; t++) w |= (uint64_t)p[gi * bits + t] << (8 * t); } \
      else { for (int t = 0; t < bits; t++) {                                                       \
        int64_t at = blk * 8 * bits + gi * bits + t;                                                \
        if (at < nbytes_all) w |= (uint64_t)p[gi * bits + t] << (8 * t); } }                        \
      for (int j = 0; j < 8; j++) c[gi * 8 + j] = (uint32_t)((w >> (j * bits)) & mask);             \
    }                                                                                               \
    for (int j = 0; j < cnt; j++) {                                                                 \
      CT g = g2 ? RND(LD(grad, base + j) * LD(g2, base + j)) : LD(grad, base + j);                  \
      ST(out, base + j, L[c[j]] * g);                                                               \
    }                                                                                               \
  }                                                                                                 \
}

DECODE_FN(dec_f32, ld_f32, st_f32, rnd_f32, float)
DECODE_FN(dec_bf16, ld_bf16, st_bf16, rnd_bf16, float)
DECODE_FN(dec_f16, ld_f16, st_f16, rnd_f16, float)
DECODE_FN(dec_f64, ld_f64, st_f64, rnd_f64, double)

#if defined(__AVX512F__)
#include <immintrin.h>
/* fp32 decode of full blocks with AVX-512: 8 codes per 64-bit word via variable shifts, the level gather
   via one permute (<= 16 levels) or a gather, then one IEEE fp32 multiply (the same as torch's mul;
   with g2, the product g * g2 first, as torch's (grad * g2) would round it).
   Reads 8 bytes at p + gi*bits, so the caller keeps it away from the last 8 bytes of the buffer. */
#define HAVE_SIMD_DEC 1
static inline __attribute__((always_inline)) void dec_f32_simd_(const uint8_t* in, int64_t b0, int64_t b1,
    const float* L, int bits, const float* g, const float* g2, float* out) {
  __m512i shifts = _mm512_setr_epi64(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits);
  __m512i mask = _mm512_set1_epi64((bits == 8) ? 0xff : ((1 << bits) - 1));
  __m512 L16 = _mm512_loadu_ps(L);
  for (int64_t blk = b0; blk < b1; blk++) {
    const uint8_t* p = in + blk * 8 * bits;
    int64_t base = blk * 64;
    for (int gi = 0; gi < 8; gi += 2) {
      uint64_t w0, w1;
      memcpy(&w0, p + gi * bits, 8); memcpy(&w1, p + (gi + 1) * bits, 8);
      __m512i v0 = _mm512_srlv_epi64(_mm512_set1_epi64((long long)w0), shifts);
      __m512i v1 = _mm512_srlv_epi64(_mm512_set1_epi64((long long)w1), shifts);
      __m256i i0 = _mm512_cvtepi64_epi32(_mm512_and_si512(v0, mask));
      __m256i i1 = _mm512_cvtepi64_epi32(_mm512_and_si512(v1, mask));
      __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(i0), i1, 1);
      __m512 lv = bits <= 4 ? _mm512_permutexvar_ps(idx, L16) : _mm512_i32gather_ps(idx, L, 4);
      __m512 gv = _mm512_loadu_ps(g + base + gi * 8);
      if (g2) gv = _mm512_mul_ps(gv, _mm512_loadu_ps(g2 + base + gi * 8));
      _mm512_storeu_ps(out + base + gi * 8, _mm512_mul_ps(lv, gv));
    }
  }
}

static void dec_f32_simd(const uint8_t* in, int64_t b0, int64_t b1, const float* L, int bits,
                         const float* g, const float* g2, float* out) {
  if (g2) dec_f32_simd_(in, b0, b1, L, bits, g, g2, out);
  else dec_f32_simd_(in, b0, b1, L, bits, g, 0, out);
}
#endif

#if defined(__AVX512F__) && defined(__BMI2__)
/* fp32 encode with AVX-512 + BMI2, 16 elements per step. Codes: a branchless binary search over the
   2**b - 1 border slots (padded with NaN, which compares false, i.e. acts as +inf, as in the scalar
   path): b steps of one compare and one masked add. The probed border comes from one in-register
   permute while the probes stay within 16 slots (every step for b <= 4; the first b - 4 steps for
   b > 4, whose probes are slots 16m + 15), and from a gather for the last 4 steps of b > 4. A very short
   table (K < b borders) is counted instead. NaN inputs get ``nan_code``. Packing: bit plane k of the
   codes is deposited (pdep) at bits k, k+b, k+2b, ... of a 64-bit word holding 16 codes (b <= 4) or 8
   codes (b > 4, two words), which is the codec's layout. The 8-byte stores overrun the step's 2*b
   bytes, so the caller keeps them away from the end of the buffer and of the thread's range. */
#include <immintrin.h>
#define HAVE_SIMD_ENC 1

/* SiLU y = x / (1 + exp(-x)) bit-identical to torch's CPU kernel (AVX-512 build): torch splits [0, n)
   into ranges of `chunk` (one per OpenMP thread); inside a range, whole pairs of 16-lane vectors use
   Sleef_expf16_u10 (`vexp`: torch's own copy, passed in) and the rest the scalar expf. Element i gets
   the path torch gives it, whatever this file's own threading. */
typedef __m512 (*vexp16_t)(__m512);
typedef struct { float* y; int64_t n, chunk, next, vend; vexp16_t vexp; } silu_t;

/* y[i : i + cnt] for 1 <= cnt <= 16, v = x[i : i + cnt] (masked lanes zero) */
static inline __attribute__((always_inline)) void silu16(silu_t* S, const float* x, int64_t i, int cnt,
                                                         __m512 v) {
  if (i >= S->next || i < S->next - S->chunk) {  /* entering another of torch's ranges */
    int64_t b = (i / S->chunk) * S->chunk;
    S->next = b + S->chunk < S->n ? b + S->chunk : S->n;
    S->vend = b + ((S->next - b) & ~(int64_t)31);
  }
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
  __m512 e = S->vexp(neg);
  __m512 r = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  if (cnt == 16 && i + 16 <= S->vend) { _mm512_storeu_ps(S->y + i, r); return; }
  float tmp[16];
  _mm512_storeu_ps(tmp, r);
  for (int k = 0; k < cnt; k++) {  /* lanes in a range's scalar tail */
    int64_t at = i + k, bt = (at / S->chunk) * S->chunk, et = bt + S->chunk < S->n ? bt + S->chunk : S->n;
    if (at >= bt + ((et - bt) & ~(int64_t)31)) tmp[k] = x[at] / (1.0f + expf(-x[at]));
  }
  _mm512_mask_storeu_ps(S->y + i, (__mmask16)((1u << cnt) - 1u), _mm512_loadu_ps(tmp));
}

static void silu_f32(silu_t* S, const float* x, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; i += 16) {
    int cnt = i1 - i >= 16 ? 16 : (int)(i1 - i);
    silu16(S, x, i, cnt, _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1u), x + i));
  }
}

/* T[idx] for a table of 16 * nreg floats in nreg registers (nreg = 1, 2, 4, 8; idx < 16 * nreg) */
static inline __attribute__((always_inline)) __m512 lut(__m512i idx, const __m512* T, int nreg) {
  if (nreg == 1) return _mm512_permutexvar_ps(idx, T[0]);
  __m512 r0 = _mm512_permutex2var_ps(T[0], idx, T[1]);  /* the low 5 bits of idx */
  if (nreg == 2) return r0;
  __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  __m512 s0 = _mm512_mask_blend_ps(b5, r0, _mm512_permutex2var_ps(T[2], idx, T[3]));
  if (nreg == 4) return s0;
  __m512 s1 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(T[4], idx, T[5]),
                                   _mm512_permutex2var_ps(T[6], idx, T[7]));
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)), s0, s1);
}

/* S: also write silu(x) to S->y (fused forward), or NULL */
static inline __attribute__((always_inline)) void enc_f32_simd_(const float* x, int64_t s0, int64_t s1,
    const float* B, int K, int bits, int nan_code, uint8_t* out, silu_t* S) {
  uint64_t pattern[8];  /* bits <= 4: 16 codes per 64-bit word; else 8 codes per word, two words */
  int per = bits <= 4 ? 16 : 8;
  for (int k = 0; k < bits; k++) {
    uint64_t m = 0;
    for (int i = 0; i < per; i++) m |= 1ull << (i * bits + k);
    pattern[k] = m;
  }
  float pad[256], coarse[16];
  int P = (1 << bits) - 1;
  for (int k = 0; k < 256; k++) pad[k] = k < K ? B[k] : NAN;
  /* in-register table: the slots themselves (b <= 4) or every 16th slot 16m + 15 (b > 4) */
  for (int m = 0; m < 16; m++) coarse[m] = bits <= 4 ? pad[m] : (16 * m + 15 < P ? pad[16 * m + 15] : NAN);
  const int count = K < bits;  /* fewer borders than search steps: count them */
  __m512 t[16];
  for (int k = 0; k < K && count; k++) t[k] = _mm512_set1_ps(B[k]);
  const __m512 table = _mm512_loadu_ps(coarse);
  /* b <= 4: the table shifted by st - 1 for each step st, so a probe is one permute by the code so far;
     the first probe (code 0) is a broadcast */
  __m512 shifted[4];
  for (int l = 0; l < 4; l++) {
    float tmp[16];
    for (int m = 0; m < 16; m++) tmp[m] = m + (1 << l) - 1 < 16 ? coarse[m + (1 << l) - 1] : NAN;
    shifted[l] = _mm512_loadu_ps(tmp);
  }
  const __m512 first = _mm512_set1_ps(pad[(1 << (bits - 1)) - 1]);
  /* b > 4, the last 4 steps (st = 8, 4, 2, 1): the probed slot c + st - 1 is entry c >> (l + 1) of a
     table of 16 << (3 - l) slots (st = 2**l), looked up with permutes from 1, 2, 4 or 8 registers */
  __m512 fine[15];
  const int fine_at[4] = {0, 8, 12, 14};  /* first register of the table of step 2**l */
  for (int l = 0; l < 4 && bits > 4; l++) {
    float tab[128];
    for (int e = 0; e < (16 << (3 - l)); e++) tab[e] = pad[(e << (l + 1)) + (1 << l) - 1];
    for (int r = 0; r < (8 >> l); r++) fine[fine_at[l] + r] = _mm512_loadu_ps(tab + 16 * r);
  }
  const __m512i one = _mm512_set1_epi32(1), nanc = _mm512_set1_epi32(nan_code);
  for (int64_t s8 = s0; s8 < s1; s8 += 8) {
  int64_t s8e = s8 + 8 < s1 ? s8 + 8 : s1;
  /* SiLU of 8 steps first: the constants below are spilled around its calls once per 8 steps */
  if (S) for (int64_t q = s8; q < s8e; q++) silu16(S, x, q * 16, 16, _mm512_loadu_ps(x + q * 16));
  for (int64_t s = s8; s < s8e; s++) {
    __m512 v = _mm512_loadu_ps(x + s * 16);
    __m512i c = _mm512_setzero_si512();
    if (count) {
      for (int k = 0; k < K; k++)
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, t[k], _CMP_GT_OQ), c, one);
    } else if (bits <= 4) {
      c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, first, _CMP_GT_OQ),
                                 _mm512_set1_epi32(1 << (bits - 1)));
      for (int l = bits - 2; l >= 0; l--) {
        __m512 tv = _mm512_permutexvar_ps(c, shifted[l]);
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, tv, _CMP_GT_OQ), c, _mm512_set1_epi32(1 << l));
      }
    } else {
      int st = 1 << (bits - 1);
      for (; st >= 16; st >>= 1) {  /* probe slot c + st - 1 = 16 * ((c + st) / 16 - 1) + 15 */
        __m512i m = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(st)), 4), one);
        __m512 tv = _mm512_permutexvar_ps(m, table);
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, tv, _CMP_GT_OQ), c, _mm512_set1_epi32(st));
      }
      for (int l = 3; l >= 0; l--) {  /* st = 2**l: probe slot c + st - 1, from fine[l][c >> (l + 1)] */
        __m512 tv = lut(_mm512_srli_epi32(c, l + 1), fine + fine_at[l], 8 >> l);
        c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, tv, _CMP_GT_OQ), c, _mm512_set1_epi32(1 << l));
      }
    }
    c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nanc);
    if (bits == 1) {  /* the 16 codes are the 16 mask bits */
      uint16_t m = (uint16_t)_mm512_test_epi32_mask(c, c);
      memcpy(out + s * 2, &m, 2);
      continue;
    }
    if (bits == 2 || bits == 4 || bits == 8) {  /* byte codes, then pairs merged by multiply-adds */
      __m128i c8 = _mm512_cvtepi32_epi8(c);
      if (bits == 8) { _mm_storeu_si128((__m128i*)(out + s * 16), c8); continue; }
      if (bits == 4) {  /* c0 + 16 c1 per byte */
        __m128i p = _mm_maddubs_epi16(c8, _mm_set1_epi16(0x1001));
        _mm_storel_epi64((__m128i*)(out + s * 8), _mm_packus_epi16(p, p));
        continue;
      }
      /* bits == 2: (c0 + 4 c1) + 16 (c2 + 4 c3) per byte */
      __m128i p = _mm_madd_epi16(_mm_maddubs_epi16(c8, _mm_set1_epi16(0x0401)), _mm_set1_epi32(0x00100001));
      int32_t w = _mm_cvtsi128_si32(_mm_cvtepi32_epi8(p));
      memcpy(out + s * 4, &w, 4);
      continue;
    }
    uint64_t w0 = 0, w1 = 0;
    for (int k = 0; k < bits; k++) {
      uint64_t plane = (uint64_t)_mm512_test_epi32_mask(c, _mm512_set1_epi32(1 << k));
      if (per == 16) w0 |= _pdep_u64(plane, pattern[k]);
      else { w0 |= _pdep_u64(plane & 0xff, pattern[k]); w1 |= _pdep_u64(plane >> 8, pattern[k]); }
    }
    memcpy(out + s * 2 * bits, &w0, 8);
    if (per == 8) memcpy(out + s * 2 * bits + bits, &w1, 8);
  }
  }
}

/* one copy per code width, so that the search and the packing are unrolled for a constant width */
static void enc_f32_simd(const float* x, int64_t s0, int64_t s1, const float* B, int K, int bits,
                         int nan_code, uint8_t* out, silu_t* S) {
  switch (bits) {
#define ENC_CASE(W) case W: if (S) enc_f32_simd_(x, s0, s1, B, K, W, nan_code, out, S); \
                            else enc_f32_simd_(x, s0, s1, B, K, W, nan_code, out, 0); break;
    ENC_CASE(1) ENC_CASE(2) ENC_CASE(3) ENC_CASE(4) ENC_CASE(5) ENC_CASE(6) ENC_CASE(7) ENC_CASE(8)
#undef ENC_CASE
  }
}
#endif

typedef struct { int op, dtype, K, bits, right, nan_code; const void* x; const void* aux; const void* grad;
                 void* out; const uint8_t* in; int64_t n, g0, g1; const void* g2;
                 void* y; const void* vexp; int64_t chunk; } job_t;  /* y, vexp, chunk: fused SiLU */

/* fp32 codes of the thread's blocks [j->g0, j->g1); with S, silu(x) too (fused forward) */
static void enc_f32_blocks(const job_t* j, void* S) {
  int64_t g0 = j->g0, g1 = j->g1;
  uint8_t* o = (uint8_t*)j->out;
#ifdef HAVE_SIMD_ENC
  if (!j->right) {
    /* blocks of 64 = 4 SIMD steps of 16. The 8-byte stores overrun a step by up to 6 bytes, so the
       last block of this thread's range is left to the scalar path (which rewrites those bytes;
       another thread's bytes are never touched) and so is the end of the buffer. */
    int64_t nbytes_all = (j->n * j->bits + 7) / 8;
    int64_t lim = nbytes_all >= 8 ? (nbytes_all - 8) / (8 * j->bits) : 0;
    if (lim > j->n / 64) lim = j->n / 64;
    if (lim > j->g1 - 1) lim = j->g1 - 1;
    int64_t safe = lim < g0 ? g0 : (lim > g1 ? g1 : lim);
    if (safe > g0)
      enc_f32_simd((const float*)j->x, g0 * 4, safe * 4, (const float*)j->aux, j->K, j->bits, j->nan_code, o,
                   (silu_t*)S);
    g0 = safe;
  }
  if (S) silu_f32((silu_t*)S, (const float*)j->x, g0 * 64, g1 * 64 < j->n ? g1 * 64 : j->n);
#endif
  enc_f32(j->x, j->n, g0, g1, (const float*)j->aux, j->K, j->bits, j->right, j->nan_code, o);
}

static void run_job(job_t* j) {
  if (j->op == 0) {
    uint8_t* o = (uint8_t*)j->out;
    switch (j->dtype) {
      case 0: enc_f32_blocks(j, 0); break;
#define ENC_ARGS j->x, j->n, j->g0, j->g1, j->aux, j->K, j->bits, j->right, j->nan_code, o
      case 1: enc_f64(ENC_ARGS); break;
      case 2: enc_f16(ENC_ARGS); break;
      default: enc_bf16(ENC_ARGS);
#undef ENC_ARGS
    }
  } else if (j->op == 2) {
#ifdef HAVE_SIMD_ENC
    silu_t S = {(float*)j->y, j->n, j->chunk, 0, 0, (vexp16_t)j->vexp};  /* SiLU and codes in one pass */
    enc_f32_blocks(j, &S);
#endif
  } else {
    switch (j->dtype) {
      case 0: {
#ifdef HAVE_SIMD_DEC
        /* blocks whose 8-byte loads stay inside the buffer go SIMD; the rest scalar */
        int64_t nbytes_all = (j->n * j->bits + 7) / 8;
        int64_t lim = nbytes_all >= 8 ? (nbytes_all - 8) / (8 * j->bits) : 0;
        if (lim > j->n / 64) lim = j->n / 64;
        int64_t safe = lim < j->g0 ? j->g0 : (lim > j->g1 ? j->g1 : lim);
        if (safe > j->g0)
          dec_f32_simd(j->in, j->g0, safe, (const float*)j->aux, j->bits, (const float*)j->grad,
                       (const float*)j->g2, (float*)j->out);
        dec_f32(j->in, j->n, safe, j->g1, (const float*)j->aux, j->bits, j->grad, j->g2, j->out);
#else
        dec_f32(j->in, j->n, j->g0, j->g1, (const float*)j->aux, j->bits, j->grad, j->g2, j->out);
#endif
        break; }
#define DEC_ARGS j->in, j->n, j->g0, j->g1, j->aux, j->bits, j->grad, j->g2, j->out
      case 1: dec_f64(DEC_ARGS); break;
      case 2: dec_f16(DEC_ARGS); break;
      default: dec_bf16(DEC_ARGS);
#undef DEC_ARGS
    }
  }
}

static void* thread_main(void* arg) { run_job((job_t*)arg); return 0; }

static void run_parallel(job_t proto, int nthreads) {
  int64_t groups = (proto.n + 63) / 64;  /* blocks of 64 */
  if (nthreads > 64) nthreads = 64;
  if (nthreads < 1 || groups < 8192) nthreads = 1;
  job_t jobs[64]; pthread_t tids[64];
  int64_t per = (groups + nthreads - 1) / nthreads;
  for (int t = 0; t < nthreads; t++) {
    jobs[t] = proto; jobs[t].g0 = t * per; jobs[t].g1 = (t + 1) * per < groups ? (t + 1) * per : groups;
  }
  for (int t = 1; t < nthreads; t++) pthread_create(&tids[t], 0, thread_main, &jobs[t]);
  run_job(&jobs[0]);
  for (int t = 1; t < nthreads; t++) pthread_join(tids[t], 0);
}

int tf_encode(int dtype, const void* x, int64_t n, const void* borders, int K, int bits, int right,
              int nan_code, uint8_t* out, int nthreads) {
  job_t j; memset(&j, 0, sizeof j);
  j.op = 0; j.dtype = dtype; j.x = x; j.n = n; j.aux = borders; j.K = K; j.bits = bits; j.right = right;
  j.nan_code = nan_code;
  j.out = out; run_parallel(j, nthreads); return 0;
}

int tf_has_simd_encode(void) {
#ifdef HAVE_SIMD_ENC
  return 1;
#else
  return 0;
#endif
}

int tf_silu_encode(const float* x, int64_t n, float* y, int64_t chunk, const void* vexp,
                   const float* borders, int K, int bits, int nan_code, uint8_t* out, int nthreads) {
#ifdef HAVE_SIMD_ENC
  job_t j; memset(&j, 0, sizeof j);
  j.op = 2; j.dtype = 0; j.x = x; j.n = n; j.y = y; j.chunk = chunk; j.vexp = vexp; j.aux = borders; j.K = K;
  j.bits = bits; j.nan_code = nan_code; j.out = out; run_parallel(j, nthreads); return 0;
#else
  return 1;
#endif
}

int tf_decode_mul(int dtype, const uint8_t* in, int64_t n, const void* levels, int bits, const void* grad,
                  const void* g2, void* out, int nthreads) {
  job_t j; memset(&j, 0, sizeof j);
  j.op = 1; j.dtype = dtype; j.in = in; j.n = n; j.aux = levels; j.bits = bits; j.grad = grad; j.g2 = g2;
  j.out = out;
  run_parallel(j, nthreads); return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=gnu11", "-lm"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc/clang)")
    key_text = _SOURCE + " ".join(_FLAGS) + cc + _cpu_key() + sys.platform
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TIGHTFIT_CACHE", Path.home() / ".cache" / "tightfit"))
    lib_path = cache / f"fewbit_native_{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "fewbit_native.c"
            src.write_text(_SOURCE)
            tmp_lib = Path(tmp) / "lib.so"
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(tmp_lib)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the fewbit kernels failed:\n{proc.stderr[-2000:]}")
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(lib_path))
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tf_encode.argtypes = [i32, vp, i64, vp, i32, i32, i32, i32, vp, i32]
    lib.tf_decode_mul.argtypes = [i32, vp, i64, vp, i32, vp, vp, vp, i32]
    lib.tf_silu_encode.argtypes = [vp, i64, vp, i64, vp, vp, i32, i32, i32, vp, i32]
    lib.tf_has_simd_encode.argtypes = []
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                if os.environ.get("TIGHTFIT_NO_NATIVE"):
                    _error = "disabled by TIGHTFIT_NO_NATIVE"
                else:
                    try:
                        _lib = _build()
                    except Exception as exc:  # any failure means: use the torch fallback
                        _error = f"{type(exc).__name__}: {exc}"
    return _lib


def available() -> bool:
    """True when the kernels are built (compiled on the first call, then cached on disk) and loadable."""
    return _load() is not None


def build_error() -> str | None:
    """Why the kernels are unavailable (None when they are)."""
    _load()
    return _error


HUGE_MIN_BYTES = 4 << 20
"""Buffers from this size up are advised as transparent huge pages (see the module doc)."""
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise, or None (not Linux, or switched off by TIGHTFIT_HUGEPAGES=0)."""
    if not sys.platform.startswith("linux") or os.environ.get("TIGHTFIT_HUGEPAGES", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat uninitialised CPU tensor whose pages are advised as huge pages when it is large (the module
    doc: fewer page faults on first write). Advice only: the contents and the allocator are untouched."""
    t = torch.empty(numel, dtype=dtype)
    nbytes = numel * t.element_size()
    if nbytes >= HUGE_MIN_BYTES and (madvise := _madvise()) is not None:
        p = t.data_ptr()
        start, end = (p + _HUGE - 1) & ~(_HUGE - 1), (p + nbytes) & ~(_HUGE - 1)
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # a failure only means ordinary pages
    return t


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= 1 << 20 else 1


def encode(x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int = 0) -> torch.Tensor:
    """Packed codes ``#{k : x > t_k}`` of x (``nan_code`` where x is NaN); t = `codec.compare_borders`
    (sorted, comparison dtype)."""
    lib = _load()
    assert lib is not None
    xc = x.detach().contiguous()
    n = xc.numel()
    out = empty((n * bits + 7) // 8, torch.uint8)
    b = cmp_borders.contiguous()
    lib.tf_encode(
        DTYPES[xc.dtype],
        xc.data_ptr(),
        n,
        b.data_ptr(),
        b.numel(),
        bits,
        0,
        nan_code,
        out.data_ptr(),
        _threads(n),
    )
    return out


def decode_mul(
    packed: torch.Tensor,
    levels: torch.Tensor,
    grad: torch.Tensor,
    bits: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad * levels[code] (levels rounded to grad's dtype); fp16/bf16 via exact fp32 products. With
    `scale` (grad's shape and dtype): ``(grad * scale) * levels[code]`` in one pass, rounded as torch
    rounds those two products."""
    lib = _load()
    assert lib is not None
    g = grad.contiguous()
    n = g.numel()
    if packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} codes of {bits} bits")
    s = None if scale is None else scale.contiguous()
    if s is not None and (s.shape != g.shape or s.dtype != g.dtype):
        raise ValueError(
            f"scale must match grad ({tuple(g.shape)}, {g.dtype}), got {tuple(s.shape)}, {s.dtype}"
        )
    lv = levels.detach().to(g.dtype)
    lv = lv.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    table = torch.zeros(256, dtype=lv.dtype)  # any code < 2**bits is a valid index
    table[: lv.numel()] = lv
    out = empty(n, g.dtype).view(g.shape)
    lib.tf_decode_mul(
        DTYPES[g.dtype],
        packed.contiguous().data_ptr(),
        n,
        table.data_ptr(),
        bits,
        g.data_ptr(),
        None if s is None else s.data_ptr(),
        out.data_ptr(),
        _threads(n),
    )
    return out


# ---------------------------------------------------------------------------------------------------
# fused SiLU forward
# ---------------------------------------------------------------------------------------------------

_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it, and with one thread, torch's loop runs serially


def _torch_chunk(n: int) -> int:
    """Length of the ranges torch's OpenMP parallel_for gives each thread for an n-element pointwise op."""
    nt = torch.get_num_threads()
    if n < _GRAIN or nt == 1:
        return max(n, 1)
    nt = min(nt, -(-n // _GRAIN))
    return -(-n // nt)


@functools.cache
def _sleef_expf16() -> int | None:
    """Address of torch's own Sleef_expf16_u10 (what its AVX-512 SiLU kernel calls), or None."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    libdir = Path(torch.__file__).parent / "lib"
    for path in sorted(libdir.glob("libtorch_cpu.*")):
        try:
            fn = ctypes.CDLL(str(path)).Sleef_expf16_u10
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def _silu_encode_raw(x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int):
    lib = _load()
    assert lib is not None
    n = x.numel()
    y = empty(n, x.dtype).view(x.shape)
    out = empty((n * bits + 7) // 8, torch.uint8)
    b = cmp_borders.contiguous()
    rc = lib.tf_silu_encode(
        x.data_ptr(), n, y.data_ptr(), _torch_chunk(n), _sleef_expf16(), b.data_ptr(), b.numel(), bits,
        nan_code, out.data_ptr(), _threads(n),
    )
    assert rc == 0
    return y, out


@functools.cache
def _silu_checked(nthreads: int) -> bool:
    """The fused SiLU reproduces torch.nn.functional.silu bit for bit at this thread count (checked once
    on values that hit the vector and the scalar paths, NaN, infinities, zeros and subnormals)."""
    g = torch.Generator().manual_seed(0)
    n = 5 * _GRAIN + 37
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    for start, value in enumerate((float("nan"), float("inf"), -float("inf"), -0.0, 1e-40)):
        x[start :: 97 + 2 * start] = value
    y, _ = _silu_encode_raw(x, torch.zeros(1), 1, 0)
    ref = torch.nn.functional.silu(x)
    return bool(torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num()))


def silu_fused_available() -> bool:
    """True where `silu_encode` may be used: kernels built with AVX-512, torch dispatching its AVX-512
    kernels, its Sleef found, and the self-check passed at the current thread count."""
    lib = _load()
    if lib is None or _sleef_expf16() is None or not lib.tf_has_simd_encode():
        return False
    return _silu_checked(torch.get_num_threads())


def silu_encode(
    x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(x), packed codes) in one pass over contiguous fp32 x: y bit-identical to torch's CPU SiLU, the
    codes as `encode` makes them. Only where `silu_fused_available()`."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("silu_encode takes a contiguous float32 CPU tensor")
    return _silu_encode_raw(x.detach(), cmp_borders, bits, nan_code)
