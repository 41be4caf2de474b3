//! Reading all events in position order, page by page, and decoding a stored row.

use chrono::{DateTime, Utc};
use eventsource_core::EventEnvelope;
use eventsource_core::store::{ReadAllOptions, StoreError, StoredEvent};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{FeedFilter, PostgresEventStore, StoreCursor, backend, parse_xid};

impl PostgresEventStore {
    /// Reads all events after `options.after_position` page by page, handing each page to
    /// `apply`: memory stays bounded by one page however large the store is.
    ///
    /// # Errors
    /// Store errors, or the first error `apply` returns (wrapped as a backend error).
    pub async fn for_each_page<F, Fut>(
        &self,
        mut options: ReadAllOptions,
        mut apply: F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut(Vec<StoredEvent>) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut total = 0;
        loop {
            let page = self.read_page(&options).await?;
            let Some(last) = page.last() else { break };
            options.after_position = last.position;
            total += page.len() as u64;
            let full = page.len() == options.limit;
            apply(page).await?;
            if !full {
                break;
            }
        }
        Ok(total)
    }

    /// One page of the global feed after the event at `options.after_position`, in the store's
    /// order, up to the commit-safe frontier (see the crate docs).
    pub(super) async fn read_page(
        &self,
        options: &ReadAllOptions,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let after = if options.after_position == 0 {
            StoreCursor::START
        } else {
            let sql = format!(
                "SELECT tx::text FROM {events} WHERE position = $1",
                events = self.names.events
            );
            let tx: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(i64::try_from(options.after_position).unwrap_or(i64::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            match tx.map(|t| parse_xid(&t)).transpose()? {
                Some(tx) => StoreCursor {
                    tx,
                    position: options.after_position,
                },
                // Not a stored position: everything of a later position.
                None => StoreCursor {
                    tx: 0,
                    position: options.after_position,
                },
            }
        };
        let filter = FeedFilter {
            tenant_id: options.tenant_id,
            aggregate_type: options.aggregate_type.clone(),
            event_types: None,
        };
        Ok(self
            .read_feed(after, &filter, options.limit)
            .await?
            .into_iter()
            .filter(|(_, e)| after.tx != 0 || e.position > after.position)
            .map(|(_, e)| e)
            .collect())
    }
}

pub(crate) fn stored_event(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let position: i64 = row.try_get("position").map_err(backend)?;
    let stored_at: DateTime<Utc> = row.try_get("stored_at").map_err(backend)?;
    // The JSON text (`payload::text`): read in one pass, without a tree of the whole object.
    let payload: &str = row.try_get("payload").map_err(backend)?;
    Ok(StoredEvent {
        position: position as u64,
        stored_at,
        event: EventEnvelope::from_json_str(payload)?,
    })
}
