//! The shared tier against real Redis servers: a Redis Cluster of three masters, and TLS
//! (`rediss://`) with a certificate authority made here with openssl. tests/integration/shared.rs stages
//! failures on fake servers; these prove what a fake cannot: that keys spread over a cluster's
//! slots are written and read back through the redis crate's cluster client, and that the TLS
//! handshake verifies the server against the roots it is given and refuses one it does not know.
//!
//! They need `redis-server`, `redis-cli` and `openssl` on PATH (Debian: redis-server, openssl;
//! .ci/run installs them). Without them they fail, naming the package.

use std::net::TcpStream as StdTcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::binary::*;
use crate::support::*;

/// A redis-server process on 127.0.0.1, killed when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} not found: install the Debian package {package} (.ci/run does)"
    );
}

impl RedisServer {
    /// Starts redis-server in `dir` (no persistence) with `args` on top, and waits until its
    /// port (`port`, or the TLS port in `args`) accepts connections.
    fn start(dir: &Path, port: u16, args: &[&str]) -> RedisServer {
        need("redis-server", "redis-server");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer { child, port };
        let started = Instant::now();
        let listening = args
            .iter()
            .position(|a| *a == "--tls-port")
            .map_or(port, |i| args[i + 1].parse().unwrap());
        while StdTcpStream::connect(("127.0.0.1", listening)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not listen on {listening}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn cli(&self, args: &[&str]) -> String {
        need("redis-cli", "redis-tools");
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `/health`'s `cache.shared` of the imgedge at `base`.
async fn shared_health(base: &str) -> serde_json::Value {
    health(base).await["cache"]["shared"].clone()
}

/// Waits (up to 10 s) until the imgedge at `base` shows the shared tier's `field` at `value`.
async fn wait_for_shared(base: &str, field: &str, value: impl Into<serde_json::Value>) {
    let value = value.into();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shared = shared_health(base).await;
        if shared[field] == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shared tier {field} never {value}: {shared}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn objects_spread_over_a_redis_cluster_are_served_to_a_second_instance() {
    let dir = TempDir::new("redis-cluster");
    let nodes: Vec<RedisServer> = (0..3)
        .map(|i| {
            let node_dir = dir.0.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            // The bus port defaults to the port + 10000, past 65535 for a high free port.
            let bus = free_port().to_string();
            RedisServer::start(
                &node_dir,
                free_port(),
                &["--cluster-enabled", "yes", "--cluster-port", &bus],
            )
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create runs");
    assert!(
        created.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&created.stdout)
    );
    let started = Instant::now();
    while !nodes
        .iter()
        .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cluster never became ok"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let origin = TestOrigin::start().await;
    for i in 0..24 {
        origin.route(&format!("/o{i}.png"), Reply::pattern(10_000 + i));
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("redis://{a}")).collect();
    let shared = format!(
        "[cache.shared]\nurl = \"{}\"\ntimeout = \"1s\"\n",
        urls.join(",")
    );
    let first = TestProxy::for_origin(&origin, &shared).await;
    let second = TestProxy::for_origin(&origin, &shared).await;
    let [first_base, second_base] = [&first, &second].map(|p| format!("http://{}", p.addr));
    for base in [&first_base, &second_base] {
        wait_for_shared(base, "state", "closed").await;
    }

    for i in 0..24 {
        let got = first.get_image(&origin.url(&format!("/o{i}.png"))).await;
        assert_eq!(got.status, 200);
    }
    wait_for_shared(&first_base, "writes", 24).await;
    // The keys live on more than one master: the writes followed the slots.
    let holding = nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(holding >= 2, "keys on {holding} of 3 masters");

    for i in 0..24 {
        let got = second.get_image(&origin.url(&format!("/o{i}.png"))).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.cache_status(), "imgedge; hit; detail=shared", "o{i}");
        assert_eq!(got.body, pattern(10_000 + i));
        assert_eq!(origin.hits(&format!("/o{i}.png")), 1);
    }
    let shared = shared_health(&second_base).await;
    assert_eq!(
        (shared["hits"].as_u64(), shared["errors"].as_u64()),
        (Some(24), Some(0)),
        "{shared}"
    );
}

/// Runs openssl with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    need("openssl", "openssl");
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate authority named `name`: `{stem}.key` and `{stem}.crt` in `dir`;
/// the path of the certificate.
fn make_ca(dir: &Path, name: &str, stem: &str) -> std::path::PathBuf {
    let (key, crt) = (format!("{stem}.key"), format!("{stem}.crt"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
    );
    dir.join(crt)
}

/// A certificate authority and a server certificate it signed for 127.0.0.1 and localhost:
/// ca.crt, server.crt, server.key in `dir`.
fn make_certificates(dir: &Path) {
    make_ca(dir, "imgedge test CA", "ca");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
}

#[tokio::test]
async fn rediss_verifies_the_server_against_the_roots_it_is_given() {
    let dir = TempDir::new("redis-tls");
    std::fs::create_dir_all(&dir.0).unwrap();
    make_certificates(&dir.0);
    let tls_port = free_port();
    let tls_port_arg = tls_port.to_string();
    let path = |f: &str| dir.0.join(f).display().to_string();
    let (cert, key, ca) = (path("server.crt"), path("server.key"), path("ca.crt"));
    let _redis = RedisServer::start(
        &dir.0,
        0,
        &[
            "--tls-port",
            &tls_port_arg,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );

    let origin = TestOrigin::start().await;
    origin.route("/t.png", Reply::pattern(30_000));
    let env = |roots: &str| {
        let mut env = origin_env(&origin);
        env.extend([
            (
                "IMGEDGE_CACHE__SHARED__URL",
                format!("rediss://127.0.0.1:{tls_port}"),
            ),
            ("IMGEDGE_CACHE__SHARED__TIMEOUT", "1s".to_owned()),
            // rustls-native-certs reads the roots from here instead of the system's store.
            ("SSL_CERT_FILE", roots.to_owned()),
            ("IMGEDGE_LOG__LEVEL", "warn".to_owned()),
        ]);
        env
    };

    // Roots that do not include our CA: the handshake fails, the tier stays off the request
    // path (open), and requests are served from the origin all the same.
    let other_roots = make_ca(&dir.0, "some other CA", "other");
    let untrusting = Binary::start(&env(&other_roots.display().to_string())).await;
    let base = untrusting.base.clone();
    wait_for_shared(&base, "state", "open").await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let target = format!("/image-proxy?url={}", origin.url("/t.png"));
    let got = send(&client, Method::GET, &format!("{base}{target}"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(shared_health(&base).await["writes"], 0);
    drop(untrusting);

    // Our CA: the first instance writes through TLS, a second one reads it back.
    let first = Binary::start(&env(&ca)).await;
    let base = first.base.clone();
    wait_for_shared(&base, "state", "closed").await;
    let got = send(&client, Method::GET, &format!("{base}{target}"), &[]).await;
    assert_eq!(got.status, 200);
    wait_for_shared(&base, "writes", 1).await;
    let second = Binary::start(&env(&ca)).await;
    let base = second.base.clone();
    // Until its first PING is answered (the handshake), the tier is half-open and skipped.
    wait_for_shared(&base, "state", "closed").await;
    let got = send(
        &client,
        Method::GET,
        &format!("{}{target}", second.base),
        &[],
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.cache_status(), "imgedge; hit; detail=shared");
    assert_eq!(got.body, pattern(30_000));
    assert_eq!(
        origin.hits("/t.png"),
        2,
        "once per trusting run, none from the second"
    );
}
