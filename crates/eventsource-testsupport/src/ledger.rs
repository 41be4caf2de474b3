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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
            groups.push(check_group(&s, group, expect));
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

fn check_group(s: &State, group: &str, expect: &Expect) -> GroupReport {
    let mut times: HashMap<&str, u32> = HashMap::new();
    let empty = HashMap::new();
    let first_at = s.first.get(group).unwrap_or(&empty);
    let mut unexpected = BTreeMap::new();
    // Per aggregate, (first handling time, publish position, id), sorted by time below.
    let mut order: HashMap<&str, Vec<(u64, u64, &str)>> = HashMap::new();
    for h in s.handlings.iter().filter(|h| h.group == group) {
        let n = times.entry(h.id.as_str()).or_default();
        *n += 1;
        match s.published.get(&h.id) {
            None => {
                unexpected.insert(h.id.clone(), "handled but never published");
            }
            Some(p) if p.outcome == Outcome::Failed => {
                unexpected.insert(h.id.clone(), "handled but its publish failed definitely");
            }
            Some(p) => {
                if *n == 1 {
                    order.entry(p.aggregate.as_str()).or_default().push((
                        first_at[&h.id],
                        p.seq,
                        h.id.as_str(),
                    ));
                }
            }
        }
    }
    let dead = s.dead.get(group).cloned().unwrap_or_default();
    let mut lost: Vec<String> = s
        .published
        .iter()
        .filter(|(id, p)| {
            p.outcome == Outcome::Ok && !times.contains_key(id.as_str()) && !dead.contains(*id)
        })
        .map(|(id, _)| id.clone())
        .collect();
    lost.sort();
    let mut duplicated: Vec<(String, u32)> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id.to_string(), *n))
        .collect();
    duplicated.sort();
    let extra: usize = duplicated.iter().map(|(_, n)| (*n - 1) as usize).sum();
    let recovered_indeterminate = s
        .published
        .iter()
        .filter(|(id, p)| p.outcome == Outcome::Indeterminate && times.contains_key(id.as_str()))
        .count();
    let mut order_violations = Vec::new();
    if expect.ordered {
        for (aggregate, handled) in &mut order {
            handled.sort();
            for pair in handled.windows(2) {
                if pair[1].1 < pair[0].1 {
                    order_violations.push(format!(
                        "aggregate {aggregate}: {} (published later) handled before {}",
                        pair[0].2, pair[1].2
                    ));
                }
            }
        }
        order_violations.sort();
    }
    let mut dead_letter_mismatch = Vec::new();
    if expect.poison.is_none() {
        let mut unexpected_dead: Vec<&String> = dead.iter().collect();
        unexpected_dead.sort();
        for id in unexpected_dead {
            dead_letter_mismatch.push(format!(
                "{id}: dead-lettered, and the scenario names no poison"
            ));
        }
    }
    if let Some(poison) = &expect.poison {
        for id in dead.difference(poison) {
            dead_letter_mismatch.push(format!("{id}: dead-lettered but not poison"));
        }
        for id in poison.difference(&dead) {
            dead_letter_mismatch.push(format!("{id}: poison but not dead-lettered"));
        }
        dead_letter_mismatch.sort();
    }
    // Until the backlog from before the heal is handled and handling has resumed (the
    // first handling after the heal), whichever is later.
    let time_to_recover = s.healed.map(|healed| {
        let backlog = s
            .published
            .iter()
            .filter(|(_, p)| p.outcome == Outcome::Ok && p.at <= healed)
            .filter_map(|(id, _)| first_at.get(id))
            .max()
            .copied()
            .unwrap_or(healed);
        let resumed = s
            .handlings
            .iter()
            .filter(|h| h.group == group && h.at >= healed)
            .map(|h| h.at)
            .min()
            .unwrap_or(healed);
        Duration::from_micros(backlog.max(resumed).saturating_sub(healed))
    });
    GroupReport {
        group: group.to_owned(),
        handled: times.len(),
        handlings: times.values().map(|n| *n as usize).sum(),
        lost,
        duplicated,
        extra_handlings: extra,
        unexpected: unexpected
            .into_iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect(),
        recovered_indeterminate,
        order_violations,
        dead_lettered: dead.len(),
        dead_letter_mismatch,
        time_to_recover,
    }
}

/// How many duplicate handlings a scenario allows, and why the design allows them.
#[derive(Debug, Clone)]
pub struct DuplicateBound {
    /// Extra handlings allowed per group.
    pub max: usize,
    /// The design's reason (printed with the report).
    pub why: String,
}

/// What a scenario promises; built with the methods below.
#[derive(Debug, Clone)]
pub struct Expect {
    scenario: String,
    groups: Vec<String>,
    duplicates: DuplicateBound,
    ordered: bool,
    poison: Option<HashSet<String>>,
}

impl Expect {
    /// Scenario `name` (e.g. "R-24 blackhole"), judged for each of `groups`; by default no
    /// duplicates, no order promise, no dead-letter expectation.
    pub fn new(name: &str, groups: &[&str]) -> Self {
        Self {
            scenario: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            duplicates: DuplicateBound {
                max: 0,
                why: "no fault can cause a redelivery here".to_owned(),
            },
            ordered: false,
            poison: None,
        }
    }

    /// Allows up to `max` extra handlings per group, for the stated reason.
    pub fn duplicates_at_most(mut self, max: usize, why: &str) -> Self {
        self.duplicates = DuplicateBound {
            max,
            why: why.to_owned(),
        };
        self
    }

    /// Promises per-aggregate order of first handlings in each group.
    pub fn ordered_per_aggregate(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// The dead-letter queue of each group must hold exactly these ids.
    pub fn poison(mut self, ids: impl IntoIterator<Item = impl fmt::Display>) -> Self {
        self.poison = Some(ids.into_iter().map(|i| i.to_string()).collect());
        self
    }
}

/// The checker's verdict for one group.
#[derive(Debug, Clone)]
pub struct GroupReport {
    /// The group.
    pub group: String,
    /// Distinct ids handled.
    pub handled: usize,
    /// Handler runs (with duplicates).
    pub handlings: usize,
    /// Published ok, never handled nor dead-lettered.
    pub lost: Vec<String>,
    /// Ids handled more than once, with how often.
    pub duplicated: Vec<(String, u32)>,
    /// Handler runs beyond the first, summed.
    pub extra_handlings: usize,
    /// Handled ids that were never published ok or indeterminately, with the reason.
    pub unexpected: Vec<String>,
    /// Indeterminate publishes that arrived.
    pub recovered_indeterminate: usize,
    /// Per-aggregate order broken (only when promised).
    pub order_violations: Vec<String>,
    /// Ids dead-lettered for this group.
    pub dead_lettered: usize,
    /// Differences between the dead letters and the poison set (when one is named).
    pub dead_letter_mismatch: Vec<String>,
    /// From [`Ledger::healed`] until the events published ok before it were handled and the
    /// first handling after it.
    pub time_to_recover: Option<Duration>,
}

/// The checker's verdict for a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Distinct ids published (any outcome).
    pub published: usize,
    /// Of which acknowledged by Redis.
    pub published_ok: usize,
    /// Of which indeterminate.
    pub indeterminate: usize,
    /// Of which definitely failed.
    pub failed: usize,
    /// The duplicate bound the scenario allows.
    pub duplicate_bound: DuplicateBound,
    /// Per group.
    pub groups: Vec<GroupReport>,
}

impl Report {
    /// Everything that breaks the scenario's promises, one line each (empty when it held).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let show = |ids: &[String]| -> String {
            let mut s = ids.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            if ids.len() > 10 {
                s.push_str(&format!(" and {} more", ids.len() - 10));
            }
            s
        };
        for g in &self.groups {
            if !g.lost.is_empty() {
                out.push(format!(
                    "group {}: lost {} (published ok, never handled): {}",
                    g.group,
                    g.lost.len(),
                    show(&g.lost)
                ));
            }
            if g.extra_handlings > self.duplicate_bound.max {
                let ids: Vec<String> = g
                    .duplicated
                    .iter()
                    .map(|(id, n)| format!("{id}×{n}"))
                    .collect();
                out.push(format!(
                    "group {}: {} duplicate handlings, more than the bound {} ({}): {}",
                    g.group,
                    g.extra_handlings,
                    self.duplicate_bound.max,
                    self.duplicate_bound.why,
                    show(&ids)
                ));
            }
            if !g.unexpected.is_empty() {
                out.push(format!(
                    "group {}: unexpected {}: {}",
                    g.group,
                    g.unexpected.len(),
                    show(&g.unexpected)
                ));
            }
            if !g.order_violations.is_empty() {
                out.push(format!(
                    "group {}: order violations {}: {}",
                    g.group,
                    g.order_violations.len(),
                    show(&g.order_violations)
                ));
            }
            if !g.dead_letter_mismatch.is_empty() {
                out.push(format!(
                    "group {}: dead letters differ from the poison set: {}",
                    g.group,
                    show(&g.dead_letter_mismatch)
                ));
            }
        }
        out
    }

    /// Panics with every problem (ids and reasons) unless the run kept its promises; prints
    /// the summary either way (`cargo test -- --nocapture` shows it).
    pub fn assert_ok(&self) -> &Self {
        eprintln!("{self}");
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "{}: {}",
            self.scenario,
            problems.join("; ")
        );
        self
    }

    /// The report of `group`.
    ///
    /// # Panics
    /// When the scenario did not name that group.
    pub fn group(&self, group: &str) -> &GroupReport {
        self.groups
            .iter()
            .find(|g| g.group == group)
            .unwrap_or_else(|| panic!("the scenario names no group {group}"))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[ledger] {}: published {} (ok {}, indeterminate {}, failed {})",
            self.scenario, self.published, self.published_ok, self.indeterminate, self.failed
        )?;
        for g in &self.groups {
            write!(
                f,
                "\n[ledger]   group {}: handled {} ({} runs), lost {}, duplicated {} (bound {}: {}), \
                 unexpected {}, indeterminate recovered {}, order violations {}, dead-lettered {}",
                g.group,
                g.handled,
                g.handlings,
                g.lost.len(),
                g.extra_handlings,
                self.duplicate_bound.max,
                self.duplicate_bound.why,
                g.unexpected.len(),
                g.recovered_indeterminate,
                g.order_violations.len(),
                g.dead_lettered
            )?;
            if let Some(t) = g.time_to_recover {
                write!(f, ", time to recover {:.2} s", t.as_secs_f64())?;
            }
        }
        Ok(())
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
