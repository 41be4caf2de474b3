//! `handler_concurrency > 1`: up to N entries of a batch at once, one chain per aggregate so
//! each aggregate's entries still run one after the other in stream order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::batch::{Item, ItemBody, Settled};
use crate::bus::RedisEventBus;
use crate::lease::HeldBatch;

impl RedisEventBus {
    /// Runs chains of entries (grouped by `aggregate_id`, stream order kept inside a chain)
    /// with at most `handler_concurrency` chains in flight. Each chain checks for a stop
    /// between its entries; entries not started are given back by the caller.
    pub(crate) async fn run_concurrently(
        &self,
        held: &Arc<HeldBatch>,
        items: Vec<Item>,
        stop: &CancellationToken,
        settled: &Arc<Mutex<Settled>>,
    ) {
        let limit = self.inner.config.handler_concurrency;
        let mut chains: Vec<Vec<(usize, Item)>> = Vec::new();
        let mut by_aggregate: HashMap<Vec<u8>, usize> = HashMap::new();
        for (index, item) in items.into_iter().enumerate() {
            let key = match &item.body {
                ItemBody::Present(entry) => entry
                    .get_bytes("aggregate_id")
                    .map(<[u8]>::to_vec)
                    .unwrap_or_else(|| item.id.clone().into_bytes()),
                _ => item.id.clone().into_bytes(),
            };
            match by_aggregate.get(&key) {
                Some(&i) => chains[i].push((index, item)),
                None => {
                    by_aggregate.insert(key, chains.len());
                    chains.push(vec![(index, item)]);
                }
            }
        }
        // Dropping the set (on abort) cancels the chains; their entries are given back.
        let mut running = tokio::task::JoinSet::new();
        let mut queue = chains.into_iter();
        loop {
            while running.len() < limit {
                let Some(chain) = queue.next() else { break };
                let bus = self.clone();
                let held = held.clone();
                let stop = stop.clone();
                let settled = settled.clone();
                running.spawn(async move {
                    for (index, item) in chain {
                        if stop.is_cancelled() || bus.inner.is_paused() {
                            break;
                        }
                        let (outcome, in_pending) = bus.run_item(&held, index, &item).await;
                        bus.settle(&held, index, item, outcome, in_pending, &settled)
                            .await;
                    }
                });
            }
            match running.join_next().await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    // Handler panics are caught by dispatch, so this should not happen; the
                    // chain's unsettled entries are given back by the caller.
                    tracing::error!(error = %e, "a handler task died; its entries go back to the group");
                }
                None => break,
            }
        }
    }
}
