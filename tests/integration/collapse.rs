//! Collapsed forwarding through real sockets: concurrent misses share one origin fetch, and
//! followers stream it while it fills.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::sync::{Notify, mpsc};

const BODY: u64 = 1_000_000;
const HELD_BACK_AFTER: u64 = 100_000;

/// An object whose origin sends the first 100 000 bytes, then waits for `gate`.
fn gated(gate: &Arc<Notify>) -> Reply {
    Reply::pattern(BODY)
        .header("Cache-Control", "max-age=600")
        .fault(Fault::GateAfter(HELD_BACK_AFTER, gate.clone()))
}

/// Sends a GET and reads the first chunk; reports on `got_bytes`, then reads the rest.
/// Returns (Cache-Status, whole body or error).
fn client(
    proxy: &TestProxy,
    target: &str,
    got_bytes: mpsc::Sender<()>,
) -> tokio::task::JoinHandle<(String, Result<Vec<u8>, String>)> {
    let (client, url) = (proxy.client.clone(), proxy.image_url(target));
    tokio::spawn(async move {
        let mut r = client.get(&url).send().await.unwrap();
        let status = cache_status(&r);
        let mut body = Vec::new();
        loop {
            match r.chunk().await {
                Ok(Some(chunk)) => {
                    if body.is_empty() {
                        let _ = got_bytes.send(()).await;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return (status, Ok(body)),
                Err(e) => return (status, Err(e.to_string())),
            }
        }
    })
}

async fn wait_for(rx: &mut mpsc::Receiver<()>, n: usize) {
    for i in 0..n {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {n} clients got bytes"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_origin_request_for_100_concurrent_clients_who_stream_before_the_fill_ends() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(Notify::new());
    origin.route("/hot.jpg", gated(&gate));
    let proxy = TestProxy::for_origin(&origin, "[upstream]\nidle_timeout = \"30s\"").await;
    let (tx, mut rx) = mpsc::channel(128);
    let clients: Vec<_> = (0..100)
        .map(|_| client(&proxy, &origin.url("/hot.jpg"), tx.clone()))
        .collect();
    // Every client, leader and followers, has bytes while the origin still holds back the rest.
    wait_for(&mut rx, 100).await;
    gate.notify_one();
    let mut statuses = Vec::new();
    for c in clients {
        let (status, body) = c.await.unwrap();
        assert_eq!(body.unwrap(), pattern(BODY));
        statuses.push(status);
    }
    let stored = statuses
        .iter()
        .filter(|s| *s == "imgedge; fwd=uri-miss; stored")
        .count();
    let collapsed = statuses
        .iter()
        .filter(|s| *s == "imgedge; fwd=uri-miss; collapsed")
        .count();
    assert_eq!((stored, collapsed), (1, 99), "{statuses:?}");
    assert_eq!(origin.hits("/hot.jpg"), 1);

    let after = proxy.get_image(&origin.url("/hot.jpg")).await;
    assert_eq!(after.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(after.body, pattern(BODY));
    let metrics = proxy.get("/metrics").await.text();
    assert!(metrics.contains("imgedge_collapsed_total 99"), "{metrics}");
}

#[tokio::test]
async fn a_failing_fill_aborts_every_follower_and_stores_nothing() {
    let origin = TestOrigin::start().await;
    // The head waits long enough for every client to join, then the body resets midway.
    origin.route(
        "/broken.jpg",
        Reply::pattern(BODY)
            .head_delay(Duration::from_millis(300))
            .fault(Fault::ResetAfter(HELD_BACK_AFTER)),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let (tx, _rx) = mpsc::channel(128);
    let clients: Vec<_> = (0..10)
        .map(|_| client(&proxy, &origin.url("/broken.jpg"), tx.clone()))
        .collect();
    for c in clients {
        let (status, body) = c.await.unwrap();
        assert!(status.starts_with("imgedge; fwd=uri-miss"), "{status}");
        assert!(
            body.is_err(),
            "a failed fill ended cleanly for a {status} client"
        );
    }
    assert_eq!(origin.hits("/broken.jpg"), 1);
    // The origin still resets mid-body, so this body fails too: only the head is checked.
    let again = proxy.stream_image(&origin.url("/broken.jpg")).await;
    assert_ne!(cache_status(&again), "imgedge; hit; detail=memory");
    let _ = again.bytes().await;
    assert_eq!(origin.hits("/broken.jpg"), 2, "nothing was stored");
}

#[tokio::test]
async fn the_fill_continues_for_followers_and_the_cache_when_the_leader_disconnects() {
    let origin = TestOrigin::start().await;
    let gate = Arc::new(Notify::new());
    origin.route("/left.jpg", gated(&gate));
    let proxy = TestProxy::for_origin(&origin, "[upstream]\nidle_timeout = \"30s\"").await;

    let mut leader = proxy.stream_image(&origin.url("/left.jpg")).await;
    assert_eq!(cache_status(&leader), "imgedge; fwd=uri-miss; stored");
    leader.chunk().await.unwrap().unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let followers: Vec<_> = (0..5)
        .map(|_| client(&proxy, &origin.url("/left.jpg"), tx.clone()))
        .collect();
    wait_for(&mut rx, 5).await;
    drop(leader);
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.notify_one();
    for f in followers {
        let (status, body) = f.await.unwrap();
        assert_eq!(status, "imgedge; fwd=uri-miss; collapsed");
        assert_eq!(body.unwrap(), pattern(BODY));
    }
    let after = proxy.get_image(&origin.url("/left.jpg")).await;
    assert_eq!(after.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(after.body, pattern(BODY));
    assert_eq!(origin.hits("/left.jpg"), 1);
}

#[tokio::test]
async fn a_follower_fetches_on_its_own_after_lock_timeout() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow-head.jpg",
        Reply::ok("late").head_delay(Duration::from_millis(1500)),
    );
    let proxy = TestProxy::for_origin(
        &origin,
        "[upstream]\nheader_timeout = \"5s\"\n[cache]\nlock_timeout = \"200ms\"",
    )
    .await;
    let target = origin.url("/slow-head.jpg");
    let leader = tokio::spawn({
        let (client, url) = (proxy.client.clone(), proxy.image_url(&target));
        async move { send(&client, Method::GET, &url, &[]).await.text() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = proxy.get_image(&target).await;
    assert_ne!(r.cache_status(), "imgedge; fwd=uri-miss; collapsed");
    assert_eq!(r.text(), "late");
    assert_eq!(leader.await.unwrap(), "late");
    assert_eq!(origin.hits("/slow-head.jpg"), 2);
}

#[tokio::test]
async fn uncacheable_and_too_large_responses_release_followers_and_are_remembered() {
    let origin = TestOrigin::start().await;
    let delay = Duration::from_millis(300);
    origin.route(
        "/private.jpg",
        Reply::ok("mine")
            .header("Cache-Control", "private")
            .head_delay(delay),
    );
    origin.route("/huge.jpg", Reply::pattern(300_000).head_delay(delay));
    let proxy = TestProxy::for_origin(&origin, "[cache]\nmax_cacheable_bytes = 200000").await;
    for (path, detail) in [("/private.jpg", "private"), ("/huge.jpg", "too-large")] {
        let started = Instant::now();
        let clients: Vec<_> = (0..5)
            .map(|_| {
                let (client, url) = (proxy.client.clone(), proxy.image_url(&origin.url(path)));
                tokio::spawn(async move { send(&client, Method::GET, &url, &[]).await })
            })
            .collect();
        for c in clients {
            let r = c.await.unwrap();
            assert_eq!(
                r.cache_status(),
                format!("imgedge; fwd=uri-miss; detail={detail}")
            );
        }
        // Released at the leader's head, not held for lock_timeout (5 s).
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path}: {:?}",
            started.elapsed()
        );
        assert_eq!(
            origin.hits(path),
            5,
            "{path}: each released follower fetched on its own"
        );
    }
}

#[tokio::test]
async fn followers_answer_the_leaders_error_before_a_head() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/garbage.jpg",
        Reply::ok("x")
            .head_delay(Duration::from_millis(300))
            .fault(Fault::Garbage),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let (client, url) = (
                proxy.client.clone(),
                proxy.image_url(&origin.url("/garbage.jpg")),
            );
            tokio::spawn(async move { send(&client, Method::GET, &url, &[]).await })
        })
        .collect();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 502);
        assert_eq!(r.error_code(), "upstream_error");
    }
    assert_eq!(origin.hits("/garbage.jpg"), 1);
}
