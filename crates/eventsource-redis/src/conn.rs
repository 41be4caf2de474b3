//! The command connection: one node (redis-rs's `ConnectionManager`, which reconnects by
//! itself) or a Redis Cluster (redis-rs's `cluster_async::ClusterConnection`, which routes
//! each command to the master of its key's slot and follows `MOVED`, `ASK` and failovers).
//!
//! Every command the bus sends names keys of one partition only (they share a hash tag), so
//! its scripts, pipelines and `MULTI` blocks are legal on a cluster.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A command connection of either kind; cheap to clone (both are multiplexed handles).
#[derive(Clone)]
pub(crate) enum Commands {
    /// One Redis node (standalone, or a primary with replicas).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs `cmd`, which names no key (`WAIT`), on the node serving `key`: on a cluster redis-rs
/// would send it to every master and answer the smallest reply, and a dead master elsewhere
/// would hold it up.
pub(crate) async fn on_master_of<T: redis::FromRedisValue>(
    conn: &mut Commands,
    key: &str,
    cmd: Cmd,
) -> Result<T, redis::RedisError> {
    match conn {
        Commands::Single(c) => cmd.query_async(c).await,
        Commands::Cluster(c) => {
            use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            let route = Route::with_key(key, SlotAddr::Master);
            let value = c
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?;
            Ok(redis::from_redis_value(value)?)
        }
    }
}

/// The `host:port` of the master serving `key`'s slot, from `CLUSTER SLOTS` (asked through
/// the cluster connection, which refreshes its own view after a failover; a node's answer
/// can lag a failover by a moment, and a read sent there then fails and is retried).
pub(crate) async fn master_of_key(
    conn: &mut ClusterConnection,
    key: &str,
) -> Result<(String, u16), redis::RedisError> {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await?;
    let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    for range in slots {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if (*start..=*end).contains(&slot) {
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            if let Some(Value::Int(port)) = master.get(1)
                && let Ok(port) = u16::try_from(*port)
            {
                return Ok((host, port));
            }
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
        "no master serves the slot",
        format!("slot {slot} of key {key}"),
    )))
}

/// The cluster a [`PartitionedEventBus`](crate::PartitionedEventBus) works on: one
/// redis-rs cluster client and one command connection, shared by its partitions.
pub(crate) struct ClusterShared {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl ClusterShared {
    /// A cluster reached through the node at `url` (the others are discovered).
    pub(crate) fn new(
        url: &str,
        connect_timeout: std::time::Duration,
        response_timeout: std::time::Duration,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::cluster::ClusterClient::builder(vec![url])
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(4)
            .build()?;
        Ok(Self {
            client,
            conn: tokio::sync::OnceCell::new(),
        })
    }

    /// The command connection, opened on first use (it reconnects to nodes by itself).
    pub(crate) async fn connection(&self) -> Result<ClusterConnection, redis::RedisError> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }

    /// A connection of its own (for the ownership loop: a `WAIT` on the shared one blocks
    /// it for the replication delay).
    pub(crate) async fn new_connection(&self) -> Result<ClusterConnection, redis::RedisError> {
        self.client.get_async_connection().await
    }

    /// A redis-rs client for the master now serving `key`: `url` (for its credentials and
    /// database) with that master's host and port.
    pub(crate) async fn client_for_key(
        &self,
        url: &str,
        key: &str,
    ) -> Result<redis::Client, crate::reader::ReadError> {
        use crate::reader::ReadError;
        let mut conn = self.connection().await?;
        let (host, port) = master_of_key(&mut conn, key).await?;
        let node = node_url(url, &host, port).map_err(ReadError::Connection)?;
        redis::Client::open(node.as_str()).map_err(ReadError::from)
    }
}

/// `url` (scheme, credentials, database) pointed at `host:port` instead; an IPv6 address
/// goes in brackets.
fn node_url(url: &str, host: &str, port: u16) -> Result<String, String> {
    let mut parsed = url::Url::parse(url).map_err(|e| format!("redis_url: {e}"))?;
    let url_host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    parsed
        .set_host(Some(&url_host))
        .map_err(|e| format!("node {host}:{port}: {e}"))?;
    parsed
        .set_port(Some(port))
        .map_err(|()| format!("node {host}:{port}: no port in this URL"))?;
    Ok(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::node_url;

    #[test]
    fn a_node_url_keeps_the_credentials_and_brackets_ipv6() {
        assert_eq!(
            node_url("redis://user:secret@seed:7000/0", "10.0.0.7", 7002).unwrap(),
            "redis://user:secret@10.0.0.7:7002/0"
        );
        assert_eq!(
            node_url("redis://seed:7000", "2001:db8::1", 7001).unwrap(),
            "redis://[2001:db8::1]:7001"
        );
        assert_eq!(
            node_url("redis://seed:7000", "::1", 7001).unwrap(),
            "redis://[::1]:7001"
        );
        assert!(node_url("not a url", "h", 1).is_err());
    }
}
