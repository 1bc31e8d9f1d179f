//! A table's items, as DynamoDB `Scan` serves them: kept in scan order (the hash of the
//! partition key, then the key's text), with their DynamoDB sizes; parallel-scan segments
//! are ranges of that hash. Generated items are one small entry each and are rendered from
//! their template only when a page is served.
//!
//! ```text
//!  put/update/delete/insert_items ─▶ ItemStore (BTreeMap: (hash, key text) ─▶ item)
//!  add_generated_items ─────────────▶   └─ Generated(template, n): no JSON kept
//!  Scan ─▶ segment's hash range, after ExclusiveStartKey ─▶ Limit / 1 MB ─▶ ScanPage
//! ```

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value};

use super::render::ItemTemplate;
use super::KeySchema;

/// Where an item is in scan order: the hash of its partition key, then the text of its key
/// values (each followed by `\0`).
pub(super) type ScanKey = (u64, String);

/// The most items a Scan page holds (the default Limit).
pub(super) const SCAN_PAGE_ITEMS: usize = 1000;

/// The most item data a Scan page holds (DynamoDB's 1 MB).
pub(super) const SCAN_PAGE_BYTES: usize = 1 << 20;

/// One read capacity unit reads this much (strongly consistent; half a unit eventually).
pub(super) const READ_UNIT_BYTES: usize = 4096;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The partition key's place in the hash space: FNV-1a of its JSON text (`{"S":"a"}`), then
/// MurmurHash3's finalizer so that keys differing in their last characters spread over the
/// whole range (segments are ranges of it).
pub(super) fn partition_hash(value_text: &str) -> u64 {
    let mut h = fnv1a(value_text.as_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The parallel-scan segment of a hash: the hash space split into `total` equal ranges.
pub(super) fn segment_of(hash: u64, total: u32) -> u32 {
    ((u128::from(hash) * u128::from(total)) >> 64) as u32
}

/// The first hash of a segment (`None`: past the end, `segment == total`).
fn segment_start(segment: u32, total: u32) -> Option<u64> {
    let start = (u128::from(segment) << 64).div_ceil(u128::from(total));
    u64::try_from(start).ok()
}

/// A number's DynamoDB size: one byte per two significant digits, plus one.
pub(super) fn number_size(text: &str) -> usize {
    let mantissa = text
        .trim_start_matches(['-', '+'])
        .split(['e', 'E'])
        .next()
        .unwrap_or("");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

fn binary_size(text: &str) -> usize {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_or(text.len() * 3 / 4, |b| b.len())
}

/// An attribute value's DynamoDB size (without its name): S its UTF-8 bytes, N see
/// [`number_size`], B its decoded bytes, BOOL and NULL 1, sets the sum of their elements,
/// M and L 3 plus 1 per element plus the elements (and M's names).
pub(super) fn value_size(value: &Value) -> usize {
    let Some((kind, v)) = value.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    let strings = || v.as_array().into_iter().flatten().filter_map(Value::as_str);
    match kind.as_str() {
        "S" => v.as_str().map_or(0, str::len),
        "N" => v.as_str().map_or(0, number_size),
        "B" => v.as_str().map_or(0, binary_size),
        "BOOL" | "NULL" => 1,
        "SS" => strings().map(str::len).sum(),
        "NS" => strings().map(number_size).sum(),
        "BS" => strings().map(binary_size).sum(),
        "L" => {
            3 + v
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| 1 + value_size(e))
                .sum::<usize>()
        }
        "M" => {
            3 + v
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, e)| 1 + k.len() + value_size(e))
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// An item's DynamoDB size: its attribute names and values.
pub(super) fn item_size(item: &Value) -> usize {
    item.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| k.len() + value_size(v))
        .sum()
}

/// Read capacity for `bytes` of items: one unit per 4 KB, rounded up (at least one), half
/// for an eventually consistent read.
pub(super) fn read_units(bytes: usize, consistent: bool) -> f64 {
    let units = bytes.div_ceil(READ_UNIT_BYTES).max(1) as f64;
    if consistent {
        units
    } else {
        units / 2.0
    }
}

#[derive(Debug, Clone)]
enum StoredItem {
    /// Written by the script: the item, its rendered JSON and size.
    Plain {
        value: Value,
        json: Arc<str>,
        size: usize,
    },
    /// Item `n` of a generated batch.
    Generated { template: Arc<ItemTemplate>, n: u64 },
}

impl StoredItem {
    fn size(&self) -> usize {
        match self {
            StoredItem::Plain { size, .. } => *size,
            StoredItem::Generated { template, n } => template.size(*n),
        }
    }

    fn value(&self) -> Value {
        match self {
            StoredItem::Plain { value, .. } => value.clone(),
            StoredItem::Generated { template, n } => template.value(*n),
        }
    }
}

/// An item of a Scan page, rendered outside the lock.
#[derive(Debug, Clone)]
pub(super) enum PageItem {
    Plain(Arc<str>),
    Generated(Arc<ItemTemplate>, u64),
}

/// One Scan page.
#[derive(Debug, Default)]
pub(super) struct ScanPage {
    pub items: Vec<PageItem>,
    /// DynamoDB size of the items.
    pub bytes: usize,
    /// The last item's key, when the segment has more items.
    pub last_key: Option<Value>,
    /// Read capacity the page consumed.
    pub units: f64,
    /// The ConsumedCapacity to answer with, when asked for.
    pub consumed: Option<Value>,
}

/// A table's current items.
#[derive(Debug, Default)]
pub(super) struct ItemStore {
    items: BTreeMap<ScanKey, StoredItem>,
    /// Sum of the items' sizes.
    bytes: usize,
    /// Items generated so far (the next batch is numbered after them).
    generated: u64,
}

/// The key attributes of an item: its scan key and its key map. `None` when an attribute of
/// the schema is missing, or (`typed`) not a single value of the schema's type.
pub(super) fn key_of(
    schema: &KeySchema,
    item: &Map<String, Value>,
    typed: bool,
) -> Option<(ScanKey, Value)> {
    let mut keys = Map::new();
    let mut text = String::new();
    let mut hash = 0;
    for (i, attr) in std::iter::once(&schema.hash)
        .chain(schema.range.as_ref())
        .enumerate()
    {
        let v = item.get(&attr.name)?;
        if typed {
            let o = v.as_object().filter(|o| o.len() == 1)?;
            o.get(&attr.attr_type)?;
        }
        let value_text = v.to_string();
        if i == 0 {
            hash = partition_hash(&value_text);
        }
        text.push_str(&value_text);
        text.push('\u{0}');
        keys.insert(attr.name.clone(), v.clone());
    }
    Some(((hash, text), Value::Object(keys)))
}

impl ItemStore {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&self, key: &ScanKey) -> Option<Value> {
        self.items.get(key).map(StoredItem::value)
    }

    fn insert(&mut self, key: ScanKey, item: StoredItem) {
        self.bytes += item.size();
        if let Some(old) = self.items.insert(key, item) {
            self.bytes -= old.size();
        }
    }

    pub fn put(&mut self, key: ScanKey, value: Value) {
        let json: Arc<str> = value.to_string().into();
        let size = item_size(&value);
        self.insert(key, StoredItem::Plain { value, json, size });
    }

    pub fn remove(&mut self, key: &ScanKey) {
        if let Some(old) = self.items.remove(key) {
            self.bytes -= old.size();
        }
    }

    /// Adds `count` generated items keyed `item-000001`… (numbered after earlier batches)
    /// on the string partition key `key_name`.
    pub fn generate(&mut self, key_name: &str, count: usize, item_bytes: usize) {
        let first = self.generated + 1;
        let last = self.generated + count as u64;
        let template = Arc::new(ItemTemplate::new(key_name, last, item_bytes));
        for n in first..=last {
            let value_text = template.key_value_text(n);
            let hash = partition_hash(&value_text);
            let mut text = value_text;
            text.push('\u{0}');
            self.insert(
                (hash, text),
                StoredItem::Generated {
                    template: template.clone(),
                    n,
                },
            );
        }
        self.generated = last;
    }

    /// Every item, in scan order.
    pub fn values(&self) -> Vec<Value> {
        self.items.values().map(StoredItem::value).collect()
    }

    /// A page of segment `segment` of `total` (the whole table for `(0, 1)`), after `start`
    /// (exclusive), at most `limit` items and [`SCAN_PAGE_BYTES`] of data (at least one item).
    pub fn page(
        &self,
        schema: &KeySchema,
        segment: u32,
        total: u32,
        start: Option<&ScanKey>,
        limit: usize,
    ) -> ScanPage {
        let lo = match start {
            Some(key) => Bound::Excluded(key.clone()),
            None => match segment_start(segment, total) {
                Some(h) => Bound::Included((h, String::new())),
                None => Bound::Unbounded,
            },
        };
        let hi = match segment_start(segment + 1, total) {
            Some(h) => Bound::Excluded((h, String::new())),
            None => Bound::Unbounded,
        };
        let mut page = ScanPage::default();
        let mut range = self.items.range((lo, hi)).peekable();
        let mut last = None;
        while let Some((key, item)) = range.peek() {
            let size = item.size();
            let full = page.items.len() >= limit
                || (!page.items.is_empty() && page.bytes + size > SCAN_PAGE_BYTES);
            if full {
                break;
            }
            page.bytes += size;
            page.items.push(match item {
                StoredItem::Plain { json, .. } => PageItem::Plain(json.clone()),
                StoredItem::Generated { template, n } => PageItem::Generated(template.clone(), *n),
            });
            last = Some((*key, *item));
            range.next();
        }
        if range.peek().is_some() {
            if let Some((_, item)) = last {
                let value = item.value();
                let obj = value.as_object().expect("items are objects");
                page.last_key = key_of(schema, obj, false).map(|(_, keys)| keys);
            }
        }
        page
    }
}

/// The segment of an item with this scan key.
pub(super) fn segment_of_key(key: &ScanKey, total: u32) -> u32 {
    segment_of(key.0, total)
}
