//! Response rendering for GetRecords and Scan: records of generated shards and generated
//! items are written straight into the response buffer from a pre-rendered template (no
//! `serde_json::Value` per record or item); pushed records and written items are stored
//! already rendered and copied in.

use serde_json::Value;

use super::items::{number_size, PageItem, ScanPage};
use super::model::Page;
use super::{Generated, ViewType};

/// A piece of a record template.
#[derive(Debug, Clone)]
enum Piece {
    Text(Box<str>),
    /// 32 hex digits derived from the sequence number.
    EventId,
    /// The key number `j` of `k{j}`.
    Key,
    /// The item's version (0 on INSERT).
    Version,
    /// The version before (MODIFY's old image).
    OldVersion,
    Sequence,
}

/// Pre-rendered records of a generated table.
///
/// Record `n` of shard `s` (of `shards`) is global change `g = n * shards + s` to key
/// `k{g % keys}`, version `g / keys`: INSERT for version 0, MODIFY after.
#[derive(Debug)]
pub(super) struct Template {
    shards: u64,
    keys: u64,
    insert: Vec<Piece>,
    modify: Vec<Piece>,
    /// A generous size of one rendered record, to size buffers once.
    record_len: usize,
}

/// Builds a template from text where `\u{1}`..`\u{5}` mark the variable pieces.
fn compile(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    for c in text.chars() {
        let piece = match c {
            '\u{1}' => Piece::EventId,
            '\u{2}' => Piece::Key,
            '\u{3}' => Piece::Version,
            '\u{4}' => Piece::OldVersion,
            '\u{5}' => Piece::Sequence,
            c => {
                lit.push(c);
                continue;
            }
        };
        if !lit.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut lit).into()));
        }
        pieces.push(piece);
    }
    if !lit.is_empty() {
        pieces.push(Piece::Text(lit.into()));
    }
    pieces
}

impl Template {
    pub fn new(spec: &Generated, region: &str, created_epoch_s: i64) -> Self {
        // The image without padding is about 50 bytes; the pad brings it to item_bytes.
        let pad = "x".repeat(spec.item_bytes.saturating_sub(50));
        let image = |version: char| {
            format!(
                r#"{{"pk":{{"S":"k{key}"}},"v":{{"N":"{version}"}},"pad":{{"S":"{pad}"}}}}"#,
                key = '\u{2}'
            )
        };
        let (new, old) = (image('\u{3}'), image('\u{4}'));
        let size = spec.item_bytes.max(16);
        let record = |event: &str, with_old: bool| {
            let mut images = String::new();
            let view = spec.view_type;
            if event != "REMOVE" && matches!(view, ViewType::NewImage | ViewType::NewAndOldImages) {
                images.push_str(&format!(r#","NewImage":{new}"#));
            }
            if with_old && matches!(view, ViewType::OldImage | ViewType::NewAndOldImages) {
                images.push_str(&format!(r#","OldImage":{old}"#));
            }
            format!(
                concat!(
                    r#"{{"eventID":"{eid}","eventName":"{event}","eventVersion":"1.1","#,
                    r#""eventSource":"aws:dynamodb","awsRegion":"{region}","dynamodb":{{"#,
                    r#""ApproximateCreationDateTime":{ts},"Keys":{{"pk":{{"S":"k{key}"}}}}"#,
                    r#"{images},"SequenceNumber":"{seq}","SizeBytes":{size},"#,
                    r#""StreamViewType":"{view}"}}}}"#
                ),
                eid = '\u{1}',
                event = event,
                region = region,
                ts = created_epoch_s,
                key = '\u{2}',
                images = images,
                seq = '\u{5}',
                size = size,
                view = spec.view_type.as_str(),
            )
        };
        let insert = record("INSERT", false);
        let modify = record("MODIFY", true);
        Self {
            shards: spec.shards.max(1) as u64,
            keys: spec.keys.max(1),
            record_len: modify.len() + 128,
            insert: compile(&insert),
            modify: compile(&modify),
        }
    }

    /// Appends record `n` of shard `shard_index`, whose sequence number is `seq`.
    fn render(&self, out: &mut Vec<u8>, shard_index: u64, n: u64, seq: u128) {
        let g = n * self.shards + shard_index;
        let key = g % self.keys;
        let version = g / self.keys;
        let pieces = if version == 0 {
            &self.insert
        } else {
            &self.modify
        };
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.extend_from_slice(t.as_bytes()),
                Piece::EventId => push_hex32(out, seq ^ 0x5eed_0000_0000_0000_0000_0000_0000_5eed),
                Piece::Key => push_decimal(out, u128::from(key)),
                Piece::Version => push_decimal(out, u128::from(version)),
                Piece::OldVersion => push_decimal(out, u128::from(version.saturating_sub(1))),
                Piece::Sequence => push_decimal(out, seq),
            }
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut v: u128) {
    let mut buf = [0u8; 40];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_hex32(out: &mut Vec<u8>, v: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((v >> (124 - 4 * i)) & 0xf) as usize];
    }
    out.extend_from_slice(&buf);
}

/// The GetRecords response body for `page`.
pub(super) fn records_body(page: &Page) -> Vec<u8> {
    let stored_len: usize = page.stored.iter().map(|r| r.len() + 1).sum();
    let generated_len = page.generated.as_ref().map_or(0, |(g, _, from, to)| {
        g.template.record_len * (to - from) as usize
    });
    let mut out = Vec::with_capacity(64 + stored_len + generated_len + 256);
    out.extend_from_slice(br#"{"Records":["#);
    let mut first = true;
    if let Some((g, base, from, to)) = &page.generated {
        for n in *from..*to {
            if !first {
                out.push(b',');
            }
            first = false;
            g.template
                .render(&mut out, g.shard_index, n, base + u128::from(n));
        }
    }
    for r in &page.stored {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(r.as_bytes());
    }
    out.push(b']');
    if let Some(next) = &page.next_iterator {
        out.extend_from_slice(br#","NextShardIterator":""#);
        out.extend_from_slice(next.as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    out
}

/// Items of an [`add_generated_items`](super::StreamsDouble::add_generated_items) batch:
/// item `n` is `{"<key>":{"S":"item-<n, zero-padded>"},"n":{"N":"<n>"},"pad":{"S":"xx…"}}`,
/// the pad bringing its DynamoDB size to about the batch's `item_bytes`.
#[derive(Debug)]
pub(super) struct ItemTemplate {
    /// `{"<key>":{"S":"item-` (the key name JSON-escaped).
    head: String,
    /// `"},"pad":{"S":"xx…"}}`.
    tail: String,
    /// Digits of the zero-padded number in the key.
    width: usize,
    /// DynamoDB size of an item without its `n` value.
    base_size: usize,
}

/// Decimal digits of `v`.
fn digits(mut v: u64) -> usize {
    let mut d = 1;
    while v >= 10 {
        v /= 10;
        d += 1;
    }
    d
}

impl ItemTemplate {
    /// Items numbered up to `last` (for the key width) of about `item_bytes` each.
    pub fn new(key_name: &str, last: u64, item_bytes: usize) -> Self {
        assert!(
            key_name != "n" && key_name != "pad",
            "streams double: generated items use the attributes n and pad besides the key"
        );
        let width = digits(last).max(6);
        // Sizes by DynamoDB's rules: names plus values; `n` counted on its own.
        let fixed = key_name.len() + "item-".len() + width + "n".len() + "pad".len();
        let pad = "x".repeat(item_bytes.saturating_sub(fixed + 4));
        let key = serde_json::to_string(key_name).expect("a string");
        Self {
            head: format!(r#"{{{key}:{{"S":"item-"#),
            tail: format!(r#""}},"pad":{{"S":"{pad}"}}}}"#),
            width,
            base_size: fixed + pad.len(),
        }
    }

    fn push_key_number(&self, out: &mut Vec<u8>, n: u64) {
        out.extend(std::iter::repeat_n(
            b'0',
            self.width.saturating_sub(digits(n)),
        ));
        push_decimal(out, u128::from(n));
    }

    /// The key value's JSON text, `{"S":"item-000001"}`.
    pub fn key_value_text(&self, n: u64) -> String {
        let mut out = br#"{"S":"item-"#.to_vec();
        self.push_key_number(&mut out, n);
        out.extend_from_slice(br#""}"#);
        String::from_utf8(out).expect("ASCII")
    }

    /// Item `n`'s DynamoDB size.
    pub fn size(&self, n: u64) -> usize {
        self.base_size + number_size(&n.to_string())
    }

    /// A generous length of one rendered item.
    pub fn rendered_len(&self) -> usize {
        self.head.len() + self.tail.len() + self.width + 40
    }

    /// Appends item `n`.
    pub fn render(&self, out: &mut Vec<u8>, n: u64) {
        out.extend_from_slice(self.head.as_bytes());
        self.push_key_number(out, n);
        out.extend_from_slice(br#""},"n":{"N":""#);
        push_decimal(out, u128::from(n));
        out.extend_from_slice(self.tail.as_bytes());
    }

    /// Item `n` as JSON.
    pub fn value(&self, n: u64) -> Value {
        let mut out = Vec::with_capacity(self.rendered_len());
        self.render(&mut out, n);
        serde_json::from_slice(&out).expect("a generated item is JSON")
    }
}

/// The Scan response body for `page`.
pub(super) fn scan_body(page: &ScanPage) -> Vec<u8> {
    let len: usize = page
        .items
        .iter()
        .map(|i| match i {
            PageItem::Plain(json) => json.len() + 1,
            PageItem::Generated(t, _) => t.rendered_len(),
        })
        .sum();
    let mut out = Vec::with_capacity(len + 512);
    out.extend_from_slice(br#"{"Items":["#);
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match item {
            PageItem::Plain(json) => out.extend_from_slice(json.as_bytes()),
            PageItem::Generated(t, n) => t.render(&mut out, *n),
        }
    }
    out.extend_from_slice(br#"],"Count":"#);
    push_decimal(&mut out, page.items.len() as u128);
    out.extend_from_slice(br#","ScannedCount":"#);
    push_decimal(&mut out, page.items.len() as u128);
    if let Some(key) = &page.last_key {
        out.extend_from_slice(br#","LastEvaluatedKey":"#);
        serde_json::to_writer(&mut out, key).expect("serializable");
    }
    if let Some(consumed) = &page.consumed {
        out.extend_from_slice(br#","ConsumedCapacity":"#);
        serde_json::to_writer(&mut out, consumed).expect("serializable");
    }
    out.push(b'}');
    out
}

/// Escapes text for an XML element.
pub(super) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}
