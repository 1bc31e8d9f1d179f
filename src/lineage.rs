//! Shard lineage: which shards may be read now.
//!
//! DynamoDB splits a shard into children when it rolls over; an item's changes may sit in
//! the parent and then in a child. To keep per-key order, a child is read only after its
//! parent was read to its end and checkpointed. A parent the listing no longer shows was
//! trimmed (older than 24 h) and does not block its children, unless it is still being
//! read.

use std::collections::HashSet;

use crate::discovery::ShardInfo;

/// The shards of `listing` that may start now: not finished, not running, and whose
/// parent is finished, or no longer listed and not being read.
pub fn readable<'a>(
    listing: &'a [ShardInfo],
    finished: &HashSet<String>,
    running: &HashSet<String>,
) -> Vec<&'a ShardInfo> {
    let listed: HashSet<&str> = listing.iter().map(|s| s.shard_id.as_str()).collect();
    listing
        .iter()
        .filter(|s| !finished.contains(&s.shard_id) && !running.contains(&s.shard_id))
        .filter(|s| match &s.parent_shard_id {
            None => true,
            Some(parent) => {
                finished.contains(parent)
                    || (!listed.contains(parent.as_str()) && !running.contains(parent))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            parent_shard_id: parent.map(Into::into),
            ending_sequence_number: None,
        }
    }

    /// A tree with splits: a -> (b, c); b -> (d, e); c -> f; plus a root g whose parent
    /// "trimmed" is no longer listed, and g -> h.
    fn tree() -> Vec<ShardInfo> {
        vec![
            shard("a", None),
            shard("b", Some("a")),
            shard("c", Some("a")),
            shard("d", Some("b")),
            shard("e", Some("b")),
            shard("f", Some("c")),
            shard("g", Some("trimmed")),
            shard("h", Some("g")),
        ]
    }

    fn permutations(items: Vec<ShardInfo>) -> Vec<Vec<ShardInfo>> {
        if items.len() <= 1 {
            return vec![items];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.clone();
            let head = rest.remove(i);
            for mut p in permutations(rest) {
                p.insert(0, head.clone());
                out.push(p);
            }
        }
        out
    }

    /// Simulates a reader that starts everything readable, then finishes the shards in a
    /// chosen order; checks that no shard ever starts before its listed parent finished,
    /// and that every shard is read exactly once. With `trim_running`, the listing a
    /// rescan sees no longer shows the shards being read (the stream trimmed them while
    /// their reader was still on them): a running parent must block its children all the
    /// same.
    fn simulate(listing: &[ShardInfo], pick_last: bool, trim_running: bool) {
        let mut finished = HashSet::new();
        let mut running: Vec<String> = Vec::new();
        let mut started = Vec::new();
        loop {
            let run_set: HashSet<String> = running.iter().cloned().collect();
            let seen: Vec<ShardInfo> = listing
                .iter()
                .filter(|s| !trim_running || !run_set.contains(&s.shard_id))
                .cloned()
                .collect();
            for s in readable(&seen, &finished, &run_set) {
                if let Some(p) = &s.parent_shard_id {
                    if listing.iter().any(|x| &x.shard_id == p) {
                        assert!(finished.contains(p), "{} started before {p}", s.shard_id);
                    }
                }
                running.push(s.shard_id.clone());
                started.push(s.shard_id.clone());
            }
            if running.is_empty() {
                break;
            }
            let done = if pick_last {
                running.pop().unwrap()
            } else {
                running.remove(0)
            };
            finished.insert(done);
        }
        let mut sorted = started.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), started.len(), "a shard started twice");
        assert_eq!(started.len(), listing.len(), "not every shard was read");
    }

    #[test]
    fn parents_finish_before_children_in_every_listing_order() {
        // 8! = 40320 listing orders, each finished in two different orders, with and without
        // running shards dropping out of the listing.
        for listing in permutations(tree()) {
            for trim_running in [false, true] {
                simulate(&listing, false, trim_running);
                simulate(&listing, true, trim_running);
            }
        }
    }

    #[test]
    fn trimmed_parent_does_not_block() {
        let listing = tree();
        let ready: Vec<_> = readable(&listing, &HashSet::new(), &HashSet::new())
            .into_iter()
            .map(|s| s.shard_id.as_str())
            .collect();
        assert_eq!(ready, vec!["a", "g"]);
    }

    #[test]
    fn running_and_finished_shards_are_not_offered() {
        let listing = tree();
        let finished: HashSet<String> = ["a".to_string()].into();
        let running: HashSet<String> = ["b".to_string()].into();
        let ready: Vec<_> = readable(&listing, &finished, &running)
            .into_iter()
            .map(|s| s.shard_id.as_str())
            .collect();
        assert_eq!(ready, vec!["c", "g"]);
    }

    #[test]
    fn a_running_parent_blocks_its_children_even_when_no_longer_listed() {
        // "b" is being read, and the listing no longer shows it.
        let listing: Vec<ShardInfo> = tree().into_iter().filter(|s| s.shard_id != "b").collect();
        let finished: HashSet<String> = ["a".to_string()].into();
        let running: HashSet<String> = ["b".to_string()].into();
        let ready: Vec<_> = readable(&listing, &finished, &running)
            .into_iter()
            .map(|s| s.shard_id.as_str())
            .collect();
        assert_eq!(ready, vec!["c", "g"]);
    }
}
