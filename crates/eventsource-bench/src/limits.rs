//! The raw limits: what the same Redis allows a client that does nothing but the commands
//! (XADD one at a time or pipelined, an XREADGROUP/XACK loop), measured in the same run as
//! the bus next to it.

use std::time::Instant;

use redis::Value;

use crate::Error;
use crate::fixture::{delete_prefix, prefill, prefix, raw_conn, xadd};

/// One awaited XADD at a time on one connection; events/s.
pub(crate) async fn raw_single(
    url: &str,
    fields: &[Vec<(&'static str, String)>],
) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-single");
    let stream = format!("{p}:stream");
    let t = Instant::now();
    for f in fields {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in f {
            cmd.arg(*k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await?;
    }
    let rate = fields.len() as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

/// XADD pipelined 100 at a time on one connection; events/s.
pub(crate) async fn raw_pipelined(
    url: &str,
    fields: &[Vec<(&'static str, String)>],
) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-batch");
    let stream = format!("{p}:stream");
    let t = Instant::now();
    for chunk in fields.chunks(100) {
        let mut pipe = redis::pipe();
        for f in chunk {
            xadd(&mut pipe, &stream, f);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await?;
    }
    let rate = fields.len() as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

/// A connection and a stream of `n` entries under a fresh prefix (returned for the
/// clean-up), with the group `raw` at its start.
async fn prefilled_group(
    url: &str,
    tag: &str,
    n: usize,
) -> Result<(redis::aio::MultiplexedConnection, String, String), Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix(tag);
    let stream = format!("{p}:stream");
    prefill(&mut conn, &stream, n).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("raw")
        .arg("0")
        .query_async(&mut conn)
        .await?;
    Ok((conn, p, stream))
}

/// The raw loop: XREADGROUP COUNT 100, acking the previous batch in the same round trip.
pub(crate) async fn raw_consume(url: &str, n: usize) -> Result<f64, Error> {
    let (mut conn, p, stream) = prefilled_group(url, "raw-consume", n).await?;
    let t = Instant::now();
    let mut acks: Vec<String> = Vec::new();
    let mut got = 0;
    loop {
        let mut pipe = redis::pipe();
        if !acks.is_empty() {
            pipe.cmd("XACK").arg(&stream).arg("raw").arg(&acks).ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        let (reply,): (Value,) = pipe.query_async(&mut conn).await?;
        acks = entry_ids(&reply);
        if acks.is_empty() {
            break;
        }
        got += acks.len();
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    if got != n {
        return Err(format!("raw loop read {got} of {n}").into());
    }
    Ok(rate)
}

/// The physical limit of consuming: the same loop over a plain socket, with a scanner that
/// reads only the entry ids out of the reply and skips the fields. What Redis and the network
/// can deliver to one client, with the least client work possible.
fn raw_consume_minimal(addr: &str, stream: &str, n: usize) -> Result<f64, Error> {
    use std::io::{BufRead, BufReader, Read, Write};
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let mut out = sock.try_clone()?;
    let mut r = BufReader::with_capacity(256 * 1024, sock);
    fn line(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<(u8, i64), Error> {
        buf.clear();
        r.read_until(b'\n', buf)?;
        if buf.len() < 3 {
            return Err("short line".into());
        }
        if buf[0] == b'-' {
            return Err(String::from_utf8_lossy(buf).into_owned().into());
        }
        let n = std::str::from_utf8(&buf[1..buf.len() - 2])?
            .parse::<i64>()
            .unwrap_or(0);
        Ok((buf[0], n))
    }
    fn skip_bulk(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<(), Error> {
        let (_, len) = line(r, buf)?;
        if len >= 0 {
            std::io::copy(&mut r.by_ref().take(len as u64 + 2), &mut std::io::sink())?;
        }
        Ok(())
    }
    fn bulk(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<Vec<u8>, Error> {
        let (_, len) = line(r, buf)?;
        let mut v = vec![0u8; len.max(0) as usize + 2];
        r.read_exact(&mut v)?;
        v.truncate(len.max(0) as usize);
        Ok(v)
    }
    let cmd = |args: &[&[u8]]| {
        let mut c = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            c.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            c.extend_from_slice(a);
            c.extend_from_slice(b"\r\n");
        }
        c
    };
    let read = cmd(&[
        b"XREADGROUP",
        b"GROUP",
        b"raw",
        b"c",
        b"COUNT",
        b"100",
        b"STREAMS",
        stream.as_bytes(),
        b">",
    ]);
    let mut buf = Vec::with_capacity(128);
    let mut ids: Vec<Vec<u8>> = Vec::new();
    let mut got = 0;
    let t = Instant::now();
    loop {
        let mut request = Vec::new();
        let acking = !ids.is_empty();
        if acking {
            let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), b"raw"];
            args.extend(ids.iter().map(Vec::as_slice));
            request.extend(cmd(&args));
        }
        request.extend_from_slice(&read);
        out.write_all(&request)?;
        if acking {
            line(&mut r, &mut buf)?; // :n
        }
        ids.clear();
        let (_, streams) = line(&mut r, &mut buf)?;
        for _ in 0..streams.max(0) {
            line(&mut r, &mut buf)?; // *2
            skip_bulk(&mut r, &mut buf)?; // stream name
            let (_, entries) = line(&mut r, &mut buf)?;
            for _ in 0..entries.max(0) {
                line(&mut r, &mut buf)?; // *2
                ids.push(bulk(&mut r, &mut buf)?);
                let (_, fields) = line(&mut r, &mut buf)?;
                for _ in 0..fields.max(0) {
                    skip_bulk(&mut r, &mut buf)?;
                }
            }
        }
        if ids.is_empty() {
            break;
        }
        got += ids.len();
    }
    if got != n {
        return Err(format!("minimal raw loop read {got} of {n}").into());
    }
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// [`raw_consume_minimal`] over a stream of `n` entries, on a blocking thread; events/s.
pub(crate) async fn raw_consume_physical(url: &str, n: usize) -> Result<f64, Error> {
    let (mut conn, p, stream) = prefilled_group(url, "raw-min", n).await?;
    let addr = match redis::Client::open(url)?.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        _ => return Err("the minimal raw loop needs a redis:// TCP address".into()),
    };
    let s = stream.clone();
    let rate = tokio::task::spawn_blocking(move || raw_consume_minimal(&addr, &s, n)).await??;
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

/// The entry ids of an XREADGROUP reply.
fn entry_ids(reply: &Value) -> Vec<String> {
    let Value::Array(streams) = reply else {
        return vec![];
    };
    let mut ids = Vec::new();
    for s in streams {
        if let Value::Array(parts) = s
            && let Some(Value::Array(entries)) = parts.get(1)
        {
            for e in entries {
                if let Value::Array(x) = e
                    && let Some(Value::BulkString(id)) = x.first()
                {
                    ids.push(String::from_utf8_lossy(id).into_owned());
                }
            }
        }
    }
    ids
}
