//! Targeted cache control (RFC 9213): response fields whose directives address one cache or a
//! class of caches instead of every cache `Cache-Control` addresses. imgedge's target list is
//! its own field (`[cache] targeted_field`, `Imgedge-Cache-Control` by default) then
//! `CDN-Cache-Control` (§3: every CDN cache): the first with a valid value governs what imgedge
//! stores and for how long, and `Cache-Control` and `Expires` are then ignored for that (§2).
//!
//! A targeted field is a Structured Field Dictionary (RFC 8941 §3.2): a field that does not parse
//! as one is ignored as a whole, as if absent (§2.1); so is an empty one. Directives take the
//! types RFC 9111's arguments infer (§2.1): delta-seconds are Integers (a decimal, a string or a
//! negative number is not consumed: the directive is ignored), directives without an argument
//! are Booleans (`?0` means absent). Parameters on members are ignored.

use http::HeaderMap;

use super::{ResponseDirectives, delta_seconds};

/// `CDN-Cache-Control` (RFC 9213 §3).
pub const CDN_CACHE_CONTROL: &str = "cdn-cache-control";

/// A Structured Field bare item, as far as cache directives need one (RFC 8941 §3.3).
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Integer(i64),
    Decimal,
    String(String),
    Token(String),
    Bytes,
    Boolean(bool),
    /// An inner list (`private=("a" "b")`).
    List,
}

/// Whether `value` parses as a non-empty Structured Field Dictionary (RFC 8941 §3.2), as a
/// targeted cache-control field must (RFC 9213 §2.1).
pub fn is_dictionary(value: &str) -> bool {
    parse_dictionary(value).is_some_and(|m| !m.is_empty())
}

/// Parses a Dictionary (RFC 8941 §4.2.2): its members in order (a key given twice keeps its last
/// value, §3.2); `None` on any syntax error.
fn parse_dictionary(input: &str) -> Option<Vec<(String, Item)>> {
    let mut p = Parser {
        bytes: input.as_bytes(),
        at: 0,
    };
    let mut members: Vec<(String, Item)> = Vec::new();
    p.skip_sp();
    if p.done() {
        return Some(members);
    }
    loop {
        let key = p.key()?;
        let value = if p.eat(b'=') {
            if p.peek() == Some(b'(') {
                p.inner_list()?;
                Item::List
            } else {
                p.bare_item()?
            }
        } else {
            Item::Boolean(true)
        };
        p.parameters()?;
        members.retain(|(k, _)| *k != key);
        members.push((key, value));
        p.skip_ows();
        if p.done() {
            return Some(members);
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        if p.done() {
            // a trailing comma
            return None;
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<String> {
        let start = self.at;
        match self.peek() {
            Some(b'a'..=b'z' | b'*') => self.at += 1,
            _ => return None,
        }
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')
        ) {
            self.at += 1;
        }
        Some(String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned())
    }

    /// `*( ";" *SP key [ "=" bare-item ] )`
    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip_sp();
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    /// `"(" *SP [ item *( 1*SP item ) *SP ] ")" parameters`
    fn inner_list(&mut self) -> Option<()> {
        if !self.eat(b'(') {
            return None;
        }
        loop {
            self.skip_sp();
            if self.eat(b')') {
                return self.parameters();
            }
            self.bare_item()?;
            self.parameters()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().map(Item::String),
            b'*' | b'A'..=b'Z' | b'a'..=b'z' => Some(Item::Token(self.token())),
            b':' => self.byte_sequence(),
            b'?' => self.boolean(),
            _ => None,
        }
    }

    /// An Integer (at most 15 digits) or a Decimal (at most 12 digits, a point, 1–3 digits).
    fn number(&mut self) -> Option<Item> {
        let negative = self.eat(b'-');
        let start = self.at;
        let mut point = None;
        while let Some(b) = self.peek() {
            match b {
                b'0'..=b'9' => self.at += 1,
                b'.' if point.is_none() => {
                    point = Some(self.at);
                    self.at += 1;
                }
                _ => break,
            }
        }
        let digits = &self.bytes[start..self.at];
        match point {
            None => {
                if digits.is_empty() || digits.len() > 15 {
                    return None;
                }
                let n: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
                Some(Item::Integer(if negative { -n } else { n }))
            }
            Some(p) => {
                let (int, frac) = (p - start, self.at - p - 1);
                ((1..=12).contains(&int) && (1..=3).contains(&frac)).then_some(Item::Decimal)
            }
        }
    }

    fn string(&mut self) -> Option<String> {
        self.at += 1; // the opening quote
        let mut out = String::new();
        loop {
            let b = self.peek()?;
            self.at += 1;
            match b {
                b'"' => return Some(out),
                b'\\' => {
                    let escaped = self.peek()?;
                    if escaped != b'"' && escaped != b'\\' {
                        return None;
                    }
                    self.at += 1;
                    out.push(escaped as char);
                }
                0x20..=0x7E => out.push(b as char),
                _ => return None,
            }
        }
    }

    fn token(&mut self) -> String {
        let start = self.at;
        self.at += 1;
        while let Some(b) = self.peek() {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b);
            if !tchar {
                break;
            }
            self.at += 1;
        }
        String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned()
    }

    fn byte_sequence(&mut self) -> Option<Item> {
        self.at += 1;
        while let Some(b) = self.peek() {
            self.at += 1;
            match b {
                b':' => return Some(Item::Bytes),
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' | b'=' => {}
                _ => return None,
            }
        }
        None
    }

    fn boolean(&mut self) -> Option<Item> {
        self.at += 1;
        let value = match self.peek()? {
            b'1' => true,
            b'0' => false,
            _ => return None,
        };
        self.at += 1;
        Some(Item::Boolean(value))
    }
}

/// The directives of the first field of the target list — `field` (imgedge's own, when given),
/// then `CDN-Cache-Control` — with a valid value, and which field it was; `None` when none has
/// one: `Cache-Control` applies.
pub(super) fn targeted_directives(
    headers: &HeaderMap,
    field: Option<&str>,
) -> Option<(ResponseDirectives, &'static str)> {
    [field, Some(CDN_CACHE_CONTROL)]
        .into_iter()
        .flatten()
        .find_map(|name| {
            let lines: Vec<&str> = headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().ok())
                .collect::<Option<_>>()?;
            if lines.is_empty() {
                return None;
            }
            // several field lines are one field, joined with commas (RFC 8941 §4.2)
            let members = parse_dictionary(&lines.join(", "))?;
            if members.is_empty() {
                return None;
            }
            let which = if name == CDN_CACHE_CONTROL {
                CDN_CACHE_CONTROL
            } else {
                "targeted"
            };
            Some((directives_of(&members), which))
        })
}

/// Cache directives from dictionary members, each consumed only with the type its RFC 9111
/// argument implies.
fn directives_of(members: &[(String, Item)]) -> ResponseDirectives {
    let mut d = ResponseDirectives::default();
    let seconds = |item: &Item| match item {
        Item::Integer(n) if *n >= 0 => delta_seconds(&n.to_string()),
        _ => None,
    };
    for (key, item) in members {
        let on = match item {
            Item::Boolean(b) => *b,
            // `private` and `no-cache` may name fields: taken as unqualified (stricter)
            Item::List | Item::String(_) | Item::Token(_) => {
                matches!(key.as_str(), "private" | "no-cache")
            }
            _ => false,
        };
        match key.as_str() {
            "no-store" => d.no_store |= on,
            "private" => d.private |= on,
            "no-cache" => d.no_cache |= on,
            "public" => d.public |= on,
            "must-revalidate" | "proxy-revalidate" => d.must_revalidate |= on,
            "must-understand" => d.must_understand |= on,
            "max-age" => d.max_age = seconds(item).or(d.max_age),
            "s-maxage" => d.s_maxage = seconds(item).or(d.s_maxage),
            "stale-while-revalidate" => {
                d.stale_while_revalidate = seconds(item).or(d.stale_while_revalidate);
            }
            "stale-if-error" => d.stale_if_error = seconds(item).or(d.stale_if_error),
            _ => {}
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn cdn(value: &str) -> Option<ResponseDirectives> {
        targeted_directives(&headers(&[("cdn-cache-control", value)]), None).map(|(d, _)| d)
    }

    #[test]
    fn dictionaries_parse_as_rfc_8941_has_them() {
        let d = cdn("max-age=600, stale-while-revalidate=30, must-revalidate").unwrap();
        assert_eq!(d.max_age, Some(600));
        assert_eq!(d.stale_while_revalidate, Some(30));
        assert!(d.must_revalidate);
        // parameters are ignored; the last of a repeated key wins
        let d = cdn("max-age=1;a=b, max-age=60, no-store;x").unwrap();
        assert_eq!(d.max_age, Some(60));
        assert!(d.no_store);
        // booleans: ?0 is absent
        assert!(!cdn("no-store=?0").unwrap().no_store);
        assert!(
            cdn("private=(\"set-cookie\"), x=\"y\", z=:AQ==:")
                .unwrap()
                .private
        );
        assert!(cdn("no-cache=\"set-cookie\"").unwrap().no_cache);
        // an unregistered directive alone (RFC 9213 §3.1's `none`) is a valid field
        assert_eq!(cdn("none"), Some(ResponseDirectives::default()));
    }

    #[test]
    fn values_of_the_wrong_type_are_not_consumed() {
        assert_eq!(cdn("max-age=1.5").unwrap().max_age, None);
        assert_eq!(cdn("max-age=\"60\"").unwrap().max_age, None);
        assert_eq!(cdn("max-age=-1").unwrap().max_age, None);
        assert_eq!(cdn("max-age=abc").unwrap().max_age, None);
        assert!(!cdn("no-store=1").unwrap().no_store);
        // too large is 2^31 (RFC 9111 §1.2.2)
        assert_eq!(
            cdn("max-age=999999999999999").unwrap().max_age,
            Some(1 << 31)
        );
    }

    #[test]
    fn an_invalid_field_is_ignored_as_a_whole() {
        for bad in [
            "max-age=60,",
            "Max-Age=60",
            "max-age=60 no-store",
            "max-age=60;",
            "max-age==60",
            "max-age=1234567890123456",
            "max-age=\"unterminated",
            "private=(\"a\"",
            ",max-age=60",
            "max-age=60, , no-store",
            "max-age=?2",
        ] {
            assert_eq!(cdn(bad), None, "{bad}");
        }
        // empty: ignored too (Cache-Control applies)
        assert_eq!(cdn(""), None);
    }

    #[test]
    fn the_target_list_is_imgedge_s_own_field_then_cdn_cache_control() {
        let h = headers(&[
            ("cdn-cache-control", "max-age=60"),
            ("imgedge-cache-control", "max-age=5"),
        ]);
        let (d, which) = targeted_directives(&h, Some("imgedge-cache-control")).unwrap();
        assert_eq!((d.max_age, which), (Some(5), "targeted"));
        // imgedge's own field invalid: the next valid one
        let h = headers(&[
            ("cdn-cache-control", "max-age=60"),
            ("imgedge-cache-control", "max-age=5,"),
        ]);
        let (d, which) = targeted_directives(&h, Some("imgedge-cache-control")).unwrap();
        assert_eq!((d.max_age, which), (Some(60), CDN_CACHE_CONTROL));
        // several lines are one field
        let h = headers(&[
            ("cdn-cache-control", "max-age=60"),
            ("cdn-cache-control", "no-store"),
        ]);
        let (d, _) = targeted_directives(&h, None).unwrap();
        assert!(d.no_store && d.max_age == Some(60));
        assert!(targeted_directives(&HeaderMap::new(), Some("imgedge-cache-control")).is_none());
    }
}
