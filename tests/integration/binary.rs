//! The real `imgedge` binary as a subprocess: its command line, its logs, and its memory under
//! slow clients (RSS read from /proc, not inside the test process).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::binary::*;
use crate::support::*;
use bytes::Bytes;

#[tokio::test]
async fn invalid_configuration_exits_non_zero_naming_every_bad_field() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .arg("--check-config")
        .env("IMGEDGE_SERVER__LISTEN", "nowhere")
        .env("IMGEDGE_UPSTREAM__IDLE_TIMEOUT", "10 fortnights")
        .env("IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES", "lots")
        .env("IMGEDGE_CACHE__COLOUR", "blue")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "server.listen",
        "upstream.idle_timeout",
        "cache.memory_capacity_bytes",
        "cache.colour",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    let ok = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .arg("--check-config")
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .args(["--check-config", "--config", "/nonexistent/imgedge.toml"])
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    // One problem, naming the file by its full path; not one per key.
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.matches("\n  - ").count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/imgedge.toml: cannot read"),
        "{err}"
    );
    let dir = TempDir::new("bad-toml");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("imgedge.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_url_bytes = [\n",
    )
    .unwrap();
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .args(["--check-config", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.matches("\n  - ").count(), 1, "{err}");
    assert!(err.contains("not valid TOML at line 4"), "{err}");
}

/// `--check-config` prints the configuration in effect as TOML that reads back, every source
/// applied, secrets masked.
#[tokio::test]
async fn check_config_prints_the_effective_configuration_with_secrets_masked() {
    let (token, key) = (
        "an-admin-token-of-some-length",
        "00112233445566778899aabbccddeeff",
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
        .arg("--check-config")
        .env("IMGEDGE_SERVER__LISTEN", "0.0.0.0:9999")
        .env("IMGEDGE_ADMIN__TOKEN", token)
        .env("IMGEDGE_SIGNING__KEYS", format!("[\"{key}\"]"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains(token) && !text.contains(key),
        "a secret printed:\n{text}"
    );
    let effective: toml::Table = text.parse().unwrap();
    assert_eq!(effective["server"]["listen"].as_str(), Some("0.0.0.0:9999"));
    assert_eq!(effective["cache"]["default_ttl"].as_str(), Some("1h"));
    assert_eq!(
        effective["admin"]["token"].as_str(),
        Some("(set, not shown)")
    );
}

/// `imgedge healthcheck` (the container's HEALTHCHECK) exits 0 while the server it is pointed at
/// (through the same configuration) answers `/health/live`, and 1 once it is gone.
#[tokio::test]
async fn the_healthcheck_command_follows_the_server() {
    let bin = Binary::start(&[]).await;
    let listen = bin.base.trim_start_matches("http://").to_owned();
    let check = |listen: String| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"))
            .arg("healthcheck")
            .env("IMGEDGE_SERVER__LISTEN", listen)
            .output()
    };
    let up = check(listen.clone()).await.unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    // An unspecified address (the container's 0.0.0.0) is asked on loopback.
    let port = listen.rsplit_once(':').unwrap().1;
    let any = check(format!("0.0.0.0:{port}")).await.unwrap();
    assert!(
        any.status.success(),
        "{}",
        String::from_utf8_lossy(&any.stderr)
    );
    bin.stop().await;
    let down = check(listen).await.unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("/health/live"));
}

/// `imgedge sign` prints a path the server (with the same key) accepts, and refuses to run
/// without a key.
#[tokio::test]
async fn the_sign_command_prints_a_path_the_server_accepts() {
    let key = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let origin = TestOrigin::start().await;
    // a real image: the signed `w=300` is a transform parameter
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(600, 400)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    origin.route("/s.jpg", Reply::ok(png.into_inner()));
    let sign = |key: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge"));
        command.args(["sign", &origin.url("/s.jpg"), "--param", "w=300"]);
        if let Some(key) = key {
            command.env("IMGEDGE_SIGNING__KEYS", key);
        }
        command.output()
    };
    let out = sign(Some(key)).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        path.starts_with("/image-proxy?url=") && path.contains("&w=300&s="),
        "{path}"
    );
    let none = sign(None).await.unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("signing"));

    let bin = Binary::start(&[
        ("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string()),
        (
            "IMGEDGE_UPSTREAM__ALLOWED_CONTENT_TYPES",
            TEST_CONTENT_TYPES.to_owned(),
        ),
        (
            "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS",
            origin.addr.to_string(),
        ),
        ("IMGEDGE_SIGNING__KEYS", key.to_owned()),
    ])
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = send(&client, Method::GET, &format!("{}{path}", bin.base), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let thumbnail = image::load_from_memory(&r.body).unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (300, 200));
    let unsigned = path.rsplit_once("&s=").unwrap().0;
    let r = send(
        &client,
        Method::GET,
        &format!("{}{unsigned}", bin.base),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.error_code()),
        (403, "bad_signature".to_owned())
    );
    bin.stop().await;
}

#[tokio::test]
async fn logs_a_line_per_request_and_per_stored_or_too_large_object() {
    let origin = TestOrigin::start().await;
    origin.route("/small.jpg", Reply::ok(vec![1u8; 1000]));
    origin.route("/large.jpg", Reply::ok(vec![2u8; 3000]));
    let bin = Binary::start(&[
        ("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string()),
        (
            "IMGEDGE_UPSTREAM__ALLOWED_CONTENT_TYPES",
            TEST_CONTENT_TYPES.to_owned(),
        ),
        (
            "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS",
            origin.addr.to_string(),
        ),
        ("IMGEDGE_CACHE__MAX_CACHEABLE_BYTES", "2000".into()),
        ("IMGEDGE_LOG__FORMAT", "json".into()),
    ])
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut ids = Vec::new();
    for path in ["/small.jpg", "/small.jpg", "/large.jpg"] {
        let url = format!("{}/image-proxy?url={}", bin.base, origin.url(path));
        ids.push(
            send(&client, Method::GET, &url, &[])
                .await
                .header("x-request-id"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = bin.stop().await;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |message: &str, id: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message && l["span"]["id"] == id)
            .unwrap_or_else(|| panic!("no {message:?} line for request {id} in:\n{out}"))
            .clone()
    };
    let stored = find("stored", &ids[0]);
    assert_eq!(stored["fields"]["size_bytes"], 1000);
    let too_large = find("too large to store", &ids[2]);
    assert_eq!(too_large["fields"]["size_bytes"], 3000);
    for (id, cache) in ids.iter().zip([
        "imgedge; fwd=uri-miss; stored",
        "imgedge; hit; detail=memory",
        "imgedge; fwd=uri-miss; detail=too-large",
    ]) {
        let done = find("done", id);
        assert_eq!(done["fields"]["status"], 200);
        assert_eq!(done["fields"]["outcome"], "complete", "{done}");
        assert_eq!(done["span"]["route"], "image-proxy");
        assert_eq!(done["span"]["cache"], cache);
        assert!(done["fields"]["duration_ms"].is_string());
    }
    assert_eq!(find("done", &ids[0])["span"]["upstream_status"], 200);
    assert_eq!(find("done", &ids[2])["fields"]["bytes"], 3000);
}

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

    let bin = Binary::start(&[
        ("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string()),
        (
            "IMGEDGE_UPSTREAM__ALLOWED_CONTENT_TYPES",
            TEST_CONTENT_TYPES.to_owned(),
        ),
        (
            "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS",
            origin.addr.to_string(),
        ),
        ("IMGEDGE_UPSTREAM__IDLE_TIMEOUT", "60s".into()),
        (
            "IMGEDGE_UPSTREAM__MAX_OBJECT_BYTES",
            (2 * BODY_BYTES).to_string(),
        ),
        ("IMGEDGE_LOG__LEVEL", "warn".into()),
    ])
    .await;
    let (pid, base) = (bin.pid(), bin.base.clone());
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let small = format!("{base}/image-proxy?url={}", origin.url("/small.jpg"));
    send(&client, Method::GET, &small, &[]).await;
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
    bin.stop().await;
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

async fn metrics(base: &str) -> String {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    send(&client, Method::GET, &format!("{base}/metrics"), &[])
        .await
        .text()
}

/// Waits until the disk tier has written `n` entries.
async fn wait_for_disk_writes(base: &str, n: u64) {
    for _ in 0..200 {
        if health(base).await["cache"]["disk"]["writes"]
            .as_u64()
            .unwrap_or(0)
            >= n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the disk tier did not write {n} entries: {}",
        health(base).await
    );
}

fn disk_env(origin: &TestOrigin, dir: &TempDir) -> Vec<(&'static str, String)> {
    let mut env = origin_env(origin);
    env.extend([
        ("IMGEDGE_UPSTREAM__IDLE_TIMEOUT", "60s".into()),
        ("IMGEDGE_CACHE__DISK_DIR", dir.0.display().to_string()),
        (
            "IMGEDGE_CACHE__DISK_CAPACITY_BYTES",
            (256u64 << 20).to_string(),
        ),
        ("IMGEDGE_LOG__LEVEL", "warn".into()),
    ]);
    env
}

#[tokio::test]
async fn objects_survive_kill_9_and_come_back_from_disk_then_memory() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a.jpg",
        Reply::pattern(300_000).header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/b.png",
        Reply::pattern(200_000)
            .chunked()
            .header("Cache-Control", "max-age=600"),
    );
    let dir = TempDir::new("disk-restart");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    for path in ["/a.jpg", "/b.png"] {
        let url = format!("{}/image-proxy?url={}", bin.base, origin.url(path));
        send(&client, Method::GET, &url, &[]).await;
    }
    wait_for_disk_writes(&bin.base, 2).await;
    let disk = &health(&bin.base).await["cache"]["disk"];
    assert_eq!(disk["entries"], 2, "{disk}");
    let bytes = disk["bytes"].as_u64().unwrap();
    assert!((500_000..510_000).contains(&bytes), "{disk}");
    bin.stop().await; // SIGKILL

    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    for (path, len) in [("/a.jpg", 300_000), ("/b.png", 200_000)] {
        let url = format!("{}/image-proxy?url={}", bin.base, origin.url(path));
        for expected in ["imgedge; hit; detail=disk", "imgedge; hit; detail=memory"] {
            let r = send(&client, Method::GET, &url, &[]).await;
            assert_eq!(r.cache_status(), expected, "{path}");
            assert_eq!(r.body, pattern(len), "{path}");
        }
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    bin.stop().await;
}

#[tokio::test]
async fn after_kill_9_during_fills_only_complete_objects_are_served() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    for i in 0..10 {
        origin.route(
            &format!("/done{i}.jpg"),
            Reply::pattern(150_000 + i).header("Cache-Control", "max-age=600"),
        );
        // Never completes before the kill: the origin holds back the rest of the body.
        origin.route(
            &format!("/half{i}.jpg"),
            Reply::pattern(150_000 + i)
                .header("Cache-Control", "max-age=600")
                .fault(Fault::GateAfter(70_000, gate.clone())),
        );
    }
    let dir = TempDir::new("disk-kill");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let mut half = Vec::new();
    for i in 0..10 {
        let url = format!(
            "{}/image-proxy?url={}",
            bin.base,
            origin.url(&format!("/done{i}.jpg"))
        );
        send(&client, Method::GET, &url, &[]).await;
        let url = format!(
            "{}/image-proxy?url={}",
            bin.base,
            origin.url(&format!("/half{i}.jpg"))
        );
        let mut r = client.get(&url).send().await.unwrap();
        r.chunk().await.unwrap();
        half.push(r);
    }
    wait_for_disk_writes(&bin.base, 10).await;
    bin.stop().await; // SIGKILL with ten fills in flight
    drop(half);

    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    for i in 0..10u64 {
        origin.route(
            &format!("/half{i}.jpg"),
            Reply::pattern(150_000 + i).header("Cache-Control", "max-age=600"),
        );
        for (path, cached) in [
            (format!("/done{i}.jpg"), true),
            (format!("/half{i}.jpg"), false),
        ] {
            let url = format!("{}/image-proxy?url={}", bin.base, origin.url(&path));
            let r = send(&client, Method::GET, &url, &[]).await;
            let status = r.cache_status();
            assert_eq!(
                status == "imgedge; hit; detail=disk",
                cached,
                "{path}: {status}"
            );
            assert_eq!(r.body, pattern(150_000 + i), "{path}");
        }
    }
    bin.stop().await;
}

/// SIGTERM while a burst of fills is in flight: the fills complete (the connections drain), the
/// disk writes they queued are flushed before the process exits, and after a restart every one
/// of those objects is a disk hit. The origin holds back the second half of every body until
/// after the signal and then sends them all at once, so the writes queue up together just as
/// the connections close.
#[tokio::test]
async fn after_sigterm_during_a_burst_of_fills_every_object_comes_back_from_disk() {
    const OBJECTS: u64 = 60;
    const LEN: u64 = 256 << 10;
    let origin = TestOrigin::start().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let dir = TempDir::new("disk-sigterm");
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let url = |base: &str, i: u64| {
        format!(
            "{base}/image-proxy?url={}",
            origin.url(&format!("/burst{i}.jpg"))
        )
    };
    let mut fills = Vec::new();
    for i in 0..OBJECTS {
        origin.route(
            &format!("/burst{i}.jpg"),
            Reply::pattern(LEN + i)
                .header("Cache-Control", "max-age=600")
                .fault(Fault::GateAfter(LEN / 2, gate.clone())),
        );
        let url = url(&bin.base, i);
        fills.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            send(&client, Method::GET, &url, &[]).await
        }));
    }
    // Every body is half sent, held at the gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..OBJECTS).any(|i| origin.hits(&format!("/burst{i}.jpg")) == 0) {
        assert!(
            Instant::now() < deadline,
            "the burst did not reach the origin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = bin.pid().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Opened for every body at once; again every 20 ms for any that reached the gate late.
    let opener = tokio::spawn({
        let gate = gate.clone();
        async move {
            loop {
                gate.notify_waiters();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    for (i, fill) in fills.into_iter().enumerate() {
        let r = fill.await.unwrap();
        assert_eq!(r.status, 200, "/burst{i}.jpg");
        assert_eq!(
            r.cache_status(),
            "imgedge; fwd=uri-miss; stored",
            "/burst{i}.jpg"
        );
        assert_eq!(r.body.len() as u64, LEN + i as u64, "/burst{i}.jpg");
    }
    opener.abort();
    let status = bin.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");

    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut missing = Vec::new();
    for i in 0..OBJECTS {
        let r = send(&client, Method::GET, &url(&bin.base, i), &[]).await;
        assert_eq!(r.body, pattern(LEN + i), "/burst{i}.jpg");
        if r.cache_status() != "imgedge; hit; detail=disk" {
            missing.push(i);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {OBJECTS} objects not found on disk after the restart: {missing:?}",
        missing.len()
    );
    bin.stop().await;
}

#[tokio::test]
async fn an_unusable_disk_dir_costs_the_disk_tier_not_the_service() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/c.jpg",
        Reply::ok("still served").header("Cache-Control", "max-age=600"),
    );
    let dir = TempDir::new("disk-file");
    std::fs::write(&dir.0, b"a file where a directory should be").unwrap();
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/image-proxy?url={}", bin.base, origin.url("/c.jpg"));
    for expected in [
        "imgedge; fwd=uri-miss; stored",
        "imgedge; hit; detail=memory",
    ] {
        let r = send(&client, Method::GET, &url, &[]).await;
        assert_eq!(r.cache_status(), expected);
        assert_eq!(r.text(), "still served");
    }
    assert_eq!(health(&bin.base).await["cache"]["disk"]["enabled"], false);
    let log = bin.stop().await;
    assert!(log.contains("disk tier unavailable"), "{log}");
    let _ = std::fs::remove_file(&dir.0);
}

#[tokio::test]
async fn corrupted_disk_files_never_serve_a_damaged_byte() {
    let origin = TestOrigin::start().await;
    for i in 0..8u64 {
        origin.route(
            &format!("/k{i}.jpg"),
            Reply::pattern(120_000 + i).header("Cache-Control", "max-age=600"),
        );
    }
    let dir = TempDir::new("disk-corrupt");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    for i in 0..8 {
        let url = format!(
            "{}/image-proxy?url={}",
            bin.base,
            origin.url(&format!("/k{i}.jpg"))
        );
        send(&client, Method::GET, &url, &[]).await;
    }
    wait_for_disk_writes(&bin.base, 8).await;
    bin.stop().await;

    // Flip a byte every 4 KiB across every data file: headers, bodies, indexes.
    let mut flipped = 0;
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let mut data = std::fs::read(&path).unwrap();
        for i in (1000..data.len()).step_by(4096) {
            data[i] ^= 0x5a;
            flipped += 1;
        }
        std::fs::write(&path, data).unwrap();
    }
    assert!(flipped > 0, "no data files found in {}", dir.0.display());

    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    for i in 0..8u64 {
        let url = format!(
            "{}/image-proxy?url={}",
            bin.base,
            origin.url(&format!("/k{i}.jpg"))
        );
        let r = send(&client, Method::GET, &url, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, pattern(120_000 + i), "/k{i}.jpg");
    }
    let refetched: usize = (0..8)
        .map(|i| origin.hits(&format!("/k{i}.jpg")))
        .sum::<usize>()
        - 8;
    assert!(
        refetched > 0,
        "the corruption hit no stored entry: the test proves nothing"
    );
    let metrics = metrics(&bin.base).await;
    assert!(
        metrics.contains("imgedge_disk_events{event=\"writes\"}"),
        "{metrics}"
    );
    bin.stop().await;
}

/// The real binary on a small budget (64 MiB, levels pulled down so a test-sized load reaches
/// them) under concurrent clients over 96 objects of 1 MiB: 32 clients until responses bypass
/// the tier (and it has evicted), then 96 more until requests are shed with 503, for at least
/// 5 s in all; /health answers every probe throughout.
#[tokio::test]
async fn a_small_budget_under_load_evicts_bypasses_and_sheds_with_health_answering() {
    const OBJECTS: usize = 96;
    const OBJECT_BYTES: u64 = 1 << 20;
    let origin = TestOrigin::start().await;
    for i in 0..OBJECTS {
        origin.route(
            &format!("/o{i}.jpg"),
            Reply::pattern(OBJECT_BYTES).header("Cache-Control", "max-age=600"),
        );
    }
    // The levels below sit a few MiB above the idle RSS of a debug build, which grows with the
    // binary (codecs added 3.5 MiB): the budget puts idle at 37% of it, under evicting (40%).
    let idle = {
        let probe = Binary::start(&[("IMGEDGE_LOG__LEVEL", "warn".into())]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_bytes(probe.pid());
        probe.stop().await;
        rss
    };
    let budget = (idle as f64 / 0.37) as u64;
    let bin = Binary::start(&[
        ("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string()),
        (
            "IMGEDGE_UPSTREAM__ALLOWED_CONTENT_TYPES",
            TEST_CONTENT_TYPES.to_owned(),
        ),
        (
            "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS",
            origin.addr.to_string(),
        ),
        ("IMGEDGE_LOG__LEVEL", "warn".into()),
        ("IMGEDGE_MEMORY__BUDGET_BYTES", budget.to_string()),
        ("IMGEDGE_MEMORY__SAMPLE_INTERVAL", "50ms".into()),
        ("IMGEDGE_MEMORY__EVICT_TO", "0.30".into()),
        ("IMGEDGE_MEMORY__EVICTING", "0.40".into()),
        ("IMGEDGE_MEMORY__WARNING", "0.42".into()),
        ("IMGEDGE_MEMORY__BYPASS", "0.44".into()),
        ("IMGEDGE_MEMORY__CRITICAL", "0.47".into()),
        // Fills are never refused a reservation here, so `detail=memory-pressure` means bypass.
        (
            "IMGEDGE_MEMORY__INFLIGHT_FILL_BYTES",
            (1u64 << 30).to_string(),
        ),
        (
            "IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES",
            (32u64 << 20).to_string(),
        ),
    ])
    .await;
    let base = bin.base.clone();
    // Objects fetched one at a time first, so that some are stored before the load pushes RSS
    // past the bypass line (on a busy machine that can happen before a single concurrent fill
    // completes, leaving eviction nothing to evict): the idle RSS of a debug build is within a
    // few MiB of these thresholds.
    let warm_client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut stored = 0;
    for i in 0..3 {
        let url = format!("{base}/image-proxy?url=http://{}/o{i}.jpg", origin.addr);
        let r = send(&warm_client, Method::GET, &url, &[]).await;
        stored += usize::from(r.cache_status() == "imgedge; fwd=uri-miss; stored");
    }
    assert!(stored > 0, "nothing stored below the bypass line");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(40);
    // Load goes on at least this long, so /health is probed through every stage.
    let at_least = started + Duration::from_secs(5);

    // /health every 50 ms, each answered (200 or 503) within 2 s. On a thread and runtime of
    // its own: this test's runtime also runs the origin and the 128 clients, and on a busy
    // machine a probe waiting there for its turn measured them, not imgedge.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = std::thread::spawn({
        let (base, stop) = (base.clone(), stop.clone());
        let probe = async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let (mut answered, mut max_rss) = (0u32, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.get(format!("{base}/health")).send().await;
                let r = r.expect("/health did not answer");
                let status = r.status().as_u16();
                assert!(status == 200 || status == 503, "/health answered {status}");
                let health: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap())
                    .expect("/health answered JSON");
                max_rss = max_rss.max(health["memory"]["rss_bytes"].as_u64().unwrap());
                answered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (answered, max_rss)
        };
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(probe)
        }
    });

    #[derive(Default)]
    struct Seen {
        bypassed: u32,
        shed: u32,
        ok: u32,
    }
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let mut clients = Vec::new();
    for c in 0..128usize {
        let (base, seen, origin_addr) = (base.clone(), seen.clone(), origin.addr);
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut i = c * 3;
            while Instant::now() < deadline {
                let (phase_one_done, done) = {
                    let s = seen.lock().unwrap();
                    let phase_one_done = s.bypassed > 0 && (s.ok > 100 || s.shed > 0);
                    (
                        phase_one_done,
                        phase_one_done && s.shed > 0 && Instant::now() > at_least,
                    )
                };
                if done {
                    break;
                }
                if c >= 32 && !phase_one_done {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let url = format!(
                    "{base}/image-proxy?url=http://{origin_addr}/o{}.jpg",
                    i % OBJECTS
                );
                i += 1;
                let r = send(&client, Method::GET, &url, &[]).await;
                if r.status == 503 {
                    assert_eq!(r.error_code(), "overloaded");
                    seen.lock().unwrap().shed += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                assert_eq!(r.status, 200, "only 200 and 503 answers");
                assert_eq!(r.body.len() as u64, OBJECT_BYTES);
                let mut s = seen.lock().unwrap();
                s.ok += 1;
                s.bypassed += u32::from(r.cache_status().ends_with("detail=memory-pressure"));
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, max_rss) = tokio::task::spawn_blocking(move || prober.join().unwrap())
        .await
        .unwrap();
    let metrics = metrics(&base).await;
    let counter = |line: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (ok, bypassed, shed) = {
        let s = seen.lock().unwrap();
        (s.ok, s.bypassed, s.shed)
    };
    let evicted = counter("imgedge_memory_relief_total{action=\"evicted_entries\"}");
    eprintln!(
        "answered {answered} health probes (max RSS {max_rss}); {ok} ok, {bypassed} bypassed, {shed} shed; {evicted} entries evicted"
    );
    // On a busy machine RSS can pass from below evicting to critical within one 50 ms sample:
    // then the tier is cleared before eviction has anything to evict. Either gives memory back.
    let cleared = counter("imgedge_memory_relief_total{action=\"cleared\"}");
    assert!(
        evicted > 0 || cleared > 0,
        "the memory tier gave nothing back:\n{metrics}"
    );
    assert!(bypassed > 0, "no bypass:\n{metrics}");
    assert!(shed > 0, "no shedding:\n{metrics}");
    assert!(answered >= 10, "{answered} /health probes");
    bin.stop().await;
}

/// Peak RSS (`VmHWM`) of process `pid`, in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A real PNG of 2000 × 1250 black RGBA pixels (10 MB of them, about 10 KB compressed), its
/// header rewritten to claim 100 000 × 100 000: 40 GB of pixels if anything believed it.
fn png_bomb() -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut png = Vec::new();
    PngEncoder::new_with_quality(&mut png, CompressionType::Best, FilterType::NoFilter)
        .write_image(
            &vec![0; 2000 * 1250 * 4],
            2000,
            1250,
            image::ExtendedColorType::Rgba8,
        )
        .unwrap();
    // IHDR: length (4), "IHDR" (4), width (4), height (4), 5 more bytes, then its CRC
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_bomb_is_refused_in_under_100_ms_without_growing_rss() {
    let origin = TestOrigin::start().await;
    let bomb = png_bomb();
    assert!((5_000..40_000).contains(&bomb.len()), "{}", bomb.len());
    origin.route("/bomb.png", Reply::ok(bomb));
    origin.route("/warm.png", Reply::ok(small_png(64, 64)));
    let mut env = origin_env(&origin);
    env.push(("IMGEDGE_LOG__LEVEL", "warn".into()));
    let bin = Binary::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // warm: a real transform, so that pool threads and allocator arenas exist before measuring
    let warm = format!(
        "{}/image-proxy?w=10&url={}",
        bin.base,
        origin.url("/warm.png")
    );
    assert_eq!(send(&client, Method::GET, &warm, &[]).await.status, 200);
    let url = format!(
        "{}/image-proxy?w=100&url={}",
        bin.base,
        origin.url("/bomb.png")
    );
    let before = peak_rss_bytes(bin.pid());
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let got = send(&client, Method::GET, &url, &[]).await;
        took.push(start.elapsed());
        assert_eq!(got.status, 422, "{}", got.text());
        assert_eq!(got.error_code(), "image_too_large");
    }
    let grown = peak_rss_bytes(bin.pid()).saturating_sub(before);
    took.sort();
    // the median of five: the source is fetched once, then read from the tier; each refusal
    // is a header read
    assert!(took[2] < Duration::from_millis(100), "{took:?}");
    // a decode would have inflated the 10 MB of rows at least
    assert!(grown < 4 << 20, "peak RSS grew by {grown} bytes");
    bin.stop().await;
}

/// A real PNG of `width` × `height` black RGBA pixels, for warming up.
fn small_png(width: u32, height: u32) -> Vec<u8> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbaImage::new(width, height)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    png.into_inner()
}

#[tokio::test]
async fn renditions_and_source_records_survive_kill_9_in_the_disk_tier() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cat.png",
        Reply::ok(small_png(300, 200))
            .header("Cache-Control", "max-age=600")
            .header("ETag", "\"c1\""),
    );
    let dir = TempDir::new("disk-renditions");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let url = |base: &str| format!("{base}/image-proxy?w=40&url={}", origin.url("/cat.png"));
    let first = send(&client, Method::GET, &url(&bin.base), &[]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        first.cache_status(),
        "imgedge; fwd=uri-miss; stored; detail=transform"
    );
    // the source, its record and the rendition
    wait_for_disk_writes(&bin.base, 3).await;
    bin.stop().await; // SIGKILL

    let bin = Binary::start(&disk_env(&origin, &dir)).await;
    let again = send(&client, Method::GET, &url(&bin.base), &[]).await;
    assert_eq!(again.cache_status(), "imgedge; hit; detail=disk");
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("etag"), first.header("etag"));
    assert!(
        !metrics(&bin.base)
            .await
            .contains("imgedge_transforms_total{outcome=\"ok\"}"),
        "transformed again after the restart"
    );
    assert_eq!(origin.hits("/cat.png"), 1);
    bin.stop().await;
}
