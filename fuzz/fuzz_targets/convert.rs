//! Fuzzes the record converter: arbitrary stream records (any event name, missing parts,
//! any attribute tree, any text in N) must convert or fail with an error, never panic, and
//! a converted event must be valid JSON with the record's keys.
#![no_main]

use std::collections::HashMap;

use arbitrary::{Result, Unstructured};
use aws_sdk_dynamodbstreams::types::{AttributeValue, Identity, OperationType, Record, StreamRecord};
use aws_smithy_types::{Blob, DateTime};
use dynamodb_cdc::convert::{convert, Source};
use dynamodb_cdc::dead_letter;
use libfuzzer_sys::fuzz_target;

fn number(u: &mut Unstructured) -> Result<String> {
    // Mostly number-like text, sometimes anything at all.
    if u.ratio(1, 4)? {
        return u.arbitrary();
    }
    let digits: Vec<u8> = (0..u.int_in_range(0..=45)?)
        .map(|_| u.int_in_range(b'0'..=b'9'))
        .collect::<Result<_>>()?;
    let mut s = String::new();
    if u.arbitrary()? {
        s.push('-');
    }
    s.push_str(std::str::from_utf8(&digits).unwrap());
    if u.arbitrary()? {
        s.push('.');
        s.push_str(&u.int_in_range(0u64..=999_999)?.to_string());
    }
    if u.arbitrary()? {
        s.push(if u.arbitrary()? { 'E' } else { 'e' });
        s.push_str(&u.int_in_range(-200i32..=200)?.to_string());
    }
    Ok(s)
}

fn attribute(u: &mut Unstructured, depth: u32) -> Result<AttributeValue> {
    let top = if depth > 4 { 7 } else { 9 };
    Ok(match u.int_in_range(0..=top)? {
        0 => AttributeValue::S(u.arbitrary()?),
        1 => AttributeValue::N(number(u)?),
        2 => AttributeValue::B(Blob::new(u.arbitrary::<Vec<u8>>()?)),
        3 => AttributeValue::Bool(u.arbitrary()?),
        4 => AttributeValue::Null(u.arbitrary()?),
        5 => AttributeValue::Ss(u.arbitrary()?),
        6 => AttributeValue::Ns((0..u.int_in_range(0..=3)?).map(|_| number(u)).collect::<Result<_>>()?),
        7 => AttributeValue::Bs(u.arbitrary::<Vec<Vec<u8>>>()?.into_iter().map(Blob::new).collect()),
        8 => AttributeValue::L((0..u.int_in_range(0..=4)?).map(|_| attribute(u, depth + 1)).collect::<Result<_>>()?),
        _ => AttributeValue::M(map(u, depth + 1)?),
    })
}

fn map(u: &mut Unstructured, depth: u32) -> Result<HashMap<String, AttributeValue>> {
    (0..u.int_in_range(0..=4)?)
        .map(|_| Ok((u.arbitrary::<String>()?, attribute(u, depth)?)))
        .collect()
}

fn record(u: &mut Unstructured) -> Result<Record> {
    let mut stream = StreamRecord::builder();
    if u.arbitrary()? {
        stream = stream.set_keys(Some(map(u, 0)?));
    }
    if u.arbitrary()? {
        stream = stream.set_new_image(Some(map(u, 0)?));
    }
    if u.arbitrary()? {
        stream = stream.set_old_image(Some(map(u, 0)?));
    }
    if u.arbitrary()? {
        stream = stream.sequence_number(u.arbitrary::<String>()?);
    }
    if u.arbitrary()? {
        stream = stream.approximate_creation_date_time(DateTime::from_secs(u.arbitrary()?));
    }
    let name = match u.int_in_range(0..=4)? {
        0 => None,
        1 => Some(OperationType::Insert),
        2 => Some(OperationType::Modify),
        3 => Some(OperationType::Remove),
        _ => Some(OperationType::from(u.arbitrary::<String>()?.as_str())),
    };
    let mut rec = Record::builder().set_event_name(name);
    if u.arbitrary()? {
        rec = rec.dynamodb(stream.build());
    }
    if u.arbitrary()? {
        rec = rec.user_identity(Identity::builder().r#type(u.arbitrary::<String>()?).build());
    }
    Ok(rec.build())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(rec) = record(&mut u) else { return };
    let source = Source {
        table: "t".into(),
        stream_arn: "arn".into(),
        shard_id: "s".into(),
    };
    // The dead-letter dump never fails.
    let raw = dead_letter::raw_record_json(&rec);
    serde_json::to_vec(&raw).unwrap();
    if let Ok(c) = convert(&rec, &source, true) {
        let value: serde_json::Value = serde_json::from_slice(c.records[0].value.as_ref().unwrap()).unwrap();
        let key: serde_json::Value = serde_json::from_slice(c.records[0].key.as_ref().unwrap()).unwrap();
        assert_eq!(value["keys"], key);
        assert!(!key.as_object().unwrap().is_empty());
    }
});
