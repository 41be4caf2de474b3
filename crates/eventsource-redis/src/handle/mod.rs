//! Handling delivered entries: what the consume loop and recovery share.
//!
//! - `entry`: decode one entry and run its handlers → an [`Outcome`].
//! - `batch`: run a batch of held entries in stream order (or per aggregate with
//!   `handler_concurrency`), record starts, check for a stop between entries, give back what
//!   was not started, then acknowledge.
//! - `concurrent`: the per-aggregate scheduler for `handler_concurrency > 1`.
//! - `ack`: the batched acknowledgement and failure notes, sent while the next batch runs.
//! - `dead_letter`: the atomic move to the dead-letter stream.

mod ack;
mod batch;
mod concurrent;
mod dead_letter;
mod entry;
mod hold;

pub(crate) use batch::{Item, ItemBody};
pub(crate) use dead_letter::{DeadLetterMode, DeadLettered};

/// What became of one entry.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every handler succeeded: ack; counts as consumed.
    Handled,
    /// Nothing to do here, for a stated and counted reason: ack. `consumed` when the
    /// tutorial's `events_consumed` counts it (a known type without handlers).
    Skipped {
        reason: &'static str,
        consumed: bool,
    },
    /// A handler failed or panicked: leave pending, remember the reason.
    Failed(String),
    /// This version of the event's Rust type rejects its data.
    Rejected { event_type: String, reason: String },
    /// The entry can never be decoded: dead-letter it now.
    Malformed(String),
    /// Its handler started `1 + max_retries` times already: dead-letter it, do not run it.
    Exhausted { starts: u32 },
    /// Another consumer took it, or it was acknowledged elsewhere, before it started.
    Taken,
    /// Deleted from the stream while pending and nothing of it was left to handle.
    Deleted,
    /// Its start could not be recorded (Redis failed); it stays pending and comes back.
    NotStarted,
}
