//! The GetRecords fast path: a shard's own Streams client whose GetRecords responses are
//! converted straight to Kafka records ([`crate::convert::fast`]), while signing, retries,
//! timeouts and error parsing stay the SDK's.

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodbstreams::operation::get_records::{GetRecords, GetRecordsOutput};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, Error as OperationError, Output,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::{HttpResponse, Metadata, OrchestratorError};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::client::runtime_plugin::RuntimePlugin;
use aws_smithy_runtime_api::client::ser_de::{DeserializeResponse, SharedResponseDeserializer};
use aws_smithy_types::config_bag::{ConfigBag, FrozenLayer};

use crate::convert::{self, FastPage, Source};

/// Where [`FastDeserializer`] leaves the page it converted for the reader (one GetRecords
/// call of one shard at a time), with the size of the response body it came from.
pub(super) type PageSlot = Arc<Mutex<Option<(FastPage, usize)>>>;

/// What the fast path of one shard needs.
#[derive(Debug)]
pub(super) struct FastPathConfig {
    pub(super) slot: PageSlot,
    pub(super) source: Source,
    pub(super) tombstones: bool,
    pub(super) max_message_bytes: usize,
}

/// The shard's own client: `streams` (same connections, credentials and identity cache)
/// with [`FastPath`] installed.
pub(super) fn fast_path_client(
    streams: &aws_sdk_dynamodbstreams::Client,
    config: FastPathConfig,
) -> aws_sdk_dynamodbstreams::Client {
    // The SDK's own GetRecords deserializer, for everything the fast path leaves to it.
    let sdk = GetRecords::new()
        .config()
        .filter(|layer| layer.load::<SharedResponseDeserializer>().is_some());
    let Some(sdk) = sdk else {
        return streams.clone();
    };
    let with_fast_path = streams
        .config()
        .to_builder()
        .interceptor(FastPath(Arc::new(FastPathState { config, sdk })))
        .build();
    aws_sdk_dynamodbstreams::Client::from_conf(with_fast_path)
}

/// The GetRecords fast path: before each GetRecords call, puts a [`FastDeserializer`] in
/// front of the SDK's response deserializer. Signing, retries, timeouts, error parsing and
/// classification stay the SDK's.
///
/// ```text
/// 200 body ─▶ convert::convert_page ─ converted ─▶ slot (Kafka records), and an output
///                     │                             with only NextShardIterator
///                     └ None (anything unusual) ──▶ the SDK's deserializer ─▶ typed records
///                                                   ─▶ Reader::convert_page (poison records)
/// error ──────────────────────────────────────────▶ the SDK's deserializer
/// ```
#[derive(Debug)]
struct FastPath(Arc<FastPathState>);

#[derive(Debug)]
struct FastPathState {
    config: FastPathConfig,
    /// Holds the SDK's GetRecords response deserializer.
    sdk: FrozenLayer,
}

impl Intercept for FastPath {
    fn name(&self) -> &'static str {
        "DynamodbCdcGetRecordsFastPath"
    }

    // Not `read_before_execution`: a client's interceptors run that before the operation's
    // configuration (its name, its deserializer) is in the bag.
    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<Metadata>().map(Metadata::name) != Some("GetRecords") {
            return Ok(());
        }
        self.0.config.slot.lock().expect("page slot").take();
        cfg.interceptor_state()
            .store_put(SharedResponseDeserializer::new(FastDeserializer(
                self.0.clone(),
            )));
        Ok(())
    }
}

/// The SDK's GetRecords deserializer with the fast path in front.
#[derive(Debug)]
struct FastDeserializer(Arc<FastPathState>);

impl DeserializeResponse for FastDeserializer {
    fn deserialize_nonstreaming_with_config(
        &self,
        response: &HttpResponse,
        cfg: &ConfigBag,
    ) -> Result<Output, OrchestratorError<OperationError>> {
        let s = &self.0;
        let c = &s.config;
        if response.status().is_success() {
            let page = response.body().bytes().and_then(|body| {
                convert::convert_page(body, &c.source, c.tombstones, c.max_message_bytes)
            });
            if let Some(page) = page {
                let output = GetRecordsOutput::builder()
                    .set_next_shard_iterator(page.next_shard_iterator.clone())
                    .build();
                let body_bytes = response.body().bytes().map_or(0, <[u8]>::len);
                *c.slot.lock().expect("page slot") = Some((page, body_bytes));
                return Ok(Output::erase(output));
            }
        }
        s.sdk
            .load::<SharedResponseDeserializer>()
            .expect("checked in fast_path_client")
            .deserialize_nonstreaming_with_config(response, cfg)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use aws_sdk_dynamodbstreams::config::{Credentials, Region};
    use aws_smithy_runtime_api::client::http::{
        http_client_fn, HttpConnector, HttpConnectorFuture, SharedHttpConnector,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    use super::*;

    /// Answers each request with the next canned (status, body).
    #[derive(Debug, Clone, Default)]
    struct Canned(Arc<Mutex<VecDeque<(u16, String)>>>);

    impl HttpConnector for Canned {
        fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
            let (status, body) = self.0.lock().unwrap().pop_front().expect("a canned answer");
            let mut response =
                HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
            response
                .headers_mut()
                .insert("content-type", "application/x-amz-json-1.0");
            HttpConnectorFuture::ready(Ok(response))
        }
    }

    fn client(canned: &Canned) -> aws_sdk_dynamodbstreams::Client {
        let connector = canned.clone();
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKID", "secret", None, None, "test"))
            .endpoint_url("http://127.0.0.1:1")
            .http_client(http_client_fn(move |_, _| {
                SharedHttpConnector::new(connector.clone())
            }))
            .build();
        aws_sdk_dynamodbstreams::Client::from_conf(config)
    }

    fn source() -> Source {
        Source {
            table: "orders".into(),
            stream_arn: "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1".into(),
            shard_id: "shardId-1".into(),
        }
    }

    const RECORD: &str = r#"{"eventID":"e1","eventName":"MODIFY","eventVersion":"1.1","eventSource":"aws:dynamodb","awsRegion":"us-east-1","dynamodb":{"ApproximateCreationDateTime":1795452116.5,"Keys":{"pk":{"S":"k\u00e91"},"sk":{"N":"5"}},"NewImage":{"pk":{"S":"k\u00e91"},"sk":{"N":"5"},"big":{"N":"12345678901234567890.123456789"},"b":{"B":"aGk="},"l":{"L":[{"NULL":true},{"BOOL":false},{"SS":["a\"b"]},{"NS":["1E2"]},{"BS":["AA=="]}]},"m":{"M":{"z":{"S":""},"a":{"N":"-0.5"}}}},"OldImage":{"pk":{"S":"k\u00e91"},"sk":{"N":"5"}},"SequenceNumber":"100000000000000000001","SizeBytes":120,"StreamViewType":"NEW_AND_OLD_IMAGES"},"userIdentity":{"PrincipalId":"dynamodb.amazonaws.com","Type":"Service"}}"#;

    fn page(records: &[&str], next: Option<&str>) -> String {
        let next = next.map_or(String::new(), |n| format!(r#","NextShardIterator":"{n}""#));
        format!(r#"{{"Records":[{}]{next}}}"#, records.join(","))
    }

    async fn get(client: &aws_sdk_dynamodbstreams::Client) -> Result<GetRecordsOutput, String> {
        client
            .get_records()
            .shard_iterator("it-1")
            .send()
            .await
            .map_err(|e| format!("{e:?}"))
    }

    fn fast(canned: &Canned, slot: &PageSlot) -> aws_sdk_dynamodbstreams::Client {
        fast_path_client(
            &client(canned),
            FastPathConfig {
                slot: slot.clone(),
                source: source(),
                tombstones: true,
                max_message_bytes: 1 << 20,
            },
        )
    }

    #[tokio::test]
    async fn fast_path_writes_what_the_sdk_path_writes() {
        let body = page(
            &[
                RECORD,
                &RECORD
                    .replace("100000000000000000001", "100000000000000000002")
                    .replace("MODIFY", "REMOVE"),
            ],
            Some("it-2"),
        );
        let body_len = body.len();
        let canned = Canned::default();
        canned
            .0
            .lock()
            .unwrap()
            .extend([(200, body.clone()), (200, body)]);
        let slot = PageSlot::default();

        let out = get(&fast(&canned, &slot)).await.unwrap();
        assert!(
            out.records().is_empty(),
            "the fast path hands records over the slot"
        );
        assert_eq!(out.next_shard_iterator(), Some("it-2"));
        let (page, body_bytes) = slot
            .lock()
            .unwrap()
            .take()
            .expect("converted on the fast path");
        assert_eq!(
            body_bytes, body_len,
            "the body's size, for the memory budget"
        );
        assert_eq!(page.stream_records, 2);
        assert_eq!(
            page.first_sequence_number.as_deref(),
            Some("100000000000000000001")
        );
        assert_eq!(
            page.last_sequence_number.as_deref(),
            Some("100000000000000000002")
        );

        // The same body through the SDK's deserializer and the reference conversion.
        let reference = get(&client(&canned)).await.unwrap();
        let expected: Vec<rskafka::record::Record> = reference
            .records()
            .iter()
            .flat_map(|r| convert::convert(r, &source(), true).unwrap().records)
            .collect();
        assert_eq!(page.records.len(), 3, "two events and a tombstone");
        assert_eq!(page.records, expected);
    }

    #[tokio::test]
    async fn anything_else_goes_through_the_sdk() {
        let poison = RECORD.replace(r#"{"N":"5"},"big""#, r#"{"N":"5,0"},"big""#);
        let canned = Canned::default();
        canned.0.lock().unwrap().extend([
            (200, page(&[RECORD, &poison], Some("it-2"))),
            (400, r#"{"__type":"com.amazonaws.dynamodb.v20120810#ExpiredIteratorException","message":"Iterator expired"}"#.to_owned()),
            (200, page(&[], None)),
        ]);
        let slot = PageSlot::default();
        let client = fast(&canned, &slot);

        // A poison record: the SDK's typed records, for the reader's poison handling.
        let out = get(&client).await.unwrap();
        assert_eq!(out.records().len(), 2);
        assert!(slot.lock().unwrap().is_none());

        // Errors keep their type.
        let err = get(&client).await.unwrap_err();
        assert!(err.contains("ExpiredIteratorException"), "{err}");
        assert!(slot.lock().unwrap().is_none());

        // A closed shard's last page.
        let out = get(&client).await.unwrap();
        assert_eq!(out.next_shard_iterator(), None);
        let (page, _) = slot.lock().unwrap().take().unwrap();
        assert_eq!((page.stream_records, page.next_shard_iterator), (0, None));
    }
}
