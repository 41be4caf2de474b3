//! W3C trace context (`traceparent` / `tracestate`) carried from producer to consumer in extra
//! stream entry fields, never inside `payload`.
//!
//! On publish, an event gets a `traceparent` whose trace id continues the trace of the task
//! publishing it (a handler running under a consumed event's context) or starts a new one. On
//! consume, the entry's context becomes the parent of the process span and is installed for
//! the handlers, so events they publish continue the same trace.

/// A W3C trace context: trace id, span id, flags, optional vendor state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id, shared by every span of one trace.
    pub trace_id: [u8; 16],
    /// 8-byte id of the span that is the parent of the next hop.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
    /// The `tracestate` header, passed through unchanged.
    pub state: Option<String>,
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Random ids from fastrand's thread-local generator (W3C trace and span ids need to be
/// unique, not secret): no system call per id, unlike a UUID v4 from the OS. An all-zero id
/// is invalid in W3C trace context, so it is never returned.
fn random_bytes<const N: usize>() -> [u8; N] {
    loop {
        let mut out = [0u8; N];
        fastrand::fill(&mut out);
        if out.iter().any(|&b| b != 0) {
            return out;
        }
    }
}

fn hex<const N: usize>(bytes: &[u8; N]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(N * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace (random trace id and span id, sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: random_bytes(),
            span_id: random_bytes(),
            flags: 1,
            state: None,
        }
    }

    /// A child: same trace and state, new span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: random_bytes(),
            flags: self.flags,
            state: self.state.clone(),
        }
    }

    /// The context of the current task (installed while handling a consumed event), if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// A child of the current context, or a new root.
    pub fn next_hop() -> Self {
        Self::current().map_or_else(Self::new_root, |c| c.child())
    }

    /// Runs `fut` with `self` as the current context.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// Parses a `traceparent` (version 00), with an optional `tracestate`.
    /// Returns None for anything malformed or all-zero ids (per the W3C spec).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        if version != "00" {
            return None;
        }
        let trace_id: [u8; 16] = unhex(parts.next()?)?;
        let span_id: [u8; 8] = unhex(parts.next()?)?;
        let flags = unhex::<1>(parts.next()?)?[0];
        if parts.next().is_some() || trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
            state: tracestate.filter(|s| !s.is_empty()).map(str::to_owned),
        })
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        out.push_str(&hex(&self.trace_id));
        out.push('-');
        out.push_str(&hex(&self.span_id));
        out.push('-');
        out.push_str(&hex(&[self.flags]));
        out
    }

    /// The trace id as 32 hex chars.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 hex chars.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let ctx = TraceContext::new_root();
        let header = ctx.traceparent();
        assert_eq!(header.len(), 55);
        assert_eq!(TraceContext::parse(&header, None), Some(ctx.clone()));
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        let ok = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("vendor=x"),
        )
        .unwrap();
        assert_eq!(ok.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(ok.state.as_deref(), Some("vendor=x"));
    }
}
