//! The behaviour every [`SnapshotStore`] must show: one snapshot per aggregate, replaced by a
//! later version of the same shape or by any version of a newer shape, never by an older
//! version or an older shape (old and new versions of a service writing alternately during a
//! rolling deploy).

use chrono::Utc;
use uuid::Uuid;

use crate::snapshot::{Snapshot, SnapshotStore};

fn snapshot(id: Uuid, version: u64, schema_version: u32) -> Snapshot {
    Snapshot {
        aggregate_id: id,
        aggregate_type: "Order".into(),
        version,
        schema_version,
        state: serde_json::json!({ "at": version, "shape": schema_version }),
        taken_at: Utc::now(),
    }
}

async fn stored(store: &dyn SnapshotStore, id: Uuid) -> (u64, u32) {
    let s = store
        .load(id, "Order")
        .await
        .expect("load")
        .expect("a snapshot is stored");
    assert_eq!(
        s.state,
        serde_json::json!({ "at": s.version, "shape": s.schema_version }),
        "the state is the one saved with that version and shape"
    );
    (s.version, s.schema_version)
}

/// Runs every rule against `store`.
pub async fn run_all(store: &dyn SnapshotStore) {
    versions_only_move_forward(store).await;
    a_newer_shape_wins_over_an_older_one(store).await;
    nothing_stored_is_none(store).await;
}

/// Within one shape, a later version replaces, an older one does not.
pub async fn versions_only_move_forward(store: &dyn SnapshotStore) {
    let id = Uuid::new_v4();
    store.save(snapshot(id, 10, 1)).await.unwrap();
    assert_eq!(stored(store, id).await, (10, 1));
    store.save(snapshot(id, 20, 1)).await.unwrap();
    assert_eq!(stored(store, id).await, (20, 1));
    store.save(snapshot(id, 15, 1)).await.unwrap();
    assert_eq!(
        stored(store, id).await,
        (20, 1),
        "an older version is refused"
    );
    store.save(snapshot(id, 20, 1)).await.unwrap();
    assert_eq!(stored(store, id).await, (20, 1));
}

/// Old (shape 1) and new (shape 2) code save alternately, as during a rolling deploy: once a
/// shape-2 snapshot is stored, shape-1 saves never replace it, whatever their versions.
pub async fn a_newer_shape_wins_over_an_older_one(store: &dyn SnapshotStore) {
    let id = Uuid::new_v4();
    store.save(snapshot(id, 100, 1)).await.unwrap();
    store.save(snapshot(id, 90, 2)).await.unwrap();
    assert_eq!(
        stored(store, id).await,
        (90, 2),
        "a newer shape replaces an older one even at a lower version"
    );
    for (old, new) in [(110, 105), (130, 120), (150, 140)] {
        store.save(snapshot(id, old, 1)).await.unwrap();
        assert_eq!(
            stored(store, id).await.1,
            2,
            "an old pod's snapshot at version {old} replaced the new shape"
        );
        store.save(snapshot(id, new, 2)).await.unwrap();
        assert_eq!(stored(store, id).await, (new, 2));
    }
}

/// An aggregate without a snapshot loads as none.
pub async fn nothing_stored_is_none(store: &dyn SnapshotStore) {
    assert!(store.load(Uuid::new_v4(), "Order").await.unwrap().is_none());
}
