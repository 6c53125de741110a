//! Memory stays flat while many slow clients stream a large body: measured on the real binary's
//! RSS, from /proc, not inside the test process.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

const BODY_BYTES: usize = 64 << 20;
const CLIENTS: usize = 32;
/// Each client reads at most this fast, far slower than loopback delivers.
const CLIENT_BYTES_PER_SECOND: f64 = 8.0 * 1024.0 * 1024.0;
const MAX_GROWTH_BYTES: u64 = 16 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_slow_clients_on_a_64_mib_body_grow_rss_by_less_than_16_mib() {
    let origin = TestOrigin::start().await;
    let body = Bytes::from(pattern(BODY_BYTES as u64));
    origin.route("/huge.jpg", Reply::ok(body.clone()));
    origin.route("/small.jpg", Reply::ok("warm-up"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .env("IMGEDGE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string())
        .env("IMGEDGE_UPSTREAM__IDLE_TIMEOUT", "60s")
        .env(
            "IMGEDGE_UPSTREAM__MAX_OBJECT_BYTES",
            (2 * BODY_BYTES).to_string(),
        )
        .env("IMGEDGE_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    while client.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "imgedge did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let small = format!("{base}/image-proxy?url={}", origin.url("/small.jpg"));
    client
        .get(&small)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let baseline = rss_bytes(pid);

    let url = format!("{base}/image-proxy?url={}", origin.url("/huge.jpg"));
    let readers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut r = client.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{:?}", r.headers());
                assert_eq!(cache_status(&r), "imgedge; fwd=uri-miss; detail=too-large");
                let start = Instant::now();
                let mut offset = 0usize;
                while let Some(chunk) = r.chunk().await.unwrap() {
                    assert_eq!(
                        chunk,
                        body.slice(offset..offset + chunk.len()),
                        "at {offset}"
                    );
                    offset += chunk.len();
                    let due = Duration::from_secs_f64(offset as f64 / CLIENT_BYTES_PER_SECOND);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                offset
            })
        })
        .collect();

    let mut peak = baseline;
    while !readers.iter().all(|r| r.is_finished()) {
        peak = peak.max(rss_bytes(pid));
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "readers did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), BODY_BYTES);
    }
    let _ = child.kill().await;
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "rss baseline {} KiB, peak {} KiB, growth {} KiB over {CLIENTS} clients x {} MiB in {:.1}s",
        baseline / 1024,
        peak / 1024,
        growth / 1024,
        BODY_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    assert!(
        growth < MAX_GROWTH_BYTES,
        "RSS grew by {} KiB",
        growth / 1024
    );
}
