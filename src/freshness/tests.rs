use super::*;
use http::HeaderValue;

const T0: u64 = 1_700_000_000;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn times() -> ResponseTimes {
    ResponseTimes {
        request_time: at(T0),
        response_time: at(T0),
    }
}

fn policy(default_secs: u64) -> FreshnessPolicy {
    FreshnessPolicy {
        default_ttl: Some(Duration::from_secs(default_secs)),
        max_heuristic_ttl: Duration::from_secs(86_400),
        negative_ttl: Duration::from_secs(60),
        targeted_field: None,
        valid_until: None,
    }
}

fn decide(pairs: &[(&'static str, String)]) -> Result<Freshness, NotStorable> {
    storable(
        StatusCode::OK,
        &headers(pairs),
        RequestFacts::default(),
        times(),
        policy(3600),
    )
}

#[test]
fn s_maxage_beats_max_age_beats_expires_beats_default() {
    let date = ("date", httpdate::fmt_http_date(at(T0)));
    let expires = ("expires", httpdate::fmt_http_date(at(T0 + 50)));
    let cc = |v: &str| ("cache-control", v.to_owned());
    let life = |p: &[(&'static str, String)]| decide(p).unwrap().lifetime.as_secs();
    assert_eq!(life(&[cc("max-age=20, s-maxage=10"), expires.clone()]), 10);
    assert_eq!(life(&[cc("max-age=20"), expires.clone()]), 20);
    assert_eq!(life(&[date.clone(), expires.clone()]), 50);
    assert_eq!(life(&[]), 3600);
    assert_eq!(
        decide(&[("expires", "0".into())]).unwrap_err(),
        NotStorable::Stale
    );
}

#[test]
fn no_store_private_no_cache_and_statuses_are_not_stored() {
    let cc = |v: &str| decide(&[("cache-control", v.to_owned())]);
    assert_eq!(cc("public, no-store").unwrap_err(), NotStorable::NoStore);
    assert_eq!(cc("private, max-age=60").unwrap_err(), NotStorable::Private);
    assert_eq!(cc("no-cache").unwrap_err(), NotStorable::NoCache);
    assert_eq!(cc("max-age=0").unwrap_err(), NotStorable::Stale);
    assert_eq!(cc("max-age=bogus").unwrap_err(), NotStorable::Stale);
    let not_found = storable(
        StatusCode::NOT_FOUND,
        &HeaderMap::new(),
        RequestFacts::default(),
        times(),
        policy(60),
    );
    assert_eq!(
        not_found.unwrap().lifetime,
        Duration::from_secs(60),
        "negative caching"
    );
    for status in [206, 304, 302, 500] {
        let r = storable(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            RequestFacts::default(),
            times(),
            policy(60),
        );
        assert_eq!(r.unwrap_err(), NotStorable::Status, "{status}");
    }
    // Any final status with explicit freshness may be stored (RFC 9111 §3).
    let h = headers(&[("cache-control", "max-age=30".into())]);
    assert!(
        storable(
            StatusCode::FOUND,
            &h,
            RequestFacts::default(),
            times(),
            policy(60)
        )
        .is_ok()
    );
}

#[test]
fn heuristic_freshness_is_a_tenth_of_the_last_modified_age_capped() {
    let lm =
        |secs_ago: u64| headers(&[("last-modified", httpdate::fmt_http_date(at(T0 - secs_ago)))]);
    let life = |h: &HeaderMap| {
        storable(
            StatusCode::OK,
            h,
            RequestFacts::default(),
            times(),
            policy(3600),
        )
        .map(|f| f.lifetime.as_secs())
    };
    assert_eq!(life(&lm(10_000)), Ok(1000));
    assert_eq!(
        life(&lm(100 * 86_400)),
        Ok(86_400),
        "capped by max_heuristic_ttl"
    );
    assert_eq!(
        life(&HeaderMap::new()),
        Ok(3600),
        "default_ttl without Last-Modified"
    );
    let strict = FreshnessPolicy {
        default_ttl: None,
        ..policy(0)
    };
    let r = storable(
        StatusCode::OK,
        &HeaderMap::new(),
        RequestFacts::default(),
        times(),
        strict,
    );
    assert_eq!(r.unwrap_err(), NotStorable::NoFreshness);
}

#[test]
fn request_directives_decide_whether_a_stored_response_may_serve() {
    let f = |lifetime: u64, must_revalidate: bool| Freshness {
        lifetime: Duration::from_secs(lifetime),
        initial_age: Duration::ZERO,
        must_revalidate,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
    };
    let req = |cc: &str| RequestDirectives::parse(&headers(&[("cache-control", cc.to_owned())]));
    use Usability::*;
    // (lifetime, must-revalidate, age, request Cache-Control, expected)
    for (lifetime, must_revalidate, age, cc, expected) in [
        (100, false, 10, "", Fresh),
        (100, false, 10, "no-cache", NeedsValidation),
        (100, false, 10, "max-age=5", NeedsValidation),
        (100, false, 95, "min-fresh=10", NeedsValidation),
        (100, false, 110, "", NeedsValidation),
        (100, false, 110, "max-stale", StaleAccepted),
        (100, false, 110, "max-stale=5", NeedsValidation),
        (100, false, 110, "max-stale=20", StaleAccepted),
        (100, true, 110, "max-stale", NeedsValidation),
    ] {
        let got = usability(
            &f(lifetime, must_revalidate),
            Duration::from_secs(age),
            &req(cc),
        );
        assert_eq!(got, expected, "lifetime {lifetime}, age {age}, {cc:?}");
    }
    let pragma = RequestDirectives::parse(&headers(&[("pragma", "no-cache".into())]));
    assert!(pragma.no_cache);
    let d = req("only-if-cached, no-store, max-age=bogus");
    assert!(d.only_if_cached && d.no_store && d.max_age.is_none());
}

#[test]
fn age_is_corrected_per_rfc9111_4_2_3() {
    // The origin says Age: 30 and the response took 2 s to arrive.
    let t = ResponseTimes {
        request_time: at(T0),
        response_time: at(T0 + 2),
    };
    let h = headers(&[
        ("cache-control", "max-age=100".into()),
        ("age", "30".into()),
    ]);
    let f = storable(StatusCode::OK, &h, RequestFacts::default(), t, policy(0)).unwrap();
    assert_eq!(f.initial_age, Duration::from_secs(32));
    assert_eq!(f.time_to_live(), Duration::from_secs(68));
    assert_eq!(
        f.current_age(at(T0 + 2), at(T0 + 12)),
        Duration::from_secs(42)
    );
    // A Date 40 s in the past outweighs a smaller Age.
    let h = headers(&[
        ("cache-control", "max-age=100".into()),
        ("date", httpdate::fmt_http_date(at(T0 - 38))),
    ]);
    let f = storable(StatusCode::OK, &h, RequestFacts::default(), t, policy(0)).unwrap();
    assert_eq!(f.initial_age, Duration::from_secs(40));
    // An Age beyond the lifetime means stale already.
    let h = headers(&[("cache-control", "max-age=10".into()), ("age", "11".into())]);
    assert_eq!(
        storable(
            StatusCode::OK,
            &h,
            RequestFacts::default(),
            times(),
            policy(0)
        )
        .unwrap_err(),
        NotStorable::Stale
    );
}

#[test]
fn authorized_requests_are_shared_only_when_the_response_allows_it() {
    let authorized = RequestFacts {
        authorized: true,
        forwarded_client_headers: true,
    };
    let decide = |cc: &str| {
        let h = headers(&[("cache-control", cc.to_owned())]);
        storable(StatusCode::OK, &h, authorized, times(), policy(60))
    };
    assert_eq!(
        decide("max-age=60").unwrap_err(),
        NotStorable::Authorization
    );
    for cc in [
        "public, max-age=60",
        "s-maxage=60",
        "max-age=60, must-revalidate",
    ] {
        assert!(decide(cc).is_ok(), "{cc}");
    }
    let h = headers(&[("set-cookie", "a=b".into()), ("vary", "accept, *".into())]);
    let facts = RequestFacts {
        authorized: false,
        forwarded_client_headers: true,
    };
    assert_eq!(
        storable(StatusCode::OK, &h, facts, times(), policy(60)).unwrap_err(),
        NotStorable::Vary
    );
    assert!(
        storable(
            StatusCode::OK,
            &h,
            RequestFacts::default(),
            times(),
            policy(60)
        )
        .is_ok()
    );
}

#[test]
fn an_invalid_age_makes_the_response_stale_on_arrival() {
    let decide_age = |values: &[&str]| {
        let mut h = headers(&[("cache-control", "max-age=3600".into())]);
        for v in values {
            h.append(AGE, HeaderValue::from_str(v).unwrap());
        }
        storable(
            StatusCode::OK,
            &h,
            RequestFacts::default(),
            times(),
            policy(60),
        )
    };
    assert!(decide_age(&["10"]).is_ok());
    // a list on one line counts by its first member (§5.1): `0, 7200` is fresh, and
    // `7200, 0` (an hour past max-age=3600) is not
    assert_eq!(
        decide_age(&["0, 7200"]).unwrap().initial_age,
        Duration::ZERO
    );
    assert_eq!(decide_age(&["0,0"]).unwrap().initial_age, Duration::ZERO);
    assert_eq!(decide_age(&["7200, 0"]).unwrap_err(), NotStorable::Stale);
    for bad in [
        &["abc"][..],
        &["-10"],
        &["1.5"],
        &["old, 0"],
        &["0", "0"],
        &["0", "7200"],
        &["1;a=b"],
        &[""],
    ] {
        assert_eq!(decide_age(bad).unwrap_err(), NotStorable::Stale, "{bad:?}");
    }
}

#[test]
fn delta_seconds_past_2_pow_31_count_as_2_pow_31_and_nothing_overflows() {
    assert_eq!(delta_seconds("60"), Some(60));
    assert_eq!(delta_seconds("2147483649"), Some(MAX_DELTA_SECONDS));
    assert_eq!(
        delta_seconds("18446744073709551615"),
        Some(MAX_DELTA_SECONDS)
    );
    assert_eq!(
        delta_seconds("99999999999999999999999"),
        Some(MAX_DELTA_SECONDS)
    );
    for bad in ["", "-1", "1.5", "12a", " 1"] {
        assert_eq!(delta_seconds(bad), None, "{bad:?}");
    }
    let huge = "18446744073709551615";
    let f = decide(&[
        ("cache-control", format!("max-age={huge}")),
        ("age", huge.to_owned()),
    ]);
    // Stale on arrival (an Age of 2^31 is not below a lifetime of 2^31), but no panic.
    assert_eq!(f.unwrap_err(), NotStorable::Stale);
    let kept = decide(&[
        (
            "cache-control",
            format!("max-age=1, stale-while-revalidate={huge}"),
        ),
        ("age", huge.to_owned()),
    ])
    .unwrap();
    assert_eq!(kept.stale_while_revalidate, MAX_DELTA);
    assert_eq!(kept.initial_age, MAX_DELTA);
    let f = decide(&[("cache-control", format!("s-maxage=9{huge}"))]).unwrap();
    assert_eq!(f.lifetime, MAX_DELTA);
    assert_eq!(f.current_age(at(0), at(u64::from(u32::MAX))), MAX_DELTA);
    let far = decide(&[("expires", "Fri, 31 Dec 9999 23:59:59 GMT".to_owned())]).unwrap();
    assert_eq!(far.lifetime, MAX_DELTA);
    let request = RequestDirectives::parse(&headers(&[(
        "cache-control",
        format!("max-stale={huge}, min-fresh=9{huge}"),
    )]));
    assert_eq!(request.max_stale, Some(Some(MAX_DELTA_SECONDS)));
    assert_eq!(
        usability(&f, MAX_DELTA, &request),
        Usability::NeedsValidation
    );
}

#[test]
fn must_understand_stores_only_known_statuses() {
    let h = headers(&[("cache-control", "max-age=60, must-understand".into())]);
    let decide_status = |code: u16| {
        storable(
            StatusCode::from_u16(code).unwrap(),
            &h,
            RequestFacts::default(),
            times(),
            policy(60),
        )
    };
    assert!(decide_status(200).is_ok());
    assert_eq!(decide_status(599).unwrap_err(), NotStorable::Status);
}

#[test]
fn surrogate_control_takes_precedence_over_cache_control() {
    let life = |pairs: &[(&'static str, String)]| decide(pairs).map(|f| f.lifetime.as_secs());
    let sc = |v: &str| ("surrogate-control", v.to_owned());
    let cc = |v: &str| ("cache-control", v.to_owned());
    assert_eq!(life(&[sc("max-age=10"), cc("max-age=3600")]), Ok(10));
    assert_eq!(life(&[sc("max-age=10"), cc("no-store")]), Ok(10));
    assert_eq!(
        life(&[sc("no-store"), cc("max-age=3600")]),
        Err(NotStorable::NoStore)
    );
    assert_eq!(
        life(&[sc("max-age=10;other-device"), cc("max-age=3600")]),
        Ok(3600)
    );
    assert_eq!(
        life(&[
            sc("max-age=0"),
            ("expires", httpdate::fmt_http_date(at(T0 + 600)))
        ]),
        Err(NotStorable::Stale)
    );
}
