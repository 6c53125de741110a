//! Source records: what transforms and `/image-info` know of one source object without reading
//! it again. Stored in the tiers beside the object, under [`CacheKey::source_record`], for
//! every source (those too large to store included), with the object's freshness; dropped with
//! the object (purge, invalidation) or when another version of it is stored.
//!
//! A record's `generation` names the version of the source its renditions were made from: the
//! rendition keys carry it ([`CacheKey::rendition`]), so a record rebuilt from another version
//! (or after a purge) leaves the old renditions unreachable.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, DATE, ETAG, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{CacheKey, CachedObject};
use crate::freshness::Freshness;
use crate::transform::ImageInfo;

/// The freshness of what is served but not stored (derived from a source that may not be).
pub(crate) const NOT_STORED: Freshness = Freshness {
    lifetime: Duration::ZERO,
    initial_age: Duration::ZERO,
    must_revalidate: false,
    stale_while_revalidate: Duration::ZERO,
    stale_if_error: Duration::ZERO,
};

/// What is known of one source object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SourceRecord {
    /// Names the version of the source: kept while a rebuilt record finds the same version,
    /// new otherwise.
    pub generation: u64,
    /// The source's `Content-Type`, as served.
    pub content_type: Option<String>,
    /// Its length in bytes.
    pub bytes: Option<u64>,
    /// Its `ETag` and `Last-Modified`, as served.
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// SHA-256 of the whole body (hex, first 16 bytes), when the record was made from all of
    /// it: the version of a source without validators.
    pub digest: Option<String>,
    /// What its header says of the image; `None` when it is not one this build reads.
    pub image: Option<ImageInfo>,
}

impl SourceRecord {
    /// The record of a source served with `headers`, from `body`: the whole object when its
    /// length is `total_bytes`, else a leading part of it (then no digest). Its image header is
    /// probed. Keeps `previous`'s generation when it describes the same version (same
    /// validators, and the same digest when both have one).
    pub(crate) fn new(
        headers: &HeaderMap,
        body: &[u8],
        total_bytes: Option<u64>,
        previous: Option<&SourceRecord>,
    ) -> SourceRecord {
        let whole = total_bytes == Some(body.len() as u64);
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut record = SourceRecord {
            generation: 0,
            content_type: text(CONTENT_TYPE),
            bytes: total_bytes,
            etag: text(ETAG),
            last_modified: text(LAST_MODIFIED),
            digest: whole.then(|| hex(&Sha256::digest(body)[..16])),
            image: crate::transform::probe(body).ok(),
        };
        record.generation = match previous {
            Some(p) if p.same_version(&record) => p.generation,
            _ => match record.version() {
                Some(version) => generation_of(version, text(DATE).as_deref()),
                None => new_generation(),
            },
        };
        record
    }

    /// Whether `other` describes the same version of the source.
    fn same_version(&self, other: &SourceRecord) -> bool {
        self.etag == other.etag
            && self.last_modified == other.last_modified
            && match (&self.digest, &other.digest) {
                (Some(a), Some(b)) => a == b,
                _ => self.etag.is_some() || self.last_modified.is_some(),
            }
    }

    /// What names this version in validators: its `ETag`, else `Last-Modified`, else the
    /// digest of its body.
    pub(crate) fn version(&self) -> Option<&str> {
        self.etag
            .as_deref()
            .or(self.last_modified.as_deref())
            .or(self.digest.as_deref())
    }

    /// The strong `ETag` of a rendition of this version by `canonical_params`: the source's
    /// cache key, version and the parameters, hashed; `None` when the version is unknown.
    pub(crate) fn rendition_etag(
        &self,
        source: &CacheKey,
        canonical_params: &str,
    ) -> Option<HeaderValue> {
        let version = self.version()?;
        let mut hash = Sha256::new();
        for part in [source.as_str(), version, canonical_params] {
            hash.update(part.as_bytes());
            hash.update(b"\n");
        }
        HeaderValue::from_str(&format!("\"r-{}\"", hex(&hash.finalize()[..12]))).ok()
    }

    /// The record as a stored object: a JSON body, the source's validators (so storing another
    /// version of the source drops it, see [`crate::cache::TieredCache::insert`]) and
    /// freshness headers, `freshness` as received `now`.
    pub(crate) fn to_object(
        &self,
        source_headers: &HeaderMap,
        freshness: Freshness,
        now: SystemTime,
    ) -> CachedObject {
        let mut headers = HeaderMap::new();
        for name in [ETAG, LAST_MODIFIED, CACHE_CONTROL, EXPIRES] {
            if let Some(v) = source_headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        CachedObject {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(serde_json::to_vec(self).expect("a record serializes")),
            response_time: now,
            freshness,
        }
    }

    /// The record stored as `object`; `None` for anything else (a foreign or older entry).
    pub(crate) fn from_object(object: &CachedObject) -> Option<SourceRecord> {
        serde_json::from_slice(&object.body).ok()
    }
}

/// The generation of a record made without a previous one of the same version: from the version
/// and the source response's `Date`, so that concurrent first requests for renditions of one
/// source (which all read the same fill) agree on it, while a source fetched again after a
/// purge (another `Date`) starts a new one.
fn generation_of(version: &str, date: Option<&str>) -> u64 {
    let digest = Sha256::new()
        .chain_update(version.as_bytes())
        .chain_update(b"\n")
        .chain_update(date.unwrap_or_default().as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A generation not used before in this process, and unlikely in any other: the time and a
/// counter, mixed with a per-process random key.
fn new_generation() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_generation_is_kept_for_the_same_version_only() {
        let v1 = headers(&[("etag", "\"1\"")]);
        let a = SourceRecord::new(&v1, b"one", Some(3), None);
        assert_eq!(
            SourceRecord::new(&v1, b"one", Some(3), Some(&a)).generation,
            a.generation
        );
        let v2 = headers(&[("etag", "\"2\"")]);
        assert_ne!(
            SourceRecord::new(&v2, b"two", Some(3), Some(&a)).generation,
            a.generation
        );
        // without validators the body's digest names the version
        let none = HeaderMap::new();
        let b = SourceRecord::new(&none, b"one", Some(3), None);
        assert_eq!(
            SourceRecord::new(&none, b"one", Some(3), Some(&b)).generation,
            b.generation
        );
        assert_ne!(
            SourceRecord::new(&none, b"two", Some(3), Some(&b)).generation,
            b.generation
        );
        // a leading part says nothing of the version of a source without validators
        let part = SourceRecord::new(&none, b"on", Some(3), Some(&b));
        assert_ne!(part.generation, b.generation);
        assert_eq!(part.version(), None);
    }

    #[test]
    fn records_made_apart_from_one_response_agree_and_a_refetch_starts_anew() {
        let fill = headers(&[("etag", "\"1\""), ("date", "Mon, 30 Nov 2026 05:00:00 GMT")]);
        let a = SourceRecord::new(&fill, b"one", Some(3), None);
        let b = SourceRecord::new(&fill, b"one", Some(3), None);
        assert_eq!(a.generation, b.generation);
        let refetched = headers(&[("etag", "\"1\""), ("date", "Mon, 30 Nov 2026 06:00:00 GMT")]);
        assert_ne!(
            SourceRecord::new(&refetched, b"one", Some(3), None).generation,
            a.generation
        );
    }

    #[test]
    fn rendition_etags_differ_by_version_and_parameters() {
        let key = CacheKey::new("image-proxy", &url::Url::parse("http://a.test/x").unwrap());
        let a = SourceRecord::new(&headers(&[("etag", "\"1\"")]), b"x", Some(1), None);
        let b = SourceRecord::new(&headers(&[("etag", "\"2\"")]), b"x", Some(1), None);
        let e = |r: &SourceRecord, p| r.rendition_etag(&key, p).unwrap();
        assert_ne!(e(&a, "w=1"), e(&a, "w=2"));
        assert_ne!(e(&a, "w=1"), e(&b, "w=1"));
        assert_eq!(e(&a, "w=1"), e(&a, "w=1"));
        assert!(e(&a, "w=1").to_str().unwrap().starts_with("\"r-"));
    }
}
