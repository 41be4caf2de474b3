//! `eventsource dashboard` end to end: the JSON API against the real Redis (overview, paged
//! dead letters, replay and purge, bad input), and the page in headless Chromium driven by
//! Playwright: a dead letter appears with its reason, the operator replays it, the live
//! consumer handles it.
//!
//! The browser part needs Node.js, Debian's `chromium` and npm's `playwright-core` (installed
//! under `target/` on first use). Without them it is skipped with one loud line, unless
//! `EVENTSOURCE_REQUIRE_BROWSER=1` (CI) turns that into a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use eventsource_core::bus::HandlerError;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RecoveryOptions, RedisEventBus, RedisEventBusConfig};
use eventsource_testsupport::{Cleanup, redis_url, unique_prefix};
use serde_json::Value;

/// The dashboard as a child process; killed when dropped.
struct Dashboard {
    child: Child,
    addr: SocketAddr,
}

impl Dashboard {
    fn start(prefix: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventsource"))
            .args(["--url", &redis_url(), "--prefix", prefix])
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "dashboard on http://127.0.0.1:PORT/p/PREFIX"
        let addr = line
            .trim()
            .strip_prefix("dashboard on http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 request: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

fn json(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let (status, body) = http(addr, method, path);
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}")),
    )
}

fn order(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: format!("c{i}"),
            total_amount: 1.0,
        },
    )
    .into_envelope()
}

async fn wait_until(mut check: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out");
}

/// A consumer that fails while `broken` is set (reason `card declined (test)`), counting the
/// events it handled.
fn consumer(prefix: &str, broken: Arc<AtomicBool>, handled: Arc<AtomicUsize>) -> RedisEventBus {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let bus = RedisEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(redis_url())
            .stream_prefix(prefix)
            .consumer_group("billing")
            .consumer_name("w1")
            .block_ms(100)
            .max_retries(0)
            .recovery_interval_ms(0),
        registry,
    )
    .unwrap();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let (broken, handled) = (broken.clone(), handled.clone());
        async move {
            if broken.load(Ordering::SeqCst) {
                return Err::<(), HandlerError>("card declined (test)".into());
            }
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    bus
}

/// Dead-letters `n` events through `bus` (running it until they failed, then recovering).
async fn dead_letter(bus: &RedisEventBus, n: usize) {
    bus.connect().await.unwrap();
    bus.publish_events(&(0..n).map(order).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    wait_until(|| bus.stats().events_processed_failed >= n as u64).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();
    let stats = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.dlq, n as u64);
}

/// The JSON API: overview, paging through 120 dead letters, purge, replay, bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_pages_replays_and_purges() {
    let prefix = unique_prefix("dash-api");
    let _c = Cleanup(prefix.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let bus = consumer(&prefix, broken.clone(), handled.clone());
    dead_letter(&bus, 120).await;
    let d = Dashboard::start(&prefix);

    let (status, o) = json(d.addr, "GET", &format!("/api/p/{prefix}/overview"));
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["stream"]["length"], 120);
    assert_eq!(o["dlq"]["length"], 120);
    assert_eq!(o["groups"][0]["name"], "billing");
    assert_eq!(o["groups"][0]["consumers"][0]["name"], "w1");

    // Pages of 50 in order, each letter once, with its reason and group.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = json(
            d.addr,
            "GET",
            &format!("/api/p/{prefix}/dlq?count=50&after={after}"),
        );
        assert_eq!(status, 200);
        for l in page["letters"].as_array().unwrap() {
            let reason = l["reason"].as_str().unwrap();
            assert!(reason.contains("card declined (test)"), "{reason}");
            assert_eq!(l["group"], "billing");
            assert_eq!(l["event_type"], "OrderCreated");
            seen.push(l["id"].as_str().unwrap().to_owned());
        }
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 120, "no letter twice");

    let (status, r) = json(
        d.addr,
        "POST",
        &format!("/api/p/{prefix}/dlq/{}/purge", seen[0]),
    );
    assert_eq!((status, r["outcome"].as_str()), (200, Some("purged")));
    let (status, r) = json(
        d.addr,
        "POST",
        &format!("/api/p/{prefix}/dlq/{}/purge", seen[0]),
    );
    assert_eq!((status, r["outcome"].as_str()), (404, Some("missing")));

    broken.store(false, Ordering::SeqCst);
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    let (status, r) = json(
        d.addr,
        "POST",
        &format!("/api/p/{prefix}/dlq/{}/replay", seen[1]),
    );
    assert_eq!(
        (status, r["outcome"].as_str()),
        (200, Some("replayed")),
        "{r}"
    );
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();

    // Bad input: a clear error, nothing done.
    let (status, r) = json(d.addr, "GET", &format!("/api/p/{prefix}/dlq?after=*"));
    assert_eq!(status, 400, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not a stream id"));
    let (status, r) = json(
        d.addr,
        "POST",
        &format!("/api/p/{prefix}/dlq/{}/explode", seen[2]),
    );
    assert_eq!(status, 404, "{r}");
    let (_, o) = json(d.addr, "GET", &format!("/api/p/{prefix}/overview"));
    assert_eq!(o["dlq"]["length"], 118);
    let (status, page) = http(d.addr, "GET", &format!("/p/{prefix}"));
    assert_eq!(status, 200);
    assert!(page.contains("/assets/page.js"), "{page}");
}

/// Node.js, playwright-core (installed under target/ once) and Chromium, or None with why.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!(
            "no Chromium at {} (Debian: apt install chromium)",
            chromium.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("no node on PATH (Debian: apt install nodejs npm)".into());
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-test");
    let module = dir.join("node_modules/playwright-core");
    if !module.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let installed = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .args(["--prefix", dir.to_str().unwrap(), "playwright-core@1"])
            .status();
        if !installed.is_ok_and(|s| s.success()) || !module.exists() {
            return Err("npm could not install playwright-core".into());
        }
    }
    // The script imports playwright-core from next to itself.
    let script = dir.join("dashboard.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.mjs"),
        &script,
    )
    .unwrap();
    Ok((script, chromium))
}

/// In the browser: the dead letter shows with its reason; replay (confirmed) sends it back;
/// the consumer, fixed meanwhile, handles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_replays_a_dead_letter_from_the_page() {
    let (script, chromium) = match browser_tools() {
        Ok(tools) => tools,
        Err(why) if std::env::var("EVENTSOURCE_REQUIRE_BROWSER").as_deref() != Ok("1") => {
            eprintln!("SKIPPED the dashboard browser test: {why}");
            return;
        }
        Err(why) => panic!("the dashboard browser test cannot run: {why}"),
    };
    let prefix = unique_prefix("dash-ui");
    let _c = Cleanup(prefix.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let bus = consumer(&prefix, broken.clone(), handled.clone());
    dead_letter(&bus, 1).await;
    // The card is fixed; the consumer runs while the operator looks.
    broken.store(false, Ordering::SeqCst);
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    let d = Dashboard::start(&prefix);
    let shot = std::env::var("EVENTSOURCE_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    let url = d.url(&format!("/p/{prefix}"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .args([url.as_str(), "card declined (test)", shot.to_str().unwrap()])
            .env("CHROMIUM", &chromium)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser script failed:\n{said}");
    assert!(said.contains("replayed"), "{said}");
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();
    assert_eq!(
        bus.get_stream_info().await.dlq_messages,
        0,
        "the letter left the DLQ"
    );
}
