//! A GetRecords body read by hand, into the same borrowed values the serde reader
//! ([`super::parse`]) builds, each record converted as soon as it is read.
//!
//! serde_json's reader was 30% of the daemon's CPU at full throughput: a visitor call per
//! token, the derive's field matching, a `Deserializer` layer per value. This reader knows
//! the one shape a GetRecords response has and walks it directly: a string without escapes
//! is found eight bytes at a time and borrowed; one with escapes is decoded into an owned
//! `String`, as serde_json does.
//!
//! It answers the same as serde_json or not at all: anything it is not sure of (any syntax
//! error, a repeated member, an array where serde's derive also accepts one, nesting over
//! [`MAX_DEPTH`], a record outside the fast path) is [`Unsure`], and the caller reads the
//! body again with serde_json, which then decides and names the error. Property tests
//! and the fuzz target check that a page read here is read the same by serde_json
//! ([`super::check_readers_agree`]).

use std::borrow::Cow;

use super::{
    checked_base64, checked_number, sort_keeping_last, Attr, AttrMap, Identity, Num, PageState,
    Rec, StreamRec, Text,
};

/// The body is not one this reader is sure of: read it with serde_json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unsure;

type Read<T> = Result<T, Unsure>;

/// Objects and arrays nested deeper than this are left to serde_json (whose own limit is
/// 128, so everything read here is within it). DynamoDB allows 32 levels of attributes.
const MAX_DEPTH: usize = 100;

/// Reads a whole GetRecords response, converting its records into `page`; the
/// `NextShardIterator`.
pub(super) fn read_page(text: &str, page: &mut PageState<'_>) -> Read<Option<String>> {
    let mut s = Scan {
        text,
        bytes: text.as_bytes(),
        at: 0,
        depth: 0,
    };
    let next = s.page(page)?;
    s.ws();
    if s.at != s.bytes.len() {
        return Err(Unsure);
    }
    Ok(next)
}

struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    depth: usize,
}

/// Marks member `i` as read; a second time is serde's "duplicate field" error.
fn once(seen: &mut u32, i: usize) -> Read<()> {
    let bit = 1 << i;
    if *seen & bit != 0 {
        return Err(Unsure);
    }
    *seen |= bit;
    Ok(())
}

impl<'a> Scan<'a> {
    // ---- the response's shape --------------------------------------------------------------

    /// `{"Records": [...], "NextShardIterator": "..."}`, other members skipped.
    fn page(&mut self, page: &mut PageState<'_>) -> Read<Option<String>> {
        let (mut records, mut next) = (false, None);
        self.members(&["Records", "NextShardIterator"], |s, member| {
            if member == 0 {
                records = true;
                s.nested(|s| {
                    s.array(|s| {
                        let rec = s.record()?;
                        if page.take(&rec) {
                            Ok(())
                        } else {
                            Err(Unsure)
                        }
                    })
                })
            } else {
                next = s.option(Self::string)?;
                Ok(())
            }
        })?;
        if !records {
            return Err(Unsure);
        }
        Ok(next.map(|t| t.0.into_owned()))
    }

    fn record(&mut self) -> Read<Rec<'a>> {
        let mut rec = Rec {
            event_id: None,
            event_name: None,
            dynamodb: None,
            user_identity: None,
        };
        self.members(
            &["eventID", "eventName", "dynamodb", "userIdentity"],
            |s, member| {
                match member {
                    0 => rec.event_id = s.option(Self::string)?,
                    1 => rec.event_name = s.option(Self::string)?,
                    2 => rec.dynamodb = s.option(Self::stream_record)?,
                    _ => rec.user_identity = s.option(Self::identity)?,
                }
                Ok(())
            },
        )?;
        Ok(rec)
    }

    fn stream_record(&mut self) -> Read<StreamRec<'a>> {
        let mut rec = StreamRec {
            approximate_creation_date_time: None,
            keys: None,
            new_image: None,
            old_image: None,
            sequence_number: None,
        };
        self.members(
            &[
                "ApproximateCreationDateTime",
                "Keys",
                "NewImage",
                "OldImage",
                "SequenceNumber",
            ],
            |s, member| {
                match member {
                    0 => rec.approximate_creation_date_time = s.option(Self::float)?,
                    1 => rec.keys = s.option(Self::map)?,
                    2 => rec.new_image = s.option(Self::map)?,
                    3 => rec.old_image = s.option(Self::map)?,
                    _ => rec.sequence_number = s.option(Self::string)?,
                }
                Ok(())
            },
        )?;
        Ok(rec)
    }

    fn identity(&mut self) -> Read<Identity<'a>> {
        let mut id = Identity {
            principal_id: None,
            r#type: None,
        };
        self.members(&["PrincipalId", "Type"], |s, member| {
            match member {
                0 => id.principal_id = s.option(Self::string)?,
                _ => id.r#type = s.option(Self::string)?,
            }
            Ok(())
        })?;
        Ok(id)
    }

    /// An object read as serde's derive reads a struct: `read` called with the index in
    /// `names` of each member it knows, other members skipped, a member twice is serde's
    /// "duplicate field" error.
    fn members(
        &mut self,
        names: &[&str],
        mut read: impl FnMut(&mut Self, usize) -> Read<()>,
    ) -> Read<()> {
        let mut seen = 0u32;
        self.nested(|s| {
            s.object(
                |s, key| match names.iter().position(|n| *n == key.0.as_ref()) {
                    Some(i) => {
                        once(&mut seen, i)?;
                        read(s, i)
                    }
                    None => s.skip(),
                },
            )
        })
    }

    /// An item, key or `M`: sorted by name, the last of equal names kept (as the serde
    /// reader's [`AttrMap`]).
    fn map(&mut self) -> Read<AttrMap<'a>> {
        let mut entries = Vec::with_capacity(8);
        self.nested(|s| {
            s.object(|s, name| {
                entries.push((name, s.attr()?));
                Ok(())
            })
        })?;
        sort_keeping_last(&mut entries);
        Ok(AttrMap(entries))
    }

    /// `{"<type>": value}`, exactly one member, checked as the serde reader checks it.
    fn attr(&mut self) -> Read<Attr<'a>> {
        self.nested(|s| {
            s.expect(b'{')?;
            let kind = s.string()?;
            s.expect(b':')?;
            let value = match kind.0.as_ref() {
                "S" => Attr::S(s.string()?),
                "N" => Attr::N(s.number_string()?),
                "B" => Attr::B(s.base64_string()?),
                "BOOL" => Attr::Bool(s.boolean()?),
                "NULL" => {
                    s.boolean()?;
                    Attr::Null
                }
                "M" => Attr::M(s.map()?),
                "L" => Attr::L(s.list(Self::attr)?),
                "SS" => Attr::Ss(s.list(Self::string)?),
                "NS" => Attr::Ns(s.list(Self::number_string)?),
                "BS" => Attr::Bs(s.list(Self::base64_string)?),
                _ => return Err(Unsure),
            };
            s.expect(b'}')?;
            Ok(value)
        })
    }

    fn number_string(&mut self) -> Read<Num<'a>> {
        checked_number::<serde_json::Error>(self.string()?).map_err(|_| Unsure)
    }

    fn base64_string(&mut self) -> Read<Text<'a>> {
        checked_base64::<serde_json::Error>(self.string()?).map_err(|_| Unsure)
    }

    /// `[...]` as a vector (the array's own nesting counted).
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Read<T>) -> Read<Vec<T>> {
        let mut out = Vec::new();
        self.nested(|s| {
            s.array(|s| {
                out.push(item(s)?);
                Ok(())
            })
        })?;
        Ok(out)
    }

    // ---- JSON ------------------------------------------------------------------------------

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, b: u8) -> Read<()> {
        if self.peek() == Some(b) {
            self.at += 1;
            Ok(())
        } else {
            Err(Unsure)
        }
    }

    /// One level of nesting deeper for `f`.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Read<T>) -> Read<T> {
        if self.depth >= MAX_DEPTH {
            return Err(Unsure);
        }
        self.depth += 1;
        let out = f(self)?;
        self.depth -= 1;
        Ok(out)
    }

    /// An object, `member` called with each name, positioned at its value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, Text<'a>) -> Read<()>) -> Read<()> {
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            member(self, name)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Unsure),
            }
        }
    }

    /// An array, `item` called at each element.
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Read<()>) -> Read<()> {
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Unsure),
            }
        }
    }

    /// `null` as `None`, else `value`.
    fn option<T>(&mut self, value: impl FnOnce(&mut Self) -> Read<T>) -> Read<Option<T>> {
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            Ok(None)
        } else {
            value(self).map(Some)
        }
    }

    fn literal(&mut self, word: &[u8]) -> Read<()> {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(Unsure)
        }
    }

    fn boolean(&mut self) -> Read<bool> {
        match self.peek() {
            Some(b't') => self.literal(b"true").map(|()| true),
            Some(b'f') => self.literal(b"false").map(|()| false),
            _ => Err(Unsure),
        }
    }

    /// A number's text, checked against JSON's grammar.
    fn number_text(&mut self) -> Read<&'a str> {
        self.ws();
        let start = self.at;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
        }
        let text = &self.text[start..self.at];
        if super::is_json_number(text.as_bytes()) {
            Ok(text)
        } else {
            Err(Unsure)
        }
    }

    /// A number as serde_json reads it into an `f64` (its own conversion, so the same value
    /// to the bit).
    fn float(&mut self) -> Read<f64> {
        serde_json::from_str(self.number_text()?).map_err(|_| Unsure)
    }

    /// Any value, checked and passed over.
    fn skip(&mut self) -> Read<()> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => self.nested(|s| s.object(|s, _| s.skip())),
            Some(b'[') => self.nested(|s| s.array(Self::skip)),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(_) => self.number_text().map(drop),
            None => Err(Unsure),
        }
    }

    /// A string: borrowed from the body when it has no escapes, else decoded.
    fn string(&mut self) -> Read<Text<'a>> {
        self.expect(b'"')?;
        let start = self.at;
        let end = find_special(self.bytes, start);
        match self.bytes.get(end) {
            Some(b'"') => {
                self.at = end + 1;
                // The body is UTF-8 and `"` is ASCII: both ends are character boundaries.
                Ok(Text(Cow::Borrowed(&self.text[start..end])))
            }
            Some(b'\\') => self.escaped(start, end),
            // A control character (serde_json refuses it unescaped) or the end of the body.
            _ => Err(Unsure),
        }
    }

    /// The rest of a string from its first escape at `at`.
    fn escaped(&mut self, start: usize, mut at: usize) -> Read<Text<'a>> {
        let mut out = String::with_capacity(at - start + 16);
        out.push_str(&self.text[start..at]);
        loop {
            match self.bytes.get(at) {
                Some(b'"') => {
                    self.at = at + 1;
                    return Ok(Text(Cow::Owned(out)));
                }
                Some(b'\\') => {
                    let c = *self.bytes.get(at + 1).ok_or(Unsure)?;
                    at += 2;
                    out.push(match c {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let (c, len) = self.unicode_escape(at)?;
                            at += len;
                            c
                        }
                        _ => return Err(Unsure),
                    });
                }
                Some(0..=0x1f) | None => return Err(Unsure),
                Some(_) => {
                    let end = find_special(self.bytes, at);
                    out.push_str(&self.text[at..end]);
                    at = end;
                }
            }
        }
    }

    /// The character of a `\u` escape whose hex digits start at `at` (a surrogate pair
    /// takes the second escape too), and how many bytes it took after the `\u`.
    fn unicode_escape(&self, at: usize) -> Read<(char, usize)> {
        let hex = |at: usize| -> Read<u32> {
            let digits = self.bytes.get(at..at + 4).ok_or(Unsure)?;
            let mut v = 0;
            for &d in digits {
                v = v * 16 + char::from(d).to_digit(16).ok_or(Unsure)?;
            }
            Ok(v)
        };
        let first = hex(at)?;
        match first {
            0xD800..=0xDBFF => {
                if self.bytes.get(at + 4..at + 6) != Some(b"\\u") {
                    return Err(Unsure);
                }
                let second = hex(at + 6)?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(Unsure);
                }
                let c = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                Ok((char::from_u32(c).ok_or(Unsure)?, 10))
            }
            0xDC00..=0xDFFF => Err(Unsure),
            _ => Ok((char::from_u32(first).ok_or(Unsure)?, 4)),
        }
    }
}

/// The index of the first `"`, `\` or control character at or after `from` (the body's
/// length if none): eight bytes at a time, then byte by byte within the word that has one.
fn find_special(bytes: &[u8], mut from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(from..from + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        // A byte of zero in `quote`/`backslash`, or a byte under 0x20 in `w`: the high bit
        // is set in some byte exactly when the word holds one of them.
        let found = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        if found & HIGH != 0 {
            break;
        }
        from += 8;
    }
    while let Some(&b) = bytes.get(from) {
        if matches!(b, b'"' | b'\\' | 0..=0x1f) {
            break;
        }
        from += 1;
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_scan_finds_the_first_special_byte_wherever_it_is() {
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    let mut bytes = vec![b'a'; len];
                    // Bytes that are near the specials' values but not specials.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        *b = [b'a', b' ', b'#', b'[', b']', 0x7f, 0xc3, 0xa9][i % 8];
                    }
                    if at < len {
                        bytes[at] = special;
                    }
                    assert_eq!(find_special(&bytes, 0), at, "len {len}, at {at}, {special}");
                }
            }
        }
    }
}
