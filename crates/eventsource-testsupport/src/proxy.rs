//! A TCP fault proxy between a client (the bus) and a Redis of the test's own: the network
//! faults of the fault matrix without root, `tc netem` or Toxiproxy.
//!
//! It runs on a thread and runtime of its own (a stalled test runtime does not stall it) and
//! applies, per direction and per chunk read:
//!
//! - **latency** with jitter (`base ± jitter`), keeping the byte order of each direction;
//! - **loss**: a fraction of chunks is held back for a retransmission timeout (200 ms, Linux's
//!   minimum RTO) and everything behind it waits — what packet loss does to a TCP stream
//!   (bytes are never dropped: TCP would resend them);
//! - **blackhole**: sockets stay open, nothing is forwarded (new connections are accepted
//!   but not connected upstream) until it is lifted; what was held is then delivered, as
//!   TCP retransmission would;
//! - **slicing** replies into writes of 1..=n bytes (the client's parser sees every
//!   fragmentation);
//! - **resets**: every open connection reset (RST) now, or the next replies cut in the middle
//!   and then reset, or new connections reset as soon as they arrive, or a connection reset
//!   right after a chosen request reached the server (its reply never arrives).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// The faults in force; change them with the [`FaultProxy`] methods.
#[derive(Debug, Clone, Default)]
struct Faults {
    latency: Duration,
    jitter: Duration,
    loss: f64,
    blackhole: bool,
    slice: Option<usize>,
    refuse: bool,
    /// Bumped to reset every open connection.
    reset_generation: u64,
    stop: bool,
}

struct Shared {
    faults: watch::Sender<Faults>,
    /// Reset the connection right after forwarding a request containing these bytes.
    reset_after: std::sync::Mutex<Option<Vec<u8>>>,
    /// Replies still to be cut in the middle (then the connection is reset).
    cut_replies: AtomicUsize,
    accepted: AtomicU64,
    resets: AtomicU64,
}

/// A fault proxy on a loopback port in front of `127.0.0.1:{upstream}`. Stops when dropped.
pub struct FaultProxy {
    /// Where clients connect.
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The retransmission delay a "lost" chunk suffers.
const RTO: Duration = Duration::from_millis(200);

impl FaultProxy {
    /// Starts a proxy that forwards faithfully until told otherwise.
    pub fn start(upstream: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("bound").port();
        let (tx, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            faults: tx,
            reset_after: std::sync::Mutex::new(None),
            cut_replies: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the proxy");
                rt.block_on(accept_loop(listener, upstream, s));
            })
            .expect("the proxy thread starts");
        Self {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn change(&self, f: impl FnOnce(&mut Faults)) {
        self.shared.faults.send_modify(f);
    }

    /// Adds `base ± jitter` to every chunk in both directions.
    pub fn latency(&self, base: Duration, jitter: Duration) {
        self.change(|f| {
            f.latency = base;
            f.jitter = jitter;
        });
    }

    /// Holds back `fraction` of the chunks for a retransmission timeout (200 ms).
    pub fn loss(&self, fraction: f64) {
        self.change(|f| f.loss = fraction.clamp(0.0, 1.0));
    }

    /// Stops (`true`) or resumes (`false`) forwarding, keeping every socket open.
    pub fn blackhole(&self, on: bool) {
        self.change(|f| f.blackhole = on);
    }

    /// Writes replies in pieces of 1..=`max` bytes (`None`: as read).
    pub fn slice_replies(&self, max: Option<usize>) {
        self.change(|f| f.slice = max);
    }

    /// Resets (RST) every open connection now.
    pub fn reset_all(&self) {
        self.change(|f| f.reset_generation += 1);
    }

    /// Cuts the next `n` replies in the middle: half of the reply is delivered, then the
    /// connection is reset.
    pub fn cut_next_replies(&self, n: usize) {
        self.shared.cut_replies.store(n, Ordering::SeqCst);
    }

    /// The next request (client to server chunk) containing `pattern` is forwarded, and so
    /// is what the client sends in the next 200 ms; every reply from then on is swallowed
    /// and the connection is reset: "the connection was lost right after COMMIT was sent".
    pub fn reset_after_request_containing(&self, pattern: &[u8]) {
        *self
            .shared
            .reset_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(pattern.to_vec());
    }

    /// Whether the armed [`reset_after_request_containing`](Self::reset_after_request_containing)
    /// has fired.
    pub fn reset_after_fired(&self) -> bool {
        self.shared
            .reset_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// While on, a new connection is reset as soon as it arrives (like a port with an
    /// nftables `reject with tcp reset` rule).
    pub fn refuse(&self, on: bool) {
        self.change(|f| f.refuse = on);
    }

    /// Forwards faithfully again (latency, loss, slicing, blackhole and refusal off).
    pub fn heal(&self) {
        self.change(|f| {
            let generation = f.reset_generation;
            *f = Faults {
                reset_generation: generation,
                ..Faults::default()
            };
        });
        self.shared.cut_replies.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset by the proxy so far.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.change(|f| f.stop = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: std::net::TcpListener, upstream: u16, shared: Arc<Shared>) {
    let listener = TcpListener::from_std(listener).expect("a tokio listener");
    let mut ctl = shared.faults.subscribe();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        if ctl.borrow().stop {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if ctl.borrow().refuse {
                    reset(client);
                    shared.resets.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                connections.spawn(connection(client, upstream, shared.clone()));
            }
            changed = ctl.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

/// Closes a socket with RST instead of FIN.
// `set_linger` is deprecated because a non-zero linger blocks the thread on drop; a zero
// linger never blocks (the kernel discards the socket and sends RST at once).
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A chunk waiting for its delivery time.
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

fn delay(f: &Faults) -> Duration {
    let mut d = f.latency;
    if !f.jitter.is_zero() {
        let j = f.jitter.as_micros() as i64;
        let offset = fastrand::i64(-j..=j);
        d = Duration::from_micros((d.as_micros() as i64 + offset).max(0) as u64);
    }
    if f.loss > 0.0 && fastrand::f64() < f.loss {
        d += RTO;
    }
    d
}

/// Queues `bytes` behind the last chunk of its direction (order kept).
fn enqueue(queue: &mut VecDeque<Chunk>, bytes: &[u8], f: &Faults) {
    let mut due = Instant::now() + delay(f);
    if let Some(last) = queue.back()
        && last.due > due
    {
        due = last.due;
    }
    queue.push_back(Chunk {
        due,
        bytes: bytes.to_vec(),
    });
}

async fn connection(client: TcpStream, upstream: u16, shared: Arc<Shared>) {
    let mut ctl = shared.faults.subscribe();
    let generation = ctl.borrow().reset_generation;
    // A blackhole holds new connections too: accepted, never connected upstream.
    while ctl.borrow().blackhole {
        if ctl.changed().await.is_err() || ctl.borrow().stop {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client, mut server) = (client, server);
    let mut up: VecDeque<Chunk> = VecDeque::new();
    let mut down: VecDeque<Chunk> = VecDeque::new();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    let (mut client_open, mut server_open) = (true, true);
    // Set when a request armed with `reset_after_request_containing` went through.
    let mut doom: Option<Instant> = None;
    loop {
        let faults = ctl.borrow().clone();
        if faults.stop {
            return;
        }
        if faults.reset_generation != generation || doom.is_some_and(|d| d <= Instant::now()) {
            shared.resets.fetch_add(1, Ordering::SeqCst);
            reset(client);
            reset(server);
            return;
        }
        // Deliver what is due.
        if !faults.blackhole {
            let now = Instant::now();
            while up.front().is_some_and(|c| c.due <= now) {
                let chunk = up.pop_front().expect("checked");
                if server.write_all(&chunk.bytes).await.is_err() {
                    reset(client);
                    return;
                }
                let hit = {
                    let mut armed = shared.reset_after.lock().unwrap_or_else(|p| p.into_inner());
                    let hit = armed.as_deref().is_some_and(|p| {
                        !p.is_empty() && chunk.bytes.windows(p.len()).any(|w| w == p)
                    });
                    if hit {
                        *armed = None;
                    }
                    hit
                };
                if hit {
                    // Requests keep flowing for 200 ms (a protocol's sync message that
                    // makes the server act), replies are swallowed, then the reset.
                    doom = Some(Instant::now() + Duration::from_millis(200));
                }
            }
            if doom.is_some() {
                down.clear();
            }
            while down.front().is_some_and(|c| c.due <= now) {
                let chunk = down.pop_front().expect("checked");
                let cut = shared
                    .cut_replies
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if cut {
                    let half = chunk.bytes.len().div_ceil(2);
                    let _ = client.write_all(&chunk.bytes[..half]).await;
                    let _ = client.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    shared.resets.fetch_add(1, Ordering::SeqCst);
                    reset(client);
                    reset(server);
                    return;
                }
                let written = match faults.slice {
                    Some(max) => write_sliced(&mut client, &chunk.bytes, max.max(1)).await,
                    None => client.write_all(&chunk.bytes).await,
                };
                if written.is_err() {
                    reset(server);
                    return;
                }
            }
        }
        if !client_open && up.is_empty() || !server_open && down.is_empty() {
            // One side closed and everything it sent is delivered: close the other.
            return;
        }
        let next_due = if faults.blackhole {
            None
        } else {
            [up.front(), down.front()]
                .into_iter()
                .flatten()
                .map(|c| c.due)
                .chain(doom)
                .min()
        };
        tokio::select! {
            read = client.read(&mut cbuf), if client_open => match read {
                Ok(0) | Err(_) => client_open = false,
                Ok(n) => enqueue(&mut up, &cbuf[..n], &faults),
            },
            read = server.read(&mut sbuf), if server_open => match read {
                Ok(0) | Err(_) => server_open = false,
                Ok(n) => enqueue(&mut down, &sbuf[..n], &faults),
            },
            changed = ctl.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = sleep_until(next_due) => {}
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

async fn write_sliced(stream: &mut TcpStream, bytes: &[u8], max: usize) -> std::io::Result<()> {
    let mut rest = bytes;
    let mut pieces = 0u32;
    while !rest.is_empty() {
        let n = fastrand::usize(1..=max.min(rest.len()));
        stream.write_all(&rest[..n]).await?;
        rest = &rest[n..];
        pieces += 1;
        // Give the client a chance to read each piece on its own.
        if pieces.is_multiple_of(16) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}
