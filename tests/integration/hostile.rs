//! Hostile input: what origins and clients send to break a proxy. Every case must get a clear
//! answer and leave the proxy serving (no panic, no growth).

use crate::support::*;

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

/// One bad input: the request as sent (no client-side normalization), the answer expected, and
/// whether the origin may be contacted for it.
struct Row {
    what: &'static str,
    method: &'static str,
    target: String,
    status: u16,
    code: &'static str,
    /// Header lines sent with the request, each ending in CRLF.
    extra: &'static str,
}

/// Every refusal is a clear JSON error, answered at once, and a refused target contacts nothing.
#[tokio::test]
async fn bad_inputs_get_a_clear_error_and_refused_targets_contact_nothing() {
    let origin = TestOrigin::start().await;
    origin.route("/a.jpg", Reply::ok("image"));
    for (path, location) in [
        ("/to-file", "file:///etc/passwd"),
        ("/to-data", "data:text/html,<script>alert(1)</script>"),
        ("/to-gopher", "gopher://127.0.0.1:70/"),
    ] {
        origin.route(path, Reply::ok("").status(302).header("Location", location));
    }
    let port = origin.addr.port();
    let config = |upstream: &str| {
        imgedge::Config::from_toml(&format!(
            "[upstream]\n{upstream}\n[supabase]\nupstream = \"http://{}\"\n[log]\naccess = false",
            origin.addr
        ))
        .unwrap()
    };
    // The origin's address allowed (in every spelling below), on the origin's port too, but not
    // trusted with a private address: each must be refused before a connection is made.
    let guarded = TestProxy::start(config(&format!(
        "allowed_hosts = [\"127.0.0.1:{port}\", \"localhost:{port}\", \"[::1]:{port}\", \"0.0.0.0:{port}\", \"[::7f00:1]:{port}\", \"[::ffff:7f00:1]:{port}\", \"other.example\"]"
    )))
    .await;
    // Trusted with its private address, but its port not named anywhere.
    let port_unnamed = TestProxy::start(config("trusted_private_hosts = [\"127.0.0.1\"]")).await;
    let image = |target: &str| format!("/image-proxy?url={target}");
    let row = |what, method, target: String, status, code| Row {
        what,
        method,
        target,
        status,
        code,
        extra: "",
    };
    let long = format!("http://h.example/{}", "a".repeat(5000));
    let on_guarded = vec![
        row("no url", "GET", "/image-proxy".into(), 400, "bad_url"),
        row("empty url", "GET", image(""), 400, "bad_url"),
        row("relative url", "GET", image("/a.jpg"), 400, "bad_url"),
        row(
            "ftp url",
            "GET",
            image("ftp://127.0.0.1/a.jpg"),
            400,
            "bad_url",
        ),
        row(
            "file url",
            "GET",
            image("file:///etc/passwd"),
            400,
            "bad_url",
        ),
        row(
            "userinfo",
            "GET",
            image(&format!("http://u:p@127.0.0.1:{port}/a.jpg")),
            400,
            "bad_url",
        ),
        row("bad encoding", "GET", image("%FF%FE"), 400, "bad_url"),
        row("too long", "GET", image(&long), 400, "bad_url"),
        row(
            "loopback",
            "GET",
            image(&format!("http://127.0.0.1:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "octal loopback",
            "GET",
            image(&format!("http://0177.0.0.1:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "short loopback",
            "GET",
            image(&format!("http://127.1:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "hex loopback",
            "GET",
            image(&format!("http://0x7f.1:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "v4-compatible",
            "GET",
            image(&format!("http://[::7f00:1]:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "v4-mapped",
            "GET",
            image(&format!("http://[::ffff:7f00:1]:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "v6 loopback",
            "GET",
            image(&format!("http://[::1]:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "unspecified",
            "GET",
            image(&format!("http://0.0.0.0:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "localhost.",
            "GET",
            image(&format!("http://localhost.:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "LOCALHOST.",
            "GET",
            image(&format!("http://LOCALHOST.:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "host not allowed",
            "GET",
            image("http://else.example/a.jpg"),
            403,
            "host_not_allowed",
        ),
        row(
            "port not allowed",
            "GET",
            image("http://other.example:8080/a.jpg"),
            403,
            "host_not_allowed",
        ),
        row(
            "method",
            "POST",
            image(&format!("http://127.0.0.1:{port}/a.jpg")),
            405,
            "method_not_allowed",
        ),
        row(
            "dot-dot path",
            "GET",
            "/storage/v1/object/public/b/../../../a.jpg".into(),
            400,
            "bad_path",
        ),
        row(
            "encoded dot-dot",
            "GET",
            "/storage/v1/object/public/b/%2e%2e/%2E%2E/a.jpg".into(),
            400,
            "bad_path",
        ),
        row(
            "backslash",
            "GET",
            "/storage/v1/object/public/b/..%5c..%5ca.jpg".into(),
            400,
            "bad_path",
        ),
        row("no route", "GET", "/nothing/here".into(), 404, "not_found"),
        row(
            "route target too long",
            "GET",
            format!("/storage/v1/object/public/b/{}", "a".repeat(5000)),
            414,
            "uri_too_long",
        ),
        Row {
            extra: "Content-Length: 52428801\r\n",
            ..row(
                "upload too large",
                "PUT",
                "/storage/v1/object/b/a.jpg".into(),
                413,
                "payload_too_large",
            )
        },
    ];
    let on_port_unnamed = vec![row(
        "trusted, port not named",
        "GET",
        image(&format!("http://127.0.0.1:{port}/a.jpg")),
        403,
        "host_not_allowed",
    )];
    // Signed URLs required and a burst of three requests: the rate is checked first (so that
    // a spray of bad signatures costs no HMAC past it), then the signature, then the target.
    let key = "00112233445566778899aabbccddeeff";
    let strict = TestProxy::start(config(&format!(
        "trusted_private_hosts = [\"127.0.0.1:{port}\"]\n[signing]\nkeys = [\"{key}\"]\n[limits]\nper_ip_per_second = 1\nburst = 3"
    )))
    .await;
    let signer = imgedge::signing::Signer::new(vec![vec![
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]]);
    let signed = |target: &str| imgedge::signing::image_proxy_target(target, &[], &signer);
    let on_strict = vec![
        row(
            "unsigned",
            "GET",
            image(&format!("http://127.0.0.1:{port}/a.jpg")),
            403,
            "bad_signature",
        ),
        row(
            "wrong signature",
            "GET",
            format!(
                "{}&s=AAAA",
                image(&format!("http://127.0.0.1:{port}/a.jpg"))
            ),
            403,
            "bad_signature",
        ),
        row(
            "signed, private address",
            "GET",
            signed(&format!("http://localhost:{port}/a.jpg")),
            403,
            "private_address",
        ),
        row(
            "signed, over the rate",
            "GET",
            signed(&format!("http://127.0.0.1:{port}/a.jpg")),
            429,
            "rate_limited",
        ),
    ];
    for (proxy, rows) in [
        (&guarded, on_guarded),
        (&port_unnamed, on_port_unnamed),
        (&strict, on_strict),
    ] {
        for r in rows {
            let started = std::time::Instant::now();
            let (status, body) = raw_request(proxy.addr, r.method, &r.target, r.extra).await;
            let elapsed = started.elapsed();
            assert_refused(&r, status, &body);
            assert_eq!(
                origin.total_hits(),
                0,
                "{}: the origin was contacted",
                r.what
            );
            assert!(
                elapsed < std::time::Duration::from_secs(1),
                "{}: took {elapsed:?}",
                r.what
            );
        }
    }
    // Redirects are only known once the origin answers; what imgedge does not follow is refused.
    let trusted = TestProxy::for_origin(&origin, "").await;
    for (what, path) in [
        ("redirect to file:", "/to-file"),
        ("redirect to data:", "/to-data"),
        ("redirect to gopher:", "/to-gopher"),
    ] {
        let r = row(what, "GET", image(&origin.url(path)), 502, "bad_redirect");
        let (status, body) = raw_request(trusted.addr, r.method, &r.target, "").await;
        assert_refused(&r, status, &body);
        assert_eq!(origin.hits(path), 1, "{what}");
    }
    // What the origin answers that is not an image is refused once it has answered.
    for (what, path, reply) in [
        (
            "HTML",
            "/page.html",
            self::reply(
                b"<html><script>alert(1)</script>",
                &[("Content-Type", "text/html")],
            ),
        ),
        (
            "HTML named a JPEG",
            "/fake.jpg",
            self::reply(
                b"<html><script>alert(1)</script>",
                &[("Content-Type", "image/jpeg")],
            ),
        ),
        (
            "compressed JPEG",
            "/gz.jpg",
            self::reply(
                JPEG,
                &[("Content-Type", "image/jpeg"), ("Content-Encoding", "gzip")],
            ),
        ),
        (
            "SVG without allow_svg",
            "/a.svg",
            self::reply(SVG, &[("Content-Type", "image/svg+xml")]),
        ),
    ] {
        origin.route(path, reply);
        let r = row(what, "GET", image(&origin.url(path)), 502, "not_an_image");
        let (status, body) = raw_request(trusted.addr, r.method, &r.target, "").await;
        assert_refused(&r, status, &body);
        assert_eq!(origin.hits(path), 1, "{what}");
    }
    // Still serving.
    assert_eq!(trusted.get_image(&origin.url("/a.jpg")).await.status, 200);
}

fn assert_refused(r: &Row, status: u16, body: &str) {
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {body}", r.what));
    // imgedge's code: `imgedgeCode` on the Supabase routes, where `error` is Storage's
    let code = json.get("imgedgeCode").unwrap_or(&json["error"]);
    assert_eq!(
        (status, code.as_str().unwrap_or("")),
        (r.status, r.code),
        "{}: {body}",
        r.what
    );
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}: {body}",
        r.what
    );
}

const JPEG: &[u8] = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 the rest of a jpeg";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR the rest of a png";
const SVG: &[u8] = b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"/>";

/// Response header lines, as written.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// A reply with exactly these headers (the test origin adds only the framing).
fn reply(body: &'static [u8], headers: &[(&str, &str)]) -> Reply {
    let mut r = Reply::ok(body);
    r.headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r
}

/// `/image-proxy` serves images only: anything else is 502 `not_an_image`, decided before a
/// byte of it is sent, never stored; what it serves carries a CSP under which nothing runs.
#[tokio::test]
async fn image_proxy_serves_images_only() {
    let origin = TestOrigin::start().await;
    let refused: &[(&str, &[u8], Headers)] = &[
        (
            "/page.jpg",
            b"<html><script>alert(1)</script></html>",
            &[("Content-Type", "text/html")],
        ),
        (
            "/script.jpg",
            b"alert(1)",
            &[("Content-Type", "application/javascript")],
        ),
        ("/none.jpg", JPEG, &[]),
        (
            "/lying.png",
            b"<html><script>alert(1)</script></html>",
            &[("Content-Type", "image/png")],
        ),
        ("/mismatch.png", JPEG, &[("Content-Type", "image/png")]),
        ("/svg.svg", SVG, &[("Content-Type", "image/svg+xml")]),
        (
            "/gzip.png",
            PNG,
            &[("Content-Type", "image/png"), ("Content-Encoding", "gzip")],
        ),
        (
            "/two.png",
            PNG,
            &[("Content-Type", "image/png"), ("Content-Type", "text/html")],
        ),
        ("/empty.png", b"", &[("Content-Type", "image/png")]),
    ];
    for (path, body, headers) in refused {
        origin.route(
            path,
            reply(body, headers).header("Cache-Control", "max-age=600"),
        );
    }
    origin.route(
        "/cat.jpg",
        reply(
            JPEG,
            &[
                ("Content-Type", "image/jpeg"),
                ("Content-Disposition", "attachment; filename=\"evil.html\""),
                ("Cache-Control", "max-age=600"),
            ],
        ),
    );
    origin.route(
        "/cat.png",
        reply(PNG, &[("Content-Type", "image/png; charset=binary")]),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (path, _, _) in refused {
        for attempt in 1..=2 {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!(r.status, 502, "{path}");
            assert_eq!(r.error_code(), "not_an_image", "{path}");
            assert_eq!(r.header("content-type"), "application/json", "{path}");
            assert_eq!(
                r.header("content-security-policy"),
                "default-src 'none'; sandbox"
            );
            assert_eq!(origin.hits(path), attempt, "{path}: nothing stored");
        }
    }
    for (path, body) in [("/cat.jpg", JPEG), ("/cat.png", PNG)] {
        for expected in [
            "imgedge; fwd=uri-miss; stored",
            "imgedge; hit; detail=memory",
        ] {
            let r = proxy.get_image(&origin.url(path)).await;
            assert_eq!((r.status, &r.body[..]), (200, body), "{path}");
            assert_eq!(r.cache_status(), expected, "{path}");
            assert_eq!(
                r.header("content-security-policy"),
                "default-src 'none'; sandbox"
            );
            assert_eq!(r.header("x-content-type-options"), "nosniff");
            assert_eq!(r.header("content-disposition"), "", "{path}");
        }
    }
    // Upstreams are asked for the plain bytes.
    let asked = origin.last_request("/cat.png");
    assert!(
        asked
            .iter()
            .any(|(k, v)| k == "accept-encoding" && v == "identity"),
        "{asked:?}"
    );

    // SVG only when allowed, then with its own CSP.
    let svg_origin = TestOrigin::start().await;
    svg_origin.route(
        "/logo.svg",
        reply(SVG, &[("Content-Type", "image/svg+xml")]),
    );
    svg_origin.route(
        "/fake.svg",
        reply(b"<html><svg/></html>", &[("Content-Type", "image/svg+xml")]),
    );
    let svg = TestProxy::for_origin(&svg_origin, "[upstream]\nallow_svg = true").await;
    let r = svg.get_image(&svg_origin.url("/logo.svg")).await;
    assert_eq!((r.status, &r.body[..]), (200, SVG));
    assert_eq!(
        r.header("content-security-policy"),
        "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    );
    let r = svg.get_image(&svg_origin.url("/fake.svg")).await;
    assert_eq!(r.error_code(), "not_an_image");
}

/// Followers of a fetch that turns out not to be an image get the same refusal, from one
/// origin request.
#[tokio::test]
async fn collapsed_followers_share_the_refusal() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow.jpg",
        reply(b"<html></html>", &[("Content-Type", "text/html")])
            .head_delay(std::time::Duration::from_millis(300)),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let target = origin.url("/slow.jpg");
    let all = futures_join(&proxy, &target, 8).await;
    for r in all {
        assert_eq!((r.status, r.error_code()), (502, "not_an_image".to_owned()));
    }
    assert_eq!(origin.hits("/slow.jpg"), 1);
}

async fn futures_join(proxy: &TestProxy, target: &str, n: usize) -> Vec<Got> {
    let mut handles = Vec::new();
    for _ in 0..n {
        let (client, url) = (proxy.client.clone(), proxy.url(&image_path(target)));
        handles.push(tokio::spawn(async move {
            send(&client, Method::GET, &url, &[]).await
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Each route has its own cache namespace: the same upstream URL fetched through
/// `/image-proxy` and through a route is two objects, so neither can plant what the other
/// serves; purge names the route.
#[tokio::test]
async fn routes_never_serve_each_others_objects() {
    let origin = TestOrigin::start().await;
    let path = "/storage/v1/object/public/b/shared.jpg";
    origin.route(path, Reply::ok(JPEG).header("Cache-Control", "max-age=600"));
    let token = "purge-token-0123456789";
    let proxy = TestProxy::for_origin(&origin, &format!("[admin]\ntoken = \"{token}\"")).await;
    let via_proxy = proxy.get_image(&origin.url(path)).await;
    assert_eq!(via_proxy.cache_status(), "imgedge; fwd=uri-miss; stored");
    // The same upstream URL through the Supabase route: a miss of its own, not the stored one.
    let via_route = proxy.get(path).await;
    assert_eq!(via_route.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(origin.hits(path), 2);
    for _ in 0..2 {
        assert_eq!(
            proxy.get_image(&origin.url(path)).await.cache_status(),
            "imgedge; hit; detail=memory"
        );
        assert_eq!(
            proxy.get(path).await.cache_status(),
            "imgedge; hit; detail=memory"
        );
    }
    // Purging the route's object leaves /image-proxy's.
    let purged = proxy.purge_path(token, path).await;
    assert_eq!(purged.json()["purged"], 1, "{}", purged.text());
    assert_eq!(
        proxy.get(path).await.cache_status(),
        "imgedge; fwd=uri-miss; stored"
    );
    assert_eq!(
        proxy.get_image(&origin.url(path)).await.cache_status(),
        "imgedge; hit; detail=memory"
    );
    // A path no route serves is refused, and nothing is purged.
    let bad = proxy.purge_path(token, "/nowhere/x.jpg").await;
    assert_eq!(bad.error_code(), "bad_request");
}

/// With `[signing] keys`, `/image-proxy` answers only requests signed with one of them; a
/// refusal contacts nothing.
#[tokio::test]
async fn image_proxy_requires_a_valid_signature_when_keys_are_set() {
    use imgedge::signing::{Signer, image_proxy_target};
    let origin = TestOrigin::start().await;
    origin.route("/a.jpg", Reply::ok(JPEG));
    origin.route("/q.jpg?x=1&y=2", Reply::ok(JPEG));
    let (old, new) = (
        "00112233445566778899aabbccddeeff",
        "ffeeddccbbaa99887766554433221100",
    );
    let proxy = TestProxy::for_origin(
        &origin,
        &format!("[signing]\nkeys = [\"{new}\", \"{old}\"]"),
    )
    .await;
    let hex = |h: &str| {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
    };
    let signed_old = Signer::new(vec![hex(old)]);
    let other = Signer::new(vec![b"not the right key at all".to_vec()]);
    let url = origin.url("/a.jpg");
    // a parameter imgedge ignores (a cache-busting version): only the signature is tested here
    let good = image_proxy_target(&url, &[("v".into(), "2".into())], &signed_old);
    let r = proxy.get(&good).await;
    assert_eq!(
        (r.status, &r.body[..]),
        (200, JPEG),
        "signed with a listed (older) key"
    );
    // The raw form, whose URL keeps its own query: signed up to &s=.
    let raw = format!("/image-proxy?url={}", origin.url("/q.jpg?x=1&y=2"));
    let raw_signed = format!("{raw}&s={}", signed_old.sign(&raw));
    let (status, _) = raw_request(proxy.addr, "GET", &raw_signed, "").await;
    assert_eq!(status, 200, "{raw_signed}");
    let hits = origin.hits("/a.jpg");
    for (what, target) in [
        ("unsigned", format!("/image-proxy?url={url}")),
        ("wrong key", image_proxy_target(&url, &[], &other)),
        ("altered", good.replace("v=2", "v=3")),
        ("signature not last", format!("{good}&w=1")),
        ("garbage signature", format!("/image-proxy?url={url}&s=!!!")),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = raw_request(proxy.addr, "GET", &target, "").await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, json["error"].as_str().unwrap()),
            (403, "bad_signature"),
            "{what}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{what}"
        );
    }
    assert_eq!(origin.hits("/a.jpg"), hits, "refusals contact nothing");
}

/// `[limits]`: each client gets its burst, then 429 `rate_limited` with `Retry-After`; the
/// health and metrics endpoints are exempt; behind a trusted proxy each named client is
/// limited on its own.
#[tokio::test]
async fn clients_over_their_rate_get_429_with_retry_after() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a.jpg",
        Reply::ok(JPEG).header("Cache-Control", "max-age=600"),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[limits]\nper_ip_per_second = 1\nburst = 2\n[server]\ntrusted_proxies = [\"127.0.0.1\"]",
    )
    .await;
    let target = image_path(&origin.url("/a.jpg"));
    let from = |client: &'static str| [("X-Forwarded-For", client)];
    for _ in 0..2 {
        let r = proxy
            .send(Method::GET, &target, &from("198.51.100.1"))
            .await;
        assert_eq!(r.status, 200);
    }
    let r = proxy
        .send(Method::GET, &target, &from("198.51.100.1"))
        .await;
    assert_eq!((r.status, r.error_code()), (429, "rate_limited".to_owned()));
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another client has a bucket of its own.
    let r = proxy
        .send(Method::GET, &target, &from("198.51.100.2"))
        .await;
    assert_eq!(r.status, 200);
    // /health and /metrics are not limited.
    for _ in 0..10 {
        assert_eq!(
            proxy
                .send(Method::GET, "/health", &from("198.51.100.1"))
                .await
                .status,
            200
        );
        assert_eq!(
            proxy
                .send(Method::GET, "/metrics", &from("198.51.100.1"))
                .await
                .status,
            200
        );
    }
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("imgedge_shed_total{reason=\"rate\"} 1"),
        "{metrics}"
    );
}
