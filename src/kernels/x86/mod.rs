//! The x86 kernels, one file per portable file they serve (as ggml's `arch/x86/` and candle's
//! `*_x86.rs`): [`blocks`] (block formats, `kernels/mod.rs`), [`decode`] (decode matmuls,
//! `kernels/decode.rs`), [`tiles`] (prefill matmul, `kernels/tiles.rs`), [`attention`] and
//! [`float`]. Every function carries the target features it needs.

mod attention;
mod blocks;
mod decode;
mod decode_formats;
mod decode_lanes;
mod decode_many;
mod decode_paired;
mod float;
mod tiles;

pub use attention::*;
pub use blocks::*;
pub use decode::*;
use decode_formats::*;
pub use decode_lanes::*;
pub use decode_many::*;
pub use decode_paired::*;
pub use float::*;
pub use tiles::*;

use crate::kernels::format::{IQ4_XS_BYTES, Q4_K_BYTES, Q6_K_BYTES};
use crate::kernels::{Format, QK, QuantizedRows};
