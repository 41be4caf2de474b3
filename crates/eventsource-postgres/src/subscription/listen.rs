//! The notifications that wake the subscriptions: one LISTEN connection per manager.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::store::PostgresEventStore;

/// Wakes the subscriptions on every append notification.
pub(super) async fn listen(
    store: PostgresEventStore,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    stop: CancellationToken,
) {
    loop {
        let mut listener = match PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "no LISTEN connection; subscriptions poll");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(store.events_channel()).await {
            tracing::warn!(error = %e, "LISTEN failed; subscriptions poll");
        }
        // Appends committed before the LISTEN took hold (at start, or while the connection
        // was being re-established) sent notifications nobody heard: look once more now.
        wake.send_modify(|g| *g += 1);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => { wake.send_modify(|g| *g += 1); }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
