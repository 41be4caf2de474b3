//! The `scale_out` workload: publish and consume on one Redis node, and on a 3-master Redis
//! Cluster (a replica each) with 1 and with 12 partitions, side by side in one run. Every
//! server is this workload's own (`redis-server` on free loopback ports).
//!
//! Each target publishes `n` events (100 per call, default configuration) and then one
//! consumer in this process handles them all (default configuration but `block` 100 ms, so
//! the end is seen at once). On a machine with few cores the cluster shows the mechanism, not
//! a speed-up: its six servers and the client share the cores (`docs/performance.md` has the
//! model of how it grows with cores and nodes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_redis::{PartitionedEventBus, RedisEventBus, RedisEventBusConfig};
use eventsource_testsupport::cluster::OwnCluster;
use eventsource_testsupport::{OwnRedis, free_port, temp_dir};
use serde_json::{Value as Json, json};

use crate::fixture::{event, prefix, registry};
use crate::stats::{stat, stat_json};
use crate::{Error, Options};

/// Where a run publishes and consumes.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// `RedisEventBus` on one standalone node.
    OneNode,
    /// `PartitionedEventBus` on the cluster with this many partitions.
    Cluster(u32),
}

impl Target {
    fn key(self) -> String {
        match self {
            Self::OneNode => "one_node".to_owned(),
            Self::Cluster(p) => format!("cluster_p{p}"),
        }
    }
}

/// Either bus, for the few calls the workload makes.
enum Bus {
    One(RedisEventBus),
    Partitioned(PartitionedEventBus),
}

impl Bus {
    fn new(target: Target, url: &str, p: &str, name: &str) -> Result<Self, Error> {
        let config = RedisEventBusConfig::default()
            .redis_url(url)
            .stream_prefix(p)
            .consumer_group("bench")
            .consumer_name(name)
            .block_ms(100);
        Ok(match target {
            Target::OneNode => Self::One(RedisEventBus::new(config, registry())?),
            Target::Cluster(partitions) => Self::Partitioned(PartitionedEventBus::new(
                config.cluster(true).partitions(partitions),
                registry(),
            )?),
        })
    }

    async fn connect(&self) -> Result<(), Error> {
        match self {
            Self::One(b) => b.connect().await?,
            Self::Partitioned(b) => b.connect().await?,
        }
        Ok(())
    }

    async fn publish(&self, events: &[EventEnvelope]) -> Result<(), Error> {
        match self {
            Self::One(b) => b.publish_events(events).await.map(drop)?,
            Self::Partitioned(b) => b.publish_events(events).await.map(drop)?,
        }
        Ok(())
    }

    fn count_handled(&self) -> Arc<AtomicUsize> {
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        let handler = move |_e: EventEnvelope| {
            h.fetch_add(1, Ordering::Relaxed);
            async {}
        };
        match self {
            Self::One(b) => b.subscribe_to_all_events(handler),
            Self::Partitioned(b) => b.subscribe_to_all_events(handler),
        };
        handled
    }

    fn spawn_consumer(&self) -> tokio::task::JoinHandle<()> {
        match self {
            Self::One(b) => {
                let b = b.clone();
                tokio::spawn(async move {
                    let _ = b.start_consuming().await;
                })
            }
            Self::Partitioned(b) => {
                let b = b.clone();
                tokio::spawn(async move {
                    let _ = b.start_consuming().await;
                })
            }
        }
    }

    fn stop(&self) {
        match self {
            Self::One(b) => b.stop_consuming(),
            Self::Partitioned(b) => b.stop_consuming(),
        }
    }
}

/// One run on `target`: (publish events/s, consume events/s).
async fn run_once(
    target: Target,
    url: &str,
    events: &[EventEnvelope],
) -> Result<(f64, f64), Error> {
    let p = prefix("scale");
    let publisher = Bus::new(target, url, &p, "publisher")?;
    publisher.connect().await?;
    let t = Instant::now();
    for chunk in events.chunks(100) {
        publisher.publish(chunk).await?;
    }
    let publish = events.len() as f64 / t.elapsed().as_secs_f64();
    let consumer = Bus::new(target, url, &p, "consumer")?;
    let handled = consumer.count_handled();
    let t = Instant::now();
    let task = consumer.spawn_consumer();
    while handled.load(Ordering::Relaxed) < events.len() {
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("{}: not every event handled in 300 s", target.key()).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consume = events.len() as f64 / t.elapsed().as_secs_f64();
    consumer.stop();
    let _ = task.await;
    Ok((publish, consume))
}

/// Runs the workload: every target `repeat` times, alternating the order of the targets.
pub(crate) async fn workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let events: Vec<EventEnvelope> = (0..n).map(event).collect();
    eprintln!("  starting one node and a 3-master cluster with a replica each…");
    let dir = temp_dir("bench-scale-node");
    let port = free_port();
    let node = OwnRedis::start(port, &dir, &[]);
    let node_url = node.url();
    let cluster = tokio::task::spawn_blocking(|| OwnCluster::start("bench-scale"))
        .await
        .map_err(|e| e.to_string())?;
    let cluster_url = cluster.urls()[0].clone();
    let targets = [Target::OneNode, Target::Cluster(1), Target::Cluster(12)];
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); targets.len()];
    for run in 1..=o.repeat {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if run % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let url = match targets[i] {
                Target::OneNode => &node_url,
                Target::Cluster(_) => &cluster_url,
            };
            let (publish, consume) = run_once(targets[i], url, &events).await?;
            eprintln!(
                "  scale_out run {run}: {:<11} publish {publish:>9.0}/s   consume {consume:>9.0}/s",
                targets[i].key()
            );
            figures[i].0.push(publish);
            figures[i].1.push(consume);
        }
    }
    drop(cluster);
    drop(node);
    let mut out = json!({
        "n": n,
        "runs": o.repeat,
        "config": "publish: 100 events per call, RedisEventBusConfig::default(); consume: one \
                   consumer in the benchmark process, defaults but block 100 ms; one node: a \
                   standalone redis-server; cluster: 3 masters + 3 replicas, node timeout 2 s; \
                   every server on this machine",
    });
    for (target, (publish, consume)) in targets.iter().zip(&figures) {
        out[target.key()] = json!({
            "publish_events_per_sec": stat_json(stat(publish)),
            "consume_events_per_sec": stat_json(stat(consume)),
        });
    }
    Ok(out)
}
