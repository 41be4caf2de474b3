//! A consumer's hold on a partition of a `PartitionedEventBus`, and the fencing token its
//! handlers see.

/// A consumer's hold on a partition: acknowledgements and dead letters check that `key`
/// still holds `value` in the same script that applies them.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    /// The partition's owner key for the group.
    pub(crate) key: String,
    /// `<member>:<token>` this consumer wrote there.
    pub(crate) value: String,
    /// What handlers see.
    pub(crate) token: FencingToken,
}

/// The lease a handler of a [`PartitionedEventBus`](crate::PartitionedEventBus) runs under:
/// the partition and its fencing token, which grows with every take of the partition by any
/// member (an `INCR` in Redis).
///
/// The bus fences its own acknowledgements and dead letters with it. A handler whose effects
/// go elsewhere fences them the same way: store the token with what it writes and refuse a
/// write that carries a smaller token than the one stored (for example
/// `UPDATE … SET …, fence = $token WHERE id = $id AND fence <= $token`). A member that lost the
/// partition without noticing (paused, cut off from Redis, or its Redis host's clock stepped)
/// still holds the old, smaller token, so its late writes are refused while its successor's
/// go through.
///
/// ```
/// # async fn handler() {
/// if let Some(lease) = eventsource_redis::FencingToken::current() {
///     // write lease.token with the handler's effects, per lease.partition
///     let _ = (lease.partition, lease.token);
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct FencingToken {
    /// The partition.
    pub partition: u32,
    /// The token of this member's hold on it.
    pub token: u64,
}

tokio::task_local! {
    static CURRENT: FencingToken;
}

impl FencingToken {
    /// The lease the current handler runs under: `Some` inside a handler of a partitioned
    /// bus, `None` elsewhere (a `RedisEventBus`, or outside a handler).
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|t| *t).ok()
    }

    /// Runs `fut` with `self` as the current lease.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }
}
