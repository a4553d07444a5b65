//! One entry of the order stream, read: a change of one order, with the
//! whole order (see the node's `lua/order.lua`).

use std::fmt;

/// What happened to the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Created,
    Paid,
    Expired,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Created, Kind::Paid, Kind::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Created => "created",
            Kind::Paid => "paid",
            Kind::Expired => "expired",
        }
    }

    /// The order's status once this event is applied.
    pub fn status(self) -> &'static str {
        match self {
            Kind::Created => "pending",
            Kind::Paid => "paid",
            Kind::Expired => "expired",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of one order, as its stream entry tells it. Times are in
/// milliseconds since the epoch, by Redis's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The stream entry's id: what makes writing it twice write it once.
    pub id: String,
    pub kind: Kind,
    /// The order: for `created`, the entry's own id.
    pub order_id: String,
    pub ticket: i64,
    /// Empty for an order bought without a buyer id.
    pub buyer: String,
    pub node: String,
    /// When the change happened.
    pub time: i64,
    pub created: i64,
    pub pay_by: i64,
}

/// Why an entry is not an event the service can write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the entry was deleted from the stream")]
    Deleted,
    #[error("no field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` is `{value}`, not {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("status `{status}` does not follow an event `{kind}`")]
    Status { kind: Kind, status: String },
}

impl Event {
    /// Reads the entry `id` with `fields` (`None` for an entry deleted
    /// since it was delivered). Fields are bytes as Redis holds them: an
    /// entry that is not text is malformed like any other, never an error
    /// of the read that would stop the entries behind it.
    pub fn parse(id: &str, fields: Option<&[(Vec<u8>, Vec<u8>)]>) -> Result<Self, Malformed> {
        let fields = fields.ok_or(Malformed::Deleted)?;
        let field = |name: &'static str| {
            let value = fields
                .iter()
                .find(|(key, _)| key == name.as_bytes())
                .map(|(_, value)| value.as_slice())
                .ok_or(Malformed::Missing(name))?;
            std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.contains('\0'))
                .ok_or_else(|| Malformed::Invalid {
                    field: name,
                    value: String::from_utf8_lossy(value).into_owned(),
                    expected: "text",
                })
        };
        let number = |name: &'static str| {
            let text = field(name)?;
            text.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Malformed::Invalid {
                    field: name,
                    value: text.to_owned(),
                    expected: "a whole number",
                })
        };
        let kind_text = field("event")?;
        let kind = Kind::parse(kind_text).ok_or_else(|| Malformed::Invalid {
            field: "event",
            value: kind_text.to_owned(),
            expected: "created, paid or expired",
        })?;
        let status = field("status")?;
        if status != kind.status() {
            return Err(Malformed::Status {
                kind,
                status: status.to_owned(),
            });
        }
        let time = number("time")?;
        let (order_id, created) = match kind {
            Kind::Created => (id.to_owned(), time),
            Kind::Paid | Kind::Expired => (field("order")?.to_owned(), number("created")?),
        };
        if !is_entry_id(&order_id) {
            return Err(Malformed::Invalid {
                field: "order",
                value: order_id,
                expected: "a stream entry id",
            });
        }
        Ok(Self {
            id: id.to_owned(),
            kind,
            order_id,
            ticket: number("ticket")?,
            buyer: field("buyer")?.to_owned(),
            node: field("node")?.to_owned(),
            time,
            created,
            pay_by: number("pay_by")?,
        })
    }
}

/// Whether `id` reads as a stream entry id, `MS-SEQ`.
pub fn is_entry_id(id: &str) -> bool {
    let digits = |part: &str| {
        !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit())
    };
    id.split_once('-')
        .is_some_and(|(ms, seq)| digits(ms) && digits(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    const CREATED: &[(&str, &str)] = &[
        ("event", "created"),
        ("ticket", "7"),
        ("buyer", "alice"),
        ("node", "node-1"),
        ("status", "pending"),
        ("time", "1000"),
        ("pay_by", "9000"),
    ];

    #[test]
    fn a_creation_is_its_own_order() {
        let event = Event::parse("1000-0", Some(&fields(CREATED))).unwrap();
        assert_eq!(event.kind, Kind::Created);
        assert_eq!(event.order_id, "1000-0");
        assert_eq!((event.ticket, event.created, event.pay_by), (7, 1000, 9000));
        assert_eq!(event.buyer, "alice");
    }

    #[test]
    fn a_payment_names_its_order_and_carries_it_whole() {
        let paid = fields(&[
            ("event", "paid"),
            ("order", "1000-0"),
            ("ticket", "7"),
            ("buyer", ""),
            ("node", "node-2"),
            ("status", "paid"),
            ("time", "2000"),
            ("created", "1000"),
            ("pay_by", "9000"),
        ]);
        let event = Event::parse("2000-3", Some(&paid)).unwrap();
        assert_eq!(
            (
                event.kind,
                event.order_id.as_str(),
                event.time,
                event.created
            ),
            (Kind::Paid, "1000-0", 2000, 1000)
        );
        assert_eq!(event.buyer, "");
    }

    #[test]
    fn what_cannot_be_read_says_why() {
        assert_eq!(Event::parse("1-0", None), Err(Malformed::Deleted));
        let mut missing = fields(CREATED);
        missing.retain(|(k, _)| k != b"ticket");
        assert_eq!(
            Event::parse("1-0", Some(&missing)),
            Err(Malformed::Missing("ticket"))
        );
        let mut unknown = fields(CREATED);
        unknown[0].1 = b"refunded".to_vec();
        let err = Event::parse("1-0", Some(&unknown)).unwrap_err().to_string();
        assert_eq!(
            err,
            "field `event` is `refunded`, not created, paid or expired"
        );
        let mut status = fields(CREATED);
        status[4].1 = b"paid".to_vec();
        assert!(matches!(
            Event::parse("1-0", Some(&status)),
            Err(Malformed::Status { .. })
        ));
        let mut negative = fields(CREATED);
        negative[1].1 = b"-3".to_vec();
        assert!(Event::parse("1-0", Some(&negative)).is_err());
        let mut binary = fields(CREATED);
        binary[2].1 = vec![b'a', 0xff, b'b'];
        let err = Event::parse("1-0", Some(&binary)).unwrap_err().to_string();
        assert_eq!(err, "field `buyer` is `a\u{fffd}b`, not text");
        let mut nul = fields(CREATED);
        nul[2].1 = b"a\0b".to_vec();
        assert!(Event::parse("1-0", Some(&nul)).is_err());
    }

    #[test]
    fn entry_ids_are_two_numbers() {
        assert!(is_entry_id("1796127866503-0"));
        for bad in ["", "1-", "-1", "a-1", "1-2-3", "1"] {
            assert!(!is_entry_id(bad), "{bad}");
        }
    }
}
