//! Temporary directories of the servers tests start: one directory per test process,
//! removed when the process ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// A fresh temporary directory for a test's own server, inside this test process's own
/// directory (see [`process_dir`]), which is removed when the process ends.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = process_dir().join(format!("es-{tag}-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).expect("a temporary directory can be created");
    dir
}

/// Where every test process keeps its temporary directories: `eventsource-tests` in the
/// system's temporary directory, one directory per process named by its pid.
pub fn tests_temp_root() -> PathBuf {
    std::env::temp_dir().join("eventsource-tests")
}

/// This test process's temporary directory. Created on first use, together with a cleaner
/// (a shell that waits for this process to end, lets the servers' watchdogs stop them, and
/// removes the directory), so the data of the servers the tests started (a private
/// PostgreSQL cluster is 50–175 MB) does not outlive the run. Directories of processes that
/// died without their cleaner (a kill of the whole process group) are removed by the next
/// test process that starts.
pub fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = tests_temp_root();
        std::fs::create_dir_all(&root).expect("a temporary directory can be created");
        sweep_dead(&root);
        let pid = std::process::id();
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("a temporary directory can be created");
        // Detached from this process (its own session), so it outlives it.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.3; done; sleep 1; rm -rf '{dir}'",
            dir = dir.display()
        );
        let detached = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let cleaner = detached("setsid", &["sh", "-c", &script])
            .or_else(|_| detached("sh", &["-c", &script]));
        if let Err(e) = cleaner {
            eprintln!(
                "(no cleaner for {}: {e}; remove it after the run)",
                dir.display()
            );
        }
        dir
    })
}

/// Removes the directories of test processes that no longer run.
fn sweep_dead(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
