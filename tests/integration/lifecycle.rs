//! Ending: when `serve` returns, every task imgedge started has ended — the pressure monitor,
//! relief, the disk tier's writer, shared fills still in flight, client and upstream
//! connections — so nothing of it outlives the server (or keeps its tiers and buffers alive).

use std::time::{Duration, Instant};

use crate::support::*;
use reqwest::Method;
use tokio::net::TcpListener;
use tokio::runtime::{Builder, Runtime};
use tokio::sync::{Notify, oneshot};

#[test]
fn after_serve_returns_no_task_of_imgedge_is_left_running() {
    // imgedge alone on a runtime of its own, driven by `block_on` on a thread of its own (the
    // future of `block_on` is not a task): every task alive on it is one imgedge started.
    let imgedge: Runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let test = Builder::new_multi_thread().enable_all().build().unwrap();

    let gate = std::sync::Arc::new(Notify::new());
    let origin = test.block_on(TestOrigin::start());
    origin.route(
        "/a.jpg",
        Reply::pattern(200_000).header("Cache-Control", "max-age=600"),
    );
    // A shared fill that never completes: in flight when the server stops.
    origin.route(
        "/held.jpg",
        Reply::pattern(300_000)
            .header("Cache-Control", "max-age=600")
            .fault(Fault::GateAfter(100_000, gate.clone())),
    );
    let dir = std::env::temp_dir().join(format!("imgedge-lifecycle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = test_config(
        &origin,
        &format!(
            "[server]\nshutdown_grace = \"300ms\"\n[cache]\ndisk_dir = \"{}\"\ndisk_capacity_bytes = 67108864",
            dir.display()
        ),
    );

    let metrics = imgedge.handle().metrics();
    let listener = imgedge.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let served = imgedge.block_on(imgedge::serve(listener, config, async {
            let _ = stopped.await;
        }));
        (imgedge, served)
    });

    test.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let image = |path: &str| format!("http://{addr}/image-proxy?url={}", origin.url(path));
        for _ in 0..2 {
            let got = send(&client, Method::GET, &image("/a.jpg"), &[]).await;
            assert_eq!((got.status, got.body.len()), (200, 200_000));
        }
        // Stored on disk too: the writer has worked.
        for _ in 0..200 {
            let health = send(&client, Method::GET, &format!("http://{addr}/health"), &[]).await;
            if health.json()["cache"]["disk"]["writes"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A client mid-way through the held fill, its connection still open.
        let mut held = client.get(image("/held.jpg")).send().await.unwrap();
        assert_eq!(held.status(), 200);
        assert!(held.chunk().await.unwrap().is_some());
        std::mem::forget(held);
        // The monitor, relief, the disk writer, the held fill, connections, ...
        assert!(
            metrics.num_alive_tasks() >= 5,
            "{}",
            metrics.num_alive_tasks()
        );
    });

    stop.send(()).unwrap();
    let (imgedge, served) = server.join().unwrap();
    served.unwrap();
    // A task leaves the count a moment after it has ended: its worker releases it after its
    // future returned, which is when serve's tracker saw it end (tokio's `num_alive_tasks` "may
    // not have strong consistency" on a multi-thread runtime). A task still running would keep
    // the count up past the bound; on a busy machine the release itself can take a few ms.
    let ended_by = Instant::now() + Duration::from_secs(1);
    while metrics.num_alive_tasks() > 0 && Instant::now() < ended_by {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "tasks still alive a second after serve returned"
    );
    drop(imgedge);
    gate.notify_waiters();
    let _ = std::fs::remove_dir_all(&dir);
}
