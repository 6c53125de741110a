//! Hardening, second round, through real sockets: what crosses to an origin is an allow-list,
//! the host an origin is told is one that can be trusted, paths that could climb out of a route
//! are refused, nothing a route serves can run script on imgedge's origin, `/health` shows no
//! URLs to strangers, and upstream work is bounded (503 `busy`, never `EMFILE`).

use std::time::Duration;

use crate::support::{Fault, Reply, TestOrigin, TestProxy};
use reqwest::Method;

async fn route_proxy_with(origin: &TestOrigin, extra: &str, route: &str) -> TestProxy {
    let config = format!(
        "{extra}[[routes]]\nprefix = \"/\"\nupstream = \"http://{}\"\n{route}",
        origin.addr
    );
    TestProxy::for_origin(origin, &config).await
}

fn header<'a>(seen: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Method overrides and host overrides are what the issue found reaching origins; none does now,
/// nor anything else imgedge does not know, unless the route lists it.
#[tokio::test]
async fn only_allow_listed_request_headers_reach_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route("/a", Reply::ok("a").header("Cache-Control", "max-age=60"));
    origin.route("/b", Reply::ok("b"));
    let proxy = route_proxy_with(
        &origin,
        "",
        "forward_request_headers = [\"X-Tenant\", \"x-acme-*\"]\n",
    )
    .await;
    let hostile = [
        ("X-HTTP-Method", "DELETE"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Host", "evil.example"),
        ("X-Original-Host", "evil.example"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Real-IP", "1.2.3.4"),
        ("X-Forwarded-Server", "evil.example"),
        ("X-Custom", "who knows"),
    ];
    let mut headers = hostile.to_vec();
    headers.extend([
        ("Accept", "image/avif,image/webp"),
        ("Accept-Language", "de"),
        ("If-None-Match", "\"v1\""),
        ("User-Agent", "test-agent"),
        ("Tracestate", "vendor=1"),
        ("X-B3-TraceId", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("X-Tenant", "t1"),
        ("X-Acme-Region", "eu"),
    ]);
    for path in ["/a", "/b"] {
        let r = proxy.send(Method::GET, path, &headers).await;
        assert_eq!(r.status, 200, "{path}");
        let seen = origin.last_request(path);
        for (name, _) in hostile {
            let name = name.to_ascii_lowercase();
            assert!(
                header(&seen, &name).is_empty(),
                "{name} reached the origin: {seen:?}"
            );
        }
        for (name, value) in [
            ("accept", "image/avif,image/webp"),
            ("accept-language", "de"),
            ("if-none-match", "\"v1\""),
            ("user-agent", "test-agent"),
            ("tracestate", "vendor=1"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-tenant", "t1"),
            ("x-acme-region", "eu"),
        ] {
            assert_eq!(header(&seen, name), [value], "{name}: {seen:?}");
        }
    }
    // An upload: its content headers pass, its length is the framing's.
    let r = proxy
        .send_body(
            Method::PUT,
            "/b",
            &[("Content-Type", "image/png"), ("X-HTTP-Method", "DELETE")],
            vec![7u8; 1000],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = origin.last_request("/b");
    assert_eq!(header(&seen, "content-type"), ["image/png"], "{seen:?}");
    assert_eq!(header(&seen, "content-length"), ["1000"], "{seen:?}");
    assert!(header(&seen, "x-http-method").is_empty(), "{seen:?}");
}

/// `/image-proxy` sends none of the client's headers.
#[tokio::test]
async fn image_proxy_forwards_no_client_header() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/i.png",
        Reply::ok(&b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR the rest of a png"[..])
            .content_type(Some("image/png")),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let r = proxy
        .send(
            Method::GET,
            &crate::support::image_path(&origin.url("/i.png")),
            &[
                ("Authorization", "Bearer secret"),
                ("Cookie", "s=1"),
                ("X-HTTP-Method-Override", "DELETE"),
                ("Accept", "text/html"),
                ("Referer", "https://a.example/"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = origin.last_request("/i.png");
    let names: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    for name in &names {
        assert!(
            matches!(*name, "host" | "user-agent" | "accept-encoding"),
            "{name} sent to the origin: {seen:?}"
        );
    }
    assert_eq!(header(&seen, "accept-encoding"), ["identity"]);
    assert_eq!(header(&seen, "user-agent"), ["imgedge/0.1"]);
}

/// The origin is told the host the client asked for only when it can be trusted: listed in
/// `server.public_hosts`, named by a trusted proxy, or on a request whose answer is nobody
/// else's (an upload). A client's own forwarding headers never pass.
#[tokio::test]
async fn the_forwarded_host_is_one_that_can_be_trusted() {
    let origin = TestOrigin::start().await;
    origin.route("/w", Reply::ok("w").header("Cache-Control", "max-age=60"));
    let spoof = [
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "8443"),
        ("Forwarded", "host=evil.example;proto=https"),
    ];

    // No public_hosts: a cacheable GET carries no host, an upload carries the client's.
    let plain = route_proxy_with(&origin, "", "").await;
    let with_host = |host: &'static str| {
        let mut h = spoof.to_vec();
        h.push(("Host", host));
        h
    };
    plain
        .send(Method::GET, "/w?1", &with_host("img.example:8080"))
        .await;
    let seen = origin.last_request("/w?1");
    assert!(header(&seen, "x-forwarded-host").is_empty(), "{seen:?}");
    assert!(header(&seen, "x-forwarded-port").is_empty(), "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), ["http"], "{seen:?}");
    assert_eq!(header(&seen, "forwarded"), ["for=127.0.0.1;proto=http"]);
    plain
        .send_body(Method::POST, "/w?2", &with_host("img.example:8080"), "up")
        .await;
    let seen = origin.last_request("/w?2");
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        ["img.example:8080"],
        "{seen:?}"
    );
    assert_eq!(header(&seen, "x-forwarded-port"), ["8080"], "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), ["http"], "{seen:?}");
    assert_eq!(
        header(&seen, "forwarded"),
        ["for=127.0.0.1;host=\"img.example:8080\";proto=http"]
    );
    // The upstream's own Host unless the route preserves the client's.
    assert_eq!(header(&seen, "host"), [origin.addr.to_string().as_str()]);

    // public_hosts: a listed host passes on every request, another none.
    let listed = route_proxy_with(
        &origin,
        "[server]\npublic_hosts = [\"img.example:8080\", \"*.cdn.example\"]\n",
        "preserve_host = true\n",
    )
    .await;
    listed
        .send(Method::GET, "/w?3", &with_host("img.example:8080"))
        .await;
    let seen = origin.last_request("/w?3");
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        ["img.example:8080"],
        "{seen:?}"
    );
    assert_eq!(
        header(&seen, "host"),
        ["img.example:8080"],
        "preserve_host: {seen:?}"
    );
    listed
        .send(Method::GET, "/w?4", &with_host("a.cdn.example"))
        .await;
    let seen = origin.last_request("/w?4");
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        ["a.cdn.example"],
        "{seen:?}"
    );
    assert_eq!(header(&seen, "x-forwarded-port"), ["80"], "{seen:?}");
    listed
        .send(Method::GET, "/w?5", &with_host("evil.example"))
        .await;
    let seen = origin.last_request("/w?5");
    assert!(header(&seen, "x-forwarded-host").is_empty(), "{seen:?}");
    assert_eq!(
        header(&seen, "host"),
        [origin.addr.to_string().as_str()],
        "an unlisted host is not preserved"
    );

    // Behind a trusted proxy (loopback here) its word on scheme, host and port is taken.
    let behind = route_proxy_with(
        &origin,
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        "",
    )
    .await;
    behind
        .send(
            Method::GET,
            "/w?6",
            &[
                ("X-Forwarded-For", "198.51.100.7"),
                ("X-Forwarded-Host", "img.example"),
                ("X-Forwarded-Proto", "https"),
            ],
        )
        .await;
    let seen = origin.last_request("/w?6");
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        ["img.example"],
        "{seen:?}"
    );
    assert_eq!(header(&seen, "x-forwarded-proto"), ["https"], "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-port"), ["443"], "{seen:?}");
    assert_eq!(
        header(&seen, "forwarded"),
        ["for=198.51.100.7;host=\"img.example\";proto=https"]
    );
}

/// Encoded separators, dot segments with parameters and doubly encoded dots are refused before
/// anything is sent; ordinary encodings pass as they are.
#[tokio::test]
async fn paths_that_could_climb_out_of_a_route_are_refused() {
    let origin = TestOrigin::start().await;
    origin.route("/files/a%20b.png", Reply::ok("ok"));
    let proxy = TestProxy::for_origin(
        &origin,
        &format!(
            "[[routes]]\nprefix = \"/files/\"\nupstream = \"http://{}\"\n",
            origin.addr
        ),
    )
    .await;
    for path in [
        "/files/..%2Fsecret",
        "/files/..%2fsecret",
        "/files/..%5Csecret",
        "/files/..%5csecret",
        "/files/..;/secret",
        "/files/.;x/secret",
        "/files/%2e%2e;jsessionid=1/secret",
        "/files/%252e%252e/secret",
        "/files/a%252Fb",
        "/files/a%00b",
        "/files/a%0d%0ab",
        "/files/%2e%2e/secret",
        "/files/../secret",
        "/storage/v1/object/public/b/..%2F..%2Fadmin",
    ] {
        // raw: an HTTP client library would resolve the dot segments itself
        let (status, response) = crate::support::raw_exchange(proxy.addr, "GET", path, "").await;
        assert_eq!(status, 400, "{path}: {response}");
        let lower = response.to_ascii_lowercase();
        assert!(lower.contains("\"bad_path\""), "{path}: {response}");
        assert!(lower.contains("x-content-type-options: nosniff"), "{path}");
        assert!(
            lower.contains("cache-status: imgedge; detail=bad_path"),
            "{path}"
        );
    }
    assert_eq!(origin.total_hits(), 0, "nothing was sent");
    let r = proxy.get("/files/a%20b.png").await;
    assert_eq!(r.status, 200);
    assert_eq!(origin.hits("/files/a%20b.png"), 1);
}

/// A bucket's HTML, SVG or unlabelled bytes cannot run script on imgedge's origin; passive
/// types keep the origin's headers; a route may pass the origin's own policy.
#[tokio::test]
async fn route_responses_that_can_run_script_are_sandboxed() {
    let origin = TestOrigin::start().await;
    let sandbox = "default-src 'none'; style-src 'unsafe-inline'; sandbox";
    let own = "default-src 'self'";
    for (path, content_type) in [
        (
            "/storage/v1/object/public/b/x.html",
            Some("text/html; charset=utf-8"),
        ),
        (
            "/storage/v1/object/public/b/x.xhtml",
            Some("application/xhtml+xml"),
        ),
        ("/storage/v1/object/public/b/x.svg", Some("image/svg+xml")),
        ("/storage/v1/object/public/b/x.xml", Some("text/xml")),
        ("/storage/v1/object/public/b/x.bin", None),
        (
            "/storage/v1/object/public/b/x.weird",
            Some("application/x-weird"),
        ),
        ("/storage/v1/object/public/b/x.png", Some("image/png")),
        (
            "/storage/v1/object/public/b/x.json",
            Some("application/json"),
        ),
        ("/storage/v1/object/public/b/x.txt", Some("text/plain")),
        ("/storage/v1/object/public/b/x.mp4", Some("video/mp4")),
        ("/storage/v1/object/public/b/x.pdf", Some("application/pdf")),
    ] {
        origin.route(
            path,
            Reply::ok("<script>alert(1)</script>")
                .content_type(content_type)
                .header("Cache-Control", "max-age=60")
                .header("Content-Security-Policy", own),
        );
    }
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (path, scripted) in [
        ("/storage/v1/object/public/b/x.html", true),
        ("/storage/v1/object/public/b/x.xhtml", true),
        ("/storage/v1/object/public/b/x.svg", true),
        ("/storage/v1/object/public/b/x.xml", true),
        ("/storage/v1/object/public/b/x.bin", true),
        ("/storage/v1/object/public/b/x.weird", true),
        ("/storage/v1/object/public/b/x.png", false),
        ("/storage/v1/object/public/b/x.json", false),
        ("/storage/v1/object/public/b/x.txt", false),
        ("/storage/v1/object/public/b/x.mp4", false),
        ("/storage/v1/object/public/b/x.pdf", false),
    ] {
        // a miss and a hit alike
        for _ in 0..2 {
            let r = proxy.get(path).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
            let csp = r.header("content-security-policy");
            assert_eq!(csp, if scripted { sandbox } else { own }, "{path}");
        }
    }
    // A route that serves pages deliberately passes the origin's own policy.
    origin.route(
        "/site/index.html",
        Reply::ok("<p>hi</p>")
            .content_type(Some("text/html"))
            .header("Content-Security-Policy", own),
    );
    origin.route(
        "/site/bare.html",
        Reply::ok("<p>hi</p>").content_type(Some("text/html")),
    );
    let pages = TestProxy::for_origin(
        &origin,
        &format!(
            "[[routes]]\nprefix = \"/site/\"\nupstream = \"http://{}\"\ncontent_security_policy = \"origin\"\n",
            origin.addr
        ),
    )
    .await;
    assert_eq!(
        pages
            .get("/site/index.html")
            .await
            .header("content-security-policy"),
        own
    );
    let bare = pages.get("/site/bare.html").await;
    assert!(bare.headers.get("content-security-policy").is_none());
    assert_eq!(bare.header("x-content-type-options"), "nosniff");
}

/// Every error imgedge answers carries nosniff, a policy under which nothing runs, and a
/// `Cache-Status`, on every route.
#[tokio::test]
async fn every_error_is_sandboxed_unsniffed_and_says_what_the_cache_did() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/storage/v1/object/public/b/page.html",
        Reply::ok("<b>x</b>").content_type(Some("text/html")),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (path, status, code) in [
        (
            "/image-proxy?url=file%3A%2F%2F%2Fetc%2Fpasswd",
            400,
            "bad_url",
        ),
        (
            "/image-proxy?url=http%3A%2F%2F127.0.0.1%3A1%2Fx.png",
            403,
            "host_not_allowed",
        ),
        (
            "/storage/v1/render/image/public/b/a.png?width=x",
            400,
            "bad_parameter",
        ),
        (
            "/storage/v1/render/image/public/b/page.html?width=10",
            0,
            "",
        ),
        ("/nowhere", 404, "not_found"),
    ] {
        let r = proxy.get(path).await;
        if status != 0 {
            assert_eq!(r.status, status, "{path}");
            assert_eq!(r.error_code(), code, "{path}");
            assert_eq!(
                r.cache_status(),
                format!("imgedge; detail={code}"),
                "{path}"
            );
        } else {
            assert!(r.status >= 400, "{path}: {}", r.status);
            assert!(r.cache_status().starts_with("imgedge"), "{path}");
        }
        assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
        let csp = r.header("content-security-policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("sandbox"),
            "{path}: {csp}"
        );
    }
}

/// Without the admin token `/health` counts the fetches in flight but names none of them.
#[tokio::test]
async fn health_shows_strangers_counts_not_urls() {
    let origin = TestOrigin::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    origin.route(
        "/slow/secret-path.jpg?sig=abc",
        Reply::pattern(100_000).fault(Fault::GateAfter(100, gate.clone())),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[upstream]\nidle_timeout = \"5s\"\n[admin]\ntoken = \"t0k-0123456789abcdef\"\n",
    )
    .await;
    let target = origin.url("/slow/secret-path.jpg?sig=abc");
    let slow = {
        let url = proxy.image_url(&target);
        let client = proxy.client.clone();
        tokio::spawn(async move { client.get(url).send().await?.bytes().await })
    };
    let mut health = serde_json::Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        health = proxy.get("/health").await.json();
        if health["inflight"]["count"] == 1 {
            break;
        }
    }
    assert_eq!(health["inflight"]["count"], 1, "{health}");
    let text = health.to_string();
    for leak in ["secret-path", "127.0.0.1", &origin.addr.port().to_string()] {
        assert!(!text.contains(leak), "{leak} in {text}");
    }
    assert!(health["upstream"]["max_in_flight"].as_u64().unwrap() >= 1);
    assert!(health["fds"]["limit"].as_u64().unwrap() >= 64);
    let admin = proxy
        .send(
            Method::GET,
            "/health",
            &[("Authorization", "Bearer t0k-0123456789abcdef")],
        )
        .await
        .json();
    assert_eq!(
        admin["inflight"]["oldest"][0]["url"],
        target.as_str(),
        "{admin}"
    );
    gate.notify_waiters();
    assert_eq!(slow.await.unwrap().unwrap().len(), 100_000);
}

/// Past `[upstream] max_in_flight` a request is answered 503 `busy` at once, nothing sent; the
/// bound is in `/health` and `/metrics`, and refusals are counted as shed.
#[tokio::test]
async fn upstream_requests_past_max_in_flight_are_busy_and_nothing_is_sent() {
    let origin = TestOrigin::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    for i in 0..3 {
        origin.route(
            &format!("/up/{i}"),
            Reply::pattern(100_000).fault(Fault::GateAfter(10, gate.clone())),
        );
    }
    origin.route("/up/3", Reply::pattern(100_000));
    let proxy = route_proxy_with(&origin, "[upstream]\nmax_in_flight = 2\n", "").await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let url = proxy.url(&format!("/up/{i}"));
            let client = proxy.client.clone();
            tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                r.bytes().await.map(|b| b.len())
            })
        })
        .collect();
    // wait until both are in flight
    for _ in 0..100 {
        if proxy.get("/health").await.json()["upstream"]["in_flight"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = proxy.get("/health").await.json();
    assert_eq!(health["upstream"]["in_flight"], 2, "{health}");
    assert_eq!(health["upstream"]["max_in_flight"], 2, "{health}");
    assert_eq!(health["upstream"]["max_sockets"], 4, "{health}");
    for method in [Method::GET, Method::PUT] {
        let r = proxy.send(method.clone(), "/up/2", &[]).await;
        assert_eq!(r.status, 503, "{method}");
        assert_eq!(r.error_code(), "busy");
        assert_eq!(r.header("retry-after"), "1");
    }
    assert_eq!(origin.hits("/up/2"), 0, "nothing was sent");
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("imgedge_shed_total{reason=\"busy\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imgedge_upstream_max_in_flight 2"),
        "{metrics}"
    );
    assert!(metrics.contains("imgedge_max_fds "), "{metrics}");
    gate.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), 100_000);
    }
    // and once they are done, there is room again
    let r = proxy.get("/up/3").await;
    assert_eq!(r.status, 200);
}

/// HTTP/2 clients get at most `[server] max_concurrent_streams` streams at once on a connection:
/// the rest wait in the client, and never reach the origin while the first ones are open.
#[tokio::test]
async fn http2_streams_per_connection_are_bounded() {
    let origin = TestOrigin::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    for i in 0..6 {
        origin.route(
            &format!("/s/{i}"),
            Reply::pattern(20_000).fault(Fault::GateAfter(10, gate.clone())),
        );
    }
    let proxy = route_proxy_with(&origin, "[server]\nmax_concurrent_streams = 2\n", "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let (client, url) = (h2.clone(), proxy.url(&format!("/s/{i}")));
            tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                (r.version(), r.bytes().await.unwrap().len())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(origin.total_hits(), 2, "only two streams open at once");
    // let the open ones finish, then the next two, ...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while requests.iter().any(|r| !r.is_finished()) {
        assert!(std::time::Instant::now() < deadline, "requests stuck");
        gate.notify_waiters();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), (reqwest::Version::HTTP_2, 20_000));
    }
    assert_eq!(origin.total_hits(), 6);
}

/// Under a low descriptor limit, a flood of client connections and of upstream requests is
/// refused cleanly (connections closed at once, 503 `busy`) and the process never runs out of
/// descriptors: `/health` answers throughout and nothing logs `EMFILE`.
#[tokio::test]
async fn a_low_descriptor_limit_is_never_exceeded() {
    use crate::support::binary::{Binary, health, origin_env};
    let origin = TestOrigin::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    for i in 0..200 {
        origin.route(
            &format!("/storage/v1/slow?{i}"),
            Reply::pattern(50_000).fault(Fault::GateAfter(10, gate.clone())),
        );
    }
    let mut env = origin_env(&origin);
    env.push((
        "IMGEDGE_SUPABASE__UPSTREAM",
        format!("http://{}", origin.addr),
    ));
    env.push(("IMGEDGE_UPSTREAM__IDLE_TIMEOUT", "20s".to_owned()));
    env.push(("IMGEDGE_LOG__LEVEL", "warn".to_owned()));
    let binary = Binary::start_with_fd_limit(&env, 300).await;
    let before = health(&binary.base).await;
    assert_eq!(before["fds"]["limit"], 300, "{before}");
    let max_connections = before["connections"]["max"].as_u64().unwrap();
    let max_in_flight = before["upstream"]["max_in_flight"].as_u64().unwrap();
    let max_sockets = before["upstream"]["max_sockets"].as_u64().unwrap();
    assert!(max_connections + max_sockets + 128 <= 300, "{before}");

    // Twice as many upstream requests as allowed, each on a connection of its own.
    assert!(2 * max_in_flight <= 200, "{before}");
    let fetches: Vec<_> = (0..2 * max_in_flight)
        .map(|i| {
            let url = format!("{}/storage/v1/slow?{i}", binary.base);
            tokio::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                match client.get(url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    // And more idle client connections than allowed.
    let mut idle = Vec::new();
    for _ in 0..2 * max_connections {
        if let Ok(s) =
            tokio::net::TcpStream::connect(binary.base.trim_start_matches("http://")).await
        {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = health(&binary.base).await;
    assert!(during["fds"]["open"].as_u64().unwrap() <= 300, "{during}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fetches.iter().any(|f| !f.is_finished()) {
        assert!(std::time::Instant::now() < deadline, "fetches stuck");
        gate.notify_waiters();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut statuses = Vec::new();
    for f in fetches {
        statuses.push(f.await.unwrap());
    }
    // each fetch: 200, 503 busy, or (past max_connections) a connection closed at once
    let count = |status: u16| statuses.iter().filter(|&&s| s == status).count() as u64;
    let (ok, busy, closed) = (count(200), count(503), count(0));
    assert!(ok >= 1 && ok <= max_in_flight, "{statuses:?}");
    assert_eq!(ok + busy + closed, 2 * max_in_flight, "{statuses:?}");
    assert!(busy + closed >= max_in_flight, "{statuses:?}");
    let log = binary.stop().await;
    for bad in ["Too many open files", "EMFILE", "os error 24"] {
        assert!(!log.contains(bad), "{bad} in the log:\n{log}");
    }
}
