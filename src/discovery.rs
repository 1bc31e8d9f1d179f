//! Discovery: table -> stream ARN -> the stream's shards (DescribeStream, every page).

use aws_sdk_dynamodbstreams::types::StreamStatus;
use tokio_util::sync::CancellationToken;

use crate::aws::{retrying, AwsFailure};
use crate::error::AwsErrorKind;

/// What DescribeTable says about a table's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStream {
    /// The table.
    pub table: String,
    /// Its current stream.
    pub stream_arn: String,
    /// NEW_IMAGE, OLD_IMAGE, NEW_AND_OLD_IMAGES or KEYS_ONLY.
    pub view_type: String,
}

/// One shard of a stream listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard id.
    pub shard_id: String,
    /// The shard it split from, if the stream still lists or once listed it.
    pub parent_shard_id: Option<String>,
    /// Set once the shard is closed: no record will be added after it.
    pub ending_sequence_number: Option<String>,
}

/// A stream listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamListing {
    /// ENABLING, ENABLED, DISABLING or DISABLED.
    pub status: String,
    /// Every shard, in the order DescribeStream returned them.
    pub shards: Vec<ShardInfo>,
}

/// Why discovery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// The table does not exist (or the role may not describe it).
    #[error("table {table} not found: {message}")]
    TableNotFound {
        /// The table.
        table: String,
        /// The AWS error.
        message: String,
    },
    /// The table exists but has no stream.
    #[error("table {table} has no stream enabled; enable one with: aws dynamodb update-table --table-name {table} --stream-specification StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES")]
    NoStream {
        /// The table.
        table: String,
    },
    /// The stream is gone (table deleted, stream replaced).
    #[error("stream {stream_arn} not found: {message}")]
    StreamNotFound {
        /// The stream.
        stream_arn: String,
        /// The AWS error.
        message: String,
    },
    /// Any other failure, with the AWS error chain.
    #[error("{call} failed: {message}")]
    Aws {
        /// The call.
        call: &'static str,
        /// The AWS error.
        message: String,
    },
    /// Shutdown began while retrying.
    #[error("cancelled")]
    Cancelled,
}

/// A failure retrying could not fix, as a [`DiscoveryError`] of `call`.
pub(crate) fn aws_error(call: &'static str, f: AwsFailure) -> DiscoveryError {
    match f.kind {
        None => DiscoveryError::Cancelled,
        Some(_) => DiscoveryError::Aws {
            call,
            message: f.message,
        },
    }
}

/// DescribeTable: the table's current stream.
pub async fn describe_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    cancel: &CancellationToken,
) -> Result<TableStream, DiscoveryError> {
    let out = retrying("DescribeTable", cancel, || {
        dynamodb.describe_table().table_name(table).send()
    })
    .await
    .map_err(|f| match f.kind {
        Some(AwsErrorKind::NotFound) => DiscoveryError::TableNotFound {
            table: table.to_owned(),
            message: f.message,
        },
        _ => aws_error("DescribeTable", f),
    })?;
    let desc = out.table().ok_or_else(|| DiscoveryError::Aws {
        call: "DescribeTable",
        message: "response without a table description".into(),
    })?;
    let enabled = desc
        .stream_specification()
        .is_some_and(|s| s.stream_enabled());
    match desc.latest_stream_arn() {
        Some(arn) if enabled => Ok(TableStream {
            table: table.to_owned(),
            stream_arn: arn.to_owned(),
            view_type: desc
                .stream_specification()
                .and_then(|s| s.stream_view_type())
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
        }),
        _ => Err(DiscoveryError::NoStream {
            table: table.to_owned(),
        }),
    }
}

/// DescribeStream, following `LastEvaluatedShardId` through every page (100 shards a page).
pub async fn list_shards(
    streams: &aws_sdk_dynamodbstreams::Client,
    stream_arn: &str,
    cancel: &CancellationToken,
) -> Result<StreamListing, DiscoveryError> {
    let mut shards = Vec::new();
    let mut start: Option<String> = None;
    let mut status = String::new();
    loop {
        let out = retrying("DescribeStream", cancel, || {
            streams
                .describe_stream()
                .stream_arn(stream_arn)
                .limit(100)
                .set_exclusive_start_shard_id(start.clone())
                .send()
        })
        .await
        .map_err(|f| match f.kind {
            Some(AwsErrorKind::NotFound) => DiscoveryError::StreamNotFound {
                stream_arn: stream_arn.to_owned(),
                message: f.message,
            },
            _ => aws_error("DescribeStream", f),
        })?;
        let Some(desc) = out.stream_description() else {
            return Err(DiscoveryError::Aws {
                call: "DescribeStream",
                message: "response without a stream description".into(),
            });
        };
        if let Some(s) = desc.stream_status() {
            status = match s {
                StreamStatus::Enabled => "ENABLED".into(),
                other => other.as_str().to_owned(),
            };
        }
        for shard in desc.shards() {
            let Some(id) = shard.shard_id() else { continue };
            shards.push(ShardInfo {
                shard_id: id.to_owned(),
                parent_shard_id: shard.parent_shard_id().map(str::to_owned),
                ending_sequence_number: shard
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .map(str::to_owned),
            });
        }
        match desc.last_evaluated_shard_id() {
            Some(last) if Some(last) != start.as_deref() => start = Some(last.to_owned()),
            _ => break,
        }
    }
    Ok(StreamListing { status, shards })
}
