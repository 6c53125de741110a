//! RFC 9111 request directives, wired through real sockets (the timing rules themselves are unit
//! tests in freshness.rs, with explicit clocks).

use crate::support::*;

async fn cached_proxy(origin: &TestOrigin) -> TestProxy {
    origin.route(
        "/a.jpg",
        Reply::ok("v1").header("Cache-Control", "max-age=600"),
    );
    let proxy = TestProxy::for_origin(origin, "").await;
    proxy.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(origin.hits("/a.jpg"), 1);
    proxy
}

async fn get_with(proxy: &TestProxy, target: &str, cache_control: &str) -> Got {
    let headers = [("Cache-Control", cache_control)];
    proxy.send(Method::GET, &image_path(target), &headers).await
}

#[tokio::test]
async fn only_if_cached_is_504_on_a_miss_and_a_hit_otherwise() {
    let origin = TestOrigin::start().await;
    let proxy = cached_proxy(&origin).await;
    let r = get_with(&proxy, &origin.url("/a.jpg"), "only-if-cached").await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    let r = get_with(&proxy, &origin.url("/never.jpg"), "only-if-cached").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), "not_cached");
    assert_eq!(origin.hits("/never.jpg"), 0);
}

#[tokio::test]
async fn no_cache_max_age_and_min_fresh_send_the_request_to_the_origin() {
    let origin = TestOrigin::start().await;
    let proxy = cached_proxy(&origin).await;
    for (n, cache_control) in ["no-cache", "max-age=0", "min-fresh=3600"]
        .into_iter()
        .enumerate()
    {
        let r = get_with(&proxy, &origin.url("/a.jpg"), cache_control).await;
        assert_eq!(
            r.cache_status(),
            "imgedge; fwd=uri-miss; stored",
            "{cache_control}"
        );
        assert_eq!(origin.hits("/a.jpg"), n + 2, "{cache_control}");
    }
    let r = get_with(&proxy, &origin.url("/a.jpg"), "max-age=600, min-fresh=10").await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    let target = image_path(&origin.url("/a.jpg"));
    let pragma = proxy
        .send(Method::GET, &target, &[("Pragma", "no-cache")])
        .await;
    assert_eq!(pragma.cache_status(), "imgedge; fwd=uri-miss; stored");
}

#[tokio::test]
async fn a_no_store_request_is_answered_but_not_stored() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/b.jpg",
        Reply::ok("v1").header("Cache-Control", "max-age=600"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let r = get_with(&proxy, &origin.url("/b.jpg"), "no-store").await;
    assert_eq!(
        r.cache_status(),
        "imgedge; fwd=uri-miss; detail=request-no-store"
    );
    assert_eq!(r.text(), "v1");
    let r = proxy.get_image(&origin.url("/b.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
}

fn header_sent(origin: &TestOrigin, path: &str, name: &str) -> Option<String> {
    let sent = origin.last_request(path);
    sent.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

#[tokio::test]
async fn a_304_refreshes_the_stored_headers_and_serves_the_stored_body() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v.jpg",
        Reply::ok("version one")
            .header("Cache-Control", "max-age=600")
            .header("ETag", "\"v1\"")
            .header("Last-Modified", "Tue, 01 Sep 2026 10:00:00 GMT"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    proxy.get_image(&origin.url("/v.jpg")).await;
    origin.route(
        "/v.jpg",
        Reply::ok("")
            .status(304)
            .header("Cache-Control", "max-age=900")
            .header("ETag", "\"v1\""),
    );
    for directive in ["no-cache", "max-age=0"] {
        let r = get_with(&proxy, &origin.url("/v.jpg"), directive).await;
        assert_eq!(r.status, 200, "{directive}");
        assert_eq!(r.cache_status(), "imgedge; fwd=request; fwd-status=304");
        assert_eq!(
            r.header("cache-control"),
            "max-age=900",
            "updated from the 304"
        );
        assert_eq!(r.text(), "version one");
        assert_eq!(
            header_sent(&origin, "/v.jpg", "if-none-match").as_deref(),
            Some("\"v1\"")
        );
        assert_eq!(
            header_sent(&origin, "/v.jpg", "if-modified-since").as_deref(),
            Some("Tue, 01 Sep 2026 10:00:00 GMT")
        );
    }
    let r = proxy.get_image(&origin.url("/v.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(r.header("cache-control"), "max-age=900");
    assert_eq!(r.text(), "version one");
    assert_eq!(origin.hits("/v.jpg"), 3);
}

#[tokio::test]
async fn a_full_response_to_revalidation_replaces_the_stored_one() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/w.jpg",
        Reply::ok("old")
            .header("Cache-Control", "max-age=600")
            .header("ETag", "\"1\""),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    proxy.get_image(&origin.url("/w.jpg")).await;
    origin.route(
        "/w.jpg",
        Reply::ok("new")
            .header("Cache-Control", "max-age=600")
            .header("ETag", "\"2\""),
    );
    let r = get_with(&proxy, &origin.url("/w.jpg"), "no-cache").await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(r.text(), "new");
    let r = proxy.get_image(&origin.url("/w.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(
        (r.header("etag"), r.text()),
        ("\"2\"".to_owned(), "new".to_owned())
    );
}

/// A response that is stale on arrival (Age past max-age) but carries stale windows.
fn stale_reply(body: &'static str, directives: &str) -> Reply {
    Reply::ok(body)
        .header("Cache-Control", &format!("max-age=10, {directives}"))
        .header("Age", "20")
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once_in_the_background() {
    let origin = TestOrigin::start().await;
    origin.route("/s.jpg", stale_reply("v1", "stale-while-revalidate=600"));
    let proxy = TestProxy::for_origin(&origin, "").await;
    proxy.get_image(&origin.url("/s.jpg")).await;
    origin.route(
        "/s.jpg",
        Reply::ok("v2").header("Cache-Control", "max-age=600"),
    );
    let r = proxy.get_image(&origin.url("/s.jpg")).await;
    assert_eq!(
        r.cache_status(),
        "imgedge; hit; detail=stale-while-revalidate"
    );
    assert_eq!(r.text(), "v1");
    let mut body = String::new();
    for _ in 0..100 {
        body = proxy.get_image(&origin.url("/s.jpg")).await.text();
        if body == "v2" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(body, "v2", "the background refresh stored the new version");
    assert_eq!(origin.hits("/s.jpg"), 2, "one refresh");
}

#[tokio::test]
async fn stale_if_error_stands_in_for_a_failing_origin_unless_must_revalidate() {
    let origin = TestOrigin::start().await;
    origin.route("/e.jpg", stale_reply("kept", "stale-if-error=600"));
    origin.route(
        "/m.jpg",
        stale_reply("strict", "stale-if-error=600, must-revalidate"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for path in ["/e.jpg", "/m.jpg"] {
        proxy.get_image(&origin.url(path)).await;
    }
    for failure in [
        Reply::ok("boom").status(500),
        Reply::ok("").fault(Fault::ResetBeforeHead),
    ] {
        origin.route("/e.jpg", failure.clone());
        let r = proxy.get_image(&origin.url("/e.jpg")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.cache_status(),
            "imgedge; fwd=stale; detail=stale-if-error"
        );
        assert_eq!(r.text(), "kept");
        origin.route("/m.jpg", failure);
        let r = proxy.get_image(&origin.url("/m.jpg")).await;
        assert_ne!(r.status, 200, "must-revalidate forbids serving stale");
    }
}

#[tokio::test]
async fn a_single_range_on_a_stored_object_is_answered_206_from_the_cache() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/r.jpg",
        Reply::ok("0123456789abcdef").header("ETag", "\"r1\""),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let target = image_path(&origin.url("/r.jpg"));
    let get = async |range, if_range: Option<&str>| {
        let mut headers = vec![("Range", range)];
        headers.extend(if_range.map(|v| ("If-Range", v)));
        proxy.send(Method::GET, &target, &headers).await
    };
    // A miss fetches and returns the whole object (the Range is not sent upstream).
    let r = get("bytes=0-3", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "0123456789abcdef");
    for (range, body, content_range) in [
        ("bytes=0-3", "0123", "bytes 0-3/16"),
        ("bytes=10-", "abcdef", "bytes 10-15/16"),
        ("bytes=-2", "ef", "bytes 14-15/16"),
    ] {
        let r = get(range, None).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.header("content-range"), content_range);
        assert_eq!(r.header("accept-ranges"), "bytes");
        assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
        assert_eq!(r.text(), body);
    }
    let r = get("bytes=16-", None).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), "bytes */16");
    let r = get("bytes=0-3", Some("\"r1\"")).await;
    assert_eq!(r.status, 206);
    let r = get("bytes=0-3", Some("\"other\"")).await;
    assert_eq!(r.status, 200, "If-Range mismatch sends everything");
    assert_eq!(r.text().len(), 16);
    assert_eq!(origin.hits("/r.jpg"), 1);
}

#[tokio::test]
async fn an_unreachable_origin_gets_stale_responses_unless_they_must_be_revalidated() {
    let origin = TestOrigin::start().await;
    // Stale on arrival, and stored because they can be revalidated (ETag).
    origin.route(
        "/u.jpg",
        stale_reply("old", "public").header("ETag", "\"u\""),
    );
    origin.route(
        "/p.jpg",
        stale_reply("strict", "proxy-revalidate").header("ETag", "\"p\""),
    );
    origin.route(
        "/s.jpg",
        Reply::ok("shared")
            .header("Cache-Control", "s-maxage=10")
            .header("Age", "20")
            .header("ETag", "\"s\""),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let off = TestProxy::for_origin(&origin, "[cache]\nstale_if_unreachable = \"0s\"").await;
    for p in [&proxy, &off] {
        for path in ["/u.jpg", "/p.jpg", "/s.jpg"] {
            p.get_image(&origin.url(path)).await;
        }
    }
    // An origin that answers, even with an error, is not unreachable: its answer is passed on.
    origin.route("/u.jpg", Reply::ok("boom").status(500));
    let r = proxy.get_image(&origin.url("/u.jpg")).await;
    assert_eq!(
        r.status, 500,
        "a 5xx without stale-if-error is not replaced"
    );
    // (The origin's own error body is not served on /image-proxy: imgedge's is.)
    assert_eq!(r.error_code(), "origin_status");

    for path in ["/u.jpg", "/p.jpg", "/s.jpg"] {
        origin.route(path, Reply::ok("").fault(Fault::ResetBeforeHead));
    }
    let r = proxy.get_image(&origin.url("/u.jpg")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.cache_status(), "imgedge; fwd=stale; detail=unreachable");
    assert_eq!(r.text(), "old");
    for path in ["/p.jpg", "/s.jpg"] {
        let r = proxy.get_image(&origin.url(path)).await;
        assert_eq!(
            r.status, 502,
            "{path}: proxy-revalidate and s-maxage forbid it"
        );
    }
    let r = off.get_image(&origin.url("/u.jpg")).await;
    assert_eq!(r.status, 502, "stale_if_unreachable = 0s turns it off");
}
