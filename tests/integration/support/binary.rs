//! The real `imgedge` binary as a subprocess, for tests that need a process of its own (its
//! exit, its RSS, its environment).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::{Method, TEST_CONTENT_TYPES, TestOrigin, send};

/// A running binary, killed when dropped.
pub struct Binary {
    pub child: tokio::process::Child,
    pub base: String,
}

impl Binary {
    /// Starts the binary on a free loopback port with `env` and waits for /health.
    pub async fn start(env: &[(&str, String)]) -> Binary {
        Self::start_command(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_imgedge")),
            env,
        )
        .await
    }

    /// As [`Binary::start`], with the process's descriptor limit (soft and hard) set to
    /// `fd_limit` by the shell that starts it.
    pub async fn start_with_fd_limit(env: &[(&str, String)], fd_limit: u32) -> Binary {
        let mut command = tokio::process::Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {fd_limit} && exec \"$0\""),
            env!("CARGO_BIN_EXE_imgedge"),
        ]);
        Self::start_command(command, env).await
    }

    async fn start_command(mut command: tokio::process::Command, env: &[(&str, String)]) -> Binary {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        command
            .env("IMGEDGE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let started = Instant::now();
        while client.get(format!("{base}/health")).send().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "imgedge did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Binary { child, base }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Waits (up to `within`) for the process to exit; its exit status.
    pub async fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("imgedge still running after {within:?}"))
            .unwrap()
    }

    /// Stops the binary (SIGKILL) and returns what it wrote to stdout.
    pub async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        out
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("imgedge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment that lets the binary fetch from `origin` (a loopback address): allowed,
/// trusted although private, its test content types served.
pub fn origin_env(origin: &TestOrigin) -> Vec<(&'static str, String)> {
    vec![
        ("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", origin.addr.to_string()),
        (
            "IMGEDGE_UPSTREAM__ALLOWED_CONTENT_TYPES",
            TEST_CONTENT_TYPES.to_owned(),
        ),
        (
            "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS",
            origin.addr.to_string(),
        ),
    ]
}

/// `/health` of the imgedge at `base` (`http://127.0.0.1:PORT`), as JSON.
pub async fn health(base: &str) -> serde_json::Value {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    send(&client, Method::GET, &format!("{base}/health"), &[])
        .await
        .json()
}
