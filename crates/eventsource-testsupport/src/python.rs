//! A Python ≥ 3.13 for the interop tests with eventsource-py.
//!
//! Looked for, in order: `EVENTSOURCE_INTEROP_PYTHON`; pyenv's installed versions (the newest
//! 3.13 or later); `python3.14`, `python3.13`, `python3` on `PATH` when they are 3.13 or later.
//! Without one the interop tests are skipped with one loud line — unless
//! `EVENTSOURCE_REQUIRE_INTEROP=1` (CI sets it), which turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `(major, minor)` of a Python interpreter, if it runs.
fn version(python: &Path) -> Option<(u32, u32)> {
    let out = Command::new(python)
        .args([
            "-c",
            "import sys; print(sys.version_info[0], sys.version_info[1])",
        ])
        .env_remove("PYENV_VERSION")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(|p| p.parse().ok());
    Some((parts.next()??, parts.next()??))
}

fn candidates() -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(p) = std::env::var("EVENTSOURCE_INTEROP_PYTHON") {
        found.push(PathBuf::from(p));
    }
    let pyenv_root = std::env::var("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Ok(dir) = pyenv_root.and_then(|root| {
        std::fs::read_dir(root.join("versions")).map_err(|_| std::env::VarError::NotPresent)
    }) {
        found.extend(
            dir.flatten()
                .map(|e| e.path().join("bin/python3"))
                .filter(|p| p.exists()),
        );
    }
    found.extend(["python3.14", "python3.13", "python3"].map(PathBuf::from));
    found
}

/// The first interpreter of at least Python 3.13, or `None`.
pub fn find_python() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let mut best: Option<((u32, u32), PathBuf)> = None;
            for candidate in candidates() {
                if let Some(v) = version(&candidate)
                    && v >= (3, 13)
                    && best.as_ref().is_none_or(|(b, _)| v > *b)
                {
                    best = Some((v, candidate));
                }
            }
            best.map(|(_, p)| p)
        })
        .clone()
}

/// The interpreter for the interop tests; `None` (after one loud line) to skip them. Stops
/// the process with a clear sentence when `EVENTSOURCE_REQUIRE_INTEROP=1` and none exists.
pub fn interop_python() -> Option<PathBuf> {
    static NOTED: OnceLock<()> = OnceLock::new();
    let python = find_python();
    if python.is_none() {
        if std::env::var("EVENTSOURCE_REQUIRE_INTEROP").is_ok_and(|v| v == "1") {
            crate::fail_setup(
                "the interop tests need Python 3.13 or later (pyenv or PATH) and \
                 EVENTSOURCE_REQUIRE_INTEROP=1 makes them mandatory; install one or set \
                 EVENTSOURCE_INTEROP_PYTHON",
            );
        }
        NOTED.get_or_init(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPING the eventsource-py interop tests: no Python 3.13 or later found \
                 (pyenv or PATH; or set EVENTSOURCE_INTEROP_PYTHON) ***\n"
            );
        });
    }
    python
}
