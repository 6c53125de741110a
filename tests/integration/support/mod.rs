//! Test support: a scriptable HTTP/1.1 origin on 127.0.0.1:0 that counts hits and misbehaves on
//! request, an in-process imgedge on 127.0.0.1:0, and a client whose requests come back as one
//! [`Got`]: status, headers and the whole body. Tests that need the body as a stream (read in
//! chunks, timed, expected to fail, or left unread) use [`TestProxy::stream_image`] or the raw
//! `client`.
//!
//! The origin is written on raw TCP, not hyper, so that it can do what real servers do wrong:
//! reset mid-body, close short of its Content-Length, stall after the head, send forever.
#![allow(dead_code)]
// SO_LINGER 0 is how the origin sends a RST; it does not block on drop.
#![allow(deprecated)]

pub mod binary;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use imgedge::Config;
pub use reqwest::Method;
use reqwest::header::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// The `Content-Type` of test bodies that are not real images: allowed by the test proxies, and
/// without a signature imgedge checks.
pub const TEST_CONTENT_TYPE: &str = "image/x-imgedge-test";

/// `[upstream] allowed_content_types` of the test proxies (TOML array): the defaults and
/// [`TEST_CONTENT_TYPE`].
pub const TEST_CONTENT_TYPES: &str = r#"["image/jpeg", "image/png", "image/gif", "image/webp", "image/avif", "image/x-imgedge-test"]"#;

/// What the origin sends for one path.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: BodySpec,
    /// Announce `Content-Length` (true) or use chunked transfer coding (false).
    pub content_length: bool,
    /// Wait this long before sending the head.
    pub head_delay: Duration,
    pub fault: Fault,
}

/// The body an origin sends.
#[derive(Clone)]
pub enum BodySpec {
    Bytes(Bytes),
    /// `len` bytes of [`pattern`], generated as it is written.
    Pattern(u64),
    /// Chunked, never ending (the origin stops when the peer goes away).
    Endless,
}

/// How the origin misbehaves, counted in body bytes written.
#[derive(Clone)]
pub enum Fault {
    None,
    /// Reset the connection (RST) after this many body bytes.
    ResetAfter(u64),
    /// Close the connection cleanly (FIN) after this many body bytes: a short body.
    CloseAfter(u64),
    /// Go silent after this many body bytes, keeping the connection open.
    SilenceAfter(u64),
    /// Wait for the gate to open after this many body bytes, then continue.
    GateAfter(u64, Arc<Notify>),
    /// Reset right after reading the request, before any head.
    ResetBeforeHead,
    /// Send a malformed status line.
    Garbage,
    /// Send the body in 1 000-byte pieces with this pause between them: slow but never silent.
    Drip(Duration),
}

impl Reply {
    /// 200 with `body`, `Content-Length` and a `Content-Type` for it: `image/jpeg` when it
    /// starts with the JPEG signature, else [`TEST_CONTENT_TYPE`] (a type the test proxies
    /// allow and imgedge knows no signature for, so any body passes `/image-proxy`'s check).
    pub fn ok(body: impl Into<Bytes>) -> Self {
        let body = body.into();
        let content_type = if body.starts_with(b"\xff\xd8\xff") {
            "image/jpeg"
        } else {
            TEST_CONTENT_TYPE
        };
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: BodySpec::Bytes(body),
            content_length: true,
            head_delay: Duration::ZERO,
            fault: Fault::None,
        }
    }

    /// 200 with `len` bytes of [`pattern`].
    pub fn pattern(len: u64) -> Self {
        Reply {
            body: BodySpec::Pattern(len),
            ..Reply::ok(Bytes::new())
        }
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the `Content-Type` [`Reply::ok`] chose: `None` sends none at all.
    pub fn content_type(mut self, value: Option<&str>) -> Self {
        self.headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
        if let Some(v) = value {
            self.headers.push(("Content-Type".into(), v.into()));
        }
        self
    }

    pub fn chunked(mut self) -> Self {
        self.content_length = false;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    pub fn head_delay(mut self, delay: Duration) -> Self {
        self.head_delay = delay;
        self
    }
}

/// Byte `i` of the generated test body: varied enough that an offset mistake shows.
pub fn pattern_byte(i: u64) -> u8 {
    ((i * 31 + i / 4096) % 251) as u8
}

pub fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(pattern_byte).collect()
}

#[derive(Default)]
struct OriginState {
    replies: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
    /// Request heads received per path, lower-cased header names.
    requests: HashMap<String, Vec<Vec<(String, String)>>>,
    /// Method and body of each request per path.
    bodies: HashMap<String, Vec<(String, Vec<u8>)>>,
}

/// A scriptable origin. Paths without a reply get 404.
#[derive(Clone)]
pub struct TestOrigin {
    pub addr: SocketAddr,
    state: Arc<Mutex<OriginState>>,
}

impl TestOrigin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(OriginState::default()));
        let origin = TestOrigin { addr, state };
        let server = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move { server.serve(stream).await });
            }
        });
        origin
    }

    /// Scripts the reply for `path` (path and query, as requested).
    pub fn route(&self, path: &str, reply: Reply) -> &Self {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(path.into(), reply);
        self
    }

    /// Requests received for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received, all paths.
    pub fn total_hits(&self) -> usize {
        self.state.lock().unwrap().hits.values().sum()
    }

    /// Headers of the last request for `path`.
    pub fn last_request(&self, path: &str) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap()
            .requests
            .get(path)
            .and_then(|r| r.last().cloned())
            .unwrap_or_default()
    }

    /// Method and body of the last request for `path`.
    pub fn last_body(&self, path: &str) -> (String, Vec<u8>) {
        let state = self.state.lock().unwrap();
        state
            .bodies
            .get(path)
            .and_then(|r| r.last().cloned())
            .unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn serve(&self, mut stream: TcpStream) {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 * 1024 {
                return;
            }
        }
        let head_end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let text = String::from_utf8_lossy(&head[..head_end]).to_string();
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_owned();
        let path = first.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        // A request body, when announced with Content-Length, follows the head.
        let mut body = head[head_end..].to_vec();
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        while body.len() < length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        let reply = {
            let mut state = self.state.lock().unwrap();
            *state.hits.entry(path.clone()).or_default() += 1;
            state
                .requests
                .entry(path.clone())
                .or_default()
                .push(headers);
            state
                .bodies
                .entry(path.clone())
                .or_default()
                .push((method.clone(), body));
            state.replies.get(&path).cloned()
        };
        let reply = reply.unwrap_or_else(|| Reply::ok("no such path").status(404));
        let _ = write_reply(&mut stream, &reply, method == "HEAD").await;
    }
}

async fn write_reply(
    stream: &mut TcpStream,
    reply: &Reply,
    head_only: bool,
) -> std::io::Result<()> {
    if matches!(reply.fault, Fault::ResetBeforeHead) {
        stream.set_linger(Some(Duration::ZERO))?;
        return Ok(());
    }
    tokio::time::sleep(reply.head_delay).await;
    if matches!(reply.fault, Fault::Garbage) {
        stream
            .write_all(b"HTTP/1.1 abc definitely not http\r\n\r\n")
            .await?;
        return stream.flush().await;
    }
    let length = match &reply.body {
        BodySpec::Bytes(b) => Some(b.len() as u64),
        BodySpec::Pattern(n) => Some(*n),
        BodySpec::Endless => None,
    };
    let chunked = !reply.content_length || length.is_none();
    let mut head = format!("HTTP/1.1 {} Test\r\n", reply.status);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    } else {
        head.push_str(&format!("Content-Length: {}\r\n", length.unwrap()));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    if head_only {
        return stream.flush().await;
    }
    let mut sent = 0u64;
    let mut gate_passed = false;
    const CHUNK: u64 = 16 * 1024;
    loop {
        let remaining = length.map_or(CHUNK, |l| l - sent);
        if remaining == 0 {
            break;
        }
        let mut n = remaining.min(CHUNK);
        // Stop exactly at the fault's offset.
        let fault_at = match &reply.fault {
            Fault::ResetAfter(at) | Fault::CloseAfter(at) | Fault::SilenceAfter(at) => Some(*at),
            Fault::GateAfter(at, _) if !gate_passed => Some(*at),
            _ => None,
        };
        if let Some(at) = fault_at {
            if sent == at {
                match &reply.fault {
                    Fault::ResetAfter(_) => {
                        stream.flush().await?;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        stream.set_linger(Some(Duration::ZERO))?;
                        return Ok(());
                    }
                    Fault::CloseAfter(_) => {
                        stream.flush().await?;
                        return stream.shutdown().await;
                    }
                    Fault::SilenceAfter(_) => {
                        stream.flush().await?;
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        return Ok(());
                    }
                    Fault::GateAfter(_, gate) => {
                        stream.flush().await?;
                        gate.notified().await;
                        gate_passed = true;
                        continue;
                    }
                    _ => unreachable!(),
                }
            }
            n = n.min(at - sent);
        }
        if let Fault::Drip(pause) = &reply.fault {
            n = n.min(1000);
            tokio::time::sleep(*pause).await;
        }
        let data: Vec<u8> = match &reply.body {
            BodySpec::Bytes(b) => b[sent as usize..(sent + n) as usize].to_vec(),
            _ => (sent..sent + n).map(pattern_byte).collect(),
        };
        if chunked {
            stream
                .write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            stream.write_all(&data).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(&data).await?;
        }
        sent += n;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    stream.flush().await
}

/// An imgedge serving on 127.0.0.1:0 inside the test process; stops when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
}

impl TestProxy {
    pub async fn start(config: Config) -> Self {
        let rss: Option<std::sync::Arc<dyn imgedge::rss::RssSource>> = None;
        Self::start_with(config, rss).await
    }

    /// A proxy whose RSS readings come from `rss` (to drive memory pressure), when given.
    pub async fn start_with(
        config: Config,
        rss: Option<std::sync::Arc<dyn imgedge::rss::RssSource>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            match rss {
                Some(rss) => imgedge::serve_with_rss(listener, config, rss, shutdown).await,
                None => imgedge::serve(listener, config, shutdown).await,
            }
            .unwrap();
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        TestProxy {
            addr,
            client,
            stop: Some(stop),
        }
    }

    /// Starts a proxy allowed to fetch from `origin` (in `allowed_hosts` and
    /// `trusted_private_hosts`),
    /// with the Supabase route pointing at it, short timeouts, and `extra` TOML merged on top.
    pub async fn for_origin(origin: &TestOrigin, extra: &str) -> Self {
        Self::start(test_config(origin, extra)).await
    }

    /// Signals shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// `/image-proxy?url=` + the raw target URL.
    pub fn image_url(&self, target: &str) -> String {
        self.url(&image_path(target))
    }

    /// `method` `path_and_query` with `headers`, the body read to its end.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Got {
        send(&self.client, method, &self.url(path_and_query), headers).await
    }

    /// As [`TestProxy::send`], with a request body.
    pub async fn send_body(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Got {
        let request = request(&self.client, method, &self.url(path_and_query), headers);
        Got::read(request.body(body).send().await.unwrap()).await
    }

    /// `POST /_imgedge/purge` of one route `path`, authorized with the admin `token`.
    pub async fn purge_path(&self, token: &str, path: &str) -> Got {
        let bearer = format!("Bearer {token}");
        self.send_body(
            Method::POST,
            "/_imgedge/purge",
            &[("Authorization", bearer.as_str())],
            serde_json::json!({ "paths": [path] }).to_string(),
        )
        .await
    }

    /// GET `path_and_query`, the body read to its end.
    pub async fn get(&self, path_and_query: &str) -> Got {
        self.send(Method::GET, path_and_query, &[]).await
    }

    /// GET `/image-proxy?url=<target>` (raw form), the body read to its end.
    pub async fn get_image(&self, target: &str) -> Got {
        self.get(&image_path(target)).await
    }

    /// GET `/image-proxy?url=<target>` (raw form), returned as soon as the head is in: the body
    /// is the caller's to stream, time, watch fail, or leave unread.
    pub async fn stream_image(&self, target: &str) -> reqwest::Response {
        self.client
            .get(self.image_url(target))
            .send()
            .await
            .unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The configuration [`TestProxy::for_origin`] uses.
pub fn test_config(origin: &TestOrigin, extra: &str) -> Config {
    let base = format!(
        r#"
        [upstream]
        allowed_hosts = ["{addr}"]
        trusted_private_hosts = ["{addr}"]
        allowed_content_types = {types}
        connect_timeout = "1s"
        header_timeout = "1s"
        idle_timeout = "1s"
        [supabase]
        upstream = "http://{addr}"
        [log]
        access = false
        "#,
        addr = origin.addr,
        types = TEST_CONTENT_TYPES,
    );
    let merged = merge_toml(&base, extra);
    Config::from_toml(&merged).unwrap_or_else(|e| panic!("test config:\n{e}\n{merged}"))
}

/// Merges two small TOML documents section by section (the later wins).
fn merge_toml(base: &str, extra: &str) -> String {
    let mut doc: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra.parse().unwrap();
    for (section, value) in extra {
        match (doc.get_mut(&section), value) {
            (Some(toml::Value::Table(d)), toml::Value::Table(e)) => d.extend(e),
            (_, v) => {
                doc.insert(section, v);
            }
        }
    }
    doc.to_string()
}

/// `/image-proxy?url=` + the raw target URL.
pub fn image_path(target: &str) -> String {
    format!("/image-proxy?url={target}")
}

/// A whole response: status, headers and the complete body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    /// Reads the rest of `response`, whose head is in.
    pub async fn read(response: reqwest::Response) -> Got {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        Got {
            status,
            headers,
            body,
        }
    }

    /// The header's value, "" when absent.
    pub fn header(&self, name: &str) -> String {
        header_in(&self.headers, name)
    }

    /// The `Cache-Status` header.
    pub fn cache_status(&self) -> String {
        self.header("cache-status")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The JSON error code of an error response.
    pub fn error_code(&self) -> String {
        assert_eq!(self.header("content-type"), "application/json");
        let v = self.json();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        // on the Supabase routes `error` is Storage's code and imgedge's is `imgedgeCode`
        v.get("imgedgeCode")
            .unwrap_or(&v["error"])
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// `method` `url` with `headers` through `client`, the body read to its end.
pub async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    Got::read(request(client, method, url, headers).send().await.unwrap()).await
}

fn request(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    headers
        .iter()
        .fold(client.request(method, url), |r, (k, v)| r.header(*k, *v))
}

/// The `Cache-Status` header of a streaming response.
pub fn cache_status(r: &reqwest::Response) -> String {
    header(r, "cache-status")
}

/// A header of a streaming response, "" when absent.
pub fn header(r: &reqwest::Response, name: &str) -> String {
    header_in(r.headers(), name)
}

fn header_in(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Sends `GET {target}` exactly as given (no client-side URL normalization) and returns the
/// status and body.
pub async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    raw_request(addr, "GET", target, "").await
}

/// Sends `{method} {target}` exactly as given, with `extra` header lines (each ending in CRLF),
/// and returns the status and body.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, String) {
    let (status, text) = raw_exchange(addr, method, target, extra).await;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// As [`raw_request`], returning the status and the whole response as text, head included.
pub async fn raw_exchange(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// `jpeg` with an EXIF APP1 segment saying `orientation` inserted after SOI.
pub fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"II\x2a\x00\x08\x00\x00\x00".to_vec(); // little-endian, IFD at 8
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // one value
    tiff.extend_from_slice(&u32::from(orientation).to_le_bytes());
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}
