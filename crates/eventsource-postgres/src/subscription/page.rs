//! What one page does: where a subscription starts, handling a page with its checkpoint, and
//! a rebuild's reset.

use eventsource_core::store::{StoreError, StoredEvent};

use crate::store::{StoreCursor, backend};

use super::checkpoint::{insert_start, load_start, restart, save_checkpoint};
use super::{ProjectionError, StartFrom, StartSnapshot, Subscription, Target};

impl Subscription {
    /// The stored checkpoint, or the start position written as the first checkpoint. "At the
    /// end" is the head behind the frontier together with the snapshot it was read in (stored
    /// with it, so a restart before the position passes it skips the same events). Read
    /// after the lock was taken; an instance that starts first writes the start only if none
    /// is stored yet.
    pub(super) async fn initial_cursor(&self) -> Result<StoreCursor, StoreError> {
        let (cursor, snapshot) = match load_start(&self.store, &self.name).await? {
            Some(stored) => stored,
            None => {
                let (start, snapshot) = match self.options.start {
                    StartFrom::Beginning => (StoreCursor::START, None),
                    StartFrom::End => {
                        let (head, snapshot) = self.store.head_and_snapshot().await?;
                        (head, Some(snapshot))
                    }
                };
                insert_start(&self.store, &self.name, start, snapshot.as_deref()).await?;
                load_start(&self.store, &self.name).await?.ok_or_else(|| {
                    StoreError::Backend("the checkpoint just written is missing".into())
                })?
            }
        };
        *self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            snapshot.as_deref().map(StartSnapshot::parse).transpose()?;
        Ok(cursor)
    }

    /// Handles a page. A read model's page and checkpoint commit together; a projector's
    /// checkpoint is written only when `checkpoint` is set. Either write is refused
    /// ([`Superseded`]) when the stored checkpoint is no longer `stored`.
    pub(super) async fn handle(
        &self,
        events: &[StoredEvent],
        stored: StoreCursor,
        last: StoreCursor,
        checkpoint: bool,
    ) -> Result<(), ProjectionError> {
        match &self.target {
            Target::Projector(p) => {
                p.handle(events).await?;
                if checkpoint {
                    save_checkpoint(
                        self.store.pool(),
                        &self.store,
                        &self.name,
                        stored,
                        last,
                        false,
                    )
                    .await?;
                }
            }
            Target::ReadModel(m) => {
                let mut tx = self.store.pool().begin().await.map_err(backend)?;
                m.apply(&mut tx, events).await?;
                // Refused: the transaction rolls back with the page's changes.
                save_checkpoint(&mut *tx, &self.store, &self.name, stored, last, true).await?;
                tx.commit().await.map_err(backend)?;
            }
        }
        Ok(())
    }

    pub(super) async fn reset(&self, stored: &mut StoreCursor) -> Result<(), ProjectionError> {
        match &self.target {
            Target::Projector(p) => {
                // The checkpoint first: an instance that lost its lock is refused before it
                // clears anything (a reset that then fails only means events again).
                restart(self.store.pool(), &self.store, &self.name, *stored).await?;
                *stored = StoreCursor::START;
                p.reset().await?;
            }
            Target::ReadModel(m) => {
                let mut tx = self.store.pool().begin().await.map_err(backend)?;
                m.reset(&mut tx).await?;
                restart(&mut *tx, &self.store, &self.name, *stored).await?;
                tx.commit().await.map_err(backend)?;
                *stored = StoreCursor::START;
            }
        }
        // A rebuild replays the whole history: nothing is skipped any more.
        *self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}
