//! Properties of every parser that reads client or origin input, over generated input (proptest):
//! the `url=` parameter and the address guard, route paths, `Cache-Control`, `Range`,
//! `If-None-Match`, `Age` and the freshness computation. None may panic, and each keeps the
//! promise the proxy relies on: no refused address gets through in any spelling, no route path
//! climbs out of its prefix, no duration passes 2^31 seconds, no range leaves its body.
//!
//! Each property runs `PROPTEST_CASES` cases (256 by default); CI runs the default, a few
//! seconds in all. For a longer search: `PROPTEST_CASES=100000 cargo test --test integration properties::`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use imgedge::freshness::{
    self, FreshnessPolicy, MAX_DELTA, MAX_DELTA_SECONDS, RequestDirectives, RequestFacts,
    ResponseDirectives, ResponseTimes, Usability,
};
use imgedge::http::Routes;
use imgedge::proxy::{if_none_match_matches, single_byte_range};
use imgedge::target::{self, HostPolicy, TargetError};
use proptest::prelude::*;

const MAX_URL_BYTES: usize = 4096;

/// Text an attacker might send: printable ASCII with the characters parsers split on, escapes
/// and a few non-ASCII ones.
fn hostile_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r#"[ -~\t\u{80}-\u{10ffff}]{0,80}"#).unwrap()
}

/// `url=` + `target`, percent-encoded as a client would.
fn url_query(target: &str) -> String {
    format!(
        "url={}",
        url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
    )
}

/// A non-global IPv4 address: loopback, private, link-local, shared, this-network, reserved.
fn refused_v4() -> impl Strategy<Value = Ipv4Addr> {
    let blocks: Vec<(u32, u32)> = vec![
        (0x7f00_0000, 8),  // 127/8
        (0x0a00_0000, 8),  // 10/8
        (0xac10_0000, 12), // 172.16/12
        (0xc0a8_0000, 16), // 192.168/16
        (0xa9fe_0000, 16), // 169.254/16
        (0x6440_0000, 10), // 100.64/10
        (0x0000_0000, 8),  // 0/8
        (0xf000_0000, 4),  // 240/4
    ];
    (proptest::sample::select(blocks), any::<u32>())
        .prop_map(|((base, bits), host)| Ipv4Addr::from(base | (host & (u32::MAX >> bits))))
}

/// Ways to write `a` in a URL host that some parser somewhere reads as `a`.
fn spellings(a: Ipv4Addr) -> Vec<String> {
    let [p, q, r, s] = a.octets();
    let n = u32::from(a);
    vec![
        a.to_string(),
        n.to_string(),
        format!("0x{n:x}"),
        format!("0{p:o}.0{q:o}.0{r:o}.0{s:o}"),
        format!("0x{p:x}.0x{q:x}.0x{r:x}.0x{s:x}"),
        format!("{p}.{q}.{}", u16::from_be_bytes([r, s])),
        format!("{p}.{}", n & 0x00ff_ffff),
        format!("{a}."),
        format!("[::ffff:{a}]"),
        format!("[::ffff:{:x}:{:x}]", n >> 16, n & 0xffff),
        format!("[::{a}]"),
        format!("[64:ff9b::{a}]"),
        format!("[2002:{:x}:{:x}::1]", n >> 16, n & 0xffff),
    ]
}

proptest! {
    /// Any `url=` value: parsing never panics, and what it accepts is an absolute http(s) URL
    /// without userinfo, within the length limit, its host normalized; the address guard never
    /// panics on it either.
    #[test]
    fn the_url_parameter_accepts_only_clean_http_urls(target in hostile_text(), raw in any::<bool>()) {
        let query = if raw { format!("url={target}") } else { url_query(&target) };
        if let Ok(url) = target::parse_image_url(Some(&query), MAX_URL_BYTES) {
            prop_assert!(matches!(url.scheme(), "http" | "https"), "{url}");
            prop_assert!(url.username().is_empty() && url.password().is_none(), "{url}");
            prop_assert!(url.as_str().len() <= MAX_URL_BYTES, "{url}");
            let host = url.host_str().unwrap_or_default();
            prop_assert!(!host.is_empty() && !host.ends_with('.'), "{url}");
            let _ = HostPolicy::new(Vec::new(), Vec::new(), false).check_url(&url);
        }
    }

    /// A non-global IPv4 address is refused in every spelling: decimal, octal, hex, short forms,
    /// a trailing dot, IPv4-mapped, -compatible, NAT64 and 6to4 IPv6. Refused means the `url=`
    /// parser or the guard says no; neither may say yes.
    #[test]
    fn a_refused_address_is_refused_in_every_spelling(a in refused_v4()) {
        prop_assert!(!target::is_global(IpAddr::V4(a)));
        let guard = HostPolicy::new(Vec::new(), Vec::new(), false);
        for host in spellings(a) {
            let target = format!("http://{host}/x.jpg");
            if let Ok(url) = target::parse_image_url(Some(&url_query(&target)), MAX_URL_BYTES) {
                let checked = guard.check_url(&url);
                prop_assert!(
                    matches!(checked, Err(TargetError::PrivateAddress(_))),
                    "{target} → {url} → {checked:?}"
                );
            }
        }
    }

    /// Any path under the Supabase route either is refused or names an object under the
    /// route's upstream prefix: `.`/`..` segments, encoded or not, and backslashes never climb.
    #[test]
    fn route_paths_never_climb_out_of_their_prefix(
        segments in proptest::collection::vec(
            prop_oneof![
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just("%2e%2E".to_owned()),
                Just("%2e".to_owned()),
                Just("..%5c..".to_owned()),
                Just("%5C".to_owned()),
                Just("%2F..".to_owned()),
                Just("%00".to_owned()),
                Just("".to_owned()),
                proptest::string::string_regex(r"[a-zA-Z0-9%._~!$&'()*+,;=:@-]{0,12}").unwrap(),
            ],
            0..8,
        ),
        query in proptest::option::of(proptest::string::string_regex(r"[a-zA-Z0-9%._~&=/?-]{0,20}").unwrap()),
    ) {
        let config = imgedge::Config::from_toml(
            "[supabase]\nupstream = \"http://storage.internal:5000/base\"",
        )
        .unwrap();
        let routes = Routes::new(&config);
        let mut path = format!("/storage/v1/object/public/{}", segments.join("/"));
        if let Some(q) = &query {
            path.push('?');
            path.push_str(q);
        }
        let Ok(uri) = path.parse::<Uri>() else { return Ok(()) };
        let route = routes.route_of(uri.path());
        if let Ok(key) = routes.purge_key(route, &uri) {
            let url = url::Url::parse(key.as_str().split_once(' ').unwrap().1).unwrap();
            prop_assert_eq!(url.host_str(), Some("storage.internal"));
            prop_assert!(
                url.path().starts_with("/base/storage/v1/object/public/"),
                "{} → {}", path, url
            );
        }
    }

    /// Any `Cache-Control` value, on a request or a response: parsing never panics and no
    /// number it yields passes 2^31 seconds; a `max-age` of any size is read as at most 2^31.
    #[test]
    fn cache_control_numbers_are_bounded(value in hostile_text(), digits in "[0-9]{1,40}") {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append(http::header::CACHE_CONTROL, v);
        }
        let max_age = format!("max-age={digits}, s-maxage={digits}, stale-while-revalidate={digits}");
        headers.append(http::header::CACHE_CONTROL, HeaderValue::from_str(&max_age).unwrap());
        let response = ResponseDirectives::parse(&headers);
        for n in [response.max_age, response.s_maxage, response.stale_while_revalidate, response.stale_if_error] {
            prop_assert!(n.unwrap_or(0) <= MAX_DELTA_SECONDS);
        }
        let expected = digits.parse::<u128>().map_or(MAX_DELTA_SECONDS, |n| n.min(u128::from(MAX_DELTA_SECONDS)) as u64);
        prop_assert!(response.s_maxage.is_some());
        if value.is_empty() {
            prop_assert_eq!(response.s_maxage, Some(expected));
        }
        let request = RequestDirectives::parse(&headers);
        for n in [request.max_age, request.min_fresh, request.max_stale.flatten()] {
            prop_assert!(n.unwrap_or(0) <= MAX_DELTA_SECONDS);
        }
    }

    /// Any `Range` value against any length: never panics, and a satisfiable range lies inside
    /// the body, first ≤ last < length.
    #[test]
    fn ranges_stay_inside_the_body(
        value in prop_oneof![
            hostile_text(),
            "bytes= ?[0-9]{0,22} ?- ?[0-9]{0,22}",
            "bytes=-[0-9]{0,22}",
        ],
        total in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>(), 0u64..10_000],
    ) {
        let Ok(value) = HeaderValue::from_str(&value) else { return Ok(()) };
        if let Some(Ok((first, last))) = single_byte_range(&value, total) {
            prop_assert!(first <= last && last < total, "{value:?} of {total} → {first}-{last}");
        }
    }

    /// Any `If-None-Match` against any entity tag: never panics; `*` matches everything, and a
    /// tag always matches itself, strong or weak (weak comparison, RFC 9110 §13.1.2).
    #[test]
    fn if_none_match_is_total_and_reflexive(list in hostile_text(), tag in "[!#-~]{0,20}", weak in any::<bool>()) {
        let _ = if_none_match_matches(&list, &tag);
        let etag = format!("\"{tag}\"");
        prop_assert!(if_none_match_matches("*", &etag));
        let asked = if weak { format!("W/{etag}") } else { etag.clone() };
        let list = format!("\"other\", {asked}");
        prop_assert!(if_none_match_matches(&list, &etag));
    }

    /// Any `Age`, `Date`, `Expires`, `Last-Modified` and `Cache-Control` an origin sends, at any
    /// times: the storage decision never panics, every duration it yields is at most 2^31
    /// seconds, the current age at any later moment is too, and so is every usability decision
    /// for any request.
    #[test]
    fn freshness_is_total_and_bounded(
        status in 100u16..600,
        age in prop_oneof![hostile_text(), "[0-9]{1,30}", Just("18446744073709551615".to_owned())],
        cache_control in prop_oneof![hostile_text(), "(max-age|s-maxage|stale-if-error|stale-while-revalidate)=[0-9]{1,30}"],
        date_offset in any::<i64>(),
        expires_offset in any::<i64>(),
        last_modified_offset in any::<i64>(),
        request_secs in 0u64..(1 << 40),
        delay_secs in 0u64..(1 << 33),
        later_secs in any::<u64>(),
        request_cc in hostile_text(),
        authorized in any::<bool>(),
    ) {
        let request_time = SystemTime::UNIX_EPOCH + Duration::from_secs(request_secs);
        let response_time = request_time + Duration::from_secs(delay_secs);
        let at = |offset: i64| {
            let base = response_time.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
            let secs = base.saturating_add(offset).clamp(0, 253_402_300_799); // year 9999
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
        };
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (http::header::AGE, age.clone()),
            (http::header::CACHE_CONTROL, cache_control.clone()),
            (http::header::DATE, at(date_offset)),
            (http::header::EXPIRES, at(expires_offset)),
            (http::header::LAST_MODIFIED, at(last_modified_offset)),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.append(name, v);
            }
        }
        let Ok(status) = StatusCode::from_u16(status) else { return Ok(()) };
        let policy = FreshnessPolicy {
            default_ttl: Some(Duration::from_secs(3600)),
            max_heuristic_ttl: Duration::from_secs(86_400),
            negative_ttl: Duration::from_secs(60),
            targeted_field: None,
            valid_until: None,
        };
        let facts = RequestFacts { authorized, forwarded_client_headers: false };
        let times = ResponseTimes { request_time, response_time };
        let Ok(f) = freshness::storable(status, &headers, facts, times, policy) else { return Ok(()) };
        for d in [f.lifetime, f.initial_age, f.stale_while_revalidate, f.stale_if_error, f.time_to_live()] {
            prop_assert!(d <= MAX_DELTA, "{d:?} from {headers:?}");
        }
        let now = response_time.checked_add(Duration::from_secs(later_secs)).unwrap_or(response_time);
        let current = f.current_age(response_time, now);
        prop_assert!(current <= MAX_DELTA);
        let mut request = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&request_cc) {
            request.append(http::header::CACHE_CONTROL, v);
        }
        let usable = freshness::usability(&f, current, &RequestDirectives::parse(&request));
        if usable == Usability::Fresh {
            prop_assert!(f.lifetime > current);
        }
        let _ = f.may_serve_stale(current, MAX_DELTA);
    }
}
