//! The bus's connections: connecting and disconnecting, the command connection (one node
//! or the cluster) and the checks it makes when it opens, the blocking-read connection, the
//! consumer group, and how Redis errors become [`RedisBusError`]s.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::bus::RedisEventBus;
use crate::config::redact_url;
use crate::conn::Commands;
use crate::error::RedisBusError;

impl RedisEventBus {
    /// Connects (PING) and creates the consumer group with MKSTREAM if it does not exist
    /// (a new group reads the stream's whole history, as in eventsource-py). Logs a warning
    /// when the server's eviction policy can evict streams (`allkeys-*`), and an error when
    /// it refuses writes (a failing append-only file); [`health_check`](Self::health_check)
    /// reports both.
    ///
    /// # Errors
    /// [`RedisBusError::Connect`] when Redis cannot be reached.
    pub async fn connect(&self) -> Result<(), RedisBusError> {
        self.open_group().await?;
        self.server_risks().await.log(&self.inner.stream);
        Ok(())
    }

    /// PING (on a cluster: the master serving this stream; redis-rs would send it to every
    /// master and fail when any one is down), then the consumer group.
    pub(crate) async fn open_group(&self) -> Result<(), RedisBusError> {
        let mut conn = self.commands().await?;
        let _: String =
            crate::conn::on_master_of(&mut conn, &self.inner.stream, redis::cmd("PING"))
                .await
                .map_err(|source| {
                    if source.code() == Some("MISCONF") {
                        self.command_error("PING", source)
                    } else {
                        self.connect_error(source)
                    }
                })?;
        self.ensure_group(&mut conn).await?;
        Ok(())
    }

    /// Asks a running consumer to stop and drops the command connection. A later call to
    /// any method reconnects (and a later `start_consuming` runs normally).
    pub async fn disconnect(&self) {
        if self.is_consuming() {
            self.stop_consuming();
        }
        *self
            .inner
            .commands_ready
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        *self.inner.commands.lock().await = None;
        self.inner.connected.store(false, Ordering::Relaxed);
    }

    pub(crate) fn connect_error(&self, source: redis::RedisError) -> RedisBusError {
        self.inner.connected.store(false, Ordering::Relaxed);
        if crate::error::is_auth_error(&source) {
            return RedisBusError::Authentication {
                url: redact_url(&self.inner.config.redis_url),
                source,
            };
        }
        if crate::error::is_permission_error(&source) {
            return self.permission_error("a setup command", source);
        }
        RedisBusError::Connect {
            url: redact_url(&self.inner.config.redis_url),
            source,
        }
    }

    /// The command connection, created on first use.
    pub(crate) async fn commands(&self) -> Result<Commands, RedisBusError> {
        if let Some(conn) = self
            .inner
            .commands_ready
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(conn.clone());
        }
        let mut slot = self.inner.commands.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn = match &self.inner.cluster {
            // The partitions of a cluster share one command connection.
            Some(cluster) => Commands::Cluster(
                cluster
                    .connection()
                    .await
                    .map_err(|e| self.cluster_connect_error(e))?,
            ),
            None => self.open_commands().await?,
        };
        self.inner.connected.store(true, Ordering::Relaxed);
        *slot = Some(conn.clone());
        *self
            .inner
            .commands_ready
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// A new command connection of its own (not the bus's shared one): to the node, checked
    /// as [`commands`](Self::commands) checks it, or a new connection to the cluster.
    pub(crate) async fn open_commands(&self) -> Result<Commands, RedisBusError> {
        let cfg = &self.inner.config;
        if let Some(cluster) = &self.inner.cluster {
            return cluster
                .new_connection()
                .await
                .map(Commands::Cluster)
                .map_err(|e| self.cluster_connect_error(e));
        }
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.socket_timeout))
            .set_connection_timeout(Some(cfg.socket_connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(cfg.reconnect_max_delay);
        let mut conn =
            ConnectionManager::new_with_config(self.inner.client.clone(), manager_config)
                .await
                .map_err(|e| self.connect_error(e))?;
        self.refuse_a_cluster(&mut conn).await?;
        if self.inner.guard_partitioned {
            self.refuse_a_partitioned_stream(&mut conn).await?;
        }
        Ok(Commands::Single(conn))
    }

    /// Refuses a prefix whose stream a `PartitionedEventBus` with several partitions
    /// created: this bus would write `<prefix>:stream`, which no consumer of it reads. A
    /// user that may not read the key (a narrow ACL) is not checked.
    async fn refuse_a_partitioned_stream(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<(), RedisBusError> {
        let key = format!("{{{}}}:partitions", self.inner.config.stream_prefix);
        let stored: Result<Option<u32>, redis::RedisError> =
            redis::cmd("GET").arg(&key).query_async(conn).await;
        match stored {
            Ok(Some(stored)) if stored > 1 => Err(RedisBusError::PartitionsChanged {
                key,
                stored,
                configured: 1,
            }),
            Ok(_) => Ok(()),
            Err(e) if crate::error::is_connection_error(&e) => Err(self.connect_error(e)),
            Err(e) => {
                let user = self.redis_user();
                self.check_skipped(format!(
                    "the Redis user {user} may not read {key} ({e}): the check that refuses a \
                     prefix a PartitionedEventBus uses is skipped; grant it with `ACL SETUSER \
                     {user} +get %R~{key}`"
                ));
                Ok(())
            }
        }
    }

    /// `INFO` refused (ACL): the checks that read it are skipped, said once.
    pub(crate) fn info_refused(&self, e: &redis::RedisError) {
        let user = self.redis_user();
        self.check_skipped(format!(
            "the Redis user {user} may not run INFO ({e}): the checks that refuse a Redis \
             Cluster node and report an eviction policy that can evict streams or an \
             append-only file that cannot be written are skipped; grant it with `ACL SETUSER \
             {user} +info`"
        ));
    }

    /// The Redis user this bus logs in as (`default` when the URL names none).
    pub(crate) fn redis_user(&self) -> String {
        self.inner
            .client
            .get_connection_info()
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned()
    }

    /// A safety check the Redis user may not run: said once at warn level, and listed in
    /// the health's warnings from then on.
    pub(crate) fn check_skipped(&self, message: String) {
        let mut skipped = crate::bus::lock(&self.inner.skipped_checks);
        if !skipped.contains(&message) {
            tracing::warn!(stream = %self.inner.stream, "{message}");
            skipped.push(message);
        }
    }

    /// A failure to open the cluster connection; `cluster = true` pointed at a node that is
    /// not in cluster mode is a configuration error, not an outage to wait out.
    fn cluster_connect_error(&self, e: redis::RedisError) -> RedisBusError {
        if e.to_string().contains("cluster support disabled") {
            self.inner.connected.store(false, Ordering::Relaxed);
            return crate::ConfigError::new(
                "cluster",
                format!(
                    "{} is not a Redis Cluster node (cluster_enabled:0): set cluster = false \
                     (EVENTSOURCE_REDIS_CLUSTER=false), or point redis_url at a cluster node",
                    redact_url(&self.inner.config.redis_url)
                ),
            )
            .into();
        }
        self.connect_error(e)
    }

    /// Refuses a Redis Cluster node once per new command connection: the bus's scripts use a
    /// stream's keys together, which a cluster spreads over hash slots, so it would work
    /// until the first retry or dead letter and then fail with `CROSSSLOT` or `MOVED`. A user
    /// that may not run `INFO` (a narrow ACL) is not checked.
    async fn refuse_a_cluster(&self, conn: &mut ConnectionManager) -> Result<(), RedisBusError> {
        let info: Result<String, redis::RedisError> =
            redis::cmd("INFO").arg("cluster").query_async(conn).await;
        match info {
            Ok(text) if text.lines().any(|l| l.trim() == "cluster_enabled:1") => {
                Err(RedisBusError::ClusterNotSupported {
                    url: redact_url(&self.inner.config.redis_url),
                })
            }
            Ok(_) => Ok(()),
            Err(e) if crate::error::is_connection_error(&e) => Err(self.connect_error(e)),
            Err(e) => {
                self.info_refused(&e);
                Ok(())
            }
        }
    }

    /// A dedicated connection for blocking reads: its response timeout covers the block time.
    pub(crate) async fn blocking_reader(
        &self,
    ) -> Result<crate::reader::Reader, crate::reader::ReadError> {
        let cfg = &self.inner.config;
        // Named so operators (and fault tests) can find it: CLIENT LIST / CLIENT KILL.
        let name = format!("eventsource-reader:{}", self.inner.consumer_name)
            .replace(|c: char| c.is_whitespace(), "_");
        let node;
        let client = match &self.inner.cluster {
            // On a cluster, the master serving this partition's slot (looked up again at each
            // reconnection, so a read follows a failover or a moved slot).
            Some(cluster) => {
                node = cluster
                    .client_for_key(&self.inner.config.redis_url, &self.inner.stream)
                    .await?;
                &node
            }
            None => &self.inner.client,
        };
        crate::reader::Reader::open(
            client,
            cfg.socket_connect_timeout,
            cfg.block + cfg.socket_timeout,
            &name,
            cfg.own_reader,
        )
        .await
    }

    /// `XGROUP CREATE <stream> <group> 0 MKSTREAM`; an existing group is fine.
    /// Returns whether the group was created now.
    pub(crate) async fn ensure_group(&self, conn: &mut Commands) -> Result<bool, RedisBusError> {
        let result: Result<Value, redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.inner.stream)
            .arg(&self.inner.config.consumer_group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match result {
            Ok(_) => {
                self.inner.connected.store(true, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.code() == Some("BUSYGROUP") => {
                self.inner.connected.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) if crate::error::is_connection_error(&e) || crate::error::is_auth_error(&e) => {
                Err(self.connect_error(e))
            }
            Err(e) => Err(self.command_error("XGROUP CREATE", e)),
        }
    }

    pub(crate) fn command_error(
        &self,
        command: &'static str,
        source: redis::RedisError,
    ) -> RedisBusError {
        if crate::error::is_auth_error(&source) {
            return self.connect_error(source);
        }
        if crate::error::is_connection_error(&source) {
            self.inner.connected.store(false, Ordering::Relaxed);
        }
        if crate::error::is_permission_error(&source) {
            return self.permission_error(command, source);
        }
        RedisBusError::Command { command, source }
    }

    /// `NoPermission` naming the refused command (from Redis's message, else `command`) and
    /// this bus's Redis user.
    fn permission_error(&self, command: &str, source: redis::RedisError) -> RedisBusError {
        RedisBusError::NoPermission {
            command: crate::error::denied_command(&source).unwrap_or_else(|| command.to_owned()),
            user: self
                .inner
                .client
                .get_connection_info()
                .redis_settings()
                .username()
                .map(str::to_owned),
            source,
        }
    }
}
