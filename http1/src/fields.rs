//! A message's header fields (RFC 9110, 5), kept where they were read:
//! the head's bytes and, for each field, where its name and value lie in
//! them, in the order they came. Nothing is copied, hashed or checked again
//! after `httparse` (which validated every name and value). A lookup scans
//! the few fields a message carries; the names looked up on every message
//! ([`Known`]) are told apart once, as a field is read, so that looking one
//! up compares no byte, and looking up one that is absent scans nothing.
//! Fields added here (`Via`, `X-Forwarded-For`, a reply's `Content-Type`)
//! are `http` names and values, kept beside them.
//!
//! A proxied head is written out field by field from these spans, so the
//! fields a proxy passes on reach the next hop byte for byte as they came.

use std::fmt;
use std::str::Utf8Error;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};

/// The header fields of one message.
#[derive(Clone, Default)]
pub struct Fields {
    /// The head the received fields lie in.
    head: Bytes,
    list: Vec<Field>,
    /// Which of the [`KNOWN`] names are among the fields, a bit each: a
    /// lookup of one that is not (most of them, in most messages) scans
    /// nothing.
    present: u32,
    /// What the `Connection` fields say.
    connection: ConnectionOptions,
}

/// The options of a message's `Connection` fields (RFC 9110, 7.6.1),
/// read once, as the fields are read or added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionOptions {
    pub close: bool,
    pub keep_alive: bool,
    /// Options other than these two: names of fields that go with this
    /// hop.
    pub others: bool,
}

impl ConnectionOptions {
    fn add(&mut self, value: &[u8]) {
        for option in crate::framing::list(value) {
            // A value holds no control character but the tab, which bit
            // 0x20 does not make a letter or `-` either.
            if option.len() == 5 && same_lowercase(option, b"close") {
                self.close = true;
            } else if option.len() == 10 && same_lowercase(option, b"keep-alive") {
                self.keep_alive = true;
            } else {
                self.others = true;
            }
        }
    }
}

/// The names this crate and the proxy look up on every message, told
/// apart once, when a field is read or added. At most 32.
const KNOWN: [&str; 17] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "date",
];

/// A name that is none of [`KNOWN`].
const OTHER: u8 = u8::MAX;

/// Which of [`KNOWN`] `name` is, ignoring case, or [`OTHER`].
fn classify(name: &[u8]) -> u8 {
    // Their lengths and first letters tell the known names apart: one
    // candidate at most, and most other names are told from them without
    // comparing another byte.
    let Some(&first) = name.first() else {
        return OTHER;
    };
    let candidate = match (name.len(), first.to_ascii_lowercase()) {
        (2, b't') => 6,
        (3, b'v') => 15,
        (4, b'h') => 0,
        (4, b'd') => 16,
        (6, b'e') => 11,
        (7, b't') => 7,
        (7, b'u') => 8,
        (10, b'c') => 3,
        (10, b'k') => 4,
        (14, b'c') => 1,
        (15, b'x') => 12,
        (16, b'p') => 5,
        (16, b'x') => 14,
        (17, b't') => 2,
        (17, b'x') => 13,
        (18, b'p') => 10,
        (19, b'p') => 9,
        _ => return OTHER,
    };
    if same_lowercase(name, KNOWN[candidate as usize].as_bytes()) {
        candidate
    } else {
        OTHER
    }
}

/// Whether `name`, of the same length as `lower` (lower-case letters and
/// `-`: a name of [`KNOWN`], or the option `close` or `keep-alive`), is
/// `lower` in any case: eight bytes at a time. Setting bit 0x20 of a token character (every byte a
/// name may hold) makes a capital letter small and leaves a small letter
/// and `-` as they are; no other token character becomes one of them.
fn same_lowercase(name: &[u8], lower: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().unwrap_or_default());
    let (mut names, mut lowers) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (name, lower) in (&mut names).zip(&mut lowers) {
        if word(name) | LOWER != word(lower) {
            return false;
        }
    }
    names
        .remainder()
        .iter()
        .zip(lowers.remainder())
        .all(|(byte, lower)| byte | 0x20 == *lower)
}

/// The hop-by-hop fields (RFC 9110, 7.6.1) that `Connection` need not
/// name: `Connection` itself, `Keep-Alive`, `Proxy-Connection`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization` and
/// `Proxy-Authenticate`.
const HOP_BY_HOP: u32 = 0b111_1111_1100;

fn bit(known: u8) -> u32 {
    if known == OTHER { 0 } else { 1 << known }
}

/// One field: which known name it has, and where it is.
#[derive(Clone)]
pub(crate) struct Field {
    known: u8,
    place: Place,
}

#[derive(Clone)]
enum Place {
    /// Received: where its name and value lie in the head.
    Received { name: (u32, u32), value: (u32, u32) },
    /// Added here.
    Added(HeaderName, HeaderValue),
    /// Added here, with the value of a received field.
    Copied { name: HeaderName, value: (u32, u32) },
}

impl Field {
    /// A received field of `head`, by the offsets of its name and value.
    pub(crate) fn received(
        head: &[u8],
        [name_start, name_end, value_start, value_end]: [u32; 4],
    ) -> Self {
        Field {
            known: classify(&head[name_start as usize..name_end as usize]),
            place: Place::Received {
                name: (name_start, name_end),
                value: (value_start, value_end),
            },
        }
    }

    fn parts<'a>(&'a self, head: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let span =
            |(start, end): (u32, u32)| head.get(start as usize..end as usize).unwrap_or_default();
        match &self.place {
            Place::Received { name, value } => (span(*name), span(*value)),
            Place::Added(name, value) => (name.as_str().as_bytes(), value.as_bytes()),
            Place::Copied { name, value } => (name.as_str().as_bytes(), span(*value)),
        }
    }
}

/// A field name to look up: a [`Known`] one, an `http` constant, or a name
/// in lower case.
pub trait Name {
    fn as_name(&self) -> &str;

    /// Which of [`KNOWN`] it is, or [`OTHER`].
    #[doc(hidden)]
    fn known(&self) -> u8 {
        classify(self.as_name().as_bytes())
    }
}

/// One of the names [`Fields`] tells apart as fields are read, which a
/// lookup finds without comparing a byte: the ones looked up on every
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known(u8);

impl Known {
    pub const HOST: Known = Known(0);
    pub const CONTENT_LENGTH: Known = Known(1);
    pub const TRANSFER_ENCODING: Known = Known(2);
    pub const CONNECTION: Known = Known(3);
    pub const KEEP_ALIVE: Known = Known(4);
    pub const PROXY_CONNECTION: Known = Known(5);
    pub const TE: Known = Known(6);
    pub const TRAILER: Known = Known(7);
    pub const UPGRADE: Known = Known(8);
    pub const PROXY_AUTHORIZATION: Known = Known(9);
    pub const PROXY_AUTHENTICATE: Known = Known(10);
    pub const EXPECT: Known = Known(11);
    pub const X_FORWARDED_FOR: Known = Known(12);
    pub const X_FORWARDED_PROTO: Known = Known(13);
    pub const X_FORWARDED_HOST: Known = Known(14);
    pub const VIA: Known = Known(15);
    pub const DATE: Known = Known(16);
}

impl Name for Known {
    fn as_name(&self) -> &str {
        KNOWN[self.0 as usize]
    }

    fn known(&self) -> u8 {
        self.0
    }
}

impl Name for HeaderName {
    fn as_name(&self) -> &str {
        self.as_str()
    }
}

impl Name for &HeaderName {
    fn as_name(&self) -> &str {
        self.as_str()
    }
}

impl Name for &str {
    fn as_name(&self) -> &str {
        self
    }
}

/// A field's value, as it came.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Value<'a>(&'a [u8]);

impl<'a> Value<'a> {
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// The value as text, if it is visible ASCII (with spaces and tabs), as
    /// `HeaderValue::to_str` has it.
    pub fn to_str(&self) -> Result<&'a str, NotText> {
        if self
            .0
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            std::str::from_utf8(self.0).map_err(NotText::Utf8)
        } else {
            Err(NotText::Opaque)
        }
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.0))
    }
}

impl PartialEq<str> for Value<'_> {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for Value<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// Why a value is not text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotText {
    #[error("a header value with bytes other than visible ASCII")]
    Opaque,
    #[error("a header value that is not UTF-8: {0}")]
    Utf8(Utf8Error),
}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    /// The fields read from `head`.
    pub(crate) fn received(head: Bytes, list: Vec<Field>) -> Self {
        let mut fields = Self {
            head,
            list,
            present: 0,
            connection: ConnectionOptions::default(),
        };
        fields.index();
        fields
    }

    /// Tells again which known names are present and what `Connection`
    /// says.
    fn index(&mut self) {
        self.present = 0;
        self.connection = ConnectionOptions::default();
        for field in &self.list {
            self.present |= bit(field.known);
            if field.known == Known::CONNECTION.0 {
                self.connection.add(field.parts(&self.head).1);
            }
        }
    }

    /// The options of the `Connection` fields.
    pub fn connection(&self) -> ConnectionOptions {
        self.connection
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every field, name and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Value<'_>)> {
        self.list.iter().map(|field| {
            let (name, value) = field.parts(&self.head);
            (name, Value(value))
        })
    }

    /// The value of the first field named `name`.
    pub fn get(&self, name: impl Name) -> Option<Value<'_>> {
        let wanted = name.known();
        self.scanned(wanted)
            .iter()
            .find_map(|field| self.value_of(field, wanted, &name))
    }

    /// The values of every field named `name`, in order.
    pub fn get_all<N: Name>(&self, name: N) -> impl Iterator<Item = Value<'_>> + use<'_, N> {
        let wanted = name.known();
        self.scanned(wanted)
            .iter()
            .filter_map(move |field| self.value_of(field, wanted, &name))
    }

    /// The fields a lookup of a name that is `wanted` of [`KNOWN`] scans:
    /// none if it is known and not here.
    fn scanned(&self, wanted: u8) -> &[Field] {
        match wanted {
            OTHER => &self.list,
            _ if self.present & bit(wanted) == 0 => &[],
            _ => &self.list,
        }
    }

    /// The value of `field` if it is named `name`, `wanted` of [`KNOWN`]:
    /// a known name is matched by its index, any other by its bytes.
    fn value_of<'a>(&'a self, field: &'a Field, wanted: u8, name: &impl Name) -> Option<Value<'a>> {
        if field.known != wanted {
            return None;
        }
        let (raw, value) = field.parts(&self.head);
        let named = wanted != OTHER || raw.eq_ignore_ascii_case(name.as_name().as_bytes());
        named.then_some(Value(value))
    }

    pub fn contains_key(&self, name: impl Name) -> bool {
        self.get(name).is_some()
    }

    /// Removes every field named `name`; whether there was one.
    pub fn remove(&mut self, name: impl Name) -> bool {
        let wanted = name.known();
        if wanted != OTHER && self.present & bit(wanted) == 0 {
            return false;
        }
        let before = self.list.len();
        let name = name.as_name().as_bytes();
        self.retain_fields(|field, raw, _| match wanted {
            OTHER => !raw.eq_ignore_ascii_case(name),
            _ => field.known != wanted,
        });
        self.list.len() != before
    }

    /// Keeps the fields for which `keep` holds, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], Value<'_>) -> bool) {
        self.retain_fields(|_, name, value| keep(name, Value(value)));
    }

    /// Keeps the fields for which `keep`, given each with its name and
    /// value, holds.
    fn retain_fields(&mut self, mut keep: impl FnMut(&Field, &[u8], &[u8]) -> bool) {
        let head = &self.head;
        self.list.retain(|field| {
            let (name, value) = field.parts(head);
            keep(field, name, value)
        });
        self.index();
    }

    /// Adds a field after the others.
    pub fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.push(Field {
            known: classify(name.as_str().as_bytes()),
            place: Place::Added(name, value),
        });
    }

    /// Adds a field named `name` with the value of the first field named
    /// `source`, without copying it; whether there was one.
    pub fn append_copy(&mut self, name: HeaderName, source: impl Name) -> bool {
        let source = source.as_name().as_bytes();
        let found = self.list.iter().find_map(|field| {
            let (raw, _) = field.parts(&self.head);
            if !raw.eq_ignore_ascii_case(source) {
                return None;
            }
            Some(match &field.place {
                Place::Received { value, .. } | Place::Copied { value, .. } => Ok(*value),
                Place::Added(_, value) => Err(value.clone()),
            })
        });
        let known = classify(name.as_str().as_bytes());
        match found {
            Some(Ok(value)) => self.push(Field {
                known,
                place: Place::Copied { name, value },
            }),
            Some(Err(value)) => self.append(name, value),
            None => return false,
        }
        true
    }

    /// Sets the one field named `name`, in place of any there were.
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        self.remove(&name);
        self.append(name, value);
    }

    /// Removes the hop-by-hop fields: those named in RFC 9110, 7.6.1, and those
    /// `Connection` names. Most messages carry none but `Connection:
    /// keep-alive`: nothing is allocated then, and a message without any
    /// is not scanned.
    pub fn remove_hop_by_hop(&mut self) {
        if self.present & HOP_BY_HOP == 0 {
            return;
        }
        if self.connection.others {
            // The usual options name no field of their own (`close`) or
            // one removed anyway (`keep-alive`).
            let named: Vec<Vec<u8>> = crate::framing::connection_options(self)
                .filter(|option| {
                    !option.eq_ignore_ascii_case(b"keep-alive")
                        && !option.eq_ignore_ascii_case(b"close")
                })
                .map(<[u8]>::to_vec)
                .collect();
            self.retain_fields(|_, name, _| {
                !named.iter().any(|named| named.eq_ignore_ascii_case(name))
            });
        }
        self.list.retain(|field| bit(field.known) & HOP_BY_HOP == 0);
        self.present &= !HOP_BY_HOP;
        self.connection = ConnectionOptions::default();
    }

    /// Writes the fields for which `keep`, given which known name each has
    /// (`None` for another), holds, a line each: a received field as it
    /// came, from its name to the end of its value.
    pub(crate) fn write(&self, out: &mut BytesMut, mut keep: impl FnMut(Option<Known>) -> bool) {
        out.reserve(self.head.len() + 64 * self.list.len());
        for field in &self.list {
            if !keep((field.known != OTHER).then_some(Known(field.known))) {
                continue;
            }
            let line = |start: u32, end: u32| self.head.get(start as usize..end as usize);
            match &field.place {
                Place::Received { name, value } => {
                    out.put_slice(line(name.0, value.1).unwrap_or_default());
                }
                Place::Added(name, value) => {
                    out.put_slice(name.as_str().as_bytes());
                    out.put_slice(b": ");
                    out.put_slice(value.as_bytes());
                }
                Place::Copied { name, value } => {
                    out.put_slice(name.as_str().as_bytes());
                    out.put_slice(b": ");
                    out.put_slice(line(value.0, value.1).unwrap_or_default());
                }
            }
            out.put_slice(b"\r\n");
        }
    }

    fn push(&mut self, field: Field) {
        self.present |= bit(field.known);
        if field.known == Known::CONNECTION.0 {
            self.connection.add(field.parts(&self.head).1);
        }
        self.list.push(field);
    }
}

/// Names and values, but those that carry credentials.
impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SECRET: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];
        let mut map = f.debug_map();
        for (name, value) in self.iter() {
            let name = String::from_utf8_lossy(name);
            if SECRET
                .iter()
                .any(|secret| name.eq_ignore_ascii_case(secret))
            {
                map.entry(&name, &"<hidden>");
            } else {
                map.entry(&name, &value);
            }
        }
        map.finish()
    }
}

impl FromIterator<(HeaderName, HeaderValue)> for Fields {
    fn from_iter<I: IntoIterator<Item = (HeaderName, HeaderValue)>>(pairs: I) -> Self {
        let mut fields = Fields::new();
        for (name, value) in pairs {
            fields.append(name, value);
        }
        fields
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_known_name_is_told_apart_in_any_case() {
        for (index, name) in KNOWN.iter().enumerate() {
            assert_eq!(classify(name.as_bytes()), index as u8, "{name}");
            assert_eq!(
                classify(name.to_uppercase().as_bytes()),
                index as u8,
                "{name}"
            );
        }
        for other in ["", "t", "hosts", "hast", "user-agent", "x-forwarded-fox"] {
            assert_eq!(classify(other.as_bytes()), OTHER, "{other}");
        }
    }

    use http::header::{CONTENT_TYPE, HOST, VIA};

    use super::*;

    fn read(head: &'static str) -> Fields {
        let head = Bytes::from_static(head.as_bytes());
        let mut list = Vec::new();
        let mut at = 0;
        for line in head.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
            let colon = line.iter().position(|&b| b == b':').unwrap() as u32;
            let (start, end) = (at as u32, (at + line.len()) as u32);
            list.push(Field::received(
                &head,
                [start, start + colon, start + colon + 2, end],
            ));
            at += line.len() + 1;
        }
        Fields::received(head, list)
    }

    #[test]
    fn names_are_matched_ignoring_case_and_values_kept_in_order() {
        let fields = read("Host: a\nX-Many: 1\nx-many: 2\n");
        assert_eq!(fields.get(HOST).unwrap(), "a");
        assert_eq!(fields.get("host").unwrap(), "a");
        let many: Vec<_> = fields.get_all("x-many").map(|v| v.as_bytes()).collect();
        assert_eq!(many, [b"1", b"2"]);
        assert!(!fields.contains_key(VIA));
        let names: Vec<_> = fields.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"Host"[..], b"X-Many", b"x-many"]);
    }

    #[test]
    fn fields_are_removed_added_and_replaced() {
        let mut fields = read("Host: a\nX-Many: 1\nContent-Type: x\nx-many: 2\n");
        assert!(fields.remove("x-many"));
        assert!(!fields.remove("x-many"));
        fields.append(VIA, HeaderValue::from_static("1.1 spike"));
        fields.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(fields.append_copy(HeaderName::from_static("x-host"), HOST));
        assert!(fields.append_copy(HeaderName::from_static("x-via"), VIA));
        assert!(!fields.append_copy(HeaderName::from_static("x-none"), "x-many"));
        let all: Vec<_> = fields
            .iter()
            .map(|(name, value)| (String::from_utf8_lossy(name).into_owned(), value))
            .collect();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].0, "Host");
        assert_eq!(all[1], ("via".to_owned(), Value(b"1.1 spike")));
        assert_eq!(all[2], ("content-type".to_owned(), Value(b"text/plain")));
        assert_eq!(all[3], ("x-host".to_owned(), Value(b"a")));
        assert_eq!(all[4], ("x-via".to_owned(), Value(b"1.1 spike")));
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let hop_by_hop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
        ];
        let mask = hop_by_hop
            .iter()
            .fold(0, |mask, name| mask | bit(classify(name.as_bytes())));
        assert_eq!(mask, HOP_BY_HOP);
        let mut fields = read(
            "Connection: keep-alive, X-Secret\nconnection: x-other\nX-Secret: 1\nx-other: 2\n\
             Keep-Alive: timeout=5\nProxy-Connection: keep-alive\nTE: trailers\nTrailer: x-sum\n\
             Transfer-Encoding: chunked\nUpgrade: websocket\nProxy-Authorization: Basic abc\n\
             Proxy-Authenticate: Basic\nX-Kept: 3\nContent-Type: text/plain\n",
        );
        fields.remove_hop_by_hop();
        let left: Vec<_> = fields.iter().map(|(name, _)| name).collect();
        assert_eq!(left, [&b"X-Kept"[..], b"Content-Type"]);
        let mut usual = read("Connection: Keep-Alive\nHost: x\n");
        usual.remove_hop_by_hop();
        let left: Vec<_> = usual.iter().map(|(name, _)| name).collect();
        assert_eq!(left, [b"Host"]);
        assert!(!usual.contains_key("connection"));
    }

    #[test]
    fn only_visible_ascii_is_text() {
        assert_eq!(Value(b"a b\tc").to_str(), Ok("a b\tc"));
        assert_eq!(Value(b"caf\xc3\xa9").to_str(), Err(NotText::Opaque));
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let fields = read("Authorization: Bearer s3cret\nHost: a\n");
        let shown = format!("{fields:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("\"Host\": \"a\""), "{shown}");
    }
}
