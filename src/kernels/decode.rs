//! Weight rows times a few quantized activation rows: the decode matmuls, and dequantizing
//! blocks of rows for the blocked float GEMM of CPUs without the batched kernel.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{BlockScale, DecodePath, Format, Isa, Level, Part, QK, QuantizedRows, SendPtr};

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
    matmul_group(&[Part { format, w, rows }], isa, x, &mut [super::as_uninit(out)])
}

/// [`matmul`] for several matrices against the same activations (a layer's Q, K and V, or its
/// gate and up projections) in one hand-out over the pool: one wait for the threads instead of
/// one per matrix. Each output is what [`matmul`] gives for its matrix, bit for bit. On `Ok`,
/// every value of every output has been written, so they need no zeroing before.
pub fn matmul_group(
    parts: &[Part<'_>],
    isa: Isa,
    x: &QuantizedRows,
    outs: &mut [&mut [MaybeUninit<f32>]],
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
        if part.format.decode() != DecodePath::Blocks {
            bail!("internal error: {} has no int8 decode kernel", part.format);
        }
        let row_bytes = part.format.row_bytes(x.cols);
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
        need_sums |= part.format.has_minimum();
        first_item.push(items);
        layout.push((row_bytes, SendPtr(out.as_mut_ptr().cast::<f32>())));
        items += part.rows.div_ceil(ROWS_PER_ITEM);
    }
    first_item.push(items);
    let sums = if need_sums { x.block_sums() } else { Vec::new() };
    let activations = activation_layout(isa, x, &sums, parts);
    for_each_item(items, |item| {
        // The part this item belongs to, and its rows there.
        let p = first_item.partition_point(|&f| f <= item) - 1;
        let (part, (row_bytes, out)) = (&parts[p], layout[p]);
        let start = (item - first_item[p]) * ROWS_PER_ITEM;
        let rows = start..(start + ROWS_PER_ITEM).min(part.rows);
        let sums: &[f32] = if part.format.has_minimum() { &sums } else { &[] };
        // SAFETY: work items are disjoint row ranges of one part each, so each output
        // element is written by exactly one call; the outputs outlive the pool's execution.
        unsafe {
            rows_range(part.format, isa, part.w, row_bytes, part.rows, x, sums, &activations, rows, out)
        }
    });
    Ok(())
}

/// Runs `f` on every item of `0..items` over candle's pool, handed out in shrinking grabs:
/// each takes 1/(2 · threads) of the items left, and never less than 1/64 of a thread's share
/// ("guided" scheduling). candle's `execute_chunked` hands out fixed eighths per thread: for
/// the output matrix that is 11 MB of weights, and a core could sit idle for most of a grab at
/// the end of every decode step. Fixed small grabs (1/64) balance the end but interleave the
/// two cores' grabs of a small layer matrix a few KB apart, so each core's prefetches, a page
/// ahead, fetch the other core's rows; the large first grabs keep each core on rows of its
/// own (one decode step 6% faster than fixed 1/64 grabs, 7% at 8 sequences). (Called from
/// inside the pool, everything runs here.)
pub(super) fn for_each_item(items: usize, f: impl Fn(usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let threads = pool.n_workers() + 1;
    let least = items.div_ceil(threads * 64).max(1);
    let cursor = AtomicUsize::new(0);
    // One unit per thread, each taking grabs until none are left.
    pool.execute_chunked(threads, |_| {
        let mut start = cursor.load(Ordering::Relaxed);
        loop {
            if start >= items {
                break;
            }
            let grab = ((items - start) / (2 * threads)).max(least);
            match cursor.compare_exchange_weak(start, start + grab, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    for item in start..(start + grab).min(items) {
                        f(item);
                    }
                    start = cursor.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    });
}

/// The activation rows laid out for the pair kernel ([`x86::PAIRS_MIN`] to
/// [`x86::PAIRS_MAX`] rows) or for the many-row kernel (from [`x86::LANES_MIN`]),
/// in chunks of at most [`x86::LANES`] rows of nearly equal size, when the CPU has them;
/// with AVX2, for its many-row kernels (from [`x86::LANES_AVX2_MIN`] rows, in chunks of at most
/// [`x86::LANES_AVX2`]) or its paired kernel ([`x86::PAIRED_AVX2`] rows, two lanes each, when
/// one of `parts` has it); else as they are.
#[cfg(target_arch = "x86_64")]
fn activation_layout(isa: Isa, x: &QuantizedRows, sums: &[f32], parts: &[Part<'_>]) -> x86::Layout {
    let m = x.rows();
    // Rows 0..m in `chunks` runs of nearly equal size, each laid out by `make`.
    fn chunked<T>(m: usize, most: usize, make: impl Fn(usize, usize) -> T) -> Vec<T> {
        let chunks = m.div_ceil(most);
        let mut i0 = 0;
        (0..chunks)
            .map(|c| {
                let n = (m - i0) / (chunks - c);
                let chunk = make(i0, n);
                i0 += n;
                chunk
            })
            .collect()
    }
    if isa.0 == Level::Avx2 {
        return if m >= x86::LANES_AVX2_MIN {
            x86::Layout::LanesAvx2(chunked(m, x86::LANES_AVX2, |i0, n| {
                x86::LanesAvx2::new(x, sums, i0, n, 1)
            }))
        } else if x86::PAIRED_AVX2.contains(&m)
            && parts.iter().any(|p| x86::table(p.format, false).is_some_and(|t| t.paired_avx2.is_some()))
        {
            x86::Layout::PairedAvx2(x86::LanesAvx2::new(x, sums, 0, m, 2))
        } else {
            x86::Layout::Rows
        };
    }
    if isa.decode_lanes().is_none() || m < x86::PAIRS_MIN {
        x86::Layout::Rows
    } else if m < x86::LANES_MIN {
        x86::Layout::Pairs(x86::Pairs::new(x, sums, 0, m))
    } else {
        x86::Layout::Lanes(chunked(m, x86::LANES, |i0, n| x86::Lanes::new(x, sums, i0, n)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn activation_layout(_: Isa, _: &QuantizedRows, _: &[f32], _: &[Part<'_>]) {}

/// Dequantizes whole blocks of `format` into `out` as f32, on the calling thread: a few rows
/// at a time (an embedding row, a block of rows of the blocked GEMM, which runs on the pool).
pub fn dequantize(format: Format, isa: Isa, w: &[u8], out: &mut [f32]) -> Result<()> {
    let (values, bytes) = format.unit();
    if format.decode() != DecodePath::Blocks
        || !w.len().is_multiple_of(bytes)
        || out.len() != w.len() / bytes * values
    {
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
        Level::Avx512Vnni | Level::Avx2 if !matches!(format, Format::Q4K | Format::Q6K) => unsafe {
            x86::dequantize(format, w, out)
        },
        // The k-quants are dequantized here only for an embedding row or on the portable
        // path (the batched kernel reads them on the others).
        _ => dequantize_scalar(format, w, out),
    }
}

fn dequantize_scalar(format: Format, w: &[u8], out: &mut [f32]) {
    let mut q = [0i8; QK];
    for (b, dst) in out.chunks_exact_mut(QK).enumerate() {
        let BlockScale { s, m } = format.sub_block(w, b, &mut q);
        for (j, (o, &v)) in dst.iter_mut().zip(&q).enumerate() {
            *o = s[j / 16] * f32::from(v) + m;
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
    #[cfg(target_arch = "x86_64")] layout: &x86::Layout,
    #[cfg(not(target_arch = "x86_64"))] _: &(),
    range: Range<usize>,
    out: SendPtr<f32>,
) {
    let m = x.rows();
    #[cfg(target_arch = "x86_64")]
    if matches!(isa.0, Level::Avx512Vnni | Level::Avx2)
        && let Some(table) = x86::table(format, isa.0 == Level::Avx512Vnni)
    {
        // A laid-out kernel, against each chunk of the layout (they cover the activation rows
        // once each).
        let (r, o) = (range.clone(), out.get());
        // SAFETY: as below.
        unsafe {
            match (layout, table.pairs, table.lanes, table.lanes_avx2) {
                (x86::Layout::Pairs(pairs), Some(k), _, _) => {
                    return x86::by_weight_rows(k, std::slice::from_ref(pairs), w, row_bytes, r, o, rows);
                }
                (x86::Layout::Lanes(chunks), _, Some(k), _) => {
                    return x86::by_weight_rows(k, chunks, w, row_bytes, r, o, rows);
                }
                (x86::Layout::LanesAvx2(chunks), _, _, Some(k)) => {
                    return x86::by_weight_rows(k, chunks, w, row_bytes, r, o, rows);
                }
                (x86::Layout::PairedAvx2(lanes), ..) if let Some(k) = table.paired_avx2 => {
                    return x86::by_weight_rows(k, std::slice::from_ref(lanes), w, row_bytes, r, o, rows);
                }
                _ => {}
            }
        }
        // Four weight rows at a time (one at the matrix's end), against up to `max_n`
        // activation rows per call: each weight block is decoded once for all of them, and
        // each sequence's result is bit for bit what it would get decoded alone.
        let mut r = range.start;
        while r < range.end {
            let (k, kernels) = if r + 4 <= range.end { (4, &table.four) } else { (1, &table.one) };
            let mut i = 0;
            while i < m {
                let n = (m - i).min(table.max_n);
                // SAFETY: an `Isa` exists only for instruction sets this CPU has (see `Isa`);
                // rows r..r + k are whole rows of `w` (checked by `matmul_group`), activation
                // rows i..i + n exist, and outputs (i.., r..r + k) are this call's alone (the
                // contract).
                unsafe {
                    kernels[n - 1](
                        w.as_ptr().add(r * row_bytes),
                        row_bytes,
                        x,
                        sums,
                        i,
                        out.get().add(r),
                        rows,
                    )
                };
                i += n;
            }
            r += k;
        }
        return;
    }
    let nb = x.cols / QK;
    for r in range {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for i in 0..m {
            let (d, qs) = x.row(i);
            let ys = sums.get(i * nb..(i + 1) * nb).unwrap_or(&[]);
            let v = dot_scalar(format, wr, d, qs, ys);
            // SAFETY: (i, r) is in bounds and written only here (see the function's contract).
            unsafe { *out.get().add(i * rows + r) = v };
        }
    }
}

/// One weight row (whole units) against one quantized activation row, in portable code.
/// `ys` holds the activation row's per-block `d · Σ q` for formats with a block minimum
/// (empty for the others).
fn dot_scalar(format: Format, w: &[u8], d: &[f32], qs: &[i8], ys: &[f32]) -> f32 {
    let mut sum = 0f32;
    let mut wq = [0i8; QK];
    for (b, (&dy, y)) in d.iter().zip(qs.chunks_exact(QK)).enumerate() {
        let BlockScale { s, m } = format.sub_block(w, b, &mut wq);
        let half = |h: usize| -> i32 {
            wq[16 * h..16 * h + 16].iter().zip(&y[16 * h..]).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum()
        };
        if s[0] == s[1] {
            sum += s[0] * dy * (half(0) + half(1)) as f32;
        } else {
            sum += s[0] * dy * half(0) as f32 + s[1] * dy * half(1) as f32;
        }
        if format.has_minimum() {
            sum += m * ys[b];
        }
    }
    sum
}
