//! Client and connection limits (`[server]`): silent and slow sockets closed on time, idle
//! keep-alive connections closed, `max_connections` enforced and reported, request bodies held
//! to their size and pause limits while slow uploads that keep moving succeed.

use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or resets) the connection; `Err` when it is still open after
/// `limit`. Returns what was read.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(got),
            Ok(Ok(0) | Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response with a `Content-Length` body from a keep-alive connection.
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + length]).to_string();
                return (status, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed before a whole response");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn get_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: imgedge\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream).await
}

#[tokio::test]
async fn silent_and_half_spoken_connections_are_closed_after_header_read_timeout() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(
        &origin,
        "[server]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
    )
    .await;
    // Nothing at all; half an HTTP/2 preface (the version is never decided); half a head.
    for opening in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"GET /health HTTP/1.1\r\nHo",
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let started = Instant::now();
        let got = closed_within(&mut stream, Duration::from_secs(5)).await;
        assert!(got.is_ok(), "{opening:?}: still open after 5 s");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{opening:?}: closed before its time"
        );
    }
    // After a first request, a second head that stops halfway gets as long, not idle_timeout.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut stream, "/health/live").await.0, 200);
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost")
        .await
        .unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(5))
            .await
            .is_ok(),
        "a half head on a keep-alive connection was held past header_read_timeout"
    );
    // Still serving.
    assert_eq!(proxy.get("/health/live").await.status, 200);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_busy_ones_are_not() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow.jpg",
        Reply::ok("slow image").head_delay(Duration::from_millis(700)),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[server]\nheader_read_timeout = \"30s\"\nidle_timeout = \"300ms\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // A request that outlasts idle_timeout is not cut: the connection is not idle.
    let (status, body) = get_on(&mut stream, &image_path(&origin.url("/slow.jpg"))).await;
    assert_eq!((status, body.as_str()), (200, "slow image"));
    // Still usable right after.
    assert_eq!(get_on(&mut stream, "/health/live").await.0, 200);
    // Then idle: closed after idle_timeout, long before header_read_timeout.
    let started = Instant::now();
    let got = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(got, Ok(Vec::new()), "an idle connection was kept open");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn idle_http2_connections_get_a_goaway() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "[server]\nidle_timeout = \"300ms\"").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(proxy.url("/health/live"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    // The server closes the idle connection (GOAWAY), which ends the client's side.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_and_ready_says_full() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "[server]\nmax_connections = 2").await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(get_on(&mut first, "/health/live").await.0, 200);
    assert_eq!(get_on(&mut second, "/health/live").await.0, 200);
    // The third is closed at once, without a response.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: imgedge\r\n\r\n")
        .await;
    let got = closed_within(&mut third, Duration::from_secs(2)).await;
    assert_eq!(
        got,
        Ok(Vec::new()),
        "the connection past the limit was served"
    );
    // A load balancer's check on a connection it holds sees why.
    let (status, body) = get_on(&mut first, "/health/ready").await;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "full");
    let (_, metrics) = get_on(&mut first, "/metrics").await;
    assert!(
        metrics.contains("imgedge_connections_refused_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("imgedge_connections_open 2"), "{metrics}");
    // Room again once one closes.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = stream
            .write_all(b"GET /health/ready HTTP/1.1\r\nHost: imgedge\r\nConnection: close\r\n\r\n")
            .await;
        let got = closed_within(&mut stream, Duration::from_secs(2))
            .await
            .unwrap_or_default();
        // Served (ready says full again: this connection is the second).
        if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a POST with `Content-Length: length` to the Supabase route, writing `chunks` with
/// `pause` before each, and returns the response.
async fn upload(
    proxy: &TestProxy,
    path: &str,
    head_extra: &str,
    chunks: &[&[u8]],
    pause: Duration,
) -> (u16, String) {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: imgedge\r\n{head_extra}\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        tokio::time::sleep(pause).await;
        if stream.write_all(chunk).await.is_err() {
            break;
        }
    }
    let got = closed_within(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_else(|got| got);
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// imgedge's error code in a JSON error body (`imgedgeCode` on the Supabase routes, where
/// `error` is Storage's).
fn error_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .map(|j| {
            j.get("imgedgeCode")
                .unwrap_or(&j["error"])
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_else(|_| format!("not JSON: {body}"))
}

#[tokio::test]
async fn uploads_are_held_to_their_own_limits_not_the_upstream_header_timeout() {
    let origin = TestOrigin::start().await;
    let path = "/storage/v1/object/b/upload.jpg";
    origin.route(path, Reply::ok("stored"));
    origin.route(
        "/storage/v1/object/b/late.jpg",
        Reply::ok("stored").head_delay(Duration::from_millis(800)),
    );
    // The upstream's header_timeout is 1 s (test_config); uploads get 400 ms between chunks.
    let proxy = TestProxy::for_origin(
        &origin,
        "[server]\nmax_request_body_bytes = 100\nrequest_body_timeout = \"400ms\"",
    )
    .await;
    // 30 bytes over 1.5 s: slower than header_timeout, never pausing 400 ms: it arrives whole.
    let parts: Vec<&[u8]> = vec![b"0123456789"; 3];
    let (status, body) = upload(
        &proxy,
        path,
        "Content-Length: 30\r\nConnection: close\r\n",
        &parts,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "stored"));
    assert_eq!(
        origin.last_body(path),
        ("POST".into(), b"0123456789".repeat(3))
    );
    assert_eq!(origin.hits(path), 1);
    // Announced over the limit: 413 before the upstream is contacted.
    let (status, body) = upload(
        &proxy,
        path,
        "Content-Length: 101\r\nConnection: close\r\n",
        &[],
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (413, "payload_too_large")
    );
    assert_eq!(
        origin.hits(path),
        1,
        "the upstream was contacted for a refused body"
    );
    // Chunked, growing past the limit while the origin waits: 413.
    let chunk = format!("{:x}\r\n{}\r\n", 60, "x".repeat(60));
    let (status, body) = upload(
        &proxy,
        "/storage/v1/object/b/late.jpg",
        "Transfer-Encoding: chunked\r\nConnection: close\r\n",
        &[chunk.as_bytes(), chunk.as_bytes()],
        Duration::from_millis(20),
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (413, "payload_too_large")
    );
    // Stalled halfway: 408 after request_body_timeout.
    let started = Instant::now();
    let (status, body) = upload(
        &proxy,
        path,
        "Content-Length: 30\r\nConnection: close\r\n",
        &[b"0123456789"],
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (408, "request_timeout")
    );
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(
        origin.hits(path),
        1,
        "a stalled upload reached the origin whole"
    );
}

/// How [`early_answering_origin`] treats the body it does not read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Early {
    /// Answers 403, then reads and discards the rest until the peer closes (as nginx's
    /// lingering close does).
    Lingers,
    /// Answers 403, then reads nothing and keeps the connection open for a minute.
    Stops,
    /// Resets the connection without answering.
    Resets,
}

/// An origin that answers as soon as it has read a request head, without reading the body.
async fn early_answering_origin(early: Early) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if early == Early::Resets {
                    // SO_LINGER 0 is how a RST is sent; nothing blocks on this drop.
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                    return;
                }
                let body = r#"{"Error":"SignatureDoesNotMatch"}"#;
                let response = format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                if early == Early::Stops {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy whose Supabase route goes to `addr`, with `extra` `[server]` keys.
async fn proxy_in_front_of(addr: std::net::SocketAddr, extra: &str) -> TestProxy {
    TestProxy::start(
        imgedge::Config::from_toml(&format!(
            "[server]\n{extra}\n[supabase]\nupstream = \"http://{addr}\"\n[log]\naccess = false\n"
        ))
        .unwrap(),
    )
    .await
}

/// An origin that answers an upload before reading its body (a signature check on the head,
/// as S3 does), keeps reading or not, or fails outright: the client still reads the answer, as
/// from nginx, instead of a reset while it is still sending. imgedge reads and discards the
/// rest of the body (a lingering close) within the body's own limits, and the connection then
/// serves the next request.
#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client_that_is_still_sending() {
    const BODY_BYTES: usize = 24 << 20;
    for (early, status) in [
        (Early::Lingers, 403),
        (Early::Stops, 403),
        (Early::Resets, 502),
    ] {
        let proxy = proxy_in_front_of(early_answering_origin(early).await, "").await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let head = format!(
            "PUT /storage/v1/s3/b/big.bin HTTP/1.1\r\nHost: imgedge\r\n\
             Authorization: AWS4-HMAC-SHA256 x\r\nContent-Length: {BODY_BYTES}\r\n\r\n"
        );
        let sending = tokio::spawn(async move {
            writer.write_all(head.as_bytes()).await?;
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..BODY_BYTES / chunk.len() {
                writer.write_all(&chunk).await?;
            }
            Ok::<_, std::io::Error>(writer)
        });
        let (got, body) = read_response(&mut reader).await;
        assert_eq!(got, status, "{early:?}: {body}");
        if status == 403 {
            assert_eq!(body, r#"{"Error":"SignatureDoesNotMatch"}"#);
        }
        // Stops: only imgedge reading the body lets the client send it whole.
        let mut writer = tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .unwrap_or_else(|_| panic!("{early:?}: the body not sent within 10 s"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{early:?}: sending the body failed: {e}"));
        writer
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: imgedge\r\n\r\n")
            .await
            .unwrap();
        let (got, _) = read_response(&mut reader).await;
        assert_eq!(got, 200, "{early:?}: the next request on the connection");
    }
}

/// The rest of a body is read only within its limits: a client that stops sending is closed
/// after `request_body_timeout`, one that sends more than `max_request_body_bytes` once past it.
#[tokio::test]
async fn a_lingering_body_is_held_to_the_body_limits() {
    let proxy = proxy_in_front_of(
        early_answering_origin(Early::Stops).await,
        "request_body_timeout = \"300ms\"\nmax_request_body_bytes = 4194304",
    )
    .await;
    // Stops sending after 1 MiB of 4.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        "PUT /storage/v1/s3/b/k HTTP/1.1\r\nHost: imgedge\r\nContent-Length: 4194304\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![1u8; 1 << 20]).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 403);
    let started = Instant::now();
    closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("closed once the client paused past request_body_timeout");
    assert!(started.elapsed() >= Duration::from_millis(200));

    // Chunked, going on past the limit: closed there, not read forever.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        "PUT /storage/v1/s3/b/k HTTP/1.1\r\nHost: imgedge\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, "x".repeat(1 << 16));
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        let mut sent = 0usize;
        while writer.write_all(chunk.as_bytes()).await.is_ok() {
            sent += 1 << 16;
            if sent > 64 << 20 {
                break;
            }
        }
        sent
    });
    let (status, _) = read_response(&mut reader).await;
    assert_eq!(status, 403);
    let sent = tokio::time::timeout(Duration::from_secs(10), sending)
        .await
        .expect("the connection closed")
        .unwrap();
    assert!(sent < 32 << 20, "{sent} bytes taken from a body over 4 MiB");
}
