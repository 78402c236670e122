//! Compile-time misuse checks. Each file in `trybuild/` is one mistake a user can make with
//! `#[multiproc::task]`, `#[multiproc::main]` or the pool, named after the mistake, next to the
//! `.stderr` the compiler must print for it; `trybuild/pass/` holds shapes that must compile.
//!
//! The `.stderr` files are the compiler's exact output, and rustc rewords its own messages
//! from one release to the next, so this test runs only on the toolchain they were recorded
//! with ([`RECORDED_WITH`]); on any other it prints a note and passes. To move to a new
//! toolchain, regenerate them with `TRYBUILD=overwrite cargo test --test compile_fail`, read
//! every changed file, and update [`RECORDED_WITH`]. See CONTRIBUTING.md.

use std::io::Write;
use std::process::Command;

/// The rustc release (`major.minor`, stable channel) the `.stderr` files were recorded with.
const RECORDED_WITH: &str = "1.95";

#[test]
fn compile_fail() {
    if let Err(reason) = recorded_toolchain() {
        // Straight to stderr: libtest captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "note: skipping the trybuild UI tests: {reason}; their .stderr files were recorded \
             with rustc {RECORDED_WITH} (stable)"
        );
        return;
    }
    let cases = trybuild::TestCases::new();
    cases.compile_fail("trybuild/*.rs");
    cases.pass("trybuild/pass/*.rs");
}

/// Whether the rustc that cargo builds with is a stable `RECORDED_WITH.x` release. Asks the
/// same rustc cargo would: `$RUSTC` if set, else `rustc` on the path (under rustup, cargo
/// passes its toolchain choice down to this process, so the proxy resolves to the same one).
fn recorded_toolchain() -> Result<(), String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run `{} --version`: {err}", rustc.to_string_lossy()))?;
    let version = String::from_utf8_lossy(&output.stdout);
    let version = version.trim();
    // "rustc 1.95.0 (59807616e 2026-04-14)"; a pre-release reads "rustc 1.96.0-beta.3 (...)".
    let release = version.split_whitespace().nth(1).unwrap_or_default();
    let stable = !release.contains('-');
    let major_minor = release
        .rsplit_once('.')
        .map_or("", |(major_minor, _)| major_minor);
    if stable && major_minor == RECORDED_WITH {
        Ok(())
    } else {
        Err(format!("this toolchain is `{version}`"))
    }
}
