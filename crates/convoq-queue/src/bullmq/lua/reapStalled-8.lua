--[[
  convoq: take back the active jobs whose lock has expired, in one pass.

  BullMQ's own check (moveStalledJobsToWait) is two-phase (a job must be seen in the 'stalled'
  set on one check and lack its lock on the next) and defers the failure of a job that stalled
  too often to the next worker that picks it up. This script keeps BullMQ's keys, fields and
  events but takes a job back as soon as its lock is gone, and fails a job that stalled more
  than allowed at once, with BullMQ's reason.

    Input:
      KEYS[1] 'active' (LIST)
      KEYS[2] 'wait' (LIST)
      KEYS[3] 'meta' (HASH)
      KEYS[4] 'marker' (ZSET)
      KEYS[5] events stream (STREAM)
      KEYS[6] 'failed' (ZSET)
      KEYS[7] 'stalled' (SET)
      KEYS[8] 'metrics:failed' (HASH)
      ARGV[1] key prefix (queue key with a trailing colon)
      ARGV[2] timestamp (ms)
      ARGV[3] max stalled count
    Output:
      { ids taken back to wait, ids failed }
    Events:
      'waiting' and 'stalled' for a job taken back, 'failed' for a job failed.
]]
local rcall = redis.call
local prefix = ARGV[1]
local timestamp = ARGV[2]
local maxStalled = tonumber(ARGV[3])
local reason = "job stalled more than allowable limit"
local takenBack = {}
local failed = {}
local active = rcall("LRANGE", KEYS[1], 0, -1)
for _, jobId in ipairs(active) do
  if string.sub(jobId, 1, 2) ~= "0:" then
    local jobKey = prefix .. jobId
    if rcall("EXISTS", jobKey .. ":lock") == 0 and rcall("EXISTS", jobKey) == 1 then
      if rcall("LREM", KEYS[1], 1, jobId) > 0 then
        rcall("SREM", KEYS[7], jobId)
        local stalledCount = rcall("HINCRBY", jobKey, "stc", 1)
        if stalledCount > maxStalled then
          rcall("HSET", jobKey, "failedReason", reason, "finishedOn", timestamp)
          rcall("HDEL", jobKey, "defa")
          rcall("ZADD", KEYS[6], timestamp, jobId)
          rcall("XADD", KEYS[5], "*", "event", "failed", "jobId", jobId,
                "failedReason", reason, "prev", "active")
          rcall("HINCRBY", KEYS[8], "count", 1)
          table.insert(failed, jobId)
        else
          rcall("RPUSH", KEYS[2], jobId)
          if rcall("HEXISTS", KEYS[3], "paused") == 0 then
            rcall("ZADD", KEYS[4], 0, "0")
          end
          rcall("XADD", KEYS[5], "*", "event", "waiting", "jobId", jobId, "prev", "active")
          rcall("XADD", KEYS[5], "*", "event", "stalled", "jobId", jobId)
          table.insert(takenBack, jobId)
        end
      end
    end
  end
end
return { takenBack, failed }
