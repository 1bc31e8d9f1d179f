//! Records about records: dead letters for poison records (unconvertible or oversized) and
//! `DATA_LOSS` markers for trimmed ranges. Neither is ever silent: each goes to Kafka and to
//! an ERROR log line.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodbstreams::types::Record as StreamRecord;
use base64::Engine as _;
use rskafka::record::Record;
use serde_json::{json, Map, Value};

use crate::convert::{AttrRef, Attribute, SnapshotOrigin, Source};

/// The record as DynamoDB Streams JSON (typed attribute values, numbers as strings): a lossless
/// dump that cannot fail, for a dead letter.
pub fn raw_record_json(record: &StreamRecord) -> Value {
    let mut out = Map::new();
    out.insert("eventID".into(), record.event_id().into());
    out.insert(
        "eventName".into(),
        record.event_name().map(|n| n.as_str()).into(),
    );
    if let Some(id) = record.user_identity() {
        out.insert(
            "userIdentity".into(),
            json!({"type": id.r#type(), "principalId": id.principal_id()}),
        );
    }
    if let Some(d) = record.dynamodb() {
        let mut m = Map::new();
        m.insert("SequenceNumber".into(), d.sequence_number().into());
        m.insert(
            "ApproximateCreationDateTime".into(),
            d.approximate_creation_date_time()
                .and_then(|t| t.to_millis().ok())
                .into(),
        );
        m.insert("SizeBytes".into(), d.size_bytes().into());
        for (name, image) in [
            ("Keys", d.keys()),
            ("NewImage", d.new_image()),
            ("OldImage", d.old_image()),
        ] {
            if let Some(image) = image {
                let typed: Map<String, Value> = image
                    .iter()
                    .map(|(k, v)| (k.clone(), typed_json(v)))
                    .collect();
                m.insert(name.into(), Value::Object(typed));
            }
        }
        out.insert("dynamodb".into(), Value::Object(m));
    }
    Value::Object(out)
}

/// One attribute value in DynamoDB's typed JSON form (either SDK's type).
fn typed_json<A: Attribute>(v: &A) -> Value {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match v.view() {
        AttrRef::S(s) => json!({"S": s}),
        AttrRef::N(n) => json!({"N": n}),
        AttrRef::B(b) => json!({"B": b64(b)}),
        AttrRef::Bool(b) => json!({"BOOL": b}),
        AttrRef::Null => json!({"NULL": true}),
        AttrRef::M(m) => {
            json!({"M": m.iter().map(|(k, v)| (k.clone(), typed_json(v))).collect::<Map<_, _>>()})
        }
        AttrRef::L(l) => json!({"L": l.iter().map(typed_json).collect::<Vec<_>>()}),
        AttrRef::Ss(s) => json!({"SS": s}),
        AttrRef::Ns(n) => json!({"NS": n}),
        AttrRef::Bs(b) => {
            json!({"BS": b.iter().map(|x| b64(x.as_ref())).collect::<Vec<_>>()})
        }
        AttrRef::Unknown => json!({"UNKNOWN": null}),
    }
}

/// A dead letter's bytes: without its `record` (`record_truncated: true`) when the whole
/// would not fit in `max_bytes`.
fn fitted(value: &mut Value, max_bytes: usize) -> Vec<u8> {
    let bytes = serde_json::to_vec(value).expect("JSON serializes");
    if bytes.len() <= max_bytes {
        return bytes;
    }
    value["record"] = Value::Null;
    value["record_truncated"] = true.into();
    serde_json::to_vec(value).expect("JSON serializes")
}

/// An item as DynamoDB's typed JSON.
fn typed_item<A: Attribute>(item: &HashMap<String, A>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), typed_json(v)))
            .collect(),
    )
}

/// A dead letter for an item a snapshot read but cannot produce (unconvertible, or larger
/// than `max_bytes`): the error, the table, the snapshot segment, its key attributes, and the
/// item as DynamoDB JSON (left out, `record_truncated`, when it would not fit).
pub fn snapshot_dead_letter<A: Attribute>(
    item: &HashMap<String, A>,
    key_names: &[String],
    table: &str,
    origin: SnapshotOrigin,
    error: &str,
    max_bytes: usize,
) -> Record {
    let keys: HashMap<String, &A> = key_names
        .iter()
        .filter_map(|n| item.get(n).map(|v| (n.clone(), v)))
        .collect();
    let keys = Value::Object(
        keys.iter()
            .map(|(k, v)| (k.clone(), typed_json(*v)))
            .collect(),
    );
    let mut value = json!({
        "error": error,
        "table": table,
        "snapshot": origin,
        "keys": keys,
        "dead_lettered_at_ms": chrono::Utc::now().timestamp_millis(),
        "record": typed_item(item),
        "record_truncated": false,
    });
    let bytes = fitted(&mut value, max_bytes);
    let key = json!({"table": table, "keys": keys});
    Record {
        key: Some(serde_json::to_vec(&key).expect("JSON serializes")),
        value: Some(bytes),
        headers: BTreeMap::from([
            ("dynamodb.event_name".to_owned(), b"DEAD_LETTER".to_vec()),
            ("dynamodb.table".to_owned(), table.as_bytes().to_vec()),
        ]),
        timestamp: chrono::Utc::now(),
    }
}

fn headers(
    event_name: &str,
    source: &Source,
    sequence_number: Option<&str>,
) -> BTreeMap<String, Vec<u8>> {
    let mut h = BTreeMap::from([
        (
            "dynamodb.event_name".to_owned(),
            event_name.as_bytes().to_vec(),
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
    if let Some(seq) = sequence_number {
        h.insert(
            "dynamodb.sequence_number".to_owned(),
            seq.as_bytes().to_vec(),
        );
    }
    h
}

/// A dead letter for a poison record: the error, where it came from, and the raw record
/// (DynamoDB JSON). When the raw record would not fit in `max_bytes`, it is left out and
/// `record_truncated` says so; the item is still in the table under `keys`.
pub fn dead_letter(
    record: &StreamRecord,
    source: &Source,
    error: &str,
    max_bytes: usize,
) -> Record {
    let sequence_number = record.dynamodb().and_then(|d| d.sequence_number());
    let raw = raw_record_json(record);
    let keys = raw["dynamodb"]["Keys"].clone();
    let mut value = json!({
        "error": error,
        "table": source.table,
        "stream_arn": source.stream_arn,
        "shard_id": source.shard_id,
        "sequence_number": sequence_number,
        "event_id": record.event_id(),
        "keys": keys,
        "dead_lettered_at_ms": chrono::Utc::now().timestamp_millis(),
        "record": raw,
        "record_truncated": false,
    });
    let bytes = fitted(&mut value, max_bytes);
    let key = json!({"table": source.table, "shard_id": source.shard_id, "sequence_number": sequence_number});
    Record {
        key: Some(serde_json::to_vec(&key).expect("JSON serializes")),
        value: Some(bytes),
        headers: headers("DEAD_LETTER", source, sequence_number),
        timestamp: chrono::Utc::now(),
    }
}

/// The `DATA_LOSS` marker: records after `lost_after` (the last one read, `None` if none
/// was) and before `first_available` (the oldest the stream still held) were trimmed
/// before they could be read.
pub fn data_loss_marker(
    source: &Source,
    lost_after: Option<&str>,
    first_available: Option<&str>,
) -> Record {
    let value = json!({
        "event_name": "DATA_LOSS",
        "table": source.table,
        "stream_arn": source.stream_arn,
        "shard_id": source.shard_id,
        "lost_after_sequence_number": lost_after,
        "first_available_sequence_number": first_available,
        "detected_at_ms": chrono::Utc::now().timestamp_millis(),
    });
    let key = json!({"data_loss": {"shard_id": source.shard_id}});
    Record {
        key: Some(serde_json::to_vec(&key).expect("JSON serializes")),
        value: Some(serde_json::to_vec(&value).expect("JSON serializes")),
        headers: headers("DATA_LOSS", source, None),
        timestamp: chrono::Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, StreamRecord as Inner};

    fn source() -> Source {
        Source {
            table: "t".into(),
            stream_arn: "arn".into(),
            shard_id: "sh".into(),
        }
    }

    #[test]
    fn dead_letter_carries_the_raw_record_and_the_error() {
        let rec = StreamRecord::builder()
            .event_name(OperationType::Insert)
            .event_id("e1")
            .dynamodb(
                Inner::builder()
                    .keys("pk", AttributeValue::S("k".into()))
                    .new_image("n", AttributeValue::N("1,5".into()))
                    .sequence_number("9")
                    .build(),
            )
            .build();
        let r = dead_letter(&rec, &source(), "attribute n: not a number", 1_000_000);
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["error"], "attribute n: not a number");
        assert_eq!(v["sequence_number"], "9");
        assert_eq!(v["keys"], json!({"pk": {"S": "k"}}));
        assert_eq!(
            v["record"]["dynamodb"]["NewImage"],
            json!({"n": {"N": "1,5"}})
        );
        assert_eq!(v["record_truncated"], false);
        assert_eq!(r.headers["dynamodb.event_name"], b"DEAD_LETTER");

        let small = dead_letter(&rec, &source(), "too big", 100);
        let v: Value = serde_json::from_slice(small.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["record"], Value::Null);
        assert_eq!(v["record_truncated"], true);
        assert_eq!(v["keys"], json!({"pk": {"S": "k"}}));
    }

    #[test]
    fn marker_names_the_shard_and_range() {
        let r = data_loss_marker(&source(), Some("100"), Some("250"));
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["event_name"], "DATA_LOSS");
        assert_eq!(v["shard_id"], "sh");
        assert_eq!(v["lost_after_sequence_number"], "100");
        assert_eq!(v["first_available_sequence_number"], "250");
    }
}
