//! Targeted cache control (RFC 9213) through real sockets: an origin's `CDN-Cache-Control`
//! (and imgedge's own `Imgedge-Cache-Control`, which wins over it) governs what imgedge stores
//! above `Cache-Control`, an invalid one is ignored as a whole, neither reaches clients unless
//! configured; and towards a CDN in front, a route's `CDN-Cache-Control` and
//! `Surrogate-Control` on what may be shared, never on errors or private answers.
//! (The cache-tests suite has no RFC 9213 tests; these are ours.)

use crate::support::{Reply, TestOrigin, TestProxy};
use reqwest::Method;

async fn route_proxy(origin: &TestOrigin, extra: &str, route: &str) -> TestProxy {
    TestProxy::for_origin(
        origin,
        &format!(
            "{extra}[[routes]]\nprefix = \"/\"\nupstream = \"http://{}\"\n{route}",
            origin.addr
        ),
    )
    .await
}

/// Two GETs of `path`: the second's Cache-Status, and the origin's hit count.
async fn twice(proxy: &TestProxy, origin: &TestOrigin, path: &str) -> (String, usize) {
    let first = proxy.get(path).await;
    assert_eq!(first.status, 200, "{path}: {}", first.text());
    let second = proxy.get(path).await;
    (second.cache_status(), origin.hits(path))
}

#[tokio::test]
async fn cdn_cache_control_governs_storage_over_cache_control() {
    let origin = TestOrigin::start().await;
    // browsers may not keep it; imgedge (a CDN-class cache) may, for ten minutes
    origin.route(
        "/a",
        Reply::ok("a")
            .header("Cache-Control", "no-store")
            .header("CDN-Cache-Control", "max-age=600"),
    );
    // and the other way round: a targeted no-store wins over a long max-age
    origin.route(
        "/b",
        Reply::ok("b")
            .header("Cache-Control", "public, max-age=600")
            .header("CDN-Cache-Control", "no-store"),
    );
    // an invalid targeted field is ignored as a whole: Cache-Control applies
    origin.route(
        "/c",
        Reply::ok("c")
            .header("Cache-Control", "no-store")
            .header("CDN-Cache-Control", "max-age=600,"),
    );
    // Expires is ignored too when a targeted field applies, even one with no freshness
    origin.route(
        "/d",
        Reply::ok("d")
            .header("Expires", "Thu, 01 Jan 2099 00:00:00 GMT")
            .header("CDN-Cache-Control", "must-revalidate"),
    );
    // several lines are one dictionary
    origin.route(
        "/e",
        Reply::ok("e")
            .header("Cache-Control", "private")
            .header("CDN-Cache-Control", "public")
            .header("CDN-Cache-Control", "max-age=600"),
    );
    let proxy = route_proxy(&origin, "", "").await;
    assert_eq!(
        twice(&proxy, &origin, "/a").await,
        ("imgedge; hit; detail=memory".to_owned(), 1)
    );
    assert_eq!(twice(&proxy, &origin, "/b").await.1, 2);
    assert_eq!(twice(&proxy, &origin, "/c").await.1, 2);
    assert_eq!(twice(&proxy, &origin, "/d").await.1, 2);
    assert_eq!(twice(&proxy, &origin, "/e").await.1, 1);
    // not passed on: it was addressed to imgedge (a CDN-class cache)
    let r = proxy.get("/a").await;
    assert!(
        r.headers.get("cdn-cache-control").is_none(),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("cache-control"),
        "no-store",
        "Cache-Control is the browser's"
    );
}

#[tokio::test]
async fn imgedge_s_own_field_wins_and_is_never_passed_on() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/own",
        Reply::ok("own")
            .header("Cache-Control", "no-store")
            .header("CDN-Cache-Control", "no-store")
            .header("Imgedge-Cache-Control", "max-age=600"),
    );
    let proxy = route_proxy(&origin, "[cache]\nforward_cdn_cache_control = true\n", "").await;
    assert_eq!(
        twice(&proxy, &origin, "/own").await,
        ("imgedge; hit; detail=memory".to_owned(), 1)
    );
    let r = proxy.get("/own").await;
    assert!(r.headers.get("imgedge-cache-control").is_none());
    // with forward_cdn_cache_control, the CDN in front gets the origin's
    assert_eq!(r.header("cdn-cache-control"), "no-store");
    // a field name of the operator's choosing
    let origin = TestOrigin::start().await;
    origin.route(
        "/mine",
        Reply::ok("m")
            .header("Cache-Control", "no-store")
            .header("Edge-Cache", "max-age=60"),
    );
    let proxy = route_proxy(&origin, "[cache]\ntargeted_field = \"Edge-Cache\"\n", "").await;
    assert_eq!(twice(&proxy, &origin, "/mine").await.1, 1);
    assert!(proxy.get("/mine").await.headers.get("edge-cache").is_none());
}

#[tokio::test]
async fn routes_tell_a_cdn_in_front_how_long_to_keep_what_may_be_shared() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/img.png",
        Reply::ok("png")
            .header("Cache-Control", "public, max-age=86400")
            .header("Surrogate-Control", "max-age=5")
            .header("CDN-Cache-Control", "max-age=5"),
    );
    origin.route(
        "/mine",
        Reply::ok("private").header("Cache-Control", "private, max-age=60"),
    );
    origin.route(
        "/cookie",
        Reply::ok("c")
            .header("Cache-Control", "max-age=60")
            .header("Set-Cookie", "s=1"),
    );
    origin.route("/gone", Reply::ok("nope").status(404));
    let proxy = route_proxy(
        &origin,
        "",
        "cdn_cache_control = \"max-age=31536000\"\nsurrogate_control = \"max-age=31536000\"\n",
    )
    .await;
    // a miss and a hit alike: the route's, not the origin's
    for _ in 0..2 {
        let r = proxy.get("/img.png").await;
        assert_eq!(r.header("cdn-cache-control"), "max-age=31536000");
        assert_eq!(r.header("surrogate-control"), "max-age=31536000");
        assert_eq!(r.header("cache-control"), "public, max-age=86400");
    }
    // 304s too
    let etag_origin = TestOrigin::start().await;
    etag_origin.route(
        "/e",
        Reply::ok("e")
            .header("Cache-Control", "max-age=60")
            .header("ETag", "\"v1\""),
    );
    let etag_proxy = route_proxy(
        &etag_origin,
        "",
        "cdn_cache_control = \"max-age=31536000\"\n",
    )
    .await;
    etag_proxy.get("/e").await;
    let r = etag_proxy
        .send(Method::GET, "/e", &[("If-None-Match", "\"v1\"")])
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("cdn-cache-control"), "max-age=31536000");
    // never on what may not be shared, nor on errors (imgedge's own or the origin's)
    for path in ["/mine", "/cookie", "/gone", "/..%2Fx"] {
        let r = proxy.get(path).await;
        assert!(
            r.headers.get("cdn-cache-control").is_none()
                && r.headers.get("surrogate-control").is_none(),
            "{path}: {:?}",
            r.headers
        );
    }
}

#[tokio::test]
async fn image_proxy_and_the_supabase_route_take_cache_s_and_their_own() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/i.png",
        Reply::ok(&b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR rest"[..])
            .content_type(Some("image/png"))
            .header("Cache-Control", "max-age=60"),
    );
    origin.route(
        "/storage/v1/object/public/b/i.png",
        Reply::ok("x").header("Cache-Control", "max-age=60"),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[cache]\ncdn_cache_control = \"max-age=3600\"\n[supabase]\ncdn_cache_control = \"max-age=31536000, stale-while-revalidate=60\"\n",
    )
    .await;
    let r = proxy.get_image(&origin.url("/i.png")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cdn-cache-control"), "max-age=3600");
    let r = proxy.get("/storage/v1/object/public/b/i.png").await;
    assert_eq!(
        r.header("cdn-cache-control"),
        "max-age=31536000, stale-while-revalidate=60"
    );
}

#[test]
fn a_cdn_cache_control_that_is_not_a_dictionary_is_refused_at_start() {
    for (toml, bad) in [
        (
            "[cache]\ncdn_cache_control = \"max-age=1y\"\n",
            "cdn_cache_control",
        ),
        (
            "[cache]\ncdn_cache_control = \"max-age=60,\"\n",
            "cdn_cache_control",
        ),
        (
            "[cache]\ntargeted_field = \"Cache-Control\"\n",
            "targeted_field",
        ),
        (
            "[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\ncdn_cache_control = \"Max-Age=60\"\n",
            "cdn_cache_control",
        ),
    ] {
        let e = imgedge::Config::from_toml(toml).unwrap_err().to_string();
        assert!(e.contains(bad), "{toml}: {e}");
    }
    assert!(
        imgedge::Config::from_toml("[cache]\ncdn_cache_control = \"max-age=60, public\"\n").is_ok()
    );
}
