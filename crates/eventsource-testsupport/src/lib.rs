//! Test support for the eventsource-rs workspace (not published).
//!
//! - [`redis_url`]: the Redis every test shares — `EVENTSOURCE_TEST_REDIS_URL` when set, else
//!   `127.0.0.1:6379` when it answers, else a private `redis-server` started for this test
//!   process. Without any, the process stops with one sentence saying what to install.
//! - [`OwnRedis`]: a `redis-server` of a test's own (restarts, misconfiguration, ACL users).
//! - [`DelayProxy`]: a TCP proxy that slows one client down, to widen a race window.
//! - [`proxy::FaultProxy`]: a TCP fault proxy (latency with jitter, loss, blackhole, sliced
//!   replies, resets) for the network rows of the fault matrix.
//! - [`ledger`]: the ledger and checker every fault and load test shares (lost, duplicated,
//!   unexpected, order, dead letters, time to recover).
//! - `postgres` (feature `postgres`): the PostgreSQL the tests use, created or started the
//!   same way.
//! - [`python`]: a Python ≥ 3.13 for the interop tests, or a loud skip.
//!
//! Servers started here run under a watchdog shell that stops them when the test process
//! exits, however it exits, so a killed test run leaves nothing running.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use std::time::{Duration, Instant};
pub use temp::{process_dir, temp_dir, tests_temp_root};
pub use tls::{certificates, tls_redis, try_certificates};

pub mod cluster;
#[cfg(feature = "harness")]
pub mod harness;
pub mod ledger;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod proxy;
pub mod python;
mod temp;
mod tls;

/// Stops the test process with one sentence on standard error (written past the test
/// harness's output capture, so it is seen), for a missing service: every later test of the
/// process would fail the same way, so one clear line beats a page of panics.
pub fn fail_setup(sentence: &str) -> ! {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "\neventsource tests cannot run: {sentence}\n");
    let _ = err.flush();
    std::process::exit(1)
}

/// Whether something answers `PING` at `url` within a second.
pub fn redis_answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

/// Whether `program` can be run (found on `PATH`).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The Redis the tests share. See the crate docs for how it is chosen.
pub fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("EVENTSOURCE_TEST_REDIS_URL") {
            if !redis_answers(&url) {
                fail_setup(&format!(
                    "EVENTSOURCE_TEST_REDIS_URL={url} does not answer PING; start that Redis or \
                     unset the variable to let the tests use (or start) one on 127.0.0.1"
                ));
            }
            return url;
        }
        let default = "redis://127.0.0.1:6379".to_owned();
        if redis_answers(&default) {
            return default;
        }
        if !installed("redis-server") {
            fail_setup(
                "no Redis answers at 127.0.0.1:6379 and no `redis-server` binary is installed \
                 to start one; install Redis (Debian: apt install redis-server) or set \
                 EVENTSOURCE_TEST_REDIS_URL",
            );
        }
        let server = OwnRedis::start(free_port(), &temp_dir("shared-redis"), &[]);
        let url = server.url();
        eprintln!("(no Redis at 127.0.0.1:6379: the tests use their own at {url})");
        // Lives as long as the process; the watchdog stops it when the process ends.
        std::mem::forget(server);
        url
    })
    .clone()
}

/// How a test's own connections wait: redis-rs's defaults (500 ms for a reply, 1 s to
/// connect) are shorter than a debug build on a loaded machine takes to parse a large reply,
/// and a test must not depend on the speed of the machine it runs on. 60 s for a reply, 10 s
/// to connect: long enough for any load, short enough to end a test that hangs.
pub fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(60)))
        .set_connection_timeout(Some(Duration::from_secs(10)))
}

/// A multiplexed connection to `url` with [`patient`] timeouts.
///
/// # Panics
/// When the URL is not a Redis URL or nothing answers there within 10 s.
pub async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap_or_else(|e| panic!("{url} is not a Redis URL: {e}"))
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap_or_else(|e| panic!("the test's Redis at {url} does not answer: {e}"))
}

/// A prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("es-test:{test}:{:012x}", fastrand::u64(..) >> 16)
}

/// Deletes every key under its prefix when dropped, so tests leave nothing behind. Never
/// panics (a Redis that went away leaves the keys, and says so).
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let result = (|| -> redis::RedisResult<()> {
            let client = redis::Client::open(redis_url())?;
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
            // `<prefix>:…`, and a partitioned bus's `{<prefix>}:…` / `{<prefix>:p<i>}:…`.
            let mut keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.0))
                .query(&mut conn)?;
            let tagged: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{{{}*", self.0))
                .query(&mut conn)?;
            keys.extend(tagged);
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).query::<()>(&mut conn)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("could not delete the test keys {}:*: {e}", self.0);
        }
    }
}

/// A free loopback port for a server of the test's own. Ports come from 10000–29999, below
/// Linux's ephemeral range (so no client socket takes one meanwhile), and a counter keeps two
/// tests of one process from picking the same port.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::process::id() % 1000 * 20;
    loop {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = (10_000 + (base + offset) % 20_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Runs `program args` under a watchdog: a shell that starts it, waits while this process
/// lives, then stops it (SIGTERM, then SIGKILL). Returns the watchdog (killing it kills the
/// program too, with the same grace).
pub fn spawn_watched(program: &str, args: &[String], dir: &Path) -> std::process::Child {
    let quoted: Vec<String> = std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let script = format!(
        "{cmd} >'{log}' 2>&1 & child=$!; echo $child >'{pidfile}'; \
         trap 'kill $child 2>/dev/null; sleep 0.2; kill -9 $child 2>/dev/null; exit 0' TERM INT; \
         while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.2; done; \
         kill $child 2>/dev/null; sleep 0.2; kill -9 $child 2>/dev/null",
        cmd = quoted.join(" "),
        log = dir.join("server.log").display(),
        pidfile = dir.join("server.pid").display(),
        parent = std::process::id(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .expect("sh runs")
}

/// A redis-server of the test's own on a loopback port (or only a Unix socket with port 0),
/// stopped when dropped (and, by its watchdog, when the test process ends).
pub struct OwnRedis {
    watchdog: std::process::Child,
    /// The server's pid (read when it came up); `None` once killed.
    server: Option<u32>,
    /// Its port (0: Unix socket only).
    pub port: u16,
    /// Its working directory (AOF files, the log).
    pub dir: PathBuf,
}

impl OwnRedis {
    /// Starts `redis-server` on `port` with `--dir dir` and `extra` arguments, and waits
    /// until it accepts connections (at most 20 s).
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not come up (its log is in `dir`).
    pub fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        Self::start_in(port, dir, extra, None)
    }

    /// As [`start`](Self::start), with `dir` a tmpfs of `size` (e.g. `"2m"`) mounted in a
    /// mount namespace of the server's own (`unshare -m`, needs root): a disk that fills up.
    /// [`resize_tmpfs`](Self::resize_tmpfs) gives it room again.
    pub fn start_on_tmpfs(port: u16, dir: &Path, size: &str, extra: &[&str]) -> Self {
        Self::start_in(port, dir, extra, Some(size))
    }

    /// Remounts the server's tmpfs with `size` (`nsenter` into its mount namespace).
    ///
    /// # Panics
    /// When the server was not started with [`start_on_tmpfs`](Self::start_on_tmpfs) or the
    /// remount fails.
    pub fn resize_tmpfs(&self, size: &str) {
        let pid = self.server_pid().expect("the server runs");
        let status = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "mount", "-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.dir)
            .status()
            .expect("nsenter runs");
        assert!(status.success(), "remounting the tmpfs failed");
    }

    /// The server's process id (the watchdog's child).
    pub fn server_pid(&self) -> Option<u32> {
        self.server
    }

    fn start_in(port: u16, dir: &Path, extra: &[&str], tmpfs: Option<&str>) -> Self {
        assert!(
            installed("redis-server"),
            "this test starts a redis-server of its own: install Redis (Debian: apt install redis-server)"
        );
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let watchdog = match tmpfs {
            None => spawn_watched("redis-server", &args, dir),
            Some(size) => {
                let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
                let server: Vec<String> = args.iter().map(|a| quote(a)).collect();
                let script = format!(
                    "mount -t tmpfs -o size={size} tmpfs {dir} && exec redis-server {args}",
                    dir = quote(&dir.display().to_string()),
                    args = server.join(" ")
                );
                let wrapped: Vec<String> = ["-m", "--propagation", "private", "sh", "-c"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([script])
                    .collect();
                // The watchdog opens the log outside the namespace: it lands in the host's
                // `dir`, under the tmpfs, not in it.
                spawn_watched("unshare", &wrapped, dir)
            }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let up = loop {
            let up = if port == 0 {
                std::fs::read_dir(dir)
                    .map(|d| {
                        d.flatten()
                            .any(|e| e.path().extension().is_some_and(|x| x == "sock"))
                    })
                    .unwrap_or(false)
            } else {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            };
            if up || Instant::now() > deadline {
                break up;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            up,
            "redis-server on port {port} did not come up within 20 s; see {}",
            dir.join("server.log").display()
        );
        // The watchdog writes the pid as it starts the server; read now, before a later
        // server on the same directory writes its own.
        let pid_file = dir.join("server.pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let server = loop {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if pid.is_some() || Instant::now() > deadline {
                break pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&pid_file);
        Self {
            watchdog,
            server,
            port,
            dir: dir.to_owned(),
        }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it at once (SIGKILL, like a crash), waiting until the port is free.
    pub fn kill(&mut self) {
        // Once only: a test that restarts a server on the same port drops the old value
        // after the new one started.
        let Some(pid) = self.server.take() else {
            let _ = self.watchdog.kill();
            let _ = self.watchdog.wait();
            return;
        };
        // The server, hard; then the watchdog. Not every child of the watchdog: killing the
        // `sleep` it waits on makes its shell print "Killed" into the test output.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if self.port != 0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        // Its directory stays until the test process ends (see `process_dir`): a test that
        // restarts a server on the same directory drops the old value after starting the new.
        self.kill();
    }
}

/// A TCP proxy in front of a Redis that delays every chunk a client sends by `delay`, so a
/// test can widen the window between two commands of one client (and slip another client's
/// command in between). Replies pass through undelayed. Stops when dropped.
pub struct DelayProxy {
    /// Where clients connect.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Starts the proxy in front of `127.0.0.1:{upstream}`.
    pub async fn start(upstream: u16, delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("bound").port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                connections.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_rx.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                connections.spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                });
            }
        });
        Self { port, task }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The port of a `redis://host:port` URL (6379 when it names none).
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').split('/').next()?.parse().ok())
        .unwrap_or(6379)
}
