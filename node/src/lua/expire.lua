-- Expires the pending orders whose deadline has passed, at most ARGV[1]
-- of them. Any node may run it at any time: each expiry is decided here,
-- atomically, so concurrent sweeps expire each order once.
--
-- Returns {orders expired, deadlines looked at}: as many looked at as the
-- limit means more may be due.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
local expired = 0
for _, id in ipairs(due) do
  local record = redis.call('HGET', KEYS[4], id)
  local order = record and parse(record)
  if order and order.status == 'pending' then
    expire(id, order, now)
    expired = expired + 1
  else
    redis.call('ZREM', KEYS[5], id)
  end
end
return {expired, #due}
