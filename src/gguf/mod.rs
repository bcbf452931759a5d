//! Opening a GGUF file and reading its metadata: the one place that knows the file format's
//! quirks (integer widths vary between writers, strings may be lossy) and turns them into
//! errors that name the file and the key.

// Public so that the fuzz target (fuzz/) and other programs can check a header held in
// memory, without a file.
pub mod header;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;

use crate::kernels::format::Format;

/// A GGUF file, memory-mapped, whose header and metadata have been read. Tensors are used in
/// place in the map.
pub struct Gguf {
    path: PathBuf,
    map: Arc<Mmap>,
    content: Content,
    /// Tensors of types candle has no name for (IQ4_NL, IQ4_XS), which are not in `content`.
    other: HashMap<String, header::OtherTensor>,
}

/// A matrix's place in a mapped GGUF file, as [`Gguf::matrix`] finds it: checked to lie inside
/// the file when it was opened.
pub struct Matrix {
    pub map: Arc<Mmap>,
    /// From the start of the file.
    pub offset: usize,
    pub format: Format,
    /// (rows, cols).
    pub shape: (usize, usize),
}

impl Gguf {
    /// Opens `path` and reads its header and metadata.
    ///
    /// The error names the file and says whether it is missing, unreadable or not GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!("model path {} is a directory, not a .gguf file", path.display());
        }
        let mut magic = [0u8; 4];
        let is_gguf = file.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
        if !is_gguf {
            bail!("{} is not a GGUF file (no GGUF magic at its start)", path.display());
        }
        // SAFETY: the file is mapped read-only. Like llama.cpp's mmap loading, this assumes
        // the file is not truncated or rewritten while streamgen runs (the Hub cache never
        // rewrites a blob in place: downloads go to a temporary name first).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map model file {}", path.display()))?;
        // Our own reader, not candle's `Content::read`: the file may be hostile (see `header`).
        let header = header::parse_header(&map).map_err(|e| match e {
            header::Error::Corrupt(why) => anyhow!("{} is not a valid GGUF file: {why}", path.display()),
            header::Error::Unsupported(why) => anyhow!("{}: {why}", path.display()),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map: Arc::new(map),
            content: header.content,
            other: header.other,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and the infos of the tensors of types candle knows (see
    /// [`Gguf::tensor_names`] for all of them).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The metadata value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| anyhow!("{}: metadata key {key} is missing", self.path.display()))
    }

    /// An unsigned integer under `key`, whatever integer width the writer chose.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        value_u64(v)
            .ok_or_else(|| anyhow!("{}: metadata key {key} is not an unsigned integer", self.path.display()))
    }

    /// Like [`Gguf::u64`], or `None` when the key is absent.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u64(key).map(Some),
        }
    }

    /// A float under `key` (f32 or f64 in the file).
    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        match v {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => value_u64(other)
                .map(|x| x as f32)
                .ok_or_else(|| anyhow!("{}: metadata key {key} is not a number", self.path.display())),
        }
    }

    /// Like [`Gguf::f32`], or `None` when the key is absent.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.f32(key).map(Some),
        }
    }

    /// A string under `key`.
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            _ => bail!("{}: metadata key {key} is not a string", self.path.display()),
        }
    }

    /// Like [`Gguf::str`], or `None` when the key is absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// A boolean under `key`, or `None` when absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => match value_u64(other) {
                Some(x) => Ok(Some(x != 0)),
                None => bail!("{}: metadata key {key} is not a boolean", self.path.display()),
            },
        }
    }

    /// An array under `key`.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            _ => bail!("{}: metadata key {key} is not an array", self.path.display()),
        }
    }

    /// The names of all the tensors in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.content.tensor_infos.keys().chain(self.other.keys())
    }

    /// The shape of tensor `name`, outermost first, if the file has it.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        match self.content.tensor_infos.get(name) {
            Some(info) => Some(info.shape.dims()),
            None => self.other.get(name).map(|t| &t.shape[..]),
        }
    }

    /// Reads the tensor `name` into memory on the CPU (for small tensors such as norms).
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        if let Some(t) = self.other.get(name) {
            bail!(
                "{}: tensor {name} is {}, which streamgen reads only as a weight matrix",
                self.path.display(),
                t.dtype
            );
        }
        if !self.content.tensor_infos.contains_key(name) {
            bail!("{}: tensor {name} is missing", self.path.display());
        }
        self.content
            .tensor(&mut Cursor::new(&self.map[..]), name, &Device::Cpu)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{}: cannot read tensor {name}", self.path.display()))
    }

    /// Where the matrix `name` lies in the mapped file: its format, (rows, cols) and offset.
    /// ([`crate::weights::Mapped::from_gguf`] makes a usable matrix of it.)
    pub fn matrix(&self, name: &str) -> Result<Matrix> {
        let (dtype, shape, offset): (Format, &[usize], u64) = match self.content.tensor_infos.get(name) {
            Some(info) => {
                let dtype = Format::from_ggml_dtype(info.ggml_dtype).ok_or_else(|| {
                    anyhow!("{}: tensor {name} is {:?}", self.path.display(), info.ggml_dtype)
                })?;
                (dtype, info.shape.dims(), info.offset)
            }
            None => match self.other.get(name) {
                Some(t) => (t.dtype, &t.shape, t.offset),
                None => bail!("{}: tensor {name} is missing", self.path.display()),
            },
        };
        let &[rows, cols] = shape else {
            bail!("{}: tensor {name} has shape {shape:?}, expected a matrix", self.path.display());
        };
        // Checked when the file was opened; checked again as it costs nothing.
        let offset = self
            .content
            .tensor_data_offset
            .checked_add(offset)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| anyhow!("{}: tensor {name} lies past the end of the file", self.path.display()))?;
        Ok(Matrix { map: self.map.clone(), offset, format: dtype, shape: (rows, cols) })
    }

    /// Drops the tokenizer's vocabulary arrays (tens of MB of small strings) once the tokenizer
    /// has been built from them.
    pub fn release_tokenizer_metadata(&mut self) {
        for key in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
        ] {
            self.content.metadata.remove(key);
        }
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.other.contains_key(name)
    }
}

/// Any non-negative integer value as u64; GGUF writers differ in the width they pick.
pub fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::gguf_file;
    use crate::weights::Mapped;
    use candle_core::Tensor;
    use candle_core::quantized::GgmlDType;

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), bytes).expect("write");
        file
    }

    /// A file written by candle's writer reads back the same: metadata, shapes, types, data.
    #[test]
    fn gguf_a_valid_file_reads_back_as_written() {
        let a = Tensor::arange(0f32, 96., &Device::Cpu).expect("arange").reshape((3, 32)).expect("reshape");
        let b = Tensor::arange(0f32, 64., &Device::Cpu).expect("arange").reshape((2, 32)).expect("reshape");
        let qa = QTensor::quantize(&a, GgmlDType::F32).expect("quantize");
        let qb = QTensor::quantize(&b, GgmlDType::Q8_0).expect("quantize");
        let tokens = Value::Array(vec![Value::String("a".into()), Value::String("b\0".into())]);
        let meta = [("general.architecture", &Value::String("llama".into())), ("tokens", &tokens)];
        let file = gguf_file(&meta, &[("a", &qa), ("b", &qb)]);

        let gguf = Gguf::open(file.path()).expect("open");
        assert_eq!(gguf.str("general.architecture").expect("arch"), "llama");
        let tokens: Vec<&str> = gguf
            .array("tokens")
            .expect("tokens")
            .iter()
            .map(|v| v.to_string().expect("string").as_str())
            .collect();
        assert_eq!(tokens, ["a", "b"]);
        let ta = gguf.tensor("a").expect("a");
        assert_eq!(ta.shape().dims(), [3, 32]);
        let back = ta.dequantize(&Device::Cpu).expect("dequantize").flatten_all().expect("flat");
        assert_eq!(back.to_vec1::<f32>().expect("vec"), (0..96).map(|x| x as f32).collect::<Vec<_>>());
        let mb = Mapped::from_gguf(&gguf, "b").expect("b");
        assert_eq!((mb.dtype(), mb.shape()), (Format::Q8_0, (2, 32)));
        assert_eq!(mb.bytes(), &qb.data().expect("data")[..]);
    }

    /// F16 and BF16 (GGUF type 30) tensors read end to end: the header, a matrix used in place
    /// by a layer and the embedding, a vector read into memory.
    #[test]
    fn gguf_f16_and_bf16_tensors_read_end_to_end() {
        use crate::weights::{Embedding, Linear};
        let values: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(values, (4, 64), &Device::Cpu).expect("tensor");
        let v = Tensor::arange(0f32, 64., &Device::Cpu).expect("arange");
        for dtype in [GgmlDType::F16, GgmlDType::BF16] {
            let qw = QTensor::quantize(&w, dtype).expect("quantize");
            let qv = QTensor::quantize(&v, dtype).expect("quantize");
            let meta = [("general.architecture", &Value::String("llama".into()))];
            let file = gguf_file(&meta, &[("w", &qw), ("v", &qv)]);

            let gguf = Gguf::open(file.path()).expect("open");
            let m = Mapped::from_gguf(&gguf, "w").expect("w");
            assert_eq!((m.dtype(), m.shape()), (Format::from_ggml_dtype(dtype).expect("read"), (4, 64)));
            let rows = qw.dequantize(&Device::Cpu).expect("dequantize");
            let x = Tensor::ones((1, 64), candle_core::DType::F32, &Device::Cpu).expect("x");
            let got = Linear::new(m.clone()).expect("linear").forward(&x).expect("forward");
            let want = rows.sum_keepdim(1).expect("sum").t().expect("t");
            let diff = (got - want).expect("diff").abs().expect("abs").max_all().expect("max");
            assert!(diff.to_scalar::<f32>().expect("scalar") < 1e-4, "{dtype:?}");
            let row = Embedding::new(m).expect("embedding").lookup(&[2]).expect("lookup");
            let want = rows.get(2).expect("row").flatten_all().expect("flat");
            assert_eq!(
                row.flatten_all().expect("flat").to_vec1::<f32>().expect("vec"),
                want.to_vec1::<f32>().expect("vec")
            );
            let back = gguf.tensor("v").expect("v").dequantize(&Device::Cpu).expect("dequantize");
            assert_eq!(back.to_vec1::<f32>().expect("vec"), v.to_vec1::<f32>().expect("vec"), "{dtype:?}");
        }
    }

    /// A hand-laid-out GGUF v3 file (alignment 32) of the tensors `(name, dims innermost
    /// first, ggml type id, data)`.
    fn hand_written(tensors: &[(&str, &[u64], u32, &[u8])]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let mut offset = 0u64;
        for (name, dims, type_id, data) in tensors {
            b.extend_from_slice(&(name.len() as u64).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&type_id.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + data.len() as u64).next_multiple_of(32);
        }
        for (_, _, _, data) in tensors {
            b.resize(b.len().next_multiple_of(32), 0);
            b.extend_from_slice(data);
        }
        b
    }

    /// IQ4_NL (20) and IQ4_XS (23) tensors, which candle's reader refuses, open and read as
    /// matrices: the values are ggml's (`crate::test_support`). Read as a vector, one is a
    /// one-line error naming it.
    #[test]
    fn gguf_iq4_tensors_read_as_matrices() {
        use crate::weights::{Embedding, Linear};
        for (type_id, xs, values, bytes, name) in
            [(20u32, false, 32usize, 18usize, "IQ4_NL"), (23, true, 256, 136, "IQ4_XS")]
        {
            let (blocks, want) = crate::test_support::iq4_reference(xs);
            let n = blocks.len() / bytes;
            // (2, n / 2 · values): two rows of the reference blocks.
            let cols = n / 2 * values;
            let file = temp_file(&hand_written(&[
                ("v", &[8], 0, &[0u8; 32]),
                ("w", &[cols as u64, 2], type_id, &blocks[..2 * (n / 2) * bytes]),
            ]));
            let gguf = Gguf::open(file.path()).expect("open");
            assert!(gguf.has_tensor("w"));
            assert_eq!(gguf.tensor_shape("w"), Some(&[2, cols][..]));
            let mut names: Vec<&String> = gguf.tensor_names().collect();
            names.sort();
            assert_eq!(names, ["v", "w"]);
            let m = Mapped::from_gguf(&gguf, "w").expect("w");
            assert_eq!((m.dtype().to_string(), m.shape()), (name.to_string(), (2, cols)));
            let row = Embedding::new(m.clone()).expect("embedding").lookup(&[1]).expect("lookup");
            assert_eq!(
                row.flatten_all().expect("flat").to_vec1::<f32>().expect("vec"),
                &want[cols..2 * cols]
            );
            let x = Tensor::ones((1, cols), candle_core::DType::F32, &Device::Cpu).expect("x");
            let y = Linear::new(m).expect("linear").forward(&x).expect("forward");
            let y = y.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
            for (r, &got) in y.iter().enumerate() {
                let sum: f32 = want[r * cols..(r + 1) * cols].iter().sum();
                assert!((got - sum).abs() < 1e-3 * (1.0 + sum.abs()), "{name} row {r}: {got} vs {sum}");
            }
            let err = format!("{:#}", gguf.tensor("w").expect_err("refused"));
            assert!(err.contains(&format!("tensor w is {name}")) && !err.contains('\n'), "{err}");
        }
    }

    /// A tensor of a type streamgen cannot read is a one-line error naming the file, the
    /// tensor and the type.
    #[test]
    fn gguf_an_unreadable_type_is_one_line_naming_the_tensor() {
        // IQ2_XXS, and ggml's activation types (never weights, and not in the format table).
        for (id, name) in [(16, "IQ2_XXS"), (9, "Q8_1"), (15, "Q8_K")] {
            let file = temp_file(&hand_written(&[("blk.0.attn_q.weight", &[256, 1], id, &[0u8; 292])]));
            let err = format!("{:#}", Gguf::open(file.path()).err().expect("refused"));
            let want = format!(
                "{}: tensor blk.0.attn_q.weight is {name} (type {id}), which streamgen does not read yet",
                file.path().display()
            );
            assert_eq!(err, want);
        }
    }

    /// A hand-laid-out file whose `general.alignment` is a u64 of 64: its data starts at the
    /// next multiple of 64, and the 32 bytes before it (where alignment 32 would put the data)
    /// hold other values.
    #[test]
    fn gguf_an_alignment_of_any_integer_width_places_the_data() {
        let mut b = b"GGUF".to_vec();
        let put = |b: &mut Vec<u8>, x: &[u8]| b.extend_from_slice(x);
        put(&mut b, &3u32.to_le_bytes());
        put(&mut b, &1u64.to_le_bytes());
        put(&mut b, &1u64.to_le_bytes());
        put(&mut b, &17u64.to_le_bytes());
        put(&mut b, b"general.alignment");
        put(&mut b, &10u32.to_le_bytes()); // u64
        put(&mut b, &64u64.to_le_bytes());
        put(&mut b, &1u64.to_le_bytes());
        put(&mut b, b"t");
        put(&mut b, &1u32.to_le_bytes());
        put(&mut b, &8u64.to_le_bytes());
        put(&mut b, &0u32.to_le_bytes()); // f32
        put(&mut b, &0u64.to_le_bytes());
        // The header is 94 bytes: alignment 32 would start the data at 96, 64 starts it at 128.
        let at64 = b.len().next_multiple_of(64);
        let at32 = b.len().next_multiple_of(32);
        assert_ne!(at32, at64, "test layout: header length {}", b.len());
        b.resize(at32, 0);
        while b.len() < at64 {
            put(&mut b, &9f32.to_le_bytes());
        }
        for x in 1..=8 {
            put(&mut b, &(x as f32).to_le_bytes());
        }
        let file = temp_file(&b);
        let gguf = Gguf::open(file.path()).expect("open");
        let t = gguf.tensor("t").expect("t").dequantize(&Device::Cpu).expect("dequantize");
        assert_eq!(t.to_vec1::<f32>().expect("vec"), [1., 2., 3., 4., 5., 6., 7., 8.]);
    }
}
