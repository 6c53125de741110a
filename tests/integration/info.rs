//! `/image-info` through real sockets: metadata from the header of an `/image-proxy` target and
//! of a route path, kept so that a second request never reaches the origin, read from the first
//! bytes (a `Range` request) when no tier holds the object, purged with it.

use std::io::Cursor;

use crate::support::*;
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use reqwest::Method;

const OBJECT: &str = "/storage/v1/object/public/photos/cat.png";

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgba8(RgbaImage::new(width, height))
        .write_to(&mut out, ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(RgbImage::new(width, height))
        .write_to(&mut out, ImageFormat::Jpeg)
        .unwrap();
    out.into_inner()
}

fn encoded(url: &str) -> String {
    percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn image_proxy_targets_are_described_once_then_from_the_record() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cat.png",
        Reply::ok(png(200, 100))
            .header("etag", "\"c1\"")
            .header("cache-control", "public, max-age=600"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let path = format!("/image-info?url={}", encoded(&origin.url("/cat.png")));
    let got = proxy.get(&path).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(
        got.cache_status(),
        "imgedge; fwd=uri-miss; stored; detail=info"
    );
    assert_eq!(got.header("cache-control"), "public, max-age=600");
    let json = got.json();
    assert_eq!(json["width"], 200);
    assert_eq!(json["height"], 100);
    assert_eq!(json["format"], "png");
    assert_eq!(json["content_type"], TEST_CONTENT_TYPE);
    assert_eq!(json["bytes"], png(200, 100).len());
    assert_eq!(json["etag"], "\"c1\"");
    assert_eq!(json["orientation"], 1);
    assert_eq!(json["has_alpha"], true);
    // the first bytes were asked for, not the object
    let sent = origin.last_request("/cat.png");
    assert!(
        sent.iter()
            .any(|(k, v)| k == "range" && v == "bytes=0-65535"),
        "{sent:?}"
    );
    let again = proxy.get(&path).await;
    assert_eq!(again.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(again.json(), json);
    let head = proxy.send(Method::HEAD, &path, &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        origin.hits("/cat.png"),
        1,
        "a second request never reaches the origin"
    );
    // the info fetched nothing into the object tier: the image itself is a miss
    let image = proxy.get_image(&origin.url("/cat.png")).await;
    assert_eq!(image.cache_status(), "imgedge; fwd=uri-miss; stored");
}

#[tokio::test]
async fn a_large_object_is_described_from_its_first_bytes_only() {
    let origin = TestOrigin::start().await;
    // 8 MB: a real JPEG header, then bytes that no header reader should reach
    let mut big = jpeg(640, 480);
    big.resize(8 << 20, 0);
    origin.route("/big.jpg", Reply::ok(big.clone()));
    // an origin that honours the range: 206 with the first bytes and the whole length
    let mut ranged = jpeg(320, 240);
    let total = ranged.len() + (16 << 20);
    ranged.truncate(ranged.len().min(65536));
    origin.route(
        "/ranged.jpg",
        Reply::ok(ranged)
            .status(206)
            .header("content-range", &format!("bytes 0-65535/{total}")),
    );
    let proxy = TestProxy::for_origin(&origin, "[cache]\nmax_cacheable_bytes = 1000000").await;
    let got = proxy
        .get(&format!(
            "/image-info?url={}",
            encoded(&origin.url("/big.jpg"))
        ))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let json = got.json();
    assert_eq!(
        (json["width"].clone(), json["height"].clone()),
        (640.into(), 480.into())
    );
    assert_eq!(json["format"], "jpeg");
    assert_eq!(json["bytes"], big.len());
    assert_eq!(json["has_alpha"], false);
    let got = proxy
        .get(&format!(
            "/image-info?url={}",
            encoded(&origin.url("/ranged.jpg"))
        ))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["width"], 320);
    assert_eq!(got.json()["bytes"], total);
    // both kept: asked again, the origin hears nothing
    for target in ["/big.jpg", "/ranged.jpg"] {
        let again = proxy
            .get(&format!("/image-info?url={}", encoded(&origin.url(target))))
            .await;
        assert_eq!(
            again.cache_status(),
            "imgedge; hit; detail=memory",
            "{target}"
        );
        assert_eq!(origin.hits(target), 1, "{target}");
    }
}

#[tokio::test]
async fn route_paths_are_described_from_the_stored_object_and_purged_with_it() {
    let origin = TestOrigin::start().await;
    let jpeg_6 = with_exif_orientation(&jpeg(300, 200), 6);
    origin.route(
        OBJECT,
        Reply::ok(jpeg_6.clone())
            .header("etag", "\"j1\"")
            .header("cache-control", "public, max-age=600"),
    );
    let token = "purge-token-0123456789";
    let proxy = TestProxy::for_origin(&origin, &format!("[admin]\ntoken = \"{token}\"")).await;
    // the object first: stored, so the info reads it from the tier
    assert_eq!(proxy.get(OBJECT).await.status, 200);
    let info = format!("/image-info{OBJECT}");
    let got = proxy.get(&info).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let json = got.json();
    assert_eq!(
        (json["width"].clone(), json["height"].clone()),
        (300.into(), 200.into())
    );
    assert_eq!(json["orientation"], 6);
    assert_eq!(json["etag"], "\"j1\"");
    assert_eq!(json["content_type"], "image/jpeg");
    assert_eq!(json["bytes"], jpeg_6.len());
    assert_eq!(origin.hits(OBJECT), 1, "read from the tier");
    assert_eq!(
        proxy.get(&info).await.cache_status(),
        "imgedge; hit; detail=memory"
    );
    // purged with its object
    let purged = proxy.purge_path(token, OBJECT).await;
    assert_eq!(purged.json()["purged"], 1, "{}", purged.text());
    let after = proxy.get(&info).await;
    assert_eq!(
        after.cache_status(),
        "imgedge; fwd=uri-miss; stored; detail=info"
    );
    assert_eq!(origin.hits(OBJECT), 2);
}

#[tokio::test]
async fn what_is_not_an_image_or_not_an_object_is_refused() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/storage/v1/object/public/b/page.png",
        Reply::ok("<html>hi</html>"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let got = proxy
        .get("/image-info/storage/v1/object/public/b/page.png")
        .await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(got.error_code(), "not_an_image");
    let got = proxy
        .get("/image-info/storage/v1/object/public/b/missing.png")
        .await;
    assert_eq!(got.status, 404, "{}", got.text());
    for path in [
        "/image-info/nowhere/a.png",
        "/image-info/health",
        "/image-infox",
    ] {
        let got = proxy.get(path).await;
        assert_eq!(got.status, 404, "{path}: {}", got.text());
    }
    let got = proxy
        .send(
            Method::POST,
            "/image-info/storage/v1/object/public/b/page.png",
            &[],
        )
        .await;
    assert_eq!(got.status, 405);
    // /image-proxy's refusals apply to its targets
    let got = proxy.get("/image-info?url=http://10.0.0.1/a.png").await;
    assert_eq!(got.status, 403, "{}", got.text());
    let got = proxy.get("/image-info").await;
    assert_eq!(got.status, 400, "{}", got.text());
}

/// With `[signing] keys`, `/image-info?url=` is signed as `/image-proxy` is (its own path is
/// what is signed); the route-path form follows the routes, which are not signed.
#[tokio::test]
async fn image_info_of_a_target_is_signed_alike_image_proxy() {
    let origin = TestOrigin::start().await;
    origin.route("/cat.png", Reply::ok(png(20, 10)));
    origin.route(OBJECT, Reply::ok(png(30, 10)));
    let key = "00112233445566778899aabbccddeeff";
    let proxy = TestProxy::for_origin(&origin, &format!("[signing]\nkeys = [\"{key}\"]")).await;
    let signer = imgedge::signing::Signer::new(vec![
        (0..key.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&key[i..i + 2], 16).unwrap())
            .collect(),
    ]);
    let unsigned = format!("/image-info?url={}", encoded(&origin.url("/cat.png")));
    let refused = proxy.get(&unsigned).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    // a signature made for /image-proxy does not open /image-info
    let for_proxy = format!("/image-proxy?url={}", encoded(&origin.url("/cat.png")));
    let borrowed = format!("{unsigned}&s={}", signer.sign(&for_proxy));
    assert_eq!(proxy.get(&borrowed).await.status, 403);
    assert_eq!(origin.hits("/cat.png"), 0, "refusals contact nothing");
    let signed = format!("{unsigned}&s={}", signer.sign(&unsigned));
    let got = proxy.get(&signed).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["width"], 20);
    let route = proxy.get(&format!("/image-info{OBJECT}")).await;
    assert_eq!(route.status, 200, "{}", route.text());
    assert_eq!(route.json()["width"], 30);
}
