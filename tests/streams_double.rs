//! Tests of the DynamoDB Streams test double itself, through the real SDK clients (the same
//! clients the daemon uses), with the SDK's retries off so every answer is seen as sent.
//!
//! `cargo test --release --test streams_double -- --ignored speed --nocapture` prints how
//! many generated records a second the double serves.

#[path = "common/streams_double.rs"]
mod streams_double;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_dynamodb::types::AttributeValue as Av;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::{
    AttributeValue, OperationType, ShardFilter, ShardFilterType, ShardIteratorType, StreamStatus,
};
use aws_sdk_dynamodbstreams::Client;
use serde_json::json;

use streams_double::{
    Fault, FaultKind, Generated, KeySchema, Options, RecordSpec, StreamsDouble, ViewType,
};

/// Runs a test body with a deadline.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

async fn sdk_config(double: &StreamsDouble, key_id: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(double.endpoint())
        .credentials_provider(Credentials::new(key_id, "secret", None, None, "test"))
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

async fn streams(double: &StreamsDouble) -> Client {
    Client::new(&sdk_config(double, "AKIDTEST").await)
}

async fn iterator(
    client: &Client,
    arn: &str,
    shard: &str,
    kind: ShardIteratorType,
    seq: Option<&str>,
) -> String {
    client
        .get_shard_iterator()
        .stream_arn(arn)
        .shard_id(shard)
        .shard_iterator_type(kind)
        .set_sequence_number(seq.map(str::to_owned))
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator
        .expect("an iterator")
}

fn seqs(out: &aws_sdk_dynamodbstreams::operation::get_records::GetRecordsOutput) -> Vec<String> {
    out.records()
        .iter()
        .map(|r| {
            r.dynamodb()
                .and_then(|d| d.sequence_number())
                .expect("sequence number")
                .to_owned()
        })
        .collect()
}

fn item(pk: &str, n: u32) -> serde_json::Value {
    json!({"pk": {"S": pk}, "n": {"N": n.to_string()}})
}

fn code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<String> {
    err.code().map(str::to_owned)
}

#[tokio::test]
async fn describe_stream_paginates_250_shards_over_3_pages() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("paged", KeySchema::hash("pk"), ViewType::NewImage);
        for _ in 1..250 {
            double.add_shard(&arn, None);
        }
        let client = streams(&double).await;
        let mut start: Option<String> = None;
        let mut pages = Vec::new();
        let mut ids = Vec::new();
        loop {
            let out = client
                .describe_stream()
                .stream_arn(&arn)
                .limit(100)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .unwrap();
            let desc = out.stream_description().unwrap();
            assert_eq!(desc.stream_status(), Some(&StreamStatus::Enabled));
            assert_eq!(desc.table_name(), Some("paged"));
            pages.push(desc.shards().len());
            ids.extend(
                desc.shards()
                    .iter()
                    .map(|s| s.shard_id().unwrap().to_owned()),
            );
            match desc.last_evaluated_shard_id() {
                Some(last) => {
                    assert_eq!(Some(last), ids.last().map(String::as_str));
                    start = Some(last.to_owned());
                }
                None => break,
            }
        }
        assert_eq!(pages, vec![100, 100, 50]);
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "unique and in order");

        // Default limit is 100; more than 100 is refused.
        let out = client
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .unwrap();
        assert_eq!(out.stream_description().unwrap().shards().len(), 100);
        let err = client
            .describe_stream()
            .stream_arn(&arn)
            .limit(101)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        let err = client
            .describe_stream()
            .stream_arn("arn:aws:dynamodb:us-east-1:123456789012:table/x/stream/nope")
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
    })
    .await
}

#[tokio::test]
async fn split_closes_the_parent_and_lists_children() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("split", KeySchema::hash("pk"), ViewType::NewImage);
        let parent = double.open_shards("split").remove(0);
        let last = double.put("split", item("a", 1)).unwrap();
        let children = double.split(&parent, 2);
        assert_eq!(children.len(), 2);
        let client = streams(&double).await;
        let out = client
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .unwrap();
        let shards = out.stream_description().unwrap().shards();
        assert_eq!(shards.len(), 3);
        let p = &shards[0];
        assert_eq!(p.shard_id(), Some(parent.as_str()));
        assert_eq!(p.parent_shard_id(), None);
        let ending = p.sequence_number_range().unwrap().ending_sequence_number();
        assert_eq!(ending, Some(last.as_str()));
        for c in &shards[1..] {
            assert_eq!(c.parent_shard_id(), Some(parent.as_str()));
            let range = c.sequence_number_range().unwrap();
            assert!(range.ending_sequence_number().is_none());
            let start: u128 = range.starting_sequence_number().unwrap().parse().unwrap();
            assert!(
                start > last.parse::<u128>().unwrap(),
                "child numbers follow the parent's"
            );
        }
        let out = client
            .describe_stream()
            .stream_arn(&arn)
            .shard_filter(
                ShardFilter::builder()
                    .r#type(ShardFilterType::ChildShards)
                    .shard_id(&parent)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let found: Vec<&str> = out
            .stream_description()
            .unwrap()
            .shards()
            .iter()
            .filter_map(|s| s.shard_id())
            .collect();
        assert_eq!(
            found,
            children.iter().map(String::as_str).collect::<Vec<_>>()
        );

        // A later write goes to a child, with a larger sequence number.
        let next = double.put("split", item("b", 1)).unwrap();
        assert!(next.parse::<u128>().unwrap() > last.parse::<u128>().unwrap());
        assert_eq!(next.len(), 21);
    })
    .await
}

#[tokio::test]
async fn iterator_types_and_writes() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("types", KeySchema::hash("pk"), ViewType::NewAndOldImages);
        let shard = double.open_shards("types").remove(0);
        let s1 = double.put("types", item("a", 1)).unwrap();
        let s2 = double.put("types", item("a", 2)).unwrap();
        let s3 = double
            .update(
                "types",
                json!({"pk": {"S": "a"}}),
                json!({"x": {"BOOL": true}}),
            )
            .unwrap();
        let s4 = double.delete("types", json!({"pk": {"S": "a"}})).unwrap();
        assert_eq!(double.delete("types", json!({"pk": {"S": "a"}})), None);
        let client = streams(&double).await;

        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert_eq!(
            seqs(&out),
            vec![s1.clone(), s2.clone(), s3.clone(), s4.clone()]
        );
        let r = out.records();
        let kinds: Vec<_> = r.iter().map(|r| r.event_name().unwrap().clone()).collect();
        use OperationType::*;
        assert_eq!(kinds, vec![Insert, Modify, Modify, Remove]);
        let d = r[1].dynamodb().unwrap();
        assert_eq!(d.keys().unwrap()["pk"], AttributeValue::S("a".into()));
        assert_eq!(d.new_image().unwrap()["n"], AttributeValue::N("2".into()));
        assert_eq!(d.old_image().unwrap()["n"], AttributeValue::N("1".into()));
        assert!(d.approximate_creation_date_time().is_some());
        assert!(r[0].dynamodb().unwrap().old_image().is_none());
        assert_eq!(
            r[2].dynamodb().unwrap().new_image().unwrap()["x"],
            AttributeValue::Bool(true)
        );
        assert!(r[3].dynamodb().unwrap().new_image().is_none());
        assert_eq!(r[3].aws_region(), Some("us-east-1"));
        assert_eq!(r[3].event_source(), Some("aws:dynamodb"));
        assert!(out.next_shard_iterator().is_some(), "open shard");

        let it = iterator(
            &client,
            &arn,
            &shard,
            ShardIteratorType::AtSequenceNumber,
            Some(&s2),
        )
        .await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), vec![s2.clone(), s3.clone(), s4.clone()]);

        let it = iterator(
            &client,
            &arn,
            &shard,
            ShardIteratorType::AfterSequenceNumber,
            Some(&s2),
        )
        .await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), vec![s3.clone(), s4.clone()]);

        let it = iterator(&client, &arn, &shard, ShardIteratorType::Latest, None).await;
        let out = client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
        assert!(out.records().is_empty());
        let s5 = double.push_record(
            &shard,
            RecordSpec::ttl_remove(json!({"pk": {"S": "z"}}), item("z", 9)),
        );
        let out = client
            .get_records()
            .shard_iterator(out.next_shard_iterator().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), vec![s5.clone()]);
        let who = out.records()[0].user_identity().unwrap();
        assert_eq!(who.principal_id(), Some("dynamodb.amazonaws.com"));
        assert_eq!(who.r#type(), Some("Service"));

        // AT/AFTER a number beyond the shard, an unknown shard, a missing number.
        let beyond = (s5.parse::<u128>().unwrap() + 10).to_string();
        let err = client
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&shard)
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(beyond)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        let err = client
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id("shardId-nope")
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
        let err = client
            .get_records()
            .shard_iterator("garbage")
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));

        let listed = client
            .list_streams()
            .table_name("types")
            .send()
            .await
            .unwrap();
        assert_eq!(listed.streams().len(), 1);
        assert_eq!(listed.streams()[0].stream_arn(), Some(arn.as_str()));
    })
    .await
}

#[tokio::test]
async fn get_records_limit_and_the_end_of_a_closed_shard() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table(
            "ends",
            KeySchema::hash_range("pk", "sk"),
            ViewType::KeysOnly,
        );
        let shard = double.open_shards("ends").remove(0);
        for i in 0..25 {
            double.put(
                "ends",
                json!({"pk": {"S": "p"}, "sk": {"S": format!("{i:03}")}}),
            );
        }
        let end = double.close_shard(&shard);
        assert!(!double.all_shards_drained());
        let client = streams(&double).await;
        let mut it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        let mut pages = Vec::new();
        let mut last = None;
        loop {
            let out = client
                .get_records()
                .shard_iterator(&it)
                .limit(10)
                .send()
                .await
                .unwrap();
            pages.push(out.records().len());
            let r = out.records().last().map(|r| r.dynamodb().unwrap());
            if let Some(d) = r {
                assert!(
                    d.new_image().is_none() && d.old_image().is_none(),
                    "KEYS_ONLY"
                );
                assert_eq!(d.keys().unwrap().len(), 2);
            }
            last = seqs(&out).last().cloned().or(last);
            match out.next_shard_iterator() {
                Some(next) => it = next.to_owned(),
                None => break,
            }
        }
        assert_eq!(pages, vec![10, 10, 5]);
        assert_eq!(last, Some(end));
        assert!(double.all_shards_drained());
        let calls = double.calls_to("GetRecords");
        assert_eq!(calls.iter().filter(|c| c.shard_end).count(), 1);
        assert_eq!(calls.iter().map(|c| c.records).sum::<usize>(), 25);
        assert_eq!(double.records_served(), 25);

        let err = client
            .get_records()
            .shard_iterator(&it)
            .limit(1001)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        // An empty closed shard ends at once.
        let empty = double.add_shard(&arn, Some(&shard));
        double.close_shard(&empty);
        let it = iterator(&client, &arn, &empty, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert!(out.records().is_empty() && out.next_shard_iterator().is_none());
        // LATEST on a closed shard: nothing, and the end.
        let it = iterator(&client, &arn, &shard, ShardIteratorType::Latest, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert!(out.records().is_empty() && out.next_shard_iterator().is_none());
    })
    .await
}

#[tokio::test]
async fn trimming_and_expiry() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("trim", KeySchema::hash("pk"), ViewType::NewImage);
        let shard = double.open_shards("trim").remove(0);
        let s: Vec<String> = (0..4)
            .map(|i| double.put("trim", item(&format!("k{i}"), i)).unwrap())
            .collect();
        let client = streams(&double).await;
        let old_it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        double.trim(&shard, &s[1]);
        let err = client
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&shard)
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(&s[0])
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("TrimmedDataAccessException"));
        // AFTER the last trimmed record loses nothing: allowed.
        let it = iterator(
            &client,
            &arn,
            &shard,
            ShardIteratorType::AfterSequenceNumber,
            Some(&s[1]),
        )
        .await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), s[2..].to_vec());
        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), s[2..].to_vec());
        let err = client
            .get_records()
            .shard_iterator(&old_it)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("TrimmedDataAccessException"));

        // Expiry: every iterator issued so far, or one shard's, or by age.
        double.expire_iterators();
        let err = client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ExpiredIteratorException"));
        let fresh = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        client
            .get_records()
            .shard_iterator(&fresh)
            .send()
            .await
            .unwrap();
        double.expire_shard_iterators(&shard);
        let err = client
            .get_records()
            .shard_iterator(&fresh)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ExpiredIteratorException"));
        double.set_iterator_ttl(Some(Duration::from_millis(50)));
        let fresh = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        // Ages the iterator past its 50 ms TTL: the subject, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let err = client
            .get_records()
            .shard_iterator(&fresh)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ExpiredIteratorException"));
        double.set_iterator_ttl(None);

        // A shard trimmed entirely leaves the listing; its child keeps ParentShardId.
        let child = double.split(&shard, 1).remove(0);
        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        double.trim_shard_entirely(&shard);
        let out = client
            .describe_stream()
            .stream_arn(&arn)
            .send()
            .await
            .unwrap();
        let shards = out.stream_description().unwrap().shards();
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].shard_id(), Some(child.as_str()));
        assert_eq!(shards[0].parent_shard_id(), Some(shard.as_str()));
        let err = client
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&shard)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
        let err = client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("TrimmedDataAccessException"));
        // Pagination still works from the vanished id.
        let out = client
            .describe_stream()
            .stream_arn(&arn)
            .exclusive_start_shard_id(&shard)
            .send()
            .await
            .unwrap();
        assert_eq!(out.stream_description().unwrap().shards().len(), 1);
    })
    .await
}

#[tokio::test]
async fn each_fault_kind_reaches_the_sdk() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("faults", KeySchema::hash("pk"), ViewType::NewImage);
        let shard = double.open_shards("faults").remove(0);
        double.put("faults", item("a", 1));
        let client = streams(&double).await;
        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;

        let error_kinds = [
            (FaultKind::Throttle, "LimitExceededException"),
            (FaultKind::Http500, "InternalServerError"),
            (FaultKind::Unavailable, "ServiceUnavailable"),
            (FaultKind::Expired, "ExpiredIteratorException"),
            (FaultKind::Trimmed, "TrimmedDataAccessException"),
            (FaultKind::NotFound, "ResourceNotFoundException"),
            (
                FaultKind::Error {
                    status: 400,
                    code: "AccessDeniedException".into(),
                    message: "no".into(),
                },
                "AccessDeniedException",
            ),
        ];
        for (kind, expected) in error_kinds {
            double.fault(Fault::new(kind.clone()).op("GetRecords").times(1));
            let err = client
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .unwrap_err();
            assert_eq!(code(&err).as_deref(), Some(expected), "{kind:?}: {err:?}");
            // Spent: the next call succeeds.
            client
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .unwrap();
        }
        let statuses: Vec<u16> = double
            .calls_to("GetRecords")
            .iter()
            .filter(|c| c.fault.is_some())
            .map(|c| c.status)
            .collect();
        assert_eq!(statuses, vec![400, 500, 503, 400, 400, 400, 400]);

        // A malformed 200 is an unhandled service error without a code; a truncated body a
        // response error; a dropped connection a dispatch failure.
        for kind in [
            FaultKind::Malformed("{not json".into()),
            FaultKind::Truncated,
            FaultKind::Drop,
        ] {
            double.fault(Fault::new(kind.clone()).op("GetRecords").times(1));
            let err = client
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .unwrap_err();
            let ok = match &kind {
                FaultKind::Malformed(_) => matches!(err, SdkError::ServiceError(_)),
                FaultKind::Truncated => matches!(err, SdkError::ResponseError(_)),
                _ => matches!(err, SdkError::DispatchFailure(_)),
            };
            assert!(ok, "{kind:?}: {err:?}");
            assert_eq!(err.code(), None);
        }
        assert_eq!(
            double.records_served(),
            7,
            "the truncated answer is not counted"
        );

        // Faults scoped to a shard, a table operation, DescribeTable throttling.
        let other = double.add_shard(&arn, None);
        double.fault(Fault::new(FaultKind::NotFound).shard(&other));
        client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
        let err = client
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(&other)
            .shard_iterator_type(ShardIteratorType::Latest)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
        double.clear_faults();
        let ddb = aws_sdk_dynamodb::Client::new(&sdk_config(&double, "AKIDTEST").await);
        let id = double.fault(Fault::new(FaultKind::Throttle).op("DescribeTable"));
        let err = ddb
            .describe_table()
            .table_name("faults")
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("ThrottlingException"));
        double.clear_fault(id);
        ddb.describe_table()
            .table_name("faults")
            .send()
            .await
            .unwrap();

        // Probability and time windows.
        double.fault(
            Fault::new(FaultKind::Throttle)
                .op("GetRecords")
                .probability(0.5),
        );
        let mut failed = 0;
        for _ in 0..200 {
            failed += client
                .get_records()
                .shard_iterator(&it)
                .send()
                .await
                .is_err() as u32;
        }
        assert!((50..150).contains(&failed), "{failed} of 200");
        double.clear_faults();
        double.fault(
            Fault::new(FaultKind::Http500)
                .op("GetRecords")
                .window(Duration::from_millis(400), Duration::from_millis(800)),
        );
        client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
        // Into the fault's window (400 ms to 1.2 s from now), then past it: the window's
        // timing is the subject.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .is_err());
        tokio::time::sleep(Duration::from_millis(700)).await;
        client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn calls_and_concurrency_are_recorded() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("calls", KeySchema::hash("pk"), ViewType::NewImage);
        let shard = double.open_shards("calls").remove(0);
        let s1 = double.put("calls", item("a", 1)).unwrap();
        let client = streams(&double).await;
        let it = iterator(
            &client,
            &arn,
            &shard,
            ShardIteratorType::AfterSequenceNumber,
            Some(&s1),
        )
        .await;
        assert_eq!(double.max_concurrent_per_shard(), 1);

        double.fault(
            Fault::new(FaultKind::Slow(Duration::from_millis(300)))
                .op("GetRecords")
                .times(2),
        );
        let started = Instant::now();
        let (a, b) = tokio::join!(
            client.get_records().shard_iterator(&it).send(),
            client.get_records().shard_iterator(&it).send()
        );
        a.unwrap();
        b.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(double.max_concurrent_per_shard(), 2);

        let calls = double.calls();
        let gsi = calls.iter().find(|c| c.op == "GetShardIterator").unwrap();
        assert_eq!(gsi.shard_id.as_deref(), Some(shard.as_str()));
        assert_eq!(gsi.stream_arn.as_deref(), Some(arn.as_str()));
        assert_eq!(gsi.iterator_type.as_deref(), Some("AFTER_SEQUENCE_NUMBER"));
        assert_eq!(gsi.sequence_number.as_deref(), Some(s1.as_str()));
        assert_eq!(gsi.access_key_id.as_deref(), Some("AKIDTEST"));
        assert_eq!(gsi.status, 200);
        let reads: Vec<_> = calls.iter().filter(|c| c.op == "GetRecords").collect();
        assert_eq!(reads.len(), 2);
        assert!(reads.iter().all(|c| c.fault.as_deref() == Some("Slow")));
        assert!(reads.iter().any(|c| c.concurrent_on_shard == 2));
        assert!(reads
            .iter()
            .all(|c| c.elapsed >= Duration::from_millis(300)));
        let after: u128 = s1.parse().unwrap();
        assert_eq!(reads[0].position, Some((after + 1).to_string()));
        assert_eq!(reads[0].limit, None);
        double.clear_calls();
        assert!(double.calls().is_empty());
    })
    .await
}

#[tokio::test]
async fn describe_table_through_the_dynamodb_sdk() {
    within(async {
        let double = StreamsDouble::start().await;
        let first = double.add_table(
            "orders",
            KeySchema::hash_range("pk", "sk"),
            ViewType::NewAndOldImages,
        );
        let ddb = aws_sdk_dynamodb::Client::new(&sdk_config(&double, "AKIDTEST").await);
        let out = ddb
            .describe_table()
            .table_name("orders")
            .send()
            .await
            .unwrap();
        let t = out.table().unwrap();
        assert_eq!(t.table_name(), Some("orders"));
        assert_eq!(t.latest_stream_arn(), Some(first.as_str()));
        assert!(t.latest_stream_label().is_some());
        let spec = t.stream_specification().unwrap();
        assert!(spec.stream_enabled());
        assert_eq!(
            spec.stream_view_type().unwrap().as_str(),
            "NEW_AND_OLD_IMAGES"
        );
        assert_eq!(t.key_schema().len(), 2);

        // A new stream: LatestStreamArn changes, the old stream is DISABLED and closed.
        let old_shard = double.open_shards("orders").remove(0);
        let second = double.enable_new_stream("orders");
        assert_ne!(first, second);
        let out = ddb
            .describe_table()
            .table_name("orders")
            .send()
            .await
            .unwrap();
        assert_eq!(
            out.table().unwrap().latest_stream_arn(),
            Some(second.as_str())
        );
        let client = streams(&double).await;
        let old = client
            .describe_stream()
            .stream_arn(&first)
            .send()
            .await
            .unwrap();
        let old = old.stream_description().unwrap();
        assert_eq!(old.stream_status(), Some(&StreamStatus::Disabled));
        assert_eq!(old.shards()[0].shard_id(), Some(old_shard.as_str()));
        assert!(old.shards()[0]
            .sequence_number_range()
            .unwrap()
            .ending_sequence_number()
            .is_some());
        let listed = client
            .list_streams()
            .table_name("orders")
            .send()
            .await
            .unwrap();
        assert_eq!(listed.streams().len(), 2);

        double.disable_stream("orders");
        let out = ddb
            .describe_table()
            .table_name("orders")
            .send()
            .await
            .unwrap();
        assert!(out.table().unwrap().stream_specification().is_none());
        assert_eq!(
            out.table().unwrap().latest_stream_arn(),
            Some(second.as_str())
        );
        assert_eq!(
            double.put("orders", json!({"pk": {"S": "a"}, "sk": {"S": "b"}})),
            None,
            "no record while the stream is off"
        );

        double.delete_table("orders");
        let err = ddb
            .describe_table()
            .table_name("orders")
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("ResourceNotFoundException"));
        // The stream stays readable.
        client
            .describe_stream()
            .stream_arn(&second)
            .send()
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn sts_assume_role_through_the_sts_sdk() {
    within(async {
        let double = StreamsDouble::start().await;
        let sts = aws_sdk_sts::Client::new(&sdk_config(&double, "AKIDBASE").await);
        let assume = |external: Option<&str>, duration: i32| {
            sts.assume_role()
                .role_arn("arn:aws:iam::123456789012:role/cdc")
                .role_session_name("cdc-test")
                .set_external_id(external.map(str::to_owned))
                .duration_seconds(duration)
                .send()
        };
        let out = assume(Some("ext-1"), 900).await.unwrap();
        let creds = out.credentials().unwrap();
        assert!(creds.access_key_id().starts_with("ASIA"));
        assert!(!creds.secret_access_key().is_empty() && !creds.session_token().is_empty());
        let left = creds.expiration().secs() - chrono::Utc::now().timestamp();
        assert!((895..=901).contains(&left), "{left}");
        let user = out.assumed_role_user().unwrap();
        assert_eq!(
            user.arn(),
            "arn:aws:sts::123456789012:assumed-role/cdc/cdc-test"
        );

        double.set_sts_session_lifetime(Some(Duration::from_secs(20)));
        let out = assume(None, 3600).await.unwrap();
        let left = out.credentials().unwrap().expiration().secs() - chrono::Utc::now().timestamp();
        assert!((18..=21).contains(&left), "{left}");

        let calls = double.assume_role_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].external_id.as_deref(), Some("ext-1"));
        assert_eq!(calls[0].duration_seconds, Some(900));
        assert_eq!(calls[0].role_session_name, "cdc-test");
        assert_eq!(calls[0].signed_with.as_deref(), Some("AKIDBASE"));
        assert_eq!(calls[1].external_id, None);
        assert_eq!(calls[1].status, 200);

        // Outages: 503 for a window, a dropped connection, a refusal.
        double.fault(
            Fault::new(FaultKind::Unavailable)
                .op("AssumeRole")
                .for_duration(Duration::from_millis(800)),
        );
        let err = assume(None, 900).await.unwrap_err();
        assert_eq!(err.code(), Some("ServiceUnavailable"));
        // Past the 800 ms outage: its length is the subject.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assume(None, 900).await.unwrap();
        double.fault(Fault::new(FaultKind::Drop).op("AssumeRole").times(1));
        let err = assume(None, 900).await.unwrap_err();
        assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
        double.fault(
            Fault::new(FaultKind::Error {
                status: 403,
                code: "AccessDenied".into(),
                message: "not trusted".into(),
            })
            .op("AssumeRole")
            .times(1),
        );
        let err = assume(None, 900).await.unwrap_err();
        assert_eq!(err.code(), Some("AccessDenied"));
        assert_eq!(err.message(), Some("not trusted"));
        let err = assume(None, 60).await.unwrap_err();
        assert_eq!(err.code(), Some("ValidationError"));
        let statuses: Vec<u16> = double
            .assume_role_calls()
            .iter()
            .map(|c| c.status)
            .collect();
        assert_eq!(statuses, vec![200, 200, 503, 200, 0, 403, 400]);

        // A session that expired is refused by the other APIs.
        double.set_sts_session_lifetime(Some(Duration::from_secs(1)));
        let c = assume(None, 900)
            .await
            .unwrap()
            .credentials()
            .unwrap()
            .clone();
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(double.endpoint())
            .credentials_provider(Credentials::new(
                c.access_key_id(),
                c.secret_access_key(),
                Some(c.session_token().to_owned()),
                None,
                "test",
            ))
            .retry_config(RetryConfig::disabled())
            .load()
            .await;
        let client = Client::new(&conf);
        client.list_streams().send().await.unwrap();
        // Ages the session past its 1 s life: the subject.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let err = client.list_streams().send().await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ExpiredTokenException"));
    })
    .await
}

#[tokio::test]
async fn generated_tables_parse_and_drain() {
    within(async {
        let double = StreamsDouble::start().await;
        let spec = Generated {
            shards: 2,
            records_per_shard: 2500,
            item_bytes: 300,
            keys: 1000,
            close: true,
            view_type: ViewType::NewAndOldImages,
        };
        let arn = double.add_generated_table("gen", spec);
        let client = streams(&double).await;
        let shards = double.shards(&arn);
        assert_eq!(shards.len(), 2);
        let mut total = 0;
        let mut keys = std::collections::HashSet::new();
        for shard in &shards {
            assert!(shard.closed);
            let mut it = iterator(
                &client,
                &arn,
                &shard.shard_id,
                ShardIteratorType::TrimHorizon,
                None,
            )
            .await;
            let mut previous: u128 = 0;
            loop {
                let out = client
                    .get_records()
                    .shard_iterator(&it)
                    .send()
                    .await
                    .unwrap();
                for r in out.records() {
                    let d = r.dynamodb().unwrap();
                    let seq: u128 = d.sequence_number().unwrap().parse().unwrap();
                    assert!(seq > previous);
                    previous = seq;
                    let AttributeValue::S(k) = &d.keys().unwrap()["pk"] else {
                        panic!("S key")
                    };
                    keys.insert(k.clone());
                    let new = d.new_image().unwrap();
                    let AttributeValue::S(pad) = &new["pad"] else {
                        panic!("pad")
                    };
                    assert_eq!(pad.len(), 250);
                    match r.event_name().unwrap() {
                        OperationType::Insert => assert!(d.old_image().is_none()),
                        _ => assert!(d.old_image().is_some()),
                    }
                }
                total += out.records().len();
                match out.next_shard_iterator() {
                    Some(next) => it = next.to_owned(),
                    None => break,
                }
            }
            assert_eq!(
                previous.to_string(),
                shard.ending_sequence_number.clone().unwrap()
            );
        }
        assert_eq!(total, 5000);
        assert_eq!(keys.len(), 1000);
        assert_eq!(double.records_served(), 5000);
        assert!(double.all_shards_drained() && double.table_drained("gen"));
        assert!(
            double
                .wait_until(Duration::from_secs(1), |d| d.records_served() == 5000)
                .await
        );
        // AFTER a generated record's number resumes right after it.
        let shard = &shards[1].shard_id;
        let it = iterator(&client, &arn, shard, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .limit(3)
            .send()
            .await
            .unwrap();
        let s = seqs(&out);
        let it = iterator(
            &client,
            &arn,
            shard,
            ShardIteratorType::AfterSequenceNumber,
            Some(&s[0]),
        )
        .await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .limit(2)
            .send()
            .await
            .unwrap();
        assert_eq!(seqs(&out), s[1..].to_vec());
    })
    .await
}

// ---- DynamoDB Scan, items, DescribeTable billing, the clock ---------------------------

async fn dynamodb(double: &StreamsDouble) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(double, "AKIDTEST").await)
}

type Item = HashMap<String, Av>;

/// Scans the table (or one segment of `(segment, total)`) to its end; returns its pages.
async fn scan_pages(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    segment: Option<(i32, i32)>,
    limit: Option<i32>,
) -> Vec<Vec<Item>> {
    let mut pages = Vec::new();
    let mut start: Option<Item> = None;
    loop {
        let out = client
            .scan()
            .table_name(table)
            .set_segment(segment.map(|s| s.0))
            .set_total_segments(segment.map(|s| s.1))
            .set_limit(limit)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .expect("Scan");
        assert_eq!(out.count() as usize, out.items().len());
        assert_eq!(out.scanned_count(), out.count());
        pages.push(out.items().to_vec());
        match out.last_evaluated_key() {
            Some(key) => start = Some(key.clone()),
            None => return pages,
        }
    }
}

fn pk(item: &Item) -> String {
    match &item["pk"] {
        Av::S(s) => s.clone(),
        other => panic!("pk {other:?}"),
    }
}

fn plain_item(i: usize) -> serde_json::Value {
    json!({"pk": {"S": format!("plain-{i:04}")}, "n": {"N": i.to_string()}})
}

#[tokio::test]
async fn parallel_scan_returns_every_item_exactly_once() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("par", KeySchema::hash("pk"), ViewType::NewAndOldImages);
        double.insert_items("par", (0..300).map(plain_item).collect());
        double.add_generated_items("par", 2000, 200);
        assert_eq!(double.items("par").len(), 2300);
        assert_eq!(double.shards(&arn)[0].records, 0, "no stream records");
        let client = dynamodb(&double).await;

        let mut tasks = tokio::task::JoinSet::new();
        for segment in 0..4 {
            let client = client.clone();
            tasks.spawn(async move {
                let pages = scan_pages(&client, "par", Some((segment, 4)), Some(100)).await;
                (segment, pages)
            });
        }
        let mut seen = HashMap::new();
        let mut all = HashMap::new();
        while let Some(done) = tasks.join_next().await {
            let (segment, pages) = done.unwrap();
            let items: Vec<&Item> = pages.iter().flatten().collect();
            // Hash ranges of 2300 items: each segment about a quarter.
            assert!(
                (400..750).contains(&items.len()),
                "{segment}: {}",
                items.len()
            );
            assert!(pages[..pages.len() - 1].iter().all(|p| p.len() == 100));
            for item in items {
                let keys = json!({"pk": {"S": pk(item)}});
                assert_eq!(double.scan_segment("par", &keys, 4), segment as u32);
                assert_eq!(seen.insert(pk(item), segment), None, "{} twice", pk(item));
                all.insert(pk(item), item.clone());
            }
        }
        assert_eq!(seen.len(), 2300);
        assert!(seen.contains_key("item-000001") && seen.contains_key("item-002000"));
        assert!(seen.contains_key("plain-0000") && seen.contains_key("plain-0299"));
        assert_eq!(double.items_served(), 2300);

        // A generated item as the SDK sees it.
        let g = &all["item-000042"];
        assert_eq!(g.len(), 3);
        assert_eq!(g["n"], Av::N("42".into()));
        assert!(matches!(&g["pad"], Av::S(p) if (150..200).contains(&p.len())));

        let calls = double.calls_to("Scan");
        assert!(calls.iter().all(|c| c.total_segments == Some(4)
            && c.table.as_deref() == Some("par")
            && c.limit == Some(100)
            && c.status == 200));
        for segment in 0..4 {
            let mine: Vec<_> = calls
                .iter()
                .filter(|c| c.segment == Some(segment))
                .collect();
            assert!(mine.len() >= 5);
            // The first page of a segment starts it; every later one continues after the
            // key the previous one answered.
            assert!(mine[0].exclusive_start_key.is_none());
            for pair in mine.windows(2) {
                assert_eq!(pair[1].exclusive_start_key, pair[0].last_evaluated_key);
                assert!(pair[1].exclusive_start_key.is_some());
            }
            assert!(mine.last().unwrap().last_evaluated_key.is_none());
        }
        assert_eq!(calls.iter().map(|c| c.items).sum::<usize>(), 2300);
        assert!(calls.iter().all(|c| c.consistent_read.is_none()));
    })
    .await
}

#[tokio::test]
async fn scan_pages_by_limit_exclusive_start_key_and_one_megabyte() {
    within(async {
        let double = StreamsDouble::start().await;
        double.add_table("pages", KeySchema::hash("pk"), ViewType::NewImage);
        double.insert_items("pages", (0..25).map(plain_item).collect());
        let client = dynamodb(&double).await;

        let pages = scan_pages(&client, "pages", None, Some(10)).await;
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let order: Vec<String> = pages.iter().flatten().map(pk).collect();
        let mut unique = order.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 25);
        // Stable: the same order again, and the same as the whole table in one page.
        let again: Vec<String> = scan_pages(&client, "pages", None, None).await[0]
            .iter()
            .map(pk)
            .collect();
        assert_eq!(again, order);
        let expected: Vec<String> = double
            .items("pages")
            .iter()
            .map(|i| i["pk"]["S"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(expected, order, "items() in scan order");

        // LastEvaluatedKey is the page's last key; a page that ends the table has none.
        let out = client
            .scan()
            .table_name("pages")
            .limit(10)
            .send()
            .await
            .unwrap();
        let last = out.last_evaluated_key().unwrap().clone();
        assert_eq!(last.len(), 1);
        assert_eq!(pk(&last), order[9]);
        let out = client
            .scan()
            .table_name("pages")
            .limit(15)
            .set_exclusive_start_key(Some(last.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(out.count(), 15);
        assert!(out.last_evaluated_key().is_none());
        // Continuing after a key that was deleted meanwhile.
        double.delete("pages", json!({"pk": {"S": order[9]}}));
        let out = client
            .scan()
            .table_name("pages")
            .limit(1)
            .set_exclusive_start_key(Some(last))
            .send()
            .await
            .unwrap();
        assert_eq!(pk(&out.items()[0]), order[10]);
        // Limit above 1000 acts as 1000.
        double.add_generated_items("pages", 1500, 100);
        let out = client
            .scan()
            .table_name("pages")
            .limit(5000)
            .send()
            .await
            .unwrap();
        assert_eq!(out.count(), 1000);

        // 1 MiB of item data at most: 4000-byte items (3998 or 3999 with their number), 262
        // to a page.
        double.add_table("big", KeySchema::hash("pk"), ViewType::NewImage);
        double.add_generated_items("big", 600, 4000);
        let pages = scan_pages(&client, "big", None, None).await;
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![262, 262, 76]
        );

        // Validation, unknown tables.
        for (segment, total) in [
            (Some(0), None),
            (None, Some(4)),
            (Some(4), Some(4)),
            (Some(0), Some(0)),
            (Some(-1), Some(4)),
            (Some(0), Some(1_000_001)),
        ] {
            let err = client
                .scan()
                .table_name("pages")
                .set_segment(segment)
                .set_total_segments(total)
                .send()
                .await
                .unwrap_err();
            assert_eq!(
                code(&err).as_deref(),
                Some("ValidationException"),
                "{segment:?}/{total:?}"
            );
        }
        client
            .scan()
            .table_name("pages")
            .segment(999)
            .total_segments(1000)
            .send()
            .await
            .unwrap();
        // An ExclusiveStartKey of another segment, or not of the schema.
        let key = json!({"pk": {"S": "plain-0001"}});
        let segment = double.scan_segment("pages", &key, 2) as i32;
        let err = client
            .scan()
            .table_name("pages")
            .segment(1 - segment)
            .total_segments(2)
            .exclusive_start_key("pk", Av::S("plain-0001".into()))
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        let err = client
            .scan()
            .table_name("pages")
            .exclusive_start_key("other", Av::S("x".into()))
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        let err = client
            .scan()
            .table_name("pages")
            .limit(0)
            .send()
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ValidationException"));
        let err = client.scan().table_name("nope").send().await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
        assert!(err.into_service_error().is_resource_not_found_exception());
        double.delete_table("big");
        let err = client.scan().table_name("big").send().await.unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("ResourceNotFoundException"));
    })
    .await
}

#[tokio::test]
async fn scan_round_trips_every_attribute_type() {
    within(async {
        let double = StreamsDouble::start().await;
        double.add_table(
            "types",
            KeySchema::hash_range("pk", "sk"),
            ViewType::NewImage,
        );
        let stored = json!({
            "pk": {"S": "ünïcode ✓"},
            "sk": {"S": "0"},
            "s": {"S": ""},
            "n": {"N": "123.4500"},
            "neg": {"N": "-0.000000000000000000000000000000000001"},
            "big": {"N": "99999999999999999999999999999999999999"},
            "exp": {"N": "1E+5"},
            "b": {"B": "AAEC/w=="},
            "t": {"BOOL": true},
            "f": {"BOOL": false},
            "null": {"NULL": true},
            "m": {"M": {"inner": {"L": [{"N": "1"}, {"S": "two"}, {"M": {}}]}, "e": {"L": []}}},
            "l": {"L": [{"NULL": true}, {"BOOL": false}, {"B": "aGk="}, {"SS": ["x"]}]},
            "ss": {"SS": ["b", "a", "c"]},
            "ns": {"NS": ["1", "0.10", "-3e2"]},
            "bs": {"BS": ["AA==", "AQI="]},
        });
        double.insert_items("types", vec![stored.clone()]);
        let client = dynamodb(&double).await;
        let out = client.scan().table_name("types").send().await.unwrap();
        let got = &out.items()[0];
        let s = |v: &str| Av::S(v.into());
        let n = |v: &str| Av::N(v.into());
        let b = |v: &[u8]| Av::B(aws_sdk_dynamodb::primitives::Blob::new(v));
        let expected: Item = [
            ("pk", s("ünïcode ✓")),
            ("sk", s("0")),
            ("s", s("")),
            ("n", n("123.4500")),
            ("neg", n("-0.000000000000000000000000000000000001")),
            ("big", n("99999999999999999999999999999999999999")),
            ("exp", n("1E+5")),
            ("b", b(&[0, 1, 2, 255])),
            ("t", Av::Bool(true)),
            ("f", Av::Bool(false)),
            ("null", Av::Null(true)),
            (
                "m",
                Av::M(HashMap::from([
                    (
                        "inner".to_owned(),
                        Av::L(vec![n("1"), s("two"), Av::M(HashMap::new())]),
                    ),
                    ("e".to_owned(), Av::L(vec![])),
                ])),
            ),
            (
                "l",
                Av::L(vec![
                    Av::Null(true),
                    Av::Bool(false),
                    b(b"hi"),
                    Av::Ss(vec!["x".into()]),
                ]),
            ),
            ("ss", Av::Ss(vec!["b".into(), "a".into(), "c".into()])),
            ("ns", Av::Ns(vec!["1".into(), "0.10".into(), "-3e2".into()])),
            (
                "bs",
                Av::Bs(vec![
                    aws_sdk_dynamodb::primitives::Blob::new(vec![0]),
                    aws_sdk_dynamodb::primitives::Blob::new(vec![1, 2]),
                ]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(got, &expected);
        assert_eq!(double.items("types"), vec![stored.clone()]);

        // The raw body carries the attribute values exactly as stored.
        let body = raw_json_post(
            &double.endpoint(),
            "DynamoDB_20120810.Scan",
            json!({"TableName": "types"}),
        )
        .await;
        assert_eq!(body["Items"][0], stored);
        assert_eq!(body["Count"], json!(1));
        assert!(body.get("LastEvaluatedKey").is_none());
        assert!(body.get("ConsumedCapacity").is_none());

        // Sizes by DynamoDB's rules: "pk" 2 + "abc" 3, "n" 1 + 12345 (3 + 1).
        double.add_table("sized", KeySchema::hash("pk"), ViewType::NewImage);
        double.insert_items(
            "sized",
            vec![json!({"pk": {"S": "abc"}, "n": {"N": "12345"}})],
        );
        let out = client
            .describe_table()
            .table_name("sized")
            .send()
            .await
            .unwrap();
        assert_eq!(out.table().unwrap().table_size_bytes(), Some(10));
    })
    .await
}

#[tokio::test]
async fn scan_consumed_capacity_by_size_and_scripted() {
    within(async {
        let double = StreamsDouble::start().await;
        double.add_table("cap", KeySchema::hash("pk"), ViewType::NewImage);
        // Each item exactly 1024 bytes: "pk" 2 + "k000" 4, "d" 1 + 1017.
        let d = "x".repeat(1017);
        double.insert_items(
            "cap",
            (0..10)
                .map(|i| json!({"pk": {"S": format!("k{i:03}")}, "d": {"S": d}}))
                .collect(),
        );
        let client = dynamodb(&double).await;
        use aws_sdk_dynamodb::types::ReturnConsumedCapacity as Rcc;
        let units = |out: &aws_sdk_dynamodb::operation::scan::ScanOutput| {
            out.consumed_capacity().and_then(|c| c.capacity_units())
        };
        // 10 KiB: 3 units of 4 KiB, half eventually consistent.
        let out = client
            .scan()
            .table_name("cap")
            .return_consumed_capacity(Rcc::Total)
            .send()
            .await
            .unwrap();
        assert_eq!(out.count(), 10);
        assert_eq!(units(&out), Some(1.5));
        assert_eq!(out.consumed_capacity().unwrap().table_name(), Some("cap"));
        let out = client
            .scan()
            .table_name("cap")
            .consistent_read(true)
            .return_consumed_capacity(Rcc::Indexes)
            .send()
            .await
            .unwrap();
        assert_eq!(units(&out), Some(3.0));
        assert_eq!(
            out.consumed_capacity()
                .unwrap()
                .table()
                .and_then(|t| t.capacity_units()),
            Some(3.0)
        );
        // 4 items = 4 KiB exactly: 1 unit; one item rounds up to a unit.
        let out = client
            .scan()
            .table_name("cap")
            .limit(4)
            .consistent_read(true)
            .return_consumed_capacity(Rcc::Total)
            .send()
            .await
            .unwrap();
        assert_eq!(units(&out), Some(1.0));
        let out = client
            .scan()
            .table_name("cap")
            .limit(1)
            .return_consumed_capacity(Rcc::Total)
            .send()
            .await
            .unwrap();
        assert_eq!(units(&out), Some(0.5));
        // Not asked for: not answered, but recorded.
        let out = client.scan().table_name("cap").send().await.unwrap();
        assert!(out.consumed_capacity().is_none());
        assert_eq!(
            double.calls_to("Scan").last().unwrap().capacity_units,
            Some(1.5)
        );

        // Scripted: every page reports exactly that, whatever its size.
        double.set_scan_units_per_page("cap", Some(7.25));
        let mut start = None;
        let mut pages = 0;
        loop {
            let out = client
                .scan()
                .table_name("cap")
                .limit(3)
                .return_consumed_capacity(Rcc::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .unwrap();
            assert_eq!(units(&out), Some(7.25));
            pages += 1;
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => break,
            }
        }
        assert_eq!(pages, 4);
        double.set_scan_units_per_page("cap", None);
        let out = client
            .scan()
            .table_name("cap")
            .return_consumed_capacity(Rcc::Total)
            .send()
            .await
            .unwrap();
        assert_eq!(units(&out), Some(1.5));
        let calls = double.calls_to("Scan");
        assert_eq!(calls[1].consistent_read, Some(true));
        assert_eq!(calls[0].consistent_read, None);
    })
    .await
}

#[tokio::test]
async fn scan_faults_throttle_and_target_segments() {
    within(async {
        let double = StreamsDouble::start().await;
        double.add_table("hot", KeySchema::hash("pk"), ViewType::NewImage);
        double.insert_items("hot", (0..50).map(plain_item).collect());
        let client = dynamodb(&double).await;
        double.fault(Fault::new(FaultKind::Throttle).op("Scan").times(1));
        let err = client.scan().table_name("hot").send().await.unwrap_err();
        assert_eq!(
            code(&err).as_deref(),
            Some("ProvisionedThroughputExceededException")
        );
        assert!(err
            .into_service_error()
            .is_provisioned_throughput_exceeded_exception());
        let out = client.scan().table_name("hot").send().await.unwrap();
        assert_eq!(out.count(), 50);
        let calls = double.calls_to("Scan");
        assert_eq!(calls[0].status, 400);
        assert_eq!(calls[0].fault.as_deref(), Some("Throttle"));
        assert_eq!(
            calls[0].error_code.as_deref(),
            Some("ProvisionedThroughputExceededException")
        );
        assert_eq!(calls[0].items, 0);

        // Only segment 1 of a parallel scan fails; with the SDK's standard retries it
        // recovers from a throttle that spends itself.
        double.fault(Fault::new(FaultKind::Http500).op("Scan").segment(1));
        for segment in [0, 2] {
            client
                .scan()
                .table_name("hot")
                .segment(segment)
                .total_segments(3)
                .send()
                .await
                .unwrap();
        }
        let err = client
            .scan()
            .table_name("hot")
            .segment(1)
            .total_segments(3)
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InternalServerError"));
        double.clear_faults();
        double.fault(Fault::new(FaultKind::Throttle).op("Scan").times(2));
        let retrying = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk_config(&double, "AKIDTEST").await)
                .retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(1)),
                )
                .build(),
        );
        let out = retrying.scan().table_name("hot").send().await.unwrap();
        assert_eq!(out.count(), 50);
        let faulted = double
            .calls_to("Scan")
            .iter()
            .filter(|c| c.fault.as_deref() == Some("Throttle"))
            .count();
        assert_eq!(faulted, 3);

        // Slow, truncated, dropped.
        double.fault(Fault::new(FaultKind::Truncated).op("Scan").times(1));
        let err = client.scan().table_name("hot").send().await.unwrap_err();
        assert!(matches!(err, SdkError::ResponseError(_)), "{err:?}");
        double.fault(Fault::new(FaultKind::Drop).op("Scan").times(1));
        let err = client.scan().table_name("hot").send().await.unwrap_err();
        assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
        double.fault(
            Fault::new(FaultKind::Slow(Duration::from_millis(200)))
                .op("Scan")
                .times(1),
        );
        let started = Instant::now();
        client.scan().table_name("hot").send().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
    })
    .await
}

#[tokio::test]
async fn describe_table_item_count_size_and_billing() {
    within(async {
        let double = StreamsDouble::start().await;
        double.add_table("billed", KeySchema::hash("pk"), ViewType::NewImage);
        let client = dynamodb(&double).await;
        let describe = || async {
            client
                .describe_table()
                .table_name("billed")
                .send()
                .await
                .unwrap()
                .table()
                .unwrap()
                .clone()
        };
        use aws_sdk_dynamodb::types::BillingMode;
        let t = describe().await;
        assert_eq!(t.item_count(), Some(0));
        assert_eq!(t.table_size_bytes(), Some(0));
        assert_eq!(
            t.billing_mode_summary().unwrap().billing_mode(),
            Some(&BillingMode::PayPerRequest)
        );
        assert_eq!(
            t.provisioned_throughput().unwrap().read_capacity_units(),
            Some(0)
        );
        assert!(t.stream_specification().is_some() && t.latest_stream_arn().is_some());

        double.insert_items("billed", (0..30).map(plain_item).collect());
        double.add_generated_items("billed", 100, 4096);
        double.put("billed", plain_item(1000));
        double.delete("billed", json!({"pk": {"S": "plain-0000"}}));
        double.set_provisioned_read_capacity("billed", Some(50));
        let t = describe().await;
        assert_eq!(t.item_count(), Some(130));
        let size = t.table_size_bytes().unwrap();
        assert!((100 * 4090..100 * 4100 + 30 * 20).contains(&size), "{size}");
        assert_eq!(
            t.billing_mode_summary().unwrap().billing_mode(),
            Some(&BillingMode::Provisioned)
        );
        let p = t.provisioned_throughput().unwrap();
        assert_eq!(p.read_capacity_units(), Some(50));
        assert_eq!(t.table_name(), Some("billed"));
        assert_eq!(t.key_schema().len(), 1);

        double.set_provisioned_read_capacity("billed", None);
        let t = describe().await;
        assert_eq!(
            t.billing_mode_summary().unwrap().billing_mode(),
            Some(&BillingMode::PayPerRequest)
        );
        // Generated items replaced by writes keep the count.
        double.put(
            "billed",
            json!({"pk": {"S": "item-000001"}, "v": {"N": "1"}}),
        );
        assert_eq!(describe().await.item_count(), Some(130));
    })
    .await
}

#[tokio::test]
async fn writes_are_visible_to_scan_and_preexisting_items_make_no_records() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("live", KeySchema::hash("pk"), ViewType::NewAndOldImages);
        let shard = double.open_shards("live").remove(0);
        double.insert_items("live", vec![item("a", 1), item("b", 2)]);
        double.add_generated_items("live", 3, 100);
        assert_eq!(double.shards(&arn)[0].records, 0);
        let ddb = dynamodb(&double).await;
        let scan = || async {
            let mut items: Vec<(String, Option<Av>)> = scan_pages(&ddb, "live", None, None)
                .await
                .concat()
                .into_iter()
                .map(|i| (pk(&i), i.get("n").cloned()))
                .collect();
            items.sort_by(|x, y| x.0.cmp(&y.0));
            items
        };
        let n = |v: &str| Some(Av::N(v.into()));
        assert_eq!(
            scan().await,
            vec![
                ("a".into(), n("1")),
                ("b".into(), n("2")),
                ("item-000001".into(), n("1")),
                ("item-000002".into(), n("2")),
                ("item-000003".into(), n("3")),
            ]
        );

        // put (new and over a pre-existing item), update, delete (of a generated one too).
        double.put("live", item("c", 3)).unwrap();
        double.put("live", item("a", 10)).unwrap();
        double
            .update("live", json!({"pk": {"S": "b"}}), json!({"n": {"N": "20"}}))
            .unwrap();
        double
            .update(
                "live",
                json!({"pk": {"S": "item-000002"}}),
                json!({"n": {"N": "-2"}}),
            )
            .unwrap();
        double
            .delete("live", json!({"pk": {"S": "item-000003"}}))
            .unwrap();
        assert_eq!(
            scan().await,
            vec![
                ("a".into(), n("10")),
                ("b".into(), n("20")),
                ("c".into(), n("3")),
                ("item-000001".into(), n("1")),
                ("item-000002".into(), n("-2")),
            ]
        );

        // The records: old images are the pre-existing items.
        let client = streams(&double).await;
        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        let r = out.records();
        use OperationType::*;
        let kinds: Vec<_> = r.iter().map(|r| r.event_name().unwrap().clone()).collect();
        assert_eq!(kinds, vec![Insert, Modify, Modify, Modify, Remove]);
        let old = |i: usize| r[i].dynamodb().unwrap().old_image().unwrap().clone();
        assert_eq!(old(1)["n"], AttributeValue::N("1".into()));
        assert_eq!(old(2)["n"], AttributeValue::N("2".into()));
        assert_eq!(old(3)["n"], AttributeValue::N("2".into()));
        assert!(matches!(&old(3)["pad"], AttributeValue::S(_)));
        assert_eq!(old(4)["pk"], AttributeValue::S("item-000003".into()));
        let new = r[3].dynamodb().unwrap().new_image().unwrap();
        assert_eq!(new["n"], AttributeValue::N("-2".into()));
        assert!(new.contains_key("pad"), "update keeps the other attributes");

        // Later batches are numbered after the earlier ones.
        double.add_generated_items("live", 2, 100);
        let keys: Vec<String> = scan().await.into_iter().map(|(k, _)| k).collect();
        assert!(
            keys.contains(&"item-000004".to_owned()) && keys.contains(&"item-000005".to_owned())
        );
    })
    .await
}

#[tokio::test]
async fn the_clock_offset_dates_records_and_tables() {
    within(async {
        let double = StreamsDouble::start().await;
        let arn = double.add_table("clock", KeySchema::hash("pk"), ViewType::NewImage);
        let shard = double.open_shards("clock").remove(0);
        double.put("clock", item("now", 1));
        double.set_clock_offset(chrono::Duration::hours(-2));
        let shifted = double.now();
        assert!(
            (chrono::Utc::now() - shifted - chrono::Duration::hours(2))
                .num_seconds()
                .abs()
                <= 1
        );
        double.put("clock", item("past", 1));
        let mut spec = RecordSpec::insert(json!({"pk": {"S": "x"}}), item("x", 1));
        spec.approximate_creation_epoch_s = Some(1_000_000_000.0);
        double.push_record(&shard, spec);
        double.push_record(
            &shard,
            RecordSpec::insert(json!({"pk": {"S": "y"}}), item("y", 1)),
        );
        double.add_table("older", KeySchema::hash("pk"), ViewType::NewImage);
        double.set_clock_offset(chrono::Duration::zero());

        let client = streams(&double).await;
        let it = iterator(&client, &arn, &shard, ShardIteratorType::TrimHorizon, None).await;
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .unwrap();
        let times: Vec<i64> = out
            .records()
            .iter()
            .map(|r| {
                r.dynamodb()
                    .unwrap()
                    .approximate_creation_date_time()
                    .unwrap()
                    .secs()
            })
            .collect();
        let now = chrono::Utc::now().timestamp();
        assert!((now - times[0]).abs() <= 2, "{times:?}");
        assert!((now - 7200 - times[1]).abs() <= 2, "{times:?}");
        assert_eq!(times[2], 1_000_000_000);
        assert!((now - 7200 - times[3]).abs() <= 2, "{times:?}");

        let ddb = dynamodb(&double).await;
        let created = |name: &'static str| {
            let ddb = ddb.clone();
            async move {
                ddb.describe_table()
                    .table_name(name)
                    .send()
                    .await
                    .unwrap()
                    .table()
                    .unwrap()
                    .creation_date_time()
                    .unwrap()
                    .secs()
            }
        };
        assert!((now - created("clock").await).abs() <= 2);
        assert!((now - 7200 - created("older").await).abs() <= 2);
    })
    .await
}

/// One AWS JSON 1.0 request without the SDK; returns the parsed body (status 200).
async fn raw_json_post(endpoint: &str, target: &str, body: serde_json::Value) -> serde_json::Value {
    use http_body_util::{BodyExt, Full};
    let addr = endpoint.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/")
        .header("host", &addr)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", target)
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// Serves a generated table to raw HTTP clients (no SDK parsing, so the double is the
/// bottleneck) and prints records/s; then the same through the SDK client for reference.
#[test]
#[ignore]
fn speed() {
    let double = StreamsDouble::start_with(Options {
        record_calls: false,
        ..Options::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (item_bytes, view) in [(200, ViewType::NewImage), (1000, ViewType::NewAndOldImages)] {
        let table = format!("speed{item_bytes}");
        let shards = 8;
        let arn = double.add_generated_table(
            &table,
            Generated {
                shards,
                records_per_shard: 100_000,
                item_bytes,
                keys: 80_000,
                close: true,
                view_type: view,
            },
        );
        let ids: Vec<String> = double
            .shards(&arn)
            .into_iter()
            .map(|s| s.shard_id)
            .collect();
        let before = double.records_served();
        let started = Instant::now();
        let bytes: u64 = runtime.block_on(async {
            let tasks: Vec<_> = ids
                .into_iter()
                .map(|id| tokio::spawn(raw_drain(double.endpoint(), arn.clone(), id)))
                .collect();
            let mut bytes = 0;
            for t in tasks {
                bytes += t.await.unwrap();
            }
            bytes
        });
        let secs = started.elapsed().as_secs_f64();
        let records = double.records_served() - before;
        println!(
            "raw HTTP, item_bytes {item_bytes} {}: {records} records in {secs:.2} s = {:.0} records/s, {:.0} MB/s",
            view.as_str(),
            records as f64 / secs,
            bytes as f64 / secs / 1e6
        );
        assert!(double.table_drained(&table));
    }

    // Through the SDK (what the daemon pays to parse), one shard per task.
    let arn = double.add_generated_table(
        "speed-sdk",
        Generated {
            shards: 2,
            records_per_shard: 50_000,
            item_bytes: 1000,
            keys: 20_000,
            close: true,
            view_type: ViewType::NewAndOldImages,
        },
    );
    let before = double.records_served();
    let started = Instant::now();
    runtime.block_on(async {
        let client = streams(&double).await;
        let tasks: Vec<_> = double
            .shards(&arn)
            .into_iter()
            .map(|s| {
                let (client, arn) = (client.clone(), arn.clone());
                tokio::spawn(async move {
                    let mut it = iterator(
                        &client,
                        &arn,
                        &s.shard_id,
                        ShardIteratorType::TrimHorizon,
                        None,
                    )
                    .await;
                    loop {
                        let out = client
                            .get_records()
                            .shard_iterator(&it)
                            .send()
                            .await
                            .unwrap();
                        match out.next_shard_iterator() {
                            Some(next) => it = next.to_owned(),
                            None => break,
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let records = double.records_served() - before;
    println!(
        "SDK client, item_bytes 1000 NEW_AND_OLD_IMAGES: {records} records in {secs:.2} s = {:.0} records/s",
        records as f64 / secs
    );
}

/// Reads a shard to its end over one keep-alive connection; returns the bytes received.
async fn raw_drain(endpoint: String, arn: String, shard: String) -> u64 {
    use http_body_util::{BodyExt, Full};
    let addr = endpoint.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut post = async |op: &str, body: String| -> bytes::Bytes {
        let req = hyper::Request::post("/")
            .header("host", &addr)
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", format!("DynamoDBStreams_20120810.{op}"))
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    };
    let body = post(
        "GetShardIterator",
        json!({"StreamArn": arn, "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON"})
            .to_string(),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut it = v["ShardIterator"].as_str().unwrap().to_owned();
    let mut bytes = 0;
    loop {
        let body = post(
            "GetRecords",
            format!(r#"{{"ShardIterator":"{it}","Limit":1000}}"#),
        )
        .await;
        bytes += body.len() as u64;
        // NextShardIterator is the last member: find it in the tail.
        let tail = &body[body.len().saturating_sub(400)..];
        let tail = std::str::from_utf8(tail).unwrap_or("");
        let key = r#""NextShardIterator":""#;
        match tail.rfind(key) {
            Some(i) => {
                let rest = &tail[i + key.len()..];
                it = rest[..rest.find('"').unwrap()].to_owned();
            }
            None => return bytes,
        }
    }
}
