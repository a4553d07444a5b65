-- Every order of every sale, in its last known state, and every event the
-- order service wrote. Times are milliseconds since the epoch, by Redis's
-- clock. Written the same way on SQLite and PostgreSQL.

CREATE TABLE orders (
    sale       TEXT   NOT NULL,
    order_id   TEXT   NOT NULL,
    ticket     BIGINT NOT NULL,
    buyer      TEXT   NOT NULL,
    node       TEXT   NOT NULL,
    status     TEXT   NOT NULL CHECK (status IN ('pending', 'paid', 'expired')),
    created_at BIGINT NOT NULL,
    pay_by     BIGINT NOT NULL,
    paid_at    BIGINT,
    expired_at BIGINT,
    PRIMARY KEY (sale, order_id)
);

CREATE INDEX orders_by_status ON orders (sale, status);

-- One row per entry of the order stream: the entry id makes an event
-- delivered twice a row once.
CREATE TABLE order_events (
    sale     TEXT   NOT NULL,
    event_id TEXT   NOT NULL,
    order_id TEXT   NOT NULL,
    kind     TEXT   NOT NULL CHECK (kind IN ('created', 'paid', 'expired')),
    at       BIGINT NOT NULL,
    PRIMARY KEY (sale, event_id)
);
