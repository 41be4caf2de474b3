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
use tokio::net::TcpStream;

use crate::codec::{self, ReadEntry};

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

impl ReadError {
    /// What this failure of `what` means for the consumer's health.
    pub(crate) fn problem(&self, what: &str) -> crate::error::Problem {
        use crate::error::{Problem, classify_server_text};
        match self {
            Self::Server(text) | Self::NoGroup(text) => {
                let (transient, message) = classify_server_text(what, text);
                Problem { transient, message }
            }
            Self::Connection(text) | Self::TimedOut(text) | Self::Protocol(text) => Problem {
                transient: true,
                message: format!("{what}: {text}"),
            },
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

mod resp;

pub(crate) use resp::RespReader;
use resp::moves_the_read;

#[cfg(test)]
mod tests;
