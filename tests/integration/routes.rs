//! `[[routes]]` reverse proxying through real sockets: every method forwarded with its body,
//! headers passed both ways, only GET and HEAD cached, RFC 9111 storage rules for forwarded
//! requests, invalidation, and the Supabase route's handling of credentials.

use crate::support::*;

/// A proxy with `[[routes]] prefix = "/"` in front of `origin` (and the Supabase route, from
/// the test config, at /storage/v1/), with `extra` TOML before the route.
async fn route_proxy_with(origin: &TestOrigin, extra: &str) -> TestProxy {
    let config = format!(
        "{extra}[[routes]]\nprefix = \"/\"\nupstream = \"http://{}\"\n",
        origin.addr
    );
    TestProxy::for_origin(origin, &config).await
}

async fn route_proxy(origin: &TestOrigin) -> TestProxy {
    route_proxy_with(origin, "").await
}

#[tokio::test]
async fn every_method_is_forwarded_with_its_body_and_only_get_is_stored() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/api/items?x=1",
        Reply::ok("{\"ok\":true}")
            .header("Content-Type", "application/json")
            .header("Cache-Control", "max-age=60"),
    );
    let proxy = route_proxy(&origin).await;
    let path = "/api/items?x=1";

    let r = proxy
        .send_body(Method::POST, path, &[], "a request body")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.cache_status(), "imgedge; fwd=method");
    assert_eq!(r.text(), "{\"ok\":true}");
    assert_eq!(
        origin.last_body("/api/items?x=1"),
        ("POST".into(), b"a request body".to_vec())
    );

    let r = proxy
        .send_body(Method::PUT, path, &[], vec![9u8; 200_000])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.last_body("/api/items?x=1"),
        ("PUT".into(), vec![9u8; 200_000])
    );

    for expected in [
        "imgedge; fwd=uri-miss; stored",
        "imgedge; hit; detail=memory",
    ] {
        let r = proxy.get(path).await;
        assert_eq!(r.cache_status(), expected);
        assert_eq!(r.text(), "{\"ok\":true}");
    }
    assert_eq!(origin.hits("/api/items?x=1"), 3, "POST, PUT, one GET");
}

#[tokio::test]
async fn end_to_end_headers_pass_both_ways_and_hop_by_hop_ones_do_not() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/h",
        Reply::ok("x")
            .header("Access-Control-Allow-Origin", "*")
            .header("X-Custom", "kept")
            .header("Connection", "X-Hop")
            .header("X-Hop", "dropped")
            .header("Keep-Alive", "timeout=5"),
    );
    let proxy = route_proxy(&origin).await;
    let r = proxy
        .send(
            Method::GET,
            "/h",
            &[
                ("Accept", "image/webp"),
                ("X-Client", "unknown, dropped"),
                (
                    "Traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("Connection", "X-Secret, Referer"),
                ("X-Secret", "dropped"),
                ("Referer", "named by Connection, dropped"),
            ],
        )
        .await;
    assert_eq!(r.header("access-control-allow-origin"), "*");
    assert_eq!(r.header("x-custom"), "kept");
    assert!(r.headers.get("x-hop").is_none());
    assert!(r.headers.get("keep-alive").is_none());
    let sent = origin.last_request("/h");
    let get = |n: &str| sent.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("accept").as_deref(), Some("image/webp"));
    assert!(get("traceparent").is_some(), "{sent:?}");
    // Request headers are an allow-list: what imgedge does not know stays behind.
    assert_eq!(get("x-client"), None);
    assert_eq!(get("x-secret"), None);
    assert_eq!(get("referer"), None);
    assert_eq!(get("host"), Some(origin.addr.to_string()));
}

#[tokio::test]
async fn a_successful_unsafe_method_invalidates_the_uri_and_its_location() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/doc",
        Reply::ok("v1").header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/other",
        Reply::ok("o1").header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/create",
        Reply::ok("made").status(201).header("Location", "/other"),
    );
    let proxy = route_proxy(&origin).await;
    for path in ["/doc", "/other", "/doc", "/other"] {
        proxy.get(path).await;
    }
    assert_eq!((origin.hits("/doc"), origin.hits("/other")), (1, 1));

    proxy.send(Method::DELETE, "/doc", &[]).await;
    proxy.send(Method::POST, "/create", &[]).await;
    for path in ["/doc", "/other"] {
        let r = proxy.get(path).await;
        assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored", "{path}");
    }
    assert_eq!((origin.hits("/doc"), origin.hits("/other")), (3, 2));
}

#[tokio::test]
async fn authorized_vary_and_set_cookie_responses_follow_the_shared_cache_rules() {
    // Credentials (§3.5) and Vary: * are refused; Vary is stored; Set-Cookie only where the
    // route allows it.
    let origin = TestOrigin::start().await;
    origin.route(
        "/auth",
        Reply::ok("a").header("Cache-Control", "max-age=60"),
    );
    origin.route(
        "/auth-public",
        Reply::ok("p").header("Cache-Control", "public, max-age=60"),
    );
    origin.route(
        "/vary-star",
        Reply::ok("v")
            .header("Cache-Control", "max-age=60")
            .header("Vary", "*"),
    );
    origin.route(
        "/vary",
        Reply::ok("v")
            .header("Cache-Control", "max-age=60")
            .header("Vary", "Accept"),
    );
    origin.route(
        "/cookie",
        Reply::ok("c")
            .header("Cache-Control", "max-age=60")
            .header("Set-Cookie", "s=1"),
    );
    let proxy = route_proxy(&origin).await;
    for (path, credential, first, second) in [
        (
            "/auth",
            Some(("Authorization", "Bearer token")),
            "detail=authorization",
            "detail=authorization",
        ),
        (
            "/auth",
            Some(("Cookie", "session=1")),
            "detail=authorization",
            "detail=authorization",
        ),
        (
            "/auth",
            Some(("apikey", "k")),
            "detail=authorization",
            "detail=authorization",
        ),
        (
            "/auth-public",
            Some(("Cookie", "session=1")),
            "stored",
            "hit",
        ),
        ("/vary", None, "stored", "hit"),
        ("/vary-star", None, "detail=vary", "detail=vary"),
        // Storing would replay the cookie to everyone: not stored (the client still gets it).
        ("/cookie", None, "detail=set-cookie", "detail=set-cookie"),
    ] {
        let headers: Vec<(&str, &str)> = credential.into_iter().collect();
        let r = proxy.send(Method::GET, path, &headers).await;
        assert!(
            r.cache_status().ends_with(first),
            "{path} {credential:?}: {}",
            r.cache_status()
        );
        if path == "/cookie" {
            assert_eq!(r.header("set-cookie"), "s=1", "a route forwards Set-Cookie");
        }
        let r = proxy.send(Method::GET, path, &headers).await;
        assert!(
            r.cache_status().contains(second),
            "{path} {credential:?}: {}",
            r.cache_status()
        );
    }
    // A route that allows it stores Set-Cookie and replays it.
    let storing = TestProxy::for_origin(
        &origin,
        &format!(
            "[[routes]]\nprefix = \"/\"\nupstream = \"http://{}\"\nstore_set_cookie = true\n",
            origin.addr
        ),
    )
    .await;
    let r = storing.get("/cookie").await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
    let r = storing.get("/cookie").await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(r.header("set-cookie"), "s=1", "replayed from the cache");
}

/// A request with credentials is answered from the cache only by a response marked shareable,
/// and never joins another request's fetch.
#[tokio::test]
async fn credentialed_requests_are_not_answered_with_anonymous_responses() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/profile",
        Reply::ok("anonymous view").header("Cache-Control", "max-age=60"),
    );
    let proxy = route_proxy(&origin).await;
    let r = proxy.get("/profile").await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(
        proxy.get("/profile").await.cache_status(),
        "imgedge; hit; detail=memory"
    );
    for credential in [
        ("Authorization", "Bearer t"),
        ("Cookie", "session=abc"),
        ("apikey", "key"),
    ] {
        let r = proxy.send(Method::GET, "/profile", &[credential]).await;
        assert!(
            r.cache_status().starts_with("imgedge; fwd=uri-miss"),
            "{credential:?}: {}",
            r.cache_status()
        );
    }
    assert_eq!(origin.hits("/profile"), 4);
    // And the stored anonymous response is still there for anonymous requests.
    assert_eq!(
        proxy.get("/profile").await.cache_status(),
        "imgedge; hit; detail=memory"
    );
}

/// What a client says about proxies never reaches the origin: imgedge says who the client is.
#[tokio::test]
async fn client_forwarding_headers_are_replaced_by_imgedge_s_own() {
    let origin = TestOrigin::start().await;
    origin.route("/who", Reply::ok("w"));
    let spoofing = [
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=1.2.3.4;host=evil.example"),
        ("X-Real-IP", "1.2.3.4"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-HTTP-Method-Override", "DELETE"),
    ];
    let direct = route_proxy(&origin).await;
    direct.send(Method::GET, "/who", &spoofing).await;
    let seen = origin.last_request("/who");
    let value = |name: &str| {
        seen.iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(value("x-forwarded-for"), ["127.0.0.1"], "{seen:?}");
    assert_eq!(value("x-forwarded-proto"), ["http"], "{seen:?}");
    // A cacheable GET with no server.public_hosts: the Host nobody checked is not passed on.
    assert!(value("x-forwarded-host").is_empty(), "{seen:?}");
    assert_eq!(value("forwarded"), ["for=127.0.0.1;proto=http"], "{seen:?}");
    for name in [
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
    ] {
        assert!(value(name).is_empty(), "{name} passed: {seen:?}");
    }
    // Behind a trusted proxy (here: loopback), the client it names is the client.
    let behind_cdn =
        route_proxy_with(&origin, "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n").await;
    behind_cdn
        .send(
            Method::GET,
            "/who",
            &[("X-Forwarded-For", "198.51.100.7, 127.0.0.2")],
        )
        .await;
    let seen = origin.last_request("/who");
    assert!(
        seen.contains(&("x-forwarded-for".to_owned(), "198.51.100.7".to_owned())),
        "{seen:?}"
    );
}

#[tokio::test]
async fn conditional_requests_are_forwarded_and_do_not_mark_the_uri_as_pass() {
    let origin = TestOrigin::start().await;
    origin.route("/c", Reply::ok("").status(304).header("ETag", "\"e\""));
    let proxy = route_proxy(&origin).await;
    let r = proxy
        .send(Method::GET, "/c", &[("If-None-Match", "\"e\"")])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(
        origin
            .last_request("/c")
            .iter()
            .find(|(k, _)| k == "if-none-match")
            .unwrap()
            .1,
        "\"e\""
    );
    origin.route(
        "/c",
        Reply::ok("full").header("Cache-Control", "max-age=60"),
    );
    let r = proxy.get("/c").await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
}

#[tokio::test]
async fn the_supabase_public_route_drops_credentials_so_public_objects_stay_cacheable() {
    let origin = TestOrigin::start().await;
    let public = "/storage/v1/object/public/avatars/a.png";
    let private = "/storage/v1/object/authenticated/avatars/a.png";
    origin.route(
        public,
        Reply::ok("img")
            .header("Cache-Control", "max-age=3600")
            .header("Set-Cookie", "t=1"),
    );
    origin.route(
        private,
        Reply::ok("secret").header("Cache-Control", "max-age=3600"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for expected in [
        "imgedge; fwd=uri-miss; stored",
        "imgedge; hit; detail=memory",
    ] {
        let r = proxy
            .send(
                Method::GET,
                public,
                &[
                    ("Authorization", "Bearer anon"),
                    ("apikey", "anon"),
                    ("Cookie", "sb=1"),
                ],
            )
            .await;
        assert_eq!(r.cache_status(), expected);
        assert!(r.headers.get("set-cookie").is_none());
        assert_eq!(r.text(), "img");
    }
    let sent = origin.last_request(public);
    for name in ["authorization", "apikey", "cookie"] {
        assert!(
            sent.iter().all(|(k, _)| k != name),
            "{name} forwarded for a public object"
        );
    }
    // The rest of the Storage API gets the credentials, and authorized responses are not shared.
    let r = proxy
        .send(Method::GET, private, &[("Authorization", "Bearer user")])
        .await;
    assert_eq!(
        r.cache_status(),
        "imgedge; fwd=uri-miss; detail=authorization"
    );
    assert_eq!(r.text(), "secret");
    let sent = origin.last_request(private);
    assert!(
        sent.iter()
            .any(|(k, v)| k == "authorization" && v == "Bearer user")
    );
}

#[tokio::test]
async fn built_in_paths_and_longer_prefixes_win() {
    let origin = TestOrigin::start().await;
    let other = TestOrigin::start().await;
    origin.route("/a/b", Reply::ok("root route"));
    other.route("/a/b", Reply::ok("longer prefix"));
    let routes = format!(
        "[[routes]]\nprefix = \"/\"\nupstream = \"http://{}\"\n[[routes]]\nprefix = \"/a/\"\nupstream = \"http://{}\"\n",
        origin.addr, other.addr
    );
    let proxy = TestProxy::for_origin(&origin, &routes).await;
    assert_eq!(proxy.get("/a/b").await.text(), "longer prefix");
    assert_eq!(proxy.get("/health").await.status, 200);
    assert_eq!(origin.hits("/health"), 0);
}

const TOKEN: &str = "0123456789abcdef-test-token";

async fn purge_proxy(origin: &TestOrigin) -> TestProxy {
    route_proxy_with(origin, &format!("[admin]\ntoken = \"{TOKEN}\"\n")).await
}

#[tokio::test]
async fn purge_removes_objects_by_path_and_by_url_and_needs_the_token() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/p.jpg",
        Reply::ok("p").header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/q.jpg",
        Reply::ok("q").header("Cache-Control", "max-age=600"),
    );
    let proxy = purge_proxy(&origin).await;
    let image = format!("/image-proxy?url={}", origin.url("/q.jpg"));
    for path in ["/p.jpg", image.as_str()] {
        proxy.get(path).await;
        assert_eq!(
            proxy.get(path).await.cache_status(),
            "imgedge; hit; detail=memory"
        );
    }
    let purge = Method::from_bytes(b"PURGE").unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let auth = ("Authorization", bearer.as_str());
    let r = proxy.send(purge.clone(), "/p.jpg", &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "unauthorized");
    let r = proxy.send(purge.clone(), "/p.jpg", &[auth]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), "{\"purged\":1}");
    assert_eq!(
        proxy.get("/p.jpg").await.cache_status(),
        "imgedge; fwd=uri-miss; stored"
    );

    let body = format!(
        "{{\"urls\": [\"{}\", \"http://elsewhere.example/x\"]}}",
        origin.url("/q.jpg")
    );
    let r = proxy
        .send_body(Method::POST, "/_imgedge/purge", &[auth], body)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), "{\"purged\":1,\"urls\":2}");
    assert_eq!(
        proxy.get(&image).await.cache_status(),
        "imgedge; fwd=uri-miss; stored"
    );
    let body = "{\"urls\": [\"not a url\"]}";
    let r = proxy
        .send_body(Method::POST, "/_imgedge/purge", &[auth], body)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "bad_request");
}

#[tokio::test]
async fn purge_is_disabled_without_a_token_and_reports_what_it_removed() {
    let origin = TestOrigin::start().await;
    let off = route_proxy(&origin).await;
    let purge = Method::from_bytes(b"PURGE").unwrap();
    let bearer = format!("Bearer {TOKEN}");
    let auth = ("Authorization", bearer.as_str());
    let r = off.send(purge.clone(), "/x", &[auth]).await;
    assert_eq!(r.status, 404);
    assert_eq!(origin.hits("/x"), 0, "a PURGE is never forwarded");

    // Purging a key with nothing stored reports 0 (its pass marker is cleared: see the unit
    // test in cache.rs), and the next miss stores normally.
    origin.route("/n.jpg", Reply::ok("n").header("Cache-Control", "no-store"));
    let proxy = purge_proxy(&origin).await;
    proxy.get("/n.jpg").await;
    origin.route(
        "/n.jpg",
        Reply::ok("n").header("Cache-Control", "max-age=60"),
    );
    let r = proxy.send(purge, "/n.jpg", &[auth]).await;
    assert_eq!(r.text().trim(), "{\"purged\":0}");
    assert_eq!(
        proxy.get("/n.jpg").await.cache_status(),
        "imgedge; fwd=uri-miss; stored"
    );
}

#[tokio::test]
async fn responses_that_vary_are_stored_per_variant() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/img",
        Reply::ok("negotiated")
            .header("Cache-Control", "max-age=600")
            .header("Vary", "Accept, Accept-Language"),
    );
    let proxy = route_proxy(&origin).await;
    let get = async |accept| proxy.send(Method::GET, "/img", &[("Accept", accept)]).await;
    for (accept, expected) in [
        ("image/webp", "imgedge; fwd=uri-miss; stored"),
        ("image/webp", "imgedge; hit; detail=memory"),
        ("image/png", "imgedge; fwd=uri-miss; stored"),
        ("image/png", "imgedge; hit; detail=memory"),
        (" image/webp ", "imgedge; hit; detail=memory"),
    ] {
        let r = get(accept).await;
        assert_eq!(r.cache_status(), expected, "Accept: {accept:?}");
    }
    assert_eq!(origin.hits("/img"), 2, "one fetch per variant");
    // Purging the URL drops every variant.
    proxy.send(Method::DELETE, "/img", &[]).await;
    let r = get("image/webp").await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
}

/// An absolute `Location` or `Content-Location` at the route's upstream is rewritten to the
/// origin the client used, per response: a stored redirect is served to each client with its
/// own host, never another's. Relative ones and other origins' pass as they are.
#[tokio::test]
async fn locations_at_the_upstream_lead_back_through_imgedge() {
    let origin = TestOrigin::start().await;
    let up = format!("http://{}", origin.addr);
    origin.route(
        "/moved",
        Reply::ok("")
            .status(301)
            .header("Location", &format!("{up}/new?x=1"))
            .header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/made",
        Reply::ok("made")
            .status(201)
            .header("Location", "/relative/1")
            .header("Content-Location", &format!("{up}/made/1")),
    );
    origin.route(
        "/away",
        Reply::ok("")
            .status(302)
            .header("Location", "http://elsewhere.example/x"),
    );
    let proxy = route_proxy(&origin).await;
    for (host, cache) in [
        ("a.example:8080", "imgedge; fwd=uri-miss; stored"),
        ("b.example", "imgedge; hit; detail=memory"),
    ] {
        let r = proxy.send(Method::GET, "/moved", &[("Host", host)]).await;
        assert_eq!((r.status, r.cache_status().as_str()), (301, cache));
        assert_eq!(r.header("location"), format!("http://{host}/new?x=1"));
    }
    let r = proxy
        .send_body(Method::POST, "/made", &[("Host", "a.example")], "x")
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), "/relative/1");
    assert_eq!(r.header("content-location"), "http://a.example/made/1");
    let r = proxy.get("/away").await;
    assert_eq!(r.header("location"), "http://elsewhere.example/x");

    // Behind a trusted proxy, the scheme and host it names.
    let behind = route_proxy_with(&origin, "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n").await;
    let r = behind
        .send(
            Method::GET,
            "/moved",
            &[
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "cdn.example"),
            ],
        )
        .await;
    assert_eq!(r.header("location"), "https://cdn.example/new?x=1");
}
