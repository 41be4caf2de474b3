//! A test harness for the test files some of whose tests cannot run on every machine (a
//! browser, a Python interpreter, root): such a test is reported as *ignored, with the
//! reason*, in the test summary, instead of passing without having run. Built on
//! libtest-mimic, so the output, filters and flags are those of `cargo test`.
//!
//! A file using it sets `harness = false` for its `[[test]]` and ends with
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     harness::run(vec![
//!         harness::test("always_runs", always_runs),
//!         harness::test("needs_chromium", needs_chromium).unless(chromium_missing()),
//!     ])
//! }
//! ```

use std::future::Future;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Trial};

/// One test of such a file.
pub struct Test {
    trial: Trial,
    skipped: Option<(String, String)>,
}

/// A test that runs `f` on a runtime of its own (two worker threads, as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`). A panic fails it.
pub fn test<F, Fut>(name: &str, f: F) -> Test
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let trial = Trial::test(name, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("no runtime: {e}"))?;
        rt.block_on(f());
        Ok(())
    });
    Test {
        trial,
        skipped: None,
    }
}

impl Test {
    /// Reported as `[skipped] … ignored`, and under the summary with `why`, when `why` is
    /// `Some` (what is missing and how to get it). `--include-ignored` runs it anyway.
    pub fn unless(mut self, why: Option<String>) -> Self {
        if let Some(why) = why {
            let name = self.trial.name().to_owned();
            self.trial = self.trial.with_ignored_flag(true).with_kind("skipped");
            self.skipped = Some((name, why));
        }
        self
    }
}

/// Runs the tests with `cargo test`'s arguments, then lists, under the summary, each test
/// that did not run here and why.
pub fn run(tests: Vec<Test>) -> ExitCode {
    let args = Arguments::from_args();
    let mut skipped = Vec::new();
    let trials = tests
        .into_iter()
        .map(|t| {
            if let Some(s) = t.skipped {
                skipped.push(s);
            }
            t.trial
        })
        .collect();
    let include = args.ignored || args.include_ignored;
    let conclusion = libtest_mimic::run(&args, trials);
    if !include && !skipped.is_empty() && !args.list {
        println!("not run on this machine ({}):", skipped.len());
        for (name, why) in &skipped {
            println!("    {name}: {why}");
        }
        println!();
    }
    conclusion.exit_code()
}
