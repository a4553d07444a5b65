-- Sells one ticket of a sale, or returns the buyer's live order.
--
-- ARGV[1]  buyer id, '' for an anonymous purchase
-- ARGV[2]  the selling node's name
-- ARGV[3]  the pay window (ms): the order expires unpaid after it
--
-- Returns {code, order id, ticket, pay_by or opens_at}:
--   1  sold: a new order, pending
--   2  this buyer already holds the live order returned
--   0  sold out: every ticket is held by a live order
--  -1  no such sale (its total was never set)
--  -2  not open yet: the last field is when it opens (ms), the ticket's
--      place holds Redis's clock (ms)
--
-- A buyer's pending order past its deadline, not swept yet, is expired
-- here and then, and the buyer buys again. A ticket returned by an
-- expired order is sold first, under its own number; otherwise the next
-- number never handed out. Every ticket number is held by at most one
-- live order.
local buyer, node, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stock = redis.call('HMGET', KEYS[1], 'total', 'sold', 'opens_at', 'expired', 'resold')
local total = tonumber(stock[1])
if not total then
  return {-1, '', 0, 0}
end
local now = now_ms()
local opens_at = tonumber(stock[3])
if opens_at and now < opens_at then
  return {-2, '', now, opens_at}
end

local sold = tonumber(stock[2]) or 0
local expired, resold = tonumber(stock[4]) or 0, tonumber(stock[5]) or 0
if buyer ~= '' then
  local existing = redis.call('HGET', KEYS[2], buyer)
  local record = existing and redis.call('HGET', KEYS[4], existing)
  if record then
    local order = parse(record)
    if order.status ~= 'pending' or now <= order.pay_by then
      confirm()
      return {2, existing, order.ticket, order.pay_by}
    end
    -- Its deadline has passed: no payment can take it any more (the
    -- payment script refuses it), so it is expired as a sweep would.
    expire(existing, order, now)
    sold, expired = sold - 1, expired + 1
  end
end
if sold >= total then
  return {0, '', 0, 0}
end

-- Tickets returned and not sold again yet: expired - resold. Numbers
-- handed out so far: every live order's and every returned one's,
-- sold + expired - resold.
local returned = expired > resold and redis.call('LINDEX', KEYS[6], 0)
local ticket = tonumber(returned) or sold + expired - resold + 1
local pay_by = now + window
local pay_by_digits = digits(pay_by)
local id = redis.call('XADD', KEYS[3], '*', 'event', 'created', 'ticket', digits(ticket),
  'buyer', buyer, 'node', node, 'status', 'pending', 'time', digits(now),
  'pay_by', pay_by_digits)
if returned then
  redis.call('LPOP', KEYS[6])
  redis.call('HINCRBY', KEYS[1], 'resold', 1)
end
redis.call('HSET', KEYS[4], id, format({
  status = 'pending', ticket = ticket, buyer = buyer, node = node,
  created = now, pay_by = pay_by,
}))
redis.call('ZADD', KEYS[5], pay_by_digits, id)
redis.call('HINCRBY', KEYS[1], 'sold', 1)
if buyer ~= '' then
  redis.call('HSET', KEYS[2], buyer, id)
end
return {1, id, ticket, pay_by}
