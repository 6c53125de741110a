//! The entry format of every tier below memory: one complete [`CachedObject`] as bytes.
//!
//! Version 1, integers big-endian: `IMGEDGE\x01`, status (u16), response time (u64 ms since the
//! epoch), freshness (lifetime, initial age, stale-while-revalidate, stale-if-error: u64 ms each;
//! must-revalidate: u8), header count (u32) and each header (name length u16, name, value length
//! u32, value), body length (u64) and body, then a CRC32 of everything before it.
//!
//! The CRC32 is always written. It is checked by [`decode`], for stores that keep bytes without
//! checking them; [`read`] skips it, for a store that has already checked the same bytes with a
//! checksum of its own (foyer's xxHash64 over every entry it reads), so that no read pays for two.
//! Either way the body is read once, into one allocation of exactly its length.

use std::io::{self, Read, Write};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::CachedObject;
use crate::freshness::Freshness;

/// `IMGEDGE` plus the entry format version.
pub(crate) const MAGIC: &[u8; 8] = b"IMGEDGE\x01";

/// Bytes before the header count: magic, status, response time, four durations, a flag.
const FIXED_BYTES: usize = MAGIC.len() + 2 + 8 + 4 * 8 + 1;

/// Why bytes are not an entry. Every one of them means: a miss, and remove it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryError {
    #[error("not an entry of this format version")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
    #[error("truncated entry: {0}")]
    Truncated(#[from] io::Error),
}

/// The size of `object`'s entry in bytes, as [`write()`] writes it.
pub(crate) fn encoded_len(object: &CachedObject) -> usize {
    let headers: usize = object
        .headers
        .iter()
        .map(|(k, v)| 2 + k.as_str().len() + 4 + v.len())
        .sum();
    FIXED_BYTES + 4 + headers + 8 + object.body.len() + 4
}

/// Writes `object`'s entry to `w`, the body straight from the object (no intermediate copy).
///
/// # Errors
/// The writer's.
pub(crate) fn write(object: &CachedObject, w: &mut impl Write) -> io::Result<()> {
    let mut w = Crc32Writer {
        inner: w,
        crc: crc32fast::Hasher::new(),
    };
    let mut fixed = Vec::with_capacity(FIXED_BYTES + 4);
    fixed.extend_from_slice(MAGIC);
    fixed.extend_from_slice(&object.status.as_u16().to_be_bytes());
    let since_epoch = object
        .response_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    fixed.extend_from_slice(&duration_ms(since_epoch).to_be_bytes());
    let f = &object.freshness;
    for d in [
        f.lifetime,
        f.initial_age,
        f.stale_while_revalidate,
        f.stale_if_error,
    ] {
        fixed.extend_from_slice(&duration_ms(d).to_be_bytes());
    }
    fixed.push(u8::from(f.must_revalidate));
    fixed.extend_from_slice(&(object.headers.len() as u32).to_be_bytes());
    w.write_all(&fixed)?;
    for (name, value) in &object.headers {
        w.write_all(&(name.as_str().len() as u16).to_be_bytes())?;
        w.write_all(name.as_str().as_bytes())?;
        w.write_all(&(value.len() as u32).to_be_bytes())?;
        w.write_all(value.as_bytes())?;
    }
    w.write_all(&(object.body.len() as u64).to_be_bytes())?;
    w.write_all(&object.body)?;
    let crc = w.crc.finalize();
    w.inner.write_all(&crc.to_be_bytes())
}

/// `object`'s entry as bytes.
pub(crate) fn encode(object: &CachedObject) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(object));
    write(object, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Reads one entry of at most `entry_len` bytes from `r`, without checking its CRC32: for a
/// store that checked these bytes itself. Everything else is checked (version, lengths against
/// `entry_len`, header syntax).
///
/// # Errors
/// [`EntryError`] for bytes that are not a whole entry of this version.
pub(crate) fn read(r: &mut impl Read, entry_len: usize) -> Result<CachedObject, EntryError> {
    let (mut object, body_len) = read_head(r, entry_len)?;
    object.body = read_vec(r, body_len, entry_len)?.into();
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc)?;
    Ok(object)
}

/// Reads an entry up to its body: the object without its body (empty) and the body's length.
fn read_head(r: &mut impl Read, entry_len: usize) -> Result<(CachedObject, usize), EntryError> {
    let mut fixed = [0u8; FIXED_BYTES + 4];
    r.read_exact(&mut fixed)?;
    let (magic, mut rest) = fixed.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(EntryError::Magic);
    }
    let status =
        StatusCode::from_u16(take_u16(&mut rest)).map_err(|_| EntryError::Malformed("status"))?;
    let response_time = SystemTime::UNIX_EPOCH + Duration::from_millis(take_u64(&mut rest));
    let mut d = || Duration::from_millis(take_u64(&mut rest));
    let (lifetime, initial_age, stale_while_revalidate, stale_if_error) = (d(), d(), d(), d());
    let must_revalidate = take_u8(&mut rest) != 0;
    let count = take_u32(&mut rest) as usize;
    let mut headers = HeaderMap::with_capacity(count.min(64));
    for _ in 0..count {
        let name_len = read_u16(r)? as usize;
        let name = HeaderName::from_bytes(&read_vec(r, name_len, entry_len)?)
            .map_err(|_| EntryError::Malformed("header name"))?;
        let value_len = read_u32(r)? as usize;
        let value = HeaderValue::from_bytes(&read_vec(r, value_len, entry_len)?)
            .map_err(|_| EntryError::Malformed("header value"))?;
        headers.append(name, value);
    }
    let body_len = read_u64(r)?;
    let body_len = usize::try_from(body_len).map_err(|_| EntryError::Malformed("length"))?;
    let object = CachedObject {
        status,
        headers,
        body: Bytes::new(),
        response_time,
        freshness: Freshness {
            lifetime,
            initial_age,
            must_revalidate,
            stale_while_revalidate,
            stale_if_error,
        },
    };
    Ok((object, body_len))
}

/// Reads the entry that is the whole of `entry`, checking its CRC32 first: for stores that keep
/// bytes without a checksum of their own. The body stays in `entry`'s allocation (moved to its
/// front and the rest cut off, in place), so a read holds one buffer of the entry's size, never
/// the entry and a copy of its body.
///
/// # Errors
/// [`EntryError::Checksum`] when any byte differs from what was written; [`EntryError`] for
/// bytes that are not one whole entry of this version (trailing bytes included).
pub(crate) fn decode(mut entry: Vec<u8>) -> Result<CachedObject, EntryError> {
    let Some(payload_len) = entry.len().checked_sub(4) else {
        return Err(EntryError::Malformed("length"));
    };
    let (payload, crc) = entry.split_at(payload_len);
    if crc32fast::hash(payload) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err(EntryError::Checksum);
    }
    let mut r = &entry[..];
    let (mut object, body_len) = read_head(&mut r, entry.len())?;
    let start = entry.len() - r.len();
    match r.len().checked_sub(4).map(|left| left.cmp(&body_len)) {
        Some(std::cmp::Ordering::Equal) => {}
        Some(std::cmp::Ordering::Greater) => return Err(EntryError::Malformed("trailing bytes")),
        _ => {
            return Err(EntryError::Truncated(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    entry.truncate(start + body_len);
    entry.drain(..start);
    // Headers and framing are a few hundred bytes: the allocator shrinks in place.
    entry.shrink_to_fit();
    object.body = entry.into();
    Ok(object)
}

/// Exactly `len` bytes from `r` into one allocation of exactly `len`, without zeroing it first;
/// refused when `len` is more than the `entry_len` it is part of (a damaged length must not
/// allocate what the entry cannot hold).
fn read_vec(r: &mut impl Read, len: usize, entry_len: usize) -> Result<Vec<u8>, EntryError> {
    if len > entry_len {
        return Err(EntryError::Malformed("length"));
    }
    let mut out = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut out)?;
    if out.len() != len {
        return Err(EntryError::Truncated(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(out)
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn take_u8(b: &mut &[u8]) -> u8 {
    let (head, rest) = b.split_at(1);
    *b = rest;
    head[0]
}

fn take_u16(b: &mut &[u8]) -> u16 {
    let (head, rest) = b.split_at(2);
    *b = rest;
    u16::from_be_bytes(head.try_into().expect("2 bytes"))
}

fn take_u32(b: &mut &[u8]) -> u32 {
    let (head, rest) = b.split_at(4);
    *b = rest;
    u32::from_be_bytes(head.try_into().expect("4 bytes"))
}

fn take_u64(b: &mut &[u8]) -> u64 {
    let (head, rest) = b.split_at(8);
    *b = rest;
    u64::from_be_bytes(head.try_into().expect("8 bytes"))
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A writer that keeps a CRC32 of everything written through it.
struct Crc32Writer<'a, W> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Crc32Writer<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> CachedObject {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("image/png"),
        );
        headers.append("x-two", HeaderValue::from_static("a"));
        headers.append("x-two", HeaderValue::from_static("b"));
        CachedObject {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from(vec![7u8; 10_000]),
            response_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::from_secs(3),
                must_revalidate: true,
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(7),
            },
        }
    }

    fn assert_same(back: &CachedObject, o: &CachedObject) {
        assert_eq!(back.status, o.status);
        assert_eq!(back.headers, o.headers);
        assert_eq!(back.body, o.body);
        assert_eq!(back.response_time, o.response_time);
        assert_eq!(back.freshness, o.freshness);
    }

    #[test]
    fn entries_round_trip_both_ways_at_their_announced_length() {
        let o = object();
        let entry = encode(&o);
        assert_eq!(entry.len(), encoded_len(&o));
        assert_same(&decode(entry.clone()).unwrap(), &o);
        let mut r = &entry[..];
        let back = read(&mut r, entry.len()).unwrap();
        assert!(r.is_empty(), "read consumes exactly one entry");
        assert_same(&back, &o);
    }

    #[test]
    fn any_damaged_byte_or_truncation_is_refused() {
        let entry = encode(&object());
        for i in [
            0,
            8,
            20,
            60,
            entry.len() / 2,
            entry.len() - 5,
            entry.len() - 1,
        ] {
            let mut damaged = entry.clone();
            damaged[i] ^= 0x40;
            assert!(decode(damaged).is_err(), "byte {i}");
        }
        for len in [0, 3, 11, entry.len() - 1] {
            assert!(decode(entry[..len].to_vec()).is_err(), "truncated to {len}");
            assert!(
                read(&mut &entry[..len], entry.len()).is_err(),
                "read, truncated to {len}"
            );
        }
        let mut longer = entry.clone();
        longer.push(0);
        assert!(decode(longer).is_err(), "trailing byte");
        // A different format version with a valid checksum is refused too.
        let mut other = entry[..entry.len() - 4].to_vec();
        other[7] = 2;
        let crc = crc32fast::hash(&other);
        other.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(decode(other), Err(EntryError::Magic)));
    }

    #[test]
    fn a_damaged_length_allocates_nothing_it_cannot_fill() {
        let o = object();
        let mut entry = encode(&o);
        // The body length field sits 8 bytes before the body, which ends 4 bytes before the end.
        let at = entry.len() - 4 - o.body.len() - 8;
        for len in [u64::MAX, entry.len() as u64 + 1] {
            entry[at..at + 8].copy_from_slice(&len.to_be_bytes());
            assert!(matches!(
                read(&mut &entry[..], entry.len()),
                Err(EntryError::Malformed("length"))
            ));
        }
    }

    #[test]
    fn a_body_is_read_into_one_allocation_of_exactly_its_length() {
        let data = vec![3u8; 300_000];
        let body = read_vec(&mut &data[..], 200_000, data.len()).unwrap();
        assert_eq!((body.len(), body.capacity()), (200_000, 200_000));
    }

    #[test]
    fn decode_keeps_the_body_in_the_entrys_own_allocation() {
        let o = object();
        let entry = encode(&o);
        let at = entry.as_ptr();
        let back = decode(entry).unwrap();
        assert_same(&back, &o);
        // Moved to the front of the same buffer, not copied into a second one (the shrink by
        // the header bytes stays in place for this size).
        assert_eq!(back.body.as_ptr(), at);
    }
}
