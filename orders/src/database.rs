//! The system of record: every order of a sale in its last known state,
//! and every event written, in SQLite or PostgreSQL behind one code path
//! (sqlx's `Any` driver; the SQL is written for both, and only the style
//! of its parameters differs: see [`Parameters`]).
//!
//! Writing is idempotent and commutative: an event is keyed by its stream
//! entry id (written twice, it is one row), and an order's row is merged,
//! never overwritten: `pending` gives way to `paid` or `expired`, never the
//! reverse, and each event carries the whole order, so a payment written
//! before its order's creation (two services share the stream) makes the
//! same row as the other way round.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};

use crate::event::{Event, Kind};

/// The tables, created or brought up to date at start.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Rows per INSERT statement: 10 parameters each, far below SQLite's and
/// PostgreSQL's limits on parameters per statement.
const ROWS_PER_STATEMENT: usize = 500;

/// A database's connections, for one sale.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    sale: String,
    timeout: Duration,
    parameters: Parameters,
}

/// How a statement's parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parameters {
    /// `$1, $2, ...`: PostgreSQL's only style.
    Numbered,
    /// `?, ?, ...`: SQLite binds numbered (named) parameters by looking
    /// each name up in a list, which makes a statement of thousands of
    /// them quadratic; anonymous ones are bound by position.
    Anonymous,
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    #[error("cannot bring the tables up to date: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl DatabaseError {
    /// Whether the database refuses what it was given, for good: a
    /// constraint it breaks, or a value it cannot hold (PostgreSQL's class
    /// 22, data exceptions). Trying again would fail again; anything else
    /// (down, locked, full, slow) may pass later.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Sql(sqlx::Error::Database(err)) => {
                err.kind() != sqlx::error::ErrorKind::Other
                    || err.code().is_some_and(|code| code.starts_with("22"))
            }
            Self::Sql(sqlx::Error::Encode(_)) => true,
            _ => false,
        }
    }
}

/// What one write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Events written for the first time, by kind ([`Kind::ALL`]'s order).
    pub new: [u64; 3],
    /// Events that were in the database already: delivered again.
    pub again: u64,
}

/// The sale's orders in the database, by status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OrderCounts {
    pub orders: u64,
    pub pending: u64,
    pub paid: u64,
    pub expired: u64,
}

impl Database {
    /// The database at `url`, written for `sale`. Connects on first use, so
    /// the service can start while the database is down; a SQLite file is
    /// created, with its folder, if missing.
    pub fn open(url: &str, sale: &str, timeout: Duration) -> Result<Self, DatabaseError> {
        install_default_drivers();
        let parameters = if url.starts_with("sqlite:") {
            Parameters::Anonymous
        } else {
            Parameters::Numbered
        };
        let url = sqlite_created(url)?;
        let pool = AnyPoolOptions::new()
            // One writer, and one reader for the counts.
            .max_connections(2)
            .acquire_timeout(timeout)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if conn.backend_name() == "SQLite" {
                        // Readers never wait on the writer, and a commit
                        // is one append to the log.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy(&url)?;
        Ok(Self {
            pool,
            sale: sale.to_owned(),
            timeout,
            parameters,
        })
    }

    /// Creates the tables, or brings them up to date.
    pub async fn prepare(&self) -> Result<(), DatabaseError> {
        self.bounded(async { Ok(MIGRATOR.run(&self.pool).await?) })
            .await
    }

    /// Writes `events` in one transaction: each event once, and each order
    /// merged with what the database holds.
    pub async fn write(&self, events: &[Event]) -> Result<Written, DatabaseError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let mut written = Written::default();
            for (slot, kind) in Kind::ALL.into_iter().enumerate() {
                let of_kind: Vec<&Event> = events.iter().filter(|e| e.kind == kind).collect();
                for chunk in of_kind.chunks(ROWS_PER_STATEMENT) {
                    written.new[slot] += self.insert_events(&mut tx, chunk).await?;
                }
            }
            let orders = merged(events);
            for chunk in orders.chunks(ROWS_PER_STATEMENT) {
                self.upsert_orders(&mut tx, chunk).await?;
            }
            tx.commit().await?;
            written.again = events.len() as u64 - written.new.iter().sum::<u64>();
            Ok(written)
        })
        .await
    }

    async fn insert_events(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        events: &[&Event],
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "INSERT INTO order_events (sale, event_id, order_id, kind, at) VALUES {} \
             ON CONFLICT (sale, event_id) DO NOTHING",
            placeholders(events.len(), 5, self.parameters)
        );
        let mut query = sqlx::query(&sql);
        for event in events {
            query = query
                .bind(&self.sale)
                .bind(&event.id)
                .bind(&event.order_id)
                .bind(event.kind.as_str())
                .bind(event.time);
        }
        Ok(query.execute(&mut **tx).await?.rows_affected())
    }

    async fn upsert_orders(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        orders: &[Order<'_>],
    ) -> Result<(), sqlx::Error> {
        // A closed order stays as it closed; a pending one takes what
        // closed it.
        let sql = format!(
            "INSERT INTO orders (sale, order_id, ticket, buyer, node, status, created_at, pay_by, \
             paid_at, expired_at) VALUES {} \
             ON CONFLICT (sale, order_id) DO UPDATE SET \
             status = CASE WHEN orders.status = 'pending' THEN excluded.status \
             ELSE orders.status END, \
             paid_at = COALESCE(orders.paid_at, excluded.paid_at), \
             expired_at = COALESCE(orders.expired_at, excluded.expired_at)",
            placeholders(orders.len(), 10, self.parameters)
        );
        let mut query = sqlx::query(&sql);
        for order in orders {
            let event = order.event;
            query = query
                .bind(&self.sale)
                .bind(&event.order_id)
                .bind(event.ticket)
                .bind(&event.buyer)
                .bind(&event.node)
                .bind(order.status.status())
                .bind(event.created)
                .bind(event.pay_by)
                .bind(order.paid_at)
                .bind(order.expired_at);
        }
        query.execute(&mut **tx).await?;
        Ok(())
    }

    /// The sale's orders in the database.
    pub async fn counts(&self) -> Result<OrderCounts, DatabaseError> {
        self.bounded(async {
            let sql = format!(
                "SELECT status, COUNT(*) AS n FROM orders WHERE sale = {} GROUP BY status",
                placeholders(1, 1, self.parameters).trim_matches(['(', ')'])
            );
            let rows = sqlx::query(&sql)
                .bind(&self.sale)
                .fetch_all(&self.pool)
                .await?;
            let mut counts = OrderCounts::default();
            for row in rows {
                let status: String = row.try_get("status")?;
                let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
                counts.orders += n;
                match status.as_str() {
                    "pending" => counts.pending = n,
                    "paid" => counts.paid = n,
                    "expired" => counts.expired = n,
                    _ => {}
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, DatabaseError>>,
    ) -> Result<T, DatabaseError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(DatabaseError::Timeout(self.timeout)))
    }
}

/// One order's row as a batch of events leaves it.
#[derive(Debug)]
struct Order<'a> {
    /// Any of its events: each carries the whole order.
    event: &'a Event,
    status: Kind,
    paid_at: Option<i64>,
    expired_at: Option<i64>,
}

/// The orders of `events`, each once, in the order of their ids (so that
/// two services writing the same orders lock their rows in one order).
fn merged(events: &[Event]) -> Vec<Order<'_>> {
    let mut orders: BTreeMap<&str, Order<'_>> = BTreeMap::new();
    for event in events {
        let order = orders.entry(&event.order_id).or_insert(Order {
            event,
            status: Kind::Created,
            paid_at: None,
            expired_at: None,
        });
        match event.kind {
            Kind::Created => {}
            Kind::Paid => order.paid_at = order.paid_at.or(Some(event.time)),
            Kind::Expired => order.expired_at = order.expired_at.or(Some(event.time)),
        }
        if order.status == Kind::Created {
            order.status = event.kind;
        }
    }
    orders.into_values().collect()
}

/// `($1, ..., $columns), ...` (or `(?, ...)`) for `rows` rows.
fn placeholders(rows: usize, columns: usize, style: Parameters) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            match style {
                Parameters::Numbered => {
                    sql.push('$');
                    sql.push_str(&(row * columns + column + 1).to_string());
                }
                Parameters::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// A SQLite URL made ready to create its file: the folder made, and
/// `mode=rwc` unless the URL says otherwise. Other URLs as they are.
fn sqlite_created(url: &str) -> Result<String, DatabaseError> {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Ok(url.to_owned());
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:" {
        if let Some(folder) = Path::new(path)
            .parent()
            .filter(|f| !f.as_os_str().is_empty())
        {
            std::fs::create_dir_all(folder).map_err(|err| {
                sqlx::Error::Configuration(
                    format!("cannot create the folder {}: {err}", folder.display()).into(),
                )
            })?;
        }
    }
    Ok(if query.split('&').any(|pair| pair.starts_with("mode=")) {
        url.to_owned()
    } else if query.is_empty() {
        format!("{url}?mode=rwc")
    } else {
        format!("{url}&mode=rwc")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: Kind, order: &str, time: i64) -> Event {
        Event {
            id: id.into(),
            kind,
            order_id: order.into(),
            ticket: 1,
            buyer: "b".into(),
            node: "n".into(),
            time,
            created: 10,
            pay_by: 100,
        }
    }

    #[test]
    fn placeholders_are_numbered_across_rows() {
        assert_eq!(
            placeholders(2, 3, Parameters::Numbered),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(placeholders(1, 2, Parameters::Anonymous), "(?, ?)");
    }

    #[test]
    fn a_batch_leaves_each_order_once_closed_whatever_the_order_of_its_events() {
        let events = [
            event("20-0", Kind::Paid, "10-0", 20),
            event("10-0", Kind::Created, "10-0", 10),
            event("11-0", Kind::Created, "11-0", 11),
        ];
        let orders = merged(&events);
        assert_eq!(orders.len(), 2);
        assert_eq!(orders[0].event.order_id, "10-0");
        assert_eq!(
            (orders[0].status, orders[0].paid_at),
            (Kind::Paid, Some(20))
        );
        assert_eq!((orders[1].status, orders[1].paid_at), (Kind::Created, None));
    }

    #[test]
    fn a_sqlite_file_is_created_with_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/a/b/orders.db", dir.path().display());
        assert_eq!(sqlite_created(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(dir.path().join("a/b").is_dir());
        assert_eq!(
            sqlite_created("sqlite::memory:?mode=memory").unwrap(),
            "sqlite::memory:?mode=memory"
        );
        assert_eq!(
            sqlite_created("postgres://x@h/db").unwrap(),
            "postgres://x@h/db"
        );
    }

    #[tokio::test]
    async fn writing_twice_writes_once_and_closed_orders_stay_closed() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/orders.db", dir.path().display());
        let db = Database::open(&url, "ticket", Duration::from_secs(5)).unwrap();
        db.prepare().await.unwrap();
        db.prepare().await.unwrap();
        let created = event("10-0", Kind::Created, "10-0", 10);
        let expired = event("30-0", Kind::Expired, "10-0", 30);
        // The expiry first, as a second service could write it.
        let first = db.write(std::slice::from_ref(&expired)).await.unwrap();
        assert_eq!(first.new, [0, 0, 1]);
        let second = db.write(&[created.clone(), expired.clone()]).await.unwrap();
        assert_eq!((second.new, second.again), ([1, 0, 0], 1));
        let counts = db.counts().await.unwrap();
        assert_eq!((counts.orders, counts.expired), (1, 1));
        let (status, expired_at): (String, Option<i64>) =
            sqlx::query_as("SELECT status, expired_at FROM orders")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((status.as_str(), expired_at), ("expired", Some(30)));
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(events, 2);
    }
}
