//! Output: text tables sized to their content, JSON documents, colour only where it helps,
//! and a closed pipe (`eventsource dlq list | head`) ending the command quietly.

use std::io::{BufRead, IsTerminal, Write};

use crate::cli::ColorChoice;

thread_local! {
    /// The JSON documents [`Out::json`] kept instead of printing, while [`capture`] runs.
    static CAPTURED: std::cell::RefCell<Option<Vec<serde_json::Value>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` keeping the JSON documents it prints; returns its result and the documents. The
/// command runs on the thread that awaits it (the CLI's `block_on`), so a thread-local holds
/// them.
pub(crate) async fn capture<T>(f: impl Future<Output = T>) -> (T, Vec<serde_json::Value>) {
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = f.await;
    let docs = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, docs)
}

/// How output is written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) json: bool,
    colour: bool,
}

impl Out {
    pub(crate) fn new(json: bool, choice: ColorChoice) -> Self {
        let colour = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Self { json, colour }
    }

    /// Writes a line to standard output; a closed pipe ends the process quietly (exit 0).
    pub(crate) fn line(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush())
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
    }

    /// Prints `value` as one pretty JSON document (or keeps it, while [`capture`] runs, for
    /// the document of a command run on several partitions).
    pub(crate) fn json(&self, value: &impl serde::Serialize) {
        let kept = CAPTURED.with(|c| {
            c.borrow_mut().as_mut().map(|docs| {
                docs.push(serde_json::to_value(value).unwrap_or_else(
                    |e| serde_json::json!({"error": format!("cannot encode the output: {e}")}),
                ));
            })
        });
        if kept.is_some() {
            return;
        }
        let text = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode the output: {e}\"}}"));
        self.line(&text);
    }

    /// `word` in green (good) or red (bad) on a colour terminal.
    pub(crate) fn status(&self, word: &str, good: bool) -> String {
        if self.colour {
            format!("\x1b[{}m{word}\x1b[0m", if good { "32" } else { "31" })
        } else {
            word.to_owned()
        }
    }

    /// Prints a table: columns as wide as their widest cell, the last one unpadded.
    pub(crate) fn table(&self, header: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let render = |cells: Vec<&str>| {
            let last = cells.len().saturating_sub(1);
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == last {
                        (*c).to_owned()
                    } else {
                        format!("{c:<width$}", width = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        self.line(&render(header.to_vec()));
        for row in rows {
            self.line(&render(row.iter().map(String::as_str).collect()));
        }
    }
}

/// A warning on standard error.
pub(crate) fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "warning: {text}");
}

/// Progress of a long operation on standard error: a bar when standard error is a terminal,
/// otherwise a plain line every 100 items and at the end (for logs and CI).
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    verb: &'static str,
    total: u64,
    done: u64,
}

impl Progress {
    /// `total` items to `verb`; quiet below 100 items.
    pub(crate) fn new(verb: &'static str, total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = (total >= 100 && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(verb);
            bar
        });
        Self {
            bar,
            verb,
            total,
            done: 0,
        }
    }

    /// One more item done.
    pub(crate) fn inc(&mut self) {
        self.done += 1;
        match &self.bar {
            Some(bar) => bar.inc(1),
            None if self.total >= 100
                && (self.done.is_multiple_of(100) || self.done == self.total) =>
            {
                let _ = writeln!(
                    std::io::stderr(),
                    "{}: {} of {}",
                    self.verb,
                    self.done,
                    self.total
                );
            }
            None => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Asks before a destructive action; without a terminal to ask, `--yes` is required.
pub(crate) fn confirm(question: &str, yes: bool) -> Result<(), crate::Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(crate::Failure::Usage(format!(
            "{question} — refusing without --yes (no terminal to ask)"
        )));
    }
    let mut err = std::io::stderr();
    let _ = write!(err, "{question} [y/N] ");
    let _ = err.flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(crate::Failure::No("not confirmed; nothing changed".into()))
    }
}
