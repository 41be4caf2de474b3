//! `eventsource dashboard` end to end: the JSON API against the real Redis (overview, paged
//! dead letters, replay and purge, bad input), and the page in headless Chromium driven by
//! Playwright: a dead letter appears with its reason, the operator replays it, the live
//! consumer handles it.
//!
//! The browser part needs Node.js, Debian's `chromium` and npm's `playwright-core` (installed
//! under `target/` on first use). Without them it is reported as ignored with the reason (this
//! file's own harness), unless `EVENTSOURCE_REQUIRE_BROWSER=1` (CI) makes that a failure.

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
    /// The link it printed (with its token).
    link: String,
    token: String,
}

impl Dashboard {
    fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &[])
    }

    fn start_with(prefix: &str, options: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventsource"))
            .args(["--url", &redis_url(), "--prefix", prefix])
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .args(options)
            .env_remove("EVENTSOURCE_DASHBOARD_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // The lines after the first are read too (a closed pipe would end the dashboard).
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        // "dashboard on http://127.0.0.1:PORT/p/PREFIX?token=TOKEN"
        let link = line
            .trim()
            .strip_prefix("dashboard on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let addr = link
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .parse()
            .unwrap();
        let token = link
            .split_once("?token=")
            .map(|(_, t)| t.to_owned())
            .unwrap_or_else(|| panic!("no token in {link:?}"));
        Self {
            child,
            addr,
            link,
            token,
        }
    }

    /// A request as the page sends it: to the dashboard's own address, with the token.
    fn call(&self, method: &str, path: &str) -> (u16, Value) {
        let host = self.addr.to_string();
        let (status, text) = request(
            self.addr,
            method,
            path,
            &[("Host", &host), ("X-Eventsource-Token", &self.token)],
        );
        (
            status,
            serde_json::from_str(body(&text))
                .unwrap_or_else(|_| panic!("{path}: not JSON: {text}")),
        )
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 request with the given headers: (status, headers and body).
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
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
async fn api_pages_replays_and_purges() {
    let prefix = unique_prefix("dash-api");
    let _c = Cleanup(prefix.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let bus = consumer(&prefix, broken.clone(), handled.clone());
    dead_letter(&bus, 120).await;
    let d = Dashboard::start(&prefix);

    let (status, o) = d.call("GET", &format!("/api/p/{prefix}/overview"));
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["stream"]["length"], 120);
    assert_eq!(o["dlq"]["length"], 120);
    assert_eq!(o["groups"][0]["name"], "billing");
    assert_eq!(o["groups"][0]["consumers"][0]["name"], "w1");

    // Pages of 50 in order, each letter once, with its reason and group.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = d.call(
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

    let (status, r) = d.call("POST", &format!("/api/p/{prefix}/dlq/{}/purge", seen[0]));
    assert_eq!((status, r["outcome"].as_str()), (200, Some("purged")));
    let (status, r) = d.call("POST", &format!("/api/p/{prefix}/dlq/{}/purge", seen[0]));
    assert_eq!((status, r["outcome"].as_str()), (404, Some("missing")));

    broken.store(false, Ordering::SeqCst);
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    let (status, r) = d.call("POST", &format!("/api/p/{prefix}/dlq/{}/replay", seen[1]));
    assert_eq!(
        (status, r["outcome"].as_str()),
        (200, Some("replayed")),
        "{r}"
    );
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();

    // Bad input: a clear error, nothing done.
    let (status, r) = d.call("GET", &format!("/api/p/{prefix}/dlq?after=*"));
    assert_eq!(status, 400, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not a stream id"));
    let (status, r) = d.call("POST", &format!("/api/p/{prefix}/dlq/{}/explode", seen[2]));
    assert_eq!(status, 404, "{r}");
    let (_, o) = d.call("GET", &format!("/api/p/{prefix}/overview"));
    assert_eq!(o["dlq"]["length"], 118);
    let host = d.addr.to_string();
    let (status, page) = request(d.addr, "GET", &format!("/p/{prefix}"), &[("Host", &host)]);
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

/// In the browser: the dead letters show with their reason; another site's page in the same
/// browser cannot purge one; replay (confirmed) sends one back and the consumer, fixed
/// meanwhile, handles it; purge (confirmed) deletes the other.
async fn operator_replays_a_dead_letter_from_the_page() {
    let (script, chromium) = browser_tools()
        .unwrap_or_else(|why| panic!("the dashboard browser test cannot run: {why}"));
    let prefix = unique_prefix("dash-ui");
    let _c = Cleanup(prefix.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let bus = consumer(&prefix, broken.clone(), handled.clone());
    dead_letter(&bus, 2).await;
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
    let url = d.link.clone();
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
    assert!(said.contains("was refused"), "{said}");
    assert!(said.contains("replayed"), "{said}");
    assert!(said.contains("purged"), "{said}");
    wait_until(|| handled.load(Ordering::SeqCst) == 1).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();
    assert_eq!(
        bus.get_stream_info().await.dlq_messages,
        0,
        "the letter left the DLQ"
    );
}

/// Requests a page of another site can make, and a name rebinding to the dashboard's
/// address, change nothing and read nothing; other prefixes are not served; `--read-only`
/// refuses every change.
async fn forged_requests_are_refused() {
    let prefix = unique_prefix("dash-forge");
    let _c = Cleanup(prefix.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let bus = consumer(&prefix, broken, handled);
    dead_letter(&bus, 3).await;
    let d = Dashboard::start(&prefix);
    let host = d.addr.to_string();
    let (_, page) = d.call("GET", &format!("/api/p/{prefix}/dlq"));
    let id = page["letters"][0]["id"].as_str().unwrap().to_owned();
    let purge = format!("/api/p/{prefix}/dlq/{id}/purge");
    // (method, path, headers, the status expected)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: [Case; 7] = [
        // The request: another site's Origin, a foreign Host, text/plain.
        (
            "POST",
            &purge,
            vec![
                ("Host", "evil.example"),
                ("Origin", "http://evil.example"),
                ("Content-Type", "text/plain"),
            ],
            421,
        ),
        // DNS rebinding: a foreign name resolving to the dashboard, with the token stolen
        // or not, and its reads.
        ("POST", &purge, vec![("Host", "evil.example:80")], 421),
        ("GET", "/api/prefixes", vec![("Host", "evil.example")], 421),
        (
            "GET",
            &format!("/api/p/{prefix}/overview"),
            vec![("Host", "evil.example")],
            421,
        ),
        // The right Host, but no token (a blind cross-site POST cannot set the header).
        (
            "POST",
            &purge,
            vec![("Host", &host), ("Content-Type", "text/plain")],
            403,
        ),
        // The token, but from another site.
        (
            "POST",
            &purge,
            vec![
                ("Host", &host),
                ("X-Eventsource-Token", &d.token),
                ("Sec-Fetch-Site", "cross-site"),
            ],
            403,
        ),
        (
            "POST",
            &purge,
            vec![
                ("Host", &host),
                ("X-Eventsource-Token", &d.token),
                ("Origin", "http://evil.example"),
            ],
            403,
        ),
    ];
    for (method, path, headers, expected) in cases {
        let (status, response) = request(d.addr, method, path, &headers);
        assert_eq!(status, expected, "{method} {path} {headers:?}: {response}");
        assert!(!body(&response).contains("outcome"), "{response}");
    }
    // A wrong token.
    let (status, _) = request(
        d.addr,
        "POST",
        &purge,
        &[
            ("Host", &host),
            ("X-Eventsource-Token", "0123456789abcdef0123"),
        ],
    );
    assert_eq!(status, 403);
    // Another prefix is not served, nor listed.
    let other = unique_prefix("dash-other");
    let (status, r) = d.call("GET", &format!("/api/p/{other}/overview"));
    assert_eq!(status, 403, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("--all-prefixes"),
        "{r}"
    );
    let (status, r) = d.call("GET", "/api/prefixes");
    assert_eq!((status, r), (200, serde_json::json!([prefix])));
    // Nothing was purged by any of them; the page's own request still works.
    assert_eq!(bus.get_stream_info().await.dlq_messages, 3);
    let (status, r) = d.call("POST", &purge);
    assert_eq!(
        (status, r["outcome"].as_str()),
        (200, Some("purged")),
        "{r}"
    );
    // The printed link carries the token into that page only; no cookie is set (a cookie
    // would reach every server on the host, whatever its port), a wrong token is refused.
    let (status, with_token) = request(
        d.addr,
        "GET",
        &format!("/p/{prefix}?token={}", d.token),
        &[("Host", &host)],
    );
    assert_eq!(status, 200, "{with_token}");
    assert!(with_token.contains(&format!("data-token=\"{}\"", d.token)));
    assert!(
        !with_token.to_ascii_lowercase().contains("set-cookie"),
        "{with_token}"
    );
    assert!(with_token.contains("no-store") && with_token.contains("no-referrer"));
    let (status, _) = request(
        d.addr,
        "GET",
        &format!("/p/{prefix}?token=0123456789abcdef0123"),
        &[("Host", &host)],
    );
    assert_eq!(status, 403);
    let (_, without) = request(d.addr, "GET", &format!("/p/{prefix}"), &[("Host", &host)]);
    assert!(without.contains("data-token=\"\""), "{without}");
    assert!(without.contains("frame-ancestors 'none'"), "{without}");

    // Read-only: the token does not help.
    let ro = Dashboard::start_with(&prefix, &["--read-only"]);
    let (status, r) = ro.call("POST", &purge.replace(&id, "0-1"));
    assert_eq!(status, 403, "{r}");
    assert!(r["error"].as_str().unwrap().contains("read-only"), "{r}");
    assert_eq!(bus.get_stream_info().await.dlq_messages, 2);
}

fn main() -> std::process::ExitCode {
    use eventsource_testsupport::harness;
    // Checked before the tests run, so a missing browser shows in the summary.
    let no_browser = match browser_tools() {
        Ok(_) => None,
        Err(why) if std::env::var("EVENTSOURCE_REQUIRE_BROWSER").as_deref() != Ok("1") => Some(why),
        Err(why) => {
            eprintln!(
                "the dashboard browser test cannot run and EVENTSOURCE_REQUIRE_BROWSER=1: {why}"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    harness::run(vec![
        harness::test("api_pages_replays_and_purges", api_pages_replays_and_purges),
        harness::test("forged_requests_are_refused", forged_requests_are_refused),
        harness::test(
            "operator_replays_a_dead_letter_from_the_page",
            operator_replays_a_dead_letter_from_the_page,
        )
        .unless(no_browser),
    ])
}
