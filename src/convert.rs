//! Conversion: DynamoDB Streams record -> Kafka record (key, value, headers, timestamp).
//!
//! Attribute values become plain JSON: S string, N a JSON number with exactly the digits
//! DynamoDB stored (serde_json's `arbitrary_precision` keeps them; nothing goes through a
//! float), B base64, BOOL, NULL null, M object, L array, SS/NS/BS arrays.
//! (`serde_dynamo` reads N through `f64` or `i64`, which rounds 38-digit numbers, so the
//! conversion is written here.)

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Number, Value};

pub mod fast;

pub use fast::{convert_page, FastPage};

/// Where a record came from: names that go into every event of a shard.
#[derive(Debug, Clone)]
pub struct Source {
    /// The table.
    pub table: String,
    /// The stream.
    pub stream_arn: String,
    /// The shard.
    pub shard_id: String,
}

/// Why a record cannot be converted.
///
/// Neither the Display nor the Debug form carries an item's values (or a record's text):
/// they reach log lines and dead letters' `error`, and items hold users' data. They name
/// the attribute instead (`path`); the dead letter keeps the raw record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The record has no `dynamodb` section.
    #[error("record has no dynamodb section")]
    MissingStreamRecord,
    /// The record has no sequence number.
    #[error("record has no sequence number")]
    MissingSequenceNumber,
    /// The record has no (or empty) `Keys`.
    #[error("record has no keys")]
    MissingKeys,
    /// The event name is missing or not INSERT, MODIFY or REMOVE (its text is left out).
    #[error("unknown event name: not INSERT, MODIFY or REMOVE")]
    UnknownEventName,
    /// An N value is not a number (its text is left out).
    #[error("attribute {path}: the N value is not a number")]
    InvalidNumber {
        /// Where in the item: attribute names, list indices.
        path: String,
    },
    /// An attribute type this version does not know.
    #[error("attribute {path}: unknown attribute type")]
    UnknownAttributeType {
        /// Where in the item.
        path: String,
    },
}

/// The kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventName {
    /// A new item.
    Insert,
    /// An item changed.
    Modify,
    /// An item was deleted.
    Remove,
}

impl EventName {
    /// The name as DynamoDB writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventName::Insert => "INSERT",
            EventName::Modify => "MODIFY",
            EventName::Remove => "REMOVE",
        }
    }
}

/// The change event, as it is serialized into the Kafka record value.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeEvent<'a> {
    /// INSERT, MODIFY or REMOVE.
    pub event_name: EventName,
    /// The table.
    pub table: &'a str,
    /// The item's primary key attributes.
    pub keys: Map<String, Value>,
    /// The item after the change (null if the view type omits it, or on REMOVE).
    pub new_image: Option<Map<String, Value>>,
    /// The item before the change (null if the view type omits it, or on INSERT).
    pub old_image: Option<Map<String, Value>>,
    /// The stream sequence number: unique within the stream, increasing within a shard.
    pub sequence_number: &'a str,
    /// ApproximateCreationDateTime in milliseconds since the epoch.
    pub approximate_creation_time_ms: Option<i64>,
    /// The stream's id for this event.
    pub event_id: Option<&'a str>,
    /// The shard the record was read from.
    pub shard_id: &'a str,
    /// The stream.
    pub stream_arn: &'a str,
    /// Set for deletions made by DynamoDB itself (TTL): `{"type": "Service",
    /// "principal_id": "dynamodb.amazonaws.com"}`.
    pub user_identity: Option<Map<String, Value>>,
}

/// A converted record, ready to produce.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The kind of change.
    pub event_name: EventName,
    /// The record's sequence number.
    pub sequence_number: String,
    /// ApproximateCreationDateTime in milliseconds, if present.
    pub approximate_creation_time_ms: Option<i64>,
    /// The Kafka records: the event, then its tombstone when asked for.
    pub records: Vec<rskafka::record::Record>,
}

/// One attribute value, borrowed: what the DynamoDB Streams SDK's and the DynamoDB SDK's
/// (Scan) `AttributeValue` types both hold, so that one conversion serves changes and
/// snapshot rows alike.
#[derive(Debug)]
pub enum AttrRef<'a, A> {
    /// S.
    S(&'a str),
    /// N, the digits as DynamoDB stored them.
    N(&'a str),
    /// B.
    B(&'a [u8]),
    /// BOOL.
    Bool(bool),
    /// NULL.
    Null,
    /// M.
    M(&'a HashMap<String, A>),
    /// L.
    L(&'a [A]),
    /// SS.
    Ss(&'a [String]),
    /// NS.
    Ns(&'a [String]),
    /// BS.
    Bs(&'a [aws_smithy_types::Blob]),
    /// A type this version does not know.
    Unknown,
}

/// An SDK's attribute value type.
pub trait Attribute: Sized {
    /// The value, borrowed.
    fn view(&self) -> AttrRef<'_, Self>;
}

macro_rules! impl_attribute {
    ($t:ty) => {
        impl Attribute for $t {
            fn view(&self) -> AttrRef<'_, Self> {
                type V = $t;
                match self {
                    V::S(s) => AttrRef::S(s),
                    V::N(n) => AttrRef::N(n),
                    V::B(b) => AttrRef::B(b.as_ref()),
                    V::Bool(b) => AttrRef::Bool(*b),
                    V::Null(_) => AttrRef::Null,
                    V::M(m) => AttrRef::M(m),
                    V::L(l) => AttrRef::L(l),
                    V::Ss(ss) => AttrRef::Ss(ss),
                    V::Ns(ns) => AttrRef::Ns(ns),
                    V::Bs(bs) => AttrRef::Bs(bs),
                    _ => AttrRef::Unknown,
                }
            }
        }
    };
}

impl_attribute!(AttributeValue);
impl_attribute!(aws_sdk_dynamodb::types::AttributeValue);

/// Converts one attribute value to JSON; `path` names it in errors.
pub fn attribute_to_json<A: Attribute>(value: &A, path: &str) -> Result<Value, ConvertError> {
    Ok(match value.view() {
        AttrRef::S(s) => Value::String(s.to_owned()),
        AttrRef::N(n) => Value::Number(number(n, path)?),
        AttrRef::B(b) => Value::String(b64(b)),
        AttrRef::Bool(b) => Value::Bool(b),
        AttrRef::Null => Value::Null,
        AttrRef::M(m) => Value::Object(map_to_json(m, path)?),
        AttrRef::L(l) => Value::Array(
            l.iter()
                .enumerate()
                .map(|(i, v)| attribute_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        AttrRef::Ss(ss) => Value::Array(ss.iter().cloned().map(Value::String).collect()),
        AttrRef::Ns(ns) => Value::Array(
            ns.iter()
                .map(|n| number(n, path).map(Value::Number))
                .collect::<Result<_, _>>()?,
        ),
        AttrRef::Bs(bs) => {
            Value::Array(bs.iter().map(|b| Value::String(b64(b.as_ref()))).collect())
        }
        AttrRef::Unknown => {
            return Err(ConvertError::UnknownAttributeType {
                path: path.to_owned(),
            })
        }
    })
}

/// Converts an item (or key) map; the result's keys are sorted.
pub fn map_to_json<A: Attribute>(
    map: &HashMap<String, A>,
    path: &str,
) -> Result<Map<String, Value>, ConvertError> {
    map.iter()
        .map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            attribute_to_json(v, &p).map(|j| (k.clone(), j))
        })
        .collect()
}

fn number(text: &str, path: &str) -> Result<Number, ConvertError> {
    let invalid = || ConvertError::InvalidNumber {
        path: path.to_owned(),
    };
    if text.is_empty() || text.trim() != text {
        return Err(invalid());
    }
    serde_json::from_str::<Number>(text).map_err(|_| invalid())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The Kafka key of an item: its primary key as compact JSON with sorted names, e.g.
/// `{"pk":"k1","sk":5}`.
pub fn key_bytes(keys: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(keys).expect("a JSON map always serializes")
}

/// Where a snapshot row came from: `"snapshot":{...}` of a SNAPSHOT event.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SnapshotOrigin {
    /// The Scan segment that read the item.
    pub segment: u32,
    /// TotalSegments of the Scan.
    pub total_segments: u32,
    /// When the snapshot started, in milliseconds since the epoch.
    pub started_at_ms: i64,
}

/// A snapshot row: the change event's envelope with `event_name` SNAPSHOT, the item as
/// `new_image`, and null where a stream record would say more.
#[derive(Debug, Serialize)]
struct SnapshotEvent<'a> {
    event_name: &'static str,
    table: &'a str,
    keys: &'a Map<String, Value>,
    new_image: &'a Map<String, Value>,
    old_image: Option<()>,
    sequence_number: Option<()>,
    approximate_creation_time_ms: i64,
    event_id: Option<()>,
    shard_id: Option<()>,
    stream_arn: Option<()>,
    user_identity: Option<()>,
    snapshot: SnapshotOrigin,
}

/// The event name of snapshot rows (value and `dynamodb.event_name` header).
pub const SNAPSHOT_EVENT_NAME: &str = "SNAPSHOT";

/// Converts an item read by Scan into its SNAPSHOT record: keyed by the attributes of
/// `key_names` (the table's key schema) exactly like the item's changes, so it goes to the
/// same partition; `read_at_ms` (when the page was read) is its creation time and timestamp.
pub fn snapshot_record<A: Attribute>(
    item: &HashMap<String, A>,
    key_names: &[String],
    table: &str,
    origin: SnapshotOrigin,
    read_at_ms: i64,
) -> Result<rskafka::record::Record, ConvertError> {
    let new_image = map_to_json(item, "")?;
    let mut keys = Map::new();
    for name in key_names {
        let value = new_image.get(name).ok_or(ConvertError::MissingKeys)?;
        keys.insert(name.clone(), value.clone());
    }
    let event = SnapshotEvent {
        event_name: SNAPSHOT_EVENT_NAME,
        table,
        keys: &keys,
        new_image: &new_image,
        old_image: None,
        sequence_number: None,
        approximate_creation_time_ms: read_at_ms,
        event_id: None,
        shard_id: None,
        stream_arn: None,
        user_identity: None,
        snapshot: origin,
    };
    let value = serde_json::to_vec(&event).expect("a snapshot event always serializes");
    let headers = BTreeMap::from([
        (
            "dynamodb.event_name".to_owned(),
            SNAPSHOT_EVENT_NAME.as_bytes().to_vec(),
        ),
        ("dynamodb.table".to_owned(), table.as_bytes().to_vec()),
    ]);
    Ok(rskafka::record::Record {
        key: Some(key_bytes(&keys)),
        value: Some(value),
        headers,
        timestamp: chrono::DateTime::from_timestamp_millis(read_at_ms)
            .unwrap_or_else(chrono::Utc::now),
    })
}

/// Converts a stream record into its Kafka records.
pub fn convert(
    record: &Record,
    source: &Source,
    tombstones: bool,
) -> Result<Converted, ConvertError> {
    let event_name = match record.event_name() {
        Some(OperationType::Insert) => EventName::Insert,
        Some(OperationType::Modify) => EventName::Modify,
        Some(OperationType::Remove) => EventName::Remove,
        Some(_) | None => return Err(ConvertError::UnknownEventName),
    };
    let stream = record.dynamodb().ok_or(ConvertError::MissingStreamRecord)?;
    let sequence_number = stream
        .sequence_number()
        .ok_or(ConvertError::MissingSequenceNumber)?;
    let keys = match stream.keys() {
        Some(k) if !k.is_empty() => map_to_json(k, "")?,
        _ => return Err(ConvertError::MissingKeys),
    };
    let approximate_creation_time_ms = stream
        .approximate_creation_date_time()
        .and_then(|t| t.to_millis().ok());
    let user_identity = record.user_identity().map(|id| {
        let mut m = Map::new();
        m.insert(
            "type".into(),
            id.r#type()
                .map_or(Value::Null, |t| Value::String(t.to_owned())),
        );
        m.insert(
            "principal_id".into(),
            id.principal_id()
                .map_or(Value::Null, |p| Value::String(p.to_owned())),
        );
        m
    });
    let event = ChangeEvent {
        event_name,
        table: &source.table,
        new_image: stream.new_image().map(|m| map_to_json(m, "")).transpose()?,
        old_image: stream.old_image().map(|m| map_to_json(m, "")).transpose()?,
        keys,
        sequence_number,
        approximate_creation_time_ms,
        event_id: record.event_id(),
        shard_id: &source.shard_id,
        stream_arn: &source.stream_arn,
        user_identity,
    };
    let key = key_bytes(&event.keys);
    let value = serde_json::to_vec(&event).expect("a change event always serializes");
    let mut records = Vec::with_capacity(2);
    push_event_records(
        event_name,
        sequence_number,
        approximate_creation_time_ms,
        source,
        key,
        value,
        tombstones,
        &mut records,
    );
    Ok(Converted {
        event_name,
        sequence_number: sequence_number.to_owned(),
        approximate_creation_time_ms,
        records,
    })
}

/// Appends the Kafka records of one change to `out`: the event, then its tombstone after a
/// REMOVE when asked for; headers name the event, sequence number, shard and table; the
/// timestamp is the change's creation time.
#[allow(clippy::too_many_arguments)]
fn push_event_records(
    event_name: EventName,
    sequence_number: &str,
    approximate_creation_time_ms: Option<i64>,
    source: &Source,
    key: Vec<u8>,
    value: Vec<u8>,
    tombstones: bool,
    out: &mut Vec<rskafka::record::Record>,
) {
    let timestamp = approximate_creation_time_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_else(chrono::Utc::now);
    // rskafka's records own their headers (`BTreeMap<String, Vec<u8>>`): four names, four
    // values and one tree node per record is the least its type allows.
    let headers = BTreeMap::from([
        (
            "dynamodb.event_name".to_owned(),
            event_name.as_str().as_bytes().to_vec(),
        ),
        (
            "dynamodb.sequence_number".to_owned(),
            sequence_number.as_bytes().to_vec(),
        ),
        (
            "dynamodb.shard_id".to_owned(),
            source.shard_id.as_bytes().to_vec(),
        ),
        (
            "dynamodb.table".to_owned(),
            source.table.as_bytes().to_vec(),
        ),
    ]);
    if tombstones && event_name == EventName::Remove {
        out.push(rskafka::record::Record {
            key: Some(key.clone()),
            value: Some(value),
            headers: headers.clone(),
            timestamp,
        });
        out.push(rskafka::record::Record {
            key: Some(key),
            value: None,
            headers,
            timestamp,
        });
    } else {
        out.push(rskafka::record::Record {
            key: Some(key),
            value: Some(value),
            headers,
            timestamp,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::types::{Identity, StreamRecord};
    use aws_smithy_types::{Blob, DateTime};
    use proptest::prelude::*;

    #[test]
    fn snapshot_rows_have_the_change_envelope_and_the_changes_key() {
        use aws_sdk_dynamodb::types::AttributeValue as Av;
        let item = HashMap::from([
            ("pk".to_owned(), Av::S("k1".into())),
            (
                "sk".to_owned(),
                Av::N("12345678901234567890.123456789".into()),
            ),
            ("tags".to_owned(), Av::Ss(vec!["a".into(), "b".into()])),
            (
                "blob".to_owned(),
                Av::B(aws_smithy_types::Blob::new(vec![1u8, 2, 3])),
            ),
            (
                "nested".to_owned(),
                Av::M(HashMap::from([("x".to_owned(), Av::Null(true))])),
            ),
        ]);
        let origin = SnapshotOrigin {
            segment: 2,
            total_segments: 4,
            started_at_ms: 1000,
        };
        let names = vec!["pk".to_owned(), "sk".to_owned()];
        let r = snapshot_record(&item, &names, "orders", origin, 2000).unwrap();
        assert_eq!(
            String::from_utf8(r.key.clone().unwrap()).unwrap(),
            r#"{"pk":"k1","sk":12345678901234567890.123456789}"#
        );
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["event_name"], "SNAPSHOT");
        assert_eq!(v["table"], "orders");
        assert_eq!(v["new_image"]["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(v["new_image"]["blob"], "AQID");
        assert_eq!(v["new_image"]["nested"]["x"], Value::Null);
        assert_eq!(
            v["new_image"]["sk"].to_string(),
            "12345678901234567890.123456789"
        );
        for null in [
            "old_image",
            "sequence_number",
            "event_id",
            "shard_id",
            "stream_arn",
            "user_identity",
        ] {
            assert_eq!(v[null], Value::Null, "{null}");
            assert!(v.as_object().unwrap().contains_key(null), "{null}");
        }
        assert_eq!(v["approximate_creation_time_ms"], 2000);
        assert_eq!(
            v["snapshot"],
            serde_json::json!({"segment": 2, "total_segments": 4, "started_at_ms": 1000})
        );
        assert_eq!(r.headers["dynamodb.event_name"], b"SNAPSHOT");
        assert_eq!(r.headers["dynamodb.table"], b"orders");
        assert_eq!(r.timestamp.timestamp_millis(), 2000);
        // The same item's change has the same Kafka key.
        let stream_keys = HashMap::from([
            (
                "sk".to_owned(),
                AttributeValue::N("12345678901234567890.123456789".into()),
            ),
            ("pk".to_owned(), AttributeValue::S("k1".into())),
        ]);
        assert_eq!(
            key_bytes(&map_to_json(&stream_keys, "").unwrap()),
            r.key.unwrap()
        );
        // An item without its key attribute is an error, not a row with a wrong key.
        let err = snapshot_record(&item, &["id".to_owned()], "orders", origin, 0).unwrap_err();
        assert_eq!(err, ConvertError::MissingKeys);
    }

    fn source() -> Source {
        Source {
            table: "orders".into(),
            stream_arn: "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1".into(),
            shard_id: "shardId-1".into(),
        }
    }

    fn record(name: OperationType, stream: StreamRecord) -> Record {
        Record::builder()
            .event_id("ev1")
            .event_name(name)
            .dynamodb(stream)
            .build()
    }

    #[test]
    fn modify_event_has_every_field_and_exact_numbers() {
        let stream = StreamRecord::builder()
            .keys("pk", AttributeValue::S("k1".into()))
            .keys("sk", AttributeValue::N("5".into()))
            .new_image("pk", AttributeValue::S("k1".into()))
            .new_image("sk", AttributeValue::N("5".into()))
            .new_image(
                "big",
                AttributeValue::N("12345678901234567890.123456789".into()),
            )
            .new_image("b", AttributeValue::B(Blob::new(b"hi".to_vec())))
            .new_image("ok", AttributeValue::Bool(true))
            .new_image("nothing", AttributeValue::Null(true))
            .new_image("ss", AttributeValue::Ss(vec!["a".into(), "b".into()]))
            .new_image(
                "ns",
                AttributeValue::Ns(vec![
                    "1".into(),
                    "-0.000000000000000000000000000000000001".into(),
                ]),
            )
            .new_image("bs", AttributeValue::Bs(vec![Blob::new(vec![0u8, 255])]))
            .new_image(
                "m",
                AttributeValue::M(HashMap::from([(
                    "l".to_string(),
                    AttributeValue::L(vec![AttributeValue::N("1E+2".into())]),
                )])),
            )
            .old_image("pk", AttributeValue::S("k1".into()))
            .sequence_number("000001")
            .approximate_creation_date_time(DateTime::from_millis(1_700_000_000_123))
            .build();
        let c = convert(&record(OperationType::Modify, stream), &source(), true).unwrap();
        assert_eq!(c.records.len(), 1);
        let r = &c.records[0];
        assert_eq!(r.key.as_deref(), Some(br#"{"pk":"k1","sk":5}"#.as_slice()));
        let text = String::from_utf8(r.value.clone().unwrap()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"event_name":"MODIFY","table":"orders","keys":{"pk":"k1","sk":5},"#,
                r#""new_image":{"b":"aGk=","big":12345678901234567890.123456789,"bs":["AP8="],"#,
                r#""m":{"l":[1e+2]},"nothing":null,"ns":[1,-0.000000000000000000000000000000000001],"#,
                r#""ok":true,"pk":"k1","sk":5,"ss":["a","b"]},"old_image":{"pk":"k1"},"#,
                r#""sequence_number":"000001","approximate_creation_time_ms":1700000000123,"#,
                r#""event_id":"ev1","shard_id":"shardId-1","#,
                r#""stream_arn":"arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1","#,
                r#""user_identity":null}"#
            )
        );
        assert_eq!(r.timestamp.timestamp_millis(), 1_700_000_000_123);
        let h = |k: &str| String::from_utf8(r.headers[k].clone()).unwrap();
        assert_eq!(h("dynamodb.event_name"), "MODIFY");
        assert_eq!(h("dynamodb.sequence_number"), "000001");
        assert_eq!(h("dynamodb.shard_id"), "shardId-1");
        assert_eq!(h("dynamodb.table"), "orders");
    }

    #[test]
    fn remove_gets_a_tombstone_when_asked_and_ttl_identity() {
        let stream = StreamRecord::builder()
            .keys("pk", AttributeValue::S("k1".into()))
            .sequence_number("7")
            .build();
        let mut rec = record(OperationType::Remove, stream);
        rec.user_identity = Some(
            Identity::builder()
                .r#type("Service")
                .principal_id("dynamodb.amazonaws.com")
                .build(),
        );
        let c = convert(&rec, &source(), true).unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.records[1].value, None);
        assert_eq!(c.records[1].key, c.records[0].key);
        let v: Value = serde_json::from_slice(c.records[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(v["user_identity"]["type"], "Service");
        assert_eq!(v["user_identity"]["principal_id"], "dynamodb.amazonaws.com");
        assert_eq!(v["new_image"], Value::Null);
        assert_eq!(convert(&rec, &source(), false).unwrap().records.len(), 1);
    }

    #[test]
    fn broken_records_are_errors_not_panics() {
        let ok = || {
            StreamRecord::builder()
                .keys("pk", AttributeValue::S("k".into()))
                .sequence_number("1")
        };
        let e = |r: Record| convert(&r, &source(), true).unwrap_err();
        assert_eq!(
            e(Record::builder().event_name(OperationType::Insert).build()),
            ConvertError::MissingStreamRecord
        );
        assert_eq!(
            e(record(
                OperationType::Insert,
                StreamRecord::builder()
                    .keys("pk", AttributeValue::S("k".into()))
                    .build()
            )),
            ConvertError::MissingSequenceNumber
        );
        assert_eq!(
            e(record(
                OperationType::Insert,
                StreamRecord::builder().sequence_number("1").build()
            )),
            ConvertError::MissingKeys
        );
        assert!(matches!(
            e(record(OperationType::from("UPSERT"), ok().build())),
            ConvertError::UnknownEventName
        ));
        assert!(matches!(
            e(record(OperationType::Insert, ok().new_image("x", AttributeValue::N("1,5".into())).build())),
            ConvertError::InvalidNumber { path, .. } if path == "x"
        ));
        assert!(matches!(
            e(record(
                OperationType::Insert,
                ok().new_image("x", AttributeValue::N("NaN".into())).build()
            )),
            ConvertError::InvalidNumber { .. }
        ));
    }

    /// Users' data: a value that must never reach an error's Display or Debug.
    pub(crate) const MARKER: &str = "s3cr3t-M4RK3R";

    /// An item holding [`MARKER`] in every value position and type (valid ones).
    pub(crate) fn marked_item() -> HashMap<String, AttributeValue> {
        let m = || AttributeValue::S(MARKER.into());
        HashMap::from([
            ("s".to_owned(), m()),
            (
                "b".to_owned(),
                AttributeValue::B(Blob::new(MARKER.as_bytes())),
            ),
            ("ss".to_owned(), AttributeValue::Ss(vec![MARKER.into()])),
            (
                "bs".to_owned(),
                AttributeValue::Bs(vec![Blob::new(MARKER.as_bytes())]),
            ),
            (
                "m".to_owned(),
                AttributeValue::M(HashMap::from([
                    ("inner".to_owned(), m()),
                    (
                        "l".to_owned(),
                        AttributeValue::L(vec![
                            m(),
                            AttributeValue::M(HashMap::from([("deep".to_owned(), m())])),
                        ]),
                    ),
                ])),
            ),
            (
                "l".to_owned(),
                AttributeValue::L(vec![m(), AttributeValue::Ss(vec![MARKER.into()])]),
            ),
        ])
    }

    /// Poison records holding [`MARKER`] everywhere (key values, image values of every
    /// type, invalid numbers at every depth, the event name), each with why it is poison.
    pub(crate) fn marked_poison_records() -> Vec<(&'static str, Record)> {
        let bad_n = || AttributeValue::N(format!("1,5{MARKER}"));
        let keys = || {
            HashMap::from([
                ("pk".to_owned(), AttributeValue::S(MARKER.into())),
                ("sk".to_owned(), AttributeValue::N("5".into())),
            ])
        };
        let with = |name: OperationType,
                    keys: HashMap<String, AttributeValue>,
                    new: HashMap<String, AttributeValue>| {
            Record::builder()
                .event_id("ev1")
                .event_name(name)
                .dynamodb(
                    StreamRecord::builder()
                        .set_keys(Some(keys))
                        .set_new_image(Some(new))
                        .set_old_image(Some(marked_item()))
                        .sequence_number("000001")
                        .build(),
                )
                .build()
        };
        let item_with = |name: &str, v: AttributeValue| {
            let mut item = marked_item();
            item.insert(name.to_owned(), v);
            item
        };
        let mut bad_key = keys();
        bad_key.insert("sk".to_owned(), bad_n());
        vec![
            (
                "invalid number",
                with(OperationType::Insert, keys(), item_with("n", bad_n())),
            ),
            (
                "invalid number, number only",
                with(
                    OperationType::Insert,
                    keys(),
                    item_with("n", AttributeValue::N(MARKER.into())),
                ),
            ),
            (
                "invalid number in a set",
                with(
                    OperationType::Insert,
                    keys(),
                    item_with("ns", AttributeValue::Ns(vec!["1".into(), MARKER.into()])),
                ),
            ),
            (
                "invalid number in a list in a map",
                with(
                    OperationType::Modify,
                    keys(),
                    item_with(
                        "deep",
                        AttributeValue::M(HashMap::from([(
                            "l".to_owned(),
                            AttributeValue::L(vec![AttributeValue::S(MARKER.into()), bad_n()]),
                        )])),
                    ),
                ),
            ),
            (
                "invalid number in a key",
                with(OperationType::Insert, bad_key, marked_item()),
            ),
            (
                "unknown event name",
                with(OperationType::from(MARKER), keys(), marked_item()),
            ),
        ]
    }

    #[test]
    fn no_item_value_reaches_an_error() {
        for (why, record) in marked_poison_records() {
            let e = convert(&record, &source(), true).expect_err(why);
            for text in [e.to_string(), format!("{e:?}")] {
                assert!(!text.contains(MARKER), "{why}: {text}");
                assert!(!text.contains(&b64(MARKER.as_bytes())), "{why}: {text}");
            }
        }
        // Errors still name the attribute.
        let (_, r) = &marked_poison_records()[0];
        assert!(convert(r, &source(), true)
            .unwrap_err()
            .to_string()
            .contains("attribute n"));
    }

    /// DynamoDB numbers: up to 38 significant digits, exponents from -130 to +125.
    pub(crate) fn dynamo_number() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            "[1-9][0-9]{0,37}",
            prop::option::of(0usize..38),
            prop::option::of(-130i32..125),
        )
            .prop_map(|(neg, digits, point, exp)| {
                let mut s = String::new();
                if neg {
                    s.push('-');
                }
                match point {
                    Some(p) if p > 0 && p < digits.len() => {
                        s.push_str(&digits[..p]);
                        s.push('.');
                        s.push_str(&digits[p..]);
                    }
                    _ => s.push_str(&digits),
                }
                if let Some(e) = exp {
                    s.push_str(&format!("E{e}"));
                }
                s
            })
    }

    pub(crate) fn attribute() -> impl Strategy<Value = AttributeValue> {
        let leaf = prop_oneof![
            ".*".prop_map(AttributeValue::S),
            dynamo_number().prop_map(AttributeValue::N),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| AttributeValue::B(Blob::new(b))),
            any::<bool>().prop_map(AttributeValue::Bool),
            Just(AttributeValue::Null(true)),
            prop::collection::vec(".*", 1..4).prop_map(AttributeValue::Ss),
            prop::collection::vec(dynamo_number(), 1..4).prop_map(AttributeValue::Ns),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 1..3)
                .prop_map(|v| AttributeValue::Bs(v.into_iter().map(Blob::new).collect())),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(AttributeValue::L),
                prop::collection::hash_map(".*", inner, 0..6).prop_map(AttributeValue::M),
            ]
        })
    }

    /// The number as written, with only the exponent marker in JSON's usual spelling
    /// (`1E5` -> `1e+5`): every digit, the sign and the point stay where they were.
    fn canonical(n: &str) -> String {
        match n.find(['e', 'E']) {
            None => n.to_owned(),
            Some(i) => {
                let (mantissa, exp) = (&n[..i], &n[i + 1..]);
                let exp = if exp.starts_with(['+', '-']) {
                    exp.to_owned()
                } else {
                    format!("+{exp}")
                };
                format!("{mantissa}e{exp}")
            }
        }
    }

    /// Checks that `json` carries exactly what `attr` holds.
    fn same(attr: &AttributeValue, json: &Value) -> bool {
        let blob = |b: &Blob, j: &Value| j.as_str() == Some(b64(b.as_ref()).as_str());
        match (attr, json) {
            (AttributeValue::S(s), Value::String(j)) => s == j,
            (AttributeValue::N(n), Value::Number(j)) => canonical(n) == j.to_string(),
            (AttributeValue::B(b), j) => blob(b, j),
            (AttributeValue::Bool(b), Value::Bool(j)) => b == j,
            (AttributeValue::Null(_), Value::Null) => true,
            (AttributeValue::M(m), Value::Object(j)) => {
                m.len() == j.len()
                    && m.iter()
                        .all(|(k, v)| j.get(k).is_some_and(|jv| same(v, jv)))
            }
            (AttributeValue::L(l), Value::Array(j)) => {
                l.len() == j.len() && l.iter().zip(j).all(|(a, b)| same(a, b))
            }
            (AttributeValue::Ss(s), Value::Array(j)) => {
                s.len() == j.len() && s.iter().zip(j).all(|(a, b)| b.as_str() == Some(a))
            }
            (AttributeValue::Ns(s), Value::Array(j)) => {
                s.len() == j.len()
                    && s.iter()
                        .zip(j)
                        .all(|(a, b)| b.as_number().is_some_and(|n| n.to_string() == canonical(a)))
            }
            (AttributeValue::Bs(s), Value::Array(j)) => {
                s.len() == j.len() && s.iter().zip(j).all(|(a, b)| blob(a, b))
            }
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn any_attribute_converts_without_loss(attr in attribute()) {
            let json = attribute_to_json(&attr, "x").unwrap();
            // Through the wire: serialize and parse again, as a consumer would.
            let text = serde_json::to_string(&json).unwrap();
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert!(same(&attr, &parsed), "{attr:?} became {text}");
        }

        #[test]
        fn numbers_keep_every_digit(n in dynamo_number()) {
            let json = attribute_to_json(&AttributeValue::N(n.clone()), "n").unwrap();
            prop_assert_eq!(serde_json::to_string(&json).unwrap(), canonical(&n));
        }

        #[test]
        fn key_is_canonical_whatever_the_map_order(a in ".*", b in dynamo_number()) {
            let keys1 = HashMap::from([("sk".to_string(), AttributeValue::N(b.clone())), ("pk".to_string(), AttributeValue::S(a.clone()))]);
            let keys2 = HashMap::from([("pk".to_string(), AttributeValue::S(a.clone())), ("sk".to_string(), AttributeValue::N(b.clone()))]);
            let k1 = key_bytes(&map_to_json(&keys1, "").unwrap());
            let k2 = key_bytes(&map_to_json(&keys2, "").unwrap());
            prop_assert_eq!(&k1, &k2);
            let text = String::from_utf8(k1).unwrap();
            prop_assert!(text.starts_with("{\"pk\":"), "{}", text);
            prop_assert!(text.ends_with(&format!(",\"sk\":{}}}", canonical(&b))), "{}", text);
        }
    }
}
