//! Model specs: parsing `-m/--model` into a local path or a Hub repo, revision and file
//! choice, and picking a repo's `.gguf` file by quantization. No I/O beyond checking whether
//! a local path exists.

use std::path::{Path, PathBuf};

use super::HubError;
use super::env::expand_tilde;

/// The GGUF quantizations picked from a repo with several files, in order: the common
/// llama.cpp default, then the near-lossless one.
const PREFERRED_QUANTS: [&str; 2] = ["Q4_K_M", "Q8_0"];

/// A parsed `-m/--model` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// An existing local file.
    Local(PathBuf),
    /// A file in a Hub repo.
    Hub(HubSpec),
}

/// A model on the Hub: `owner/repo[:QUANT | /FILE.gguf][@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// `owner/repo`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// Which `.gguf` file of the repo.
    pub file: FileChoice,
}

/// How the `.gguf` file of a repo is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChoice {
    /// `owner/repo`: the only `.gguf`, else Q4_K_M, else Q8_0.
    Auto,
    /// `owner/repo:QUANT` (case-insensitive), llama.cpp's `-hf` convention.
    Quant(String),
    /// `owner/repo/path/file.gguf`.
    Path(String),
}

impl std::fmt::Display for HubSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repo)?;
        match &self.file {
            FileChoice::Auto => {}
            FileChoice::Quant(q) => write!(f, ":{q}")?,
            FileChoice::Path(p) => write!(f, "/{p}")?,
        }
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

impl ModelSpec {
    /// Parses a model spec. An existing file always wins; a spec that looks like a path
    /// (`/`, `./`, `../`, `~`, or a `.gguf` name without the `owner/repo/` shape) and does not
    /// exist is [`HubError::LocalMissing`], never a Hub lookup.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let bad = |why: &str| HubError::BadSpec { spec: spec.to_string(), why: why.to_string() };
        if spec.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        let home = std::env::var_os(crate::env::HOME).map(PathBuf::from);
        let path = expand_tilde(Path::new(spec), home.as_deref());
        if path.is_file() {
            return Ok(Self::Local(path));
        }
        if path.is_dir() {
            return Err(HubError::BadSpec {
                spec: spec.to_string(),
                why: "it is a directory, not a .gguf file".to_string(),
            });
        }
        let looks_local = ["/", "./", "../", "~"].iter().any(|p| spec.starts_with(p))
            || spec == "."
            || spec == ".."
            || (ends_with_gguf(spec) && spec.split('/').count() < 3);
        if looks_local {
            return Err(HubError::LocalMissing(path));
        }
        parse_hub(spec).map(Self::Hub).map_err(|why| bad(&why))
    }
}

fn parse_hub(spec: &str) -> Result<HubSpec, String> {
    let (head, mut revision) = match spec.split_once('@') {
        Some((head, rev)) => (head, Some(rev)),
        None => (spec, None),
    };
    // Accept both owner/repo:QUANT@REV and owner/repo@REV:QUANT (git refs cannot hold ':').
    let (head, mut quant) = match head.split_once(':') {
        Some((head, q)) => (head, Some(q)),
        None => (head, None),
    };
    if quant.is_none()
        && let Some((rev, q)) = revision.and_then(|r| r.split_once(':'))
    {
        revision = Some(rev);
        quant = Some(q);
    }
    let parts: Vec<&str> = head.split('/').collect();
    if parts.len() < 2 {
        return Err("it is not an existing file and has no owner/repo".to_string());
    }
    for name in &parts[..2] {
        let ok = !name.is_empty()
            && *name != "."
            && *name != ".."
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(format!("{name:?} is not a valid Hub owner or repo name"));
        }
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let file = if parts.len() == 2 {
        match quant {
            Some(q) if q.is_empty() || !q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                return Err(format!("{q:?} is not a quantization name such as Q4_K_M"));
            }
            Some(q) => FileChoice::Quant(q.to_string()),
            None => FileChoice::Auto,
        }
    } else {
        if quant.is_some() {
            return Err(":QUANT goes with owner/repo, not with a file name".to_string());
        }
        if parts[2..].iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err("the file path has an empty, . or .. component".to_string());
        }
        let file = parts[2..].join("/");
        if !ends_with_gguf(&file) {
            return Err(format!("{file} is not a .gguf file"));
        }
        FileChoice::Path(file)
    };
    let revision = match revision {
        None => "main".to_string(),
        Some(rev) => {
            let ok = !rev.is_empty()
                && rev.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
                && rev.chars().all(|c| c.is_ascii_graphic() && !"\\?#%".contains(c));
            if !ok {
                return Err(format!("{rev:?} is not a valid revision"));
            }
            rev.to_string()
        }
    };
    Ok(HubSpec { repo, revision, file })
}

pub(super) fn ends_with_gguf(name: &str) -> bool {
    name.len() >= 5 && name.get(name.len() - 5..).is_some_and(|e| e.eq_ignore_ascii_case(".gguf"))
}

/// True when `file`'s name ends in `-QUANT.gguf` (or `.QUANT`/`_QUANT`), case-insensitively:
/// `Q4_K` matches `x-Q4_K.gguf` but not `x-Q4_K_M.gguf`.
pub(super) fn quant_matches(file: &str, quant: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    let quant = quant.to_ascii_lowercase();
    stem == quant || stem.strip_suffix(quant.as_str()).is_some_and(|rest| rest.ends_with(['-', '.', '_']))
}

/// Picks the `.gguf` file of `repo` among `files` (repo-relative paths; other files are
/// ignored). With `quant`, the one file of that quantization; without, the only `.gguf`
/// file, else Q4_K_M, else Q8_0. Multimodal projectors (`mmproj`) are never picked, as in
/// llama.cpp.
pub fn select_gguf(repo: &str, files: &[String], quant: Option<&str>) -> Result<String, HubError> {
    let ggufs: Vec<String> = files.iter().filter(|f| ends_with_gguf(f)).cloned().collect();
    let models: Vec<&String> = ggufs.iter().filter(|f| !f.to_ascii_lowercase().contains("mmproj")).collect();
    let pick = |q: &str| -> Vec<&String> { models.iter().copied().filter(|f| quant_matches(f, q)).collect() };
    let one = |matches: Vec<&String>| -> Result<String, HubError> {
        match matches.as_slice() {
            [only] => Ok((*only).clone()),
            _ => Err(HubError::Ambiguous {
                repo: repo.to_string(),
                choices: matches.into_iter().cloned().collect(),
            }),
        }
    };
    if let Some(q) = quant {
        let matches = pick(q);
        if matches.is_empty() {
            return Err(HubError::NotFound { what: format!("{repo}:{q}"), available: Some(ggufs) });
        }
        return one(matches);
    }
    match models.as_slice() {
        [] => Err(HubError::NotFound { what: format!("a .gguf model in {repo}"), available: Some(ggufs) }),
        [only] => Ok((*only).clone()),
        _ => {
            for q in PREFERRED_QUANTS {
                let matches = pick(q);
                if !matches.is_empty() {
                    return one(matches);
                }
            }
            one(models.clone())
        }
    }
}
