"""Paged-attention decode on the CPU: one C++/OpenMP kernel reading K/V straight from the paged cache.

torch_ref's decode path gathers every request's pages into a padded dense tensor per layer, then calls
SDPA; on the CPU the gathers cost about as much as the attention itself. This kernel walks each
request's page list in place instead: one query row per request, parallel over requests (or (request, kv_head) when
there are few),
GQA (a kv head's query group shares each K/V row load), one pass with an online softmax per page,
float32 or bfloat16 storage with float32 accumulation, an optional sliding window. No soft-cap and
no sinks (those layers stay on the gather path).

Built at first use with the system C++ compiler (`$CXX`, else `c++`) and loaded with ctypes, so no
torch C++ extension toolchain (ninja, headers) is needed. The .so is cached by a hash of the source,
flags, compiler and CPU features in `$TORCH_EXTENSIONS_DIR`, else `$PIE_HOME/cache/torch_extensions`; it is compiled
to a temporary name and renamed, so concurrent processes never load a half-written file. Without a
compiler, or when the build fails, `load_kernel` logs one warning and returns None: the caller keeps
the gather path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pie.errors import BatchError

_log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

typedef uint16_t bf16;

static inline float to_f32(float x) { return x; }
static inline float to_f32(bf16 x) {
    uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline void from_f32(float x, float* dst) { *dst = x; }
static inline void from_f32(float x, bf16* dst) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *dst = bf16((u >> 16) | 0x40); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    *dst = bf16(u >> 16);
}

// A K or V row as float32: float rows are read in place, bf16 rows widened into `tmp`.
static inline const float* row_f32(const float* src, float*, int) { return src; }
static inline const float* row_f32(const bf16* src, float* tmp, int d) {
    #pragma omp simd
    for (int i = 0; i < d; ++i) tmp[i] = to_f32(src[i]);
    return tmp;
}

// One request's kv heads [kvh0, kvh0 + nkv): their `nkv * group` query heads (consecutive, from query head
// kvh0 * group) over the request's kv slots [start, kv_len). Slot-outer, head-inner: a page's K (then V)
// block is read front to back, which the hardware prefetcher follows (one kv head's rows alone are strided).
// D > 0: head_dim known at compile time (the common sizes), so the row loops unroll without remainders.
template <typename T, int D>
static void decode_item(const T* q, const T* kv, T* out, const int32_t* pages, int kv_len, int kvh0, int nkv,
                        int group, int num_kv_heads, int d_rt, int page_size, float scale, int window_left,
                        float* qf, float* acc, float* s, float* m, float* l, float* tmp) {
    const int d = D > 0 ? D : d_rt;
    const int64_t row_stride = int64_t(num_kv_heads) * d;  // between slots of one page
    const int64_t page_stride = 2 * int64_t(page_size) * row_stride;  // K and V of one page
    const int nq = nkv * group;  // query heads of this item; x = h * group + g
    const T* qs = q + int64_t(kvh0) * group * d;
    for (int x = 0; x < nq; ++x) {
        for (int i = 0; i < d; ++i) qf[x * d + i] = to_f32(qs[x * d + i]) * scale;
        std::fill(acc + x * d, acc + (x + 1) * d, 0.0f);
        m[x] = -std::numeric_limits<float>::infinity();
        l[x] = 0.0f;
    }
    const int start = window_left >= 0 ? std::max(0, kv_len - 1 - window_left) : 0;
    for (int pi = start / page_size; pi * page_size < kv_len; ++pi) {
        const int t0 = std::max(start, pi * page_size), t1 = std::min(kv_len, (pi + 1) * page_size);
        const int n = t1 - t0;
        const T* k = kv + int64_t(pages[pi]) * page_stride + int64_t(t0 - pi * page_size) * row_stride
                     + int64_t(kvh0) * d;
        const T* v = k + int64_t(page_size) * row_stride;
        for (int j = 0; j < n; ++j) {  // scores of this page's slots, s[x * page_size + j]
            for (int h = 0; h < nkv; ++h) {
                const float* kr = row_f32(k + j * row_stride + h * d, tmp, d);
                for (int g = 0; g < group; ++g) {
                    const int x = h * group + g;
                    const float* qx = qf + x * d;
                    float dot = 0.0f;
                    #pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < d; ++i) dot += qx[i] * kr[i];
                    s[x * page_size + j] = dot;
                }
            }
        }
        for (int x = 0; x < nq; ++x) {  // online softmax: rescale once per page
            float* sx = s + x * page_size;
            float mx = m[x];
            for (int j = 0; j < n; ++j) mx = std::max(mx, sx[j]);
            const float alpha = std::exp(m[x] - mx);  // exp(-inf) = 0 on the first page
            float sum = 0.0f;
            for (int j = 0; j < n; ++j) { sx[j] = std::exp(sx[j] - mx); sum += sx[j]; }
            l[x] = l[x] * alpha + sum;
            m[x] = mx;
            float* ax = acc + x * d;
            #pragma omp simd
            for (int i = 0; i < d; ++i) ax[i] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            for (int h = 0; h < nkv; ++h) {
                const float* vr = row_f32(v + j * row_stride + h * d, tmp, d);
                for (int g = 0; g < group; ++g) {
                    const int x = h * group + g;
                    const float p = s[x * page_size + j];
                    float* ax = acc + x * d;
                    #pragma omp simd
                    for (int i = 0; i < d; ++i) ax[i] += p * vr[i];
                }
            }
        }
    }
    T* o = out + int64_t(kvh0) * group * d;
    for (int x = 0; x < nq; ++x) {
        const float inv = 1.0f / l[x];
        for (int i = 0; i < d; ++i) from_f32(acc[x * d + i] * inv, o + x * d + i);
    }
}

// Work items: (request, block of kv heads). Whole requests where there are enough of them to keep every
// thread busy; single kv heads otherwise (few long requests).
template <typename T, int D>
static void decode(const T* q, const T* kv, T* out, const int32_t* rows, const int32_t* indptr,
                   const int32_t* indices, const int32_t* kv_lens, int num_reqs, int num_heads,
                   int num_kv_heads, int d, int page_size, float scale, int window_left, int num_threads) {
    const int group = num_heads / num_kv_heads;
    const int nkv = num_reqs >= 4 * num_threads ? num_kv_heads : 1;
    const int blocks = num_kv_heads / nkv;
    const int64_t q_stride = int64_t(num_heads) * d;
    #pragma omp parallel num_threads(num_threads)
    {
        const size_t nq = size_t(nkv) * group;
        std::vector<float> buf(nq * (2 * d + page_size + 2) + d);
        float* qf = buf.data();
        float* acc = qf + nq * d;
        float* s = acc + nq * d;
        float* m = s + nq * page_size;
        float* l = m + nq;
        float* tmp = l + nq;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < int64_t(num_reqs) * blocks; ++item) {
            const int r = int(item / blocks), kvh0 = int(item % blocks) * nkv;
            const int64_t row = rows[r];
            decode_item<T, D>(q + row * q_stride, kv, out + row * q_stride, indices + indptr[r], kv_lens[r], kvh0, nkv,
                        group, num_kv_heads, d, page_size, scale, window_left, qf, acc, s, m, l, tmp);
        }
    }
}

template <typename T>
static void dispatch(const void* q, const void* kv, void* out, const int32_t* rows, const int32_t* indptr,
                     const int32_t* indices, const int32_t* kv_lens, int num_reqs, int num_heads,
                     int num_kv_heads, int head_dim, int page_size, float scale, int window_left, int num_threads) {
    auto run = [&](auto fn) {
        fn((const T*)q, (const T*)kv, (T*)out, rows, indptr, indices, kv_lens, num_reqs, num_heads,
           num_kv_heads, head_dim, page_size, scale, window_left, num_threads);
    };
    switch (head_dim) {
        case 64: run(decode<T, 64>); break;
        case 128: run(decode<T, 128>); break;
        case 256: run(decode<T, 256>); break;
        default: run(decode<T, 0>);
    }
}

extern "C" void pie_paged_decode(int dtype, const void* q, const void* kv, void* out, const int32_t* rows,
                                 const int32_t* indptr, const int32_t* indices, const int32_t* kv_lens,
                                 int num_reqs, int num_heads, int num_kv_heads, int head_dim, int page_size,
                                 float scale, int window_left, int num_threads) {
    if (dtype == 0)
        dispatch<float>(q, kv, out, rows, indptr, indices, kv_lens, num_reqs, num_heads, num_kv_heads, head_dim,
                        page_size, scale, window_left, num_threads);
    else
        dispatch<bf16>(q, kv, out, rows, indptr, indices, kv_lens, num_reqs, num_heads, num_kv_heads, head_dim,
                       page_size, scale, window_left, num_threads);
}
"""


@dataclass(frozen=True)
class DecodePlan:
    """The decode rows of one batch, as the kernel reads them (int32, contiguous, on the CPU)."""

    rows: torch.Tensor  # [n] query row of each decode request
    indptr: torch.Tensor  # [n + 1] CSR into `indices`
    indices: torch.Tensor  # the decode requests' pages, concatenated
    kv_lens: torch.Tensor  # [n]
    max_page: int  # largest page id (checked against the layer's pool: the kernel does not bounds-check)

    @classmethod
    def build(cls, qo_indptr: np.ndarray, kv_page_indptr: np.ndarray, kv_page_indices: np.ndarray,
              kv_lens: np.ndarray, reqs: np.ndarray, page_size: int) -> DecodePlan:
        """Requests `reqs` (one query row each) of a batch's layout."""
        first = kv_page_indptr[reqs].astype(np.int64)
        counts = kv_page_indptr[reqs + 1].astype(np.int64) - first
        lens = kv_lens[reqs].astype(np.int64)
        # The kernel walks ceil(kv_len / page_size) pages of each list: they must be there.
        if ((lens < 1) | (lens > counts * page_size)).any():
            bad = int(np.flatnonzero((lens < 1) | (lens > counts * page_size))[0])
            raise BatchError(f"decode request {int(reqs[bad])} has kv length {int(lens[bad])} over "
                             f"{int(counts[bad])} pages of {page_size} slots")
        indptr = np.zeros(len(reqs) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = kv_page_indices[np.repeat(first - indptr[:-1], counts) + np.arange(indptr[-1])]
        if indices.size and int(indices.min()) < 0:
            raise BatchError(f"a decode request names page {int(indices.min())}; page ids are >= 0")
        return cls(_i32(qo_indptr[reqs]), _i32(indptr), _i32(indices), _i32(lens),
                   int(indices.max()) if indices.size else -1)


def _i32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))


class PagedDecodeKernel:
    """The loaded library's one entry point."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.pie_paged_decode
        i32, ptr = ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32, ctypes.c_float, i32, i32]
        fn.restype = None
        self._fn = fn

    def __call__(self, q: torch.Tensor, kv_layer: torch.Tensor, out: torch.Tensor, plan: DecodePlan,
                 scale: float, window_left: int = -1) -> None:
        """Writes out[plan.rows] (attention of q[plan.rows] over their pages). q, out: [T, heads, d] contiguous;
        kv_layer: [num_pages, 2, page_size, kv_heads, d] contiguous, q's dtype (float32 or bfloat16)."""
        num_pages, _, page_size, kv_heads, dim = kv_layer.shape
        heads = q.shape[1]
        assert q.is_contiguous() and out.is_contiguous() and kv_layer.is_contiguous(), "kernel needs contiguous"
        assert q.dtype == kv_layer.dtype == out.dtype and q.dtype in DTYPES, f"{q.dtype=} {kv_layer.dtype=}"
        assert q.shape[2] == dim and heads % kv_heads == 0 and out.shape == q.shape, f"{q.shape=} {kv_layer.shape=}"
        if plan.max_page >= num_pages:
            raise BatchError(f"a decode request names page {plan.max_page}, outside the pool of {num_pages} pages")
        self._fn(DTYPES[q.dtype], q.data_ptr(), kv_layer.data_ptr(), out.data_ptr(), plan.rows.data_ptr(),
                 plan.indptr.data_ptr(), plan.indices.data_ptr(), plan.kv_lens.data_ptr(), len(plan.rows), heads,
                 kv_heads, dim, page_size, scale, window_left, torch.get_num_threads())


def cache_dir() -> Path:
    """Where built kernels are kept: $TORCH_EXTENSIONS_DIR, else $PIE_HOME/cache/torch_extensions."""
    from pie.config import pie_home

    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else pie_home() / "cache" / "torch_extensions"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def ensure_library(directory: Path, cxx: str) -> tuple[Path, bool]:
    """The kernel's .so in `directory` (built now if missing) and whether it was built by this call.
    Raises OSError / subprocess.CalledProcessError when the compiler is missing or fails."""
    # The CPU's features too: -march=native code from one host must not load on another sharing the cache.
    key = hashlib.sha256("\0".join((_SOURCE, cxx, *FLAGS, _cpu_features())).encode()).hexdigest()[:16]
    path = directory / f"pie_paged_decode_{key}.so"
    if path.exists():
        return path, False
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        src, lib = Path(tmp) / "paged_decode.cpp", Path(tmp) / "paged_decode.so"
        src.write_text(_SOURCE)
        subprocess.run([cxx, *FLAGS, str(src), "-o", str(lib)], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(lib, path)  # atomic: another process sees the whole file or none
    return path, True


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), else the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


_loaded: dict[tuple[Path, str], PagedDecodeKernel | None] = {}


def load_kernel() -> PagedDecodeKernel | None:
    """The kernel (built and cached at first use), or None, with one warning, where it cannot be built."""
    where = (cache_dir(), compiler())
    if where not in _loaded:
        try:
            path, _ = ensure_library(*where)
            _loaded[where] = PagedDecodeKernel(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            _log.warning("CPU paged-attention kernel unavailable (compiler %r: %s); decode attention gathers "
                         "pages instead (slower)", where[1], str(detail).strip()[:500])
            _loaded[where] = None
    return _loaded[where]
