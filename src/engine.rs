//! A model file opened for the local engine: its weights, tokenizer and chat template, loaded
//! together. The decoding itself is [`crate::generate`]'s; the backend that serves requests
//! with it is [`crate::backend::local`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use crate::chat::ChatTemplate;
use crate::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A model file opened and ready: weights, tokenizer and the file's chat template.
pub struct Loaded {
    pub path: PathBuf,
    pub model: Model,
    /// Shared, so that a grammar's vocabulary ([`crate::constrain`]) tokenizes with it too.
    pub tokenizer: Arc<Tokenizer>,
    /// The file's own chat template; an error when it does not compile, which only matters
    /// when it is used (not with `--raw` or `--chat-template`, which its message recommends).
    pub chat_template: Result<Option<ChatTemplate>>,
}

/// Opens a local GGUF file and loads its tokenizer, chat template and weights.
pub fn load(path: PathBuf) -> Result<Loaded> {
    let mut gguf = Gguf::open(&path)?;
    // The tokenizer (a quarter of a million strings) and the weights (mapping, checking,
    // sizing) are independent: build them on two threads, as both are on the way to the first
    // token.
    let (tokenizer, model) = std::thread::scope(|scope| {
        let weights = scope.spawn(|| Model::load(&gguf));
        let tokenizer = Tokenizer::from_gguf(&gguf);
        let model = weights.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (tokenizer, model)
    });
    // An unsupported architecture is the clearer error, so the model's comes first.
    let (model, tokenizer) = (model?, tokenizer?);
    let chat_template = ChatTemplate::from_gguf(&gguf);
    gguf.release_tokenizer_metadata();
    release_freed_memory();
    Ok(Loaded { path, model, tokenizer: Arc::new(tokenizer), chat_template })
}

/// A model file's vocabulary and chat template, without its weights: what `--count-tokens`
/// and `--tokenize` need.
pub struct Vocabulary {
    pub tokenizer: Tokenizer,
    /// The file's own chat template, as [`Loaded::chat_template`].
    pub chat_template: Result<Option<ChatTemplate>>,
    /// The model's context length, in tokens.
    pub context_length: usize,
}

/// Opens a local GGUF file and reads its tokenizer and chat template only (its metadata; no
/// weight is read).
pub fn load_vocabulary(path: &Path) -> Result<Vocabulary> {
    let gguf = Gguf::open(path)?;
    let context_length = crate::model::Config::from_gguf(&gguf)?.context_length;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let chat_template = ChatTemplate::from_gguf(&gguf);
    Ok(Vocabulary { tokenizer, chat_template, context_length })
}

/// Hands memory freed during loading (a quarter of a million small metadata strings) back to
/// the system. glibc keeps small freed blocks in its heap, where they would still count
/// towards the process's memory while the model runs. (How the allocator keeps memory from
/// then on is the executable's choice: see `main.rs`.)
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
