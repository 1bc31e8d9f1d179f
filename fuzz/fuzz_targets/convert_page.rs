//! Fuzzes the GetRecords fast path: any response body must convert or be handed back
//! (`None`), never panic; a converted page's events and keys must be valid JSON, one event
//! (and at most one tombstone) per stream record, none larger than the limit; a body the
//! hand-written reader takes must be one serde_json reads the same.
#![no_main]

use dynamodb_cdc::convert::{convert_page, Source};
use dynamodb_cdc::kafka;
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE_BYTES: usize = 4096;

fuzz_target!(|body: &[u8]| {
    let source = Source {
        table: "orders".into(),
        stream_arn: "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1".into(),
        shard_id: "shardId-1".into(),
    };
    if let Err(difference) =
        dynamodb_cdc::convert::fast::check_readers_agree(body, &source, true, MAX_MESSAGE_BYTES)
    {
        panic!("the readers disagree: {difference}");
    }
    let Some(page) = convert_page(body, &source, true, MAX_MESSAGE_BYTES) else {
        return;
    };
    assert!(page.records.len() >= page.stream_records);
    assert!(page.records.len() <= 2 * page.stream_records);
    assert_eq!(page.first_sequence_number.is_some(), page.stream_records > 0);
    for r in &page.records {
        assert!(kafka::message_bytes(r) <= MAX_MESSAGE_BYTES);
        let key = r.key.as_deref().expect("every record has a key");
        serde_json::from_slice::<serde_json::Value>(key).expect("the key is JSON");
        if let Some(value) = r.value.as_deref() {
            serde_json::from_slice::<serde_json::Value>(value).expect("the event is JSON");
        }
    }
});
