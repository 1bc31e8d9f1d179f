//! Error types, with the context an operator needs (table, shard, sequence number,
//! topic), and the one place per dependency that decides retryable vs fatal.

use std::path::PathBuf;

use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;

/// A configuration problem; `main` exits with status 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The document does not match the schema.
    #[error("config key {path}: {message}")]
    Parse {
        /// Key path, e.g. `kafka.compression`.
        path: String,
        /// What serde said.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Key path.
        key: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// A `${secretsmanager:...}` reference could not be resolved.
    #[error("config key {key}: secret {secret_id}: {code}: {message}")]
    Secret {
        /// Key path of the string holding the reference.
        key: String,
        /// The secret's name or ARN.
        secret_id: String,
        /// The AWS error code, or ours (`MissingJsonKey`, `NotJson`, ...).
        code: String,
        /// What went wrong (never the secret's value).
        message: String,
    },
}

/// A runtime failure that stops the pipeline (or one table of it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Assuming the configured role failed.
    #[error("assume role {role_arn}: {message}")]
    AssumeRole {
        /// The role.
        role_arn: String,
        /// The STS error.
        message: String,
    },
    /// A table cannot be captured as configured.
    #[error("table {table}: {message}")]
    Table {
        /// The table.
        table: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The table was deleted and its stream read to its end: the end of a table found by
    /// a rule of `tables`, a failure for one listed by name.
    #[error("table {table}: the table was deleted; its stream {stream_arn} was read to its end. Remove the table from the config")]
    TableDeleted {
        /// The table.
        table: String,
        /// Its last stream.
        stream_arn: String,
    },
    /// A shard reader stopped.
    #[error("table {table} shard {shard_id} (last sequence number {}): {message}", sequence_number.as_deref().unwrap_or("none"))]
    Shard {
        /// The table.
        table: String,
        /// The shard.
        shard_id: String,
        /// The last sequence number read from the shard, if any.
        sequence_number: Option<String>,
        /// What happened.
        message: String,
    },
    /// Kafka refused records in a way retrying cannot fix.
    #[error("kafka topic {topic} partition {partition}: {message}")]
    Kafka {
        /// The topic.
        topic: String,
        /// The partition, -1 when not partition-specific.
        partition: i32,
        /// What happened.
        message: String,
    },
    /// Reading or writing a checkpoint failed.
    #[error("checkpoint {path}: {source}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the checkpoint directory.
    #[error("checkpoint dir {path} is in use by another dynamodb-cdc process; give each pipeline its own checkpoint.dir")]
    CheckpointInUse {
        /// The directory.
        path: PathBuf,
    },
    /// A checkpoint file exists but cannot be parsed.
    #[error("checkpoint {path}: {message}; move the file away to start that shard from its start position")]
    CorruptCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The rules of `tables` could not list the account's tables.
    #[error("table discovery (the rules of tables): {0}")]
    Discovery(String),
    /// A task panicked or ended when it must not have.
    #[error("internal error: {0}")]
    Internal(String),
    /// Shutdown (a signal) stopped the work before it finished; not a failure.
    #[error("stopped by shutdown before it finished")]
    Cancelled,
    /// A configuration problem found at start (a TLS file, a secret); exit status 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// How an AWS error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// The service asked us to slow down: back off longer.
    Throttled,
    /// A network problem, timeout or 5xx: retry with backoff.
    Transient,
    /// The shard iterator is older than 15 minutes: get a new one.
    ExpiredIterator,
    /// The position asked for is older than the stream's retention.
    TrimmedData,
    /// The table, stream or shard does not exist (any more).
    NotFound,
    /// Anything retrying cannot fix (access denied, validation).
    Fatal,
}

/// The HTTP status of a raw AWS response, where the response type has one.
pub trait HttpStatus {
    /// The status code.
    fn http_status(&self) -> Option<u16>;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn http_status(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

/// The one place that decides how an AWS SDK error is handled.
pub fn classify_aws<E, R>(err: &SdkError<E, R>) -> AwsErrorKind
where
    E: ProvideErrorMetadata,
    R: HttpStatus,
{
    match err {
        // An error without a code (a body that is not the protocol's JSON: a proxy's or an
        // emulator's XML or HTML page): its status decides.
        SdkError::ServiceError(service) if service.err().code().is_none() => {
            classify_status(service.raw().http_status())
        }
        SdkError::ServiceError(service) => classify_code(service.err().code()),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            AwsErrorKind::Transient
        }
        SdkError::ConstructionFailure(_) => AwsErrorKind::Fatal,
        _ => AwsErrorKind::Transient,
    }
}

/// Classifies an AWS error code (the `__type` of a JSON-protocol error).
pub fn classify_code(code: Option<&str>) -> AwsErrorKind {
    match code.unwrap_or_default() {
        "ExpiredIteratorException" => AwsErrorKind::ExpiredIterator,
        "TrimmedDataAccessException" => AwsErrorKind::TrimmedData,
        "ResourceNotFoundException" => AwsErrorKind::NotFound,
        "LimitExceededException"
        | "ThrottlingException"
        | "ProvisionedThroughputExceededException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException" => AwsErrorKind::Throttled,
        // Credentials that expired or rotated under an in-flight request: the background
        // refresher replaces them, so the next attempt uses fresh ones.
        "ExpiredTokenException"
        | "InternalServerError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => AwsErrorKind::Transient,
        // No code at all: a 5xx with an empty body, or a body we could not parse.
        "" => AwsErrorKind::Transient,
        _ => AwsErrorKind::Fatal,
    }
}

/// Classifies an error response without a code by its HTTP status: 429 is throttling, a
/// 5xx or no status transient, any other 4xx (403 access denied, 400 validation) fatal.
pub fn classify_status(status: Option<u16>) -> AwsErrorKind {
    match status {
        Some(429) => AwsErrorKind::Throttled,
        Some(400..=499) => AwsErrorKind::Fatal,
        _ => AwsErrorKind::Transient,
    }
}

/// The full error chain of an AWS SDK error, for log lines and error messages.
pub fn aws_message<E, R>(err: &SdkError<E, R>) -> String
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    DisplayErrorContext(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        use AwsErrorKind::*;
        for (code, kind) in [
            ("ExpiredIteratorException", ExpiredIterator),
            ("TrimmedDataAccessException", TrimmedData),
            ("ResourceNotFoundException", NotFound),
            ("LimitExceededException", Throttled),
            ("ThrottlingException", Throttled),
            ("InternalServerError", Transient),
            ("ExpiredTokenException", Transient),
            ("AccessDeniedException", Fatal),
            ("ValidationException", Fatal),
        ] {
            assert_eq!(classify_code(Some(code)), kind, "{code}");
        }
        assert_eq!(classify_code(None), Transient);
        for (status, kind) in [
            (Some(403), Fatal),
            (Some(400), Fatal),
            (Some(404), Fatal),
            (Some(429), Throttled),
            (Some(500), Transient),
            (Some(503), Transient),
            (None, Transient),
        ] {
            assert_eq!(classify_status(status), kind, "{status:?}");
        }
    }
}
