//! Prints the records of a topic as JSON lines, from offset 0 to the current end of every
//! partition: a tiny consumer for the demo and for looking at what dynamodb-cdc produced.
//!
//! `cargo run --example tail -- --topic dynamodb.demo_orders [--bootstrap 127.0.0.1:9092] [--count]`

use clap::Parser;
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    /// Broker to connect to.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic to read (repeatable).
    #[arg(long, required = true)]
    topic: Vec<String>,
    /// Print only the number of records (and of tombstones) per topic.
    #[arg(long)]
    count: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = ClientBuilder::new(vec![args.bootstrap.clone()])
        .build()
        .await?;
    let topics = client.list_topics().await?;
    for topic in &args.topic {
        let Some(t) = topics.iter().find(|t| &t.name == topic) else {
            eprintln!("topic {topic} does not exist");
            continue;
        };
        let (mut records, mut tombstones) = (0u64, 0u64);
        for &p in &t.partitions {
            let pc = client
                .partition_client(topic.clone(), p, UnknownTopicHandling::Retry)
                .await?;
            let high = pc.get_offset(OffsetAt::Latest).await?;
            let mut offset = 0;
            while offset < high {
                let (batch, _) = pc.fetch_records(offset, 1..10_000_000, 1_000).await?;
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    offset = offset.max(r.offset + 1);
                    records += 1;
                    if r.record.value.is_none() {
                        tombstones += 1;
                    }
                    if args.count {
                        continue;
                    }
                    let text =
                        |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).into_owned());
                    let value = text(r.record.value)
                        .map(|v| serde_json::from_str::<Value>(&v).unwrap_or(Value::String(v)));
                    let headers: serde_json::Map<String, Value> = r
                        .record
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k, Value::String(String::from_utf8_lossy(&v).into_owned())))
                        .collect();
                    println!(
                        "{}",
                        json!({"topic": topic, "partition": p, "offset": r.offset, "key": text(r.record.key), "value": value, "headers": headers})
                    );
                }
            }
        }
        if args.count {
            println!("{topic} records={records} tombstones={tombstones}");
        }
    }
    Ok(())
}
