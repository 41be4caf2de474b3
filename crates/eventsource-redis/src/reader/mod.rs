//! The blocking-read connection of a consumer.
//!
//! On plain TCP it is a small RESP2 client of our own that does one thing: send
//! `XREADGROUP` and parse the reply straight into entries (field values as bytes, no UTF-8
//! check, no intermediate value tree). For TLS and Unix sockets the bus uses a redis-rs
//! connection instead. The benchmark measures both at the default configuration
//! (`docs/performance.md`); the option `own_reader = false` selects redis-rs on TCP too.
//!
//! The parser trusts nothing it reads: a length below -1 is a protocol error (only `-1` means
//! null), a bulk string longer than Redis's own 512 MB limit is refused, header counts never
//! size an allocation beyond what arrives, and an entry larger than `max_entry_bytes` is read
//! and discarded (the consumer dead-letters it inside Redis without holding it).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::codec::{self, ReadEntry, StreamEntry};

/// Redis's own upper bound on a bulk string (`proto-max-bulk-len`).
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// The most a bulk string's buffer starts with, whatever its header announces.
const FIRST_BULK_CAPACITY: usize = 64 * 1024;

/// The longest entry id accepted (`<milliseconds>-<sequence>`: at most 41 bytes).
const MAX_ID: usize = 64;

/// The longest stream name accepted in a reply (a key of this bus: its prefix and `:stream`).
const MAX_NAME: usize = 64 * 1024;

/// Why a read failed, classified for the consume loop.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The group (or stream) is gone: recreate it.
    NoGroup(String),
    /// The connection is broken: reconnect with backoff.
    Connection(String),
    /// The reply did not arrive within the response timeout: reconnect with backoff (and
    /// read fewer entries at a time).
    TimedOut(String),
    /// The reply broke the protocol: the connection cannot be trusted; reconnect.
    Protocol(String),
    /// Redis refused the command otherwise (UNBLOCKED, OOM, NOPERM, WRONGPASS, ...).
    Server(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoGroup(m) | Self::Connection(m) | Self::TimedOut(m) | Self::Server(m) => {
                f.write_str(m)
            }
            Self::Protocol(m) => write!(f, "RESP protocol error: {m}"),
        }
    }
}

impl From<redis::RedisError> for ReadError {
    fn from(e: redis::RedisError) -> Self {
        if crate::error::is_nogroup(&e) {
            Self::NoGroup(e.to_string())
        } else if e.is_timeout() {
            Self::TimedOut(e.to_string())
        } else if crate::error::is_connection_error(&e) || e.code().is_some_and(moves_the_read) {
            Self::Connection(e.to_string())
        } else {
            Self::Server(e.to_string())
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        Self::Connection(e.to_string())
    }
}

/// A consumer's read connection.
pub(crate) enum Reader {
    /// Our own RESP2 reader on a TCP connection.
    Tcp(RespReader<TcpStream>),
    /// A redis-rs connection (TLS, Unix socket, or chosen for comparison).
    Multiplexed(MultiplexedConnection),
}

/// What one XREADGROUP asks for.
#[derive(Debug, Clone)]
pub(crate) struct ReadRequest {
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) count: usize,
    pub(crate) block_ms: Option<u64>,
    pub(crate) stream: String,
    pub(crate) id: String,
    pub(crate) max_entry_bytes: usize,
}

impl ReadRequest {
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "XREADGROUP".to_owned(),
            "GROUP".to_owned(),
            self.group.clone(),
            self.consumer.clone(),
            "COUNT".to_owned(),
            self.count.to_string(),
        ];
        if let Some(ms) = self.block_ms {
            args.push("BLOCK".to_owned());
            args.push(ms.to_string());
        }
        args.push("STREAMS".to_owned());
        args.push(self.stream.clone());
        args.push(self.id.clone());
        args
    }
}

impl Reader {
    /// Opens the read connection for `client`: our TCP reader for `redis://` when
    /// `own_reader`, redis-rs for the rest. `name` is set with CLIENT SETNAME.
    pub(crate) async fn open(
        client: &redis::Client,
        connect_timeout: Duration,
        response_timeout: Duration,
        name: &str,
        own_reader: bool,
    ) -> Result<Self, ReadError> {
        let info = client.get_connection_info();
        if let (ConnectionAddr::Tcp(host, port), true) = (info.addr(), own_reader) {
            let settings = info.redis_settings();
            let connect = async {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                let mut reader = RespReader::new(stream);
                reader
                    .setup(
                        settings.username(),
                        settings.password(),
                        settings.db(),
                        name,
                    )
                    .await?;
                Ok::<_, ReadError>(reader)
            };
            let reader = tokio::time::timeout(connect_timeout, connect)
                .await
                .map_err(|_| {
                    ReadError::Connection(format!("connecting to {host}:{port} timed out"))
                })??;
            return Ok(Self::Tcp(reader));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let _: Result<Value, _> = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async(&mut conn)
            .await;
        Ok(Self::Multiplexed(conn))
    }

    /// Runs one XREADGROUP. Gives the reader back unless the connection is broken.
    pub(crate) async fn read(
        self,
        request: ReadRequest,
        timeout: Duration,
    ) -> (Option<Self>, Result<Vec<ReadEntry>, ReadError>) {
        match self {
            Self::Tcp(mut tcp) => {
                match tokio::time::timeout(timeout, tcp.xreadgroup(&request)).await {
                    Ok(Ok(entries)) => (Some(Self::Tcp(tcp)), Ok(entries)),
                    // A server error leaves the connection in a clean state.
                    Ok(Err(e @ (ReadError::NoGroup(_) | ReadError::Server(_)))) => {
                        (Some(Self::Tcp(tcp)), Err(e))
                    }
                    Ok(Err(e)) => (None, Err(e)),
                    Err(_) => (
                        None,
                        Err(ReadError::TimedOut(format!(
                            "XREADGROUP timed out after {timeout:?}"
                        ))),
                    ),
                }
            }
            Self::Multiplexed(mut conn) => {
                let mut cmd = redis::cmd("XREADGROUP");
                for arg in &request.args()[1..] {
                    cmd.arg(arg);
                }
                match cmd.query_async::<Value>(&mut conn).await {
                    Ok(reply) => (
                        Some(Self::Multiplexed(conn)),
                        Ok(codec::parse_read_reply(reply, request.max_entry_bytes)),
                    ),
                    Err(e) => {
                        let e = ReadError::from(e);
                        let keep = !matches!(e, ReadError::Connection(_) | ReadError::TimedOut(_));
                        (keep.then_some(Self::Multiplexed(conn)), Err(e))
                    }
                }
            }
        }
    }
}

/// A connection speaking just enough RESP2 for XREADGROUP, over any byte stream.
pub(crate) struct RespReader<S> {
    stream: BufReader<S>,
    line: Vec<u8>,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RespReader<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream: BufReader::with_capacity(64 * 1024, stream),
            line: Vec::with_capacity(64),
            out: Vec::with_capacity(256),
        }
    }

    async fn setup(
        &mut self,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        name: &str,
    ) -> Result<(), ReadError> {
        if let Some(password) = password {
            match username {
                Some(user) => self.simple(&["AUTH", user, password]).await?,
                None => self.simple(&["AUTH", password]).await?,
            }
        }
        if db != 0 {
            self.simple(&["SELECT", &db.to_string()]).await?;
        }
        // Best effort: a server refusing the name does not matter.
        let _ = self.simple(&["CLIENT", "SETNAME", name]).await;
        Ok(())
    }

    async fn send(&mut self, args: &[&str]) -> Result<(), ReadError> {
        use std::io::Write;
        self.out.clear();
        let _ = write!(self.out, "*{}\r\n", args.len());
        for arg in args {
            let _ = write!(self.out, "${}\r\n", arg.len());
            self.out.extend_from_slice(arg.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&self.out).await?;
        Ok(())
    }

    /// Sends a command whose reply is a status, an integer or a bulk string, and checks it is
    /// not an error.
    async fn simple(&mut self, args: &[&str]) -> Result<(), ReadError> {
        self.send(args).await?;
        match self.header().await? {
            (b'+' | b':', _) => Ok(()),
            (b'$', -1) => Ok(()),
            (b'$', n) => {
                self.skip_bulk(n).await?;
                Ok(())
            }
            _ => Err(protocol("unexpected reply to a setup command")),
        }
    }

    /// Reads one reply header line: its type byte and, for `$ * :`, its number (checked:
    /// `-1` is the only negative allowed for `$` and `*`). An error reply (`-...`) becomes a
    /// `ReadError`.
    async fn header(&mut self) -> Result<(u8, i64), ReadError> {
        self.line.clear();
        let n = (&mut self.stream)
            .take(64 * 1024)
            .read_until(b'\n', &mut self.line)
            .await?;
        if n == 0 {
            return Err(ReadError::Connection("connection closed by Redis".into()));
        }
        let len = self.line.len();
        if len < 3 || self.line[len - 1] != b'\n' || self.line[len - 2] != b'\r' {
            return Err(protocol("line without CRLF"));
        }
        let kind = self.line[0];
        let body = &self.line[1..len - 2];
        match kind {
            b'-' => Err(server_error(body)),
            b'$' | b'*' => {
                let n = parse_int(body)?;
                if n < -1 {
                    return Err(protocol("negative length other than -1"));
                }
                if kind == b'$' && n > MAX_BULK {
                    return Err(protocol("bulk string longer than 512 MB"));
                }
                Ok((kind, n))
            }
            b':' => Ok((kind, parse_int(body)?)),
            b'+' => Ok((kind, 0)),
            _ => Err(protocol("unknown reply type")),
        }
    }

    /// Reads a bulk body of `n` bytes (n >= 0) and its CRLF.
    /// Reads a bulk body of `n` bytes and its CRLF. The buffer grows as bytes arrive (from
    /// at most `FIRST_BULK_CAPACITY`), so a header announcing 500 MB followed by nothing costs
    /// nothing.
    async fn read_bulk(&mut self, n: i64) -> Result<Vec<u8>, ReadError> {
        let n = usize::try_from(n).map_err(|_| protocol("bad bulk length"))?;
        let mut data = Vec::with_capacity(n.min(FIRST_BULK_CAPACITY));
        while data.len() < n {
            let buf = self.stream.fill_buf().await?;
            if buf.is_empty() {
                return Err(ReadError::Connection("connection closed by Redis".into()));
            }
            let take = buf.len().min(n - data.len());
            data.extend_from_slice(&buf[..take]);
            self.stream.consume(take);
        }
        self.expect_crlf().await?;
        Ok(data)
    }

    /// Reads and discards a bulk body of `n` bytes and its CRLF, without holding it.
    async fn skip_bulk(&mut self, n: i64) -> Result<(), ReadError> {
        let mut left = u64::try_from(n).map_err(|_| protocol("bad bulk length"))?;
        while left > 0 {
            let buf = self.stream.fill_buf().await?;
            if buf.is_empty() {
                return Err(ReadError::Connection("connection closed by Redis".into()));
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.stream.consume(take);
            left -= take as u64;
        }
        self.expect_crlf().await
    }

    async fn expect_crlf(&mut self) -> Result<(), ReadError> {
        let mut crlf = [0u8; 2];
        self.stream.read_exact(&mut crlf).await?;
        if &crlf != b"\r\n" {
            return Err(protocol("bulk string without CRLF"));
        }
        Ok(())
    }

    /// `*N` header: Some(N), None for a null array.
    async fn array_header(&mut self) -> Result<Option<usize>, ReadError> {
        match self.header().await? {
            (b'*', -1) => Ok(None),
            (b'*', n) => Ok(Some(
                usize::try_from(n).map_err(|_| protocol("bad array length"))?,
            )),
            _ => Err(protocol("expected an array")),
        }
    }

    /// A bulk or simple string as bytes, at most `max` of them (`what` names it in the error).
    async fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>, ReadError> {
        match self.header().await? {
            (b'$', -1) => Err(protocol("null where a string was expected")),
            (b'$', n) if usize::try_from(n).is_ok_and(|n| n > max) => Err(protocol(&format!(
                "{what} of {n} bytes (at most {max} expected)"
            ))),
            (b'$', n) => self.read_bulk(n).await,
            (b'+', _) => {
                let len = self.line.len();
                Ok(self.line[1..len - 2].to_vec())
            }
            _ => Err(protocol("expected a string")),
        }
    }

    /// Reads one field string into `budget`; past the budget the bytes are skipped and
    /// `None` returned.
    async fn field(&mut self, budget: &mut usize) -> Result<Option<Vec<u8>>, ReadError> {
        match self.header().await? {
            (b'$', -1) => Err(protocol("null field")),
            (b'$', n) => {
                let len = usize::try_from(n).map_err(|_| protocol("bad bulk length"))?;
                if len > *budget {
                    *budget = 0;
                    self.skip_bulk(n).await?;
                    return Ok(None);
                }
                *budget -= len;
                Ok(Some(self.read_bulk(n).await?))
            }
            (b'+', _) => {
                let len = self.line.len();
                let value = self.line[1..len - 2].to_vec();
                if value.len() > *budget {
                    *budget = 0;
                    return Ok(None);
                }
                *budget -= value.len();
                Ok(Some(value))
            }
            _ => Err(protocol("expected a string")),
        }
    }

    pub(crate) async fn xreadgroup(
        &mut self,
        request: &ReadRequest,
    ) -> Result<Vec<ReadEntry>, ReadError> {
        let args = request.args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.send(&refs).await?;
        self.read_reply(request.max_entry_bytes).await
    }

    /// Parses one XREADGROUP reply.
    pub(crate) async fn read_reply(
        &mut self,
        max_entry_bytes: usize,
    ) -> Result<Vec<ReadEntry>, ReadError> {
        let Some(streams) = self.array_header().await? else {
            return Ok(Vec::new()); // BLOCK timed out: null reply
        };
        let mut out = Vec::new();
        for _ in 0..streams {
            if self.array_header().await? != Some(2) {
                return Err(protocol("stream reply is not [name, entries]"));
            }
            let _name = self.bytes(MAX_NAME, "a stream name").await?;
            let count = self.array_header().await?.unwrap_or(0);
            out.reserve(count.min(1024));
            for _ in 0..count {
                if self.array_header().await? != Some(2) {
                    return Err(protocol("entry is not [id, fields]"));
                }
                let id = String::from_utf8(self.bytes(MAX_ID, "an entry id").await?)
                    .map_err(|_| protocol("entry id is not text"))?;
                let Some(n) = self.array_header().await? else {
                    out.push(ReadEntry::Deleted(id));
                    continue;
                };
                if n % 2 == 1 {
                    return Err(protocol("odd number of field strings"));
                }
                let mut budget = max_entry_bytes;
                let mut oversized = false;
                let mut size = 0usize;
                let mut fields = Vec::with_capacity((n / 2).min(64));
                for _ in 0..n / 2 {
                    let key = self.field(&mut budget).await?;
                    let value = self.field(&mut budget).await?;
                    match (key, value) {
                        (Some(k), Some(v)) if !oversized => {
                            size += k.len() + v.len();
                            fields.push((k, v));
                        }
                        _ => oversized = true,
                    }
                }
                if oversized {
                    // The exact size is unknown once skipped; report at least the cap.
                    out.push(ReadEntry::Oversized {
                        id,
                        bytes: size.max(max_entry_bytes + 1),
                    });
                } else {
                    out.push(ReadEntry::Present(StreamEntry { id, fields }));
                }
            }
        }
        Ok(out)
    }
}

fn parse_int(digits: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol("bad length"))
}

fn protocol(what: &str) -> ReadError {
    ReadError::Protocol(what.to_owned())
}

/// Replies after which the read must reconnect (and, on a cluster, look up the partition's
/// master again): the node is loading or lost its master, or — on a cluster — the slot moved
/// (`MOVED`, `ASK`), the node became a replica (`READONLY`), or the cluster is failing over
/// (`CLUSTERDOWN`, `TRYAGAIN`).
fn moves_the_read(text: &str) -> bool {
    [
        "LOADING",
        "MASTERDOWN",
        "MOVED",
        "ASK",
        "READONLY",
        "CLUSTERDOWN",
        "TRYAGAIN",
    ]
    .iter()
    .any(|code| text.starts_with(code))
}

fn server_error(line: &[u8]) -> ReadError {
    let text = String::from_utf8_lossy(line).into_owned();
    if text.starts_with("NOGROUP") {
        ReadError::NoGroup(text)
    } else if moves_the_read(&text) {
        ReadError::Connection(text)
    } else {
        ReadError::Server(text)
    }
}

#[cfg(test)]
mod tests;
