//! The PostgreSQL the tests share.
//!
//! `EVENTSOURCE_TEST_DATABASE_URL` when set, else `postgres://postgres@127.0.0.1:5432/test`.
//! When that server answers, the database is created if it is missing. When nothing answers
//! and the URL was not set, a private cluster is created and started for this test process
//! (`initdb` + `pg_ctl` from the PostgreSQL binaries, run as the `postgres` user when the
//! tests run as root, which `initdb` refuses), and stopped when the process ends. Without
//! any, the process stops with one sentence saying what to install or start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

const DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The database URL the tests use. Blocks (on its own thread) while it is checked or started.
pub fn database_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        std::thread::spawn(choose)
            .join()
            .unwrap_or_else(|_| crate::fail_setup("checking PostgreSQL panicked"))
    })
    .clone()
}

fn choose() -> String {
    let configured = std::env::var("EVENTSOURCE_TEST_DATABASE_URL").ok();
    let url = configured.clone().unwrap_or_else(|| DEFAULT.to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(ensure_database(&url)) {
        Ok(()) => return url,
        Err(Probe::Refused(e)) if configured.is_none() => {
            eprintln!("(no PostgreSQL at 127.0.0.1:5432 ({e}): the tests start their own)");
        }
        Err(Probe::Refused(e) | Probe::Other(e)) => crate::fail_setup(&format!(
            "PostgreSQL at {} cannot be used: {e}; start it, or point \
             EVENTSOURCE_TEST_DATABASE_URL at one the tests may create a database on",
            redact(&url)
        )),
    }
    let url = start_private_cluster();
    if let Err(Probe::Refused(e) | Probe::Other(e)) = rt.block_on(ensure_database(&url)) {
        crate::fail_setup(&format!(
            "the private PostgreSQL cluster does not answer: {e}"
        ));
    }
    url
}

enum Probe {
    /// Nothing listens (or it does not answer): a private cluster may stand in.
    Refused(String),
    /// It answers but refuses us (authentication, permissions): say so.
    Other(String),
}

/// Connects to the server of `url` and creates its database if it is missing.
async fn ensure_database(url: &str) -> Result<(), Probe> {
    let options: PgConnectOptions = url.parse().map_err(|e| Probe::Other(format!("{e}")))?;
    let database = options.get_database().unwrap_or("postgres").to_owned();
    let connect = |options: PgConnectOptions| async move {
        tokio::time::timeout(Duration::from_secs(5), options.connect())
            .await
            .map_err(|_| Probe::Refused("no answer within 5 s".into()))?
            .map_err(|e| match &e {
                sqlx::Error::Io(_) => Probe::Refused(e.to_string()),
                sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
                    Probe::Other("missing database".into())
                }
                _ => Probe::Other(e.to_string()),
            })
    };
    match connect(options.clone()).await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(())
        }
        Err(Probe::Other(reason)) if reason == "missing database" => {
            let mut admin = connect(options.database("postgres")).await?;
            let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
            match sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                .execute(&mut admin)
                .await
            {
                Ok(_) => Ok(()),
                // Another test process created it at the same moment.
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
                Err(e) => Err(Probe::Other(format!("creating database {database}: {e}"))),
            }
        }
        Err(e) => Err(e),
    }
}

/// The directory holding `initdb` and `pg_ctl` (on `PATH`, or Debian's versioned directory).
fn pg_bin() -> Option<PathBuf> {
    if crate::installed("initdb") {
        return Some(PathBuf::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root.
fn pg_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn start_private_cluster() -> String {
    let Some(bin) = pg_bin() else {
        crate::fail_setup(
            "no PostgreSQL answers at 127.0.0.1:5432 and no PostgreSQL binaries (initdb, \
             pg_ctl) are installed to start one; install PostgreSQL (Debian: apt install \
             postgresql) or set EVENTSOURCE_TEST_DATABASE_URL",
        );
    };
    let dir = crate::temp_dir("pg");
    if let Err(e) = init_cluster(&bin, &dir) {
        crate::fail_setup(&e);
    }
    let port = crate::free_port();
    // Lives as long as the process; the watchdog stops it when the process ends.
    std::mem::forget(spawn_postgres(&bin, &dir, port));
    wait_listening(port);
    format!("postgres://postgres@127.0.0.1:{port}/test")
}

/// `initdb` into `dir/data` (owned by `postgres` when we are root).
fn init_cluster(bin: &Path, dir: &Path) -> Result<(), String> {
    let data = dir.join("data");
    if running_as_root() {
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status();
    }
    let init = pg_command(bin, "initdb")
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .output();
    match init {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "initdb failed for the tests' private PostgreSQL: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("initdb could not run: {e}")),
    }
}

/// Starts `postgres` on `dir/data` and `port` under a watchdog (as `postgres` when root).
fn spawn_postgres(bin: &Path, dir: &Path, port: u16) -> std::process::Child {
    let postgres = bin.join("postgres");
    let args = [
        "-D".to_owned(),
        dir.join("data").display().to_string(),
        "-p".to_owned(),
        port.to_string(),
        "-k".to_owned(),
        dir.display().to_string(),
        "-c".to_owned(),
        "listen_addresses=127.0.0.1".to_owned(),
        "-c".to_owned(),
        "fsync=off".to_owned(),
        "-c".to_owned(),
        "max_connections=300".to_owned(),
    ];
    if running_as_root() {
        // The watchdog runs `runuser -u postgres -- postgres ...`.
        let mut all = vec![
            "-u".to_owned(),
            "postgres".to_owned(),
            "--".to_owned(),
            postgres.display().to_string(),
        ];
        all.extend(args);
        crate::spawn_watched("runuser", &all, dir)
    } else {
        crate::spawn_watched(&postgres.display().to_string(), &args, dir)
    }
}

fn wait_listening(port: u16) -> bool {
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A PostgreSQL cluster of a test's own, for faults that need a restart: `initdb` in a
/// temporary directory, `postgres` on a free loopback port, stopped (and removed) when
/// dropped and, by its watchdog, when the test process ends.
pub struct OwnPostgres {
    watchdog: Option<std::process::Child>,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl OwnPostgres {
    /// Creates and starts the cluster.
    ///
    /// # Panics
    /// When the PostgreSQL binaries are missing or the server does not come up.
    pub fn start() -> Self {
        let bin = pg_bin().expect("this test starts a PostgreSQL of its own: install PostgreSQL");
        let dir = crate::temp_dir("own-pg");
        init_cluster(&bin, &dir).unwrap_or_else(|e| panic!("{e}"));
        let mut me = Self {
            watchdog: None,
            port: crate::free_port(),
            dir,
            bin,
        };
        me.start_again();
        me
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it at once (SIGQUIT to the postmaster: an immediate shutdown, as a crash;
    /// the next start recovers from the WAL) and waits until the port is closed.
    pub fn kill(&mut self) {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned))
        {
            let _ = Command::new("kill").args(["-QUIT", pid.trim()]).status();
        }
        if let Some(mut w) = self.watchdog.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = w.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.kill();
            let _ = w.wait();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it (again, after [`kill`](Self::kill)) and waits until it listens.
    ///
    /// # Panics
    /// When it does not come up within 15 s (its log is `server.log` in its directory).
    pub fn start_again(&mut self) {
        self.watchdog = Some(spawn_postgres(&self.bin, &self.dir, self.port));
        assert!(
            wait_listening(self.port),
            "PostgreSQL on port {} did not come up; see {}",
            self.port,
            self.dir.join("server.log").display()
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    eventsource_core::support::redact_url(url)
}
