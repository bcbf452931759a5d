//! Downloading from the Hub, against a real HTTP server on 127.0.0.1 ([`server`]): the first
//! run of the real test model, the cache without network, file selection, the error kinds,
//! retries, a cut-off body, and concurrent first runs. Tests call
//! `streamgen::hub::resolve_model_with` with an explicit [`HubEnv`] (endpoint, temporary cache),
//! so that parallel tests never share process environment variables.

mod server;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use server::{Content, HubServer, sha256_hex};
use streamgen::hub::{DEFAULT_MODEL, HubEnv, HubError, HubOptions, resolve_model_with};

use crate::support;

const QUIET: HubOptions = HubOptions { offline: false, progress: false, quiet: true };
const OFFLINE: HubOptions = HubOptions { offline: true, progress: false, quiet: true };

fn hub_env(endpoint: &str, home: &Path) -> HubEnv {
    HubEnv {
        endpoint: endpoint.to_string(),
        cache_dir: home.join("hub"),
        token: None,
        offline: false,
        timeout: streamgen::hub::DEFAULT_TIMEOUT,
        download_timeout: streamgen::hub::DEFAULT_TIMEOUT,
    }
}

/// The real test model and its sha256 (hashed once; it is 250 MB).
fn real_model() -> (PathBuf, String) {
    static SHA: OnceLock<String> = OnceLock::new();
    let path = support::test_model();
    let sha = SHA.get_or_init(|| sha256_file(&path)).clone();
    (path, sha)
}

fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hash");
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A small fake `.gguf` whose bytes depend on `seed` (the tests never parse it).
fn fake_gguf(seed: u8, len: usize) -> Content {
    let mut bytes = b"GGUF".to_vec();
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bytes.push(x as u8);
    }
    Content::Bytes(Arc::new(bytes))
}

fn repo_dir(home: &Path, repo: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", repo.replace('/', "--")))
}

/// The files in a repo's `blobs/` folder.
fn blobs(home: &Path, repo: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_dir(home, repo).join("blobs"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn count(requests: &[String], prefix: &str) -> usize {
    requests.iter().filter(|r| r.starts_with(prefix)).count()
}

fn hub_error(err: &anyhow::Error) -> &HubError {
    err.downcast_ref::<HubError>().unwrap_or_else(|| panic!("not a HubError: {err:#}"))
}

#[test]
#[allow(clippy::print_stderr)] // prints the measured wall times (run with --nocapture)
fn first_run_downloads_the_real_model_then_the_cache_needs_no_server() {
    let (model, sha) = real_model();
    let size = std::fs::metadata(&model).expect("model").len();
    let home = tempfile::tempdir().expect("tempdir");
    let repo = "test-org/gemma-3-270m-GGUF";
    let server = HubServer::start();
    let commit = server.add_repo(
        repo,
        vec![
            ("gemma-3-270m-Q4_K_M.gguf", Content::Disk { path: model.clone(), sha256: sha.clone() }),
            ("gemma-3-270m-Q8_0.gguf", fake_gguf(8, 1000)),
        ],
    );
    let env = hub_env(&server.url, home.path());

    let start = Instant::now();
    let path = resolve_model_with(repo, &QUIET, &env).expect("first run");
    let first = start.elapsed();

    let snapshot = repo_dir(home.path(), repo).join("snapshots").join(&commit);
    assert_eq!(path, snapshot.join("gemma-3-270m-Q4_K_M.gguf"));
    // Python's layout: a relative symlink to the blob named by the sha256, and refs/main.
    assert_eq!(std::fs::read_link(&path).expect("symlink"), Path::new("../../blobs").join(&sha));
    assert_eq!(blobs(home.path(), repo), vec![sha.clone()], "no partial or lock file among the blobs");
    assert_eq!(std::fs::read_to_string(repo_dir(home.path(), repo).join("refs/main")).expect("ref"), commit);
    assert_eq!(std::fs::metadata(&path).expect("downloaded").len(), size);
    assert_eq!(sha256_file(&path), sha);
    let gguf = streamgen::gguf::Gguf::open(&path).expect("the download is a GGUF file");
    assert_eq!(gguf.str("general.architecture").expect("architecture"), "gemma3");
    let requests = server.requests();
    assert_eq!(count(&requests, "GET /api/models/"), 1, "{requests:?}");
    assert_eq!(count(&requests, "HEAD /test-org/"), 1, "{requests:?}");
    assert_eq!(count(&requests, "GET /blobs/"), 1, "{requests:?}");

    // The second run, online but with the Hub gone: the cache alone answers.
    server.stop();
    let start = Instant::now();
    let again = resolve_model_with(repo, &QUIET, &env).expect("second run with the server stopped");
    let cached = start.elapsed();
    assert_eq!(again, path);
    let explicit = format!("{repo}/gemma-3-270m-Q4_K_M.gguf");
    assert_eq!(resolve_model_with(&explicit, &QUIET, &env).expect("explicit file"), path);
    assert_eq!(resolve_model_with(&format!("{repo}:q4_k_m"), &OFFLINE, &env).expect("offline"), path);
    eprintln!(
        "hub timing: first run {:.2} s for {} MB over loopback ({:.0} MB/s incl. sha256), cached run {:.3} ms",
        first.as_secs_f64(),
        size / 1_000_000,
        size as f64 / 1e6 / first.as_secs_f64(),
        cached.as_secs_f64() * 1e3
    );
}

#[test]
fn offline_with_an_empty_cache_names_the_repo_and_file() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo("o/r", vec![("m-Q8_0.gguf", fake_gguf(1, 100))]);
    let env = HubEnv { offline: true, ..hub_env(&server.url, home.path()) };

    let err = resolve_model_with(DEFAULT_MODEL, &QUIET, &env).expect_err("offline, empty cache");
    assert!(matches!(hub_error(&err), HubError::OfflineMissing { .. }), "{err:#}");
    let msg = format!("{err:#}");
    assert!(msg.contains("ggml-org/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q8_0.gguf"), "{msg}");
    assert!(msg.contains("offline") && msg.contains("run once online"), "{msg}");

    let err = resolve_model_with("o/r", &OFFLINE, &hub_env(&server.url, home.path())).expect_err("--offline");
    assert!(matches!(hub_error(&err), HubError::OfflineMissing { .. }), "{err:#}");
    assert!(
        format!("{err:#}").starts_with("o/r (any .gguf file) is not in the Hugging Face cache"),
        "{err:#}"
    );
    assert!(server.requests().is_empty(), "offline made requests: {:?}", server.requests());
}

#[test]
fn selects_the_file_by_preference_quant_path_and_revision() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    let q4 = fake_gguf(4, 3000);
    let Content::Bytes(q4_bytes) = &q4 else { unreachable!() };
    let q4_sha = sha256_hex(q4_bytes);
    let commit = server.add_repo(
        "o/multi",
        vec![
            ("m-Q2_K.gguf", fake_gguf(2, 2000)),
            ("m-Q4_K_M.gguf", q4),
            ("m-Q8_0.gguf", fake_gguf(8, 5000)),
            ("sub/dir/m-F16.gguf", fake_gguf(16, 7000)),
        ],
    );
    server.add_repo(
        "o/ambiguous",
        vec![("m-Q2_K.gguf", fake_gguf(2, 10)), ("m-Q3_K_S.gguf", fake_gguf(3, 10))],
    );
    server.add_repo("o/single", vec![("whatever-name.gguf", fake_gguf(9, 10))]);
    let env = hub_env(&server.url, home.path());

    let auto = resolve_model_with("o/multi", &QUIET, &env).expect("auto");
    assert!(auto.ends_with("m-Q4_K_M.gguf"), "{}", auto.display());
    assert_eq!(sha256_file(&auto), q4_sha);
    let q8 = resolve_model_with("o/multi:q8_0", &QUIET, &env).expect(":q8_0");
    assert!(q8.ends_with("m-Q8_0.gguf"), "{}", q8.display());
    assert_eq!(std::fs::metadata(&q8).expect("q8").len(), 5000);

    // A nested file at a commit: one more `..` in the link, and no ref for a commit.
    let nested = resolve_model_with(&format!("o/multi/sub/dir/m-F16.gguf@{commit}"), &QUIET, &env)
        .expect("path@commit");
    assert_eq!(std::fs::metadata(&nested).expect("nested").len(), 7000);
    assert!(std::fs::read_link(&nested).expect("link").starts_with("../../../../blobs"));
    assert!(!repo_dir(home.path(), "o/multi").join("refs").join(&commit).exists());

    let err = resolve_model_with("o/multi:Q5_K_M", &QUIET, &env).expect_err("absent quant");
    assert!(matches!(hub_error(&err), HubError::NotFound { .. }), "{err:#}");
    assert_eq!(
        format!("{err:#}"),
        "not found: o/multi:Q5_K_M (the repo has: m-Q2_K.gguf, m-Q4_K_M.gguf, m-Q8_0.gguf, sub/dir/m-F16.gguf)"
    );
    let err = resolve_model_with("o/ambiguous", &QUIET, &env).expect_err("ambiguous");
    assert!(matches!(hub_error(&err), HubError::Ambiguous { .. }), "{err:#}");
    assert!(format!("{err:#}").contains("(choices: m-Q2_K.gguf, m-Q3_K_S.gguf)"), "{err:#}");
    let single = resolve_model_with("o/single", &QUIET, &env).expect("single");
    assert!(single.ends_with("whatever-name.gguf"));

    let err = resolve_model_with("o/multi@v9", &QUIET, &env).expect_err("unknown revision");
    assert_eq!(format!("{err:#}"), "not found: revision v9 of o/multi");
}

#[test]
fn a_gated_repo_needs_the_token() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo("o/gated", vec![("m.gguf", fake_gguf(5, 500))]);
    server.gate("o/gated", "hf_secret");
    let env = hub_env(&server.url, home.path());

    let err = resolve_model_with("o/gated/m.gguf", &QUIET, &env).expect_err("no token");
    assert!(matches!(hub_error(&err), HubError::Gated { .. }), "{err:#}");
    assert_eq!(
        format!("{err:#}"),
        "o/gated/m.gguf: gated or private: accept its terms on the Hub and set HF_TOKEN"
    );
    let err = resolve_model_with("o/gated", &QUIET, &env).expect_err("listing without token");
    assert!(matches!(hub_error(&err), HubError::Gated { .. }), "{err:#}");

    let env = HubEnv { token: Some("hf_secret".into()), ..env };
    let path = resolve_model_with("o/gated", &QUIET, &env).expect("with the token");
    assert_eq!(std::fs::metadata(path).expect("file").len(), 500);
}

#[test]
fn not_found_lists_the_repo_gguf_files() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo("o/r", vec![("a-Q4_K_M.gguf", fake_gguf(1, 10)), ("b-Q8_0.gguf", fake_gguf(2, 10))]);
    let env = hub_env(&server.url, home.path());

    let err = resolve_model_with("o/r/c.gguf", &QUIET, &env).expect_err("missing file");
    assert!(matches!(hub_error(&err), HubError::NotFound { .. }), "{err:#}");
    assert_eq!(format!("{err:#}"), "not found: o/r/c.gguf (the repo has: a-Q4_K_M.gguf, b-Q8_0.gguf)");

    let err = resolve_model_with("o/missing", &QUIET, &env).expect_err("missing repo");
    assert!(matches!(hub_error(&err), HubError::NotFound { .. }), "{err:#}");
    assert!(format!("{err:#}").starts_with("not found: repo o/missing on http://127.0.0.1:"), "{err:#}");
    assert!(!repo_dir(home.path(), "o/r").join("snapshots").exists());
}

#[test]
fn server_errors_are_retried_then_reported() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo("o/r", vec![("m.gguf", fake_gguf(7, 4000))]);
    let env = hub_env(&server.url, home.path());

    server.fail_next(&[500, 503]);
    let path = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect("succeeds on the third try");
    assert_eq!(std::fs::metadata(path).expect("file").len(), 4000);
    assert_eq!(count(&server.requests(), "HEAD /o/r/resolve/main/m.gguf"), 3, "{:?}", server.requests());

    server.fail_next(&[500; 5]);
    let err = resolve_model_with("o/r:Q8_0", &QUIET, &env).expect_err("five 500s");
    let msg = format!("{err:#}");
    assert!(msg.starts_with("gave up after 5 attempts: ") && msg.contains("HTTP 500"), "{msg}");
}

/// A server that accepts connections and never answers: each request waits the Hub timeout
/// (`HF_HUB_ETAG_TIMEOUT`, here 0.3 s), so the whole run is bounded by the retries, and the
/// error names the Hub.
#[test]
fn a_hub_that_accepts_and_never_answers_is_given_up_on() {
    let home = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // keep it open, say nothing
        }
    });
    let env = HubEnv { timeout: Duration::from_millis(300), ..hub_env(&endpoint, home.path()) };
    let err = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect_err("silent server");
    let msg = format!("{err:#}");
    assert!(msg.contains("gave up after 5 attempts") && msg.contains(&endpoint), "{msg}");
    let vars = |name: &str| match name {
        "HF_HUB_ETAG_TIMEOUT" => Some("2.5".into()),
        "HF_HUB_DOWNLOAD_TIMEOUT" => Some("nonsense".into()),
        _ => None,
    };
    let env = HubEnv::from_vars(vars);
    assert_eq!((env.timeout, env.download_timeout), (Duration::from_millis(2500), Duration::from_secs(10)));
}

#[test]
fn a_token_that_is_not_a_header_value_is_named_as_such() {
    let home = tempfile::tempdir().expect("tempdir");
    let env = HubEnv { token: Some("hf_abc\x1b[2Jdef".into()), ..hub_env("http://127.0.0.1:9", home.path()) };
    let err = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect_err("bad token");
    let msg = format!("{err:#}");
    assert!(msg.contains("token") && msg.contains("not a valid HTTP header value"), "{msg}");
    assert!(!msg.contains("cannot reach"), "{msg}");
}

#[test]
fn a_refused_connection_says_the_hub_is_unreachable() {
    let home = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let env = hub_env(&endpoint, home.path());

    let err = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect_err("refused");
    assert!(matches!(hub_error(&err), HubError::Unreachable { .. }), "{err:#}");
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with(&format!(
            "cannot reach {endpoint}: check the network, or use --offline or a local path"
        )),
        "{msg}"
    );
    // A refused connection is not transient: no retries.
    assert!(!msg.contains("gave up after"), "{msg}");
}

#[test]
fn a_body_cut_off_mid_file_leaves_no_file_and_the_next_run_resumes() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    let content = fake_gguf(3, 2_000_000);
    let Content::Bytes(bytes) = &content else { unreachable!() };
    let sha = sha256_hex(bytes);
    server.add_repo("o/r", vec![("m.gguf", content)]);
    let env = hub_env(&server.url, home.path());

    server.cut_at(Some(700_000));
    let err = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect_err("cut off");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("download stopped at byte 700000 of 2000000") && msg.contains("run again to resume"),
        "{msg}"
    );
    assert_eq!(blobs(home.path(), "o/r"), vec![format!("{sha}.incomplete")], "only the partial file");
    let partial = repo_dir(home.path(), "o/r").join("blobs").join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&partial).expect("partial").len(), 700_000);
    assert!(!repo_dir(home.path(), "o/r").join("snapshots").exists());

    server.cut_at(None);
    let path = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect("resumes");
    assert_eq!(sha256_file(&path), sha);
    assert_eq!(blobs(home.path(), "o/r"), vec![sha.clone()]);
    assert!(server.requests().iter().any(|r| r.ends_with("bytes=700000-")), "{:?}", server.requests());
}

#[test]
fn a_corrupt_body_is_rejected_by_its_sha256() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo("o/r", vec![("m.gguf", fake_gguf(6, 300_000))]);
    let env = hub_env(&server.url, home.path());

    server.flip_byte(Some(123_456));
    let err = resolve_model_with("o/r/m.gguf", &QUIET, &env).expect_err("corrupt");
    assert!(format!("{err:#}").contains("the download is corrupt (its sha256 is"), "{err:#}");
    assert!(blobs(home.path(), "o/r").is_empty(), "{:?}", blobs(home.path(), "o/r"));

    server.flip_byte(None);
    resolve_model_with("o/r/m.gguf", &QUIET, &env).expect("clean download");
}

#[test]
fn concurrent_first_runs_share_one_download() {
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    let content = fake_gguf(11, 4_000_000);
    let Content::Bytes(bytes) = &content else { unreachable!() };
    let sha = sha256_hex(bytes);
    server.add_repo("o/r", vec![("m-Q4_K_M.gguf", content), ("m-Q8_0.gguf", fake_gguf(12, 10))]);
    // About 0.3 s per download, so that the two runs overlap.
    server.slow(Some(Duration::from_millis(5)));
    let env = hub_env(&server.url, home.path());

    let runs: Vec<_> = (0..2)
        .map(|_| {
            let env = env.clone();
            std::thread::spawn(move || resolve_model_with("o/r", &QUIET, &env))
        })
        .collect();
    let paths: Vec<PathBuf> =
        runs.into_iter().map(|t| t.join().expect("thread").expect("concurrent run")).collect();
    assert_eq!(paths[0], paths[1]);
    assert_eq!(sha256_file(&paths[0]), sha);
    assert_eq!(blobs(home.path(), "o/r"), vec![sha]);
    // The second run waited on the lock and found the blob: one transfer in all.
    assert_eq!(count(&server.requests(), "GET /blobs/"), 1, "{:?}", server.requests());
}

#[test]
#[allow(clippy::print_stderr)] // prints the measured wall times (run with --nocapture)
fn the_executable_downloads_on_first_run_and_generates_then_runs_from_the_cache() {
    let (model, sha) = real_model();
    let home = tempfile::tempdir().expect("tempdir");
    let server = HubServer::start();
    server.add_repo(
        "test-org/tiny-GGUF",
        vec![("tiny-Q4_K_M.gguf", Content::Disk { path: model, sha256: sha })],
    );
    let run = |endpoint: &str| {
        support::streamgen()
            .home(home.path())
            .env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", endpoint)
            .args(["-m", "test-org/tiny-GGUF", "-n", "5", "--temperature", "0", "The capital of France is"])
            .run()
    };
    let check = |out: &support::Done| {
        out.assert_success();
        let text = out.stdout();
        assert!(!text.trim().is_empty(), "no text generated");
        // stderr is not a terminal here: no progress bar.
        assert!(!out.stderr().contains("downloading"), "{}", out.stderr());
        text
    };
    let start = Instant::now();
    let first = check(&run(&server.url));
    let first_time = start.elapsed();
    assert_eq!(count(&server.requests(), "GET /blobs/"), 1, "{:?}", server.requests());
    let url = server.url.clone();
    server.stop();
    let start = Instant::now();
    let second = check(&run(&url));
    eprintln!(
        "hub timing: `streamgen -m test-org/tiny-GGUF -n 5` first run {:.2} s, cached run {:.2} s (server stopped)",
        first_time.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(first, second, "greedy output from the downloaded and the cached file");
}

/// A password in `HF_ENDPOINT` never reaches the error line (nor anything else printed).
#[test]
fn a_password_in_the_hub_endpoint_is_never_printed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let out = support::streamgen()
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", format!("http://user:s3cret@{addr}"))
        .args(["-m", "o/r/m.gguf", "hi"])
        .run();
    out.assert_exit(1);
    let err = out.stderr();
    assert!(err.contains("cannot reach") && err.contains(&format!("http://***@{addr}")), "{err}");
    assert!(!err.contains("s3cret"), "the password was printed: {err}");
}
