-- The life of an order in Redis, shared by every script that changes one:
-- each script is this file followed by its own.
--
-- The keys of one sale, all in one hash slot, given to every script in
-- this order:
--   KEYS[1]  the stock hash: total, sold (tickets held by live orders,
--            pending or paid), paid, expired (orders, their tickets
--            returned), resold (returned tickets sold again), epoch, and
--            opens_at (ms) if set, confirmed (answers that told a change
--            made before); the tickets waiting to be sold again
--            are expired - resold, the numbers handed out sold + expired
--            - resold
--   KEYS[2]  the buyers hash: buyer id -> the id of their live order
--   KEYS[3]  the order stream: one event per change of an order
--   KEYS[4]  the ledger hash: order id -> its record
--   KEYS[5]  the deadlines sorted set: pending orders by pay_by (ms)
--   KEYS[6]  the returned list: tickets of expired orders, to sell again
--
-- A record is `status|ticket|buyer|node|created|pay_by|closed`: status
-- `pending`, `paid` or `expired`; times in milliseconds since the epoch,
-- by Redis's clock; `closed` the time it was paid or expired, empty
-- while pending. Buyer ids and node names hold no `|`.
--
-- Redis runs a script atomically, and it does not roll a script back when
-- a command in it fails: every check comes first, and the first write of
-- a change is its event (XADD), the only one that can fail (out of
-- memory; so can `confirm`'s, which changes no order): once a
-- script has written, Redis lets the rest of its writes through. So no
-- change of an order happens without its event, and no event without its
-- change.
--
-- Numbers go to Redis as strings made once with `digits`: Redis would
-- otherwise print every Lua number it is given with "%.17g", slowly.

-- The decimal digits of whole number `n`.
local function digits(n)
  return string.format('%d', n)
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Tells a change that was already made, as an answer again: with one
-- write (a count, `confirmed`), so that a `WAIT` after the script waits
-- for the replicas to hold that change too, whichever connection made it.
local function confirm()
  redis.call('HINCRBY', KEYS[1], 'confirmed', 1)
end

local function parse(record)
  local status, ticket, buyer, node, created, pay_by, closed = string.match(
    record, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return {
    status = status, ticket = tonumber(ticket), buyer = buyer, node = node,
    created = tonumber(created), pay_by = tonumber(pay_by), closed = tonumber(closed),
  }
end

local function format(order)
  local closed = order.closed and digits(order.closed) or ''
  return string.format('%s|%d|%s|%s|%d|%d|%s', order.status, order.ticket, order.buyer,
    order.node, order.created, order.pay_by, closed)
end

-- Closes pending order `id` as `status` (paid or expired) at `now`: its
-- event, its record, and no deadline any more. The event carries the whole
-- order, so that a reader may apply it even before the order's creation.
local function close(id, order, status, now)
  redis.call('XADD', KEYS[3], '*', 'event', status, 'order', id, 'ticket', digits(order.ticket),
    'buyer', order.buyer, 'node', order.node, 'status', status, 'time', digits(now),
    'created', digits(order.created), 'pay_by', digits(order.pay_by))
  order.status = status
  order.closed = now
  redis.call('HSET', KEYS[4], id, format(order))
  redis.call('ZREM', KEYS[5], id)
end

-- Expires pending order `id`: its ticket goes back on sale, and its buyer
-- may buy again.
local function expire(id, order, now)
  close(id, order, 'expired', now)
  redis.call('RPUSH', KEYS[6], digits(order.ticket))
  redis.call('HINCRBY', KEYS[1], 'sold', -1)
  redis.call('HINCRBY', KEYS[1], 'expired', 1)
  if order.buyer ~= '' and redis.call('HGET', KEYS[2], order.buyer) == id then
    redis.call('HDEL', KEYS[2], order.buyer)
  end
end
