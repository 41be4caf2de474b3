//! Re-reading this consumer's own pending entries: left by an earlier run with the same name
//! (a crash, a kill, a restart), or delivered in a reply lost with a connection.
//!
//! They are read with a script ([`READ_OWN`](crate::scripts::READ_OWN)) rather than
//! `XREADGROUP … 0`, which would count a delivery for every entry on every restart: a consumer
//! killed five times holding a batch would then dead-letter the whole batch although only one
//! entry ever ran. Here the delivery count stays the number of handler starts; each entry's
//! start is recorded right before its handler runs, and an entry whose handler already
//! started `1 + max_retries` times is dead-lettered instead of run again (the crash-loop
//! guard). The counts come in the same atomic reply as the entries, so there is no separate
//! query whose failure could skip the guard.

use redis::Value;

use crate::bus::RedisEventBus;
use crate::codec;
use crate::error::RedisBusError;
use crate::handle::{Item, ItemBody};
use crate::scripts;

impl RedisEventBus {
    /// One page (`batch_size`, fewer after replies that timed out) of this consumer's own pending entries after `after` (`-` or
    /// `(id`), renewed so no other consumer takes them meanwhile. Entries this bus already
    /// holds (another batch in progress) are left out. Returns the page and the last id read
    /// (`None` when there was nothing left).
    pub(crate) async fn read_own_pending(
        &self,
        after: &str,
    ) -> Result<(Vec<Item>, Option<String>), RedisBusError> {
        let cfg = &self.inner.config;
        let mut conn = self.commands().await?;
        let rows: Vec<Value> = scripts::READ_OWN
            .key(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(after)
            .arg(self.inner.read_count())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (read own pending)", e))?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows {
            let Value::Array(parts) = row else { continue };
            let mut parts = parts.into_iter();
            let Some(id) = parts.next().and_then(codec::into_text) else {
                continue;
            };
            let deliveries = match parts.next() {
                Some(Value::Int(n)) => u32::try_from(n).unwrap_or(u32::MAX),
                _ => 0,
            };
            let body = match parts.next() {
                Some(fields) => ItemBody::from_script(&id, fields, cfg.max_entry_bytes),
                None => ItemBody::Deleted,
            };
            last = Some(id.clone());
            if self.inner.lease.holds(&id) {
                continue;
            }
            items.push(Item {
                id,
                body,
                // Each earlier delivery counted as a start (a delivery whose handler never
                // started was set back by the renewer unless the consumer died within
                // moments of receiving it).
                starts: deliveries,
                marked: false,
                max_retries: cfg.max_retries,
            });
        }
        Ok((items, last))
    }
}
