//! The cluster of a test's own forms (3 masters, 3 replicas, every slot served), spreads
//! per-partition hash tags over its masters, and survives a master killed with SIGKILL: its
//! replica is promoted and every slot is served again.

use std::collections::BTreeSet;
use std::time::Duration;

use eventsource_testsupport::cluster::OwnCluster;

#[test]
fn a_cluster_of_our_own_forms_spreads_partitions_and_fails_over() {
    let mut cluster = OwnCluster::start("forms");
    let topology = cluster.topology();
    assert_eq!(
        topology.iter().filter(|n| n.master).count(),
        3,
        "{topology:?}"
    );
    assert_eq!(
        topology.iter().filter(|n| !n.master).count(),
        3,
        "{topology:?}"
    );

    // Twelve partitions, each one hash tag (`{orders:p<i>}`: its stream, dead letters and
    // bookkeeping share a slot), land on all three masters.
    let masters: BTreeSet<u16> = (0..12)
        .map(|i| {
            let slot = cluster.keyslot(&format!("{{orders:p{i}}}:stream"));
            assert_eq!(
                slot,
                cluster.keyslot(&format!("{{orders:p{i}}}:stream_dlq"))
            );
            cluster.master_of(slot).expect("a master serves every slot")
        })
        .collect();
    assert_eq!(
        masters.len(),
        3,
        "12 partitions over 3 masters: {masters:?}"
    );

    // Kill the master of partition 0: its replica takes the slots over.
    let slot = cluster.keyslot("{orders:p0}:stream");
    let old = cluster.master_of(slot).unwrap();
    cluster.kill(old);
    let took = cluster.wait_until_ok(Duration::from_secs(60));
    let new = cluster.master_of(slot).expect("promoted");
    assert_ne!(new, old);
    eprintln!("failover: port {old} -> {new} in {took:?}");
}
