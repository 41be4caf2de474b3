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
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use serde_json::json;

use crate::{Failure, Outcome};

mod api;
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
        Some(t)
            if t.len() < 16
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            return Err(Failure::Usage(
                "--token must be at least 16 letters, digits, `-` or `_` (or leave it out for \
                 a random one)"
                    .into(),
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
        .route("/api/p/{prefix}/overview", get(api::overview))
        .route("/api/p/{prefix}/dlq", get(api::dead_letters))
        .route("/api/p/{prefix}/dlq/{id}/{action}", post(api::act))
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
        .with_graceful_shutdown(eventsource_redis::shutdown_signal())
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

/// The page of one prefix. Opened with the run's token (`?token=`), it carries the token for
/// its script, which keeps it for the tab and sends it with replay and purge.
async fn page(
    State(d): State<Shared>,
    Path(prefix): Path<String>,
    Query(q): Query<PageQuery>,
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
    // The token travels once, in the printed link; the page keeps it in the tab's
    // sessionStorage (per origin: scheme, host and port, unlike a cookie, which every
    // server on the same host would receive) and takes it out of the address bar.
    let token = match &q.token {
        Some(given) if d.access.token_matches(given) => d.access.token.clone(),
        Some(_) => {
            return Err(problem(
                StatusCode::FORBIDDEN,
                "that is not this dashboard's token: open the link it printed at start".into(),
            ));
        }
        None => "".into(),
    };
    // The token first: it is checked to be plain characters, while a prefix is anything
    // (escaped) and must not be able to name a placeholder.
    let body = PAGE_HTML
        .replace("{{TOKEN}}", &token)
        .replace(
            "{{READ_ONLY}}",
            if d.access.read_only { "true" } else { "false" },
        )
        .replace("{{PREFIX}}", &html_escape(&prefix));
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
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
