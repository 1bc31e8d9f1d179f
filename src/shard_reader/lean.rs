//! The lean GetRecords path: one GetRecords attempt, SigV4-signed and sent on the SDK's own
//! connection pool, without the SDK's orchestrator (runtime plugins, interceptors, endpoint
//! and auth scheme resolution, identity cache, retry strategy on every call).
//!
//! ```text
//! new():  one aborted SDK call captures the client's runtime components (HTTP client,
//!         identity resolver and cache, endpoint resolver, time source); the request
//!         template (URI, static headers), host and the pooled connector are built once
//! call:   JSON body ─▶ SigV4 (cached credentials and day key) ─▶ pooled connector
//!           ─▶ whole body
//!           2xx ─▶ convert::convert_page ─ converted ─▶ slot, output with NextShardIterator
//!                          └ refused ──────────────────▶ the SDK's GetRecords deserializer
//!           else ──────────────────────────────────────▶ the SDK's GetRecords deserializer
//! ```
//!
//! Errors are the SDK's variants, so [`crate::error::classify_aws`] sees what the SDK path
//! gives: a connection failure is a dispatch failure (the connector's own
//! `ConnectorError`), the attempt timeout a timeout error, a body cut short a response
//! error, and an error answer the SDK deserializer's typed service error with the raw
//! response. Credentials that cannot be resolved are a dispatch failure, as in the SDK.
//!
//! The canonical request is written directly (its headers never vary); the signing key
//! comes from `aws_sigv4::sign::v4::generate_signing_key` once per credentials and UTC day,
//! the signature from `aws_sigv4::sign::v4::calculate_signature`. The tests check the
//! result against aws-sigv4's own request signer, and on the wire.

use std::future::Future;
use std::io::Write as _;
use std::pin::pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::operation::get_records::{
    GetRecords, GetRecordsError, GetRecordsOutput,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::auth::AuthSchemeId;
use aws_smithy_runtime_api::client::endpoint::{EndpointResolverParams, ResolveEndpoint};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::identity::{
    Identity, ResolveCachedIdentity, SharedIdentityCache, SharedIdentityResolver,
};
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, Error as OperationError,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse, OrchestratorError};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::{GetIdentityResolver, RuntimeComponents};
use aws_smithy_runtime_api::client::runtime_plugin::RuntimePlugin;
use aws_smithy_runtime_api::client::ser_de::{DeserializeResponse, SharedResponseDeserializer};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::config_bag::{ConfigBag, FrozenLayer};
use aws_smithy_types::date_time::{DateTime, Format};
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;

use super::fast_path::FastPathConfig;
use crate::convert;

/// The attempt timeout when the config has none.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Resolved credentials are asked for again after this long...
const CREDENTIALS_MAX_AGE: Duration = Duration::from_secs(60);
/// ...or this long before they expire...
const CREDENTIALS_EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
/// ...but not more often than this (credentials the provider hands out close to expiry).
const CREDENTIALS_MIN_AGE: Duration = Duration::from_secs(5);
/// The SDK's clock skew measurement ignores answers that took longer than this.
const MAX_TRUSTED_REQUEST_DURATION: Duration = Duration::from_secs(15 * 60);
/// The SigV4 auth scheme (`aws_runtime::auth::sigv4::SCHEME_ID`).
const SIGV4: AuthSchemeId = AuthSchemeId::new("sigv4");
const TARGET: &str = "DynamoDBStreams_20120810.GetRecords";
const CONTENT_TYPE: &str = "application/x-amz-json-1.0";
const USER_AGENT: &str = concat!("dynamodb-cdc/", env!("CARGO_PKG_VERSION"));
const AMZ_USER_AGENT: &str = concat!(
    "dynamodb-cdc/",
    env!("CARGO_PKG_VERSION"),
    " api/dynamodbstreams md/lean-get-records"
);

type GetRecordsResult = Result<GetRecordsOutput, SdkError<GetRecordsError, HttpResponse>>;

/// GetRecords of one shard without the SDK's orchestrator; see the module docs.
pub(super) struct LeanGetRecords {
    fast: FastPathConfig,
    /// Holds the SDK's GetRecords response deserializer, for everything the fast path
    /// refuses.
    sdk: FrozenLayer,
    /// The client's own pooled connector (the one its GetRecords calls use).
    connector: SharedHttpConnector,
    /// The client's runtime components (identity resolution needs them).
    components: RuntimeComponents,
    identity_resolver: SharedIdentityResolver,
    identity_cache: SharedIdentityCache,
    /// An empty bag: neither credential providers nor the deserializer read it.
    cfg: ConfigBag,
    /// `POST /` to the endpoint with the static headers; each call clones it.
    template: HttpRequest,
    /// Its URI (for Debug).
    uri_string: String,
    /// The `host` header as hyper sends it and SigV4 signs it (no default port).
    host: String,
    region: String,
    signing_name: &'static str,
    /// `/{region}/{signing name}/aws4_request`, after the date in the credential scope.
    scope_tail: String,
    attempt_timeout: Duration,
    /// Server clock minus ours, in milliseconds, as the SDK measures it from `Date`
    /// (`None`: correction disabled in the config).
    clock_skew: Option<AtomicI64>,
    credentials: Mutex<Option<CachedIdentity>>,
}

/// Resolved credentials, when to ask for them again, and their SigV4 signing key of the
/// day.
struct CachedIdentity {
    identity: Identity,
    fetched_at: SystemTime,
    refresh_at: SystemTime,
    /// (days since the epoch, key).
    signing_key: Option<(u64, [u8; 32])>,
}

/// What one request is signed with.
struct Signer {
    identity: Identity,
    key: [u8; 32],
}

impl CachedIdentity {
    fn new(identity: Identity, now: SystemTime) -> Self {
        let mut refresh_at = now + CREDENTIALS_MAX_AGE;
        if let Some(expiry) = identity.expiration() {
            let margin = expiry
                .checked_sub(CREDENTIALS_EXPIRY_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            refresh_at = refresh_at.min(margin).max(now + CREDENTIALS_MIN_AGE);
        }
        Self {
            identity,
            fetched_at: now,
            refresh_at,
            signing_key: None,
        }
    }

    /// The signer for a request signed at `time` (a new key each UTC day).
    fn signer(&mut self, time: SystemTime, region: &str, service: &str) -> Signer {
        let day = unix_seconds(time) / 86_400;
        let key = match self.signing_key {
            Some((d, key)) if d == day => key,
            _ => {
                let credentials = self.identity.data::<Credentials>().expect("checked");
                let key = v4::generate_signing_key(
                    credentials.secret_access_key(),
                    time,
                    region,
                    service,
                );
                let key: [u8; 32] = key.as_ref().try_into().expect("an HMAC-SHA256 key");
                self.signing_key = Some((day, key));
                key
            }
        };
        Signer {
            identity: self.identity.clone(),
            key,
        }
    }

    fn fresh(&self, now: SystemTime) -> bool {
        now >= self.fetched_at
            && now < self.refresh_at
            && self.identity.expiration().is_none_or(|e| now < e)
    }
}

impl std::fmt::Debug for LeanGetRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials: only whether some are cached, and until when.
        let credentials = self
            .credentials
            .lock()
            .map(|c| c.as_ref().map(|c| (c.refresh_at, c.identity.expiration())))
            .unwrap_or(None);
        f.debug_struct("LeanGetRecords")
            .field("uri", &self.uri_string)
            .field("region", &self.region)
            .field("signing_name", &self.signing_name)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("clock_skew_ms", &self.clock_skew)
            .field("cached_credentials_refresh_at_expiry", &credentials)
            .field("source", &self.fast.source)
            .finish_non_exhaustive()
    }
}

impl LeanGetRecords {
    /// `None` when `streams`' config lacks what the lean path needs (then the caller keeps
    /// the SDK path).
    pub(super) fn new(
        streams: &aws_sdk_dynamodbstreams::Client,
        config: FastPathConfig,
    ) -> Option<Self> {
        let sdk = GetRecords::new()
            .config()
            .filter(|layer| layer.load::<SharedResponseDeserializer>().is_some())?;
        let captured = capture(streams)?;
        let client = streams.config();
        let components = captured.components;
        let identity_resolver = components.identity_resolver(SIGV4)?;
        let identity_cache = components.identity_cache();
        components.auth_scheme(SIGV4)?;
        let timeouts = captured.timeouts.as_ref().or(client.timeout_config());
        let settings = {
            let mut builder = HttpConnectorSettings::builder();
            builder.set_connect_timeout(timeouts.and_then(|t| t.connect_timeout()));
            builder.set_read_timeout(timeouts.and_then(|t| t.read_timeout()));
            builder.build()
        };
        // The same settings as the SDK's orchestrator: the client hands out the connector
        // (and so the connection pool) its own GetRecords calls use.
        let connector = components
            .http_client()?
            .http_connector(&settings, &components);
        // What the SDK's serializer and `apply_endpoint` make: the endpoint's URL with the
        // operation's path `/`, the operation's headers and the endpoint's.
        let mut template = HttpRequest::new(SdkBody::empty());
        template.set_method("POST").ok()?;
        template.set_uri("/").ok()?;
        template
            .uri_mut()
            .set_endpoint(&captured.endpoint_url)
            .ok()?;
        let headers = template.headers_mut();
        headers.insert("content-type", CONTENT_TYPE);
        headers.insert("x-amz-target", TARGET);
        headers.insert("user-agent", USER_AGENT);
        headers.insert("x-amz-user-agent", AMZ_USER_AGENT);
        // The canonical request below signs exactly these headers on the path `/`:
        // endpoints with a path or headers of their own stay on the SDK path.
        if !captured.endpoint_headers.is_empty() {
            return None;
        }
        let uri_string = template.uri().to_owned();
        let uri: hyper::Uri = uri_string.parse().ok()?;
        if uri.path() != "/" || uri.query().is_some() {
            return None;
        }
        // As hyper writes `host` and SigV4 signs it: the port only when not the scheme's.
        let default_port = match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return None,
        };
        let host = match uri.port_u16() {
            Some(port) if port != default_port => uri.authority()?.as_str().to_owned(),
            _ => uri.host()?.to_owned(),
        };
        let region = client.region()?.to_string();
        let signing_name = client.signing_name();
        Some(Self {
            fast: config,
            sdk,
            connector,
            identity_resolver,
            identity_cache,
            components,
            cfg: ConfigBag::base(),
            template,
            uri_string,
            host,
            scope_tail: format!("/{region}/{signing_name}/aws4_request"),
            region,
            signing_name,
            attempt_timeout: timeouts
                .and_then(|t| t.operation_attempt_timeout())
                .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT),
            clock_skew: (client.disable_clock_skew_correction() != Some(true))
                .then(|| AtomicI64::new(0)),
            credentials: Mutex::new(None),
        })
    }

    /// One GetRecords attempt (no retries: the caller's `crate::aws::retrying` loop retries
    /// on the SdkError). A 2xx page the fast path converts goes to `config.slot` (emptied
    /// at each call) with its body's size, and the output carries only NextShardIterator;
    /// anything else is what the SDK's deserializer makes of the answer.
    pub(super) async fn get_records(&self, iterator: &str, limit: i32) -> GetRecordsResult {
        self.fast.slot.lock().expect("page slot").take();
        match tokio::time::timeout(self.attempt_timeout, self.attempt(iterator, limit)).await {
            Ok(result) => result,
            Err(_) => Err(SdkError::timeout_error(AttemptTimeout(
                self.attempt_timeout,
            ))),
        }
    }

    async fn attempt(&self, iterator: &str, limit: i32) -> GetRecordsResult {
        let time = self.signing_time();
        // As in the SDK, credentials that cannot be had fail the dispatch.
        let signer = self.signer(time).await.map_err(dispatch_failure)?;
        let body = request_body(iterator, limit);
        let request = self
            .signed_request(body, &signer, time)
            .map_err(dispatch_failure)?;
        let sent_at = self.now();
        let mut response = self
            .connector
            .call(request)
            .await
            .map_err(SdkError::dispatch_failure)?;
        self.measure_clock_skew(&response, sent_at);
        let body = std::mem::replace(response.body_mut(), SdkBody::taken());
        let body = match ByteStream::new(body).collect().await {
            Ok(body) => body.into_bytes(),
            Err(err) => return Err(SdkError::response_error(err, response)),
        };
        if response.status().is_success() {
            let c = &self.fast;
            if let Some(page) =
                convert::convert_page(&body, &c.source, c.tombstones, c.max_message_bytes)
            {
                let output = GetRecordsOutput::builder()
                    .set_next_shard_iterator(page.next_shard_iterator.clone())
                    .build();
                *c.slot.lock().expect("page slot") = Some((page, body.len()));
                return Ok(output);
            }
        }
        *response.body_mut() = SdkBody::from(body);
        let result = self.sdk_result(response);
        if let Err(SdkError::ServiceError(service)) = &result {
            if auth_error(service.err().code(), service.raw().status().as_u16()) {
                // Credentials that rotated or expired under us: resolve again next time.
                *self.credentials.lock().expect("credentials") = None;
            }
        }
        result
    }

    /// The SDK's deserializer on a whole response, with the orchestrator's error mapping.
    // The SDK's own error type, what `get_records` returns.
    #[allow(clippy::result_large_err)]
    fn sdk_result(&self, response: HttpResponse) -> GetRecordsResult {
        let sdk = self
            .sdk
            .load::<SharedResponseDeserializer>()
            .expect("checked in new");
        match sdk.deserialize_nonstreaming_with_config(&response, &self.cfg) {
            Ok(output) => output
                .downcast::<GetRecordsOutput>()
                .map_err(|_| SdkError::response_error("not a GetRecords output", response)),
            Err(err) => {
                let mut operation = None;
                let rest = err.map_operation_error(|e| {
                    operation = Some(e);
                    Taken
                });
                match operation.map(OperationError::downcast::<GetRecordsError>) {
                    Some(Ok(err)) => Err(SdkError::service_error(err, response)),
                    Some(Err(other)) => Err(SdkError::response_error(other, response)),
                    None => Err(orchestrator_error(rest, response)),
                }
            }
        }
    }

    /// The credentials and signing key for a request signed at `time`: cached, or
    /// resolved through the client's identity cache (what the SDK does on every call).
    async fn signer(&self, time: SystemTime) -> Result<Signer, BoxError> {
        let now = self.now();
        if let Some(cached) = &mut *self.credentials.lock().expect("credentials") {
            if cached.fresh(now) {
                return Ok(cached.signer(time, &self.region, self.signing_name));
            }
        }
        let identity = self
            .identity_cache
            .resolve_cached_identity(self.identity_resolver.clone(), &self.components, &self.cfg)
            .await?;
        if identity.data::<Credentials>().is_none() {
            return Err("the SigV4 identity resolver returned no AWS credentials".into());
        }
        let mut cached = CachedIdentity::new(identity, now);
        let signer = cached.signer(time, &self.region, self.signing_name);
        *self.credentials.lock().expect("credentials") = Some(cached);
        Ok(signer)
    }

    /// The request, SigV4-signed in the headers as the SDK signs GetRecords (path `/`, no
    /// query, no x-amz-content-sha256, the session token signed, user-agent not). The
    /// canonical request is written directly: its headers are always these, in this order.
    fn signed_request(
        &self,
        body: Bytes,
        signer: &Signer,
        time: SystemTime,
    ) -> Result<HttpRequest, BoxError> {
        let credentials = signer
            .identity
            .data::<Credentials>()
            .expect("checked when cached");
        let token = credentials.session_token();
        let amz_date = amz_date(unix_seconds(time));
        let date = &amz_date[..8];
        let length = body.len().to_string();
        let signed_headers = if token.is_some() {
            "content-length;content-type;host;x-amz-date;x-amz-security-token;x-amz-target;x-amz-user-agent"
        } else {
            "content-length;content-type;host;x-amz-date;x-amz-target;x-amz-user-agent"
        };

        let mut canonical = String::with_capacity(400 + token.map_or(0, str::len));
        for part in [
            "POST\n/\n\ncontent-length:",
            &length,
            "\ncontent-type:",
            CONTENT_TYPE,
            "\nhost:",
            &self.host,
            "\nx-amz-date:",
            &amz_date,
            "\n",
        ] {
            canonical.push_str(part);
        }
        if let Some(token) = token {
            canonical.push_str("x-amz-security-token:");
            canonical.push_str(token);
            canonical.push('\n');
        }
        for part in [
            "x-amz-target:",
            TARGET,
            "\nx-amz-user-agent:",
            AMZ_USER_AGENT,
            "\n\n",
            signed_headers,
            "\n",
        ] {
            canonical.push_str(part);
        }
        push_hex(&mut canonical, sha256(&body).as_ref());

        let mut string_to_sign = String::with_capacity(160);
        for part in [
            "AWS4-HMAC-SHA256\n",
            &amz_date,
            "\n",
            date,
            &self.scope_tail,
            "\n",
        ] {
            string_to_sign.push_str(part);
        }
        push_hex(&mut string_to_sign, sha256(canonical.as_bytes()).as_ref());
        let signature = v4::calculate_signature(signer.key, string_to_sign.as_bytes());

        let mut authorization = String::with_capacity(240);
        for part in [
            "AWS4-HMAC-SHA256 Credential=",
            credentials.access_key_id(),
            "/",
            date,
            &self.scope_tail,
            ", SignedHeaders=",
            signed_headers,
            ", Signature=",
            &signature,
        ] {
            authorization.push_str(part);
        }

        let mut request = self.template.try_clone().expect("an empty body clones");
        *request.body_mut() = SdkBody::from(body);
        let headers = request.headers_mut();
        headers.try_insert("content-length", length)?;
        headers.try_insert("x-amz-date", amz_date)?;
        if let Some(token) = token {
            headers.try_insert("x-amz-security-token", token.to_owned())?;
        }
        headers.try_insert("authorization", authorization)?;
        Ok(request)
    }

    fn now(&self) -> SystemTime {
        self.components
            .time_source()
            .map_or_else(SystemTime::now, |t| t.now())
    }

    fn signing_time(&self) -> SystemTime {
        let now = self.now();
        match self.clock_skew.as_ref().map(|s| s.load(Ordering::Relaxed)) {
            Some(ms) if ms > 0 => now + Duration::from_millis(ms.unsigned_abs()),
            Some(ms) if ms < 0 => now
                .checked_sub(Duration::from_millis(ms.unsigned_abs()))
                .unwrap_or(now),
            _ => now,
        }
    }

    /// The SDK's `ServiceClockSkewInterceptor`: the server's `Date` against the midpoint
    /// of the request, unless the answer came from a cache or took too long.
    fn measure_clock_skew(&self, response: &HttpResponse, sent_at: SystemTime) {
        let Some(skew) = &self.clock_skew else {
            return;
        };
        if response.headers().get("age").is_some() {
            return;
        }
        let Some(server) = response
            .headers()
            .get("date")
            .and_then(|d| DateTime::from_str(d, Format::HttpDate).ok())
            .and_then(|d| SystemTime::try_from(d).ok())
        else {
            return;
        };
        let elapsed = self.now().duration_since(sent_at).unwrap_or_default();
        if elapsed > MAX_TRUSTED_REQUEST_DURATION {
            return;
        }
        let midpoint = sent_at + elapsed / 2;
        let ms = match server.duration_since(midpoint) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        skew.store(ms, Ordering::Relaxed);
    }
}

/// `{"ShardIterator":"…","Limit":N}`, what the SDK's serializer writes.
fn request_body(iterator: &str, limit: i32) -> Bytes {
    let mut body = Vec::with_capacity(iterator.len() + 48);
    body.extend_from_slice(br#"{"ShardIterator":"#);
    serde_json::to_writer(&mut body, iterator).expect("a string serializes");
    write!(body, r#","Limit":{limit}}}"#).expect("a Vec takes it");
    Bytes::from(body)
}

/// SHA-256 (ring's, through rustls: aws-sigv4 keeps its own private).
fn sha256(data: &[u8]) -> impl AsRef<[u8]> {
    match rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256 {
        rustls::SupportedCipherSuite::Tls13(suite) => suite.common.hash_provider.hash(data),
        _ => unreachable!("a TLS 1.3 suite"),
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYYMMDD'T'HHMMSS'Z'` (UTC), SigV4's x-amz-date.
fn amz_date(unix_seconds: u64) -> String {
    let (days, secs) = (unix_seconds / 86_400, unix_seconds % 86_400);
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Answers that mean the credentials were refused (rather than the request).
fn auth_error(code: Option<&str>, status: u16) -> bool {
    status == 403
        || matches!(
            code,
            Some(
                "ExpiredTokenException"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "IncompleteSignatureException"
                    | "MissingAuthenticationTokenException"
            )
        )
}

fn dispatch_failure(err: BoxError) -> SdkError<GetRecordsError, HttpResponse> {
    SdkError::dispatch_failure(ConnectorError::other(err, None))
}

/// The orchestrator's mapping of a non-operation deserialization error (the deserialization
/// phase: a response error, unless it is a timeout or connector error).
fn orchestrator_error(
    err: OrchestratorError<Taken>,
    response: HttpResponse,
) -> SdkError<GetRecordsError, HttpResponse> {
    if err.is_timeout_error() {
        SdkError::timeout_error(err)
    } else if err.is_connector_error() {
        dispatch_failure(err.into())
    } else {
        SdkError::response_error(err, response)
    }
}

/// Stands in for the operation error taken out of an [`OrchestratorError`].
#[derive(Debug)]
struct Taken;

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("operation error")
    }
}

impl std::error::Error for Taken {}

/// The attempt took longer than the config's operation attempt timeout.
#[derive(Debug)]
struct AttemptTimeout(Duration);

impl std::fmt::Display for AttemptTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GetRecords attempt timeout occurred after {:?}", self.0)
    }
}

impl std::error::Error for AttemptTimeout {}

/// What one aborted SDK call shows of the client.
#[derive(Debug)]
struct Captured {
    components: RuntimeComponents,
    endpoint_url: String,
    endpoint_headers: Vec<(String, String)>,
    /// The operation's timeouts (the client's, with the SDK's defaults).
    timeouts: Option<TimeoutConfig>,
}

/// The client's runtime components and resolved endpoint, exactly as its GetRecords calls
/// see them: a GetRecords call whose interceptor takes them before serialization and stops
/// the call there (nothing is sent). `Config` has no public getter for its identity
/// resolver (`credentials_provider()` always returns `None`), so this is the public way.
/// Up to that point the orchestrator does not wait on anything, so one poll completes it.
fn capture(streams: &aws_sdk_dynamodbstreams::Client) -> Option<Captured> {
    let slot = Arc::new(Mutex::new(None));
    let call = streams
        .get_records()
        .shard_iterator("dynamodb-cdc-lean-get-records-probe")
        .customize()
        .interceptor(Capture(slot.clone()))
        .send();
    let poll = pin!(call).poll(&mut Context::from_waker(Waker::noop()));
    if !matches!(poll, Poll::Ready(Err(SdkError::ConstructionFailure(_)))) {
        return None;
    }
    let captured = slot.lock().ok()?.take();
    captured
}

#[derive(Debug)]
struct Capture(Arc<Mutex<Option<Captured>>>);

impl Intercept for Capture {
    fn name(&self) -> &'static str {
        "DynamodbCdcLeanGetRecordsCapture"
    }

    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let resolver = runtime_components.endpoint_resolver();
        let endpoint = cfg.load::<EndpointResolverParams>().and_then(|params| {
            // The SDK's resolver answers at once (a ready future).
            let resolving = resolver.resolve_endpoint(params);
            match pin!(resolving).poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(endpoint)) => Some(endpoint),
                _ => None,
            }
        });
        // Endpoints that carry signing overrides (auth schemes) stay on the SDK path.
        if let Some(endpoint) = endpoint.filter(|e| e.properties().is_empty()) {
            let endpoint_headers = endpoint
                .headers()
                .flat_map(|(name, values)| values.map(move |v| (name.to_owned(), v.to_owned())))
                .collect();
            *self.0.lock().expect("capture slot") = Some(Captured {
                components: runtime_components.clone(),
                endpoint_url: endpoint.url().to_owned(),
                endpoint_headers,
                timeouts: cfg.load::<TimeoutConfig>().cloned(),
            });
        }
        Err("dynamodb-cdc: runtime components captured; this call is never sent".into())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::AtomicUsize;

    use aws_credential_types::provider::{future, ProvideCredentials};
    use aws_sdk_dynamodbstreams::config::retry::RetryConfig;
    use aws_sdk_dynamodbstreams::config::{IdentityCache, Region};
    use aws_smithy_runtime_api::client::http::{http_client_fn, HttpConnectorFuture};
    use aws_smithy_runtime_api::http::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};

    use super::super::fast_path::{fast_path_client, PageSlot};
    use super::*;
    use crate::convert::Source;
    use crate::error::{classify_aws, AwsErrorKind};

    /// A request as the connector got it.
    #[derive(Debug, Clone)]
    struct Sent {
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    enum Answer {
        Status(u16, &'static str, String),
        Hang,
        Refused,
    }

    /// Records each request and answers with the next canned answer.
    #[derive(Clone, Default)]
    struct Canned {
        answers: Arc<Mutex<VecDeque<Answer>>>,
        sent: Arc<Mutex<Vec<Sent>>>,
    }

    impl std::fmt::Debug for Canned {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Canned")
        }
    }

    impl Canned {
        fn push(&self, answer: Answer) -> &Self {
            self.answers.lock().unwrap().push_back(answer);
            self
        }

        fn json(&self, status: u16, body: impl Into<String>) -> &Self {
            self.push(Answer::Status(status, CONTENT_TYPE, body.into()))
        }

        fn last(&self) -> Sent {
            self.sent
                .lock()
                .unwrap()
                .last()
                .cloned()
                .expect("a request")
        }
    }

    impl HttpConnector for Canned {
        fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
            self.sent.lock().unwrap().push(Sent {
                headers: request
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                body: request.body().bytes().unwrap().to_vec(),
            });
            match self.answers.lock().unwrap().pop_front().expect("an answer") {
                Answer::Status(status, content_type, body) => {
                    let mut response = HttpResponse::new(
                        StatusCode::try_from(status).unwrap(),
                        SdkBody::from(body),
                    );
                    response.headers_mut().insert("content-type", content_type);
                    HttpConnectorFuture::ready(Ok(response))
                }
                Answer::Hang => HttpConnectorFuture::new(std::future::pending()),
                Answer::Refused => {
                    HttpConnectorFuture::ready(Err(ConnectorError::io("connection refused".into())))
                }
            }
        }
    }

    /// Counts how often credentials are asked for.
    #[derive(Debug, Clone)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        session_token: Option<&'static str>,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                "AKID",
                "secret",
                self.session_token.map(str::to_owned),
                None,
                "test",
            )))
        }
    }

    fn counting(session_token: Option<&'static str>) -> Counting {
        Counting {
            calls: Arc::default(),
            session_token,
        }
    }

    /// A client like `crate::aws` builds: no SDK retries, an attempt timeout, and an
    /// identity cache that does not cache (the role session's refresher owns it).
    fn client(
        connector: Option<&Canned>,
        credentials: &Counting,
        endpoint: &str,
        attempt_timeout: Duration,
    ) -> aws_sdk_dynamodbstreams::Client {
        let mut config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(credentials.clone())
            .identity_cache(IdentityCache::no_cache())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(attempt_timeout)
                    .build(),
            )
            .endpoint_url(endpoint);
        if let Some(connector) = connector {
            let connector = connector.clone();
            config = config.http_client(http_client_fn(move |_, _| {
                SharedHttpConnector::new(connector.clone())
            }));
        }
        aws_sdk_dynamodbstreams::Client::from_conf(config.build())
    }

    fn fast_path_config(slot: &PageSlot) -> FastPathConfig {
        FastPathConfig {
            slot: slot.clone(),
            source: Source {
                table: "orders".into(),
                stream_arn: "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/1".into(),
                shard_id: "shardId-1".into(),
            },
            tombstones: true,
            max_message_bytes: 1 << 20,
        }
    }

    struct Setup {
        canned: Canned,
        credentials: Counting,
        streams: aws_sdk_dynamodbstreams::Client,
        slot: PageSlot,
        lean: LeanGetRecords,
    }

    fn setup(session_token: Option<&'static str>) -> Setup {
        let canned = Canned::default();
        let credentials = counting(session_token);
        let streams = client(
            Some(&canned),
            &credentials,
            "http://127.0.0.1:1",
            Duration::from_secs(10),
        );
        let slot = PageSlot::default();
        let lean = LeanGetRecords::new(&streams, fast_path_config(&slot)).expect("lean path");
        Setup {
            canned,
            credentials,
            streams,
            slot,
            lean,
        }
    }

    const RECORD: &str = r#"{"eventID":"e1","eventName":"MODIFY","eventVersion":"1.1","eventSource":"aws:dynamodb","awsRegion":"us-east-1","dynamodb":{"ApproximateCreationDateTime":1795452116.5,"Keys":{"pk":{"S":"k1"}},"NewImage":{"pk":{"S":"k1"},"n":{"N":"5"}},"SequenceNumber":"100000000000000000001","SizeBytes":20,"StreamViewType":"NEW_AND_OLD_IMAGES"}}"#;

    fn page(records: &[&str], next: Option<&str>) -> String {
        let next = next.map_or(String::new(), |n| format!(r#","NextShardIterator":"{n}""#));
        format!(r#"{{"Records":[{}]{next}}}"#, records.join(","))
    }

    #[test]
    fn lean_get_records_is_send_and_sync() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        let s = setup(None);
        send_sync(&s.lean);
        send(s.lean.get_records("it", 1));
    }

    #[tokio::test]
    async fn the_request_is_the_sdks_and_signed() {
        let s = setup(Some("session-token"));
        let iterator = "arn:aws:dynamodb:us-east-1:1:table/t/stream/1|1|AAA\"quote\\slash\u{1}é";
        s.canned.json(200, page(&[], Some("it-2")));
        s.lean.get_records(iterator, 7).await.unwrap();
        let lean = s.canned.last();

        let h = &lean.headers;
        assert_eq!(
            h["x-amz-target"], "DynamoDBStreams_20120810.GetRecords",
            "{h:?}"
        );
        assert_eq!(h["content-type"], "application/x-amz-json-1.0");
        assert_eq!(h["content-length"], lean.body.len().to_string());
        assert!(h["user-agent"].starts_with("dynamodb-cdc/"), "{h:?}");
        assert!(h["x-amz-user-agent"].starts_with("dynamodb-cdc/"), "{h:?}");
        assert_eq!(h["x-amz-security-token"], "session-token");
        assert!(h.contains_key("x-amz-date"), "{h:?}");
        let auth = &h["authorization"];
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/")
                && auth.contains("/us-east-1/dynamodb/aws4_request, SignedHeaders=")
                && auth.contains(";x-amz-security-token;")
                && auth.contains(";x-amz-target;"),
            "{auth}"
        );

        let json: serde_json::Value = serde_json::from_slice(&lean.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"ShardIterator": iterator, "Limit": 7})
        );
        // Byte for byte what the SDK's serializer writes.
        s.canned.json(200, page(&[], Some("it-2")));
        s.streams
            .get_records()
            .shard_iterator(iterator)
            .limit(7)
            .send()
            .await
            .unwrap();
        let sdk = s.canned.last();
        assert_eq!(
            String::from_utf8(lean.body).unwrap(),
            String::from_utf8(sdk.body).unwrap()
        );
        for name in ["x-amz-target", "content-type", "x-amz-security-token"] {
            assert_eq!(h[name], sdk.headers[name], "{name}");
        }
    }

    #[tokio::test]
    async fn without_a_session_token_none_is_sent() {
        let s = setup(None);
        s.canned.json(200, page(&[], Some("it-2")));
        s.lean.get_records("it-1", 1000).await.unwrap();
        let sent = s.canned.last();
        assert!(!sent.headers.contains_key("x-amz-security-token"));
        assert!(!sent.headers["authorization"].contains("x-amz-security-token"));
    }

    #[tokio::test]
    async fn a_page_goes_through_the_fast_path() {
        let s = setup(None);
        let body = page(&[RECORD], Some("it-2"));
        s.canned.json(200, body.clone()).json(200, page(&[], None));

        let out = s.lean.get_records("it-1", 100).await.unwrap();
        assert!(out.records().is_empty(), "records come through the slot");
        assert_eq!(out.next_shard_iterator(), Some("it-2"));
        let (page, body_len) = s.slot.lock().unwrap().take().expect("converted");
        assert_eq!(body_len, body.len());
        assert_eq!(page.stream_records, 1);
        assert_eq!(page.records.len(), 1);
        assert_eq!(
            page.last_sequence_number.as_deref(),
            Some("100000000000000000001")
        );

        // A closed shard's last page.
        let out = s.lean.get_records("it-2", 100).await.unwrap();
        assert_eq!(out.next_shard_iterator(), None);
        let (page, _) = s.slot.lock().unwrap().take().unwrap();
        assert_eq!((page.stream_records, page.next_shard_iterator), (0, None));
    }

    #[tokio::test]
    async fn a_page_the_fast_path_refuses_gives_the_sdks_records() {
        let s = setup(None);
        let poison = RECORD.replace(r#"{"N":"5"}"#, r#"{"N":"5,0"}"#);
        // The slot is emptied at each call, even when a page is left in it.
        *s.slot.lock().unwrap() = Some((
            convert::convert_page(
                page(&[], None).as_bytes(),
                &fast_path_config(&s.slot).source,
                true,
                1 << 20,
            )
            .unwrap(),
            1,
        ));
        s.canned.json(200, page(&[RECORD, &poison], Some("it-2")));
        let out = s.lean.get_records("it-1", 100).await.unwrap();
        assert_eq!(out.records().len(), 2);
        assert_eq!(out.next_shard_iterator(), Some("it-2"));
        assert_eq!(
            out.records()[1]
                .dynamodb()
                .and_then(|d| d.sequence_number()),
            Some("100000000000000000001")
        );
        assert!(s.slot.lock().unwrap().is_none());
    }

    /// Each answer through the lean path and through the SDK (fast path) client: the same
    /// SdkError variant, code and classification.
    #[tokio::test]
    async fn errors_are_the_sdks() {
        let cases: Vec<(Answer, AwsErrorKind, Option<&str>)> = vec![
            (
                Answer::Status(400, CONTENT_TYPE, r#"{"__type":"com.amazonaws.dynamodb.v20120810#ExpiredIteratorException","message":"Iterator expired"}"#.into()),
                AwsErrorKind::ExpiredIterator,
                Some("ExpiredIteratorException"),
            ),
            (
                Answer::Status(400, CONTENT_TYPE, r#"{"__type":"com.amazonaws.dynamodb.v20120810#TrimmedDataAccessException","message":"trimmed"}"#.into()),
                AwsErrorKind::TrimmedData,
                Some("TrimmedDataAccessException"),
            ),
            (
                Answer::Status(400, CONTENT_TYPE, r#"{"__type":"com.amazonaws.dynamodb.v20120810#LimitExceededException","message":"slow down"}"#.into()),
                AwsErrorKind::Throttled,
                Some("LimitExceededException"),
            ),
            (
                Answer::Status(500, CONTENT_TYPE, String::new()),
                AwsErrorKind::Transient,
                None,
            ),
            (
                Answer::Status(503, "text/html", "<html>Service Unavailable</html>".into()),
                AwsErrorKind::Transient,
                None,
            ),
            (
                Answer::Status(429, "text/plain", "Too Many Requests".into()),
                AwsErrorKind::Throttled,
                None,
            ),
            (
                Answer::Status(403, "text/html", "<html>Forbidden</html>".into()),
                AwsErrorKind::Fatal,
                None,
            ),
            (
                Answer::Status(400, CONTENT_TYPE, r#"{"__type":"com.amazon.coral.validate#ValidationException","message":"bad"}"#.into()),
                AwsErrorKind::Fatal,
                Some("ValidationException"),
            ),
            (Answer::Refused, AwsErrorKind::Transient, None),
        ];
        let s = setup(None);
        let sdk_slot = PageSlot::default();
        let sdk = fast_path_client(&s.streams, fast_path_config(&sdk_slot));
        for (answer, kind, code) in cases {
            let name = match &answer {
                Answer::Status(status, _, body) => format!("{status} {body}"),
                Answer::Refused => "refused".into(),
                Answer::Hang => "hang".into(),
            };
            let sdk_answer = match &answer {
                Answer::Status(a, b, c) => Answer::Status(*a, b, c.clone()),
                Answer::Refused => Answer::Refused,
                Answer::Hang => Answer::Hang,
            };
            s.canned.push(answer);
            let lean = s.lean.get_records("it-1", 10).await.unwrap_err();
            s.canned.push(sdk_answer);
            let sdk = sdk
                .get_records()
                .shard_iterator("it-1")
                .limit(10)
                .send()
                .await
                .unwrap_err();
            assert_eq!(classify_aws(&lean), kind, "{name}: {lean:?}");
            assert_eq!(classify_aws(&sdk), kind, "{name}: {sdk:?}");
            assert_eq!(lean.code(), code, "{name}");
            assert_eq!(lean.code(), sdk.code(), "{name}");
            assert_eq!(lean.message(), sdk.message(), "{name}");
            assert_eq!(
                std::mem::discriminant(&lean),
                std::mem::discriminant(&sdk),
                "{name}: {lean:?} / {sdk:?}"
            );
            if let Some(raw) = lean.raw_response() {
                assert_eq!(
                    Some(raw.status().as_u16()),
                    sdk.raw_response().map(|r| r.status().as_u16())
                );
            }
            assert!(s.slot.lock().unwrap().is_none());
        }
        let lean = s.lean.get_records("it-1", 10);
        drop(lean);
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_times_out() {
        let canned = Canned::default();
        let credentials = counting(None);
        let streams = client(
            Some(&canned),
            &credentials,
            "http://127.0.0.1:1",
            Duration::from_millis(200),
        );
        let lean = LeanGetRecords::new(&streams, fast_path_config(&PageSlot::default())).unwrap();
        canned.push(Answer::Hang);
        let started = std::time::Instant::now();
        let err = lean.get_records("it-1", 10).await.unwrap_err();
        assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
        assert_eq!(classify_aws(&err), AwsErrorKind::Transient);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn credentials_are_cached_and_dropped_on_an_auth_error() {
        let s = setup(None);
        let calls = || s.credentials.calls.load(Ordering::SeqCst);
        let before = calls();
        for _ in 0..3 {
            s.canned.json(200, page(&[], Some("it-2")));
            s.lean.get_records("it-1", 10).await.unwrap();
        }
        assert_eq!(calls() - before, 1, "resolved once for three calls");

        for refusal in [
            (
                400,
                r#"{"__type":"com.amazon.coral.service#UnrecognizedClientException","message":"The security token included in the request is invalid."}"#,
            ),
            (
                400,
                r#"{"__type":"com.amazon.coral.service#ExpiredTokenException","message":"The security token included in the request is expired"}"#,
            ),
            (
                400,
                r#"{"__type":"com.amazon.coral.service#InvalidSignatureException","message":"Signature expired"}"#,
            ),
            (403, "<html>Forbidden</html>"),
        ] {
            let before = calls();
            s.canned.json(refusal.0, refusal.1);
            s.lean.get_records("it-1", 10).await.unwrap_err();
            for _ in 0..2 {
                s.canned.json(200, page(&[], Some("it-2")));
                s.lean.get_records("it-1", 10).await.unwrap();
            }
            assert_eq!(calls() - before, 1, "resolved again after {refusal:?}");
        }

        // Other errors keep the credentials.
        let before = calls();
        s.canned.json(400, r#"{"__type":"com.amazonaws.dynamodb.v20120810#ExpiredIteratorException","message":"x"}"#);
        s.lean.get_records("it-1", 10).await.unwrap_err();
        s.canned.json(200, page(&[], Some("it-2")));
        s.lean.get_records("it-1", 10).await.unwrap();
        assert_eq!(calls(), before);
    }

    #[test]
    fn cached_credentials_are_refreshed_by_age_and_before_expiry() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let creds = |expiry: Option<SystemTime>| {
            Identity::from(Credentials::new("AKID", "secret", None, expiry, "test"))
        };
        let s = Duration::from_secs;

        let forever = CachedIdentity::new(creds(None), t0);
        assert!(forever.fresh(t0 + s(59)));
        assert!(!forever.fresh(t0 + s(60)));
        assert!(!forever.fresh(t0 - s(1)), "the clock went back");

        let hour = CachedIdentity::new(creds(Some(t0 + s(3600))), t0);
        assert!(hour.fresh(t0 + s(59)) && !hour.fresh(t0 + s(60)));

        let six_minutes = CachedIdentity::new(creds(Some(t0 + s(360))), t0);
        assert!(six_minutes.fresh(t0 + s(59)) && !six_minutes.fresh(t0 + s(60)));
        let four_minutes = CachedIdentity::new(creds(Some(t0 + s(240))), t0);
        assert!(four_minutes.fresh(t0 + s(4)), "not asked again at once");
        assert!(!four_minutes.fresh(t0 + s(5)));
        let expired = CachedIdentity::new(creds(Some(t0 + s(2))), t0);
        assert!(expired.fresh(t0 + s(1)) && !expired.fresh(t0 + s(2)));
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = setup(Some("the-session-token"));
        let identity = Identity::from(Credentials::new(
            "AKIDSECRETID",
            "the-secret-key",
            Some("the-session-token".into()),
            None,
            "test",
        ));
        *s.lean.credentials.lock().unwrap() =
            Some(CachedIdentity::new(identity, SystemTime::now()));
        let debug = format!("{:?}", s.lean);
        for secret in ["AKIDSECRETID", "the-secret-key", "the-session-token"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("http://127.0.0.1:1/"), "{debug}");
    }

    #[test]
    fn without_a_region_the_sdk_path_stays() {
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
            .credentials_provider(counting(None))
            .endpoint_url("http://127.0.0.1:1")
            .build();
        let streams = aws_sdk_dynamodbstreams::Client::from_conf(config);
        assert!(LeanGetRecords::new(&streams, fast_path_config(&PageSlot::default())).is_none());
    }

    #[test]
    fn the_endpoint_is_the_sdks() {
        let config = aws_sdk_dynamodbstreams::Config::builder()
            .behavior_version(aws_sdk_dynamodbstreams::config::BehaviorVersion::latest())
            .region(Region::new("cn-north-1"))
            .credentials_provider(counting(None))
            .build();
        let streams = aws_sdk_dynamodbstreams::Client::from_conf(config);
        let lean = LeanGetRecords::new(&streams, fast_path_config(&PageSlot::default())).unwrap();
        assert_eq!(
            lean.uri_string,
            "https://streams.dynamodb.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            (lean.region.as_str(), lean.signing_name),
            ("cn-north-1", "dynamodb")
        );
        assert_eq!(lean.attempt_timeout, DEFAULT_ATTEMPT_TIMEOUT);
    }

    #[test]
    fn amz_date_is_utc() {
        for secs in [
            0u64,
            951_782_400, // 2000-02-29
            1_709_251_199,
            1_735_689_599,
            4_107_542_400, // 2100-03-01
            1_800_000_000,
        ] {
            let expected = chrono::DateTime::from_timestamp(secs as i64, 0)
                .unwrap()
                .format("%Y%m%dT%H%M%SZ")
                .to_string();
            assert_eq!(amz_date(secs), expected, "{secs}");
        }
    }

    /// The hand-written canonical request signs what aws-sigv4's own signer signs, with
    /// and without a session token, at a day boundary too.
    #[test]
    fn the_signature_is_aws_sigv4s() {
        for token in [None, Some("the-session-token")] {
            let s = setup(token);
            let identity = Identity::from(Credentials::new(
                "AKID",
                "secret",
                token.map(str::to_owned),
                None,
                "test",
            ));
            let mut cached = CachedIdentity::new(identity.clone(), SystemTime::now());
            for secs in [1_800_000_000u64, 1_800_057_599, 1_800_057_600] {
                let time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                let signer = cached.signer(time, "us-east-1", "dynamodb");
                let body = request_body("it\"1", 1000);
                let request = s.lean.signed_request(body.clone(), &signer, time).unwrap();
                let headers: Vec<(String, String)> = request
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let params = v4::SigningParams::builder()
                    .identity(&identity)
                    .region("us-east-1")
                    .name("dynamodb")
                    .time(time)
                    .settings(SigningSettings::default())
                    .build()
                    .unwrap()
                    .into();
                let signable = SignableRequest::new(
                    "POST",
                    "http://127.0.0.1:1/",
                    headers
                        .iter()
                        .filter(|(k, _)| {
                            !["authorization", "x-amz-date", "x-amz-security-token"]
                                .contains(&k.as_str())
                        })
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                    SignableBody::Bytes(&body),
                )
                .unwrap();
                let (instructions, _) = sign(signable, &params).unwrap().into_parts();
                let expected: HashMap<&str, &str> = instructions.headers().collect();
                let got: HashMap<&str, &str> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                for name in ["authorization", "x-amz-date"] {
                    assert_eq!(got[name], expected[name], "{name} {token:?} {secs}");
                }
                assert_eq!(
                    got.get("x-amz-security-token"),
                    expected.get("x-amz-security-token")
                );
                assert_eq!(
                    signer.key.as_slice(),
                    v4::generate_signing_key("secret", time, "us-east-1", "dynamodb").as_ref()
                );
            }
        }
    }

    /// A request as a socket got it.
    #[derive(Debug, Clone)]
    struct Received {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1: answers every request with `body` (keeping
    /// the connection), or never answers when `hang`.
    struct Server {
        port: u16,
        connections: Arc<AtomicUsize>,
        received: Arc<Mutex<Vec<Received>>>,
    }

    async fn server(body: &'static str, hang: bool) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(request) = read_request(&mut socket, &mut buf).await else {
                            return;
                        };
                        r.lock().unwrap().push(request);
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Server {
            port,
            connections,
            received,
        }
    }

    async fn read_request(
        socket: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
    ) -> Option<Received> {
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        let headers: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        while buf.len() < end + 4 + len {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[end + 4..end + 4 + len].to_vec();
        buf.drain(..end + 4 + len);
        Some(Received { headers, body })
    }

    /// Checks a received request's signature the way the service does: the canonical
    /// request rebuilt from the signed headers as they arrived.
    fn verify_signature(request: &Received, port: u16, session_token: Option<&str>) {
        let get = |name: &str| {
            request
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let auth = get("authorization").expect("signed");
        let signed: Vec<&str> = auth
            .split("SignedHeaders=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .split(';')
            .collect();
        assert!(signed.contains(&"host"), "{auth}");
        let signature = auth.split("Signature=").nth(1).unwrap();
        let date = get("x-amz-date").unwrap();
        let time = chrono::NaiveDateTime::parse_from_str(date, "%Y%m%dT%H%M%SZ")
            .unwrap()
            .and_utc();
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(time.timestamp() as u64);
        let identity = Identity::from(Credentials::new(
            "AKID",
            "secret",
            session_token.map(str::to_owned),
            None,
            "test",
        ));
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("dynamodb")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = request
            .headers
            .iter()
            .filter(|(k, _)| signed.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let uri = format!("http://127.0.0.1:{port}/");
        let signable =
            SignableRequest::new("POST", uri, headers, SignableBody::Bytes(&request.body)).unwrap();
        let (_, expected) = sign(signable, &params).unwrap().into_parts();
        assert_eq!(signature, expected, "{:?}", request.headers);
    }

    #[tokio::test]
    async fn over_http_one_pooled_connection_and_a_valid_signature() {
        let server = server(r#"{"Records":[],"NextShardIterator":"x"}"#, false).await;
        let credentials = counting(Some("tok"));
        let streams = client(
            None,
            &credentials,
            &format!("http://127.0.0.1:{}", server.port),
            Duration::from_secs(10),
        );
        let slot = PageSlot::default();
        let lean = LeanGetRecords::new(&streams, fast_path_config(&slot)).unwrap();
        for _ in 0..3 {
            let out = lean.get_records("it-1", 10).await.unwrap();
            assert_eq!(out.next_shard_iterator(), Some("x"));
            assert!(slot.lock().unwrap().take().is_some());
        }
        // The SDK's own calls share the pool.
        streams
            .get_records()
            .shard_iterator("it-1")
            .send()
            .await
            .unwrap();
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        let received = server.received.lock().unwrap().clone();
        assert_eq!(received.len(), 4);
        for request in &received[..3] {
            verify_signature(request, server.port, Some("tok"));
        }
        // The SDK signs the same way (the check above holds for its request too).
        verify_signature(&received[3], server.port, Some("tok"));
    }

    #[tokio::test]
    async fn over_http_a_silent_server_times_out_and_a_closed_port_fails_dispatch() {
        let server = server("", true).await;
        let credentials = counting(None);
        let streams = client(
            None,
            &credentials,
            &format!("http://127.0.0.1:{}", server.port),
            Duration::from_millis(300),
        );
        let lean = LeanGetRecords::new(&streams, fast_path_config(&PageSlot::default())).unwrap();
        let err = lean.get_records("it-1", 10).await.unwrap_err();
        assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
        assert_eq!(classify_aws(&err), AwsErrorKind::Transient);

        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let streams = client(
            None,
            &credentials,
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(5),
        );
        let lean = LeanGetRecords::new(&streams, fast_path_config(&PageSlot::default())).unwrap();
        let err = lean.get_records("it-1", 10).await.unwrap_err();
        assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
        assert_eq!(classify_aws(&err), AwsErrorKind::Transient);
        let sdk = streams
            .get_records()
            .shard_iterator("it-1")
            .send()
            .await
            .unwrap_err();
        assert!(matches!(sdk, SdkError::DispatchFailure(_)), "{sdk:?}");
    }
}
