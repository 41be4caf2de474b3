//! `eventsource dashboard`: a web page per stream prefix for the operator — streams, groups,
//! consumers, lag, throughput over time, pending entries by age, dead letters with their
//! reason and group (paged), and replay / purge with confirmation. Everything it serves is in
//! the binary (no internet needed); it reads Redis on each request and keeps only the
//! throughput samples of the last ten minutes in memory. Who may use it: `guard`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use eventsource_core::EventRegistry;
use eventsource_redis::{PurgeOutcome, RedisEventBus, RedisEventBusConfig, ReplayOutcome};
use redis::Value;
use serde_json::{Value as Json, json};

use crate::{Failure, Outcome};

mod guard;

pub(crate) use guard::Access;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");

/// Throughput samples kept per prefix (one per overview request, at most one per second).
const SAMPLES: usize = 600;

/// What the server shares between requests.
struct Dashboard {
    access: Access,
    /// The connection options (URL, TLS) each prefix's bus is made with.
    config: RedisEventBusConfig,
    /// How long a reply may take (the bus's `socket_timeout`).
    socket_timeout: Duration,
    client: redis::Client,
    buses: Mutex<HashMap<String, RedisEventBus>>,
    /// Per prefix: (when, entries added to the stream, entries read per group).
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    unix_ms: u64,
    added: u64,
    read: BTreeMap<String, u64>,
}

type Shared = Arc<Dashboard>;

/// How the dashboard is started (the command line's `dashboard` options).
pub(crate) struct Options {
    /// Address to listen on.
    pub(crate) listen: String,
    /// Further names the dashboard may be reached by (`Host`).
    pub(crate) allow_hosts: Vec<String>,
    /// Serve every prefix on the server, not only `--prefix`.
    pub(crate) all_prefixes: bool,
    /// Refuse replay and purge.
    pub(crate) read_only: bool,
    /// The token (a random one when not given).
    pub(crate) token: Option<String>,
}

/// Serves the dashboard for `config`'s prefix (with its connection options, TLS included)
/// until Ctrl-C / SIGTERM; prints the link to open (with the run's token).
pub(crate) async fn run(config: &RedisEventBusConfig, options: Options) -> Outcome {
    let prefix = config.stream_prefix.as_str();
    let client = config.client().map_err(|e| Failure::Usage(e.to_string()))?;
    let listen = &options.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Usage(format!("--listen {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::Usage(format!("--listen {listen}: {e}")))?;
    let token = match options.token {
        Some(t) if t.len() < 16 => {
            return Err(Failure::Usage(
                "--token must be at least 16 characters (or leave it out for a random one)".into(),
            ));
        }
        Some(t) => t,
        None => format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
    };
    let access = Access::new(
        addr,
        &options.allow_hosts,
        token,
        (!options.all_prefixes).then(|| prefix.to_owned()),
        options.read_only,
    );
    let state = Arc::new(Dashboard {
        access,
        socket_timeout: config.socket_timeout,
        config: config.clone(),
        client,
        buses: Mutex::new(HashMap::new()),
        samples: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/p/{prefix}", get(page))
        .route("/assets/page.js", get(page_js))
        .route("/assets/page.css", get(page_css))
        .route("/api/prefixes", get(prefixes))
        .route("/api/p/{prefix}/overview", get(overview))
        .route("/api/p/{prefix}/dlq", get(dead_letters))
        .route("/api/p/{prefix}/dlq/{id}/{action}", post(act))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state.clone());
    let shown = match addr {
        std::net::SocketAddr::V4(a) if a.ip().is_unspecified() => {
            format!("127.0.0.1:{}", a.port())
        }
        std::net::SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        other => other.to_string(),
    };
    println!(
        "dashboard on http://{shown}/p/{prefix}?token={}",
        state.access.token
    );
    if options.read_only {
        println!("read-only: replay and purge are refused");
    }
    println!("(open that link: the token lets this browser replay and purge; keep it to yourself)");
    axum::serve(listener, app)
        .with_graceful_shutdown(eventsource_redis::service::shutdown_signal())
        .await
        .map_err(|e| Failure::No(format!("the dashboard stopped: {e}")))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn page_js() -> Response {
    asset(PAGE_JS, "text/javascript")
}

async fn page_css() -> Response {
    asset(PAGE_CSS, "text/css")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// An error as JSON with a status: what failed and what to do.
struct ApiError {
    status: StatusCode,
    text: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.text }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn problem(status: StatusCode, text: String) -> ApiError {
    ApiError { status, text }
}

fn redis_down(e: impl std::fmt::Display) -> ApiError {
    problem(
        StatusCode::BAD_GATEWAY,
        format!("Redis did not answer: {e}; check --url and that Redis runs"),
    )
}

/// Prefixes are the part before `:stream` of stream keys; anything else is refused.
fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 200
        && !prefix
            .chars()
            .any(|c| c.is_control() || c == '*' || c == '?' || c == '[')
}

impl Dashboard {
    fn bus(&self, prefix: &str) -> Result<RedisEventBus, ApiError> {
        if !valid_prefix(prefix) {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                format!("{prefix:?} is not a stream prefix"),
            ));
        }
        if !self.access.serves(prefix) {
            return Err(self.access.scope_error(prefix));
        }
        let mut buses = self.buses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bus) = buses.get(prefix) {
            return Ok(bus.clone());
        }
        let bus = RedisEventBus::new(
            self.config
                .clone()
                .stream_prefix(prefix.to_owned())
                .consumer_name("eventsource-dashboard")
                .enable_tracing(false),
            EventRegistry::new(),
        )
        .map_err(|e| problem(StatusCode::BAD_REQUEST, e.to_string()))?;
        buses.insert(prefix.to_owned(), bus.clone());
        Ok(bus)
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, ApiError> {
        // The bus's reply timeout, not redis-rs's 500 ms: a SCAN or XINFO of a large stream on
        // a busy server can take longer.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.socket_timeout))
            .set_connection_timeout(Some(self.socket_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_down)
    }
}

async fn index(State(d): State<Shared>) -> ApiResult {
    if let Some(prefix) = &d.access.prefix {
        return Ok(axum::response::Redirect::to(&format!("/p/{prefix}")).into_response());
    }
    // One page per prefix: with a single stream go straight to it.
    match find_prefixes(&d).await {
        Ok(found) if found.len() == 1 => {
            Ok(axum::response::Redirect::to(&format!("/p/{}", found[0])).into_response())
        }
        Ok(found) => {
            let links: String = found
                .iter()
                .map(|p| format!("<li><a href=\"/p/{p}\">{p}</a></li>", p = html_escape(p)))
                .collect();
            let body = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>eventsource</title>\
                 <link rel=\"stylesheet\" href=\"/assets/page.css\"></head><body><h1>Streams</h1>\
                 <ul id=\"prefixes\">{}</ul></body></html>",
                if links.is_empty() {
                    "<li>no streams yet</li>".to_owned()
                } else {
                    links
                }
            );
            Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
        }
        Err(e) => Err(e),
    }
}

#[derive(serde::Deserialize)]
struct PageQuery {
    token: Option<String>,
}

/// The page of one prefix. Opened with the run's token (`?token=`), it keeps the token in a
/// cookie and sends the browser to the clean address; served to a browser holding that
/// cookie, it carries the token for its script to send with replay and purge.
async fn page(
    State(d): State<Shared>,
    Path(prefix): Path<String>,
    Query(q): Query<PageQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    if !valid_prefix(&prefix) {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!("{prefix:?} is not a stream prefix"),
        ));
    }
    if !d.access.serves(&prefix) {
        return Err(d.access.scope_error(&prefix));
    }
    if let Some(given) = &q.token {
        if !d.access.token_matches(given) {
            return Err(problem(
                StatusCode::FORBIDDEN,
                "that is not this dashboard's token: open the link it printed at start".into(),
            ));
        }
        let cookie = format!(
            "{}={given}; Path=/; HttpOnly; SameSite=Strict",
            guard::TOKEN_COOKIE
        );
        let mut response =
            axum::response::Redirect::to(&format!("/p/{}", urlencode(&prefix))).into_response();
        if let Ok(value) = header::HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return Ok(response);
    }
    let token = guard::cookie_token(&d.access, &headers);
    let body = PAGE_HTML
        .replace("{{PREFIX}}", &html_escape(&prefix))
        .replace("{{TOKEN}}", token.as_deref().unwrap_or_default())
        .replace(
            "{{READ_ONLY}}",
            if d.access.read_only { "true" } else { "false" },
        );
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// `s` percent-encoded for a path segment.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn find_prefixes(d: &Dashboard) -> Result<Vec<String>, ApiError> {
    let mut conn = d.conn().await?;
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("*:stream")
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query_async(&mut conn)
            .await
            .map_err(redis_down)?;
        found.extend(
            keys.into_iter()
                .filter_map(|k| k.strip_suffix(":stream").map(str::to_owned)),
        );
        cursor = next;
        if cursor == 0 || found.len() >= 1000 {
            break;
        }
    }
    found.sort();
    Ok(found)
}

async fn prefixes(State(d): State<Shared>) -> ApiResult {
    if let Some(prefix) = &d.access.prefix {
        return Ok(axum::Json(vec![prefix.clone()]).into_response());
    }
    Ok(axum::Json(find_prefixes(&d).await?).into_response())
}

/// `XINFO`-style replies as a map of field name to value.
fn pairs(v: &Value) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    match v {
        Value::Array(items) => {
            for kv in items.chunks(2) {
                if let [Value::BulkString(k), value] = kv {
                    out.insert(String::from_utf8_lossy(k).into_owned(), value.clone());
                } else if let [Value::SimpleString(k), value] = kv {
                    out.insert(k.clone(), value.clone());
                }
            }
        }
        Value::Map(items) => {
            for (k, value) in items {
                if let Value::BulkString(k) = k {
                    out.insert(String::from_utf8_lossy(k).into_owned(), value.clone());
                }
            }
        }
        _ => {}
    }
    out
}

fn int(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Pending entries of a group by idle time (of the oldest 1,000).
const AGE_BUCKETS: [(&str, u64); 5] = [
    ("< 1 s", 1_000),
    ("1–10 s", 10_000),
    ("10–60 s", 60_000),
    ("1–10 min", 600_000),
    ("> 10 min", u64::MAX),
];

async fn overview(State(d): State<Shared>, Path(prefix): Path<String>) -> ApiResult {
    let bus = d.bus(&prefix)?;
    let mut conn = d.conn().await?;
    let stream = bus.stream_name().to_owned();
    let dlq = bus.dlq_stream_name().to_owned();
    let dlq_len: u64 = match redis::cmd("XLEN").arg(&dlq).query_async(&mut conn).await {
        Ok(n) => n,
        Err(e) => return Err(redis_down(e)),
    };
    let info: Value = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(&stream)
        .query_async(&mut conn)
        .await
    {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => {
            return Ok(axum::Json(json!({
                "prefix": prefix, "stream": { "name": stream, "exists": false },
                "groups": [], "dlq": { "name": dlq, "length": dlq_len }, "throughput": [],
            }))
            .into_response());
        }
        Err(e) => return Err(redis_down(e)),
    };
    let info = pairs(&info);
    let added = int(info.get("entries-added")).unwrap_or(0);
    let groups_reply: Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&stream)
        .query_async(&mut conn)
        .await
    {
        Ok(v) => v,
        Err(e) => return Err(redis_down(e)),
    };
    let mut groups = Vec::new();
    let mut read = BTreeMap::new();
    if let Value::Array(list) = groups_reply {
        for g in &list {
            let g = pairs(g);
            let name = text(g.get("name")).unwrap_or_default();
            let consumers: Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&stream)
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap_or(Value::Nil);
            let consumers: Vec<Json> = match consumers {
                Value::Array(cs) => cs
                    .iter()
                    .map(|c| {
                        let c = pairs(c);
                        json!({
                            "name": text(c.get("name")),
                            "pending": int(c.get("pending")),
                            "idle_ms": int(c.get("idle")),
                            "inactive_ms": int(c.get("inactive")),
                        })
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let pending: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(&name)
                .arg("-")
                .arg("+")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap_or(Value::Nil);
            let mut ages = [0u64; AGE_BUCKETS.len()];
            if let Value::Array(rows) = pending {
                for row in rows {
                    if let Value::Array(fields) = row
                        && let Some(idle) = int(fields.get(2))
                    {
                        let bucket = AGE_BUCKETS
                            .iter()
                            .position(|(_, below)| idle < *below)
                            .unwrap_or(AGE_BUCKETS.len() - 1);
                        ages[bucket] += 1;
                    }
                }
            }
            if let Some(n) = int(g.get("entries-read")) {
                read.insert(name.clone(), n);
            }
            groups.push(json!({
                "name": name,
                "pending": int(g.get("pending")),
                "lag": int(g.get("lag")),
                "last_delivered_id": text(g.get("last-delivered-id")),
                "consumers": consumers,
                "pending_by_age": AGE_BUCKETS.iter().zip(ages).map(|((label, _), n)| json!({ "age": label, "count": n })).collect::<Vec<_>>(),
            }));
        }
    }
    let throughput = d.sample(&prefix, added, read);
    Ok(axum::Json(json!({
        "prefix": prefix,
        "stream": {
            "name": stream,
            "exists": true,
            "length": int(info.get("length")),
            "first_id": info.get("first-entry").and_then(entry_id),
            "last_id": text(info.get("last-generated-id")),
            "entries_added": added,
        },
        "groups": groups,
        "dlq": { "name": dlq, "length": dlq_len },
        "throughput": throughput,
    }))
    .into_response())
}

fn entry_id(v: &Value) -> Option<String> {
    match v {
        Value::Array(parts) => text(parts.first()),
        _ => None,
    }
}

impl Dashboard {
    /// Records a sample (at most one a second) and returns the rates between samples:
    /// `[{t, published, read: {group: n}}]` in events per second.
    fn sample(&self, prefix: &str, added: u64, read: BTreeMap<String, u64>) -> Vec<Json> {
        let mut all = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let samples = all.entry(prefix.to_owned()).or_default();
        let now = Instant::now();
        if samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= Duration::from_secs(1))
        {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            samples.push_back(Sample {
                at: now,
                unix_ms,
                added,
                read,
            });
            while samples.len() > SAMPLES {
                samples.pop_front();
            }
        }
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                let groups: serde_json::Map<String, Json> = b
                    .read
                    .iter()
                    .map(|(g, n)| {
                        let before = a.read.get(g).copied().unwrap_or(*n);
                        (
                            g.clone(),
                            json!((n.saturating_sub(before) as f64 / secs).round()),
                        )
                    })
                    .collect();
                json!({
                    "t": b.unix_ms,
                    "published": (b.added.saturating_sub(a.added) as f64 / secs).round(),
                    "read": groups,
                })
            })
            .collect()
    }
}

#[derive(serde::Deserialize)]
struct DlqQuery {
    /// Letters after this DLQ id (exclusive); the first page without it.
    after: Option<String>,
    /// Page size (1..=200, default 50).
    count: Option<usize>,
}

async fn dead_letters(
    State(d): State<Shared>,
    Path(prefix): Path<String>,
    Query(q): Query<DlqQuery>,
) -> ApiResult {
    let bus = d.bus(&prefix)?;
    let count = q.count.unwrap_or(50).clamp(1, 200);
    let start = match &q.after {
        Some(id) if !id.is_empty() => {
            if !id.chars().all(|c| c.is_ascii_digit() || c == '-') {
                return Err(problem(
                    StatusCode::BAD_REQUEST,
                    format!("after={id:?} is not a stream id"),
                ));
            }
            format!("({id}")
        }
        _ => "-".to_owned(),
    };
    let page = match bus.dlq_messages_range(&start, "+", count + 1).await {
        Ok(p) => p,
        Err(e) => return Err(redis_down(e)),
    };
    let more = page.len() > count;
    let letters: Vec<Json> = page
        .iter()
        .take(count)
        .map(|m| {
            json!({
                "id": m.message_id,
                "original_id": m.get("original_message_id"),
                "event_type": m.get("event_type"),
                "event_id": m.get("event_id"),
                "group": m.consumer_group(),
                "reason": m.get("error"),
                "retry_count": m.get("retry_count"),
                "dead_lettered_at": m.get("dlq_timestamp"),
            })
        })
        .collect();
    let next = more
        .then(|| page.get(count - 1).map(|m| m.message_id.clone()))
        .flatten();
    Ok(axum::Json(json!({ "letters": letters, "next_after": next })).into_response())
}

async fn act(
    State(d): State<Shared>,
    Path((prefix, id, action)): Path<(String, String, String)>,
) -> ApiResult {
    let bus = d.bus(&prefix)?;
    if !id.chars().all(|c| c.is_ascii_digit() || c == '-') {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a stream id"),
        ));
    }
    let outcome = match action.as_str() {
        "replay" => match bus.replay_dlq_message_scoped(&id, None).await {
            Ok(ReplayOutcome::Replayed { new_id }) => {
                json!({ "outcome": "replayed", "new_id": new_id })
            }
            Ok(ReplayOutcome::Missing) => json!({ "outcome": "missing" }),
            Ok(ReplayOutcome::OtherGroup { group }) => {
                json!({ "outcome": "other_group", "group": group })
            }
            Err(e) => return Err(redis_down(e)),
        },
        "purge" => match bus.purge_dlq_message_scoped(&id, None).await {
            Ok(PurgeOutcome::Purged) => json!({ "outcome": "purged" }),
            Ok(PurgeOutcome::Missing) => json!({ "outcome": "missing" }),
            Ok(PurgeOutcome::OtherGroup { group }) => {
                json!({ "outcome": "other_group", "group": group })
            }
            Err(e) => return Err(redis_down(e)),
        },
        other => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                format!("{other:?}: the actions are replay and purge"),
            ));
        }
    };
    let status = if outcome["outcome"] == "missing" {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(outcome)).into_response())
}
