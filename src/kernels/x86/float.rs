//! The x86 kernels of float weights (`kernels/float.rs`): F32, F16 and BF16 rows against f32
//! activations, and widening to f32.

use std::arch::x86_64::*;

use super::*;

/// Float formats as const parameters of the float kernels (one monomorphized loop each).
pub(super) const F32: u8 = 0;
pub(super) const F16: u8 = 1;
pub(super) const BF16: u8 = 2;

/// Eight float weights of format `F` at `p`, widened to f32.
///
/// # Safety
/// `p` must point at 8 readable values (32 bytes for F32, else 16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load8<const F: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        match F {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            // bf16 is the upper half of an f32.
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16)),
        }
    }
}

/// Bytes per value of format `F`.
pub(super) const fn float_bytes<const F: u8>() -> usize {
    if F == F32 { 4 } else { 2 }
}

/// Value `i` of format `F` at `p`, widened to f32.
///
/// # Safety
/// `p` must point at `i + 1` readable values.
#[inline]
pub(super) unsafe fn load1<const F: u8>(p: *const u8, i: usize) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        match F {
            F32 => std::ptr::read_unaligned(p.cast::<f32>().add(i)),
            F16 => half::f16::from_bits(std::ptr::read_unaligned(p.cast::<u16>().add(i))).to_f32(),
            _ => f32::from_bits(u32::from(std::ptr::read_unaligned(p.cast::<u16>().add(i))) << 16),
        }
    }
}

/// Four float weight rows `w[r * row_bytes..]` against the f32 activation row `x`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold 4 rows of `row_bytes`, each `x.len()`
/// values of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot4_float(
    format: crate::kernels::float::Float,
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
) -> [f32; 4] {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            crate::kernels::float::Float::F32 => dot4_float_impl::<F32>(w, row_bytes, x),
            crate::kernels::float::Float::F16 => dot4_float_impl::<F16>(w, row_bytes, x),
            crate::kernels::float::Float::BF16 => dot4_float_impl::<BF16>(w, row_bytes, x),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot4_float_impl<const F: u8>(w: &[u8], row_bytes: usize, x: &[f32]) -> [f32; 4] {
    let n = x.len();
    let es = float_bytes::<F>();
    // Two accumulators per row: eight independent FMA chains, enough to cover its latency.
    let (mut acc, mut acc1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: (all reads) value i of row r is w[r * row_bytes + i * es..], i < n, r < 4, and
    // x[i] (the contract).
    unsafe {
        while i + 16 <= n {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            for r in 0..4 {
                let p = wp.add(r * row_bytes + i * es);
                // One prefetch per 64-byte line, a page ahead (see `PREFETCH`); a hint, never
                // faulting past the end.
                if (i * es).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH).cast());
                }
                acc[r] = _mm256_fmadd_ps(load8::<F>(p), x0, acc[r]);
                acc1[r] = _mm256_fmadd_ps(load8::<F>(p.add(8 * es)), x1, acc1[r]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let xv = _mm256_loadu_ps(xp.add(i));
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(load8::<F>(wp.add(r * row_bytes + i * es)), xv, *acc);
            }
            i += 8;
        }
        for r in 0..4 {
            acc[r] = _mm256_add_ps(acc[r], acc1[r]);
        }
        let mut out: [f32; 4] = std::array::from_fn(|r| hsum(acc[r]));
        for j in i..n {
            for (r, o) in out.iter_mut().enumerate() {
                *o += load1::<F>(wp.add(r * row_bytes), j) * *xp.add(j);
            }
        }
        out
    }
}

/// One float weight row against the f32 activation row `x`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `x.len()` values of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_float(format: crate::kernels::float::Float, w: &[u8], x: &[f32]) -> f32 {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            crate::kernels::float::Float::F32 => dot_float_impl::<F32>(w, x),
            crate::kernels::float::Float::F16 => dot_float_impl::<F16>(w, x),
            crate::kernels::float::Float::BF16 => dot_float_impl::<BF16>(w, x),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_float_impl<const F: u8>(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let es = float_bytes::<F>();
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: (all reads) values i < n of w and x (the contract).
    unsafe {
        while i + 16 <= n {
            _mm_prefetch::<_MM_HINT_T0>(wp.add(i * es).wrapping_add(PREFETCH).cast());
            acc0 = _mm256_fmadd_ps(load8::<F>(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(load8::<F>(wp.add((i + 8) * es)), _mm256_loadu_ps(xp.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(load8::<F>(wp.add(i * es)), _mm256_loadu_ps(xp.add(i)), acc0);
            i += 8;
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            sum += load1::<F>(wp, j) * *xp.add(j);
        }
        sum
    }
}

/// Widens `out.len()` float values of `format` at `w` to f32.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `out.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn float_to_f32(format: crate::kernels::float::Float, w: &[u8], out: &mut [f32]) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match format {
            crate::kernels::float::Float::F32 => float_to_f32_impl::<F32>(w, out),
            crate::kernels::float::Float::F16 => float_to_f32_impl::<F16>(w, out),
            crate::kernels::float::Float::BF16 => float_to_f32_impl::<BF16>(w, out),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn float_to_f32_impl<const F: u8>(w: &[u8], out: &mut [f32]) {
    let n = out.len();
    let es = float_bytes::<F>();
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: values i < n of w and out (the contract).
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(op.add(i), load8::<F>(wp.add(i * es)));
            i += 8;
        }
        for j in i..n {
            *op.add(j) = load1::<F>(wp, j);
        }
    }
}

/// SwiGLU's `u = g / (1 + e^-g) · u`, elementwise, 8 lanes at a time (the last ones padded):
/// the exponential is the softmax's [`super::attention::exp8`] (within 2 ulp of `f32::exp`) in
/// place of a libm call per value, the division and product as the scalar formula has them.
/// `-g` is held below 88, where `e^-g` would overflow; there the result is `-0` or a denormal
/// of `g`'s sign, as it nearly is in exact arithmetic.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_times(g: &[f32], u: &mut [f32]) {
    let n = g.len().min(u.len());
    let full = n / 8 * 8;
    let (one, high) = (_mm256_set1_ps(1.0), _mm256_set1_ps(88.0));
    let silu = |x: __m256, y: __m256| {
        let e = super::attention::exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), high));
        _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), y)
    };
    let (gp, up) = (g.as_ptr(), u.as_mut_ptr());
    // SAFETY: every access is within the first `full` values of both slices.
    unsafe {
        for i in (0..full).step_by(8) {
            _mm256_storeu_ps(up.add(i), silu(_mm256_loadu_ps(gp.add(i)), _mm256_loadu_ps(up.add(i))));
        }
    }
    let tail = n - full;
    if tail > 0 {
        let (mut x, mut y) = ([0f32; 8], [0f32; 8]);
        x[..tail].copy_from_slice(&g[full..n]);
        y[..tail].copy_from_slice(&u[full..n]);
        // SAFETY: `x` and `y` hold 8 f32s each.
        unsafe {
            _mm256_storeu_ps(y.as_mut_ptr(), silu(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())))
        };
        u[full..n].copy_from_slice(&y[..tail]);
    }
}
