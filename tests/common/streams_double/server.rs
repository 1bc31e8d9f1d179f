//! The HTTP side: a hyper HTTP/1.1 server that answers AWS JSON 1.0 (`X-Amz-Target`: DynamoDB
//! Streams, DynamoDB `DescribeTable` and `Scan`) and
//! the STS query protocol (`Action=AssumeRole`), applies scripted faults, and records every
//! call.
//!
//! ```text
//! request ─▶ parse (op, shard) ─▶ in-flight count ─▶ expired session? ─▶ fault? ─▶ execute
//!                                                                                   │
//! call recorded ◀── response (JSON / XML / truncated / dropped connection) ◀────────┘
//! ```

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};

use super::model::{self, ApiError, Iterator, Shared};
use super::render;
use super::{AssumeRoleCall, Call, FaultKind};

/// A response body: whole, or cut short: the first chunk is sent (and flushed, during a
/// short pause), then the body fails and hyper aborts the connection before the declared
/// length.
#[derive(Debug)]
pub(super) enum Body {
    Full(Option<Bytes>),
    Truncated {
        chunk: Option<Bytes>,
        declared: u64,
        pause: Pin<Box<tokio::time::Sleep>>,
    },
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Truncated { chunk, pause, .. } => {
                if let Some(c) = chunk.take() {
                    return Poll::Ready(Some(Ok(Frame::data(c))));
                }
                // Pending lets hyper flush the chunk before the failure aborts the connection.
                std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
                Poll::Ready(Some(Err(std::io::Error::other(
                    "response truncated by the streams double",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Truncated { declared, .. } => SizeHint::with_exact(*declared),
        }
    }
}

/// Accepts connections until `shutdown` fires.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors or similar: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// AWS JSON 1.0: DynamoDB and DynamoDB Streams.
    Json,
    /// The query protocol: STS.
    Query,
}

/// What an operation produced.
enum Outcome {
    Reply {
        status: u16,
        body: Body,
        error_code: Option<String>,
    },
    /// Close the connection without answering.
    Drop,
}

/// Counts a call on a shard while it runs.
struct InFlight {
    shared: Arc<Shared>,
    shard: String,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, shard: &str) -> (Self, usize) {
        let mut state = shared.lock();
        let n = state.inflight.entry(shard.to_owned()).or_default();
        *n += 1;
        let now = *n;
        state.max_inflight = state.max_inflight.max(now);
        (
            Self {
                shared: shared.clone(),
                shard: shard.to_owned(),
            },
            now,
        )
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(n) = state.inflight.get_mut(&self.shard) {
            *n -= 1;
            if *n == 0 {
                state.inflight.remove(&self.shard);
            }
        }
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The access key id of a SigV4 `Authorization` header.
fn access_key_id(authorization: &str) -> Option<String> {
    let rest = &authorization[authorization.find("Credential=")? + "Credential=".len()..];
    Some(rest[..rest.find('/')?].to_owned())
}

fn url_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn form_get<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let at = Instant::now();
    let target = header(&req, "x-amz-target");
    let signer = header(&req, "authorization").and_then(|a| access_key_id(&a));
    let raw = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();

    let (protocol, op) = match &target {
        Some(t) => (
            Protocol::Json,
            t.rsplit_once('.')
                .map_or(t.as_str(), |(_, op)| op)
                .to_owned(),
        ),
        None => {
            let f = form(&raw);
            (
                Protocol::Query,
                form_get(&f, "Action").unwrap_or("").to_owned(),
            )
        }
    };
    let mut call = Call::new(&op, at);
    call.access_key_id = signer.clone();

    let mut json_body = Value::Null;
    let mut iterator: Option<Iterator> = None;
    let mut parse_error = None;
    match protocol {
        Protocol::Json => match serde_json::from_slice::<Value>(&raw) {
            Ok(v) => json_body = v,
            Err(e) => {
                parse_error = Some(ApiError::new(
                    400,
                    "SerializationException",
                    format!("request body is not JSON: {e}"),
                ))
            }
        },
        Protocol::Query => {
            if op == "AssumeRole" {
                call.assume_role = Some(assume_role_call(&form(&raw), &call));
            }
        }
    }
    let s = |name: &str| model::opt_str(&json_body, name).map(str::to_owned);
    call.table = s("TableName");
    call.stream_arn = s("StreamArn");
    call.shard_id = s("ShardId");
    call.iterator_type = s("ShardIteratorType");
    call.sequence_number = s("SequenceNumber");
    call.exclusive_start_shard_id = s("ExclusiveStartShardId");
    call.limit = json_body.get("Limit").and_then(Value::as_i64);
    if let Some(f) = json_body.get("ShardFilter") {
        call.shard_id = model::opt_str(f, "ShardId").map(str::to_owned);
    }
    if op == "Scan" {
        call.segment = json_body.get("Segment").and_then(Value::as_i64);
        call.total_segments = json_body.get("TotalSegments").and_then(Value::as_i64);
        call.exclusive_start_key = json_body
            .get("ExclusiveStartKey")
            .filter(|k| !k.is_null())
            .cloned();
        call.consistent_read = json_body.get("ConsistentRead").and_then(Value::as_bool);
    }
    if op == "GetRecords" {
        iterator = model::opt_str(&json_body, "ShardIterator").and_then(Iterator::decode);
        if let Some(it) = &iterator {
            call.shard_id = Some(it.shard_id.clone());
            call.position = Some(it.position.to_string());
        }
    }

    let shard_call = matches!(op.as_str(), "GetRecords" | "GetShardIterator");
    let _inflight = match (&call.shard_id, shard_call) {
        (Some(shard), true) => {
            let (guard, now) = InFlight::enter(&shared, shard);
            call.concurrent_on_shard = now;
            Some(guard)
        }
        _ => None,
    };

    let outcome = if let Some(err) = parse_error {
        error_outcome(protocol, &err)
    } else if let Some(err) = expired_session(&shared, signer.as_deref()) {
        error_outcome(protocol, &err)
    } else {
        let fault = pick_fault(&shared, &op, call.shard_id.as_deref(), call.segment);
        call.fault = fault.as_ref().map(|k| k.name().to_owned());
        match fault {
            None => execute(
                &shared,
                protocol,
                &op,
                &json_body,
                iterator.as_ref(),
                &mut call,
                false,
            ),
            Some(FaultKind::Slow(delay)) => {
                tokio::time::sleep(delay).await;
                execute(
                    &shared,
                    protocol,
                    &op,
                    &json_body,
                    iterator.as_ref(),
                    &mut call,
                    false,
                )
            }
            Some(FaultKind::Drop) => Outcome::Drop,
            Some(FaultKind::Malformed(body)) => Outcome::Reply {
                status: 200,
                body: Body::Full(Some(Bytes::from(body))),
                error_code: None,
            },
            Some(FaultKind::Truncated) => {
                match execute(
                    &shared,
                    protocol,
                    &op,
                    &json_body,
                    iterator.as_ref(),
                    &mut call,
                    true,
                ) {
                    Outcome::Reply {
                        status,
                        body: Body::Full(Some(full)),
                        error_code,
                    } => Outcome::Reply {
                        status,
                        body: Body::Truncated {
                            declared: full.len() as u64,
                            chunk: Some(full.slice(..full.len() / 2)),
                            pause: Box::pin(tokio::time::sleep(std::time::Duration::from_millis(
                                20,
                            ))),
                        },
                        error_code,
                    },
                    other => other,
                }
            }
            Some(kind) => error_outcome(protocol, &fault_error(protocol, &op, &kind)),
        }
    };

    call.elapsed = at.elapsed();
    let result = match outcome {
        Outcome::Drop => {
            call.status = 0;
            Err(std::io::Error::other(
                "connection dropped by the streams double",
            ))
        }
        Outcome::Reply {
            status,
            body,
            error_code,
        } => {
            call.status = status;
            call.error_code = error_code;
            let content_type = match protocol {
                Protocol::Json => "application/x-amz-json-1.0",
                Protocol::Query => "text/xml",
            };
            Ok(Response::builder()
                .status(status)
                .header("content-type", content_type)
                .header("x-amzn-requestid", request_id(&call))
                .body(body)
                .expect("valid response"))
        }
    };
    if let Some(assume) = &mut call.assume_role {
        assume.status = call.status;
        assume.error_code = call.error_code.clone();
    }
    let mut state = shared.lock();
    if let Some(assume) = &call.assume_role {
        state.sts.calls.push(assume.clone());
    }
    if state.record_calls {
        state.calls.push(call);
    }
    result
}

fn assume_role_call(form: &[(String, String)], call: &Call) -> AssumeRoleCall {
    AssumeRoleCall {
        role_arn: form_get(form, "RoleArn").unwrap_or_default().to_owned(),
        role_session_name: form_get(form, "RoleSessionName")
            .unwrap_or_default()
            .to_owned(),
        external_id: form_get(form, "ExternalId").map(str::to_owned),
        duration_seconds: form_get(form, "DurationSeconds").and_then(|d| d.parse().ok()),
        signed_with: call.access_key_id.clone(),
        at: call.at,
        issued_access_key_id: None,
        expiration: None,
        status: 0,
        error_code: None,
    }
}

fn request_id(call: &Call) -> String {
    format!("{:032x}", call.at.elapsed().as_nanos() ^ 0x5eed_1234_5678)
}

/// A request signed with a session the double issued and that has expired.
fn expired_session(shared: &Shared, signer: Option<&str>) -> Option<ApiError> {
    let signer = signer?;
    let state = shared.lock();
    if !state.sts.reject_expired_sessions {
        return None;
    }
    let expiry = *state.sts.sessions.get(signer)?;
    (expiry <= chrono::Utc::now().timestamp_millis()).then(|| {
        ApiError::new(
            400,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        )
    })
}

/// The first fault that matches the call and fires (probability); spends one of its uses.
fn pick_fault(
    shared: &Shared,
    op: &str,
    shard: Option<&str>,
    segment: Option<i64>,
) -> Option<FaultKind> {
    let mut state = shared.lock();
    if state.faults.is_empty() {
        return None;
    }
    let now = Instant::now();
    state
        .faults
        .retain(|f| f.fault.remaining != Some(0) && f.fault.until.is_none_or(|u| now < u));
    let mut fired = None;
    for f in state.faults.iter_mut() {
        let fault = &mut f.fault;
        let matches = fault.op.as_deref().is_none_or(|o| o == op)
            && fault.shard.as_deref().is_none_or(|s| Some(s) == shard)
            && fault.segment.is_none_or(|s| Some(s) == segment)
            && fault.from.is_none_or(|from| from <= now);
        if !matches || rand::random::<f64>() >= fault.probability {
            continue;
        }
        if let Some(n) = &mut fault.remaining {
            *n -= 1;
        }
        fired = Some(fault.kind.clone());
        break;
    }
    state.faults.retain(|f| f.fault.remaining != Some(0));
    fired
}

/// The error a fault kind answers with.
fn fault_error(protocol: Protocol, op: &str, kind: &FaultKind) -> ApiError {
    let query = protocol == Protocol::Query;
    match kind {
        FaultKind::Throttle if query => ApiError::new(400, "Throttling", "Rate exceeded"),
        FaultKind::Throttle if op == "DescribeTable" => ApiError::new(
            400,
            "ThrottlingException",
            "Rate of requests exceeds the allowed throughput",
        ),
        FaultKind::Throttle if op == "Scan" => ApiError::new(
            400,
            "ProvisionedThroughputExceededException",
            "The level of configured provisioned throughput for the table was exceeded. Consider increasing your provisioning level with the UpdateTable API.",
        ),
        FaultKind::Throttle => {
            ApiError::new(400, "LimitExceededException", "Rate exceeded for shard")
        }
        FaultKind::Http500 if query => {
            ApiError::new(500, "InternalFailure", "injected internal failure")
        }
        FaultKind::Http500 => {
            ApiError::new(500, "InternalServerError", "injected internal server error")
        }
        FaultKind::Unavailable => {
            ApiError::new(503, "ServiceUnavailable", "Service unavailable (injected)")
        }
        FaultKind::Expired if query => ApiError::new(
            400,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        ),
        FaultKind::Expired => ApiError::expired(
            "Iterator expired. The iterator was created at a time that is too old (injected)",
        ),
        FaultKind::Trimmed => ApiError::trimmed(
            "The operation attempted to read past the oldest stream record in a shard (injected)",
        ),
        FaultKind::NotFound => ApiError::not_found("Requested resource not found (injected)"),
        FaultKind::Error {
            status,
            code,
            message,
        } => ApiError::new(*status, code, message.clone()),
        FaultKind::Slow(_) | FaultKind::Malformed(_) | FaultKind::Truncated | FaultKind::Drop => {
            unreachable!("answered by the caller")
        }
    }
}

fn error_outcome(protocol: Protocol, err: &ApiError) -> Outcome {
    let body = match protocol {
        Protocol::Json => {
            let namespace = if err.code == "ExpiredTokenException" {
                "com.amazon.coral.service"
            } else {
                "com.amazonaws.dynamodb.v20120810"
            };
            serde_json::to_vec(&json!({
                "__type": format!("{namespace}#{}", err.code),
                "message": err.message,
            }))
            .expect("serializable")
        }
        Protocol::Query => {
            let kind = if err.status >= 500 {
                "Receiver"
            } else {
                "Sender"
            };
            format!(
                concat!(
                    r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">"#,
                    "<Error><Type>{}</Type><Code>{}</Code><Message>{}</Message></Error>",
                    "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
                ),
                kind,
                render::xml_escape(&err.code),
                render::xml_escape(&err.message)
            )
            .into_bytes()
        }
    };
    Outcome::Reply {
        status: err.status,
        body: Body::Full(Some(Bytes::from(body))),
        error_code: Some(err.code.clone()),
    }
}

fn ok(body: Vec<u8>) -> Outcome {
    Outcome::Reply {
        status: 200,
        body: Body::Full(Some(Bytes::from(body))),
        error_code: None,
    }
}

/// Runs an operation. `dry_run` (a truncated answer) leaves no trace in the state.
#[allow(clippy::too_many_arguments)]
fn execute(
    shared: &Shared,
    protocol: Protocol,
    op: &str,
    body: &Value,
    iterator: Option<&Iterator>,
    call: &mut Call,
    dry_run: bool,
) -> Outcome {
    let result = match protocol {
        Protocol::Json => execute_json(shared, op, body, iterator, call, dry_run),
        Protocol::Query => execute_sts(shared, op, call, dry_run),
    };
    match result {
        Ok(body) => ok(body),
        Err(e) => error_outcome(protocol, &e),
    }
}

fn to_vec(v: Result<Value, ApiError>) -> Result<Vec<u8>, ApiError> {
    v.map(|v| serde_json::to_vec(&v).expect("serializable"))
}

fn execute_json(
    shared: &Shared,
    op: &str,
    body: &Value,
    iterator: Option<&Iterator>,
    call: &mut Call,
    dry_run: bool,
) -> Result<Vec<u8>, ApiError> {
    match op {
        "DescribeTable" => to_vec(shared.lock().describe_table(body)),
        "DescribeStream" => to_vec(shared.lock().describe_stream(body)),
        "ListStreams" => to_vec(shared.lock().list_streams(body)),
        "Scan" => {
            let page = shared.lock().scan(body)?;
            if !dry_run {
                shared
                    .items_served
                    .fetch_add(page.items.len() as u64, Ordering::Relaxed);
            }
            call.items = page.items.len();
            call.capacity_units = Some(page.units);
            call.last_evaluated_key = page.last_key.clone();
            Ok(render::scan_body(&page))
        }
        "GetShardIterator" => to_vec(shared.lock().get_shard_iterator(body)),
        "GetRecords" => {
            model::str_field(body, "ShardIterator")?;
            let iterator = iterator.ok_or_else(|| {
                ApiError::validation("Invalid ShardIterator: not one this stream issued")
            })?;
            let limit = model::limit(body, 1000, 1000)?;
            let page = shared.lock().get_records(iterator, limit, dry_run)?;
            if !dry_run {
                shared
                    .records_served
                    .fetch_add(page.count as u64, Ordering::Relaxed);
            }
            call.records = page.count;
            call.first_sequence_number = page.first_seq.map(|s| s.to_string());
            call.last_sequence_number = page.last_seq.map(|s| s.to_string());
            call.shard_end = page.next_iterator.is_none();
            Ok(render::records_body(&page))
        }
        other => Err(ApiError::new(
            400,
            "UnknownOperationException",
            format!("the streams double does not implement {other}"),
        )),
    }
}

fn execute_sts(
    shared: &Shared,
    op: &str,
    call: &mut Call,
    dry_run: bool,
) -> Result<Vec<u8>, ApiError> {
    if op != "AssumeRole" {
        return Err(ApiError::new(
            400,
            "InvalidAction",
            format!("the streams double does not implement STS action {op:?}"),
        ));
    }
    let mut record = call
        .assume_role
        .clone()
        .expect("set when the request was parsed");
    let (role_arn, session_name, duration_seconds) = (
        record.role_arn.clone(),
        record.role_session_name.clone(),
        record.duration_seconds,
    );
    if role_arn.is_empty() || session_name.is_empty() {
        return Err(ApiError::new(
            400,
            "ValidationError",
            "RoleArn and RoleSessionName are required",
        ));
    }
    if let Some(d) = duration_seconds.filter(|d| !(900..=43200).contains(d)) {
        return Err(ApiError::new(
            400,
            "ValidationError",
            format!("1 validation error detected: Value '{d}' at 'durationSeconds' failed to satisfy constraint: Member must have value between 900 and 43200"),
        ));
    }
    let mut state = shared.lock();
    let lifetime = state
        .sts
        .session_lifetime
        .unwrap_or(std::time::Duration::from_secs(
            duration_seconds.unwrap_or(3600).into(),
        ));
    let expiration = chrono::Utc::now()
        + chrono::Duration::from_std(lifetime).expect("a session lifetime that fits");
    state.sts.issued += 1;
    let serial = state.sts.issued;
    let random: u64 = rand::random();
    let key_id = format!("ASIA{:016X}", random ^ serial);
    let secret = format!(
        "{:040x}",
        u128::from(random).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    let token = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("streams-double-session-{serial}-{random:x}-{role_arn}"),
    );
    if !dry_run {
        state
            .sts
            .sessions
            .insert(key_id.clone(), expiration.timestamp_millis());
    }
    drop(state);
    record.issued_access_key_id = Some(key_id.clone());
    record.expiration = Some(expiration);
    call.assume_role = Some(record);
    let role_name = role_arn.rsplit('/').next().unwrap_or("role");
    let account = role_arn.split(':').nth(4).unwrap_or("123456789012");
    let x = render::xml_escape;
    Ok(format!(
        concat!(
            r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">"#,
            "<AssumeRoleResult>",
            "<Credentials><AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>",
            "<SessionToken>{token}</SessionToken><Expiration>{exp}</Expiration></Credentials>",
            "<AssumedRoleUser><AssumedRoleId>AROA{serial:016X}:{session}</AssumedRoleId>",
            "<Arn>arn:aws:sts::{account}:assumed-role/{role}/{session}</Arn></AssumedRoleUser>",
            "<PackedPolicySize>6</PackedPolicySize>",
            "</AssumeRoleResult>",
            "<ResponseMetadata><RequestId>{serial:08x}-0000-0000-0000-000000000000</RequestId></ResponseMetadata>",
            "</AssumeRoleResponse>"
        ),
        key = key_id,
        secret = secret,
        token = token,
        exp = expiration.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        serial = serial,
        session = x(&session_name),
        account = x(account),
        role = x(role_name),
    )
    .into_bytes())
}
