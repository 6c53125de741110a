//! The shared tier (`[cache.shared]`) through real sockets: imgedge instances against fake Redis
//! servers written here (a RESP responder on 127.0.0.1:0 that answers from a map, and that can
//! stall, answer garbage or hang up), so that no package is needed and every failure can be
//! staged on demand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the fake behaves towards every connection, from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers PING, GET, SET, STRLEN, GETRANGE, DEL from its map; `+OK` to anything else.
    Correct,
    /// Reads commands and never answers; hangs up once the mode changes.
    Stall,
    /// Answers every command with bytes that are not RESP.
    Garbage,
    /// Hangs up on every connection at once.
    Close,
}

/// A fake Redis on 127.0.0.1:0.
#[derive(Clone)]
struct FakeRedis {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    data: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Every command received: its arguments, each cut to 64 bytes.
    commands: Arc<Mutex<Vec<Vec<String>>>>,
}

impl FakeRedis {
    async fn start(mode: Mode) -> FakeRedis {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeRedis {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(Mutex::new(mode)),
            data: Arc::default(),
            commands: Arc::default(),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(f.clone().serve(socket));
            }
        });
        fake
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    /// The commands received so far named `name` (upper case).
    fn seen(&self, name: &str) -> Vec<Vec<String>> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.first().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .cloned()
            .collect()
    }

    /// Waits (up to 5 s) until `n` commands named `name` have arrived.
    async fn wait_for(&self, name: &str, n: usize) -> Vec<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.seen(name);
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{n} {name} not seen: {:?}",
                self.commands.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn serve(self, mut socket: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut stalled = false;
        // Bounded: a connection lives at most a minute.
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let mode = self.mode();
            if mode == Mode::Close || (stalled && mode != Mode::Stall) {
                return;
            }
            let read =
                tokio::time::timeout(Duration::from_millis(20), socket.read(&mut chunk)).await;
            match read {
                Err(_) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
            while let Some((args, used)) = parse_command(&buf) {
                buf.drain(..used);
                let shown = args
                    .iter()
                    .map(|a| String::from_utf8_lossy(&a[..a.len().min(64)]).into_owned())
                    .collect();
                self.commands.lock().unwrap().push(shown);
                let reply = match self.mode() {
                    Mode::Correct => self.answer(&args),
                    Mode::Stall => {
                        stalled = true;
                        continue;
                    }
                    Mode::Garbage => b"this is not RESP\r\n".to_vec(),
                    Mode::Close => return,
                };
                if socket.write_all(&reply).await.is_err() {
                    return;
                }
            }
        }
    }

    fn answer(&self, args: &[Vec<u8>]) -> Vec<u8> {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let key = || String::from_utf8_lossy(&args[1]).into_owned();
        let mut data = self.data.lock().unwrap();
        match name.as_str() {
            "PING" => b"+PONG\r\n".to_vec(),
            "SET" => {
                data.insert(key(), args[2].clone());
                b"+OK\r\n".to_vec()
            }
            "GET" => match data.get(&key()) {
                Some(v) => bulk(v),
                None => b"$-1\r\n".to_vec(),
            },
            "STRLEN" => format!(":{}\r\n", data.get(&key()).map_or(0, Vec::len)).into_bytes(),
            "GETRANGE" => {
                let v = data.get(&key()).cloned().unwrap_or_default();
                let end: usize = String::from_utf8_lossy(&args[3]).parse().unwrap();
                bulk(&v[..v.len().min(end + 1)])
            }
            "DEL" => format!(":{}\r\n", u8::from(data.remove(&key()).is_some())).into_bytes(),
            _ => b"+OK\r\n".to_vec(),
        }
    }

    /// The stored value whose key ends with `suffix`.
    fn key_ending(&self, suffix: &str) -> String {
        self.data
            .lock()
            .unwrap()
            .keys()
            .find(|k| k.ends_with(suffix))
            .cloned()
            .unwrap_or_else(|| panic!("no key ending {suffix}"))
    }
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

/// One RESP array of bulk strings from the front of `buf`, and the bytes it took.
fn parse_command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let count: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, next) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        args.push(buf[next..next + len].to_vec());
        at = next + len + 2;
    }
    Some((args, at))
}

/// A proxy on `origin` whose shared tier is `url`, with `shared` more of `[cache.shared]` (and
/// any tables after it). Its `timeout` is 1 s unless `shared` sets one: only the tests of stalls depend on it, and a
/// loaded CI machine can take longer than 50 ms to answer a loopback read in a debug build.
async fn proxy(origin: &TestOrigin, url: &str, shared: &str) -> TestProxy {
    let timeout = if shared.contains("timeout") {
        ""
    } else {
        "timeout = \"1s\"\n"
    };
    TestProxy::for_origin(
        origin,
        &format!("[cache.shared]\nurl = \"{url}\"\n{timeout}{shared}"),
    )
    .await
}

async fn shared_health(proxy: &TestProxy) -> serde_json::Value {
    proxy.get("/health").await.json()["cache"]["shared"].clone()
}

/// Waits (up to `within`) until `/health` shows the shared tier in `state`.
async fn wait_for_state(proxy: &TestProxy, state: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let shared = shared_health(proxy).await;
        if shared["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "never {state}: {shared}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_second_instance_serves_the_first_ones_object_from_redis_without_the_origin() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(20_000));
    let first = proxy(&origin, &redis.url(), "").await;
    let second = proxy(&origin, &redis.url(), "").await;
    wait_for_state(&first, "closed", Duration::from_secs(3)).await;
    wait_for_state(&second, "closed", Duration::from_secs(3)).await;

    let got = first.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.status, 200);
    redis.wait_for("SET", 1).await;

    let got = second.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.cache_status(), "imgedge; hit; detail=shared");
    assert_eq!(got.body, pattern(20_000));
    assert_eq!(origin.hits("/a.png"), 1);
    // Promoted into memory: the next one is a memory hit.
    let got = second.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.cache_status(), "imgedge; hit; detail=memory");

    let shared = shared_health(&second).await;
    assert_eq!(shared["enabled"], true, "{shared}");
    assert_eq!(shared["state"], "closed", "{shared}");
    assert_eq!(shared["hits"], 1, "{shared}");
    assert_eq!(shared["errors"], 0, "{shared}");
    let shared = shared_health(&first).await;
    assert_eq!(
        (shared["misses"].as_u64(), shared["writes"].as_u64()),
        (Some(1), Some(1))
    );
    // The key carries the entry format version and the route namespace.
    let key = redis.key_ending("/a.png");
    assert!(key.starts_with("imgedge:v1:image-proxy http://"), "{key}");
}

#[tokio::test]
async fn every_write_sets_an_expiry_of_remaining_freshness_plus_stale_retention() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route(
        "/a.png",
        Reply::pattern(1_000).header("Cache-Control", "max-age=60"),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        &format!(
            "[cache]\nstale_retention = \"10m\"\n[cache.shared]\nurl = \"{}\"\ntimeout = \"1s\"",
            redis.url()
        ),
    )
    .await;
    proxy.get_image(&origin.url("/a.png")).await;
    let set = redis.wait_for("SET", 1).await;
    assert_eq!(set[0][3].to_ascii_uppercase(), "PX", "{:?}", set[0]);
    let px: u64 = set[0][4].parse().unwrap();
    assert!((658_000..=660_000).contains(&px), "PX {px}");
}

#[tokio::test]
async fn objects_over_max_object_bytes_are_not_written() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/big.png", Reply::pattern(5_000));
    origin.route("/small.png", Reply::pattern(500));
    let proxy = proxy(&origin, &redis.url(), "max_object_bytes = 2000").await;
    proxy.get_image(&origin.url("/big.png")).await;
    proxy.get_image(&origin.url("/small.png")).await;
    // Writes go in order: once the small one is in, the big one was declined.
    let set = redis.wait_for("SET", 1).await;
    assert!(set[0][1].ends_with("/small.png"), "{set:?}");
    assert_eq!(redis.seen("SET").len(), 1);
    assert_eq!(shared_health(&proxy).await["writes"], 1);
}

#[tokio::test]
async fn a_corrupt_value_is_a_miss_and_is_deleted() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(3_000));
    let first = proxy(&origin, &redis.url(), "").await;
    first.get_image(&origin.url("/a.png")).await;
    redis.wait_for("SET", 1).await;
    let key = redis.key_ending("/a.png");
    // One byte of the body flipped: the CRC32 no longer matches.
    redis.data.lock().unwrap().get_mut(&key).unwrap()[200] ^= 0x01;

    let second = proxy(&origin, &redis.url(), "").await;
    wait_for_state(&second, "closed", Duration::from_secs(3)).await;
    let got = second.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, pattern(3_000));
    assert!(
        !got.cache_status().contains("hit"),
        "{}",
        got.cache_status()
    );
    assert_eq!(origin.hits("/a.png"), 2);
    let del = redis.wait_for("DEL", 1).await;
    assert_eq!(del[0][1], key.chars().take(64).collect::<String>());
    assert_eq!(shared_health(&second).await["misses"], 1);
}

#[tokio::test]
async fn a_stalled_redis_costs_a_request_at_most_the_timeout_then_the_breaker_opens_and_closes() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    let proxy = proxy(&origin, &redis.url(), "timeout = \"50ms\"").await;
    wait_for_state(&proxy, "closed", Duration::from_secs(3)).await;
    redis.set_mode(Mode::Stall);
    for i in 0..5 {
        let path = format!("/stall-{i}.png");
        origin.route(&path, Reply::pattern(1_000));
        let started = Instant::now();
        let got = proxy.get_image(&origin.url(&path)).await;
        let took = started.elapsed();
        assert_eq!(got.status, 200);
        assert_eq!(got.body, pattern(1_000));
        // 50 ms of timeout, and a debug build's margin.
        assert!(
            took < Duration::from_millis(250),
            "request {i} took {took:?}"
        );
    }
    let shared = shared_health(&proxy).await;
    assert_eq!(shared["state"], "open", "{shared}");
    assert!(shared["errors"].as_u64().unwrap() >= 5, "{shared}");
    // While open, Redis is not asked at all.
    let asked = redis.commands.lock().unwrap().len();
    origin.route("/open.png", Reply::pattern(1_000));
    let started = Instant::now();
    assert_eq!(proxy.get_image(&origin.url("/open.png")).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(redis.commands.lock().unwrap().len() <= asked + 1);

    // Redis recovers: after the back-off a probe closes the breaker.
    redis.set_mode(Mode::Correct);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    loop {
        i += 1;
        let path = format!("/probe-{i}.png");
        origin.route(&path, Reply::pattern(100));
        assert_eq!(proxy.get_image(&origin.url(&path)).await.status, 200);
        if shared_health(&proxy).await["state"] == "closed" {
            break;
        }
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_that_answers_garbage_or_hangs_up_is_a_miss_and_opens_the_breaker() {
    for mode in [Mode::Garbage, Mode::Close] {
        let redis = FakeRedis::start(Mode::Correct).await;
        let origin = TestOrigin::start().await;
        let proxy = proxy(&origin, &redis.url(), "").await;
        wait_for_state(&proxy, "closed", Duration::from_secs(3)).await;
        redis.set_mode(mode);
        for i in 0..8 {
            let path = format!("/{i}.png");
            origin.route(&path, Reply::pattern(700));
            let started = Instant::now();
            let got = proxy.get_image(&origin.url(&path)).await;
            assert_eq!(got.status, 200, "{mode:?}");
            assert_eq!(got.body, pattern(700), "{mode:?}");
            // The timeout (50 ms), and a loaded debug build's margin: a hung-up connection is
            // re-made inside the call, which the timeout also bounds.
            let took = started.elapsed();
            assert!(took < Duration::from_millis(450), "{mode:?}: {took:?}");
        }
        let shared = shared_health(&proxy).await;
        assert_eq!(shared["state"], "open", "{mode:?}: {shared}");
        assert!(
            shared["errors"].as_u64().unwrap() >= 1,
            "{mode:?}: {shared}"
        );
    }
}

#[tokio::test]
async fn an_absent_redis_at_startup_leaves_the_tier_open_and_serving_goes_on() {
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", free.local_addr().unwrap());
    drop(free);
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(1_000));
    let proxy = proxy(&origin, &url, "").await;
    wait_for_state(&proxy, "open", Duration::from_secs(3)).await;
    let got = proxy.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, pattern(1_000));
}

#[tokio::test]
async fn health_and_metrics_show_the_tier_off_without_a_url() {
    let origin = TestOrigin::start().await;
    let proxy = TestProxy::for_origin(&origin, "").await;
    let shared = shared_health(&proxy).await;
    assert_eq!(shared["state"], "off", "{shared}");
    assert_eq!(shared["enabled"], false, "{shared}");
    for field in ["hits", "misses", "errors"] {
        assert_eq!(shared[field], 0, "{field}: {shared}");
    }
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("imgedge_shared_breaker_state -1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_show_the_breaker_state_and_the_shared_lookups() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(1_000));
    let proxy = proxy(&origin, &redis.url(), "").await;
    wait_for_state(&proxy, "closed", Duration::from_secs(3)).await;
    proxy.get_image(&origin.url("/a.png")).await;
    let metrics = proxy.get("/metrics").await.text();
    for line in [
        "imgedge_shared_breaker_state 0",
        "imgedge_shared_events{event=\"misses\"} 1",
        "imgedge_cache_requests_total{tier=\"shared\",result=\"miss\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[test]
fn bad_shared_values_are_startup_errors_naming_the_key() {
    for (toml, key) in [
        (
            "[cache.shared]\nurl = \"http://localhost:6379\"",
            "cache.shared.url",
        ),
        ("[cache.shared]\nurl = \"redis://\"", "cache.shared.url"),
        (
            "[cache.shared]\nmax_object_bytes = 0",
            "cache.shared.max_object_bytes",
        ),
        ("[cache.shared]\ntimeout = \"soon\"", "cache.shared.timeout"),
        ("[cache.shared]\ntimeout = \"0s\"", "cache.shared.timeout"),
        (
            "[cache.shared]\nurls = \"redis://a\"",
            "cache.shared.urls: unknown key",
        ),
    ] {
        let e = imgedge::Config::from_toml(toml).unwrap_err().to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    let ok = imgedge::Config::from_toml(
        "[cache.shared]\nurl = \"redis://10.0.0.1:7000, redis://10.0.0.2:7000\"",
    )
    .unwrap();
    assert_eq!(ok.cache.shared.urls.len(), 2);
    assert!(!format!("{ok:?}").contains("10.0.0.1"));
}

#[tokio::test]
async fn a_value_larger_than_max_object_bytes_is_never_read_whole_and_is_deleted() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(1_000));
    let proxy = proxy(&origin, &redis.url(), "max_object_bytes = 4000").await;
    wait_for_state(&proxy, "closed", Duration::from_secs(3)).await;
    // Written by something else: 10 000 bytes under the key imgedge would read.
    let key = format!("imgedge:v1:image-proxy {}", origin.url("/a.png"));
    redis
        .data
        .lock()
        .unwrap()
        .insert(key.clone(), vec![0; 10_000]);
    let got = proxy.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.body, pattern(1_000));
    assert_eq!(origin.hits("/a.png"), 1);
    let range = redis.wait_for("GETRANGE", 1).await;
    assert_eq!(range[0][3], "3999", "{range:?}");
    redis.wait_for("DEL", 1).await;
}

#[tokio::test]
async fn a_shared_read_reserves_its_buffer_in_the_fill_pool_and_is_a_miss_without_room() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    origin.route("/a.png", Reply::pattern(2_000));
    let writer = proxy(&origin, &redis.url(), "").await;
    writer.get_image(&origin.url("/a.png")).await;
    redis.wait_for("SET", 1).await;

    // A fill pool of 500 KB cannot hold a read of up to 1 MiB: a miss, from the origin.
    let fill_pool = "[memory]\ninflight_fill_bytes = 500000";
    let tight = proxy(&origin, &redis.url(), fill_pool).await;
    wait_for_state(&tight, "closed", Duration::from_secs(3)).await;
    let got = tight.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.body, pattern(2_000));
    assert!(
        !got.cache_status().contains("hit"),
        "{}",
        got.cache_status()
    );
    assert_eq!(origin.hits("/a.png"), 2);
    assert_eq!(shared_health(&tight).await["misses"], 1);

    // Reads of up to 400 KB fit: a hit.
    let fits = proxy(
        &origin,
        &redis.url(),
        &format!("max_object_bytes = 400000\n{fill_pool}"),
    )
    .await;
    wait_for_state(&fits, "closed", Duration::from_secs(3)).await;
    let got = fits.get_image(&origin.url("/a.png")).await;
    assert_eq!(got.cache_status(), "imgedge; hit; detail=shared");
    assert_eq!(origin.hits("/a.png"), 2);
}

#[tokio::test]
async fn concurrent_requests_on_a_stalled_redis_each_cost_at_most_the_timeout() {
    let redis = FakeRedis::start(Mode::Correct).await;
    let origin = TestOrigin::start().await;
    let proxy = proxy(&origin, &redis.url(), "timeout = \"50ms\"").await;
    wait_for_state(&proxy, "closed", Duration::from_secs(3)).await;
    redis.set_mode(Mode::Stall);
    // Twice the seam's 8 concurrent reads. The seam bounds a lookup's wait for a read permit by
    // the timeout too; without that the second 8 would wait one more timeout (the breaker opens
    // once the first 8 fail), which this bound does not tell apart on a loaded debug build.
    let requests = (0..16).map(|i| {
        let path = format!("/c-{i}.png");
        origin.route(&path, Reply::pattern(500));
        let url = proxy.image_url(&origin.url(&path));
        let client = proxy.client.clone();
        async move {
            let started = Instant::now();
            let status = client.get(url).send().await.unwrap().status();
            (status, started.elapsed())
        }
    });
    for (status, took) in futures_join(requests).await {
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(450), "took {took:?}");
    }
}

/// Runs `futures` concurrently on this task and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs = Vec::new();
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut done: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        done[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.extend(done.into_iter().map(|v| v.expect("every future finished")));
    outputs
}
