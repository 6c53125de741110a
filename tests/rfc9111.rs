//! RFC 9111 request directives, wired through real sockets (the timing rules themselves are unit
//! tests in freshness.rs, with explicit clocks).

mod support;

use support::*;

async fn cached_proxy(origin: &TestOrigin) -> TestProxy {
    origin.route(
        "/a.jpg",
        Reply::ok("v1").header("Cache-Control", "max-age=600"),
    );
    let proxy = TestProxy::for_origin(origin, "").await;
    proxy
        .get_image(&origin.url("/a.jpg"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(origin.hits("/a.jpg"), 1);
    proxy
}

async fn get_with(proxy: &TestProxy, target: &str, cache_control: &str) -> reqwest::Response {
    proxy
        .client
        .get(proxy.image_url(target))
        .header("Cache-Control", cache_control)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn only_if_cached_is_504_on_a_miss_and_a_hit_otherwise() {
    let origin = TestOrigin::start().await;
    let proxy = cached_proxy(&origin).await;
    let r = get_with(&proxy, &origin.url("/a.jpg"), "only-if-cached").await;
    assert_eq!(cache_status(&r), "imgedge; hit; detail=memory");
    let r = get_with(&proxy, &origin.url("/never.jpg"), "only-if-cached").await;
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(r).await, "not_cached");
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
            cache_status(&r),
            "imgedge; fwd=uri-miss; stored",
            "{cache_control}"
        );
        r.bytes().await.unwrap();
        assert_eq!(origin.hits("/a.jpg"), n + 2, "{cache_control}");
    }
    let r = get_with(&proxy, &origin.url("/a.jpg"), "max-age=600, min-fresh=10").await;
    assert_eq!(cache_status(&r), "imgedge; hit; detail=memory");
    let pragma = proxy
        .client
        .get(proxy.image_url(&origin.url("/a.jpg")))
        .header("Pragma", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&pragma), "imgedge; fwd=uri-miss; stored");
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
        cache_status(&r),
        "imgedge; fwd=uri-miss; detail=request-no-store"
    );
    assert_eq!(r.text().await.unwrap(), "v1");
    let r = proxy.get_image(&origin.url("/b.jpg")).await;
    assert_eq!(cache_status(&r), "imgedge; fwd=uri-miss; stored");
}
