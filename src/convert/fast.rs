//! The fast path: a GetRecords response body straight to Kafka records, without building
//! the SDK's typed records (a `HashMap<String, AttributeValue>` per image) and a
//! `serde_json::Value` tree from them. Strings are borrowed from the body where they have no
//! escapes and copied into the event as they stand; the event is written in one pass, by
//! hand, byte for byte as serde_json writes the reference path's event.
//!
//! ```text
//! body ──serde (borrowing)──▶ Page { Records: [Rec { Keys, NewImage, OldImage, ... }] }
//!                                   │ every record converts?
//!                   yes ◀───────────┴───────────▶ no: None (the caller uses the SDK's
//!    Kafka records, byte for byte what             deserializer and super::convert, which
//!    super::convert makes of the SDK records       own poison records and dead letters)
//! ```
//!
//! It accepts a strict subset of what the SDK accepts: one known member per attribute value,
//! no `null` members, canonical base64, valid numbers, known event names, every record with
//! keys and a sequence number and within `max_message_bytes`. Anything else is `None`, so
//! every error, odd shape and poison record goes through the one reference path.
//! [`try_convert_page`] says why a page left the fast path ([`Fallback`]), without any of
//! the page's values: serde_json's own messages quote the text they reject, so they are
//! reduced to their category and position.

use std::borrow::Cow;
use std::fmt;

use aws_smithy_types::DateTime;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{push_event_records, EventName, Source};

mod scan;

/// A page the fast path converted.
#[derive(Debug, Clone)]
pub struct FastPage {
    /// The Kafka records of the page's stream records, in order (tombstones after their
    /// REMOVE when asked for).
    pub records: Vec<rskafka::record::Record>,
    /// Stream records in the page.
    pub stream_records: usize,
    /// The first stream record's sequence number.
    pub first_sequence_number: Option<String>,
    /// The last stream record's sequence number.
    pub last_sequence_number: Option<String>,
    /// `NextShardIterator` (absent: the shard ended).
    pub next_shard_iterator: Option<String>,
}

/// Why a page left the fast path. Names positions, never values: safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fallback {
    /// The body is not a page the fast path reads (syntax, an odd shape, an invalid number
    /// or base64 text, an unknown attribute type, ...).
    #[error("body not read ({category}) at line {line} column {column}")]
    Unread {
        /// serde_json's category: `syntax`, `data`, `eof` or `io`.
        category: &'static str,
        /// Where in the body.
        line: usize,
        /// Where in the line.
        column: usize,
    },
    /// A record (its index in the page) has an event name other than INSERT, MODIFY or
    /// REMOVE, no `dynamodb` section, no sequence number or no keys.
    #[error("record {index}: unknown event name, or no dynamodb section, sequence number or keys")]
    Incomplete {
        /// The record's index in the page.
        index: usize,
    },
    /// A record's Kafka record is over `max_message_bytes`.
    #[error("a change event is {bytes} bytes, over max_message_bytes ({max})")]
    Oversize {
        /// The record's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// Converts a GetRecords response body; `None` when any part of it is outside the fast
/// path (see the module docs), and the caller must take the reference path.
pub fn convert_page(
    body: &[u8],
    source: &Source,
    tombstones: bool,
    max_message_bytes: usize,
) -> Option<FastPage> {
    try_convert_page(body, source, tombstones, max_message_bytes).ok()
}

/// [`convert_page`], with why a page left the fast path.
pub fn try_convert_page(
    body: &[u8],
    source: &Source,
    tombstones: bool,
    max_message_bytes: usize,
) -> Result<FastPage, Fallback> {
    let mut page = PageState::new(body, source, tombstones, max_message_bytes);
    // UTF-8 checked once for the whole body rather than string by string. A body is read
    // by hand ([`scan`]); one that reader is not sure of is read again by serde_json (its
    // `str` reader, trusting the check), which then also names what is wrong; a body that
    // is not UTF-8 is read as bytes, for the position of the error.
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => match scan::read_page(text, &mut page) {
            Ok(next) => Ok(next),
            Err(scan::Unsure) => {
                page.reset();
                parse(serde_json::Deserializer::from_str(text), &mut page)
            }
        },
        Err(_) => parse(serde_json::Deserializer::from_slice(body), &mut page),
    };
    let next_shard_iterator = match parsed {
        Ok(next) => next,
        Err(_) if page.incomplete.is_some() => {
            return Err(Fallback::Incomplete {
                index: page.incomplete.unwrap_or_default(),
            })
        }
        Err(e) => {
            return Err(Fallback::Unread {
                category: match e.classify() {
                    serde_json::error::Category::Io => "io",
                    serde_json::error::Category::Syntax => "syntax",
                    serde_json::error::Category::Data => "data",
                    serde_json::error::Category::Eof => "eof",
                },
                line: e.line(),
                column: e.column(),
            })
        }
    };
    if let Some(bytes) = page.oversize {
        return Err(Fallback::Oversize {
            bytes,
            max: max_message_bytes,
        });
    }
    Ok(FastPage {
        stream_records: page.stream_records,
        first_sequence_number: page.first_sequence_number,
        last_sequence_number: page.last_sequence_number,
        next_shard_iterator,
        records: page.records,
    })
}

/// For the property test and the fuzz target: reads `body` with the hand-written reader
/// alone and with serde_json alone. `Err` (naming the first difference) when the
/// hand-written reader took a page that serde_json refuses or reads differently; a page the
/// hand-written reader is unsure of is fine (serde_json reads it in the daemon).
#[doc(hidden)]
pub fn check_readers_agree(
    body: &[u8],
    source: &Source,
    tombstones: bool,
    max_message_bytes: usize,
) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(());
    };
    let mut by_hand = PageState::new(body, source, tombstones, max_message_bytes);
    let Ok(next) = scan::read_page(text, &mut by_hand) else {
        return Ok(());
    };
    let mut by_serde = PageState::new(body, source, tombstones, max_message_bytes);
    let serde_next = parse(serde_json::Deserializer::from_str(text), &mut by_serde)
        // Its category and position only: serde_json's messages may quote the body.
        .map_err(|e| {
            format!(
                "serde_json refused a page read by hand ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            )
        })?;
    let differs = |what: &str| Err(format!("{what} differs"));
    if next != serde_next {
        return differs("NextShardIterator");
    }
    // The timestamps follow from the events' approximate_creation_time_ms (or are the time of
    // conversion when it is null), so equal events have equal timestamps or both "now".
    let parts = |r: &rskafka::record::Record| (r.key.clone(), r.value.clone(), r.headers.clone());
    if !by_hand
        .records
        .iter()
        .map(parts)
        .eq(by_serde.records.iter().map(parts))
    {
        return differs("the records");
    }
    if by_hand.stream_records != by_serde.stream_records
        || by_hand.first_sequence_number != by_serde.first_sequence_number
        || by_hand.last_sequence_number != by_serde.last_sequence_number
        || by_hand.oversize != by_serde.oversize
        || by_hand.incomplete != by_serde.incomplete
    {
        return differs("the page's counts or sequence numbers");
    }
    Ok(())
}

fn parse<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    page: &mut PageState<'_>,
) -> serde_json::Result<Option<String>> {
    let next = PageSeed(page).deserialize(&mut de)?;
    de.end()?;
    Ok(next)
}

/// A page being read: each stream record is converted as soon as it is parsed, so only one
/// record's parse tree is alive at a time (not the whole page's).
struct PageState<'s> {
    source: &'s Source,
    fixed: FixedParts,
    tombstones: bool,
    records: Vec<rskafka::record::Record>,
    stream_records: usize,
    /// Values of one page have similar sizes: each buffer starts at the last one's size.
    value_len: usize,
    first_sequence_number: Option<String>,
    last_sequence_number: Option<String>,
    /// The index of a record the fast path does not convert (parsing stopped there).
    incomplete: Option<usize>,
    max_message_bytes: usize,
    /// The size of the first record over `max_message_bytes`: measured as each record is
    /// made, while it is in the cache, not in a pass of its own.
    oversize: Option<usize>,
}

/// The response object: `Records` (converted as they are read), `NextShardIterator`; any
/// other member is skipped, a repeated or missing `Records` is an error (as serde's derive
/// has it).
struct PageSeed<'p, 's>(&'p mut PageState<'s>);

impl<'de> DeserializeSeed<'de> for PageSeed<'_, '_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PageSeed<'_, '_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a GetRecords response")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut records = false;
        let mut next: Option<Option<Text<'de>>> = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.0.as_ref() {
                "Records" if records => return Err(de::Error::duplicate_field("Records")),
                "Records" => {
                    records = true;
                    map.next_value_seed(RecordsSeed(&mut *self.0))?;
                }
                "NextShardIterator" if next.is_some() => {
                    return Err(de::Error::duplicate_field("NextShardIterator"))
                }
                "NextShardIterator" => next = Some(map.next_value()?),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        if !records {
            return Err(de::Error::missing_field("Records"));
        }
        Ok(next.flatten().map(|t| t.0.into_owned()))
    }
}

/// `Records`: each element parsed, then converted into the page's Kafka records.
struct RecordsSeed<'p, 's>(&'p mut PageState<'s>);

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of stream records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let page = self.0;
        while let Some(rec) = seq.next_element::<Rec<'de>>()? {
            if !page.take(&rec) {
                return Err(de::Error::custom("record outside the fast path"));
            }
        }
        Ok(())
    }
}

impl<'s> PageState<'s> {
    fn new(body: &[u8], source: &'s Source, tombstones: bool, max_message_bytes: usize) -> Self {
        PageState {
            source,
            fixed: FixedParts::of(source),
            tombstones,
            // Records are seldom under 256 bytes of JSON; a page holds at most 1000 (and
            // their tombstones).
            records: Vec::with_capacity((body.len() / 256).clamp(1, 1125)),
            stream_records: 0,
            value_len: 256,
            first_sequence_number: None,
            last_sequence_number: None,
            incomplete: None,
            max_message_bytes,
            oversize: None,
        }
    }

    /// Converts one stream record into the page's Kafka records; `false` (and `incomplete`
    /// set) when the record is outside the fast path.
    fn take(&mut self, rec: &Rec<'_>) -> bool {
        let index = self.stream_records;
        let records_before = self.records.len();
        let Some(len) = convert_record(
            rec,
            self.source,
            &self.fixed,
            self.tombstones,
            self.value_len,
            &mut self.records,
        ) else {
            self.incomplete = Some(index);
            return false;
        };
        self.value_len = len;
        if self.oversize.is_none() {
            self.oversize = self.records[records_before..]
                .iter()
                .map(crate::kafka::message_bytes)
                .find(|&size| size > self.max_message_bytes);
        }
        let sequence = rec
            .dynamodb
            .as_ref()
            .and_then(|d| d.sequence_number.as_ref())
            .map(|s| s.0.as_ref());
        if index == 0 {
            self.first_sequence_number = sequence.map(str::to_owned);
        }
        self.stream_records += 1;
        // Kept as text until the page ends: only the last one is owned.
        if let Some(seq) = sequence {
            let last = self.last_sequence_number.get_or_insert_with(String::new);
            last.clear();
            last.push_str(seq);
        }
        true
    }

    /// Back to an empty page, to read the body again.
    fn reset(&mut self) {
        self.records.clear();
        self.stream_records = 0;
        self.value_len = 256;
        self.first_sequence_number = None;
        self.last_sequence_number = None;
        self.incomplete = None;
        self.oversize = None;
    }
}

/// Appends the record's Kafka records to `out`; the event's length.
fn convert_record(
    rec: &Rec<'_>,
    source: &Source,
    fixed: &FixedParts,
    tombstones: bool,
    value_len: usize,
    out: &mut Vec<rskafka::record::Record>,
) -> Option<usize> {
    let event_name = match rec.event_name.as_ref()?.0.as_ref() {
        "INSERT" => EventName::Insert,
        "MODIFY" => EventName::Modify,
        "REMOVE" => EventName::Remove,
        _ => return None,
    };
    let stream = rec.dynamodb.as_ref()?;
    let sequence_number = stream.sequence_number.as_ref()?;
    let keys = stream.keys.as_ref().filter(|k| !k.0.is_empty())?;
    let approximate_creation_time_ms = stream
        .approximate_creation_date_time
        .and_then(|secs| DateTime::from_secs_f64(secs).to_millis().ok());
    let mut key = Vec::with_capacity(64);
    write_map(&mut key, keys);
    let mut value = Vec::with_capacity(value_len + 64);
    write_event(
        &mut value,
        &Event {
            event_name,
            keys,
            new_image: stream.new_image.as_ref(),
            old_image: stream.old_image.as_ref(),
            sequence_number,
            approximate_creation_time_ms,
            event_id: rec.event_id.as_ref(),
            user_identity: rec.user_identity.as_ref(),
        },
        fixed,
    );
    let len = value.len();
    push_event_records(
        event_name,
        &sequence_number.0,
        approximate_creation_time_ms,
        source,
        key,
        value,
        tombstones,
        out,
    );
    Some(len)
}

// ---- the change event, written in one pass ----------------------------------------------
//
// Written by hand, byte for byte as serde_json's compact serializer writes
// [`super::ChangeEvent`] (same fields, same order; the property test compares every byte
// with the reference path). A string the body held without escapes is copied as it stands:
// such a string has no quote, backslash or control character, so serde_json would write it
// unchanged, and the scan for characters to escape (a tenth of the daemon's CPU with 200-byte
// items) is skipped. Only strings that had escapes are escaped again.

/// What a change event holds besides the source's fixed parts.
struct Event<'a> {
    event_name: EventName,
    keys: &'a AttrMap<'a>,
    new_image: Option<&'a AttrMap<'a>>,
    old_image: Option<&'a AttrMap<'a>>,
    sequence_number: &'a Text<'a>,
    approximate_creation_time_ms: Option<i64>,
    event_id: Option<&'a Text<'a>>,
    user_identity: Option<&'a Identity<'a>>,
}

/// The parts of every event of a page that come from its source, escaped once a page.
struct FixedParts {
    /// `"table":"..."` with the comma before it.
    table: String,
    /// `,"shard_id":"...","stream_arn":"..."`.
    shard_and_stream: String,
}

impl FixedParts {
    fn of(source: &Source) -> Self {
        let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
        Self {
            table: format!(",\"table\":{}", quoted(&source.table)),
            shard_and_stream: format!(
                ",\"shard_id\":{},\"stream_arn\":{}",
                quoted(&source.shard_id),
                quoted(&source.stream_arn)
            ),
        }
    }
}

fn write_event(out: &mut Vec<u8>, e: &Event<'_>, fixed: &FixedParts) {
    out.extend_from_slice(b"{\"event_name\":\"");
    out.extend_from_slice(e.event_name.as_str().as_bytes());
    out.push(b'"');
    out.extend_from_slice(fixed.table.as_bytes());
    out.extend_from_slice(b",\"keys\":");
    write_map(out, e.keys);
    out.extend_from_slice(b",\"new_image\":");
    write_option(out, e.new_image, write_map);
    out.extend_from_slice(b",\"old_image\":");
    write_option(out, e.old_image, write_map);
    out.extend_from_slice(b",\"sequence_number\":");
    write_text(out, e.sequence_number);
    out.extend_from_slice(b",\"approximate_creation_time_ms\":");
    match e.approximate_creation_time_ms {
        Some(ms) => {
            use std::io::Write as _;
            write!(out, "{ms}").expect("writing to a vector");
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"event_id\":");
    write_option(out, e.event_id, write_text);
    out.extend_from_slice(fixed.shard_and_stream.as_bytes());
    out.extend_from_slice(b",\"user_identity\":");
    // The reference path's map, sorted by name, with both names.
    write_option(out, e.user_identity, |out, i| {
        out.extend_from_slice(b"{\"principal_id\":");
        write_option(out, i.principal_id.as_ref(), write_text);
        out.extend_from_slice(b",\"type\":");
        write_option(out, i.r#type.as_ref(), write_text);
        out.push(b'}');
    });
    out.push(b'}');
}

fn write_option<T>(out: &mut Vec<u8>, v: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        Some(v) => write(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A string: as it stood in the body when it had no escapes, else escaped by serde_json.
fn write_text(out: &mut Vec<u8>, t: &Text<'_>) {
    match &t.0 {
        Cow::Borrowed(s) => {
            out.reserve(s.len() + 2);
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(s) => serde_json::to_writer(&mut *out, s).expect("writing to a vector"),
    }
}

fn write_map(out: &mut Vec<u8>, m: &AttrMap<'_>) {
    out.push(b'{');
    for (i, (name, value)) in m.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_text(out, name);
        out.push(b':');
        write_attr(out, value);
    }
    out.push(b'}');
}

fn write_list<T>(out: &mut Vec<u8>, items: &[T], write: impl Fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

fn write_attr(out: &mut Vec<u8>, a: &Attr<'_>) {
    match a {
        Attr::S(t) | Attr::B(t) => write_text(out, t),
        Attr::N(n) => write_number(out, n),
        Attr::Bool(true) => out.extend_from_slice(b"true"),
        Attr::Bool(false) => out.extend_from_slice(b"false"),
        Attr::Null => out.extend_from_slice(b"null"),
        Attr::M(m) => write_map(out, m),
        Attr::L(l) => write_list(out, l, write_attr),
        Attr::Ss(l) | Attr::Bs(l) => write_list(out, l, write_text),
        Attr::Ns(l) => write_list(out, l, write_number),
    }
}

/// A number as the reference path's arbitrary-precision `serde_json::Number` writes it:
/// its text, with the exponent normalized.
fn write_number(out: &mut Vec<u8>, n: &Num<'_>) {
    out.extend_from_slice(normalized_number(&n.0 .0).as_bytes());
}

// ---- the wire format, borrowed --------------------------------------------------------------

#[derive(Deserialize)]
struct Rec<'a> {
    #[serde(rename = "eventID", borrow, default)]
    event_id: Option<Text<'a>>,
    #[serde(rename = "eventName", borrow, default)]
    event_name: Option<Text<'a>>,
    #[serde(borrow, default)]
    dynamodb: Option<StreamRec<'a>>,
    #[serde(rename = "userIdentity", borrow, default)]
    user_identity: Option<Identity<'a>>,
}

#[derive(Deserialize)]
struct StreamRec<'a> {
    /// Epoch seconds, read as the SDK reads it (a number, to `f64`).
    #[serde(rename = "ApproximateCreationDateTime", default)]
    approximate_creation_date_time: Option<f64>,
    #[serde(rename = "Keys", borrow, default)]
    keys: Option<AttrMap<'a>>,
    #[serde(rename = "NewImage", borrow, default)]
    new_image: Option<AttrMap<'a>>,
    #[serde(rename = "OldImage", borrow, default)]
    old_image: Option<AttrMap<'a>>,
    #[serde(rename = "SequenceNumber", borrow, default)]
    sequence_number: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Identity<'a> {
    #[serde(rename = "PrincipalId", borrow, default)]
    principal_id: Option<Text<'a>>,
    #[serde(rename = "Type", borrow, default)]
    r#type: Option<Text<'a>>,
}

/// A string, borrowed from the body unless it had escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// An item, key or nested map: sorted by name, a repeated name keeps its last value (as the
/// SDK's `HashMap` does).
#[derive(Debug)]
struct AttrMap<'a>(Vec<(Text<'a>, Attr<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for AttrMap<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AttrMap<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of attribute values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(Text<'de>, Attr<'de>)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                sort_keeping_last(&mut entries);
                Ok(AttrMap(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// Sorts `entries` by name and drops all but the last of equal names, in place (one
/// allocation per map: the entries' own vector). Stable, so the last of equal names is the
/// one that came last; maps with at most 20 entries sort without allocating.
fn sort_keeping_last<K: Ord, V>(entries: &mut Vec<(K, V)>) {
    if !entries.is_sorted_by(|a, b| a.0 < b.0) {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept = 0;
        for i in 0..entries.len() {
            if kept > 0 && entries[kept - 1].0 == entries[i].0 {
                entries.swap(kept - 1, i);
            } else {
                entries.swap(kept, i);
                kept += 1;
            }
        }
        entries.truncate(kept);
    }
}

/// An attribute value, already checked: numbers valid (and kept as the reference path
/// spells them), binary canonical base64.
#[derive(Debug)]
enum Attr<'a> {
    S(Text<'a>),
    N(Num<'a>),
    B(Text<'a>),
    Bool(bool),
    Null,
    M(AttrMap<'a>),
    L(Vec<Attr<'a>>),
    Ss(Vec<Text<'a>>),
    Ns(Vec<Num<'a>>),
    Bs(Vec<Text<'a>>),
}

/// A number's text, checked to be what [`super::number`] accepts (JSON's number grammar)
/// and written as it is, as the reference path's arbitrary-precision `Number` writes it:
/// no `String` per number.
#[derive(Debug)]
struct Num<'a>(Text<'a>);

/// A valid number as serde_json's parser keeps it: the exponent as `e` with its sign
/// (`1E2` -> `1e+2`), everything else as written. Borrowed unless the exponent needs that.
fn normalized_number(n: &str) -> Cow<'_, str> {
    match n.find(['e', 'E']) {
        None => Cow::Borrowed(n),
        Some(at) if n[at..].starts_with("e+") || n[at..].starts_with("e-") => Cow::Borrowed(n),
        Some(at) => {
            let exponent = &n[at + 1..];
            let (sign, digits) = match exponent.as_bytes().first() {
                Some(b'+' | b'-') => (&exponent[..1], &exponent[1..]),
                _ => ("+", exponent),
            };
            Cow::Owned(format!("{}e{sign}{digits}", &n[..at]))
        }
    }
}

// The errors below name no value (see [`Fallback`]), in case a message ever gets out.

fn checked_number<E: de::Error>(t: Text<'_>) -> Result<Num<'_>, E> {
    if is_json_number(t.0.as_bytes()) {
        Ok(Num(t))
    } else {
        Err(E::custom("invalid number"))
    }
}

/// JSON's number grammar, exactly what `serde_json::Number` parses (no sign `+`, no leading
/// zeros, no space, digits after `.` and `e`).
fn is_json_number(s: &[u8]) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while s.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    let mut i = usize::from(s.first() == Some(&b'-'));
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == s.len()
}

fn checked_base64<E: de::Error>(t: Text<'_>) -> Result<Text<'_>, E> {
    if is_canonical_base64(t.0.as_bytes()) {
        Ok(t)
    } else {
        Err(E::custom("invalid base64"))
    }
}

/// What base64's STANDARD engine decodes (padding required, no trailing bits: exactly what
/// re-encoding the decoded bytes gives back), checked without decoding into a buffer.
fn is_canonical_base64(s: &[u8]) -> bool {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(4) {
        return false;
    }
    let pad = s.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return false;
    }
    let body = &s[..s.len() - pad];
    if !body.iter().all(|&c| sextet(c).is_some()) {
        return false;
    }
    // The bits of the last character beyond the data must be zero.
    let unused_bits = match pad {
        1 => 0b11,
        2 => 0b1111,
        _ => 0,
    };
    body.last()
        .and_then(|&c| sextet(c))
        .is_none_or(|v| v & unused_bits == 0)
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Attr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attribute value with one member")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let Some(kind) = map.next_key::<Text<'de>>()? else {
                    return Err(de::Error::custom("empty attribute value"));
                };
                let value = match kind.0.as_ref() {
                    "S" => Attr::S(map.next_value()?),
                    "N" => Attr::N(checked_number(map.next_value::<Text<'de>>()?)?),
                    "B" => Attr::B(checked_base64(map.next_value()?)?),
                    "BOOL" => Attr::Bool(map.next_value()?),
                    "NULL" => {
                        map.next_value::<bool>()?;
                        Attr::Null
                    }
                    "M" => Attr::M(map.next_value()?),
                    "L" => Attr::L(map.next_value()?),
                    "SS" => Attr::Ss(map.next_value()?),
                    "NS" => Attr::Ns(
                        map.next_value::<Vec<Text<'de>>>()?
                            .into_iter()
                            .map(checked_number)
                            .collect::<Result<_, _>>()?,
                    ),
                    "BS" => Attr::Bs(
                        map.next_value::<Vec<Text<'de>>>()?
                            .into_iter()
                            .map(checked_base64)
                            .collect::<Result<_, _>>()?,
                    ),
                    _ => return Err(de::Error::custom("unknown attribute type")),
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("more than one member"));
                }
                Ok(value)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aws_sdk_dynamodbstreams::types::{
        AttributeValue, Identity, OperationType, Record, StreamRecord,
    };
    use aws_smithy_types::Blob;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::convert::convert;
    use crate::convert::tests::{attribute, dynamo_number};
    use base64::Engine as _;

    fn source() -> Source {
        Source {
            table: "orders".into(),
            stream_arn: "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1".into(),
            shard_id: "shardId-1".into(),
        }
    }

    /// An attribute value as DynamoDB Streams puts it on the wire.
    fn wire(v: &AttributeValue) -> Value {
        let b64 = |b: &Blob| base64::engine::general_purpose::STANDARD.encode(b.as_ref());
        match v {
            AttributeValue::S(s) => json!({"S": s}),
            AttributeValue::N(n) => json!({"N": n}),
            AttributeValue::B(b) => json!({"B": b64(b)}),
            AttributeValue::Bool(b) => json!({"BOOL": b}),
            AttributeValue::Null(b) => json!({"NULL": b}),
            AttributeValue::M(m) => json!({"M": wire_map(m)}),
            AttributeValue::L(l) => json!({"L": l.iter().map(wire).collect::<Vec<_>>()}),
            AttributeValue::Ss(s) => json!({"SS": s}),
            AttributeValue::Ns(n) => json!({"NS": n}),
            AttributeValue::Bs(b) => json!({"BS": b.iter().map(b64).collect::<Vec<_>>()}),
            other => panic!("{other:?}"),
        }
    }

    fn wire_map(m: &HashMap<String, AttributeValue>) -> Value {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), wire(v)))
                .collect::<Map<_, _>>(),
        )
    }

    /// A record as DynamoDB Streams puts it on the wire.
    fn wire_record(r: &Record) -> Value {
        let d = r.dynamodb().unwrap();
        let mut stream = json!({
            "SequenceNumber": d.sequence_number(),
            "SizeBytes": 100,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        });
        if let Some(t) = d.approximate_creation_date_time() {
            stream["ApproximateCreationDateTime"] = json!(t.as_secs_f64());
            assert_eq!(DateTime::from_secs_f64(t.as_secs_f64()), *t);
        }
        for (name, image) in [
            ("Keys", d.keys()),
            ("NewImage", d.new_image()),
            ("OldImage", d.old_image()),
        ] {
            if let Some(image) = image {
                stream[name] = wire_map(image);
            }
        }
        let mut out = json!({
            "eventID": r.event_id(),
            "eventName": r.event_name().unwrap().as_str(),
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1",
            "dynamodb": stream,
        });
        if let Some(id) = r.user_identity() {
            out["userIdentity"] = json!({"PrincipalId": id.principal_id(), "Type": id.r#type()});
        }
        out
    }

    fn body(records: &[Record], next: Option<&str>) -> Vec<u8> {
        let mut page = json!({"Records": records.iter().map(wire_record).collect::<Vec<_>>()});
        if let Some(n) = next {
            page["NextShardIterator"] = json!(n);
        }
        serde_json::to_vec(&page).unwrap()
    }

    fn assert_same(records: &[Record], tombstones: bool) {
        let fast = convert_page(&body(records, Some("it-2")), &source(), tombstones, 1 << 30)
            .expect("on the fast path");
        let reference: Vec<rskafka::record::Record> = records
            .iter()
            .flat_map(|r| convert(r, &source(), tombstones).unwrap().records)
            .collect();
        assert_eq!(fast.records.len(), reference.len());
        for (f, r) in fast.records.iter().zip(&reference) {
            assert_eq!(f.key, r.key, "key");
            assert_eq!(
                f.value.as_deref().map(String::from_utf8_lossy),
                r.value.as_deref().map(String::from_utf8_lossy),
                "value"
            );
            assert_eq!(f.headers, r.headers, "headers");
            assert_eq!(f.timestamp, r.timestamp, "timestamp");
        }
        assert_eq!(fast.stream_records, records.len());
        assert_eq!(fast.next_shard_iterator.as_deref(), Some("it-2"));
        let seq = |r: Option<&Record>| {
            r.map(|r| r.dynamodb().unwrap().sequence_number().unwrap().to_owned())
        };
        assert_eq!(fast.first_sequence_number, seq(records.first()));
        assert_eq!(fast.last_sequence_number, seq(records.last()));
    }

    /// A time that survives the trip through the wire's f64 seconds unchanged, so the
    /// record built here is the one the SDK would read back.
    fn wire_stable(ms: i64) -> DateTime {
        let mut t = DateTime::from_secs_f64(ms as f64 / 1000.0);
        for _ in 0..8 {
            let back = DateTime::from_secs_f64(t.as_secs_f64());
            if back == t {
                break;
            }
            t = back;
        }
        t
    }

    fn record(
        name: OperationType,
        seq: u64,
        keys: HashMap<String, AttributeValue>,
        new: Option<HashMap<String, AttributeValue>>,
        old: Option<HashMap<String, AttributeValue>>,
        ttl: bool,
        created_ms: i64,
    ) -> Record {
        let stream = StreamRecord::builder()
            .sequence_number(format!("{seq:021}"))
            .set_keys(Some(keys))
            .set_new_image(new)
            .set_old_image(old)
            // The wire carries epoch seconds; the SDK reads them through f64, as the fast path.
            .approximate_creation_date_time(wire_stable(created_ms))
            .build();
        let mut r = Record::builder()
            .event_id(format!("ev{seq}"))
            .event_name(name)
            .dynamodb(stream);
        if ttl {
            r = r.user_identity(
                Identity::builder()
                    .principal_id("dynamodb.amazonaws.com")
                    .r#type("Service")
                    .build(),
            );
        }
        r.build()
    }

    fn item() -> impl Strategy<Value = HashMap<String, AttributeValue>> {
        prop::collection::hash_map("[a-z\"\\\\é/]{0,6}", attribute(), 0..5)
    }

    fn key() -> impl Strategy<Value = HashMap<String, AttributeValue>> {
        (".*", prop::option::of(dynamo_number())).prop_map(|(pk, sk)| {
            let mut k = HashMap::from([("pk".to_owned(), AttributeValue::S(pk))]);
            if let Some(sk) = sk {
                k.insert("sk".to_owned(), AttributeValue::N(sk));
            }
            k
        })
    }

    fn any_record() -> impl Strategy<Value = Record> {
        (
            0..3u8,
            any::<u64>(),
            key(),
            prop::option::of(item()),
            prop::option::of(item()),
            any::<bool>(),
            // Whole seconds and milliseconds, as DynamoDB gives them.
            prop_oneof![
                (0i64..4_000_000_000).prop_map(|s| s * 1000),
                0i64..4_000_000_000_000
            ],
        )
            .prop_map(|(kind, seq, keys, new, old, ttl, created_ms)| {
                let name = [
                    OperationType::Insert,
                    OperationType::Modify,
                    OperationType::Remove,
                ][kind as usize]
                    .clone();
                record(name, seq, keys, new, old, ttl, created_ms)
            })
    }

    proptest! {
        #[test]
        fn fast_path_writes_what_the_reference_path_writes(
            records in prop::collection::vec(any_record(), 0..6),
            tombstones in any::<bool>(),
        ) {
            assert_same(&records, tombstones);
        }
    }

    #[test]
    fn a_typical_page_matches() {
        let keys = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("k1".into())),
            ("sk".to_owned(), AttributeValue::N("5".into())),
        ]);
        let mut new = keys.clone();
        new.insert(
            "big".into(),
            AttributeValue::N("12345678901234567890.123456789".into()),
        );
        new.insert("e".into(), AttributeValue::N("1E5".into()));
        new.insert("b".into(), AttributeValue::B(Blob::new(b"hi".to_vec())));
        new.insert(
            "text".into(),
            AttributeValue::S("line\n\"quoted\" \u{1F600}".into()),
        );
        let records = vec![
            record(
                OperationType::Insert,
                1,
                keys.clone(),
                Some(new.clone()),
                None,
                false,
                1_795_452_116_000,
            ),
            record(
                OperationType::Modify,
                2,
                keys.clone(),
                Some(new.clone()),
                Some(new.clone()),
                false,
                1_795_452_116_123,
            ),
            record(
                OperationType::Remove,
                3,
                keys,
                None,
                Some(new),
                true,
                1_795_452_117_000,
            ),
        ];
        assert_same(&records, true);
        assert_same(&records, false);
    }

    #[test]
    fn an_empty_page_and_a_shard_end() {
        let page = convert_page(
            br#"{"Records":[],"NextShardIterator":"x"}"#,
            &source(),
            true,
            1000,
        )
        .unwrap();
        assert_eq!((page.stream_records, page.records.len()), (0, 0));
        assert_eq!(page.next_shard_iterator.as_deref(), Some("x"));
        let end = convert_page(br#"{"Records":[]}"#, &source(), true, 1000).unwrap();
        assert_eq!(end.next_shard_iterator, None);
    }

    #[test]
    fn map_entries_sort_and_keep_the_last_of_equal_names() {
        let mut v = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)];
        sort_keeping_last(&mut v);
        assert_eq!(v, [("a", 5), ("b", 6), ("c", 4)]);
        let mut v = vec![("a", 1), ("b", 2)];
        sort_keeping_last(&mut v);
        assert_eq!(v, [("a", 1), ("b", 2)]);
        let mut v = vec![("a", 1), ("a", 2)];
        sort_keeping_last(&mut v);
        assert_eq!(v, [("a", 2)]);
    }

    proptest! {
        #[test]
        fn the_number_check_accepts_what_serde_json_does(t in "[-+0-9.eE ]{0,8}") {
            let serde = !t.is_empty()
                && t.trim() == t
                && serde_json::from_str::<serde_json::Number>(&t).is_ok();
            prop_assert_eq!(is_json_number(t.as_bytes()), serde, "{:?}", t);
        }

        #[test]
        fn the_base64_check_accepts_what_the_decoder_does(t in "[A-Za-z0-9+/=_-]{0,9}") {
            use base64::Engine as _;
            let decodes = base64::engine::general_purpose::STANDARD.decode(t.as_bytes()).is_ok();
            prop_assert_eq!(is_canonical_base64(t.as_bytes()), decodes, "{:?}", t);
        }

        #[test]
        fn numbers_are_written_as_serde_json_writes_them(n in crate::convert::tests::dynamo_number()) {
            let number: serde_json::Number = serde_json::from_str(&n).unwrap();
            let mut ours = Vec::new();
            write_number(&mut ours, &Num(Text(Cow::Borrowed(&n))));
            prop_assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&number).unwrap());
        }
    }

    #[test]
    fn strings_with_escapes_are_written_as_the_reference_path_writes_them() {
        // Escapes the property test's bodies (written by serde_json) never hold: \u of a
        // printable character, an escaped solidus, a surrogate pair; and a source whose
        // names need escaping.
        let body = br#"{"Records":[{"eventID":"e\u0031","eventName":"MODIFY","dynamodb":{"SequenceNumber":"1\/2","Keys":{"p\u006b":{"S":"a\"b\\c\u0001\u00e9\ud83d\ude00"}},"NewImage":{"pk":{"S":"x"},"b":{"B":"AQ=="},"l":{"SS":["\t","plain"]}}},"userIdentity":{"PrincipalId":"dynamodb.amazonaws.com","Type":"Serv\u0069ce"}}]}"#;
        let source = Source {
            table: "t\"1".into(),
            stream_arn: "arn:\\x".into(),
            shard_id: "shard\u{7}".into(),
        };
        let fast = convert_page(body, &source, false, 1 << 20).expect("on the fast path");
        let reference = sdk_records(std::str::from_utf8(body).unwrap()).unwrap();
        let reference = convert(&reference[0], &source, false).unwrap().records;
        assert_eq!(fast.records.len(), 1);
        assert_eq!(fast.records[0].key, reference[0].key);
        assert_eq!(
            String::from_utf8_lossy(fast.records[0].value.as_deref().unwrap()),
            String::from_utf8_lossy(reference[0].value.as_deref().unwrap()),
        );
        assert_eq!(fast.records[0].headers, reference[0].headers);
    }

    #[test]
    fn a_body_that_is_not_utf8_leaves_the_fast_path_with_its_position() {
        let mut body = br#"{"Records":[{"eventName":"INSERT","dynamodb":{"SequenceNumber":"1","Keys":{"pk":{"S":"a?"}}}}]}"#.to_vec();
        let at = body.iter().position(|&c| c == b'?').unwrap();
        body[at] = 0xff;
        assert!(matches!(
            try_convert_page(&body, &source(), false, 1 << 20),
            Err(Fallback::Unread {
                category: "syntax",
                line: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_repeated_attribute_name_keeps_the_last_value() {
        let body = br#"{"Records":[{"eventName":"INSERT","dynamodb":{"SequenceNumber":"1","Keys":{"pk":{"S":"a"}},"NewImage":{"x":{"N":"1"},"pk":{"S":"a"},"x":{"N":"2"}}}}]}"#;
        let page = convert_page(body, &source(), true, 1 << 20).unwrap();
        let value: Value = serde_json::from_slice(page.records[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(value["new_image"], json!({"pk": "a", "x": 2}));
    }

    /// The SDK's own GetRecords deserializer on `body` (a client answered by a canned
    /// response): the typed records the reference path converts, or the SDK's error.
    fn sdk_records(body: &str) -> Result<Vec<Record>, String> {
        use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Credentials, Region};
        use aws_smithy_runtime_api::client::http::{
            http_client_fn, HttpConnector, HttpConnectorFuture, SharedHttpConnector,
        };
        use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
        use aws_smithy_runtime_api::http::StatusCode;
        use aws_smithy_types::body::SdkBody;
        use aws_smithy_types::error::display::DisplayErrorContext;

        #[derive(Debug)]
        struct Canned(String);
        impl HttpConnector for Canned {
            fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
                let mut response = HttpResponse::new(
                    StatusCode::try_from(200).unwrap(),
                    SdkBody::from(self.0.clone()),
                );
                response
                    .headers_mut()
                    .insert("content-type", "application/x-amz-json-1.0");
                HttpConnectorFuture::ready(Ok(response))
            }
        }
        let body = body.to_owned();
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKID", "secret", None, None, "test"))
            .endpoint_url("http://127.0.0.1:1")
            .http_client(http_client_fn(move |_, _| {
                SharedHttpConnector::new(Canned(body.clone()))
            }))
            .build();
        let client = aws_sdk_dynamodbstreams::Client::from_conf(config);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(client.get_records().shard_iterator("it").send())
            .map(|out| out.records().to_vec())
            .map_err(|e| format!("{} {e:?}", DisplayErrorContext(&e)))
    }

    #[test]
    fn no_item_value_reaches_an_error_on_either_path() {
        use crate::convert::tests::{marked_item, MARKER};
        let item = wire_map(&marked_item());
        let rec = |patch: &dyn Fn(&mut Value)| {
            let mut r = json!({
                "eventID": "e1", "eventName": "MODIFY", "eventVersion": "1.1",
                "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
                "dynamodb": {
                    "SequenceNumber": "100", "SizeBytes": 100,
                    "StreamViewType": "NEW_AND_OLD_IMAGES",
                    "Keys": {"pk": {"S": MARKER}, "sk": {"N": "5"}},
                    "NewImage": item.clone(), "OldImage": item.clone(),
                },
                "userIdentity": {"PrincipalId": MARKER, "Type": "Service"},
            });
            patch(&mut r);
            r
        };
        let bad_n = json!({"N": format!("1,5{MARKER}")});
        let nested = json!({"M": {"l": {"L": [{"S": MARKER}, bad_n.clone()]}}});
        let cases: Vec<(&str, Value)> = vec![
            (
                "invalid number",
                rec(&|r| r["dynamodb"]["NewImage"]["n"] = bad_n.clone()),
            ),
            (
                "number text only",
                rec(&|r| r["dynamodb"]["NewImage"]["n"] = json!({"N": MARKER})),
            ),
            (
                "invalid number in a set",
                rec(&|r| r["dynamodb"]["OldImage"]["ns"] = json!({"NS": ["1", MARKER]})),
            ),
            (
                "invalid number in a list in a map",
                rec(&|r| r["dynamodb"]["NewImage"]["deep"] = nested.clone()),
            ),
            (
                "invalid number in a key",
                rec(&|r| r["dynamodb"]["Keys"]["sk"] = bad_n.clone()),
            ),
            (
                "unknown attribute type",
                rec(&|r| r["dynamodb"]["NewImage"]["u"] = json!({"X": MARKER})),
            ),
            (
                "unknown nested attribute type",
                rec(&|r| {
                    r["dynamodb"]["NewImage"]["u"] = json!({"M": {"v": {"X": {"S": MARKER}}}})
                }),
            ),
            (
                "unknown event name",
                rec(&|r| r["eventName"] = json!(MARKER)),
            ),
        ];
        let page = |r: &Value| json!({"Records": [r], "NextShardIterator": "n"}).to_string();
        let clean = |why: &str, text: String| {
            assert!(!text.contains(MARKER), "{why}: {text}");
        };
        for (why, r) in &cases {
            let body = page(r);
            let fallback = try_convert_page(body.as_bytes(), &source(), true, 1 << 20)
                .map(|_| ())
                .expect_err(why);
            clean(why, format!("{fallback} {fallback:?}"));
            let records = sdk_records(&body).unwrap_or_else(|e| panic!("{why}: {e}"));
            let e = convert(&records[0], &source(), true).expect_err(why);
            clean(why, format!("{e} {e:?}"));
        }

        // Oversize: a valid record over max_message_bytes (the reference path converts it;
        // the reader dead-letters it naming only sizes).
        let body = page(&rec(&|r| {
            r["dynamodb"]["NewImage"]["big"] = json!({"S": MARKER.repeat(200)})
        }));
        let fallback = try_convert_page(body.as_bytes(), &source(), true, 2000).map(|_| ());
        assert!(
            matches!(fallback, Err(Fallback::Oversize { max: 2000, .. })),
            "{fallback:?}"
        );
        clean(
            "oversize",
            format!("{} {:?}", fallback.clone().unwrap_err(), fallback),
        );
        assert!(convert(&sdk_records(&body).unwrap()[0], &source(), true).is_ok());

        // Shapes serde rejects by quoting the text (a string where a bool or list goes):
        // the fallback keeps only a position.
        for (why, v) in [
            ("string for BOOL", json!({"BOOL": MARKER})),
            ("string for L", json!({"L": MARKER})),
            ("two members", json!({"S": "a", "N": MARKER})),
            ("bad base64", json!({"B": MARKER})),
        ] {
            let body = page(&rec(&|r| r["dynamodb"]["NewImage"]["odd"] = v.clone()));
            let fallback = try_convert_page(body.as_bytes(), &source(), true, 1 << 20)
                .map(|_| ())
                .expect_err(why);
            clean(why, format!("{fallback} {fallback:?}"));
            assert!(
                matches!(fallback, Fallback::Unread { .. }),
                "{why}: {fallback:?}"
            );
        }
        // The reasons still say where.
        let body = page(&cases[6].1);
        assert!(matches!(
            try_convert_page(body.as_bytes(), &source(), true, 1 << 20).map(|_| ()),
            Err(Fallback::Unread {
                category: "data",
                line: 1,
                ..
            })
        ));
        assert_eq!(
            try_convert_page(page(&cases[7].1).as_bytes(), &source(), true, 1 << 20).map(|_| ()),
            Err(Fallback::Incomplete { index: 0 })
        );
    }

    #[test]
    fn anything_unusual_leaves_the_fast_path() {
        let ok = r#"{"eventName":"INSERT","eventID":"e","dynamodb":{"SequenceNumber":"1","Keys":{"pk":{"S":"a"}},"NewImage":{"pk":{"S":"a"}}}}"#;
        let page = |rec: &str| format!(r#"{{"Records":[{ok},{rec}],"NextShardIterator":"n"}}"#);
        assert!(convert_page(page(ok).as_bytes(), &source(), true, 1 << 20).is_some());
        for bad in [
            ok.replace(r#"{"S":"a"}}}"#, r#"{"N":"1,5"}}}"#),                 // invalid number
            ok.replace(r#""NewImage":{"pk":{"S":"a"}}"#, r#""NewImage":{"x":{"N":"NaN"}}"#),
            ok.replace(r#"{"S":"a"}}}"#, r#"{"S":null}}}"#),                  // null member
            ok.replace(r#"{"S":"a"}}}"#, r#"{"S":"a","N":"1"}}}"#),           // two members
            ok.replace(r#"{"S":"a"}}}"#, r#"{"X":"a"}}}"#),                   // unknown type
            ok.replace(r#"{"S":"a"}}}"#, r#"{"B":"aGk"}}}"#),                 // not canonical base64
            ok.replace("INSERT", "UPSERT"),                                   // unknown event
            ok.replace(r#""Keys":{"pk":{"S":"a"}},"#, ""),                    // no keys
            ok.replace(r#""Keys":{"pk":{"S":"a"}}"#, r#""Keys":{}"#),         // empty keys
            ok.replace(r#""SequenceNumber":"1","#, ""),                       // no sequence number
            ok.replace(r#","dynamodb":{"SequenceNumber":"1","Keys":{"pk":{"S":"a"}},"NewImage":{"pk":{"S":"a"}}}"#, ""),
            "not json".to_owned(),
        ] {
            assert!(convert_page(page(&bad).as_bytes(), &source(), true, 1 << 20).is_none(), "{bad}");
        }
        assert!(convert_page(br#"{"Records":null}"#, &source(), true, 1 << 20).is_none());
        // Too large for max_message_bytes: the reference path dead-letters it.
        assert!(convert_page(page(ok).as_bytes(), &source(), true, 100).is_none());
    }

    /// Bytes that turn a page into nearby pages: JSON's structure, escapes, digits,
    /// literals' letters, attribute types.
    const EDIT_BYTES: &[u8] = b" \t\n\"\\{}[],:0123456789.eE-+nultrfasSNBLMu/";

    proptest! {
        #[test]
        fn the_hand_written_reader_takes_every_generated_page_as_serde_json_reads_it(
            records in prop::collection::vec(any_record(), 0..6),
            tombstones in any::<bool>(),
        ) {
            let body = body(&records, Some("it-2"));
            let text = std::str::from_utf8(&body).unwrap();
            let source = source();
            let mut page = PageState::new(&body, &source, tombstones, 1 << 30);
            prop_assert!(scan::read_page(text, &mut page).is_ok(), "the reader was unsure of {text}");
            check_readers_agree(&body, &source, tombstones, 1 << 30).map_err(TestCaseError::fail)?;
        }

        #[test]
        fn a_page_the_hand_written_reader_takes_after_edits_is_what_serde_json_reads(
            records in prop::collection::vec(any_record(), 1..4),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0..3u8, prop::sample::select(EDIT_BYTES)),
                1..4,
            ),
        ) {
            let mut body = body(&records, Some("it-2"));
            for (at, op, byte) in edits {
                let i = at.index(body.len() + 1);
                match op {
                    0 => body.insert(i, byte),
                    1 if i < body.len() => {
                        body.remove(i);
                    }
                    _ if i < body.len() => body[i] = byte,
                    _ => {}
                }
            }
            check_readers_agree(&body, &source(), true, 1 << 30).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn the_hand_written_reader_reads_odd_but_valid_pages_or_leaves_them_to_serde_json() {
        let rec = r#"{"eventName":"INSERT","eventID":"e","dynamodb":{"SequenceNumber":"1","Keys":{"pk":{"S":"a"}},"NewImage":{"pk":{"S":"a"},"n":{"N":"1E5"}}}}"#;
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<Value>(&format!(
                r#"{{"Records":[{rec}],"NextShardIterator":"n"}}"#
            ))
            .unwrap(),
        )
        .unwrap();
        let deep = format!(
            r#"{{"Records":[],"Deep":{}1{},"NextShardIterator":"n"}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        for (body, read_by_hand) in [
            // Whitespace anywhere JSON allows it.
            (pretty, true),
            // Escaped member names are the names they spell.
            (
                format!(
                    r#"{{"Record\u0073":[{}],"NextShardIterator":null}}"#,
                    rec.replace("eventName", "event\\u004eame")
                ),
                true,
            ),
            // Members the reader does not use, of every kind.
            (
                format!(
                    r#"{{"Records":[{rec}],"x":[1,-2.5e3,true,false,null,{{"a":"\"\\\/\b\f\n\r\t\ud83d\ude00"}}]}}"#
                ),
                true,
            ),
            // Nesting deeper than the reader goes: serde_json reads it.
            (deep, false),
            // A record as an array: serde's derive takes it, this reader leaves it.
            (
                r#"{"Records":[["e","INSERT",{"SequenceNumber":"1","Keys":{"pk":{"S":"a"}}}]]}"#
                    .to_owned(),
                false,
            ),
            // Repeated members: serde_json refuses them.
            (format!(r#"{{"Records":[],"Records":[{rec}]}}"#), false),
            (
                format!(
                    r#"{{"Records":[{}]}}"#,
                    rec.replace(r#""eventID":"e""#, r#""eventID":"e","eventID":"f""#)
                ),
                false,
            ),
            // A lone surrogate.
            (r#"{"Records":[],"x":"\udc00"}"#.to_owned(), false),
            (r#"{"Records":[]} x"#.to_owned(), false),
        ] {
            let source = source();
            let mut page = PageState::new(body.as_bytes(), &source, true, 1 << 30);
            assert_eq!(
                scan::read_page(&body, &mut page).is_ok(),
                read_by_hand,
                "{body}"
            );
            check_readers_agree(body.as_bytes(), &source, true, 1 << 30).unwrap();
        }
    }
}
