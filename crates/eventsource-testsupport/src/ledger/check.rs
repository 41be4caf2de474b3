//! The checker: what a run promised ([`Expect`]) against what the ledger recorded, per
//! group ([`GroupReport`]), and the verdict ([`Report`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use super::{Outcome, State};

pub(super) fn check_group(s: &State, group: &str, expect: &Expect) -> GroupReport {
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
    pub(super) scenario: String,
    pub(super) groups: Vec<String>,
    pub(super) duplicates: DuplicateBound,
    pub(super) ordered: bool,
    pub(super) poison: Option<HashSet<String>>,
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
    /// From [`Ledger::healed`](super::Ledger::healed) until the events published ok before it were handled and the
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
