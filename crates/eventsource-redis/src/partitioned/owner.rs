//! Who owns which partition: membership heartbeats, rendezvous assignment, and the lease with
//! its fencing token (scripts, so each check-and-act is one step inside Redis).
//!
//! - Membership: every consumer of a group writes itself into the sorted set
//!   `{<prefix>}:members:<group>` with Redis's clock (`TIME`) as the score, and members not
//!   seen for one `partition_lease` are dropped in the same script.
//! - Assignment: rendezvous hashing of (member, partition) — every member computes the same
//!   map from the same member list, and a join or leave moves only the partitions that must
//!   move.
//! - Lease: `{<prefix>:p<i>}:owner:<group>` holds `<member>:<token>` with a time to live; the
//!   token comes from `INCR {<prefix>:p<i>}:fence:<group>`, so every hold has a new value and
//!   an owner that lost the lease can never pass the check again.

use std::sync::LazyLock;

use redis::Script;

/// Heartbeat. `KEYS[1]` members set. `ARGV`: member, lease ms, `1` to leave instead.
/// Returns the live members (this one included unless it left).
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], lease * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
",
    )
});

/// Takes a free partition. `KEYS[1]` owner key, `KEYS[2]` fence counter. `ARGV`: member,
/// lease ms. Returns `[1, value]` when taken (value `<member>:<token>`), `[0, holder]` when
/// someone holds it.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. ':' .. token
redis.call('SET', KEYS[1], value, 'PX', tonumber(ARGV[2]))
return {1, value}
",
    )
});

/// Extends a lease that is still ours. `KEYS[1]` owner key. `ARGV`: value, lease ms. 1 =
/// renewed, 0 = lost (expired, or someone else holds it).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
",
    )
});

/// Gives a lease up if it is still ours. `KEYS[1]` owner key. `ARGV`: value. 1 = released.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// FNV-1a over `bytes`, then SplitMix64's finaliser: stable across processes, versions and
/// languages (unlike `std`'s hasher), and well mixed for rendezvous scores.
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The member that owns `partition` among `members` (rendezvous, or highest-random-weight,
/// hashing: the member with the highest score for the partition; ties by name). `None` when
/// there are no members.
pub(crate) fn owner_of(partition: u32, members: &[String]) -> Option<&str> {
    let seed = u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    members
        .iter()
        .map(|m| (stable_hash(m.as_bytes(), seed), m.as_str()))
        .max()
        .map(|(_, m)| m)
}

/// The partitions of `0..partitions` that `me` owns among `members`.
pub(crate) fn assigned_to(me: &str, partitions: u32, members: &[String]) -> Vec<u32> {
    (0..partitions)
        .filter(|p| owner_of(*p, members) == Some(me))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_the_spread_is_even() {
        let members = names(4);
        let mut per_member = std::collections::HashMap::new();
        for p in 0..1200 {
            let owner = owner_of(p, &members).unwrap();
            *per_member.entry(owner).or_insert(0) += 1;
            // Every member computes the same owner from the same list in any order.
            let mut reversed = members.clone();
            reversed.reverse();
            assert_eq!(owner_of(p, &reversed), Some(owner));
        }
        assert_eq!(per_member.len(), 4);
        for (member, n) in per_member {
            assert!((240..=360).contains(&n), "{member} owns {n} of 1200");
        }
    }

    #[test]
    fn a_leaving_member_moves_only_its_own_partitions() {
        let before = names(5);
        let after: Vec<String> = before
            .iter()
            .filter(|m| *m != "worker-2")
            .cloned()
            .collect();
        let mut moved = 0;
        for p in 0..1000 {
            let old = owner_of(p, &before).unwrap();
            let new = owner_of(p, &after).unwrap();
            if old == "worker-2" {
                moved += 1;
            } else {
                assert_eq!(old, new, "partition {p} moved although its owner stayed");
            }
        }
        assert!(moved > 100, "worker-2 owned {moved} of 1000");
        assert_eq!(owner_of(0, &[]), None);
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: members of different versions in one group must agree on the owners.
        // (FNV-1a 64 then SplitMix64's finaliser, computed independently in Python.)
        assert_eq!(stable_hash(b"worker-1", 0), 0xecd1_384d_da7e_32f2);
    }
}
