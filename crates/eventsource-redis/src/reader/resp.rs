//! The RESP2 client of the consumer's blocking reads: `XREADGROUP` replies parsed straight
//! into entries, trusting nothing it reads (see the module above).

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{ReadError, ReadRequest};
use crate::codec::{ReadEntry, StreamEntry};

/// Redis's own upper bound on a bulk string (`proto-max-bulk-len`).
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// The most a bulk string's buffer starts with, whatever its header announces.
const FIRST_BULK_CAPACITY: usize = 64 * 1024;

/// The longest entry id accepted (`<milliseconds>-<sequence>`: at most 41 bytes).
const MAX_ID: usize = 64;

/// The longest stream name accepted in a reply (a key of this bus: its prefix and `:stream`).
const MAX_NAME: usize = 64 * 1024;

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

    pub(super) async fn setup(
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
pub(super) fn moves_the_read(text: &str) -> bool {
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
