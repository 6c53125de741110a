//! Source records: what transforms and `/image-info` know of one source object without reading
//! it again. Stored in the tiers beside the object, under [`CacheKey::source_record`], for
//! every source (those too large to store included), with the object's freshness; dropped with
//! the object (purge, invalidation) or when another version of it is stored.
//!
//! A record's `generation` names the version of the source its renditions were made from: the
//! rendition keys carry it ([`CacheKey::rendition`]), so a record rebuilt from another version
//! (or after a purge) leaves the old renditions unreachable.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, DATE, ETAG, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{CacheKey, CachedObject};
use crate::freshness::Freshness;
use crate::proxy::Proxy;
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

/// The generations of the source records being made now, by source and version, so that
/// requests making renditions of one source at once agree on it even when each fetched the
/// source itself and the fetches' `Date`s differ (a fetch either side of a second's turn; in a
/// memory-only deployment the source is not stored, so each new rendition fetches it). A
/// record made after them finds theirs stored (`previous`). Entries last while a make that
/// holds one runs, so a purge followed by a fetch still starts a new generation.
#[derive(Debug, Default)]
pub(crate) struct Making(Mutex<HashMap<(CacheKey, String), (u64, usize)>>);

/// A make's hold on its entry in [`Making`]; the entry goes with the last hold.
#[must_use = "the generation is shared only while its hold lives"]
pub(crate) struct Hold<'a> {
    making: &'a Making,
    entry: Option<(CacheKey, String)>,
}

impl Making {
    /// The record of the source stored under `source`, served with `headers`, from `body` (see
    /// [`SourceRecord::new`]), with the hold that shares its generation. Built on the record
    /// stored now, not one read when the request came (another request may have stored one
    /// since, while this one waited or fetched), and on those being made at the same time.
    pub(crate) async fn record(
        &self,
        proxy: &Proxy,
        source: &CacheKey,
        headers: &HeaderMap,
        body: &[u8],
        total_bytes: Option<u64>,
    ) -> (SourceRecord, Hold<'_>) {
        let previous = proxy
            .lookup_derived(&source.source_record())
            .await
            .and_then(|f| SourceRecord::from_object(&f.object));
        let mut record = SourceRecord::new(headers, body, total_bytes, previous.as_ref());
        let hold = self.join(source, &mut record);
        (record, hold)
    }

    /// Gives `record` (of the source stored under `source`) the generation of a record of the
    /// same version being made now, if there is one, else makes its own the one shared; held
    /// until the returned [`Hold`] drops. A record without a version (a source without
    /// validators read in part) shares nothing.
    fn join(&self, source: &CacheKey, record: &mut SourceRecord) -> Hold<'_> {
        let Some(version) = record.version() else {
            return Hold {
                making: self,
                entry: None,
            };
        };
        let entry = (source.clone(), version.to_owned());
        let mut making = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (generation, holds) = making
            .entry(entry.clone())
            .or_insert((record.generation, 0));
        *holds += 1;
        record.generation = *generation;
        Hold {
            making: self,
            entry: Some(entry),
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let mut making = self.making.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, holds)) = making.get_mut(&entry) {
            *holds -= 1;
            if *holds == 0 {
                making.remove(&entry);
            }
        }
    }
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
    fn records_made_at_once_share_a_generation_while_one_of_them_is_held() {
        let key = CacheKey::new("image-proxy", &url::Url::parse("http://a.test/x").unwrap());
        let other = CacheKey::new("image-proxy", &url::Url::parse("http://a.test/y").unwrap());
        let at = |date| headers(&[("etag", "\"1\""), ("date", date)]);
        let (one, two) = (
            at("Mon, 30 Nov 2026 05:00:00 GMT"),
            at("Mon, 30 Nov 2026 05:00:01 GMT"),
        );
        let making = Making::default();
        let mut a = SourceRecord::new(&one, b"one", Some(3), None);
        let first = a.generation;
        let hold_a = making.join(&key, &mut a);
        assert_eq!(a.generation, first);
        // the same version, fetched a second later, while the first is held
        let mut b = SourceRecord::new(&two, b"one", Some(3), None);
        assert_ne!(b.generation, first);
        let hold_b = making.join(&key, &mut b);
        assert_eq!(b.generation, first);
        // another version, or another source, keeps its own
        let mut v2 = SourceRecord::new(&headers(&[("etag", "\"2\"")]), b"two", Some(3), None);
        let own = v2.generation;
        drop(making.join(&key, &mut v2));
        assert_eq!(v2.generation, own);
        let mut elsewhere = SourceRecord::new(&two, b"one", Some(3), None);
        let own = elsewhere.generation;
        drop(making.join(&other, &mut elsewhere));
        assert_eq!(elsewhere.generation, own);
        // with every hold gone, a fetch starts anew (as after a purge)
        drop((hold_a, hold_b));
        let mut c = SourceRecord::new(&two, b"one", Some(3), None);
        let own = c.generation;
        drop(making.join(&key, &mut c));
        assert_eq!(c.generation, own);
        assert_ne!(own, first);
        assert!(making.0.lock().unwrap().is_empty());
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
