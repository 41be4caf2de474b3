//! The blocking-read connection of a consumer.
//!
//! On plain TCP it is a small RESP2 client of our own that does one thing: send
//! `XREADGROUP` and parse the reply straight into entries. Parsing the reply was the largest
//! single cost of consuming with the general-purpose client (its parser combinators spent
//! about 3 µs per entry here), and a consumer reads nothing else on this connection. For TLS
//! and Unix sockets the bus uses a redis-rs connection instead.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::codec::{self, ReadEntry, StreamEntry};

/// Why a read failed, classified for the consume loop.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The group (or stream) is gone: recreate it.
    NoGroup(String),
    /// The connection is broken or timed out: reconnect with backoff.
    Connection(String),
    /// Redis refused the command otherwise (UNBLOCKED, OOM, NOPERM, ...).
    Server(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoGroup(m) | Self::Connection(m) | Self::Server(m) => f.write_str(m),
        }
    }
}

impl From<redis::RedisError> for ReadError {
    fn from(e: redis::RedisError) -> Self {
        if crate::error::is_nogroup(&e) {
            Self::NoGroup(e.to_string())
        } else if crate::error::is_connection_error(&e) {
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
    Tcp(TcpReader),
    /// A redis-rs connection (TLS, Unix socket).
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
    /// Opens the read connection for `client`: our TCP reader for `redis://`, redis-rs for
    /// the rest. `name` is set with CLIENT SETNAME.
    pub(crate) async fn open(
        client: &redis::Client,
        connect_timeout: Duration,
        response_timeout: Duration,
        name: &str,
    ) -> Result<Self, ReadError> {
        let info = client.get_connection_info();
        if let ConnectionAddr::Tcp(host, port) = info.addr() {
            let settings = info.redis_settings();
            let reader = tokio::time::timeout(
                connect_timeout,
                TcpReader::connect(
                    host,
                    *port,
                    settings.username(),
                    settings.password(),
                    settings.db(),
                    name,
                ),
            )
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
                        Err(ReadError::Connection(format!(
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
                        Ok(codec::parse_read_reply(reply)),
                    ),
                    Err(e) => {
                        let e = ReadError::from(e);
                        let keep = !matches!(e, ReadError::Connection(_));
                        (keep.then_some(Self::Multiplexed(conn)), Err(e))
                    }
                }
            }
        }
    }
}

/// A TCP connection speaking just enough RESP2 for XREADGROUP.
pub(crate) struct TcpReader {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    out: Vec<u8>,
}

impl TcpReader {
    async fn connect(
        host: &str,
        port: u16,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        name: &str,
    ) -> Result<Self, ReadError> {
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let mut reader = Self {
            stream: BufReader::with_capacity(64 * 1024, stream),
            line: Vec::with_capacity(64),
            out: Vec::with_capacity(256),
        };
        if let Some(password) = password {
            match username {
                Some(user) => reader.simple(&["AUTH", user, password]).await?,
                None => reader.simple(&["AUTH", password]).await?,
            }
        }
        if db != 0 {
            reader.simple(&["SELECT", &db.to_string()]).await?;
        }
        // Best effort: a server refusing the name does not matter.
        let _ = reader.simple(&["CLIENT", "SETNAME", name]).await;
        Ok(reader)
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
            (b'$', n) => {
                if n >= 0 {
                    self.read_bulk(n as usize).await?;
                }
                Ok(())
            }
            _ => Err(protocol("unexpected reply to a setup command")),
        }
    }

    /// Reads one reply header line: its type byte and, for `$ * :`, its number. An error
    /// reply (`-...`) becomes a `ReadError`. The line stays in `self.line`.
    async fn header(&mut self) -> Result<(u8, i64), ReadError> {
        self.line.clear();
        let n = self.stream.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            return Err(ReadError::Connection("connection closed by Redis".into()));
        }
        let len = self.line.len();
        if len < 3 || self.line[len - 2] != b'\r' {
            return Err(protocol("line without CRLF"));
        }
        let kind = self.line[0];
        let body = &self.line[1..len - 2];
        match kind {
            b'-' => Err(server_error(body)),
            b'$' | b'*' | b':' => Ok((kind, parse_len(body)?)),
            b'+' => Ok((kind, 0)),
            _ => Err(protocol("unknown reply type")),
        }
    }

    async fn read_bulk(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        let mut data = vec![0u8; n + 2];
        self.stream.read_exact(&mut data).await?;
        if &data[n..] != b"\r\n" {
            return Err(protocol("bulk string without CRLF"));
        }
        data.truncate(n);
        Ok(data)
    }

    /// `*N` header: Some(N), None for a null array.
    async fn read_array_header(&mut self) -> Result<Option<usize>, ReadError> {
        match self.header().await? {
            (b'*', n) => Ok((n >= 0).then_some(n as usize)),
            _ => Err(protocol("expected an array")),
        }
    }

    async fn read_string(&mut self) -> Result<String, ReadError> {
        match self.header().await? {
            (b'$', n) if n < 0 => Ok(String::new()),
            (b'$', n) => {
                let bytes = self.read_bulk(n as usize).await?;
                Ok(String::from_utf8(bytes)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
            }
            (b'+', _) => {
                let len = self.line.len();
                Ok(String::from_utf8_lossy(&self.line[1..len - 2]).into_owned())
            }
            (b':', n) => Ok(n.to_string()),
            _ => Err(protocol("expected a string")),
        }
    }

    async fn xreadgroup(&mut self, request: &ReadRequest) -> Result<Vec<ReadEntry>, ReadError> {
        let args = request.args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.send(&refs).await?;
        let Some(streams) = self.read_array_header().await? else {
            return Ok(Vec::new()); // BLOCK timed out: null reply
        };
        let mut out = Vec::new();
        for _ in 0..streams {
            if self.read_array_header().await? != Some(2) {
                return Err(protocol("stream reply is not [name, entries]"));
            }
            let _name = self.read_string().await?;
            let count = self.read_array_header().await?.unwrap_or(0);
            out.reserve(count);
            for _ in 0..count {
                if self.read_array_header().await? != Some(2) {
                    return Err(protocol("entry is not [id, fields]"));
                }
                let id = self.read_string().await?;
                match self.read_array_header().await? {
                    None => out.push(ReadEntry::Deleted(id)),
                    Some(n) => {
                        let mut fields = Vec::with_capacity(n / 2);
                        for _ in 0..n / 2 {
                            let k = self.read_string().await?;
                            let v = self.read_string().await?;
                            fields.push((k, v));
                        }
                        if n % 2 == 1 {
                            let _ = self.read_string().await?;
                        }
                        out.push(ReadEntry::Present(StreamEntry { id, fields }));
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_len(digits: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol("bad length"))
}

fn protocol(what: &str) -> ReadError {
    ReadError::Connection(format!("RESP protocol error: {what}"))
}

fn server_error(line: &[u8]) -> ReadError {
    let text = String::from_utf8_lossy(line).into_owned();
    if text.starts_with("NOGROUP") {
        ReadError::NoGroup(text)
    } else if text.starts_with("LOADING") || text.starts_with("MASTERDOWN") {
        ReadError::Connection(text)
    } else {
        ReadError::Server(text)
    }
}
