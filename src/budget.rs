//! Pipeline memory: one budget (`kafka.max_buffered_bytes`) for everything a page keeps
//! alive between GetRecords and Kafka's acknowledgement, shared by every shard of every
//! table.
//!
//! ```text
//! reader: reserve(limit x bytes per record) ─▶ GetRecords(limit) ─▶ resize(page_bytes) ─▶ Kafka
//!                                                                    checkpointer: ack ─▶ drop
//! ```
//!
//! A shard reserves *before* it reads, sized from the records it asks for, so a thousand
//! quiet shards that all get a burst at once wait for the budget instead of all reading at
//! once; once the response is in, the reservation is set to what the page really holds
//! ([`page_bytes`]: the response body, the converted records and the retry copy the producer
//! keeps of them).

use std::sync::Arc;

use rskafka::record::Record;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::kafka::record_bytes;

/// Allocations around a converted record beyond its bytes (the headers map, the key and
/// value buffers, the record struct).
pub const RECORD_OVERHEAD_BYTES: usize = 512;

/// Memory a page of `records` keeps alive until Kafka acknowledged it: the GetRecords
/// response body it came from (`body_bytes`; 0 when unknown), each record with its
/// allocations, and the producer's retry copy of each record (the same bytes again).
pub fn page_bytes(records: &[Record], body_bytes: usize) -> usize {
    page_bytes_of(
        records.iter().map(record_bytes).sum(),
        records.len(),
        body_bytes,
    )
}

/// [`page_bytes`] from the records' summed [`record_bytes`] and their count, for callers
/// that already have the sum.
pub fn page_bytes_of(record_bytes: usize, records: usize, body_bytes: usize) -> usize {
    body_bytes + 2 * record_bytes + records * RECORD_OVERHEAD_BYTES
}

/// The memory budget of converted records between GetRecords and Kafka's acknowledgement,
/// shared by every shard of every table (`kafka.max_buffered_bytes`), like the Java
/// producer's `buffer.memory`. Shards reserve before they read; a shard waits while the
/// budget is spent, so memory stays bounded however many shards have a backlog.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    /// The budget in KiB (one permit each).
    kib: u32,
}

/// Part of the [`Budget`], held until dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    budget: Budget,
}

impl Budget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).clamp(1, u32::MAX as usize / 2) as u32;
        Self {
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    fn kib_of(&self, bytes: usize) -> u32 {
        (bytes.div_ceil(1024).min(self.kib as usize)) as u32
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds them.
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let kib = self.kib_of(bytes);
        let permit = if kib == 0 {
            None
        } else {
            Some(
                self.permits
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .expect("the budget is never closed"),
            )
        };
        Reservation {
            permit,
            budget: self.clone(),
        }
    }

    /// KiB not reserved right now.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

impl Reservation {
    /// Holds `bytes` from now on: frees what is no longer needed, and takes more only if it
    /// is free right now. It never waits: a shard already holding part of the budget must
    /// not wait for more (all shards could wait on each other), so a page larger than its
    /// reservation may go over the budget by the difference.
    pub fn resize(&mut self, bytes: usize) {
        let want = self.budget.kib_of(bytes) as usize;
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        if want < held {
            let permit = self.permit.as_mut().expect("held > 0");
            drop(permit.split(held - want));
            if want == 0 {
                self.permit = None;
            }
        } else if want > held {
            let more = self
                .budget
                .permits
                .clone()
                .try_acquire_many_owned((want - held) as u32);
            if let Ok(more) = more {
                match &mut self.permit {
                    Some(p) => p.merge(more),
                    None => self.permit = Some(more),
                }
            }
        }
    }

    /// Bytes held (rounded to KiB).
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits() * 1024)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_budget_bounds_reservations_and_never_waits_to_grow() {
        let budget = Budget::new(10 * 1024);
        let mut a = budget.reserve(4 * 1024).await;
        assert_eq!((a.bytes(), budget.available_kib()), (4096, 6));
        // More than the budget is capped at the budget (it would never be granted).
        let b = budget.reserve(1 << 30);
        let b = tokio::time::timeout(Duration::from_millis(50), b).await;
        assert!(b.is_err(), "waits while the budget is spent");
        // Growing takes only what is free.
        a.resize(20 * 1024);
        assert_eq!((a.bytes(), budget.available_kib()), (10 * 1024, 0));
        a.resize(1024);
        assert_eq!((a.bytes(), budget.available_kib()), (1024, 9));
        a.resize(0);
        assert_eq!((a.bytes(), budget.available_kib()), (0, 10));
        a.resize(3000);
        assert_eq!((a.bytes(), budget.available_kib()), (3072, 7));
        drop(a);
        assert_eq!(budget.available_kib(), 10);
        let whole = budget.reserve(1 << 30).await;
        assert_eq!(whole.bytes(), 10 * 1024);
        assert_eq!(budget.reserve(0).await.bytes(), 0, "nothing to wait for");
    }
}
