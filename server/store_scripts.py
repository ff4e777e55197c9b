"""The Lua scripts of the state store (`store.py`), one per atomic change.

Each runs inside Redis as one step, so a lost compare-and-set writes nothing and a failure
never leaves half a write. Every key a script touches belongs to one user (one hash tag), so
they also run on a Redis Cluster.
"""

# KEYS: session. ARGV: expected version, state, transcript, turns, now_ms, ttl_ms,
# write-state flag ("0": keep the stored state, e.g. learning off), expected learnt turns ("":
# any; a session stored before they were counted takes this value). -3: the learner committed
# since the state was read (merge onto its commit and retry).
COMMIT_TURN = """
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return -2 end
if cur ~= ARGV[1] then return -1 end
local learnt = redis.call('HGET', KEYS[1], 'learnt_turns')
if ARGV[8] ~= '' then
  if learnt and learnt ~= ARGV[8] then return -3 end
  if not learnt then redis.call('HSET', KEYS[1], 'learnt_turns', ARGV[8]) end
end
local new = tonumber(cur) + 1
redis.call('HSET', KEYS[1], 'version', new, 'transcript', ARGV[3],
           'turns', ARGV[4], 'updated_ms', ARGV[5])
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return new
"""

# KEYS: session. ARGV: expected version, expected learnt turns ("" = not counted yet), learnt
# turns after this update, state. The medium update of a session's turns, merged onto the state
# of version ARGV[1]: -1 when a turn committed since (merge again), -3 when another learner
# committed these turns first. The version is the turns' and stays.
COMMIT_LEARNT = """
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return -2 end
if (redis.call('HGET', KEYS[1], 'learnt_turns') or '') ~= ARGV[2] then return -3 end
if cur ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'learnt_turns', ARGV[3])
return tonumber(cur)
"""

# KEYS: lease. ARGV: token.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease. ARGV: token, ttl_ms.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: level, versions, session (or level when none), the new version's key, the key of the
# version that falls out of the kept window (or level when none). ARGV: expected, state,
# now_ms, source, version to drop ("0" = none), session version ("" = none). Versions are
# contiguous (each commit is current + 1), so exactly one falls out per commit.
COMMIT_LEVEL = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if cur ~= tonumber(ARGV[1]) then return -1 end
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then return -2 end
local new = cur + 1
redis.call('HSET', KEYS[1], 'version', new)
redis.call('HSET', KEYS[4], 'state', ARGV[2], 'created_ms', ARGV[3], 'source', ARGV[4])
redis.call('ZADD', KEYS[2], new, new)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'consolidated_version', ARGV[6]) end
if ARGV[5] ~= '0' then
  redis.call('DEL', KEYS[5])
  redis.call('ZREM', KEYS[2], ARGV[5])
end
return new
"""

# KEYS: session, the user's session index. ARGV: ttl_ms, session id, field, value, ...
CREATE_SESSION = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# KEYS: session. ARGV: "1" to include the state, then the meta field names.
# One script, so the meta and the state returned are of the same version.
LOAD_SESSION = """
local meta = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
local size = redis.call('HSTRLEN', KEYS[1], 'state')
local state = false
if ARGV[1] == '1' then state = redis.call('HGET', KEYS[1], 'state') end
return {meta, size, state}
"""

# KEYS: stream. ARGV: group, job id.
ACK_JOB = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: session. ARGV: now_ms, ttl_ms.
END_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ended', 1, 'updated_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
