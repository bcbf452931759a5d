//! The generated documentation: the shell completions in `completions/` and the man page
//! `man/streamgen.1`, both rendered from the clap command in `src/cli.rs` and committed. A test
//! fails when a committed file differs from what the current command generates, and names the
//! command that rewrites them ([`REGENERATE`]). Also checks `--help`, `--version` and that the
//! bash completion script parses and completes.
//!
//! The generator lives here, not in a `build.rs` or an xtask, because `clap_complete` and
//! `clap_mangen` are only dev-dependencies and the staleness check needs the generator anyway.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::CommandFactory;
use clap_complete::{Generator, Shell};
use clap_mangen::roff::{Roff, bold, roman};
use streamgen::cli::Cli;
use streamgen::env;

use crate::support;

/// Set to `1` to rewrite the committed files instead of failing when they are stale.
const REGENERATE_VAR: &str = "STREAMGEN_REGENERATE_DOCS";
/// What a stale-file failure tells the developer to run, from the repository root.
const REGENERATE: &str = "STREAMGEN_REGENERATE_DOCS=1 cargo test --test cli docs";

const BIN: &str = "streamgen";
const SHELLS: [Shell; 5] = [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::Elvish, Shell::PowerShell];

/// Every generated file: its path relative to the repository root, and its contents.
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = SHELLS
        .iter()
        .map(|&shell| (Path::new("completions").join(shell.file_name(BIN)), completion(shell)))
        .collect();
    files.push((PathBuf::from("man/streamgen.1"), man_page(Cli::command())));
    files
}

/// The completion script for one shell (bash `streamgen.bash`, zsh `_streamgen`, fish
/// `streamgen.fish`, elvish `streamgen.elv`, PowerShell `_streamgen.ps1`).
fn completion(shell: Shell) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buf);
    buf
}

/// Man sections that the after-help text may supply, in the order man-pages(7) puts them.
/// Any other after-help heading (say `Input:`) becomes a subsection of DESCRIPTION.
const MAN_SECTIONS: [&str; 6] = ["EXIT STATUS", "ENVIRONMENT", "FILES", "NOTES", "EXAMPLES", "SEE ALSO"];

/// The man section an after-help heading belongs to, if it is one of [`MAN_SECTIONS`].
fn man_section(heading: &str) -> Option<&'static str> {
    match heading.to_ascii_lowercase().as_str() {
        "exit status" | "exit codes" | "exit code" => Some("EXIT STATUS"),
        "environment" | "environment variables" => Some("ENVIRONMENT"),
        "files" => Some("FILES"),
        "notes" => Some("NOTES"),
        "examples" | "example" => Some("EXAMPLES"),
        "see also" => Some("SEE ALSO"),
        _ => None,
    }
}

/// One `Heading:` block of the after-help text, its body lines as written (indentation kept).
struct HelpBlock<'a> {
    heading: &'a str,
    lines: Vec<&'a str>,
}

/// Splits the after-help text into the lines before the first heading and the `Heading:`
/// blocks. A heading is an unindented line ending in a colon, which is how `--help` shows them.
fn split_after_help(text: &str) -> (Vec<&str>, Vec<HelpBlock<'_>>) {
    let mut intro = Vec::new();
    let mut blocks: Vec<HelpBlock<'_>> = Vec::new();
    for line in text.lines() {
        let is_heading = !line.starts_with(char::is_whitespace) && line.trim_end().ends_with(':');
        if is_heading {
            let heading = line.trim_end().trim_end_matches(':');
            blocks.push(HelpBlock { heading, lines: Vec::new() });
        } else if let Some(block) = blocks.last_mut() {
            block.lines.push(line);
        } else {
            intro.push(line);
        }
    }
    (intro, blocks)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Splits `  TERM   description` at the first run of two or more spaces, the way clap and
/// hand-written help align a list.
fn split_term(line: &str) -> Option<(&str, &str)> {
    let body = line.trim_start();
    let gap = body.find("  ")?;
    Some((&body[..gap], body[gap..].trim_start()))
}

/// Renders a block body into `roff`: `EXAMPLES` verbatim (commands must survive exactly), a
/// block whose every line at the base indentation reads `TERM  description` as a tagged list
/// (`.TP`, terms in bold), anything else as filled prose with blank lines between paragraphs.
fn render_body(roff: &mut Roff, lines: &[&str], verbatim: bool) {
    // Trailing blank lines would render as stray vertical space.
    let end = lines.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1);
    let lines = &lines[..end];
    let base = lines.iter().filter(|l| !l.trim().is_empty()).map(|l| indent(l)).min().unwrap_or(0);

    if verbatim {
        roff.control("RS", ["4"]).control("nf", []);
        for line in lines {
            roff.text([roman(line.get(base..).unwrap_or("").trim_end())]);
        }
        roff.control("fi", []).control("RE", []);
        return;
    }

    let is_list =
        lines.iter().filter(|l| !l.trim().is_empty() && indent(l) == base).all(|l| split_term(l).is_some());
    if is_list && !lines.is_empty() {
        for line in lines.iter().filter(|l| !l.trim().is_empty()) {
            // A deeper-indented line continues the previous item's description.
            match split_term(line).filter(|_| indent(line) == base) {
                Some((term, description)) => {
                    roff.control("TP", []);
                    // `HF_HOME, HF_TOKEN   ...`: each name in bold, the commas not.
                    let mut header = Vec::new();
                    for (i, name) in term.split(", ").enumerate() {
                        if i > 0 {
                            header.push(roman(", "));
                        }
                        header.push(bold(name));
                    }
                    roff.text(header);
                    roff.text([roman(description)]);
                }
                None => {
                    roff.text([roman(line.trim())]);
                }
            }
        }
        return;
    }

    let mut pending_break = false;
    for line in lines {
        if line.trim().is_empty() {
            pending_break = true;
        } else {
            if pending_break {
                roff.control("PP", []);
                pending_break = false;
            }
            roff.text([roman(line.trim())]);
        }
    }
}

/// The man page. clap_mangen's own `render` puts the whole after-help text into an `EXTRA`
/// section, line by line, so the exit codes, environment and examples would run together as
/// filled text under a heading no reader looks for. Instead this takes clap_mangen's pieces
/// (name, description, options) and renders each `Heading:` block of the after-help text as a
/// proper section: EXIT STATUS, ENVIRONMENT and EXAMPLES where man-pages(7) puts them.
fn man_page(cmd: clap::Command) -> Vec<u8> {
    let after_help = cmd.get_after_long_help().or_else(|| cmd.get_after_help()).map(|s| s.to_string());
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim().strip_prefix("Usage:").unwrap_or(&usage).trim_start();
    let usage = usage.strip_prefix(BIN).unwrap_or(usage).trim().to_owned();
    let has_author = cmd.get_author().is_some();
    let man = clap_mangen::Man::new(cmd);

    // Each `render_*` call writes roff's two-line apostrophe preamble first; keep one copy.
    let preamble = Roff::new().render();
    let mut page = preamble.clone();
    let mut piece = |render: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut buf = Vec::new();
        render(&mut buf).expect("rendering into a Vec cannot fail");
        let text = String::from_utf8(buf).expect("roff output is UTF-8");
        page.push_str(text.strip_prefix(&preamble).unwrap_or(&text));
    };

    // Written here rather than by `render_title`: clap_mangen writes an empty date as nothing,
    // not as "", so groff would shift the source ("streamgen 0.1.0") into the date's place.
    piece(&|w| writeln!(w, ".TH STREAMGEN 1 \"\" \"{BIN} {version}\" \"User Commands\""));
    piece(&|w| man.render_name_section(w));
    // clap_mangen's synopsis lists every flag without its value (`[-m|--model]`) and drops the
    // `...` of a repeated PROMPT; clap's own usage line (`[OPTIONS] [PROMPT]...`) is right and
    // matches `--help`, and the options are listed below anyway.
    let mut synopsis = Roff::new();
    synopsis.control("SH", ["SYNOPSIS"]).text([bold(BIN), roman(format!(" {usage}"))]);
    let synopsis = synopsis.render();
    piece(&|w| w.write_all(synopsis.as_bytes()));
    piece(&|w| man.render_description_section(w));

    let text = after_help.unwrap_or_default();
    let (intro, blocks) = split_after_help(&text);
    let mut extra = Roff::new();
    if intro.iter().any(|l| !l.trim().is_empty()) {
        extra.control("PP", []);
        render_body(&mut extra, &intro, false);
    }
    for block in blocks.iter().filter(|b| man_section(b.heading).is_none()) {
        extra.control("SS", [block.heading]);
        render_body(&mut extra, &block.lines, false);
    }
    let description_tail = extra.render();
    piece(&|w| w.write_all(description_tail.as_bytes()));

    piece(&|w| man.render_options_section(w));

    let mut sections = Roff::new();
    for name in MAN_SECTIONS {
        for block in blocks.iter().filter(|b| man_section(b.heading) == Some(name)) {
            sections.control("SH", [name]);
            render_body(&mut sections, &block.lines, name == "EXAMPLES");
        }
    }
    let sections = sections.render();
    piece(&|w| w.write_all(sections.as_bytes()));

    // No VERSION section: clap_mangen's says "v0.1.0", and the footer already reads
    // "streamgen 0.1.0".
    if has_author {
        piece(&|w| man.render_authors_section(w));
    }
    page.into_bytes()
}

/// The line number and both versions of the first line where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return "only line endings differ".to_owned(),
            (x, y) if x != y => {
                return format!("line {n}: committed {x:?}, generated {y:?}");
            }
            _ => {}
        }
    }
    unreachable!()
}

#[test]
fn committed_docs_are_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let regenerate = std::env::var_os(REGENERATE_VAR).is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (rel, contents) in generated() {
        let path = root.join(&rel);
        let committed = std::fs::read(&path).ok();
        if committed.as_deref() == Some(&contents[..]) {
            continue;
        }
        if regenerate {
            let dir = path.parent().expect("generated files live in a directory");
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            std::fs::write(&path, &contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            eprintln!("docs: rewrote {}", rel.display());
        } else {
            let why = match &committed {
                None => "missing".to_owned(),
                Some(old) => first_difference(old, &contents),
            };
            stale.push(format!("  {}: {why}", rel.display()));
        }
    }
    assert!(
        stale.is_empty(),
        "the committed completions or man page differ from what the clap command in src/cli.rs \
         generates:\n{}\nregenerate them with\n  {REGENERATE}\nand commit the result",
        stale.join("\n")
    );
}

#[test]
fn man_page_has_exit_status_environment_and_examples() {
    let page = String::from_utf8(man_page(Cli::command())).expect("the man page is UTF-8");
    for heading in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH MODEL",
        ".SH SAMPLING",
        ".SH OUTPUT",
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
        ".SH EXAMPLES",
    ] {
        assert!(page.contains(&format!("\n{heading}\n")), "the man page lacks {heading}:\n{page}");
    }
    assert!(
        page.contains("\n\\fBstreamgen\\fR [OPTIONS] [PROMPT]...\n"),
        "synopsis is not the usage line:\n{page}"
    );
    assert!(!page.contains(".SH EXTRA"), "the after-help text leaked into an EXTRA section:\n{page}");
    assert_eq!(page.matches(".ds Aq").count(), 2, "the apostrophe preamble (two lines) is repeated");

    // Each exit code is an item of EXIT STATUS, each variable an item of ENVIRONMENT, and the
    // examples sit verbatim in EXAMPLES.
    let section = |name: &str| {
        let start = page.find(&format!("\n.SH {name}\n")).expect("section checked above");
        let rest = &page[start + 1..];
        let end = rest[4..].find("\n.SH ").map_or(rest.len(), |e| e + 5);
        rest[..end].to_owned()
    };
    let exit = section("\"EXIT STATUS\"");
    for code in ["0", "1", "2", "130"] {
        assert!(exit.contains(&format!(".TP\n\\fB{code}\\fR\n")), "exit code {code} is not an item:\n{exit}");
    }
    let environment = section("ENVIRONMENT");
    for var in [env::MODEL, env::hf::HUB_OFFLINE, env::NO_COLOR, env::hf::HOME, env::hf::TOKEN] {
        assert!(
            environment.contains(&format!("\\fB{var}\\fR")),
            "{var} is not in ENVIRONMENT:\n{environment}"
        );
    }
    let examples = section("EXAMPLES");
    assert!(
        examples.contains("\n.nf\n") && examples.contains("\n.fi\n"),
        "examples are not verbatim:\n{examples}"
    );
    assert!(examples.contains("streamgen \\-m model.gguf"), "no example command:\n{examples}");

    // Every option is documented; the escaped dash is how roff spells a literal hyphen.
    for arg in Cli::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            let spelled = format!("\\fB\\-\\-{}\\fR", long.replace('-', "\\-"));
            assert!(page.contains(&spelled), "--{long} is missing from the man page");
        }
    }
    assert!(
        page.contains("\\fBSTREAMGEN_MODEL\\fR environment variable"),
        "--model does not name its environment variable (clap_mangen's `env` feature)"
    );
}

#[test]
fn help_lists_groups_exit_codes_and_environment() {
    let out = support::streamgen().arg("--help").run();
    out.assert_success();
    let stdout = out.stdout();
    assert!(out.stderr().is_empty(), "--help wrote to stderr: {}", out.stderr());

    for heading in ["Model:", "Sampling:", "Output:", "Exit status:", "Environment:", "Examples:"] {
        assert!(stdout.lines().any(|l| l == heading), "--help has no {heading:?} heading:\n{stdout}");
    }
    // The exit codes as a list: each line starts with its code.
    for (code, word) in [("0", "success"), ("1", "error"), ("2", "usage"), ("130", "interrupted")] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(&format!("{code} ")) && l.contains(word)),
            "--help does not list exit code {code} ({word}):\n{stdout}"
        );
    }
    for var in [
        env::MODEL,
        env::hf::HUB_OFFLINE,
        env::NO_COLOR,
        env::hf::HOME,
        env::hf::HUB_CACHE,
        env::hf::ENDPOINT,
        env::hf::TOKEN,
    ] {
        assert!(stdout.contains(var), "--help does not mention {var}:\n{stdout}");
    }
}

#[test]
fn version_prints_name_and_version() {
    let out = support::streamgen().arg("--version").run();
    out.assert_success();
    assert_eq!(out.stdout(), format!("streamgen {}\n", env!("CARGO_PKG_VERSION")));
    assert!(out.stderr().is_empty(), "--version wrote to stderr");
}

/// Runs a bash script with the generated bash completion sourced first; returns its stdout.
fn bash_with_completion(script: &str) -> String {
    let completion = String::from_utf8(completion(Shell::Bash)).expect("the bash script is UTF-8");
    let mut child = Command::new("bash")
        .args(["--norc", "--noprofile", "-s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running bash (the completion tests need bash on PATH)");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(format!("{completion}\n{script}\n").as_bytes()).expect("writing to bash");
    drop(stdin);
    let out = child.wait_with_output().expect("waiting for bash");
    assert!(out.status.success(), "bash failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bash_completion_parses_and_completes() {
    let mut child = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running bash -n (the completion tests need bash on PATH)");
    child.stdin.take().expect("piped stdin").write_all(&completion(Shell::Bash)).expect("writing to bash");
    let out = child.wait_with_output().expect("waiting for bash -n");
    assert!(
        out.status.success(),
        "bash -n rejects the completion script: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The script registers itself for `streamgen` and completes long options by prefix.
    let registered = bash_with_completion("complete -p streamgen");
    assert!(
        registered.contains("_streamgen") && registered.trim_end().ends_with(" streamgen"),
        "{registered}"
    );
    let words = bash_with_completion(
        "COMP_WORDS=(streamgen --te); COMP_CWORD=1; COMP_LINE='streamgen --te'; COMP_POINT=${#COMP_LINE}
         _streamgen streamgen --te streamgen; printf '%s\\n' \"${COMPREPLY[@]}\"",
    );
    assert_eq!(words.lines().collect::<Vec<_>>(), ["--temperature"], "completing `streamgen --te`");
}

#[test]
fn after_help_blocks_become_man_sections() {
    // Shapes the current help text does not use yet: an intro paragraph, a list item whose
    // description wraps onto a deeper-indented line, prose in two paragraphs, a comment among
    // the examples, and headings in another order than the man page's.
    let cmd = clap::Command::new(BIN).version("9.9").about("Does things").after_long_help(
        "Read the manual.\n\n\
         Examples:\n  # a comment\n  streamgen --x 'y'\n\n\
         Exit codes:\n  0    fine\n  7    broken, which takes\n       two lines\n\n\
         Caveats:\n  First paragraph,\n  still first.\n\n  Second paragraph.\n",
    );
    let page = String::from_utf8(man_page(cmd)).expect("the man page is UTF-8");
    let expected = [
        ".SH DESCRIPTION\nDoes things\n.PP\nRead the manual.\n.SS Caveats\nFirst paragraph,\nstill first.\n.PP\nSecond paragraph.\n",
        ".SH \"EXIT STATUS\"\n.TP\n\\fB0\\fR\nfine\n.TP\n\\fB7\\fR\nbroken, which takes\ntwo lines\n.SH EXAMPLES\n",
        ".RS 4\n.nf\n# a comment\nstreamgen \\-\\-x \\*(Aqy\\*(Aq\n.fi\n.RE\n",
    ];
    for part in expected {
        assert!(page.contains(part), "expected\n{part}\nin\n{page}");
    }
    assert!(page.starts_with(
        ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n.TH STREAMGEN 1 \"\" \"streamgen 9.9\" \"User Commands\"\n"
    ));
}
