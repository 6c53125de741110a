//! RFC 9111 rules a shared cache applies to a response: may it be stored, how long is it fresh,
//! how old is it. Pure functions of headers and explicit times; no I/O, no clock reads.

mod targeted;

use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, DATE, EXPIRES, LAST_MODIFIED};
use http::{HeaderMap, StatusCode};

/// The greatest delta-seconds value imgedge represents, 2^31 seconds (about 68 years): a larger
/// one, or any age or lifetime calculation past it, counts as this (RFC 9111 §1.2.2). Every
/// lifetime, age and stale window here is at most this, so no sum of them overflows.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// [`MAX_DELTA_SECONDS`] as a duration.
pub const MAX_DELTA: Duration = Duration::from_secs(MAX_DELTA_SECONDS);

/// A delta-seconds argument (RFC 9111 §1.2.2): `None` unless it is all digits; a value too large
/// to represent (or past 2^31) is 2^31.
fn delta_seconds(arg: &str) -> Option<u64> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        arg.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |s| s.min(MAX_DELTA_SECONDS)),
    )
}

/// `seconds` as a duration, at most [`MAX_DELTA`].
fn delta(seconds: u64) -> Duration {
    Duration::from_secs(seconds.min(MAX_DELTA_SECONDS))
}

/// The response `Cache-Control` directives a shared cache acts on (RFC 9111 §5.2.2).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub no_store: bool,
    pub private: bool,
    pub no_cache: bool,
    pub public: bool,
    pub must_revalidate: bool,
    /// `must-understand`: store only statuses whose semantics the cache knows (§5.2.2.3).
    pub must_understand: bool,
    /// `stale-while-revalidate`, in seconds (RFC 5861 §3).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error`, in seconds (RFC 5861 §4).
    pub stale_if_error: Option<u64>,
    /// `max-age`, in seconds.
    pub max_age: Option<u64>,
    /// `s-maxage`, in seconds; overrides `max-age` for shared caches (§5.2.2.10).
    pub s_maxage: Option<u64>,
}

impl ResponseDirectives {
    /// Whether the response says it may be shared even with a request that carried credentials:
    /// `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5).
    pub fn shareable(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }

    /// Parses every `Cache-Control` field line of `headers`. Unknown directives are ignored, a
    /// malformed delta-seconds is treated as 0 (stale), as §4.2.1 asks of invalid freshness, and
    /// one too large is 2^31 (§1.2.2).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = ResponseDirectives::default();
        for (name, arg) in directives(headers, CACHE_CONTROL.as_str()) {
            let seconds = || arg.map(|a| delta_seconds(a).unwrap_or(0));
            match name.as_str() {
                "no-store" => d.no_store = true,
                // A qualified `private="field"` or `no-cache="field"` is treated as
                // unqualified: stricter, which §5.2.2.4 and §5.2.2.7 permit.
                "private" => d.private = true,
                "no-cache" => d.no_cache = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "must-understand" => d.must_understand = true,
                "stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                "stale-if-error" => d.stale_if_error = seconds(),
                "max-age" => d.max_age = seconds().or(Some(0)),
                "s-maxage" => d.s_maxage = seconds().or(Some(0)),
                _ => {}
            }
        }
        d
    }
}

/// The directives of every `field` line of `headers` (RFC 9111 §5.2 syntax, shared by
/// `Cache-Control` and `Surrogate-Control`): `(name, argument)`, the name lower-cased, the
/// argument trimmed and unquoted. Lines that are not visible ASCII are skipped; every
/// comma-separated piece is yielded, empty ones included.
fn directives<'a>(
    headers: &'a HeaderMap,
    field: &'static str,
) -> impl Iterator<Item = (String, Option<&'a str>)> + 'a {
    headers
        .get_all(field)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|directive| match directive.split_once('=') {
            Some((n, a)) => (
                n.trim().to_ascii_lowercase(),
                Some(a.trim().trim_matches('"')),
            ),
            None => (directive.trim().to_ascii_lowercase(), None),
        })
}

/// The `Surrogate-Control` directives addressed to any surrogate (Edge Architecture
/// Specification 1.0): directives targeted at a named device (`max-age=60;other`) are not ours.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SurrogateDirectives {
    no_store: bool,
    max_age: Option<u64>,
}

impl SurrogateDirectives {
    fn parse(headers: &HeaderMap) -> Self {
        let mut d = SurrogateDirectives::default();
        for (name, arg) in directives(headers, "surrogate-control") {
            if name.contains(';') || arg.is_some_and(|a| a.contains(';')) {
                continue;
            }
            match name.as_str() {
                "no-store" => d.no_store = true,
                "max-age" => d.max_age = Some(arg.and_then(delta_seconds).unwrap_or(0)),
                _ => {}
            }
        }
        d
    }
}

/// Why a response is not stored; the text is the `detail` of its `Cache-Status` (RFC 9211 §2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: private`: only a private cache may store it.
    Private,
    /// `Cache-Control: no-cache`: it would have to be revalidated on every use, which this cache
    /// does not do yet, so it is not stored.
    NoCache,
    /// A status that is not final, is 206 or 304, or needs explicit freshness it lacks.
    Status,
    /// No explicit freshness, no `Last-Modified`, and no `default_ttl` for its route.
    NoFreshness,
    /// Its freshness lifetime is zero or already used up by its age.
    Stale,
    /// The request carried credentials (`Authorization`, a cookie, an API key) and the response
    /// did not allow sharing it with `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5).
    Authorization,
    /// It carries `Vary: *` (and the request forwarded client headers): no request can match it.
    Vary,
    /// It sets a cookie, which storing would replay to every client, and its route does not
    /// allow that (`[[routes]] store_set_cookie`).
    SetCookie,
}

impl NotStorable {
    /// The `Cache-Status` `detail` token.
    pub fn detail(self) -> &'static str {
        match self {
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::NoCache => "no-cache",
            NotStorable::Status => "uncacheable-status",
            NotStorable::Stale => "stale",
            NotStorable::NoFreshness => "no-freshness",
            NotStorable::Authorization => "authorization",
            NotStorable::Vary => "vary",
            NotStorable::SetCookie => "set-cookie",
        }
    }
}

/// The times a freshness decision depends on, for one response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseTimes {
    /// When the request was sent upstream (`request_time`, RFC 9111 §4.2.3).
    pub request_time: SystemTime,
    /// When the response head arrived (`response_time`, §4.2.3).
    pub response_time: SystemTime,
}

/// How long a stored response stays fresh, and how old it already was when stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime (§4.2.1).
    pub lifetime: Duration,
    /// `corrected_initial_age` (§4.2.3) at `response_time`.
    pub initial_age: Duration,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale (§4.2.4).
    pub must_revalidate: bool,
    /// How long after turning stale it may still be served while refreshed in the background
    /// (`stale-while-revalidate`, RFC 5861 §3).
    pub stale_while_revalidate: Duration,
    /// How long after turning stale it may stand in when the origin fails (`stale-if-error`,
    /// RFC 5861 §4).
    pub stale_if_error: Duration,
}

impl Freshness {
    /// How long past its freshness lifetime a response `age` old is.
    pub fn staleness(&self, age: Duration) -> Option<Duration> {
        age.checked_sub(self.lifetime).filter(|s| !s.is_zero())
    }

    /// Whether a response `age` old is stale by at most `limit` and may be served stale at all
    /// (no `must-revalidate`, `proxy-revalidate` or `s-maxage`, RFC 9111 §4.2.4). With
    /// `stale_if_error` as the limit: may it stand in for an origin error (RFC 5861 §4); with
    /// `[cache] stale_if_unreachable`: when the origin cannot be reached ("disconnected").
    pub fn may_serve_stale(&self, age: Duration, limit: Duration) -> bool {
        !self.must_revalidate && self.staleness(age).is_some_and(|s| s <= limit)
    }
}

impl Freshness {
    /// Time it stays fresh after `response_time`: lifetime minus initial age (zero when stale).
    pub fn time_to_live(&self) -> Duration {
        self.lifetime.saturating_sub(self.initial_age)
    }

    /// `current_age` (§4.2.3) at `now` of a response received at `response_time`; at most
    /// [`MAX_DELTA`].
    pub fn current_age(&self, response_time: SystemTime, now: SystemTime) -> Duration {
        self.initial_age
            .saturating_add(now.duration_since(response_time).unwrap_or_default())
            .min(MAX_DELTA)
    }
}

/// What about the request a storage decision depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts {
    /// The request forwarded `Authorization` upstream.
    pub authorized: bool,
    /// The request forwarded client headers upstream, so the response may vary with them.
    pub forwarded_client_headers: bool,
}

/// The configured fallbacks for responses that state no freshness of their own.
#[derive(Debug, Clone, Copy)]
pub struct FreshnessPolicy {
    /// Lifetime of heuristically cacheable responses without `Last-Modified`; `None`: such
    /// responses are not stored.
    pub default_ttl: Option<Duration>,
    /// Cap on the heuristic lifetime (10% of the time since `Last-Modified`).
    pub max_heuristic_ttl: Duration,
    /// Lifetime of 404, 405, 410, 414 and 501 responses (negative caching).
    pub negative_ttl: Duration,
    /// imgedge's own targeted field (RFC 9213, `[cache] targeted_field`, lower case), first on
    /// its target list before `CDN-Cache-Control`; `None`: only `CDN-Cache-Control`.
    pub targeted_field: Option<&'static str>,
    /// When the request's authority ends (a signed URL's token expires): nothing is fresh past
    /// it, and nothing is served stale (the response must be revalidated, with a token the origin
    /// will refuse).
    pub valid_until: Option<SystemTime>,
}

impl FreshnessPolicy {
    /// The policy, for a request whose authority ends at `valid_until`.
    pub fn valid_until(self, valid_until: Option<SystemTime>) -> Self {
        FreshnessPolicy {
            valid_until,
            ..self
        }
    }
}

pub use targeted::{CDN_CACHE_CONTROL, is_dictionary};

/// The cache directives that govern what imgedge stores of a response with `headers`: those of
/// the first targeted field with a valid value (imgedge's own `targeted_field`, then
/// `CDN-Cache-Control`; RFC 9213 §2), else `Cache-Control`'s.
pub fn effective_directives(
    headers: &HeaderMap,
    targeted_field: Option<&str>,
) -> ResponseDirectives {
    targeted::targeted_directives(headers, targeted_field)
        .map(|(d, _)| d)
        .unwrap_or_else(|| ResponseDirectives::parse(headers))
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1), other than the
/// negatively cached ones.
const HEURISTIC_STATUSES: [u16; 6] = [200, 203, 204, 300, 301, 308];
/// Heuristically cacheable error statuses, given `negative_ttl` (RFC 9110 §15.1).
const NEGATIVE_STATUSES: [u16; 5] = [404, 405, 410, 414, 501];

/// Decides whether a response to a GET may be stored by a shared cache, and if so how fresh it
/// is (RFC 9111 §3): a final status other than 206 and 304, with explicit freshness or a
/// heuristically cacheable status. Freshness comes from `s-maxage`, then `max-age`, then
/// `Expires` minus `Date` (§4.2.1); otherwise, for 404/405/410/414/501, `negative_ttl`, and for
/// the other heuristically cacheable statuses 10% of the time since `Last-Modified`, capped by
/// `max_heuristic_ttl`, or `default_ttl` without `Last-Modified` (§4.2.2).
///
/// The directives are those of a targeted field when one on imgedge's target list has a valid
/// value (its own `policy.targeted_field`, then `CDN-Cache-Control`): `Cache-Control`,
/// `Expires` and `Surrogate-Control` are then ignored (RFC 9213 §2).
///
/// # Errors
/// The [`NotStorable`] reason, which becomes the `Cache-Status` detail.
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    request: RequestFacts,
    times: ResponseTimes,
    policy: FreshnessPolicy,
) -> Result<Freshness, NotStorable> {
    let (d, surrogate, expires_applies) =
        match targeted::targeted_directives(headers, policy.targeted_field) {
            Some((d, _)) => (d, SurrogateDirectives::default(), false),
            None => (
                ResponseDirectives::parse(headers),
                SurrogateDirectives::parse(headers),
                true,
            ),
        };
    if surrogate.no_store {
        return Err(NotStorable::NoStore);
    }
    // A surrogate max-age takes precedence over Cache-Control for this cache.
    let cc_applies = surrogate.max_age.is_none();
    if cc_applies && d.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc_applies && d.private {
        return Err(NotStorable::Private);
    }
    if request.authorized && !d.shareable() {
        return Err(NotStorable::Authorization);
    }
    if request.forwarded_client_headers && vary_names(headers).is_none() {
        return Err(NotStorable::Vary);
    }
    if cc_applies && d.no_cache {
        return Err(NotStorable::NoCache);
    }
    let final_status = status.as_u16() >= 200
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if !final_status || (d.must_understand && status.canonical_reason().is_none()) {
        return Err(NotStorable::Status);
    }
    let lifetime = surrogate
        .max_age
        .map(delta)
        .or_else(|| explicit_lifetime(&d, headers, times.response_time, expires_applies))
        .or_else(|| heuristic_lifetime(status, headers, times.response_time, policy))
        .ok_or(if HEURISTIC_STATUSES.contains(&status.as_u16()) {
            NotStorable::NoFreshness
        } else {
            NotStorable::Status
        })?;
    let initial_age = initial_age(headers, times);
    let (lifetime, bounded) = match policy.valid_until {
        Some(until) => {
            let left = until
                .duration_since(times.response_time)
                .unwrap_or_default();
            (lifetime.min(initial_age.saturating_add(left)), true)
        }
        None => (lifetime, false),
    };
    let freshness = Freshness {
        lifetime,
        initial_age,
        // s-maxage implies proxy-revalidate for a shared cache (§5.2.2.10).
        must_revalidate: d.must_revalidate || d.s_maxage.is_some() || bounded,
        stale_while_revalidate: if bounded {
            Duration::ZERO
        } else {
            delta(d.stale_while_revalidate.unwrap_or(0))
        },
        stale_if_error: if bounded {
            Duration::ZERO
        } else {
            delta(d.stale_if_error.unwrap_or(0))
        },
    };
    // Stale on arrival is still worth keeping when it can be revalidated or served stale.
    let usable_stale = headers.contains_key(http::header::ETAG)
        || headers.contains_key(LAST_MODIFIED)
        || !freshness.stale_while_revalidate.is_zero()
        || !freshness.stale_if_error.is_zero();
    if freshness.time_to_live().is_zero() && !usable_stale {
        return Err(NotStorable::Stale);
    }
    Ok(freshness)
}

/// Freshness lifetime the response states, RFC 9111 §4.2.1.
fn explicit_lifetime(
    d: &ResponseDirectives,
    headers: &HeaderMap,
    response_time: SystemTime,
    expires_applies: bool,
) -> Option<Duration> {
    if let Some(s) = d.s_maxage.or(d.max_age) {
        return Some(delta(s));
    }
    let expires = headers.get(EXPIRES).filter(|_| expires_applies)?;
    // An invalid Expires, such as "0", means already expired (§5.3).
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = date_or(headers, response_time);
    Some(
        expires
            .duration_since(date)
            .unwrap_or_default()
            .min(MAX_DELTA),
    )
}

/// The response's `Date`, or `response_time` when it has no valid one (RFC 9110 §6.6.1).
fn date_or(headers: &HeaderMap, response_time: SystemTime) -> SystemTime {
    headers
        .get(DATE)
        .and_then(http_date)
        .unwrap_or(response_time)
}

/// Heuristic freshness lifetime, RFC 9111 §4.2.2, for statuses that allow one.
fn heuristic_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    response_time: SystemTime,
    policy: FreshnessPolicy,
) -> Option<Duration> {
    let code = status.as_u16();
    if NEGATIVE_STATUSES.contains(&code) {
        return Some(policy.negative_ttl);
    }
    if !HEURISTIC_STATUSES.contains(&code) {
        return None;
    }
    let Some(last_modified) = headers.get(LAST_MODIFIED).and_then(http_date) else {
        return policy.default_ttl;
    };
    let date = date_or(headers, response_time);
    let since = date.duration_since(last_modified).unwrap_or_default();
    Some((since / 10).min(policy.max_heuristic_ttl))
}

/// The request `Cache-Control` directives a cache acts on (RFC 9111 §5.2.1), with `Pragma:
/// no-cache` read as `no-cache` when there is no `Cache-Control` (§5.4).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    /// `max-age`: the client will not accept a response older than this, in seconds.
    pub max_age: Option<u64>,
    /// `max-stale`: `Some(None)` accepts any staleness, `Some(Some(s))` up to `s` seconds.
    pub max_stale: Option<Option<u64>>,
    /// `min-fresh`: the response must stay fresh at least this many more seconds.
    pub min_fresh: Option<u64>,
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        let mut any = false;
        for (name, arg) in directives(headers, CACHE_CONTROL.as_str()) {
            any = true;
            // An unparsable number is ignored rather than read as 0 (§5.2.1); one too large is
            // 2^31 (§1.2.2).
            let seconds = || arg.and_then(delta_seconds);
            match name.as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-age" => d.max_age = seconds(),
                "max-stale" => d.max_stale = Some(seconds()),
                "min-fresh" => d.min_fresh = seconds(),
                _ => {}
            }
        }
        if !any
            && headers.get_all(http::header::PRAGMA).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
            })
        {
            d.no_cache = true;
        }
        d
    }
}

/// How a stored response may serve a request (RFC 9111 §4.2, §4.2.4, §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usability {
    /// Fresh enough for the request.
    Fresh,
    /// Stale, but the request's `max-stale` accepts it and nothing forbids serving it stale.
    StaleAccepted,
    /// Stale within its `stale-while-revalidate` window: serve it, and refresh it in the
    /// background (RFC 5861 §3).
    StaleWhileRevalidate,
    /// Must be validated with the origin (or fetched anew) before use.
    NeedsValidation,
}

/// Whether a stored response of `freshness`, `age` old, may serve a request with `request`
/// directives.
pub fn usability(freshness: &Freshness, age: Duration, request: &RequestDirectives) -> Usability {
    if request.no_cache {
        return Usability::NeedsValidation;
    }
    if request.max_age.is_some_and(|m| age > delta(m)) {
        return Usability::NeedsValidation;
    }
    let fresh_for = freshness.lifetime.saturating_sub(age);
    if let Some(min_fresh) = request.min_fresh
        && fresh_for < delta(min_fresh)
    {
        return Usability::NeedsValidation;
    }
    if freshness.lifetime > age {
        return Usability::Fresh;
    }
    let stale_for = age - freshness.lifetime;
    if freshness.must_revalidate {
        return Usability::NeedsValidation;
    }
    if request
        .max_stale
        .is_some_and(|limit| limit.is_none_or(|s| stale_for <= delta(s)))
    {
        return Usability::StaleAccepted;
    }
    if stale_for <= freshness.stale_while_revalidate {
        return Usability::StaleWhileRevalidate;
    }
    Usability::NeedsValidation
}

/// `corrected_initial_age`, RFC 9111 §4.2.3.
fn initial_age(headers: &HeaderMap, t: ResponseTimes) -> Duration {
    let age_value = match age_value(headers) {
        Ok(age) => age,
        // An invalid Age makes the response stale on arrival (§5.1).
        Err(()) => return MAX_DELTA,
    };
    let apparent_age = headers
        .get(DATE)
        .and_then(http_date)
        .and_then(|date| t.response_time.duration_since(date).ok())
        .unwrap_or_default();
    let response_delay = t
        .response_time
        .duration_since(t.request_time)
        .unwrap_or_default();
    apparent_age
        .max(age_value.saturating_add(response_delay))
        .min(MAX_DELTA)
}

/// The `Age` field (§5.1): absent is zero; a list on one line counts by its first member, as
/// §5.1 asks of a cache ("SHOULD use the first member", so `0, 7200` is 0 and `7200, 0` is
/// 7200); a second field line, a sign, a fraction or a parameter is invalid.
fn age_value(headers: &HeaderMap) -> Result<Duration, ()> {
    let mut lines = headers.get_all(AGE).iter();
    let Some(value) = lines.next() else {
        return Ok(Duration::ZERO);
    };
    if lines.next().is_some() {
        return Err(());
    }
    let value = value.to_str().map_err(|_| ())?;
    let value = value.split(',').next().unwrap_or_default().trim();
    // An integer too large to represent is 2^31 (§1.2.2).
    delta_seconds(value).map(delta).ok_or(())
}

fn http_date(v: &http::HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// The request header names a response varies on (RFC 9110 §12.5.5), lower-cased, in order;
/// empty without `Vary`, `None` for `Vary: *` (never matches). Unparsable names are ignored.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<http::HeaderName>> {
    let mut names: Vec<http::HeaderName> = Vec::new();
    for value in headers.get_all(http::header::VARY) {
        for name in value.to_str().unwrap_or_default().split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if let Ok(name) = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests;
