//! Memory pressure through the real HTTP stack, with the RSS reading injected so that every
//! level is reached deterministically.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use imgedge::rss::SetRss;

const BUDGET: u64 = 1 << 30;

async fn pressured(origin: &TestOrigin) -> (TestProxy, Arc<SetRss>) {
    let rss = Arc::new(SetRss::new(BUDGET / 10));
    let config = test_config(
        origin,
        &format!(
            "[memory]\nbudget_bytes = {BUDGET}\nsample_interval = \"10ms\"\n[cache]\nmemory_capacity_bytes = 268435456"
        ),
    );
    let proxy = TestProxy::start_with(config, Some(rss.clone())).await;
    (proxy, rss)
}

/// Sets the RSS to `fraction` of the budget and waits until /health reports `level`.
async fn set_pressure(
    proxy: &TestProxy,
    rss: &SetRss,
    fraction: f64,
    level: &str,
) -> serde_json::Value {
    rss.set((BUDGET as f64 * fraction) as u64);
    for _ in 0..200 {
        let v = proxy.get("/health").await.json();
        if v["memory"]["level"] == level {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("level {level} never reached");
}

#[tokio::test]
async fn at_bypass_responses_stream_without_being_stored_and_health_is_degraded() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a.jpg",
        Reply::ok("a").header("Cache-Control", "max-age=600"),
    );
    let (proxy, rss) = pressured(&origin).await;
    assert_eq!(proxy.get("/health/ready").await.status, 200);
    let health = set_pressure(&proxy, &rss, 0.85, "bypass").await;
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["memory"]["budget_bytes"], BUDGET);
    for _ in 0..2 {
        let r = proxy.get_image(&origin.url("/a.jpg")).await;
        assert_eq!(
            r.cache_status(),
            "imgedge; fwd=uri-miss; detail=memory-pressure"
        );
        assert_eq!(r.text(), "a");
    }
    assert_eq!(origin.hits("/a.jpg"), 2);
    set_pressure(&proxy, &rss, 0.10, "normal").await;
    let r = proxy.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
}

#[tokio::test]
async fn at_critical_proxy_requests_are_shed_the_tier_is_cleared_and_health_says_503() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/b.jpg",
        Reply::ok("b").header("Cache-Control", "max-age=600"),
    );
    let (proxy, rss) = pressured(&origin).await;
    proxy.get_image(&origin.url("/b.jpg")).await;
    assert_eq!(
        proxy.get_image(&origin.url("/b.jpg")).await.cache_status(),
        "imgedge; hit; detail=memory"
    );

    rss.set((BUDGET as f64 * 0.92) as u64);
    let mut health = None;
    for _ in 0..200 {
        let r = proxy.get("/health").await;
        if r.status == 503 {
            health = Some(r.json());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = health.expect("/health never answered 503");
    assert_eq!(proxy.get("/health/ready").await.status, 503);
    assert_eq!(proxy.get("/health/live").await.status, 200);
    assert_eq!(health["status"], "critical");
    assert_eq!(health["memory"]["level"], "critical");
    let r = proxy.get_image(&origin.url("/b.jpg")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.error_code(), "overloaded");
    let metrics = proxy.get("/metrics").await.text();
    for line in [
        "imgedge_memory_pressure_level 4",
        "imgedge_shed_total{reason=\"memory\"} 1",
        "imgedge_memory_pressure_transitions_total{to=\"critical\"} 1",
        "imgedge_memory_relief_total{action=\"cleared\"} 1",
        &format!("imgedge_memory_budget_bytes {BUDGET}"),
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }

    // Back to normal: served again, and from the origin, since critical cleared the tier.
    set_pressure(&proxy, &rss, 0.10, "normal").await;
    let r = proxy.get_image(&origin.url("/b.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(origin.hits("/b.jpg"), 2);
}

#[tokio::test]
async fn a_memory_tier_over_60_percent_of_the_budget_is_refused() {
    let err = imgedge::Config::from_toml("[memory]\nbudget_bytes = 268435456\n").unwrap_err();
    assert!(
        err.to_string().contains("60% of the memory budget"),
        "{err}"
    );
}

#[tokio::test]
async fn fills_that_cannot_reserve_their_bytes_stream_without_being_stored() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    origin.route(
        "/held.jpg",
        Reply::pattern(80_000)
            .header("Cache-Control", "max-age=600")
            .fault(Fault::GateAfter(10_000, gate.clone())),
    );
    origin.route(
        "/second.jpg",
        Reply::pattern(80_000).header("Cache-Control", "max-age=600"),
    );
    origin.route(
        "/third.jpg",
        Reply::pattern(80_000).header("Cache-Control", "max-age=600"),
    );
    let config = test_config(
        &origin,
        "[upstream]\nidle_timeout = \"30s\"\n[memory]\ninflight_fill_bytes = 100000",
    );
    let proxy = TestProxy::start(config).await;

    // The first fill reserves its 80 000 bytes and is held in flight by the origin.
    let mut held = proxy.stream_image(&origin.url("/held.jpg")).await;
    assert_eq!(cache_status(&held), "imgedge; fwd=uri-miss; stored");
    let mut body = held.chunk().await.unwrap().unwrap().to_vec();
    let health = proxy.get("/health").await.json();
    assert_eq!(health["fills"]["reserved_bytes"], 80_000);
    // A second fill cannot reserve another 80 000: it streams, unstored.
    let r = proxy.get_image(&origin.url("/second.jpg")).await;
    assert_eq!(
        r.cache_status(),
        "imgedge; fwd=uri-miss; detail=memory-pressure"
    );
    assert_eq!(r.body, pattern(80_000));

    gate.notify_one();
    while let Some(chunk) = held.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body, pattern(80_000));
    // Once stored, the reservation is returned and the next fill is admitted.
    let mut reserved = serde_json::Value::Null;
    for _ in 0..100 {
        reserved = proxy.get("/health").await.json()["fills"]["reserved_bytes"].clone();
        if reserved == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reserved, 0);
    let r = proxy.get_image(&origin.url("/third.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored");
}

#[tokio::test]
async fn a_fetch_past_total_timeout_is_aborted_and_in_flight_fetches_are_listed() {
    let origin = TestOrigin::start().await;
    // 100 pieces 50 ms apart: about 5 s, never silent for the 1 s idle timeout.
    origin.route(
        "/drip.jpg?token=secret",
        Reply::pattern(100_000)
            .header("Cache-Control", "max-age=600")
            .fault(Fault::Drip(Duration::from_millis(50))),
    );
    let config = test_config(
        &origin,
        "[upstream]\ntotal_timeout = \"600ms\"\n[admin]\ntoken = \"t0k-0123456789abcdef\"",
    );
    let proxy = TestProxy::start(config).await;
    let mut r = proxy
        .stream_image(&origin.url("/drip.jpg?token=secret"))
        .await;
    r.chunk().await.unwrap();

    // Counted, with the oldest one's age, but not listed (origin hosts, ports and other
    // users' paths are the operator's), unless the admin asks.
    let health = proxy.get("/health").await.json();
    assert_eq!(health["inflight"]["count"], 1, "{health}");
    assert!(
        health["inflight"]["oldest_age_ms"].as_u64().is_some(),
        "{health}"
    );
    assert!(health["inflight"].get("oldest").is_none(), "{health}");
    assert!(!health.to_string().contains("drip.jpg"), "{health}");
    let admin = proxy
        .send(
            Method::GET,
            "/health",
            &[("Authorization", "Bearer t0k-0123456789abcdef")],
        )
        .await
        .json();
    assert_eq!(
        admin["inflight"]["oldest"][0]["url"],
        origin.url("/drip.jpg?token=secret")
    );

    let started = std::time::Instant::now();
    let rest = async {
        loop {
            match r.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    assert!(
        rest.await.is_err(),
        "the fetch must be aborted, not completed"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let health = proxy.get("/health").await.json();
    assert_eq!(health["inflight"]["count"], 0, "{health}");
    // Only the head: this fetch drips past total_timeout too.
    let again = proxy
        .stream_image(&origin.url("/drip.jpg?token=secret"))
        .await;
    assert_ne!(
        cache_status(&again),
        "imgedge; hit; detail=memory",
        "nothing stored"
    );
}

/// Polls /metrics until `line` appears; panics after about 2 s.
async fn wait_for_metric(proxy: &TestProxy, line: &str) {
    for _ in 0..200 {
        let metrics = proxy.get("/metrics").await.text();
        if metrics.lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = proxy.get("/metrics").await.text();
    panic!("{line} never appeared in\n{metrics}");
}

#[tokio::test]
async fn at_evicting_least_recently_used_entries_go_until_rss_is_down_to_evict_to() {
    let origin = TestOrigin::start().await;
    for name in ["a", "b", "c"] {
        origin.route(
            &format!("/{name}.jpg"),
            Reply::pattern(100_000).header("Cache-Control", "max-age=600"),
        );
    }
    // RSS will be set just past the evicting threshold, 150 000 bytes above evict_to.
    let evicting = 0.72;
    let pressed_rss = (evicting * BUDGET as f64) as u64 + 1_000;
    let evict_to = (pressed_rss - 150_000) as f64 / BUDGET as f64;
    let rss = Arc::new(SetRss::new(BUDGET / 10));
    let config = test_config(
        &origin,
        &format!(
            "[memory]\nbudget_bytes = {BUDGET}\nsample_interval = \"10ms\"\nevicting = {evicting}\nevict_to = {evict_to}\n[cache]\nmemory_capacity_bytes = 268435456"
        ),
    );
    let proxy = TestProxy::start_with(config, Some(rss.clone())).await;
    for name in ["a", "b", "c"] {
        proxy.get_image(&origin.url(&format!("/{name}.jpg"))).await;
    }
    // Use a again: b and c are now the least recently used.
    let r = proxy.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");

    rss.set(pressed_rss);
    // Each entry weighs a little over 100 000 bytes: two of them cover the 150 000.
    wait_for_metric(
        &proxy,
        "imgedge_memory_relief_total{action=\"evicted_entries\"} 2",
    )
    .await;
    // RSS has not moved yet (the allocator returns pages over seconds): 30 more readings at the
    // same RSS evict nothing more, since the evicted bytes are counted as on their way out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Then RSS falls below evict_to: eviction is done.
    rss.set(BUDGET / 10);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let health = proxy.get("/health").await.json();
    assert_eq!(health["cache"]["memory"]["entries"], 1, "{health}");
    let r = proxy.get_image(&origin.url("/a.jpg")).await;
    assert_eq!(r.cache_status(), "imgedge; hit; detail=memory");
    for name in ["b", "c"] {
        let r = proxy.get_image(&origin.url(&format!("/{name}.jpg"))).await;
        assert_eq!(r.cache_status(), "imgedge; fwd=uri-miss; stored", "{name}");
        assert_eq!(r.body, pattern(100_000));
    }
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("imgedge_memory_relief_total{action=\"evicted_entries\"} 2\n"),
        "evicted again while the evicted bytes were on their way out:\n{metrics}"
    );
}

#[tokio::test]
async fn at_emergency_fills_no_client_reads_are_aborted_and_nothing_is_stored() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    origin.route(
        "/orphan.jpg",
        Reply::pattern(200_000)
            .header("Cache-Control", "max-age=600")
            .fault(Fault::GateAfter(20_000, gate.clone())),
    );
    let (proxy, rss) = pressured(&origin).await;
    {
        // The only client reads the first bytes and goes away; the fill goes on for the cache.
        let client = reqwest::Client::new();
        let mut r = client
            .get(proxy.image_url(&origin.url("/orphan.jpg")))
            .send()
            .await
            .unwrap();
        assert_eq!(cache_status(&r), "imgedge; fwd=uri-miss; stored");
        r.chunk().await.unwrap().unwrap();
    }
    // Until the server notices the client is gone, the fill still has a reader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_pressure(&proxy, &rss, 0.96, "emergency").await;
    wait_for_metric(
        &proxy,
        "imgedge_memory_relief_total{action=\"aborted_fills\"} 1",
    )
    .await;

    gate.notify_one();
    set_pressure(&proxy, &rss, 0.10, "normal").await;
    // Only the head: the origin holds this body back at the gate too.
    let r = proxy.stream_image(&origin.url("/orphan.jpg")).await;
    assert_eq!(cache_status(&r), "imgedge; fwd=uri-miss; stored");
    assert_eq!(
        origin.hits("/orphan.jpg"),
        2,
        "the aborted fill stored nothing"
    );
}

#[tokio::test]
async fn while_draining_readiness_fails_and_requests_are_still_served() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/d.jpg",
        Reply::ok("d").header("Cache-Control", "max-age=600"),
    );
    let config = test_config(&origin, "[server]\ndrain_delay = \"3s\"");
    let mut proxy = TestProxy::start(config).await;
    assert_eq!(proxy.get("/health/ready").await.status, 200);
    proxy.begin_shutdown();
    let mut ready = None;
    for _ in 0..100 {
        let r = proxy.get("/health/ready").await;
        if r.status == 503 {
            ready = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = ready.expect("never draining").json();
    assert_eq!(ready["status"], "draining");
    assert_eq!(proxy.get("/health/live").await.status, 200);
    // New connections are still accepted and served while draining.
    let fresh = reqwest::Client::new();
    let url = proxy.image_url(&origin.url("/d.jpg"));
    let r = send(&fresh, Method::GET, &url, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "d");
}

/// An instance that starts above a line acts on it as on any later reading: the transition is
/// counted and the level's relief happens (found by the operator test: it used to start from the
/// first reading and count nothing).
#[tokio::test]
async fn a_process_that_starts_under_pressure_counts_it_and_acts_on_it() {
    let origin = TestOrigin::start().await;
    let rss = Arc::new(SetRss::new(BUDGET / 100 * 96));
    let config = test_config(
        &origin,
        &format!(
            "[memory]\nbudget_bytes = {BUDGET}\nsample_interval = \"10ms\"\n[cache]\nmemory_capacity_bytes = 268435456"
        ),
    );
    let proxy = TestProxy::start_with(config, Some(rss)).await;
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = proxy.get("/metrics").await.text();
        if metrics.contains("imgedge_memory_pressure_transitions_total{to=\"emergency\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics.contains("imgedge_memory_pressure_transitions_total{to=\"emergency\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imgedge_memory_relief_total{action=\"cleared\"} 1"),
        "{metrics}"
    );
}
