//! Our own reader of a GGUF file's header (metadata and tensor table), in place of candle's
//! `Content::read`, because the file may be hostile.
//!
//! Every count, length, size and offset read from the file goes through checked arithmetic
//! and is bounded by the bytes that are actually there before anything is allocated from it,
//! and every tensor's bytes are checked to lie inside the file, apart from every other
//! tensor's, before any tensor is used. Candle's reader divides by `general.alignment`
//! (zero panics), multiplies shapes unchecked, silently keeps the last of two tensors with
//! one name, and reports an unknown tensor type without naming the tensor. The checks follow
//! llama.cpp's `gguf.cpp`, which refuses the same files.
//!
//! The result is candle's [`Content`], so the rest of the program (and candle's
//! `Content::tensor`) reads it as before, and beside it the tensors of types candle has no
//! name for but our kernels read (IQ4_NL, IQ4_XS): see [`Header`].

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use candle_core::quantized::gguf_file::{Content, DEFAULT_ALIGNMENT, TensorInfo, Value, VersionedMagic};

use super::value_u64;
use crate::kernels::format::Format;

/// Why a header was refused.
#[derive(Debug)]
pub enum Error {
    /// The file breaks the format: truncated, inconsistent or crafted.
    Corrupt(String),
    /// A valid file with something streamgen cannot read (a newer tensor type).
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Corrupt(why) | Self::Unsupported(why) => f.write_str(why),
        }
    }
}

macro_rules! corrupt {
    ($($arg:tt)*) => { return Err(Error::Corrupt(format!($($arg)*))) };
}

/// ggml allows at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Bound on the number of metadata values, array elements included. Each costs a 32-byte
/// [`Value`] however few bytes it takes in the file (a one-byte `u8`), so the file size alone
/// would let a 1 GB file claim 32 GB. The largest real vocabularies (Gemma's 262,144 tokens,
/// with scores, types and merges) hold about a million values.
const MAX_METADATA_VALUES: u64 = 1 << 24;

/// A GGUF file's header.
pub struct Header {
    /// The metadata, and the tensors of the types candle knows.
    pub content: Content,
    /// The tensors of types candle has no `GgmlDType` for (IQ4_NL, IQ4_XS), by name.
    pub other: HashMap<String, OtherTensor>,
}

/// A tensor of a type candle has no name for.
#[derive(Debug, Clone)]
pub struct OtherTensor {
    pub dtype: Format,
    /// Outermost first, as candle's shapes.
    pub shape: Vec<usize>,
    /// From the start of the data section.
    pub offset: u64,
}

/// Reads the header of the GGUF file `bytes` and checks every tensor's place in it.
pub fn parse(bytes: &[u8]) -> Result<Content, Error> {
    parse_header(bytes).map(|h| h.content)
}

/// Like [`parse`], with the tensors candle cannot name.
pub fn parse_header(bytes: &[u8]) -> Result<Header, Error> {
    let mut r = Reader { bytes, pos: 0, wide: true, section: "header", values: 0 };
    if r.take(4, "the magic")? != b"GGUF" {
        corrupt!("no GGUF magic at its start");
    }
    let version = r.u32()?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(Error::Unsupported(
                "it is a big-endian GGUF file, which streamgen cannot read".into(),
            ));
        }
        v => {
            return Err(Error::Unsupported(format!("GGUF version {v} is not supported (supported: 1 to 3)")));
        }
    };
    // Version 1 wrote lengths, counts and dimensions as u32, later versions as u64.
    r.wide = version >= 2;
    let tensor_count = r.len()?;
    let kv_count = r.len()?;
    // The smallest entries: a key, a value type and a one-byte value; a name, one dimension,
    // a type and an offset.
    let (min_kv, min_tensor) = (r.len_size() + 4 + 1, r.len_size() + 4 + r.len_size() + 4 + 8);
    let needed = kv_count
        .checked_mul(min_kv)
        .and_then(|kv| tensor_count.checked_mul(min_tensor).and_then(|t| t.checked_add(kv)));
    if needed.is_none_or(|n| n > r.remaining()) {
        corrupt!(
            "the header is truncated or corrupt: it declares {tensor_count} tensors and {kv_count} metadata entries, more than a file of {} bytes can hold",
            bytes.len()
        );
    }

    r.section = "metadata";
    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let value_type = r.u32()?;
        let value = r.value(value_type, &key)?;
        match metadata.entry(key) {
            Entry::Occupied(e) => corrupt!("metadata key {} appears twice", e.key().escape_debug()),
            Entry::Vacant(e) => e.insert(value),
        };
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match value_u64(v) {
            Some(a) if a.is_power_of_two() => a,
            Some(a) => corrupt!("general.alignment = {a} is not a power of two"),
            None => corrupt!("general.alignment is not an unsigned integer"),
        },
    };

    r.section = "tensor table";
    let mut tensor_infos = HashMap::new();
    let mut other = HashMap::new();
    // (offset in the data section, size in bytes, name) of each tensor, to check their places.
    let mut places: Vec<(u64, u64, String)> = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let shown = name.escape_debug().to_string();
        let n_dims = r.u32()?;
        if n_dims == 0 {
            corrupt!("tensor {shown} has no dimensions");
        }
        if n_dims > MAX_DIMS {
            corrupt!("tensor {shown} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}");
        }
        // Innermost (the row) first in the file; candle's shapes are outermost first.
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.len()?;
            if d == 0 {
                corrupt!("tensor {shown} has a dimension of 0");
            }
            dims.push(d);
        }
        let type_id = r.u32()?;
        let dtype = match ggml_type(type_id) {
            Ok(t) => t,
            Err(Some(known)) => {
                return Err(Error::Unsupported(format!(
                    "tensor {shown} is {known} (type {type_id}), which streamgen does not read yet"
                )));
            }
            Err(None) => corrupt!("tensor {shown} has unknown type {type_id}"),
        };
        let offset = r.u64()?;
        let (block, block_bytes) = (dtype.unit().0 as u64, dtype.unit().1 as u64);
        if !dims[0].is_multiple_of(block) {
            corrupt!(
                "tensor {shown} has rows of {} values, not a whole number of {dtype} blocks of {block}",
                dims[0]
            );
        }
        // Checked: a product that wraps past 2^64 would pass any bounds check below.
        let size = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / block).checked_mul(block_bytes));
        let Some(size) = size.filter(|&s| s <= bytes.len() as u64) else {
            corrupt!("tensor {shown} (shape {dims:?}, {dtype}) is larger than the file");
        };
        if !offset.is_multiple_of(alignment) {
            corrupt!("tensor {shown} starts at offset {offset}, not a multiple of the alignment {alignment}");
        }
        let Ok(shape) = dims.iter().rev().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>() else {
            corrupt!("tensor {shown} (shape {dims:?}) is larger than this machine can address");
        };
        if tensor_infos.contains_key(&name) || other.contains_key(&name) {
            corrupt!("tensor {shown} appears twice");
        }
        match dtype.ggml_dtype() {
            Some(ggml_dtype) => {
                tensor_infos.insert(name, TensorInfo { ggml_dtype, shape: shape.into(), offset });
            }
            None => {
                other.insert(name, OtherTensor { dtype, shape, offset });
            }
        }
        places.push((offset, size, shown));
    }

    // The data section starts at the next multiple of the alignment after the tensor table.
    let data_start = (r.pos as u64).checked_next_multiple_of(alignment);
    for (offset, size, shown) in &places {
        let end = data_start.and_then(|s| s.checked_add(*offset)).and_then(|s| s.checked_add(*size));
        if end.is_none_or(|end| end > bytes.len() as u64) {
            corrupt!("tensor {shown} runs past the end of the file (truncated download?)");
        }
    }
    places.sort_unstable();
    for pair in places.windows(2) {
        let ((a, a_size, a_name), (b, _, b_name)) = (&pair[0], &pair[1]);
        // No overflow: a + a_size was checked above to lie inside the file.
        if a + a_size > *b {
            corrupt!("tensors {a_name} and {b_name} overlap in the file");
        }
    }
    let content = Content {
        magic,
        metadata,
        tensor_infos,
        // Some: there are no tensors, or their ends were computed from it above.
        tensor_data_offset: data_start.unwrap_or(u64::MAX),
    };
    Ok(Header { content, other })
}

/// A cursor over the file's bytes whose reads fail, naming the section, past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Lengths and counts are u64 (GGUF v2 and later), not u32 (v1).
    wide: bool,
    /// The part of the header being read, for errors.
    section: &'static str,
    /// Metadata values read so far, against [`MAX_METADATA_VALUES`].
    values: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn past_end(&self, what: fmt::Arguments<'_>) -> Error {
        Error::Corrupt(format!(
            "the {} is truncated or corrupt: {what} at byte {} runs past the end of the file ({} bytes)",
            self.section,
            self.pos,
            self.bytes.len()
        ))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], Error> {
        if n > self.remaining() {
            return Err(self.past_end(format_args!("{what}")));
        }
        let n = n as usize; // At most the remaining length, so it fits.
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>("a value")?[0])
    }

    fn u16(&mut self) -> Result<u16, Error> {
        self.array("a value").map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        self.array("a value").map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Error> {
        self.array("a value").map(u64::from_le_bytes)
    }

    /// A length, count or dimension: u32 in GGUF v1, u64 after.
    fn len(&mut self) -> Result<u64, Error> {
        if self.wide { self.u64() } else { self.u32().map(u64::from) }
    }

    fn len_size(&self) -> u64 {
        if self.wide { 8 } else { 4 }
    }

    fn string(&mut self) -> Result<String, Error> {
        let len = self.len()?;
        if len > self.remaining() {
            return Err(self.past_end(format_args!("a string of {len} bytes")));
        }
        let mut bytes = self.take(len, "a string")?;
        // Strings should not be NUL-terminated, but some writers do it (as candle notes).
        while let [rest @ .., 0] = bytes {
            bytes = rest;
        }
        // Should be UTF-8; some files are not quite (candle's reader is lossy too).
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// The fewest bytes a value of type `t` takes in the file, or `None` for an unknown type.
    fn min_size(&self, t: u32) -> Option<u64> {
        Some(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.len_size(),
            9 => 4 + self.len_size(),
            _ => return None,
        })
    }

    /// A value of type `t` (GGUF's `gguf_type` numbering) under the metadata key `key`.
    fn value(&mut self, t: u32, key: &str) -> Result<Value, Error> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            corrupt!("the metadata holds more than {MAX_METADATA_VALUES} values");
        }
        Ok(match t {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => corrupt!("metadata key {} has the boolean value {b}", key.escape_debug()),
            },
            8 => Value::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                let count = self.len()?;
                // llama.cpp refuses nested arrays too; refusing them also bounds recursion.
                let min = match self.min_size(elem) {
                    Some(_) if elem == 9 => {
                        corrupt!("metadata key {} is an array of arrays", key.escape_debug())
                    }
                    Some(min) => min,
                    None => corrupt!("metadata key {} has unknown value type {elem}", key.escape_debug()),
                };
                if count.checked_mul(min).is_none_or(|n| n > self.remaining()) {
                    return Err(self.past_end(format_args!("an array of {count} elements")));
                }
                if count > MAX_METADATA_VALUES - self.values {
                    corrupt!("the metadata holds more than {MAX_METADATA_VALUES} values");
                }
                // Bounded by the two checks above.
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(elem, key)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => corrupt!("metadata key {} has unknown value type {other}", key.escape_debug()),
        })
    }
}

/// The tensor type with ggml id `id`, or the name of a type streamgen cannot read
/// (`Err(Some)`), or `Err(None)` for an id ggml never had.
fn ggml_type(id: u32) -> Result<Format, Option<&'static str>> {
    // ggml.h's `enum ggml_type`; ids 4, 5 and 31 to 33, 36 to 38 were removed from ggml.
    Format::from_ggml_id(id).ok_or(match id {
        // ggml's activation types, never weights.
        9 => Some("Q8_1"),
        15 => Some("Q8_K"),
        16 => Some("IQ2_XXS"),
        17 => Some("IQ2_XS"),
        18 => Some("IQ3_XXS"),
        19 => Some("IQ1_S"),
        21 => Some("IQ3_S"),
        22 => Some("IQ2_S"),
        24 => Some("I8"),
        25 => Some("I16"),
        26 => Some("I32"),
        27 => Some("I64"),
        28 => Some("F64"),
        29 => Some("IQ1_M"),
        34 => Some("TQ1_0"),
        35 => Some("TQ2_0"),
        39 => Some("MXFP4"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    use super::*;

    /// A valid file from candle's writer: a string, an array and a number of metadata, and two
    /// tensors of different types, so that mutations land in every part of the header.
    fn valid_file() -> Vec<u8> {
        let a = Tensor::arange(0f32, 64., &Device::Cpu).and_then(|t| t.reshape((2, 32))).expect("tensor");
        let qa = QTensor::quantize(&a, GgmlDType::F32).expect("quantize");
        let qb = QTensor::quantize(&a, GgmlDType::Q8_0).expect("quantize");
        let tokens = Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]);
        let meta = [
            ("general.architecture", &Value::String("llama".into())),
            ("tokenizer.ggml.tokens", &tokens),
            ("general.alignment", &Value::U32(32)),
        ];
        crate::test_support::gguf_bytes(&meta, &[("a", &qa), ("b", &qb)])
    }

    /// What a successful parse promises: every tensor lies inside the file.
    fn check_places(bytes: &[u8], header: &Header) {
        let content = &header.content;
        let infos = content.tensor_infos.iter().map(|(name, info)| {
            let dtype = Format::from_ggml_dtype(info.ggml_dtype).expect("a type we read");
            (name, dtype, info.shape.elem_count(), info.offset)
        });
        let others = header.other.iter().map(|(name, t)| (name, t.dtype, t.shape.iter().product(), t.offset));
        for (name, dtype, elems, offset) in infos.chain(others) {
            let size = elems / dtype.unit().0 * dtype.unit().1;
            let end = content.tensor_data_offset + offset + size as u64;
            assert!(end <= bytes.len() as u64, "tensor {name} ends at {end}, past {} bytes", bytes.len());
        }
    }

    #[test]
    fn the_valid_file_parses() {
        let bytes = valid_file();
        let header = parse_header(&bytes).expect("valid");
        assert_eq!(header.content.tensor_infos.len(), 2);
        check_places(&bytes, &header);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes after a GGUF magic and version: an error or a header whose tensors fit,
        /// never a panic or an allocation the bytes cannot back.
        #[test]
        fn arbitrary_bytes_never_panic(version in 0u32..5, rest in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend_from_slice(&version.to_le_bytes());
            bytes.extend_from_slice(&rest);
            if let Ok(header) = parse_header(&bytes) {
                check_places(&bytes, &header);
            }
        }

        /// A valid file with a few header bytes overwritten, and maybe truncated: the same promise.
        #[test]
        fn mutated_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = valid_file();
            // Edits land in the header (the tensor data is not parsed).
            let header = parse(&bytes).map(|c| c.tensor_data_offset as usize).unwrap_or(bytes.len());
            for (at, b) in edits {
                let at = at.index(header);
                bytes[at] = b;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok(header) = parse_header(&bytes) {
                check_places(&bytes, &header);
            }
        }
    }
}
