//! Replicas and rolling deploys: two or three processes run the same subscription under one
//! name while 20,000 events are appended; the active one is killed (`kill -9`), stopped
//! (SIGTERM) and killed again, and a new process starts after each, as a rolling deploy
//! does. A read model applies every event exactly once, a projector gets every event with
//! at most one page again per kill, the stored checkpoint never moves backwards, and each
//! takeover is timed.
//!
//! The processes are this test binary started again with `--ignored --exact
//! replica_process` and the `ES_REPLICA_*` variables.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use eventsource_core::BoxFuture;
use eventsource_core::prelude::*;
use eventsource_core::store::StoredEvent;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_postgres::{
    PostgresEventStore, PostgresStoreConfig, ProjectionError, Projector, ReadModel,
    SubscriptionManager, SubscriptionOptions, SubscriptionState,
};
use sqlx::postgres::PgConnection;
use uuid::Uuid;

const EVENTS: usize = 20_000;
const PAGE: usize = 50;
const NAME: &str = "replicated";

/// Writes each event it is given into `{schema}.applied`, with the instance and the time.
struct Applied {
    table: String,
    instance: String,
}

impl Applied {
    fn insert<'e>(
        &'e self,
        events: &'e [StoredEvent],
        conn: impl sqlx::PgExecutor<'e> + 'e,
    ) -> BoxFuture<'e, Result<(), ProjectionError>> {
        Box::pin(async move {
            let ids: Vec<Uuid> = events.iter().map(|e| e.event.event_id()).collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (event_id, instance) SELECT id, $2 FROM UNNEST($1::uuid[]) AS id",
                self.table
            )))
            .bind(&ids)
            .bind(&self.instance)
            .execute(conn)
            .await?;
            Ok(())
        })
    }
}

impl ReadModel for Applied {
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        self.insert(events, tx)
    }

    fn reset<'a>(&'a self, _: &'a mut PgConnection) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A projector writing outside the checkpoint's transaction (its own autocommit insert).
struct AppliedOutside {
    applied: Applied,
    pool: sqlx::PgPool,
}

impl Projector for AppliedOutside {
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        self.applied.insert(events, &self.pool)
    }
}

/// Appends one new order's first `n` events in one append.
async fn append_order(store: &PostgresEventStore, n: u64) {
    let aggregate = Uuid::new_v4();
    let events: Vec<EventEnvelope> = (0..n)
        .map(|v| {
            Event::new(
                aggregate,
                OrderCreated {
                    customer_id: "c".into(),
                    total_amount: 1.0,
                },
            )
            .with_aggregate_version(v + 1)
            .into_envelope()
        })
        .collect();
    store
        .append(aggregate, "Order", &events, ExpectedVersion::NoStream)
        .await
        .unwrap();
}

async fn connect(schema: &str) -> PostgresEventStore {
    PostgresEventStore::connect(
        &database_url(),
        PostgresStoreConfig {
            schema: schema.to_owned(),
            max_connections: 4,
            ..Default::default()
        },
    )
    .await
    .expect("the tests' PostgreSQL answers")
}

/// One replica: runs the subscription until SIGTERM (a graceful stop) or a kill, printing
/// `active` when it becomes the active instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a replica process that the takeover tests start themselves"]
async fn replica_process() {
    let schema = std::env::var("ES_REPLICA_SCHEMA").expect("started by a takeover test");
    let kind = std::env::var("ES_REPLICA_KIND").expect("ES_REPLICA_KIND");
    let instance = std::env::var("ES_REPLICA_INSTANCE").expect("ES_REPLICA_INSTANCE");
    let store = connect(&schema).await;
    let applied = Applied {
        table: format!("{schema}.applied"),
        instance,
    };
    let options = SubscriptionOptions {
        page_size: PAGE,
        // A projector's checkpoint after every page: a kill repeats at most one page.
        checkpoint_interval: Duration::ZERO,
        ..Default::default()
    };
    let mut manager = SubscriptionManager::new(store.clone());
    let handle = match kind.as_str() {
        "read_model" => manager.add_read_model(NAME, applied, options),
        _ => manager.add_projector(
            NAME,
            AppliedOutside {
                applied,
                pool: store.pool().clone(),
            },
            options,
        ),
    }
    .expect("valid subscription");
    tokio::spawn(async move {
        let mut was_active = false;
        loop {
            let active = handle.status().active;
            if active != was_active {
                println!("{}", if active { "active" } else { "standing by" });
                was_active = active;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    println!("ready");
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    manager
        .run_until(async move {
            term.recv().await;
        })
        .await;
    println!("stopped");
}

struct Replica {
    name: String,
    child: tokio::process::Child,
}

async fn start_replica(schema: &str, kind: &str, name: &str) -> Replica {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "replica_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EVENTSOURCE_TEST_DATABASE_URL", database_url())
        .env("ES_REPLICA_SCHEMA", schema)
        .env("ES_REPLICA_KIND", kind)
        .env("ES_REPLICA_INSTANCE", name)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the test binary starts again as a replica");
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            // libtest prints "test replica_process ... " before the test's own output.
            if line.ends_with("ready") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(ready, "replica {name} did not start");
    // Keep reading so that its writes never block.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Replica {
        name: name.to_owned(),
        child,
    }
}

/// The instance that applied the newest event (the active one).
async fn last_applier(pool: &sqlx::PgPool, schema: &str) -> Option<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT instance FROM {schema}.applied ORDER BY at DESC, id DESC LIMIT 1"
    )))
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn distinct_applied(pool: &sqlx::PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(DISTINCT event_id) FROM {schema}.applied"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// How the active instance is replaced.
#[derive(Clone, Copy, Debug)]
enum Change {
    Kill,
    Stop,
}

/// Runs the scenario with `replicas` processes; returns the takeover times (kill or stop to
/// the first event applied by another instance) and the duplicate count.
async fn rolling_deploy(kind: &str, replicas: usize) -> (Vec<(Change, Duration)>, i64) {
    let schema = unique_schema(&format!("replicas_{kind}_{replicas}"));
    let _guard = DropSchema(schema.clone());
    let store = connect(&schema).await;
    let pool = store.pool().clone();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {schema}.applied (
             id BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, instance TEXT NOT NULL,
             at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE {schema}.checkpoint_moves (
             old_tx xid8, old_position BIGINT, new_tx xid8, new_position BIGINT);
         CREATE FUNCTION {schema}.record_move() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {schema}.checkpoint_moves VALUES (OLD.tx, OLD.position, NEW.tx, NEW.position);
             RETURN NEW;
         END $$;
         CREATE TRIGGER record_move BEFORE UPDATE ON {schema}.events_checkpoints
             FOR EACH ROW EXECUTE FUNCTION {schema}.record_move();"
    )))
    .execute(&pool)
    .await
    .unwrap();

    let mut running = Vec::new();
    for i in 0..replicas {
        running.push(start_replica(&schema, kind, &format!("v1-{i}")).await);
    }
    // 20,000 events in appends of 10, paced so that the changes fall mid-stream.
    let publisher = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..EVENTS / 10 {
                append_order(&store, 10).await;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };

    let mut takeovers = Vec::new();
    let plan = [
        (0.2, Change::Kill),
        (0.45, Change::Stop),
        (0.7, Change::Kill),
    ];
    for (step, (share, change)) in plan.into_iter().enumerate() {
        let target = (EVENTS as f64 * share) as i64;
        let deadline = Instant::now() + Duration::from_secs(300);
        while distinct_applied(&pool, &schema).await < target {
            assert!(Instant::now() < deadline, "stalled before step {step}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let active = last_applier(&pool, &schema)
            .await
            .expect("something applied");
        let index = running
            .iter()
            .position(|r| r.name == active)
            .expect("the active instance is a running replica");
        let mut old = running.remove(index);
        // A rolling deploy starts the new version before it stops an old one; a crash is
        // replaced after the fact (below), so a standby of the old version takes over.
        if let Change::Stop = change {
            running.push(start_replica(&schema, kind, &format!("v2-{step}")).await);
        }
        let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&pool)
            .await
            .unwrap();
        match change {
            Change::Kill => old.child.start_kill().unwrap(),
            Change::Stop => {
                let pid = old.child.id().unwrap().to_string();
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), old.child.wait()).await;
        // Taken over: the first event applied by another instance after the change.
        let deadline = Instant::now() + Duration::from_secs(120);
        let taken: chrono::DateTime<chrono::Utc> = loop {
            let next: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT MIN(at) FROM {schema}.applied WHERE at > $1 AND instance <> $2"
                )))
                .bind(at)
                .bind(&old.name)
                .fetch_one(&pool)
                .await
                .unwrap();
            if let Some(next) = next {
                break next;
            }
            assert!(
                Instant::now() < deadline,
                "nobody took over after {change:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        takeovers.push((change, (taken - at).to_std().unwrap_or_default()));
        if let Change::Kill = change {
            running.push(start_replica(&schema, kind, &format!("v2-{step}")).await);
        }
    }
    publisher.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while distinct_applied(&pool, &schema).await < EVENTS as i64 {
        assert!(Instant::now() < deadline, "not every event was applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in &mut running {
        let pid = r.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(60), r.child.wait()).await;
    }

    let (rows, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM {schema}.applied"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(distinct, EVENTS as i64, "every event applied");
    let backwards: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {schema}.checkpoint_moves \
         WHERE (new_tx, new_position) < (old_tx, old_position)"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(backwards, 0, "the stored checkpoint moved backwards");
    let appliers: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(DISTINCT instance) FROM {schema}.applied"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        appliers >= 3,
        "the work moved across instances ({appliers})"
    );
    let spans: Vec<(String, i64, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT instance, COUNT(*), MIN(at), MAX(at) FROM {schema}.applied GROUP BY instance ORDER BY 3"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
    for (i, n, a, b) in spans {
        println!(
            "  {i}: {n} applied from {} to {}",
            a.format("%H:%M:%S%.3f"),
            b.format("%H:%M:%S%.3f")
        );
    }
    let duplicates = rows - distinct;
    println!(
        "{kind}, {replicas} replicas: {EVENTS} events, {rows} applications, {duplicates} \
         duplicates, {appliers} instances applied; takeovers: {}",
        takeovers
            .iter()
            .map(|(c, d)| format!("{c:?} {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    (takeovers, duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_read_model_replicas_apply_every_event_once_through_a_rolling_deploy() {
    let (takeovers, duplicates) = rolling_deploy("read_model", 2).await;
    assert_eq!(
        duplicates, 0,
        "a read model applies every event exactly once"
    );
    assert_eq!(takeovers.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_read_model_replicas_apply_every_event_once_through_a_rolling_deploy() {
    let (takeovers, duplicates) = rolling_deploy("read_model", 3).await;
    assert_eq!(
        duplicates, 0,
        "a read model applies every event exactly once"
    );
    assert_eq!(takeovers.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_replicas_repeat_at_most_a_page_per_kill() {
    for replicas in [2, 3] {
        let (takeovers, duplicates) = rolling_deploy("projector", replicas).await;
        let kills = takeovers
            .iter()
            .filter(|(c, _)| matches!(c, Change::Kill))
            .count() as i64;
        assert!(
            duplicates <= kills * PAGE as i64,
            "{duplicates} duplicates with {kills} kills (bound: one page of {PAGE} per kill)"
        );
    }
}

/// Two managers in one process on one name: one is active, the other stands by and says so,
/// and takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reports_itself_and_takes_over_when_the_active_one_stops() {
    let (store, _guard) = store("replica_status", false).await;
    let recorder = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Uuid>::new()));
    struct Rec(std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>);
    impl Projector for Rec {
        fn handle<'a>(
            &'a self,
            events: &'a [StoredEvent],
        ) -> BoxFuture<'a, Result<(), ProjectionError>> {
            self.0
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.event.event_id()));
            Box::pin(async { Ok(()) })
        }
    }
    let options = SubscriptionOptions {
        takeover_poll: Duration::from_millis(100),
        leader_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let run = || {
        let mut manager = SubscriptionManager::new(store.clone());
        let handle = manager
            .add_projector("shared", Rec(recorder.clone()), options.clone())
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            manager
                .run_until(async {
                    let _ = stopped.await;
                })
                .await;
        });
        (handle, stop, task)
    };
    let wait = async |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (first, stop_first, first_task) = run();
    wait("the first instance becomes active", &|| {
        first.status().active
    })
    .await;
    let (second, stop_second, second_task) = run();
    wait("the second instance stands by", &|| {
        second.status().state == SubscriptionState::Standby
    })
    .await;
    assert!(!second.status().active);
    assert!(first.status().active);
    let aggregate = Uuid::new_v4();
    let event = Event::new(
        aggregate,
        OrderCreated {
            customer_id: "c".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope();
    store
        .append(aggregate, "Order", &[event], ExpectedVersion::NoStream)
        .await
        .unwrap();
    wait("the event arrives", &|| {
        !recorder.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(second.status().handled, 0, "the standby handled nothing");
    stop_first.send(()).unwrap();
    first_task.await.unwrap();
    wait("the standby takes over", &|| second.status().active).await;
    assert_eq!(second.status().takeovers, 1);
    assert_eq!(first.status().state, SubscriptionState::Idle);
    // Nothing handled twice: the first stored its checkpoint before it let go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorder.lock().unwrap().len(), 1);
    stop_second.send(()).unwrap();
    second_task.await.unwrap();
}

/// Invalid options and a name added twice are refused when the subscription is added,
/// naming the field.
#[tokio::test]
async fn invalid_subscription_options_are_refused_naming_the_field() {
    let (store, _guard) = store("replica_options", false).await;
    let mut manager = SubscriptionManager::new(store.clone());
    let nothing = || AppliedOutside {
        applied: Applied {
            table: "unused".into(),
            instance: "x".into(),
        },
        pool: store.pool().clone(),
    };
    let e = manager
        .add_projector(
            "x",
            nothing(),
            SubscriptionOptions {
                leader_timeout: Duration::from_secs(1),
                takeover_poll: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("SubscriptionOptions.leader_timeout"),
        "{e}"
    );
    assert_eq!(e.kind(), eventsource_core::ErrorKind::Config);
    let e = manager
        .add_projector(
            "x",
            nothing(),
            SubscriptionOptions {
                page_size: 0,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("SubscriptionOptions.page_size"),
        "{e}"
    );
    manager
        .add_projector("x", nothing(), SubscriptionOptions::default())
        .unwrap();
    let e = manager
        .add_projector("x", nothing(), SubscriptionOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("already runs"), "{e}");
}

/// A read model that writes a row per application (no unique key, so two instances' pages
/// never wait for each other); with `slow`, it sleeps in its first page (a holder frozen
/// mid-page).
struct Counting {
    table: String,
    slow: Option<Duration>,
    pages: std::sync::atomic::AtomicUsize,
}

impl ReadModel for Counting {
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let ids: Vec<Uuid> = events.iter().map(|e| e.event.event_id()).collect();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {} (event_id) SELECT id FROM UNNEST($1::uuid[]) AS id",
                self.table
            )))
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            let first = self.pages.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            if let (true, Some(pause)) = (first, self.slow) {
                tokio::time::sleep(pause).await;
            }
            Ok(())
        })
    }

    fn reset<'a>(&'a self, _: &'a mut PgConnection) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The active instance loses its lock in the middle of a page (its lock session is ended by
/// the server, as after a network partition) while its page's transaction goes on; the
/// standby takes over and applies that page. When the first one finishes the page, its
/// checkpoint write is refused and its transaction rolls back: every event applied once, and
/// the first one stands by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_its_lock_mid_page_cannot_commit_the_page() {
    let (store, guard) = store("replica_fence", false).await;
    let table = guard.0.clone();
    let seen = format!("{table}.seen");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {seen} (event_id UUID NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    for _ in 0..30 {
        append_order(&store, 1).await;
    }
    let options = SubscriptionOptions {
        page_size: 10,
        takeover_poll: Duration::from_millis(100),
        leader_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let instance = |slow: Option<Duration>| {
        let mut manager = SubscriptionManager::new(store.clone());
        let handle = manager
            .add_read_model(
                "fenced",
                Counting {
                    table: seen.clone(),
                    slow,
                    pages: Default::default(),
                },
                options.clone(),
            )
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            manager
                .run_until(async {
                    let _ = stopped.await;
                })
                .await;
        });
        (handle, stop, task)
    };
    let wait = async |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // The first instance takes the lock and freezes inside its first page for 3 s.
    let (first, stop_first, first_task) = instance(Some(Duration::from_secs(3)));
    wait("the first instance becomes active", &|| {
        first.status().active
    })
    .await;
    let (second, stop_second, second_task) = instance(None);
    wait("the second stands by", &|| {
        second.status().state == SubscriptionState::Standby
    })
    .await;
    // The server ends the first instance's lock session (the lock goes with it).
    let key = eventsource_core::support::fnv1a64(
        format!("eventsource subscription {table}.events_checkpoints/fenced").as_bytes(),
        0,
    );
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND classid::bigint = $1 AND objid::bigint = $2",
    )
    .bind((key >> 32) as i64)
    .bind((key & 0xffff_ffff) as i64)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        ended, 1,
        "the first instance's lock session was found and ended"
    );
    wait("the second takes over", &|| second.status().active).await;
    wait("the second applies everything", &|| {
        second.status().handled == 30
    })
    .await;
    // The first one's page ends after the takeover: refused, rolled back, standing by.
    wait("the first stands by again", &|| {
        !first.status().active && first.status().state == SubscriptionState::Standby
    })
    .await;
    let (rows, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM {seen}"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        (rows, distinct),
        (30, 30),
        "every event applied exactly once"
    );
    assert_eq!(
        first.status().handled,
        0,
        "the first instance committed nothing"
    );
    stop_first.send(()).unwrap();
    stop_second.send(()).unwrap();
    first_task.await.unwrap();
    second_task.await.unwrap();
}

/// A read model with the default options catching up over many full pages keeps its lock:
/// its checkpoint is stored with every page, so its own writes are never taken for another
/// instance's (regression: a full page within `checkpoint_interval` left the instance's idea
/// of the stored checkpoint behind, the next write was refused and it stood by and took the
/// lock again, every other page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_catching_up_keeps_its_lock() {
    let (store, guard) = store("replica_keeps", false).await;
    let table = format!("{}.seen", guard.0);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (event_id UUID NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    for _ in 0..40 {
        append_order(&store, 10).await;
    }
    let mut manager = SubscriptionManager::new(store.clone());
    let handle = manager
        .add_read_model(
            "keeps",
            Counting {
                table: table.clone(),
                slow: None,
                pages: Default::default(),
            },
            SubscriptionOptions {
                page_size: 10,
                ..Default::default()
            },
        )
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        manager
            .run_until(async {
                let _ = stopped.await;
            })
            .await;
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.status().handled < 400 {
        assert!(Instant::now() < deadline, "{:?}", handle.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(handle.status().takeovers, 1, "{:?}", handle.status());
    stop.send(()).unwrap();
    task.await.unwrap();
    let rows: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(rows, 400);
}

/// Dropping `run_until`'s future (instead of completing its shutdown) gives the lock up: a
/// standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_manager_s_future_hands_the_subscription_over() {
    let (store, _guard) = store("replica_dropped", false).await;
    let options = SubscriptionOptions {
        takeover_poll: Duration::from_millis(100),
        leader_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let start = || {
        let mut manager = SubscriptionManager::new(store.clone());
        let handle = manager
            .add_projector(
                "dropped",
                AppliedOutside {
                    applied: Applied {
                        table: "unused".into(),
                        instance: "x".into(),
                    },
                    pool: store.pool().clone(),
                },
                options.clone(),
            )
            .unwrap();
        let task = tokio::spawn(async move { manager.run_until(std::future::pending()).await });
        (handle, task)
    };
    let (first, first_task) = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !first.status().active {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (second, second_task) = start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.status().active);
    first_task.abort();
    let _ = first_task.await;
    // Far less than leader_timeout (30 s): the lock was given up, not timed out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.status().active {
        assert!(Instant::now() < deadline, "the lock was not given up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second_task.abort();
}

/// A standby's `lag()` is what the active instance has left, with the start snapshot of a
/// subscription started "at the end" (events committed before the start are not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reports_the_lag_the_active_one_has_left() {
    let (store, _guard) = store("replica_lag", false).await;
    for _ in 0..5 {
        append_order(&store, 1).await;
    }
    // Two events committed before the start but behind a writing transaction still open then:
    // they sort after the start position, and only the start snapshot says to skip them.
    let mut blocker = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *blocker)
        .await
        .unwrap();
    for _ in 0..2 {
        append_order(&store, 1).await;
    }
    let options = SubscriptionOptions {
        start: eventsource_postgres::StartFrom::End,
        takeover_poll: Duration::from_millis(100),
        leader_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let start = || {
        let mut manager = SubscriptionManager::new(store.clone());
        let handle = manager
            .add_projector(
                "lagging",
                AppliedOutside {
                    applied: Applied {
                        table: "unused".into(),
                        instance: "x".into(),
                    },
                    pool: store.pool().clone(),
                },
                options.clone(),
            )
            .unwrap();
        let task = tokio::spawn(async move { manager.run_until(std::future::pending()).await });
        (handle, task)
    };
    let (active, active_task) = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while active.status().state != SubscriptionState::Live {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocker.rollback().await.unwrap();
    active.pause();
    let (standby, standby_task) = start();
    while standby.status().state != SubscriptionState::Standby {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        append_order(&store, 1).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while active.lag().await.unwrap() != 3 {
        assert!(Instant::now() < deadline, "the active instance's lag");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        standby.lag().await.unwrap(),
        3,
        "the standby counts what the active one left"
    );
    active_task.abort();
    standby_task.abort();
}
