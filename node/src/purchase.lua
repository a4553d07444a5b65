-- Sells one ticket of a sale, or returns the buyer's existing order.
--
-- KEYS[1]  the stock hash (total, sold)
-- KEYS[2]  the buyers hash (buyer id -> order id)
-- KEYS[3]  the order stream
-- ARGV[1]  buyer id, '' for an anonymous purchase
-- ARGV[2]  the selling node's name
--
-- Returns {code, order id}:
--   1  sold: a new order
--   2  this buyer already holds the order returned
--   0  sold out
--  -1  no such sale (its total was never set)
--
-- Redis runs a script atomically, and it does not roll a script back when a
-- command in it fails. So every check comes first, and the only write that
-- can still fail (XADD, on a stream key of the wrong type or out of memory)
-- comes before the writes that cannot: no ticket is counted without its
-- order, and no order exists without its ticket.
local buyer = ARGV[1]
if buyer ~= '' then
  local existing = redis.call('HGET', KEYS[2], buyer)
  if existing then
    return {2, existing}
  end
end

local stock = redis.call('HMGET', KEYS[1], 'total', 'sold')
local total = tonumber(stock[1])
if not total then
  return {-1, ''}
end
local sold = tonumber(stock[2]) or 0
if sold >= total then
  return {0, ''}
end

local now = redis.call('TIME')
local millis = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local order_id = redis.call('XADD', KEYS[3], '*',
  'ticket', sold + 1, 'buyer', buyer, 'node', ARGV[2], 'time', millis)
redis.call('HINCRBY', KEYS[1], 'sold', 1)
if buyer ~= '' then
  redis.call('HSET', KEYS[2], buyer, order_id)
end
return {1, order_id}
