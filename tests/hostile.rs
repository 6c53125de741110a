//! Hostile input: what origins and clients send to break a proxy. Every case must get a clear
//! answer and leave the proxy serving (no panic, no growth).

mod support;

use support::*;

/// Largest integer header values an origin can send: none may overflow a duration sum or the
/// memory tier's expiry (RFC 9111 §1.2.2: such values count as 2^31 seconds).
#[tokio::test]
async fn huge_freshness_and_age_values_saturate_instead_of_panicking() {
    let origin = TestOrigin::start().await;
    const HUGE: &str = "18446744073709551615";
    const HUGER: &str = "99999999999999999999999999";
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "/max-age.jpg",
            vec![("Cache-Control", format!("max-age={HUGE}"))],
        ),
        (
            "/s-maxage.jpg",
            vec![("Cache-Control", format!("public, s-maxage={HUGER}"))],
        ),
        (
            "/stale.jpg",
            vec![(
                "Cache-Control",
                format!("max-age=60, stale-while-revalidate={HUGE}, stale-if-error={HUGE}"),
            )],
        ),
        (
            "/age.jpg",
            vec![
                ("Cache-Control", "max-age=60".to_owned()),
                ("Age", HUGE.to_owned()),
                ("ETag", "\"a\"".to_owned()),
            ],
        ),
        (
            "/age-huger.jpg",
            vec![
                ("Cache-Control", format!("max-age={HUGE}")),
                ("Age", HUGER.to_owned()),
            ],
        ),
        (
            "/expires.jpg",
            vec![("Expires", "Fri, 31 Dec 9999 23:59:59 GMT".to_owned())],
        ),
        (
            "/surrogate.jpg",
            vec![("Surrogate-Control", format!("max-age={HUGE}"))],
        ),
    ];
    for (path, headers) in &cases {
        let mut reply = Reply::ok(format!("body of {path}"));
        for (name, value) in headers {
            reply = reply.header(name, value);
        }
        origin.route(path, reply);
    }
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (path, _) in &cases {
        for _ in 0..2 {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.text(), format!("body of {path}"), "{path}");
        }
    }
    // Huge request directives too.
    for cache_control in [
        format!("max-age={HUGE}"),
        format!("max-stale={HUGE}"),
        format!("min-fresh={HUGE}"),
        format!("max-stale={HUGER}, min-fresh={HUGER}"),
    ] {
        let r = proxy
            .send(
                Method::GET,
                &image_path(&origin.url("/max-age.jpg")),
                &[("Cache-Control", &cache_control)],
            )
            .await;
        assert_eq!(r.status, 200, "{cache_control}");
    }
    // Still serving, and what could be stored was.
    let r = proxy.get_image(&origin.url("/max-age.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(proxy.get("/health").await.status, 200);
}

/// Upstream failures reach the client as one generic message: which internal names resolve, and
/// to what, is for the log.
#[tokio::test]
async fn upstream_failures_are_generic_for_the_client() {
    let proxy = TestProxy::start(
        imgedge::Config::from_toml("[upstream]\nconnect_timeout = \"1s\"\n[log]\naccess = false")
            .unwrap(),
    )
    .await;
    let r = proxy.get_image("http://no-such-host.invalid/a.jpg").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_error");
    assert_eq!(r.json()["message"], "the upstream request failed");
    // A localhost name is refused as a private address without asking DNS, in any spelling.
    for host in ["localhost", "LOCALHOST.", "img.localhost"] {
        let r = proxy.get_image(&format!("http://{host}/a.jpg")).await;
        assert_eq!(r.status, 403, "{host}");
        assert_eq!(r.error_code(), "private_address", "{host}");
    }
}
