//! Any bytes as a GGUF file: the header reader returns an error or a header whose every
//! tensor lies inside the bytes; never a panic, an overflow or an allocation the bytes do not
//! back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamgen::gguf::header;

fuzz_target!(|data: &[u8]| {
    // Most inputs should get past the magic; the mutator finds the rest of the layout.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(data);
    for bytes in [data, &bytes[..]] {
        if let Ok(content) = header::parse(bytes) {
            for (name, info) in &content.tensor_infos {
                let size =
                    info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                let end = content.tensor_data_offset + info.offset + size as u64;
                assert!(end <= bytes.len() as u64, "tensor {name} ends at {end}, past {} bytes", bytes.len());
            }
        }
    }
});
