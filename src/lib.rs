//! # dynamodb-cdc
//!
//! Captures every change to DynamoDB tables from DynamoDB Streams and delivers it to Kafka,
//! one topic per table, under an assumed IAM role.
//!
//! ```text
//!  config.rs ─▶ aws/ (credentials: base chain ─▶ [first hop] ─▶ role + external id,
//!                     refreshed in the background before expiry)
//!                │
//!                ▼
//!  table_discovery.rs (rules of `tables`: ListTables ─▶ selection.rs ─▶ tags ─▶ topic_name.rs;
//!                │     every interval, tables come and go)
//!                ▼
//!  supervisor.rs: per table ─▶ discovery.rs (DescribeTable ─▶ stream ARN ─▶ DescribeStream,
//!                │                            every page)
//!                │             lineage.rs   (a child shard starts once its parent ended)
//!                ▼
//!  shard_reader.rs: per shard ─▶ GetRecords ─▶ convert.rs (record ─▶ key, JSON event, headers)
//!                │                               │
//!                │                               ▼
//!                │             kafka.rs (murmur2 partitioner, one producer task per partition)
//!                │                               │ acks
//!                ▼                               ▼
//!  checkpoint/ (position = last record whose page, and every page before it, Kafka acknowledged)
//! ```
//!
//! `app.rs` wires it together for the `run` and `check` commands of `main.rs`.

#![forbid(unsafe_code)]

pub mod app;
pub mod aws;
pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod dead_letter;
pub mod discovery;
pub mod error;
pub mod integration;
pub mod kafka;
pub mod lineage;
pub mod retry;
pub mod secrets;
pub mod selection;
pub mod shard_reader;
pub mod snapshot;
pub mod status;
pub mod supervisor;
pub mod table_discovery;
pub mod tasks;
pub mod telemetry;
pub mod topic_name;
