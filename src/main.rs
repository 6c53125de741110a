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
    /// Validate the configuration, print it, and exit.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgedge: invalid configuration:\n{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Sign { url, params }) = cli.command {
        return sign(&config, &url, &params);
    }
    if cli.check_config {
        println!("imgedge: configuration ok\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("imgedge: {e:#}");
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
            .with_context(|| format!("binding {listen}"))?;
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
