//! The lease's transitions against random sequences of events on a simulated clock: what is
//! renewed when, which count goes to Redis, and what a handler's start finds.

use proptest::prelude::*;

use super::*;

const RENEW_AFTER: Duration = Duration::from_millis(300);
const HANDLER_LIMIT: Duration = Duration::from_millis(900);

/// Something that can happen to the entries of one batch of four.
#[derive(Debug, Clone)]
enum Step {
    /// The clock moves on.
    Wait(u64),
    /// The renewer runs; each due entry gets this answer (3 ours, 2 deleted, 0 taken).
    Renew(i64),
    /// A handler is about to start on entry `i` (Redis answers `Run` when asked).
    Begin(usize),
    Finish(usize),
    LetGo(usize),
    /// The consumer stops: unfinished entries are given back.
    Release,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (1u64..400).prop_map(Step::Wait),
        prop_oneof![Just(3i64), Just(3), Just(2), Just(0)].prop_map(Step::Renew),
        (0usize..4).prop_map(Step::Begin),
        (0usize..4).prop_map(Step::Finish),
        (0usize..4).prop_map(Step::LetGo),
        Just(Step::Release),
    ];
    proptest::collection::vec(step, 1..60)
}

/// What the model says of one entry.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Queued,
    Running,
    Done,
    Gone,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn transitions_keep_their_promises(marked in proptest::collection::vec(any::<bool>(), 4), steps in steps()) {
        let lease = Lease::default();
        let start = Instant::now();
        let mut now = start;
        let ids = ["1-0", "2-0", "3-0", "4-0"];
        let batch = lease.register(
            ids.iter().zip(&marked).map(|(id, m)| ToHold { id, starts: 2, marked: *m }),
            now,
        );
        let mut model = [Model::Queued; 4];
        let mut lost = [false; 4];
        let mut running_since = [start; 4];
        for step in steps {
            match step {
                Step::Wait(ms) => now += Duration::from_millis(ms),
                Step::Renew(code) => {
                    let due = lease.due(now, RENEW_AFTER, HANDLER_LIMIT).expect("held");
                    for d in &due {
                        let i = ids.iter().position(|id| *id == d.id).unwrap();
                        // Never renewed: what is gone, lost, or a handler past its limit.
                        prop_assert!(model[i] != Model::Gone, "{} renewed while gone", d.id);
                        prop_assert!(!lost[i], "{} renewed while lost", d.id);
                        if model[i] == Model::Running {
                            prop_assert!(now.duration_since(running_since[i]) < HANDLER_LIMIT);
                        }
                        // The count written: starts (+1 when its handler began, or when
                        // queued and still marked).
                        match model[i] {
                            Model::Queued => prop_assert!(d.count == 2 || d.count == 3),
                            _ => prop_assert_eq!(d.count, 3),
                        }
                    }
                    let codes = vec![code; due.len()];
                    lease.renewed(&due, &codes, now);
                    if code != 3 {
                        for d in &due {
                            let i = ids.iter().position(|id| *id == d.id).unwrap();
                            if model[i] == Model::Queued {
                                lost[i] = true;
                            }
                        }
                    }
                }
                Step::Begin(i) => {
                    if model[i] != Model::Queued {
                        continue;
                    }
                    let answer = match lease.still_held(&batch, i, Some(RENEW_AFTER), now) {
                        Err(known) => known,
                        Ok((id, count)) => {
                            prop_assert_eq!(id, ids[i]);
                            prop_assert_eq!(count, 3, "the start recorded is starts + 1");
                            lease.begun(&batch, i, Begin::Run, now);
                            Begin::Run
                        }
                    };
                    if lost[i] {
                        // What the renewer found comes back instead of a run.
                        prop_assert_ne!(answer, Begin::Run);
                        model[i] = Model::Gone;
                    } else {
                        prop_assert_eq!(answer, Begin::Run);
                        model[i] = Model::Running;
                        running_since[i] = now;
                    }
                }
                Step::Finish(i) => {
                    if model[i] == Model::Running {
                        lease.finished(&batch, i);
                        model[i] = Model::Done;
                    }
                }
                Step::LetGo(i) => {
                    if model[i] != Model::Gone {
                        lease.let_go(&batch, i);
                        model[i] = Model::Gone;
                    }
                }
                Step::Release => {
                    let given_back = lease.take_unfinished(&batch);
                    for (id, count) in &given_back {
                        let i = ids.iter().position(|x| x == id).unwrap();
                        prop_assert!(matches!(model[i], Model::Queued | Model::Running));
                        prop_assert!(!lost[i]);
                        if model[i] == Model::Running {
                            prop_assert_eq!(*count, 3);
                        }
                        model[i] = Model::Gone;
                    }
                    // Nothing else was given back.
                    for i in 0..4 {
                        if matches!(model[i], Model::Queued | Model::Running) {
                            prop_assert!(lost[i], "{} not given back", ids[i]);
                        }
                    }
                }
            }
            for i in 0..4 {
                prop_assert_eq!(lease.holds(ids[i]), model[i] != Model::Gone, "holds({})", ids[i]);
            }
        }
        drop(batch);
        prop_assert!(lease.due(now, RENEW_AFTER, HANDLER_LIMIT).is_none(), "a dropped batch is forgotten");
        for id in ids {
            prop_assert!(!lease.holds(id));
        }
    }

    /// Renewals come at least every `RENEW_AFTER` for what is held and not lost (queued,
    /// done, or running within the handler limit), given the renewer runs often enough.
    #[test]
    fn what_is_held_is_renewed_in_time(ticks in proptest::collection::vec(1u64..100, 1..80)) {
        let lease = Lease::default();
        let mut now = Instant::now();
        let batch = lease.register([ToHold { id: "1-0", starts: 0, marked: true }], now);
        let mut last = now;
        for ms in ticks {
            now += Duration::from_millis(ms);
            let due = lease.due(now, RENEW_AFTER, HANDLER_LIMIT).unwrap();
            if !due.is_empty() {
                lease.renewed(&due, &[3], now);
                last = now;
            }
            // Due at the latest one tick after the renewal interval (or the unmark time).
            prop_assert!(now.duration_since(last) < RENEW_AFTER + Duration::from_millis(100));
        }
        drop(batch);
    }
}

#[test]
fn a_fresh_marked_delivery_starts_without_a_round_trip_and_a_waiting_one_does_not() {
    let lease = Lease::default();
    let now = Instant::now();
    let batch = lease.register(
        [
            ToHold {
                id: "1-0",
                starts: 0,
                marked: true,
            },
            ToHold {
                id: "2-0",
                starts: 1,
                marked: true,
            },
        ],
        now,
    );
    assert_eq!(
        lease.still_held(&batch, 0, Some(RENEW_AFTER), now),
        Err(Begin::Run)
    );
    // The second waited past the unmark time: the renewer set its count back to its starts.
    let later = now + UNMARK_AFTER + Duration::from_millis(1);
    let due = lease.due(later, RENEW_AFTER, HANDLER_LIMIT).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].id.as_str(), due[0].count), ("2-0", 1));
    lease.renewed(&due, &[3], later);
    assert_eq!(
        lease.still_held(&batch, 1, Some(RENEW_AFTER), later),
        Ok(("2-0".to_owned(), 2))
    );
}
