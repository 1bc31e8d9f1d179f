//! Where a record goes: Kafka's default keyed partitioner, so Java clients, librdkafka
//! (`murmur2_random`) and this daemon agree on the partition of a key.

use std::collections::HashMap;

use rskafka::record::Record;

/// Kafka's default partitioner for keyed records: `murmur2(key) & 0x7fffffff % n`, so Java,
/// librdkafka (`murmur2_random`) and this daemon agree on where a key lives.
pub fn partition_for(key: &[u8], partitions: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions) as i32
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Groups records by partition, keeping their order within each partition.
pub fn split_by_partition(records: Vec<Record>, partitions: u32) -> HashMap<i32, Vec<Record>> {
    let mut out: HashMap<i32, Vec<Record>> = HashMap::new();
    for r in records {
        let p = partition_for(r.key.as_deref().unwrap_or_default(), partitions);
        out.entry(p).or_default().push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "{:?}",
                std::str::from_utf8(input)
            );
        }
    }

    #[test]
    fn partition_is_positive_and_stable() {
        // Kafka: toPositive(murmur2("foobar")) % 3 == (-790332482 & 0x7fffffff) % 3.
        let expected = ((-790_332_482i32 as u32 & 0x7fff_ffff) % 3) as i32;
        assert_eq!(partition_for(b"foobar", 3), expected);
        for n in 1..20 {
            let p = partition_for(br#"{"pk":"k1"}"#, n);
            assert!((0..n as i32).contains(&p));
        }
    }

    #[test]
    fn split_keeps_order_within_a_partition() {
        let rec = |k: &str, v: u8| Record {
            key: Some(k.as_bytes().to_vec()),
            value: Some(vec![v]),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        };
        let records: Vec<_> = (0..50u8).map(|i| rec(&format!("k{}", i % 7), i)).collect();
        let groups = split_by_partition(records, 4);
        for (p, rs) in &groups {
            let values: Vec<u8> = rs.iter().map(|r| r.value.as_ref().unwrap()[0]).collect();
            let mut sorted = values.clone();
            sorted.sort();
            assert_eq!(values, sorted, "partition {p} out of order");
            for r in rs {
                assert_eq!(partition_for(r.key.as_deref().unwrap(), 4), *p);
            }
        }
        assert_eq!(groups.values().map(Vec::len).sum::<usize>(), 50);
    }
}
