//! How each block format is decoded by the x86 decode kernels (`decode.rs`): a [`Decode`]
//! implementation per format, and [`SuperBlock`] for the k-quants.

use std::arch::x86_64::*;

use super::*;

/// One decoded 32-value block: `w = s · (u - o) + m`.
#[derive(Clone, Copy)]
pub(super) struct Block {
    pub(super) u: __m256i,
    /// The scales of values 0..16 and 16..32: equal but in Q6_K, whose sub-blocks are 16
    /// values.
    pub(super) s: [f32; 2],
    pub(super) m: f32,
}

/// A weight format as this kernel reads it.
pub(super) trait Decode {
    /// The offset `o` (0, 8, 16, 32 or 128).
    const OFFSET: u8;
    /// Whether blocks carry a minimum (then `m` multiplies the activations' block sums).
    const MIN: bool;
    /// Whether the two 16-value halves of a block have scales of their own (Q6_K).
    const SPLIT: bool = false;
    /// How many 4-value groups' `vpmaddubsw` pairs of `u` and an activation may be summed in
    /// i16 without overflow (8 for u < 16, 4 for u < 32, 2 for u < 64: `2 · groups · u · 127 <
    /// 32,768`); 0 for `o = 128`, whose signed values take the sign trick, one group at a time.
    const I16_GROUPS: usize;
    /// Bytes per 32 values, on average (for prefetching).
    const BYTES_PER_BLOCK: usize;
    /// Whether [`Decode::pair`] gives the scales (and minimums) as the f16 values of the file
    /// (`d16`, `m16`), for the kernel to convert four rows' at once.
    const F16: bool = false;

    /// Block `b` of the row at `row`. (Without target features of its own, but always inlined
    /// into the kernels, whose features its intrinsics then get: a decoder with features of its
    /// own was left an out-of-line call, 7% of a batched decode step for Q4_K.)
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; the row must hold block `b`.
    unsafe fn block(row: *const u8, b: usize) -> Block;

    /// Blocks `b` and `b + 1` (b even) for the 512-bit kernel, bit for bit what two
    /// [`Decode::block`] calls give, in fewer operations where the format allows: both blocks'
    /// nibbles split in one 512-bit operation, Q5's fifth bits added under a 64-bit mask, the
    /// k-quants' shared scale fields read once.
    ///
    /// # Safety
    /// As [`Decode::block`] for both blocks, and the CPU must have AVX-512 F and BW (the
    /// method, like `block`, has no target features of its own and is always inlined into
    /// [`rows_vnni`], which has them).
    #[inline(always)]
    unsafe fn pair(row: *const u8, b: usize) -> Pair {
        // SAFETY: the caller's contract.
        let (lo, hi) = unsafe { (Self::block(row, b), Self::block(row, b + 1)) };
        Pair::of(lo, hi)
    }
}

/// Two decoded blocks: `u` holds the first block's quants in its low 256 bits; `s` the
/// scales of (first block's halves, second block's halves), `m` their minimums.
#[derive(Clone, Copy)]
pub(super) struct Pair {
    pub(super) u: __m512i,
    pub(super) s: [f32; 4],
    pub(super) m: [f32; 2],
    /// For formats with [`Decode::F16`]: the blocks' scales and minimums as stored, in place
    /// of `s` and `m`.
    pub(super) d16: [u16; 2],
    pub(super) m16: [u16; 2],
}

impl Pair {
    #[inline(always)]
    pub(super) fn of(lo: Block, hi: Block) -> Self {
        // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`).
        let u = unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo.u), hi.u) };
        Self { u, s: [lo.s[0], lo.s[1], hi.s[0], hi.s[1]], m: [lo.m, hi.m], d16: [0; 2], m16: [0; 2] }
    }
}

/// [`flip`] of two blocks' signed values, as one 512-bit vector (`lo` in the low half).
#[inline(always)]
pub(super) fn flip_pair(lo: __m256i, hi: __m256i) -> __m512i {
    // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`).
    unsafe {
        _mm512_xor_si512(
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
            _mm512_set1_epi8(0x80u8 as i8),
        )
    }
}

/// `x` with 16-bit lane `i` (0..8) set to `v`.
#[inline(always)]
pub(super) fn insert16(x: __m128i, i: usize, v: u16) -> __m128i {
    let v = i32::from(v);
    // SAFETY: only ever inlined into the AVX-512 kernel (see `Decode::pair`), where the loop
    // that calls it is unrolled and `i` a constant.
    unsafe {
        match i {
            0 => _mm_insert_epi16::<0>(x, v),
            1 => _mm_insert_epi16::<1>(x, v),
            2 => _mm_insert_epi16::<2>(x, v),
            3 => _mm_insert_epi16::<3>(x, v),
            4 => _mm_insert_epi16::<4>(x, v),
            5 => _mm_insert_epi16::<5>(x, v),
            6 => _mm_insert_epi16::<6>(x, v),
            _ => _mm_insert_epi16::<7>(x, v),
        }
    }
}

/// The 32 nibbles of each of two Q4/Q5 blocks (16 bytes at `a`, 16 at `b`) as unsigned bytes,
/// laid out as two [`nibbles`] calls and a 256-bit insert would give.
///
/// # Safety
/// As [`Decode::pair`]; 16 bytes readable at `a` and at `b`.
#[inline(always)]
pub(super) unsafe fn nibble_pair(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let x = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.cast())),
            _mm_loadu_si128(b.cast()),
        );
        let y = _mm256_srli_epi16::<4>(x);
        // 64-bit lanes: a's low nibbles, a's high nibbles, b's low, b's high.
        let order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
        let z = _mm512_permutex2var_epi64(_mm512_castsi256_si512(x), order, _mm512_castsi256_si512(y));
        _mm512_and_si512(z, _mm512_set1_epi8(0x0f))
    }
}

/// [`nibble_pair`] plus 16 where the blocks' fifth bits (32-bit fields at `ha` and `hb`) are
/// set: the values of two Q5_0 or Q5_1 blocks.
///
/// # Safety
/// As [`nibble_pair`]; 4 bytes readable at `ha` and at `hb`.
#[inline(always)]
pub(super) unsafe fn five_bit_pair(a: *const u8, b: *const u8, ha: *const u8, hb: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    unsafe {
        let q = nibble_pair(a, b);
        let bits = u64::from(std::ptr::read_unaligned(ha.cast::<u32>()))
            | u64::from(std::ptr::read_unaligned(hb.cast::<u32>())) << 32;
        _mm512_mask_add_epi8(q, bits, q, _mm512_set1_epi8(0x10))
    }
}

/// Flips signed bytes to `v + 128` as unsigned.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn flip(v: __m256i) -> __m256i {
    _mm256_xor_si256(v, _mm256_set1_epi8(0x80u8 as i8))
}

/// The 5-bit values of a Q5_0 or Q5_1 block whose high bits start at `p`, unsigned.
///
/// # Safety
/// `p` must point at 20 readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn five_bit_values(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    let (q, set) = unsafe { five_bits(p) };
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

macro_rules! simple_formats {
    ($($t:ident: $format:expr, $offset:expr, $min:expr, $groups:expr, |$p:ident| $u:expr, |$a:ident, $b:ident| $pair:expr;)*) => {$(
        pub(super) struct $t;
        impl Decode for $t {
            const OFFSET: u8 = $offset;
            const I16_GROUPS: usize = $groups;
            const MIN: bool = $min;
            const BYTES_PER_BLOCK: usize = $format.unit().1;
            const F16: bool = true;
            #[inline(always)]
            unsafe fn block(row: *const u8, b: usize) -> Block {
                // SAFETY: the block is BYTES_PER_BLOCK bytes at `row + b · BYTES_PER_BLOCK` (the
                // contract).
                unsafe {
                    let $p = row.add(b * Self::BYTES_PER_BLOCK);
                    let m = if $min { f16c_at($p.add(2)) } else { 0.0 };
                    let d = f16c_at($p);
                    Block { u: $u, s: [d, d], m }
                }
            }
            #[inline(always)]
            unsafe fn pair(row: *const u8, b: usize) -> Pair {
                // SAFETY: as `block`, for blocks b and b + 1.
                unsafe {
                    let ($a, $b) = (row.add(b * Self::BYTES_PER_BLOCK), row.add((b + 1) * Self::BYTES_PER_BLOCK));
                    let f16 = |p: *const u8| std::ptr::read_unaligned(p.cast::<u16>());
                    let m16 = if $min { [f16($a.add(2)), f16($b.add(2))] } else { [0; 2] };
                    Pair { u: $pair, s: [0.0; 4], m: [0.0; 2], d16: [f16($a), f16($b)], m16 }
                }
            }
        }
    )*};
}

simple_formats! {
    Q8_0: Format::Q8_0, 128, false, 0, |p| flip(_mm256_loadu_si256(p.add(2).cast())),
        |a, b| flip_pair(_mm256_loadu_si256(a.add(2).cast()), _mm256_loadu_si256(b.add(2).cast()));
    Q5_0: Format::Q5_0, 16, false, 4, |p| five_bit_values(p.add(2)),
        |a, b| five_bit_pair(a.add(6), b.add(6), a.add(2), b.add(2));
    Q4_0: Format::Q4_0, 8, false, 8, |p| nibbles(p.add(2)), |a, b| nibble_pair(a.add(2), b.add(2));
    Q4_1: Format::Q4_1, 0, true, 8, |p| nibbles(p.add(4)), |a, b| nibble_pair(a.add(4), b.add(4));
    Q5_1: Format::Q5_1, 0, true, 4, |p| five_bit_values(p.add(4)),
        |a, b| five_bit_pair(a.add(8), b.add(8), a.add(4), b.add(4));
    Iq4Nl: Format::Iq4Nl, 128, false, 0, |p| flip(iq4_values(p.add(2))),
        |a, b| flip_pair(iq4_values(a.add(2)), iq4_values(b.add(2)));
}

pub(super) struct Iq4Xs;
impl Decode for Iq4Xs {
    const OFFSET: u8 = 128;
    const I16_GROUPS: usize = 0;
    const MIN: bool = false;
    const BYTES_PER_BLOCK: usize = IQ4_XS_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is IQ4_XS_BYTES at `row + b / 8 · IQ4_XS_BYTES` (the contract).
        unsafe {
            let (sb, ib) = (row.add(b / 8 * IQ4_XS_BYTES), b % 8);
            // As ggml rounds: d · (ls - 32) first.
            let s = f16c_at(sb) * (iq4xs_scale(sb, ib) - 32) as f32;
            Block { u: flip(iq4_values(sb.add(8 + 16 * ib))), s: [s, s], m: 0.0 }
        }
    }
}

/// Q4_K: super-blocks (Q4_K_BYTES) of 256 values: f16 d and dmin, 12 bytes of six-bit scales and
/// minimums for the 8 blocks, 128 bytes of nibbles (block j: the low or high nibbles of bytes
/// 32 · (j / 2)..); `w = d · sc · q - dmin · mn`.
pub(super) struct Q4K;
impl Decode for Q4K {
    const OFFSET: u8 = 0;
    const I16_GROUPS: usize = 8;
    const MIN: bool = true;
    const BYTES_PER_BLOCK: usize = Q4_K_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is Q4_K_BYTES at `row + b / 8 · Q4_K_BYTES` (the contract).
        unsafe {
            let (sb, j) = (row.add(b / 8 * Q4_K_BYTES), b % 8);
            let (sc, mn) = crate::kernels::q4k_scale_min(std::slice::from_raw_parts(sb.add(4), 12), j);
            let qs = _mm256_loadu_si256(sb.add(16 + 32 * (j / 2)).cast());
            let q = if j.is_multiple_of(2) { qs } else { _mm256_srli_epi16(qs, 4) };
            Block {
                u: _mm256_and_si256(q, _mm256_set1_epi8(0x0f)),
                s: [f16c_at(sb) * f32::from(sc); 2],
                m: -(f16c_at(sb.add(2)) * f32::from(mn)),
            }
        }
    }
}

/// Q6_K: super-blocks (Q6_K_BYTES) of 256 values: 128 bytes of low nibbles, 64 of high bit pairs,
/// 16 i8 scales (one per 16 values), f16 d; `w = d · sc · (q - 32)`. ggml's layout: per
/// 128-value half n, value 32·k + l (k < 4, l < 32) has its low bits from
/// ql[64n + 32·(k & 1) + l] (the low nibble for k < 2, else the high one), its high bits from
/// (qh[32n + l] >> 2k) & 3, and scale sc[8n + 2k + l / 16].
pub(super) struct Q6K;
impl Decode for Q6K {
    const OFFSET: u8 = 32;
    const I16_GROUPS: usize = 2;
    const MIN: bool = false;
    const SPLIT: bool = true;
    const BYTES_PER_BLOCK: usize = Q6_K_BYTES / 8;
    #[inline(always)]
    unsafe fn block(row: *const u8, b: usize) -> Block {
        // SAFETY: super-block b / 8 is Q6_K_BYTES at `row + b / 8 · Q6_K_BYTES` (the contract).
        unsafe {
            let sb = row.add(b / 8 * Q6_K_BYTES);
            let (n, k) = ((b % 8) / 4, b % 4);
            let ql = _mm256_loadu_si256(sb.add(64 * n + 32 * (k & 1)).cast());
            let lo = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * n).cast());
            let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32));
            let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
            let u = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(0x0f)), hi);
            let d = f16c_at(sb.add(208));
            let sc = |h: usize| d * f32::from(*sb.add(192 + 8 * n + 2 * k + h).cast::<i8>());
            Block { u, s: [sc(0), sc(1)], m: 0.0 }
        }
    }
}

/// A k-quant: super-blocks of 8 blocks whose scales (and minimums) are packed together, decoded
/// once per super-block and weight row by [`rows_vnni_k`] instead of once per block.
pub(super) trait SuperBlock: Decode {
    /// Super-block g's scales, block j's halves at 2j and 2j + 1, and minimums, block j's at
    /// j: the values [`Decode::block`] gives, computed the same way.
    ///
    /// # Safety
    /// As [`Decode::pair`], for the super-block's 8 blocks.
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256);

    /// The quants of blocks b and b + 1 (b even), as [`Decode::pair`] gives them.
    ///
    /// # Safety
    /// As [`Decode::pair`].
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i;

    /// [`SuperBlock::scales`] of four weight rows at once, for the AVX2 kernel, laid out by
    /// pairs of blocks: element p of each array holds the four rows' values of block 2p in its
    /// low 128 bits and of block 2p + 1 in its high. `first` has the blocks' scales (with
    /// [`Decode::SPLIT`], their first halves'), `second` their second halves' (SPLIT only),
    /// `min` their minimums (formats with [`Decode::MIN`] only): the same values.
    ///
    /// # Safety
    /// As [`Decode::block`], for super-block g's 8 blocks of each row (the method is always
    /// inlined into [`rows_avx2_k`], whose features it gets).
    unsafe fn scales_avx2(rows: [*const u8; 4], g: usize) -> PairScales;

    /// The quants of blocks b and b + 1 (b even), as two [`Decode::block`] calls give them.
    ///
    /// # Safety
    /// As [`Decode::block`], for both blocks.
    unsafe fn quants_pair_avx2(row: *const u8, b: usize) -> (__m256i, __m256i);
}

/// Four weight rows' scales and minimums of one super-block, by pairs of blocks (see
/// [`SuperBlock::scales_avx2`]).
pub(super) struct PairScales {
    pub(super) first: [__m256; 4],
    pub(super) second: [__m256; 4],
    pub(super) min: [__m256; 4],
}

/// The 4 × 4 transpose of 32-bit elements: element r of result c is element c of `v[r]`.
#[inline(always)]
fn transpose4(v: [__m128i; 4]) -> [__m128i; 4] {
    // SAFETY: SSE2, which every x86_64 CPU has.
    unsafe {
        let (a, b) = (_mm_unpacklo_epi32(v[0], v[1]), _mm_unpacklo_epi32(v[2], v[3]));
        let (c, d) = (_mm_unpackhi_epi32(v[0], v[1]), _mm_unpackhi_epi32(v[2], v[3]));
        [
            _mm_unpacklo_epi64(a, b),
            _mm_unpackhi_epi64(a, b),
            _mm_unpacklo_epi64(c, d),
            _mm_unpackhi_epi64(c, d),
        ]
    }
}

/// Q4_K's 12 bytes of six-bit scales and minimums at `p`, unpacked four at a time as
/// llama.cpp's `ggml_vec_dot_q4_K_q8_K` does: bytes 0..8 the 8 blocks' scales, 8..16 their
/// minimums (as `q4k_scale_min` gives them one by one).
///
/// # Safety
/// 12 bytes readable at `p`; only ever inlined into the kernels.
#[inline(always)]
unsafe fn q4k_packed_scales(p: *const u8) -> __m128i {
    // SAFETY: the caller's contract.
    let word = |i: usize| unsafe { std::ptr::read_unaligned(p.add(4 * i).cast::<u32>()) };
    let (w0, w1, w2) = (word(0), word(1), word(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let sc_lo = w0 & LOW6;
    let sc_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let mn_lo = w1 & LOW6;
    let mn_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    // SAFETY: SSE2, which every x86_64 CPU has.
    unsafe { _mm_set_epi32(mn_hi as i32, mn_lo as i32, sc_hi as i32, sc_lo as i32) }
}

impl SuperBlock for Q4K {
    #[inline(always)]
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256) {
        // SAFETY: super-block g is Q4_K_BYTES at `row + g · Q4_K_BYTES` (the contract); only ever
        // inlined into the AVX-512 kernel.
        unsafe {
            let sb = row.add(g * Q4_K_BYTES);
            let packed = q4k_packed_scales(sb.add(4));
            let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed));
            let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(packed)));
            let d = _mm256_set1_ps(f16c_at(sb));
            let dmin = _mm256_set1_ps(f16c_at(sb.add(2)));
            let s = _mm256_mul_ps(d, sc);
            // Both halves of a block share its scale.
            let s = _mm512_permutexvar_ps(
                _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
                _mm512_castps256_ps512(s),
            );
            (s, _mm256_xor_ps(_mm256_mul_ps(dmin, mn), _mm256_set1_ps(-0.0)))
        }
    }
    #[inline(always)]
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i {
        // SAFETY: as `Decode::block`: blocks b and b + 1 are the low and high nibbles of the
        // 32 bytes at 16 + 32 · (b % 8 / 2) of their super-block.
        unsafe {
            let q = _mm256_loadu_si256(row.add(b / 8 * Q4_K_BYTES + 16 + 16 * (b % 8)).cast());
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
            _mm512_and_si512(both, _mm512_set1_epi8(0x0f))
        }
    }
    #[inline(always)]
    unsafe fn scales_avx2(rows: [*const u8; 4], g: usize) -> PairScales {
        // SAFETY: as `scales`, for each row; only ever inlined into the AVX2 kernel.
        unsafe {
            // Each row's first 16 bytes: f16 d and dmin, then the 12 bytes of scales and
            // minimums as three words, unpacked as `q4k_packed_scales` does, four rows at once.
            let head = |r: usize| _mm_loadu_si128(rows[r].add(g * Q4_K_BYTES).cast());
            let [dd, w0, w1, w2] = transpose4([head(0), head(1), head(2), head(3)]);
            let (low6, low4, low2) = (_mm_set1_epi8(0x3f), _mm_set1_epi8(0x0f), _mm_set1_epi8(3));
            let high = |w: __m128i| _mm_slli_epi32::<4>(_mm_and_si128(_mm_srli_epi32::<6>(w), low2));
            let sc_lo = _mm_and_si128(w0, low6);
            let sc_hi = _mm_or_si128(_mm_and_si128(w2, low4), high(w0));
            let mn_lo = _mm_and_si128(w1, low6);
            let mn_hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi32::<4>(w2), low4), high(w1));
            // Byte 4r + j (row r, block j) to 4j + r: blocks 0..4 (or 4..8) of the four rows.
            let by_block = _mm_set_epi8(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
            // (d, dmin) of rows 0..4 as f32, then d and dmin each for both blocks of a pair.
            let dd = _mm256_cvtph_ps(dd);
            let d = _mm256_permutevar8x32_ps(dd, _mm256_set_epi32(6, 4, 2, 0, 6, 4, 2, 0));
            let dmin = _mm256_permutevar8x32_ps(dd, _mm256_set_epi32(7, 5, 3, 1, 7, 5, 3, 1));
            let dmin = _mm256_xor_ps(dmin, _mm256_set1_ps(-0.0));
            let (mut first, mut min) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for (h, (sc, mn)) in [(sc_lo, mn_lo), (sc_hi, mn_hi)].into_iter().enumerate() {
                let (sc, mn) = (_mm_shuffle_epi8(sc, by_block), _mm_shuffle_epi8(mn, by_block));
                first[2 * h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
                first[2 * h + 1] =
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(sc, sc))));
                min[2 * h] = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
                min[2 * h + 1] =
                    _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(mn, mn))));
            }
            PairScales { first, second: first, min }
        }
    }
    #[inline(always)]
    unsafe fn quants_pair_avx2(row: *const u8, b: usize) -> (__m256i, __m256i) {
        // SAFETY: as `quants_pair`; only ever inlined into the AVX2 kernel.
        unsafe {
            let q = _mm256_loadu_si256(row.add(b / 8 * Q4_K_BYTES + 16 + 16 * (b % 8)).cast());
            let low = _mm256_set1_epi8(0x0f);
            (_mm256_and_si256(q, low), _mm256_and_si256(_mm256_srli_epi16::<4>(q), low))
        }
    }
}

impl SuperBlock for Q6K {
    #[inline(always)]
    unsafe fn scales(row: *const u8, g: usize) -> (__m512, __m256) {
        // SAFETY: super-block g is Q6_K_BYTES at `row + g · Q6_K_BYTES` (the contract), its 16 i8
        // scales at 192; only ever inlined into the AVX-512 kernel.
        unsafe {
            let sb = row.add(g * Q6_K_BYTES);
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sb.add(192).cast())));
            (_mm512_mul_ps(_mm512_set1_ps(f16c_at(sb.add(208))), sc), _mm256_setzero_ps())
        }
    }
    #[inline(always)]
    unsafe fn quants_pair(row: *const u8, b: usize) -> __m512i {
        // SAFETY: b is even, so blocks b and b + 1 (k and k + 1) have their low bits in the
        // 64 bytes at 64 · n (low nibbles for k = 0, high for k = 2) and their high bits in the
        // same 32 bytes of qh, shifted by 2k and 2k + 2.
        unsafe {
            let sb = row.add(b / 8 * Q6_K_BYTES);
            let (n, k) = ((b % 8) / 4, b % 4);
            let ql = _mm512_loadu_si512(sb.add(64 * n).cast());
            let lo = if k == 0 { ql } else { _mm512_srli_epi16::<4>(ql) };
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * n).cast());
            let shift = _mm_cvtsi32_si128(2 * k as i32);
            let hi = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_srl_epi16(qh, shift)),
                _mm256_srl_epi16(_mm256_srli_epi16::<2>(qh), shift),
            );
            let hi = _mm512_slli_epi16::<4>(_mm512_and_si512(hi, _mm512_set1_epi8(3)));
            _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi8(0x0f)), hi)
        }
    }
    #[inline(always)]
    unsafe fn scales_avx2(rows: [*const u8; 4], g: usize) -> PairScales {
        // SAFETY: as `scales`, for each row; only ever inlined into the AVX2 kernel.
        unsafe {
            let sb = |r: usize| rows[r].add(g * Q6_K_BYTES);
            // Half h of block j has scale 2j + h, so word p of a row's 16 scales holds pair p's:
            // after the transpose, byte 4r + c of element p is row r's scale 4p + c.
            let load = |r: usize| _mm_loadu_si128(sb(r).add(192).cast());
            let scales = transpose4([load(0), load(1), load(2), load(3)]);
            let by_half = _mm_set_epi8(15, 11, 7, 3, 13, 9, 5, 1, 14, 10, 6, 2, 12, 8, 4, 0);
            let d16 = |r: usize| i32::from(std::ptr::read_unaligned(sb(r).add(208).cast::<u16>()));
            let d = _mm_set_epi32(0, 0, d16(3) << 16 | d16(2), d16(1) << 16 | d16(0));
            let d = _mm256_cvtph_ps(_mm_unpacklo_epi64(d, d));
            let (mut first, mut second) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for p in 0..4 {
                let v = _mm_shuffle_epi8(scales[p], by_half);
                let f = |v: __m128i| _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
                first[p] = f(v);
                second[p] = f(_mm_unpackhi_epi64(v, v));
            }
            PairScales { first, second, min: [_mm256_setzero_ps(); 4] }
        }
    }
    #[inline(always)]
    unsafe fn quants_pair_avx2(row: *const u8, b: usize) -> (__m256i, __m256i) {
        // SAFETY: as `quants_pair`; only ever inlined into the AVX2 kernel.
        unsafe {
            let sb = row.add(b / 8 * Q6_K_BYTES);
            let (n, k) = ((b % 8) / 4, b % 4);
            let (ql0, ql1) =
                (_mm256_loadu_si256(sb.add(64 * n).cast()), _mm256_loadu_si256(sb.add(64 * n + 32).cast()));
            let (ql0, ql1) =
                if k == 0 { (ql0, ql1) } else { (_mm256_srli_epi16(ql0, 4), _mm256_srli_epi16(ql1, 4)) };
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * n).cast());
            let shift = _mm_cvtsi32_si128(2 * k as i32);
            let hi0 = _mm256_srl_epi16(qh, shift);
            let hi1 = _mm256_srli_epi16::<2>(hi0);
            let (low, three) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
            let value = |lo: __m256i, hi: __m256i| {
                _mm256_or_si256(
                    _mm256_and_si256(lo, low),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(hi, three)),
                )
            };
            (value(ql0, hi0), value(ql1, hi1))
        }
    }
}
