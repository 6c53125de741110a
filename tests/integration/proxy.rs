//! Behaviour of the proxy routes through real loopback sockets: caching and the tee, streaming,
//! headers, and every error code, against a scripted origin.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use tokio::sync::Notify;

const JPEG: &[u8] = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes all the same \xff\xd9";

// ---------------------------------------------------------------- caching and the tee

#[tokio::test]
async fn second_request_is_a_memory_hit_and_origin_is_asked_once() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cat.jpg",
        Reply::ok(JPEG)
            .header("Cache-Control", "public, max-age=600")
            .header("ETag", "\"v1\"")
            .header("Last-Modified", "Tue, 01 Sep 2026 10:00:00 GMT"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;

    let first = proxy.get_image(&origin.url("/cat.jpg")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(first.header("content-length"), JPEG.len().to_string());
    assert_eq!(first.body, JPEG);

    let second = proxy.get_image(&origin.url("/cat.jpg")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.cache_status(), "imgedge; hit; detail=memory");
    assert!(second.header("age").parse::<u64>().is_ok(), "Age on a hit");
    assert_eq!(second.header("content-type"), "image/jpeg");
    assert_eq!(second.header("etag"), "\"v1\"");
    assert_eq!(
        second.header("last-modified"),
        "Tue, 01 Sep 2026 10:00:00 GMT"
    );
    assert_eq!(second.header("cache-control"), "public, max-age=600");
    assert_eq!(second.header("x-content-type-options"), "nosniff");
    assert_eq!(second.header("content-length"), JPEG.len().to_string());
    assert_eq!(second.body, JPEG);
    assert_eq!(origin.hits("/cat.jpg"), 1);
}

#[tokio::test]
async fn raw_and_percent_encoded_targets_share_one_cache_entry() {
    let origin = TestOrigin::start().await;
    origin.route("/a.jpg?v=1&w=2", Reply::ok(JPEG));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let raw = origin.url("/a.jpg?v=1&w=2");
    let encoded: String = url::form_urlencoded::byte_serialize(raw.as_bytes()).collect();

    let first = proxy.get(&format!("/image-proxy?url={raw}")).await;
    assert_eq!(first.cache_status(), "imgedge; fwd=uri-miss; stored");
    let second = proxy.get(&format!("/image-proxy?url={encoded}")).await;
    assert_eq!(second.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(second.body, JPEG);
    assert_eq!(origin.hits("/a.jpg?v=1&w=2"), 1);
}

#[tokio::test]
async fn a_chunked_body_is_stored_with_its_length_once_complete() {
    let origin = TestOrigin::start().await;
    let body = pattern(300_000);
    origin.route("/c.png", Reply::ok(body.clone()).chunked());
    let proxy = TestProxy::for_origin(&origin, "").await;

    let first = proxy.get_image(&origin.url("/c.png")).await;
    assert_eq!(first.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(
        first.header("content-length"),
        "",
        "unknown length streams chunked"
    );
    assert_eq!(first.body, body);
    let second = proxy.get_image(&origin.url("/c.png")).await;
    assert_eq!(second.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(second.header("content-length"), "300000");
    assert_eq!(second.body, body);
    assert_eq!(origin.hits("/c.png"), 1);
}

#[tokio::test]
async fn objects_over_max_cacheable_bytes_stream_through_unstored() {
    let origin = TestOrigin::start().await;
    origin.route("/big.jpg", Reply::pattern(200_001));
    origin.route("/big-chunked.jpg", Reply::pattern(200_001).chunked());
    let proxy = TestProxy::for_origin(&origin, "[cache]\nmax_cacheable_bytes = 200000").await;

    for _ in 0..2 {
        let r = proxy.get_image(&origin.url("/big.jpg")).await;
        assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; detail=too-large");
        assert_eq!(r.body, pattern(200_001));
    }
    assert_eq!(origin.hits("/big.jpg"), 2);

    // Without Content-Length the size shows only while streaming: the first response was
    // announced as a fill, the second is known (remembered) to be too large.
    let first = proxy.get_image(&origin.url("/big-chunked.jpg")).await;
    assert_eq!(first.body, pattern(200_001));
    let second = proxy.get_image(&origin.url("/big-chunked.jpg")).await;
    assert_eq!(
        second.cache_status(),
        "imgedge; fwd=uri-miss; detail=too-large"
    );
    assert_eq!(second.body, pattern(200_001));
    assert_eq!(origin.hits("/big-chunked.jpg"), 2);
}

#[tokio::test]
async fn uncacheable_responses_say_why_and_are_not_stored() {
    let origin = TestOrigin::start().await;
    origin.route("/ns", Reply::ok(JPEG).header("Cache-Control", "no-store"));
    origin.route(
        "/pr",
        Reply::ok(JPEG).header("Cache-Control", "private, max-age=60"),
    );
    origin.route(
        "/stale",
        Reply::ok(JPEG)
            .header("Cache-Control", "max-age=10")
            .header("Age", "20"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (path, detail) in [("/ns", "no-store"), ("/pr", "private"), ("/stale", "stale")] {
        for _ in 0..2 {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!(
                r.cache_status(),
                format!("imgedge; fwd=uri-miss; detail={detail}")
            );
            assert_eq!(r.body, JPEG);
        }
        assert_eq!(origin.hits(path), 2, "{path}");
    }
}

#[tokio::test]
async fn the_supabase_route_proxies_path_and_query_and_caches() {
    let origin = TestOrigin::start().await;
    let path = "/storage/v1/object/public/avatars/u/1/face.webp?v=3";
    origin.route(path, Reply::ok(JPEG).header("Content-Type", "image/webp"));
    let proxy = TestProxy::for_origin(&origin, "").await;

    let first = proxy.get(path).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_status(), "imgedge; fwd=uri-miss; stored");
    let second = proxy.get(path).await;
    assert_eq!(second.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(second.body, JPEG);
    assert_eq!(origin.hits(path), 1);
}

#[tokio::test]
async fn the_supabase_route_rejects_bad_paths_and_is_off_without_upstream() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "").await;
    for path in [
        "/storage/v1/object/public/b/../../../admin",
        "/storage/v1/object/public/b/%2e%2e/x",
        "/storage/v1/object/public/b/a%5C..%5Cx",
    ] {
        let (status, body) = raw_get(proxy.addr, path).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            body.contains("\"imgedgeCode\":\"bad_path\""),
            "{path}: {body}"
        );
    }
    let off = TestProxy::for_origin(&origin, "[supabase]\nupstream = \"\"").await;
    let r = off.get("/storage/v1/object/public/b/x.jpg").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "not_found");
    assert_eq!(origin.hits("/storage/v1/object/public/b/x.jpg"), 0);
}

#[tokio::test]
async fn head_requests_are_answered_without_a_body() {
    let origin = TestOrigin::start().await;
    origin.route("/h.jpg", Reply::ok(JPEG));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let target = image_path(&origin.url("/h.jpg"));

    let miss = proxy.send(Method::HEAD, &target, &[]).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.cache_status(), "imgedge; fwd=uri-miss; detail=method");
    assert_eq!(miss.header("content-length"), JPEG.len().to_string());
    assert!(miss.body.is_empty());
    proxy.get(&target).await;
    let hit = proxy.send(Method::HEAD, &target, &[]).await;
    assert_eq!(hit.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(hit.header("content-length"), JPEG.len().to_string());
    assert!(hit.body.is_empty());
    assert_eq!(origin.hits("/h.jpg"), 2, "one HEAD, one GET");
}

#[tokio::test]
async fn a_matching_if_none_match_on_a_hit_gets_304() {
    let origin = TestOrigin::start().await;
    origin.route("/e.jpg", Reply::ok(JPEG).header("ETag", "\"abc\""));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let target = image_path(&origin.url("/e.jpg"));
    proxy.get(&target).await;

    let r = proxy
        .send(Method::GET, &target, &[("If-None-Match", "W/\"abc\"")])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), "\"abc\"");
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    assert!(r.body.is_empty());
    let r = proxy
        .send(Method::GET, &target, &[("If-None-Match", "\"other\"")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, JPEG);
}

// ---------------------------------------------------------------- headers

#[tokio::test]
async fn hop_by_hop_headers_and_cookies_never_pass() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/h",
        Reply::ok(JPEG)
            .header("Set-Cookie", "session=secret")
            .header("Connection", "X-Internal")
            .header("X-Internal", "1")
            .header("Keep-Alive", "timeout=5")
            .header("Proxy-Authenticate", "Basic")
            .header("Server", "origin/1.0"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for _ in 0..2 {
        let r = proxy
            .send(
                Method::GET,
                &image_path(&origin.url("/h")),
                &[
                    ("Cookie", "client=secret"),
                    ("Authorization", "Bearer client"),
                ],
            )
            .await;
        for name in [
            "set-cookie",
            "x-internal",
            "keep-alive",
            "proxy-authenticate",
            "server",
        ] {
            assert!(r.headers.get(name).is_none(), "{name} leaked");
        }
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        assert!(!r.header("x-request-id").is_empty());
    }
    let sent = origin.last_request("/h");
    for name in ["cookie", "authorization"] {
        assert!(
            sent.iter().all(|(k, _)| k != name),
            "{name} forwarded upstream"
        );
    }
}

// ---------------------------------------------------------------- streaming

#[tokio::test]
async fn bytes_reach_the_client_before_the_origin_has_sent_them_all() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(Notify::new());
    origin.route(
        "/slow.jpg",
        Reply::pattern(1_000_000).fault(Fault::GateAfter(100_000, gate.clone())),
    );
    let proxy = TestProxy::for_origin(&origin, "[upstream]\nidle_timeout = \"30s\"").await;

    let mut r = proxy.stream_image(&origin.url("/slow.jpg")).await;
    assert_eq!(header(&r, "content-length"), "1000000");
    // The origin holds back everything after the first 100 000 bytes until we have read some.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("the first bytes must arrive while the origin still holds the rest")
        .unwrap()
        .unwrap();
    assert!(!first.is_empty());
    gate.notify_one();
    let mut body = first.to_vec();
    while let Some(chunk) = r.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body, pattern(1_000_000));
}

#[tokio::test]
async fn http2_clients_are_served() {
    let origin = TestOrigin::start().await;
    origin.route("/h2.jpg", Reply::ok(JPEG));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for expected in [
        "imgedge; fwd=uri-miss; stored",
        "imgedge; hit; detail=memory",
    ] {
        let r = h2
            .get(proxy.image_url(&origin.url("/h2.jpg")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(cache_status(&r), expected);
        assert_eq!(r.bytes().await.unwrap(), JPEG);
    }
}

// ---------------------------------------------------------------- failures after the head

/// A fault after the head aborts the client's response (never a clean, short end) and nothing
/// is stored: the next request goes to the origin again.
async fn assert_aborted_and_not_stored(reply: Reply, extra: &str) {
    let origin = TestOrigin::start().await;
    origin.route("/f.jpg", reply);
    let proxy = TestProxy::for_origin(&origin, extra).await;
    for attempt in 1..=2 {
        let r = proxy.stream_image(&origin.url("/f.jpg")).await;
        assert_eq!(r.status(), 200, "the head was already sent");
        assert_ne!(cache_status(&r), "imgedge; hit; detail=memory");
        let body = tokio::time::timeout(Duration::from_secs(10), r.bytes())
            .await
            .expect("the aborted response must end promptly");
        assert!(
            body.is_err(),
            "attempt {attempt}: an incomplete body ended cleanly"
        );
        assert_eq!(origin.hits("/f.jpg"), attempt, "nothing stored");
    }
}

#[tokio::test]
async fn a_reset_mid_body_aborts_the_client_and_is_not_stored() {
    assert_aborted_and_not_stored(Reply::pattern(100_000).fault(Fault::ResetAfter(40_000)), "")
        .await;
    assert_aborted_and_not_stored(
        Reply::pattern(100_000)
            .chunked()
            .fault(Fault::ResetAfter(40_000)),
        "",
    )
    .await;
}

#[tokio::test]
async fn a_short_body_aborts_the_client_and_is_not_stored() {
    assert_aborted_and_not_stored(Reply::pattern(100_000).fault(Fault::CloseAfter(40_000)), "")
        .await;
}

#[tokio::test]
async fn a_stall_past_idle_timeout_aborts_the_client_and_is_not_stored() {
    assert_aborted_and_not_stored(
        Reply::pattern(100_000).fault(Fault::SilenceAfter(40_000)),
        "[upstream]\nidle_timeout = \"300ms\"",
    )
    .await;
    // Head then silence: on /image-proxy the first bytes are read before the head is sent (to
    // check the image), so the client gets a clean 504 (a stall, not "not an image") instead of
    // an aborted 200; nothing stored.
    let origin = TestOrigin::start().await;
    origin.route(
        "/f.jpg",
        Reply::pattern(100_000).fault(Fault::SilenceAfter(0)),
    );
    let proxy = TestProxy::for_origin(&origin, "[upstream]\nidle_timeout = \"300ms\"").await;
    for attempt in 1..=2 {
        let r = proxy.get_image(&origin.url("/f.jpg")).await;
        assert_eq!(r.status, 504, "attempt {attempt}");
        assert_eq!(r.error_code(), "upstream_timeout");
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        assert_eq!(
            r.cache_status(),
            "imgedge; fwd=uri-miss; detail=upstream_timeout"
        );
        assert_eq!(origin.hits("/f.jpg"), attempt, "nothing stored");
    }
}

#[tokio::test]
async fn an_endless_body_is_cut_at_max_object_bytes() {
    let mut reply = Reply::ok(Bytes::new());
    reply.body = BodySpec::Endless;
    assert_aborted_and_not_stored(
        reply,
        "[upstream]\nmax_object_bytes = 1000000\n[cache]\nmax_cacheable_bytes = 500000\nmemory_capacity_bytes = 1000000",
    )
    .await;
}

// ---------------------------------------------------------------- errors before the head

#[tokio::test]
async fn bad_urls_get_400_bad_url() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "[server]\nmax_url_bytes = 100").await;
    let long = format!("http://{}/{}", origin.addr, "a".repeat(100));
    for query in [
        "",
        "?url=",
        "?other=1",
        "?url=%2Fa.jpg",
        "?url=/a.jpg",
        "?url=ftp://example.com/a.jpg",
        "?url=javascript:alert(1)",
        "?url=http://user:pw@example.com/a.jpg",
        "?url=http%3A%2F%2Fuser%40example.com%2Fa.jpg",
        "?url=%E0%A4%A",
        "?url=%FF",
        &format!("?url={long}"),
    ] {
        let r = proxy.get(&format!("/image-proxy{query}")).await;
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.header("cache-control"), "no-store");
        assert_eq!(r.error_code(), "bad_url", "{query}");
    }
}

#[tokio::test]
async fn hosts_outside_allowed_hosts_get_403_host_not_allowed() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "").await;
    let other_port = format!(
        "http://127.0.0.1:{}/a.jpg",
        origin.addr.port().wrapping_add(1)
    );
    for target in [
        "http://example.com/a.jpg",
        other_port.as_str(),
        "http://127.0.0.2/a.jpg",
    ] {
        let r = proxy.get_image(target).await;
        assert_eq!(r.status, 403, "{target}");
        assert_eq!(r.error_code(), "host_not_allowed", "{target}");
    }
}

#[tokio::test]
async fn private_addresses_get_403_private_address() {
    let origin = TestOrigin::start().await;
    origin.route("/a.jpg", Reply::ok(JPEG));
    // No allowed_hosts: any host, but only global addresses.
    let proxy = TestProxy::start(
        imgedge::Config::from_toml("[upstream]\nconnect_timeout = \"1s\"\n[log]\naccess = false")
            .unwrap(),
    )
    .await;
    let port = origin.addr.port();
    for target in [
        format!("http://127.0.0.1:{port}/a.jpg"),
        format!("http://localhost:{port}/a.jpg"), // a name: refused by the resolver
        format!("http://[::1]:{port}/a.jpg"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/a.jpg".to_owned(),
        "http://0x7f000001/a.jpg".to_owned(),
    ] {
        let r = proxy.get_image(&target).await;
        assert_eq!(r.status, 403, "{target}");
        assert_eq!(r.error_code(), "private_address", "{target}");
    }
    assert_eq!(origin.hits("/a.jpg"), 0);

    // Being allowed is not being trusted with a private address; allow_private_networks (or
    // trusted_private_hosts) is. A port other than 80 and 443 must be named by an entry.
    let allowed_only = TestProxy::start(
        imgedge::Config::from_toml(&format!(
            "[upstream]\nallowed_hosts = [\"127.0.0.1:{port}\"]\n[log]\naccess = false"
        ))
        .unwrap(),
    )
    .await;
    let r = allowed_only.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "private_address");
    let open = TestProxy::start(
        imgedge::Config::from_toml(&format!(
            "[upstream]\nallow_private_networks = true\nallowed_hosts = [\"127.0.0.1:{port}\"]\n[log]\naccess = false"
        ))
        .unwrap(),
    )
    .await;
    let r = open.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, JPEG);
}

#[tokio::test]
async fn redirects_are_followed_and_every_hop_is_checked() {
    let origin = TestOrigin::start().await;
    origin.route("/final.jpg", Reply::ok(JPEG));
    origin.route(
        "/hop",
        Reply::ok(Bytes::new())
            .status(302)
            .header("Location", "/final.jpg"),
    );
    origin.route(
        "/away",
        Reply::ok(Bytes::new())
            .status(302)
            .header("Location", "http://127.0.0.2:9/x.jpg"),
    );
    origin.route(
        "/meta",
        Reply::ok(Bytes::new())
            .status(301)
            .header("Location", "http://169.254.169.254/"),
    );
    origin.route(
        "/loop",
        Reply::ok(Bytes::new())
            .status(302)
            .header("Location", "/loop"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;

    let r = proxy.get_image(&origin.url("/hop")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, JPEG);
    for path in ["/away", "/meta"] {
        let r = proxy.get_image(&origin.url(path)).await;
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.error_code(), "host_not_allowed", "{path}");
    }
    let r = proxy.get_image(&origin.url("/loop")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_error");
    assert_eq!(
        origin.hits("/loop"),
        4,
        "the first request and max_redirects (3) hops"
    );
}

#[tokio::test]
async fn an_announced_length_over_max_object_bytes_is_502_too_large_without_reading_the_body() {
    let origin = TestOrigin::start().await;
    // The origin would never send the body: answering at all proves it was not read.
    let gate = Arc::new(Notify::new());
    origin.route(
        "/huge.jpg",
        Reply::pattern(2_000_000).fault(Fault::GateAfter(0, gate)),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[upstream]\nmax_object_bytes = 1000000\nidle_timeout = \"60s\"\n[cache]\nmax_cacheable_bytes = 1000",
    )
    .await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        proxy.stream_image(&origin.url("/huge.jpg")),
    )
    .await
    .expect("answered without waiting for the body");
    let r = Got::read(r).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "too_large");
}

#[tokio::test]
async fn origin_failures_before_the_head_get_502_upstream_error() {
    let origin = TestOrigin::start().await;
    origin.route("/reset", Reply::ok(JPEG).fault(Fault::ResetBeforeHead));
    origin.route("/garbage", Reply::ok(JPEG).fault(Fault::Garbage));
    let proxy = TestProxy::for_origin(&origin, "").await;
    for path in ["/reset", "/garbage"] {
        let r = proxy.get_image(&origin.url(path)).await;
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(r.error_code(), "upstream_error", "{path}");
    }
    // Connection refused: a port nothing listens on (bound, then closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = TestProxy::start(
        imgedge::Config::from_toml(&format!(
            "[upstream]\nallowed_hosts = [\"{closed}\"]\ntrusted_private_hosts = [\"{closed}\"]\n[log]\naccess = false"
        ))
        .unwrap(),
    )
    .await;
    let r = refused.get_image(&format!("http://{closed}/a.jpg")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_error");
}

#[tokio::test]
async fn a_slow_response_head_gets_504_upstream_timeout() {
    let origin = TestOrigin::start().await;
    origin.route("/slow", Reply::ok(JPEG).head_delay(Duration::from_secs(3)));
    let proxy = TestProxy::for_origin(&origin, "[upstream]\nheader_timeout = \"300ms\"").await;
    let r = proxy.get_image(&origin.url("/slow")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), "upstream_timeout");
}

#[tokio::test]
async fn a_connect_timeout_gets_504_upstream_timeout() {
    // A listener whose accept queue is full drops further SYNs: the connect never completes.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), s.connect(addr)).await {
            fillers.push(c);
        }
    }
    let proxy = TestProxy::start(
        imgedge::Config::from_toml(&format!(
            "[upstream]\nallowed_hosts = [\"{addr}\"]\ntrusted_private_hosts = [\"{addr}\"]\nconnect_timeout = \"300ms\"\nheader_timeout = \"5s\"\n[log]\naccess = false"
        ))
        .unwrap(),
    )
    .await;
    let r = proxy.get_image(&format!("http://{addr}/a.jpg")).await;
    assert_eq!(r.status, 504);
    let v = r.json();
    assert_eq!(v["error"], "upstream_timeout");
    assert!(v["message"].as_str().unwrap().contains("connection"), "{v}");
    drop(listener);
}

#[tokio::test]
async fn origin_errors_keep_their_status_and_only_404_and_410_are_stored() {
    let origin = TestOrigin::start().await;
    let reply = |status: u16, body: &'static str| Reply::ok(body).status(status);
    for path in ["/missing.jpg", "/storage/v1/object/public/b/missing.jpg"] {
        origin.route(path, reply(404, "<html>origin says no</html>"));
    }
    origin.route("/gone.jpg", reply(410, "gone for good"));
    origin.route("/broken.jpg", reply(500, "origin broke"));
    origin.route("/busy.jpg", reply(503, "try later"));
    let proxy = TestProxy::for_origin(&origin, "").await;
    // On /image-proxy the status passes, but the body is imgedge's own JSON: an origin's error
    // page is not served from imgedge's origin. Negative caching (RFC 9111 §4.2.2, [cache]
    // negative_ttl): 404 and 410 are stored.
    for (path, status) in [("/missing.jpg", 404), ("/gone.jpg", 410)] {
        for expected in [
            "imgedge; fwd=uri-miss; stored",
            "imgedge; hit; detail=memory",
        ] {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!(r.status, status);
            assert_eq!(r.cache_status(), expected);
            assert_eq!(r.error_code(), "origin_status");
            assert!(!r.text().contains("says no") && !r.text().contains("gone for good"));
        }
        assert_eq!(origin.hits(path), 1);
    }
    // Statuses that are not heuristically cacheable, without explicit freshness, are not.
    for (path, status) in [("/broken.jpg", 500), ("/busy.jpg", 503)] {
        for _ in 0..2 {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!(r.status, status);
            assert_eq!(
                r.cache_status(),
                "imgedge; fwd=uri-miss; detail=uncacheable-status"
            );
            assert_eq!(r.error_code(), "origin_status");
        }
        assert_eq!(origin.hits(path), 2);
    }
    // A route (an origin the operator configured) passes the origin's own body.
    let path = "/storage/v1/object/public/b/missing.jpg";
    let r = proxy.get(path).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (404, "<html>origin says no</html>")
    );
}

#[tokio::test]
async fn other_methods_and_routes_get_405_and_404() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "").await;
    let r = proxy
        .send(Method::POST, &image_path(&origin.url("/a.jpg")), &[])
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, HEAD");
    assert_eq!(r.error_code(), "method_not_allowed");
    let r = proxy.get("/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "not_found");
}

// ---------------------------------------------------------------- health and metrics

#[tokio::test]
async fn health_and_metrics_report_the_tier() {
    let origin = TestOrigin::start().await;
    origin.route("/m.jpg", Reply::ok(JPEG));
    let proxy = TestProxy::for_origin(&origin, "").await;
    proxy.get_image(&origin.url("/m.jpg")).await;
    proxy.get_image(&origin.url("/m.jpg")).await;

    let r = proxy.get("/health").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["status"], "ok");
    assert!(
        v["memory"]["rss_bytes"].as_u64().unwrap() > 1_000_000,
        "{v}"
    );
    assert_eq!(v["cache"]["memory"]["entries"], 1);
    assert!(v["cache"]["memory"]["bytes"].as_u64().unwrap() >= JPEG.len() as u64);

    let r = proxy.get("/metrics").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    for line in [
        "imgedge_requests_total{route=\"image-proxy\",status=\"200\"} 2",
        "imgedge_cache_requests_total{tier=\"memory\",result=\"hit\"} 1",
        "imgedge_cache_requests_total{tier=\"memory\",result=\"miss\"} 1",
        "imgedge_upstream_requests_total{outcome=\"ok\"} 1",
        "imgedge_cache_entries{tier=\"memory\"} 1",
        "imgedge_upstream_duration_seconds_count 1",
        "imgedge_memory_rss_bytes ",
        "imgedge_request_duration_seconds_count{route=\"image-proxy\"} 2",
        "imgedge_fill_capacity_bytes ",
        "imgedge_transform_turns ",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // the bytes of the miss came from the origin, those of the hit from memory
    for source in ["origin", "memory"] {
        let line = format!(
            "imgedge_response_bytes_total{{source=\"{source}\"}} {}",
            JPEG.len()
        );
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
}
