-- Pays an order, if it is still pending and its deadline has not passed.
--
-- ARGV[1]  the order id
-- ARGV[2]  the payer's buyer id, '' for none; an order bought without one
--          is paid by its id alone
--
-- Returns {code, record}:
--   1  paid now
--   2  paid already (paying again changes nothing)
--  -1  no such order
--  -3  the order is another buyer's (no record returned)
--  -4  expired: before, or now, its deadline having passed
--
-- A payment racing the deadline is decided here, by Redis's clock, at
-- once: paid up to pay_by, expired after it, never both.
local id, payer = ARGV[1], ARGV[2]
local record = redis.call('HGET', KEYS[4], id)
if not record then
  return {-1, ''}
end
local order = parse(record)
if order.buyer ~= '' and order.buyer ~= payer then
  return {-3, ''}
end
if order.status == 'paid' then
  confirm()
  return {2, record}
end
if order.status == 'expired' then
  confirm()
  return {-4, record}
end
local now = now_ms()
if now > order.pay_by then
  expire(id, order, now)
  return {-4, format(order)}
end
close(id, order, 'paid', now)
redis.call('HINCRBY', KEYS[1], 'paid', 1)
return {1, format(order)}
