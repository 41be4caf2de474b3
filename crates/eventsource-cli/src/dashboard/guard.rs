//! Who may use the dashboard: every request passes here first.
//!
//! A page the operator visits elsewhere can send requests to the dashboard (a blind
//! cross-site POST) and, by DNS rebinding (its own name resolving to 127.0.0.1), even read
//! the answers. So:
//! - the `Host` header must name this dashboard (its listen address, `localhost` when it
//!   listens on loopback, or a name given with `--allow-host`): anything else is refused with
//!   421, which ends DNS rebinding;
//! - a request that changes something (every method but GET and HEAD) needs the run's token
//!   (printed at start, as Jupyter does) in the `X-Eventsource-Token` header, which a
//!   cross-site form or `fetch` cannot set without a CORS preflight this server never
//!   grants; a cross-site `Origin` or `Sec-Fetch-Site` refuses it as well; `--read-only`
//!   refuses it always;
//! - only the prefix the dashboard was started for is served, unless `--all-prefixes`.
//!
//! The page learns the token from the link the command printed (`?token=`): the server writes
//! it into that page, whose script keeps it in the tab's `sessionStorage` (per origin, so no
//! other server on the host ever sees it, as it would a cookie), removes it from the address
//! bar and sends it in the header.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Shared, problem};

/// The header the page sends the token in.
pub(super) const TOKEN_HEADER: &str = "x-eventsource-token";

/// What the dashboard lets through.
#[derive(Debug, Clone)]
pub(crate) struct Access {
    /// `Host` values accepted (lowercase, with the port where it belongs).
    hosts: Vec<String>,
    /// Names accepted with any port (`--allow-host NAME`).
    names: Vec<String>,
    /// The run's secret.
    pub(super) token: Arc<str>,
    /// The one prefix served, or every prefix.
    pub(super) prefix: Option<String>,
    /// Refuse every change.
    pub(super) read_only: bool,
}

impl Access {
    /// The access rules of a dashboard listening on `addr`.
    pub(crate) fn new(
        addr: SocketAddr,
        allow_hosts: &[String],
        token: String,
        prefix: Option<String>,
        read_only: bool,
    ) -> Self {
        let port = addr.port();
        let mut hosts = vec![match addr {
            SocketAddr::V4(a) => format!("{}:{port}", a.ip()),
            SocketAddr::V6(a) => format!("[{}]:{port}", a.ip()),
        }];
        if addr.ip().is_loopback() || addr.ip().is_unspecified() {
            hosts.extend([
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ]);
        }
        // On port 80 a browser sends the host without the port.
        if port == 80 {
            let bare: Vec<String> = hosts
                .iter()
                .filter_map(|h| h.strip_suffix(":80").map(str::to_owned))
                .collect();
            hosts.extend(bare);
        }
        let mut names = Vec::new();
        for h in allow_hosts {
            let h = h.trim().to_ascii_lowercase();
            if host_name(&h) == h {
                names.push(h);
            } else {
                hosts.push(h);
            }
        }
        Self {
            hosts,
            names,
            token: token.into(),
            prefix,
            read_only,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let name = host_name(&host);
        self.hosts.contains(&host) || self.names.iter().any(|n| n == name)
    }

    /// Whether `prefix` may be served.
    pub(super) fn serves(&self, prefix: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| p == prefix)
    }

    pub(super) fn scope_error(&self, prefix: &str) -> ApiError {
        problem(
            StatusCode::FORBIDDEN,
            format!(
                "this dashboard serves the prefix {:?} only, not {prefix:?}; start it with \
                 --prefix {prefix:?}, or with --all-prefixes",
                self.prefix.as_deref().unwrap_or_default()
            ),
        )
    }

    /// Whether `given` is the token (compared in constant time).
    pub(super) fn token_matches(&self, given: &str) -> bool {
        let (a, b) = (given.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }
}

/// `host` without its port (`[::1]:80` → `[::1]`, `example.com:80` → `example.com`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Refuses what does not come from the operator's own use of the dashboard; adds the headers
/// that keep the page out of frames and its address out of referrers.
pub(super) async fn guard(State(d): State<Shared>, request: Request, next: Next) -> Response {
    if let Err(e) = check(&d.access, &request) {
        return with_headers(e.into_response());
    }
    with_headers(next.run(request).await)
}

fn check(access: &Access, request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    if !access.host_allowed(host) {
        return Err(problem(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this dashboard's address; open it by its listen address, \
                 or start it with --allow-host NAME to serve it under another name"
            ),
        ));
    }
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return Ok(());
    }
    if access.read_only {
        return Err(problem(
            StatusCode::FORBIDDEN,
            "this dashboard runs with --read-only: replay and purge with the CLI \
             (eventsource dlq replay / purge), or start the dashboard without --read-only"
                .into(),
        ));
    }
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("same-origin");
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    // `https://` too: behind a TLS proxy that keeps the Host.
    let same_origin = origin.is_none_or(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host))
    });
    if !matches!(site, "same-origin" | "none") || !same_origin {
        return Err(problem(
            StatusCode::FORBIDDEN,
            format!(
                "a request from another site (Origin {}, Sec-Fetch-Site {site}) cannot change \
                 anything here",
                origin.unwrap_or("none")
            ),
        ));
    }
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    if !token.is_some_and(|t| access.token_matches(t)) {
        return Err(problem(
            StatusCode::FORBIDDEN,
            format!(
                "replay and purge need the token the dashboard printed at start: open the link \
                 it printed (…?token=…), or send it in the {TOKEN_HEADER} header"
            ),
        ));
    }
    Ok(())
}

fn with_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(listen: &str, allow: &[&str]) -> Access {
        Access::new(
            listen.parse().unwrap(),
            &allow.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            "secret".into(),
            Some("orders".into()),
            false,
        )
    }

    #[test]
    fn hosts_are_the_listen_address_loopback_names_and_allowed_names() {
        let a = access("127.0.0.1:9180", &["ops.example.com", "10.0.0.5:9180"]);
        for ok in [
            "127.0.0.1:9180",
            "localhost:9180",
            "LOCALHOST:9180",
            "[::1]:9180",
            "ops.example.com",
            "ops.example.com:443",
            "10.0.0.5:9180",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9180",
            "127.0.0.1:80",
            "localhost",
            "10.0.0.5:80",
            "",
            "ops.example.com.evil:9180",
        ] {
            assert!(!a.host_allowed(refused), "{refused}");
        }
        let on_80 = access("127.0.0.1:80", &[]);
        assert!(on_80.host_allowed("localhost") && on_80.host_allowed("127.0.0.1"));
        assert!(!on_80.host_allowed("evil.example"));
        let v6 = access("[::1]:9180", &[]);
        assert!(v6.host_allowed("[::1]:9180"));
        assert!(!v6.host_allowed("[::2]:9180"));
    }

    #[test]
    fn the_token_is_compared_whole() {
        let a = access("127.0.0.1:1", &[]);
        assert!(a.token_matches("secret"));
        assert!(!a.token_matches("secre"));
        assert!(!a.token_matches("secret2"));
        assert!(!a.token_matches(""));
    }
}
