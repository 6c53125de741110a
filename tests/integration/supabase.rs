//! The Supabase route through real sockets: what crosses to Storage (the headers it reads, the
//! host it builds URLs and verifies signatures from), what a write invalidates, the shape of
//! imgedge's own errors there.

use crate::support::*;

/// The request headers Storage reads cross, the signed TUS endpoint's `x-signature` included;
/// an upload tells Storage the host the client used, so that the upload URL it builds and the
/// S3 signature it checks name imgedge.
#[tokio::test]
async fn the_headers_storage_reads_reach_it_with_the_host_the_client_used() {
    let origin = TestOrigin::start().await;
    let path = "/storage/v1/upload/resumable/sign";
    origin.route(path, Reply::ok("").status(201));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let sent = [
        ("x-signature", "token"),
        ("tus-resumable", "1.0.0"),
        ("upload-length", "4"),
        ("upload-metadata", "bucketName Yg==,objectName bw=="),
        ("x-upsert", "true"),
        ("x-amz-date", "20260101T000000Z"),
        ("amz-sdk-invocation-id", "1"),
        ("content-md5", "x"),
        ("x-client-info", "supabase-js/2"),
        ("Host", "edge.example:8080"),
    ];
    let r = proxy.send_body(Method::POST, path, &sent, "").await;
    assert_eq!(r.status, 201);
    let seen = origin.last_request(path);
    for (name, value) in &sent[..9] {
        assert!(
            seen.contains(&((*name).to_owned(), (*value).to_owned())),
            "{name} not forwarded: {seen:?}"
        );
    }
    let get = |n: &str| seen.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("x-forwarded-host"), Some("edge.example:8080"));
    assert_eq!(get("x-forwarded-port"), Some("8080"));
}

/// A resumable upload's `Location`, built by Storage (or by a gateway that did not trust
/// imgedge) from its own address, comes back pointing at imgedge, so the upload's PATCHes go
/// through it too.
#[tokio::test]
async fn a_resumable_upload_s_location_at_the_upstream_points_back_at_imgedge() {
    let origin = TestOrigin::start().await;
    let path = "/storage/v1/upload/resumable";
    origin.route(
        path,
        Reply::ok("").status(201).header(
            "Location",
            &format!("http://{}/storage/v1/upload/resumable/YS9i", origin.addr),
        ),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let r = proxy
        .send_body(
            Method::POST,
            path,
            &[
                ("Authorization", "Bearer k"),
                ("Tus-Resumable", "1.0.0"),
                ("Upload-Length", "1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("location"),
        format!("http://{}/storage/v1/upload/resumable/YS9i", proxy.addr)
    );
}

/// A `width` × `height` PNG.
fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn stored(body: Vec<u8>) -> Reply {
    Reply::ok(body)
        .header("Content-Type", "image/png")
        .header("Cache-Control", "public, max-age=3600")
}

const PUBLIC: &str = "/storage/v1/object/public/pics/cat.png";

/// Gets `path` twice: the second answer must be a hit.
async fn warm(proxy: &TestProxy, path: &str) {
    proxy.get(path).await;
    assert_eq!(
        proxy.get(path).await.cache_status(),
        "imgedge; hit; detail=memory",
        "{path}"
    );
}

/// An update (as supabase-js's `update()` sends it) makes the public object and its renditions
/// stale: the next requests are misses that fetch and render the new version. A write that
/// fails invalidates nothing.
#[tokio::test]
async fn an_update_invalidates_the_public_object_and_its_renditions() {
    let origin = TestOrigin::start().await;
    origin.route(PUBLIC, stored(png(200, 100)));
    origin.route(
        "/storage/v1/object/info/public/pics/cat.png",
        Reply::ok("{}")
            .content_type(Some("application/json"))
            .header("Cache-Control", "max-age=3600"),
    );
    origin.route(
        "/storage/v1/object/pics/cat.png",
        Reply::ok("{\"Key\":\"pics/cat.png\"}").content_type(Some("application/json")),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let render = "/storage/v1/render/image/public/pics/cat.png?width=50";
    warm(&proxy, PUBLIC).await;
    warm(&proxy, render).await;
    warm(&proxy, "/storage/v1/object/info/public/pics/cat.png").await;
    assert_eq!(origin.hits(PUBLIC), 1);

    // A failed write changes nothing.
    origin.route(
        "/storage/v1/object/pics/cat.png",
        Reply::ok("{\"statusCode\":\"403\"}")
            .status(400)
            .content_type(Some("application/json")),
    );
    let r = proxy
        .send_body(
            Method::PUT,
            "/storage/v1/object/pics/cat.png",
            &[("Authorization", "Bearer k")],
            png(100, 200),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        proxy.get(PUBLIC).await.cache_status(),
        "imgedge; hit; detail=memory"
    );

    origin.route(
        "/storage/v1/object/pics/cat.png",
        Reply::ok("{\"Key\":\"pics/cat.png\"}").content_type(Some("application/json")),
    );
    origin.route(PUBLIC, stored(png(100, 200)));
    let r = proxy
        .send_body(
            Method::PUT,
            "/storage/v1/object/pics/cat.png",
            &[("Authorization", "Bearer k"), ("x-upsert", "true")],
            png(100, 200),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = proxy.get(PUBLIC).await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(r.body, png(100, 200));
    let r = proxy.get(render).await;
    assert_eq!(
        image::load_from_memory(&r.body).unwrap().height(),
        100,
        "the new version rendered: {}",
        r.cache_status()
    );
    assert_eq!(
        proxy
            .get("/storage/v1/object/info/public/pics/cat.png")
            .await
            .cache_status(),
        "imgedge; fwd=uri-miss; stored"
    );
}

/// A move (its JSON body names the source and destination), a bulk delete (its body names the
/// keys), S3's DeleteObjects (XML) and a resumable upload's last PATCH (its URL names the
/// object) invalidate what they changed.
#[tokio::test]
async fn writes_named_in_bodies_and_upload_ids_invalidate_their_objects() {
    let origin = TestOrigin::start().await;
    let paths = [
        "/storage/v1/object/public/pics/old.png",
        "/storage/v1/object/public/pics/new.png",
        "/storage/v1/object/public/pics/a%20b.png",
        "/storage/v1/object/public/pics/dir/c.png",
        "/storage/v1/object/public/pics/s3.png",
        "/storage/v1/object/public/pics/tus.png",
    ];
    for path in paths {
        origin.route(path, stored(png(4, 4)));
    }
    let ok = || Reply::ok("{}").content_type(Some("application/json"));
    origin.route("/storage/v1/object/move", ok());
    origin.route("/storage/v1/object/pics", ok());
    origin.route("/storage/v1/s3/pics?delete", ok());
    // base64url of "pics/tus.png/<version>"
    let tus = "/storage/v1/upload/resumable/cGljcy90dXMucG5nLzEyMzQ";
    origin.route(tus, ok().status(204));
    let proxy = TestProxy::for_origin(&origin, "").await;
    for path in paths {
        warm(&proxy, path).await;
    }
    let auth = [
        ("Authorization", "Bearer k"),
        ("Content-Type", "application/json"),
    ];
    let sent = [
        (
            Method::POST,
            "/storage/v1/object/move",
            r#"{"bucketId":"pics","sourceKey":"old.png","destinationKey":"new.png"}"#.to_owned(),
        ),
        (
            Method::DELETE,
            "/storage/v1/object/pics",
            r#"{"prefixes":["a b.png","dir/c.png"]}"#.to_owned(),
        ),
        (
            Method::POST,
            "/storage/v1/s3/pics?delete",
            "<Delete><Object><Key>s3.png</Key></Object></Delete>".to_owned(),
        ),
        (Method::PATCH, tus, "the last bytes".to_owned()),
    ];
    for (method, path, body) in sent {
        let r = proxy.send_body(method, path, &auth, body).await;
        assert!(r.status < 300, "{path}: {}", r.status);
    }
    for path in paths {
        assert_eq!(
            proxy.get(path).await.cache_status(),
            "imgedge; fwd=uri-miss; stored",
            "{path}"
        );
        assert_eq!(origin.hits(path), 2, "{path}");
    }

    // A body past the 64 KiB kept is forwarded whole all the same; it names nothing then.
    warm(&proxy, paths[0]).await;
    let mut big =
        r#"{"bucketId":"pics","sourceKey":"old.png","destinationKey":"new.png","pad":""#.to_owned();
    big.push_str(&"x".repeat(70 * 1024));
    big.push_str("\"}");
    let r = proxy
        .send_body(Method::POST, "/storage/v1/object/move", &auth, big.clone())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.last_body("/storage/v1/object/move").1,
        big.into_bytes()
    );
    assert_eq!(
        proxy.get(paths[0]).await.cache_status(),
        "imgedge; hit; detail=memory"
    );
}

/// imgedge's own errors on the Supabase routes read as Storage's: `statusCode`, `code`
/// and `error` (Storage's code), `message`, and imgedge's code in `imgedgeCode`; XML on the S3 protocol. The status is
/// imgedge's; what the origin answers passes as it is; other routes keep imgedge's shape.
#[tokio::test]
async fn imgedge_s_own_errors_on_the_supabase_routes_take_storage_s_shape() {
    let origin = TestOrigin::start().await;
    let storage_error = r#"{"statusCode":"404","error":"not_found","message":"Object not found"}"#;
    origin.route(
        "/storage/v1/object/public/b/missing.png",
        Reply::ok(storage_error)
            .status(400)
            .content_type(Some("application/json")),
    );
    let proxy = TestProxy::for_origin(&origin, "[server]\nmax_request_body_bytes = 10\n").await;

    let (status, raw) = raw_exchange(
        proxy.addr,
        "GET",
        "/storage/v1/object/public/b/..%2Fx.png",
        "",
    )
    .await;
    assert_eq!(status, 400, "{raw}");
    let body: serde_json::Value =
        serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["statusCode"], "400");
    assert_eq!(body["code"], "InvalidKey");
    assert_eq!(body["error"], "InvalidKey");
    assert_eq!(body["imgedgeCode"], "bad_path");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    let r = proxy
        .get("/storage/v1/render/image/public/b/a.png?width=wide")
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["statusCode"], "400");
    assert_eq!(r.json()["code"], "InvalidRequest");
    assert_eq!(r.error_code(), "bad_parameter");

    let r = proxy
        .send_body(
            Method::PUT,
            "/storage/v1/object/b/big.bin",
            &[("Authorization", "Bearer k")],
            vec![0u8; 11],
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "EntityTooLarge");
    assert_eq!(r.json()["error"], "EntityTooLarge");
    assert_eq!(r.json()["imgedgeCode"], "payload_too_large");

    let r = proxy
        .send_body(
            Method::PUT,
            "/storage/v1/s3/b/dir/big.bin",
            &[("Authorization", "AWS4-HMAC-SHA256 ...")],
            vec![0u8; 11],
        )
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), "application/xml");
    let text = r.text();
    for part in [
        "<Code>EntityTooLarge</Code>",
        "<Resource>b/dir/big.bin</Resource>",
        "<ImgedgeCode>payload_too_large</ImgedgeCode>",
    ] {
        assert!(text.contains(part), "{part} not in {text}");
    }
    assert_eq!(origin.total_hits(), 0, "refused before anything was sent");

    // The origin's own error passes as it is.
    let r = proxy.get("/storage/v1/object/public/b/missing.png").await;
    assert_eq!((r.status, r.text().as_str()), (400, storage_error));

    // Elsewhere, imgedge's shape.
    let r = proxy.get("/image-proxy").await;
    assert_eq!(r.error_code(), "bad_url");
    assert!(r.json().get("statusCode").is_none());
}
