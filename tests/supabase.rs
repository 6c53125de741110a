//! The Supabase route through real sockets: what crosses to Storage (the headers it reads, the
//! host it builds URLs and verifies signatures from), what a write invalidates, the shape of
//! imgedge's own errors there.

mod support;

use support::*;

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
