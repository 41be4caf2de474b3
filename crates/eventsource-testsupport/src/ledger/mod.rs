//! One ledger and checker for every fault and load test, in the manner of Jepsen's queue
//! checkers: publishers record each event id with its outcome, consumers record each
//! handling, and [`Ledger::check`] judges the run per consumer group.
//!
//! - **lost**: published ok (or dead-lettered as expected), never handled in the group;
//! - **duplicated**: handled more than once, checked against the bound the scenario states
//!   (with the reason the design allows it);
//! - **unexpected**: handled but never published, or published with a definite failure;
//! - **indeterminate** publishes (a timeout, a dropped connection): those that arrived are
//!   "recovered", the rest are not losses (the publisher was told it does not know);
//! - **order violations** per aggregate, where the scenario promises order;
//! - **dead letters**: exactly the poison set, when the scenario names one;
//! - **time to recover**: from the moment the test healed the fault ([`Ledger::healed`])
//!   until every event published ok before it was handled and handling resumed.
//!
//! A failing check panics with the ids and the reason ([`Report::assert_ok`]).
//!
//! Handlings in other processes (the worker example) are written to a Redis list as
//! `group consumer id micros` lines and read back with [`Ledger::import_redis_list`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod check;
pub use check::{DuplicateBound, Expect, GroupReport, Report};

/// How a publish ended for the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Redis acknowledged the write.
    Ok,
    /// Definitely not written (refused, invalid, never sent).
    Failed,
    /// Unknown: a timeout or a connection dropped after the command was sent.
    Indeterminate,
}

#[derive(Debug, Clone)]
struct Published {
    aggregate: String,
    /// Position in publish order (per ledger), to judge per-aggregate order.
    seq: u64,
    outcome: Outcome,
    at: u64,
}

/// One handler run, as a consumer recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handling {
    /// The event id.
    pub id: String,
    /// The consumer group.
    pub group: String,
    /// The consumer name.
    pub consumer: String,
    /// Wall-clock time, microseconds since the Unix epoch (comparable across processes).
    pub at: u64,
    /// 1 for the first handling of this id in this group, 2 for the second, ...
    pub attempt: u32,
}

#[derive(Default)]
struct State {
    published: HashMap<String, Published>,
    next_seq: u64,
    handlings: Vec<Handling>,
    attempts: HashMap<(String, String), u32>,
    /// Per group: each handled id and its earliest handling time.
    first: HashMap<String, HashMap<String, u64>>,
    dead: HashMap<String, HashSet<String>>,
    healed: Option<u64>,
}

/// The record of one run. Share it behind an `Arc`; every method takes `&self`.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<State>,
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a publish of event `id` of `aggregate` with its outcome. Call it in publish
    /// order: the order of calls is the per-aggregate order judged by the checker.
    pub fn published(&self, id: impl fmt::Display, aggregate: impl fmt::Display, outcome: Outcome) {
        let mut s = self.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        let entry = s.published.entry(id.to_string()).or_insert(Published {
            aggregate: aggregate.to_string(),
            seq,
            outcome,
            at: now_micros(),
        });
        // A republish after an indeterminate or failed attempt upgrades the outcome.
        if outcome == Outcome::Ok
            || (outcome == Outcome::Indeterminate && entry.outcome == Outcome::Failed)
        {
            entry.outcome = outcome;
        }
    }

    /// Records a handler run of `id` by `consumer` of `group`; returns its attempt number.
    pub fn handled(&self, group: &str, consumer: &str, id: impl fmt::Display) -> u32 {
        self.handled_at(group, consumer, id.to_string(), now_micros())
    }

    fn handled_at(&self, group: &str, consumer: &str, id: String, at: u64) -> u32 {
        let mut s = self.lock();
        let attempt = s
            .attempts
            .entry((group.to_owned(), id.clone()))
            .and_modify(|n| *n += 1)
            .or_insert(1);
        let attempt = *attempt;
        let first = s
            .first
            .entry(group.to_owned())
            .or_default()
            .entry(id.clone())
            .or_insert(at);
        *first = (*first).min(at);
        s.handlings.push(Handling {
            id,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            at,
            attempt,
        });
        attempt
    }

    /// Records that `id` sits in the dead-letter queue for `group`.
    pub fn dead_lettered(&self, group: &str, id: impl fmt::Display) {
        self.lock()
            .dead
            .entry(group.to_owned())
            .or_default()
            .insert(id.to_string());
    }

    /// Marks the moment the test healed its fault (time to recover counts from here).
    pub fn healed(&self) {
        self.lock().healed = Some(now_micros());
    }

    /// Handlings recorded so far in `group` (with duplicates).
    pub fn handlings(&self, group: &str) -> usize {
        self.lock()
            .handlings
            .iter()
            .filter(|h| h.group == group)
            .count()
    }

    /// Distinct ids handled in `group`.
    pub fn handled_ids(&self, group: &str) -> HashSet<String> {
        self.lock()
            .first
            .get(group)
            .map(|ids| ids.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// When `id` was first handled in `group` (microseconds since the Unix epoch).
    pub fn first_handled_at(&self, group: &str, id: &str) -> Option<u64> {
        self.lock().first.get(group)?.get(id).copied()
    }

    /// For each event published ok and handled in `group`: from its publish to its first
    /// handling, in publish order.
    pub fn delivery_times(&self, group: &str) -> Vec<Duration> {
        let s = self.lock();
        let empty = HashMap::new();
        let first = s.first.get(group).unwrap_or(&empty);
        let mut out: Vec<(u64, Duration)> = s
            .published
            .iter()
            .filter(|(_, p)| p.outcome == Outcome::Ok)
            .filter_map(|(id, p)| {
                let at = first.get(id.as_str())?;
                Some((p.seq, Duration::from_micros(at.saturating_sub(p.at))))
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, d)| d).collect()
    }

    /// Handler runs per consumer of `group`.
    pub fn handlings_per_consumer(&self, group: &str) -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = HashMap::new();
        for h in self.lock().handlings.iter().filter(|h| h.group == group) {
            *out.entry(h.consumer.clone()).or_default() += 1;
        }
        out
    }

    /// Ids published with outcome ok.
    pub fn published_ok(&self) -> HashSet<String> {
        self.lock()
            .published
            .iter()
            .filter(|(_, p)| p.outcome == Outcome::Ok)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether every id published ok has been handled (or dead-lettered) in each group.
    /// Cheap enough to poll: a count comparison first, the ids only when the counts match.
    pub fn complete(&self, groups: &[&str]) -> bool {
        let s = self.lock();
        let ok: Vec<&String> = s
            .published
            .iter()
            .filter(|(_, p)| p.outcome == Outcome::Ok)
            .map(|(id, _)| id)
            .collect();
        groups.iter().all(|g| {
            let handled = s.first.get(*g);
            let dead = s.dead.get(*g);
            let known = handled.map_or(0, HashMap::len) + dead.map_or(0, HashSet::len);
            known >= ok.len()
                && ok.iter().all(|id| {
                    handled.is_some_and(|h| h.contains_key(*id))
                        || dead.is_some_and(|d| d.contains(*id))
                })
        })
    }

    /// Reads handlings another process appended to the Redis list `key` as
    /// `group consumer id micros` lines (the worker example writes them), then deletes
    /// nothing (the test's cleanup does). Returns how many were read.
    pub fn import_redis_list(&self, url: &str, key: &str) -> usize {
        let client = redis::Client::open(url).expect("a valid Redis URL");
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("the ledger's Redis answers");
        let lines: Vec<String> = redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .expect("LRANGE on the ledger list");
        let mut read = 0;
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            if let [group, consumer, id, at] = parts[..]
                && let Ok(at) = at.parse()
            {
                self.handled_at(group, consumer, id.to_owned(), at);
                read += 1;
            }
        }
        read
    }

    /// Judges the run against what the scenario promises.
    pub fn check(&self, expect: &Expect) -> Report {
        let s = self.lock();
        let mut groups = Vec::new();
        for group in &expect.groups {
            groups.push(check::check_group(&s, group, expect));
        }
        Report {
            scenario: expect.scenario.clone(),
            published: s.published.len(),
            published_ok: s
                .published
                .values()
                .filter(|p| p.outcome == Outcome::Ok)
                .count(),
            indeterminate: s
                .published
                .values()
                .filter(|p| p.outcome == Outcome::Indeterminate)
                .count(),
            failed: s
                .published
                .values()
                .filter(|p| p.outcome == Outcome::Failed)
                .count(),
            duplicate_bound: expect.duplicates.clone(),
            groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_finds_each_kind_of_problem() {
        let l = Ledger::new();
        l.published("a1", "A", Outcome::Ok);
        l.published("a2", "A", Outcome::Ok);
        l.published("b1", "B", Outcome::Ok);
        l.published("c1", "C", Outcome::Indeterminate);
        l.published("d1", "D", Outcome::Failed);
        l.published("p1", "P", Outcome::Ok);
        // Explicit times: a2 (published later) is handled before a1.
        for (at, consumer, id) in [
            (10, "w1", "a2"),
            (20, "w1", "a1"),
            (30, "w2", "a1"),
            (40, "w1", "c1"),
            (50, "w1", "d1"),
            (60, "w1", "zz"),
        ] {
            l.handled_at("g", consumer, id.to_owned(), at);
        }
        l.dead_lettered("g", "p1");
        let r = l.check(
            &Expect::new("self-test", &["g"])
                .ordered_per_aggregate()
                .poison(["p1"]),
        );
        let g = r.group("g");
        assert_eq!(g.lost, vec!["b1".to_owned()]);
        assert_eq!(g.duplicated, vec![("a1".to_owned(), 2)]);
        assert_eq!(g.unexpected.len(), 2, "{:?}", g.unexpected);
        assert_eq!(g.recovered_indeterminate, 1);
        assert_eq!(g.order_violations.len(), 1);
        assert!(g.dead_letter_mismatch.is_empty());
        assert_eq!(r.problems().len(), 4, "{:?}", r.problems());
        // Without a poison set, a dead letter is itself a problem.
        let r = l.check(&Expect::new("no poison named", &["g"]));
        assert!(
            r.group("g").dead_letter_mismatch[0].contains("p1"),
            "{:?}",
            r.group("g")
        );
    }

    #[test]
    fn a_clean_run_passes() {
        let l = Ledger::new();
        for i in 0..100 {
            l.published(i, i % 7, Outcome::Ok);
        }
        for i in 0..100 {
            l.handled("g", "w", i);
        }
        assert!(l.complete(&["g"]));
        let r = l.check(&Expect::new("clean", &["g"]).ordered_per_aggregate());
        assert!(r.problems().is_empty());
        r.assert_ok();
    }
}
