//! Weight rows times a few quantized activation rows: the decode matmuls, and dequantizing
//! blocks of rows for the blocked float GEMM of CPUs without the batched kernel.

use std::ops::Range;

use anyhow::{Result, bail};

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Format, Isa, Level, QK, QuantizedRows, SendPtr};

/// `out[i · rows + r] = x_i · w_r` for every activation row i and weight row r: the weights `w`
/// are (rows, cols) in `format`, `x` is (m, cols), `out` is (m, rows). Work is split over candle's
/// thread pool (the one its own matmuls use, so the two never compete for the cores).
pub fn matmul(
    format: Format,
    isa: Isa,
    w: &[u8],
    rows: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) -> Result<()> {
    matmul_group(&[GroupPart { format, w, rows }], isa, x, &mut [out])
}

/// One weight matrix of a [`matmul_group`]: its format, bytes and row count.
pub struct GroupPart<'a> {
    pub format: Format,
    pub w: &'a [u8],
    pub rows: usize,
}

/// [`matmul`] for several matrices against the same activations (a layer's Q, K and V, or its
/// gate and up projections) in one hand-out over the pool: one wait for the threads instead of
/// one per matrix. Each output is what [`matmul`] gives for its matrix, bit for bit.
pub fn matmul_group(
    parts: &[GroupPart<'_>],
    isa: Isa,
    x: &QuantizedRows,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    const ROWS_PER_ITEM: usize = 16;
    let m = x.rows();
    if parts.len() != outs.len() {
        bail!("internal error: {} matrices and {} outputs in a matmul group", parts.len(), outs.len());
    }
    // Per part: its row bytes, its output pointer, and the first work item that is its own.
    let mut first_item = Vec::with_capacity(parts.len() + 1);
    let mut layout = Vec::with_capacity(parts.len());
    let mut items = 0;
    let mut need_sums = false;
    for (part, out) in parts.iter().zip(outs.iter_mut()) {
        let row_bytes = x.cols / QK * part.format.block_bytes();
        if part.w.len() != part.rows * row_bytes || out.len() != m * part.rows {
            bail!(
                "internal error: a ({} × {}) {:?} matmul got {} weight bytes and {} outputs",
                part.rows,
                x.cols,
                part.format,
                part.w.len(),
                out.len()
            );
        }
        need_sums |= part.format.min_per_block();
        first_item.push(items);
        layout.push((row_bytes, SendPtr(out.as_mut_ptr())));
        items += part.rows.div_ceil(ROWS_PER_ITEM);
    }
    first_item.push(items);
    let sums = if need_sums { x.block_sums() } else { Vec::new() };
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        for item in range {
            // The part this item belongs to, and its rows there.
            let p = first_item.partition_point(|&f| f <= item) - 1;
            let (part, (row_bytes, out)) = (&parts[p], layout[p]);
            let start = (item - first_item[p]) * ROWS_PER_ITEM;
            let rows = start..(start + ROWS_PER_ITEM).min(part.rows);
            let sums: &[f32] = if part.format.min_per_block() { &sums } else { &[] };
            // SAFETY: work items are disjoint row ranges of one part each, so each output
            // element is written by exactly one call; the outputs outlive the pool's execution.
            unsafe { rows_range(part.format, isa, part.w, row_bytes, part.rows, x, sums, rows, out) }
        }
    });
    Ok(())
}

/// Dequantizes whole blocks of `format` into `out` as f32, on the calling thread: a few rows
/// at a time (an embedding row, a block of rows of the blocked GEMM, which runs on the pool).
pub fn dequantize(format: Format, isa: Isa, w: &[u8], out: &mut [f32]) -> Result<()> {
    let (values, bytes) = format.unit();
    if !w.len().is_multiple_of(bytes) || out.len() != w.len() / bytes * values {
        bail!("internal error: {} bytes of {format:?} do not dequantize to {} values", w.len(), out.len());
    }
    dequantize_blocks(format, isa, w, out);
    Ok(())
}

/// `out` must hold 32 values per block of `w`.
fn dequantize_blocks(format: Format, isa: Isa, w: &[u8], out: &mut [f32]) {
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`); the
        // callers checked the lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni | Level::Avx2 => unsafe { x86::dequantize(format, w, out) },
        _ => dequantize_scalar(format, w, out),
    }
}

fn dequantize_scalar(format: Format, w: &[u8], out: &mut [f32]) {
    let mut q = [0i8; QK];
    for (b, dst) in out.chunks_exact_mut(QK).enumerate() {
        let d = format.sub_block(w, b, &mut q);
        let m = format.min(&w[b * format.block_bytes()..]);
        for (o, &v) in dst.iter_mut().zip(&q) {
            *o = d * f32::from(v) + m;
        }
    }
}

/// Computes the outputs of weight rows `range` for every activation row.
///
/// # Safety
/// `out` must point to (m, rows) f32s, with no other writer of these rows' columns.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_range(
    format: Format,
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &QuantizedRows,
    sums: &[f32],
    range: Range<usize>,
    out: SendPtr<f32>,
) {
    // Row i's block sums (empty for formats without a block minimum).
    let nb = x.cols / QK;
    let sums_of = |i: usize| sums.get(i * nb..(i + 1) * nb).unwrap_or(&[]);
    let mut r = range.start;
    // Four weight rows at a time where the CPU has a four-row kernel, against each activation
    // row in turn: the four rows stay in L1 while every activation row passes, so a decode
    // step of several sequences reads the weights from memory once, and each sequence's result
    // is bit for bit what it would get decoded alone.
    'groups: while r + 4 <= range.end {
        let w4 = &w[r * row_bytes..(r + 4) * row_bytes];
        for i in 0..x.rows() {
            let (d, qs) = x.row(i);
            let Some(v) = dot4(format, isa, w4, row_bytes, d, qs, sums_of(i)) else {
                // No four-row kernel here (then for no row): one row at a time below.
                break 'groups;
            };
            for (k, v) in v.into_iter().enumerate() {
                // SAFETY: (i, r + k) is in bounds and written only here (the contract).
                unsafe { *out.get().add(i * rows + r + k) = v };
            }
        }
        r += 4;
    }
    for r in r..range.end {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for i in 0..x.rows() {
            let (d, qs) = x.row(i);
            let v = dot(format, isa, wr, d, qs, sums_of(i));
            // SAFETY: (i, r) is in bounds and written only here (see the function's contract).
            unsafe { *out.get().add(i * rows + r) = v };
        }
    }
}

/// Four weight rows of `row_bytes` each against one activation row; `None` where no SIMD
/// kernel exists (the caller falls back to [`dot`]).
fn dot4(
    format: Format,
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    d: &[f32],
    qs: &[i8],
    ys: &[f32],
) -> Option<[f32; 4]> {
    debug_assert_eq!(w.len(), 4 * row_bytes);
    debug_assert_eq!(row_bytes, d.len() * format.block_bytes());
    if format == Format::Iq4Xs {
        // Its rows are long (whole super-blocks): one at a time costs little.
        return None;
    }
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`), and the
        // slices hold four whole rows and one activation row (checked by `matmul`).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => Some(unsafe {
            match format {
                Format::Q8_0 => x86::dot4_q8_0_vnni(w, row_bytes, d, qs, ys),
                Format::Q5_0 => x86::dot4_q5_0_vnni(w, row_bytes, d, qs, ys),
                Format::Q4_0 => x86::dot4_q4_0_vnni(w, row_bytes, d, qs, ys),
                Format::Q4_1 => x86::dot4_q4_1_vnni(w, row_bytes, d, qs, ys),
                Format::Q5_1 => x86::dot4_q5_1_vnni(w, row_bytes, d, qs, ys),
                Format::Iq4Nl => x86::dot4_iq4nl_vnni(w, row_bytes, d, qs, ys),
                Format::Iq4Xs => return None,
            }
        }),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => Some(unsafe {
            match format {
                Format::Q8_0 => x86::dot4_q8_0_avx2(w, row_bytes, d, qs, ys),
                Format::Q5_0 => x86::dot4_q5_0_avx2(w, row_bytes, d, qs, ys),
                Format::Q4_0 => x86::dot4_q4_0_avx2(w, row_bytes, d, qs, ys),
                Format::Q4_1 => x86::dot4_q4_1_avx2(w, row_bytes, d, qs, ys),
                Format::Q5_1 => x86::dot4_q5_1_avx2(w, row_bytes, d, qs, ys),
                Format::Iq4Nl => x86::dot4_iq4nl_avx2(w, row_bytes, d, qs, ys),
                Format::Iq4Xs => return None,
            }
        }),
        _ => {
            let _ = (format, w, row_bytes, d, qs, ys);
            None
        }
    }
}

/// One weight row (whole blocks) against one quantized activation row.
/// `ys` holds the activation row's per-block `d · Σ q` for formats with a block minimum
/// (empty for the others).
fn dot(format: Format, isa: Isa, w: &[u8], d: &[f32], qs: &[i8], ys: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), d.len() * format.block_bytes());
    debug_assert_eq!(qs.len(), d.len() * QK);
    match isa.0 {
        // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`),
        // and the x86 kernels read within the slices, whose lengths were checked.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => unsafe {
            match format {
                Format::Q8_0 => x86::dot_q8_0_vnni(w, d, qs),
                Format::Q5_0 => x86::dot_q5_0_vnni(w, d, qs),
                Format::Q4_0 => x86::dot_q4_0_vnni(w, d, qs),
                Format::Q4_1 => x86::dot_q4_1_vnni(w, d, qs, ys),
                Format::Q5_1 => x86::dot_q5_1_vnni(w, d, qs, ys),
                Format::Iq4Nl => x86::dot_iq4nl_vnni(w, d, qs),
                Format::Iq4Xs => x86::dot_iq4xs_vnni(w, d, qs),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe {
            match format {
                Format::Q8_0 => x86::dot_q8_0_avx2(w, d, qs),
                Format::Q5_0 => x86::dot_q5_0_avx2(w, d, qs),
                Format::Q4_0 => x86::dot_q4_0_avx2(w, d, qs),
                Format::Q4_1 => x86::dot_q4_1_avx2(w, d, qs, ys),
                Format::Q5_1 => x86::dot_q5_1_avx2(w, d, qs, ys),
                Format::Iq4Nl => x86::dot_iq4nl_avx2(w, d, qs),
                Format::Iq4Xs => x86::dot_iq4xs_avx2(w, d, qs),
            }
        },
        _ => dot_scalar(format, w, d, qs, ys),
    }
}

fn dot_scalar(format: Format, w: &[u8], d: &[f32], qs: &[i8], ys: &[f32]) -> f32 {
    let mut sum = 0f32;
    let mut wq = [0i8; QK];
    for (b, (&dy, y)) in d.iter().zip(qs.chunks_exact(QK)).enumerate() {
        let dw = format.sub_block(w, b, &mut wq);
        let isum: i32 = wq.iter().zip(y).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        sum += dw * dy * isum as f32;
        if format.min_per_block() {
            sum += format.min(&w[b * format.block_bytes()..]) * ys[b];
        }
    }
    sum
}
