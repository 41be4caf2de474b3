//! The Lua scripts that make multi-step changes atomic inside Redis.
//!
//! Each one replaces a sequence of commands whose interleaving with another consumer (or
//! operator) could lose or duplicate work: check-then-act on the pending list. They run with
//! `EVALSHA` (loaded with `SCRIPT LOAD` on first use by [`redis::Script`]), so the ACL of a
//! consumer needs `+evalsha +script|load` plus the commands the scripts call (see the README).
//!
//! Return values are small integer codes (documented per script) so the Rust side can count
//! every outcome instead of guessing.

use std::sync::LazyLock;

use redis::Script;

/// Renews (or releases) entries a consumer still holds.
///
/// `KEYS[1]` stream. `ARGV`: group, consumer, idle (`""` = reset to 0, or ms to set), then
/// `id, count` pairs. For each id: 0 = not pending any more (acknowledged, or the group was
/// reset), 1 = another consumer owns it now, 2 = deleted from the stream (Redis dropped it from
/// the pending list), 3 = renewed: still ours, idle time reset (or set), delivery count set to
/// `count`. `XCLAIM ... JUSTID` does not count a delivery by itself.
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 0 then
    out[#out + 1] = 0
  elseif p[1][2] ~= ARGV[2] then
    out[#out + 1] = 1
  else
    local c
    if ARGV[3] == '' then
      c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    else
      c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    end
    if #c == 0 then out[#out + 1] = 2 else out[#out + 1] = 3 end
  end
end
return out
",
    )
});

/// Reads a page of the consumer's own pending entries without counting a delivery, and
/// renews them (idle time reset) so no other consumer's recovery takes them meanwhile.
///
/// `KEYS[1]` stream. `ARGV`: group, consumer, start (`-` or `(id`), count. Returns
/// `[id, deliveries, fields]` per entry, or `[id, deliveries]` for an entry deleted from the
/// stream while pending (Redis removes it from the pending list then).
pub(crate) static READ_OWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', tonumber(ARGV[4]), ARGV[2])
local out = {}
for i, r in ipairs(rows) do
  local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, r[1], 'JUSTID')
  if #c == 0 then
    out[i] = {r[1], r[4]}
  else
    local e = redis.call('XRANGE', KEYS[1], r[1], r[1])
    out[i] = {r[1], r[4], e[1][2]}
  end
end
return out
",
    )
});

/// Claims idle entries for recovery, counting one delivery each.
///
/// `KEYS[1]` stream. `ARGV`: group, consumer, min idle ms, then ids. Per id: `[id, 0]` when it
/// is no longer idle enough or not pending (its owner renewed or acknowledged it), `[id, -1]`
/// when it was deleted from the stream (Redis drops it from the pending list), otherwise
/// `[id, deliveries after the claim, fields]`.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[3]), id, id, 1)
  if #p == 0 then
    out[#out + 1] = {id, 0}
  else
    local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), id)
    if #c == 0 or not c[1] then
      out[#out + 1] = {id, -1}
    else
      out[#out + 1] = {id, p[1][4] + 1, c[1][2]}
    end
  end
end
return out
",
    )
});

/// Moves one pending entry to the dead-letter stream, only if the acknowledgement applies.
///
/// `KEYS[1]` stream, `KEYS[2]` dead-letter stream, `KEYS[3]` the group's failure-reason key,
/// `KEYS[4]` the partition's owner key (or any key when there is no fence).
/// `ARGV`: group, consumer, id, min idle (`-1`: the entry must be this consumer's; otherwise
/// another owner's entry must be idle at least this long), retry count, reason, DLQ enabled
/// (`1`/`0`), timestamp, prefer the recorded reason (`1`/`0`), fence (`""`: none; else the
/// value `KEYS[4]` must hold).
///
/// Returns `[5]` when the fence does not hold (this consumer lost the partition: nothing
/// written), `[0]` not pending (someone acknowledged it: nothing written), `[1]` someone else
/// holds it actively (nothing written), `[2]` deleted from the stream (acknowledged, nothing
/// to write), `[3, reason, dlq id]` dead-lettered, `[4, reason]` acknowledged without a dead
/// letter (DLQ disabled). The dead letter copies the entry's fields byte for byte.
pub(crate) static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[10] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[10] then return {5} end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return {0} end
local min_idle = tonumber(ARGV[4])
if min_idle < 0 then
  if p[1][2] ~= ARGV[2] then return {1} end
elseif p[1][3] < min_idle then
  return {1}
end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
local reason = ARGV[6]
if ARGV[9] == '1' then
  local recorded = redis.call('GET', KEYS[3])
  if recorded then reason = recorded end
end
redis.call('DEL', KEYS[3])
if #e == 0 then return {2} end
if ARGV[7] ~= '1' then return {4, reason} end
local skip = {original_message_id = true, retry_count = true, dlq_timestamp = true, error = true, consumer_group = true}
local f = e[1][2]
local args = {}
for i = 1, #f, 2 do
  if not skip[f[i]] then
    args[#args + 1] = f[i]
    args[#args + 1] = f[i + 1]
  end
end
for _, v in ipairs({'original_message_id', ARGV[3], 'retry_count', ARGV[5], 'dlq_timestamp', ARGV[8], 'error', reason, 'consumer_group', ARGV[1]}) do
  args[#args + 1] = v
end
local id = redis.call('XADD', KEYS[2], '*', unpack(args))
return {3, reason, id}
",
    )
});

/// Puts a dead letter back on the main stream and deletes it, at most once.
///
/// `KEYS[1]` dead-letter stream, `KEYS[2]` stream. `ARGV`: dead-letter id, group scope (`""`:
/// any). Returns `[0]` when no such dead letter exists (already replayed or purged), `[1,
/// group]` when it belongs to another group than the scope (untouched), `[2, new id]` when
/// replayed. The replayed entry carries the original fields byte for byte, minus the
/// dead-letter fields, plus `replay_group` naming the group that dead-lettered it.
pub(crate) static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return {0} end
local f = e[1][2]
local group = ''
for i = 1, #f, 2 do
  if f[i] == 'consumer_group' then group = f[i + 1] end
end
if ARGV[2] ~= '' and group ~= ARGV[2] then return {1, group} end
local skip = {original_message_id = true, retry_count = true, dlq_timestamp = true, error = true, consumer_group = true, replay_group = true}
local args = {}
for i = 1, #f, 2 do
  if not skip[f[i]] then
    args[#args + 1] = f[i]
    args[#args + 1] = f[i + 1]
  end
end
if group ~= '' then
  args[#args + 1] = 'replay_group'
  args[#args + 1] = group
end
local id = redis.call('XADD', KEYS[2], '*', unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return {2, id}
",
    )
});

/// Deletes a dead letter, only if it belongs to the group scope.
///
/// `KEYS[1]` dead-letter stream. `ARGV`: dead-letter id, group scope (`""`: any). Returns `[0]`
/// when it does not exist, `[1, group]` when it belongs to another group, `[2]` when deleted.
pub(crate) static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return {0} end
local f = e[1][2]
local group = ''
for i = 1, #f, 2 do
  if f[i] == 'consumer_group' then group = f[i + 1] end
end
if ARGV[2] ~= '' and group ~= ARGV[2] then return {1, group} end
redis.call('XDEL', KEYS[1], ARGV[1])
return {2}
",
    )
});

/// Acknowledges entries only while the partition's owner key holds this consumer's lease.
///
/// `KEYS[1]` stream, `KEYS[2]` owner key. `ARGV`: group, fence value, then ids. Returns -1
/// (nothing acknowledged) when the owner key holds anything else, else XACK's count. The ids
/// go to XACK 500 at a time: `unpack` of thousands of values overflows Lua's C stack.
pub(crate) static FENCED_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local acked = 0
for i = 3, #ARGV, 500 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
return acked
",
    )
});

/// Deletes consumer `ARGV[2]` of group `ARGV[1]` only if it has nothing pending; -1 otherwise.
pub(crate) static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
",
    )
});
