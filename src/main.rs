//! The `imgedge` binary: command line, configuration, logging, runtime, signals.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use imgedge::Config;
use imgedge::config::LogFormat;
use tracing_subscriber::EnvFilter;

// The global allocator: one that gives freed memory back to the system, so RSS falls after a
// burst instead of staying at its peak (glibc keeps much of it). Chosen by cargo feature.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A streaming image proxy and CDN-style edge cache.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file merged over the built-in defaults (IMGEDGE_<SECTION>__<KEY> variables
    /// override both).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print what is in effect as TOML (secrets masked), and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the signed /image-proxy path for URL, with the first of [signing] keys.
    Sign {
        /// The image URL (http or https).
        url: String,
        /// A further query parameter, after url= (repeatable), e.g. --param w=300.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Exit 0 when the imgedge configured here answers `/health/live` with 200 within 3 s, else
    /// 1: a container HEALTHCHECK without curl.
    Healthcheck {
        /// What to ask instead (default: /health/live on server.listen, an unspecified address
        /// as loopback).
        #[arg(long, value_name = "http://HOST:PORT/PATH")]
        url: Option<String>,
    },
}

/// glibc's malloc still serves the C codecs (MozJPEG, libwebp: jemalloc's symbols are prefixed,
/// so it serves Rust alone). glibc maps a block above its mmap threshold and unmaps it when
/// freed, but raises the threshold to the size of every mapped block freed (up to 32 MiB):
/// after the first large image, a codec's multi-MiB buffers come from its heap arenas, and what
/// they free stays in RSS. A fixed threshold (the initial 128 KiB) keeps returning them; measured
/// with `loadtest/sharp.sh` (docs/memory.md): RSS after a cold load 80 MiB instead of 131, no
/// slower. Set before any thread starts; `MALLOC_MMAP_THRESHOLD_` in the environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // FFI, the one call; the library's other unsafe code is transform/ffi.rs
fn fixed_mmap_threshold() {
    const THRESHOLD_BYTES: libc::c_int = 128 * 1024;
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD_BYTES);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgedge: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Sign { url, params }) => return sign(&config, &url, &params),
        Some(Command::Healthcheck { url }) => return healthcheck(&config, url.as_deref()),
        None => {}
    }
    if cli.check_config {
        return match Config::effective_toml(cli.config.as_deref()) {
            Ok(toml) => {
                eprintln!("imgedge: configuration ok; in effect (secrets masked):");
                print!("{toml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("imgedge: invalid configuration:\n{e}");
                ExitCode::from(2)
            }
        };
    }
    init_logging(&config);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the log (stdout, or the JSON stream a container collects).
            tracing::error!("cannot start: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `imgedge sign`: prints the signed target, or says why it cannot.
fn sign(config: &Config, url: &str, params: &[String]) -> ExitCode {
    let signer = imgedge::signing::Signer::new(config.signing.keys.clone());
    if !signer.is_on() {
        eprintln!(
            "imgedge sign: no [signing] keys are configured (set signing.keys or IMGEDGE_SIGNING__KEYS)"
        );
        return ExitCode::from(2);
    }
    let query = format!("url={url}");
    if let Err(e) = imgedge::target::parse_image_url(Some(&query), config.server.max_url_bytes) {
        eprintln!("imgedge sign: {e}");
        return ExitCode::from(2);
    }
    let mut pairs = Vec::with_capacity(params.len());
    for p in params {
        match p.split_once('=') {
            Some((name, value)) if !name.is_empty() && name != "s" && name != "url" => {
                pairs.push((name.to_owned(), value.to_owned()))
            }
            _ => {
                eprintln!("imgedge sign: --param {p:?}: expected NAME=VALUE (not url or s)");
                return ExitCode::from(2);
            }
        }
    }
    println!(
        "{}",
        imgedge::signing::image_proxy_target(url, &pairs, &signer)
    );
    ExitCode::SUCCESS
}

/// `imgedge healthcheck`: one plain HTTP/1.1 GET, its status line read; no HTTP client needed.
fn healthcheck(config: &Config, url: Option<&str>) -> ExitCode {
    use std::io::{Read, Write};
    use std::time::Duration;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let (addr, path) = match url {
        None => {
            let mut addr = config.server.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            (addr.to_string(), "/health/live".to_owned())
        }
        Some(u) => match url::Url::parse(u) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some() => (
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or_default(),
                    u.port_or_known_default().unwrap_or(80)
                ),
                u[url::Position::BeforePath..].to_owned(),
            ),
            _ => {
                eprintln!("imgedge healthcheck: --url {u:?}: expected http://HOST:PORT/PATH");
                return ExitCode::from(2);
            }
        },
    };
    let probe = || -> std::io::Result<String> {
        use std::net::ToSocketAddrs;
        let target = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut stream = std::net::TcpStream::connect_timeout(&target, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let n = stream.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match probe() {
        Ok(head) if head.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(head) => {
            let status = head.lines().next().unwrap_or_default();
            eprintln!("imgedge healthcheck: http://{addr}{path} answered {status:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("imgedge healthcheck: http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let listen = config.server.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (is another imgedge running? choose another with server.listen or IMGEDGE_SERVER__LISTEN)"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        " (ports below 1024 need privileges: use 8080 behind a proxy)"
                    }
                    std::io::ErrorKind::AddrNotAvailable => {
                        " (no such address on this machine: 0.0.0.0 listens on all)"
                    }
                    _ => "",
                };
                anyhow::anyhow!("cannot listen on {listen}: {e}{hint}")
            })?;
        imgedge::serve(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
