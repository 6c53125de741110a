//! Configuration: embedded defaults, an optional TOML file and `IMGEDGE_<SECTION>__<KEY>`
//! environment variables, merged in that order and validated into typed values. What the
//! configuration is lives here; how it is read and checked, in `config/read.rs`.
//!
//! Every bad field is reported at once ([`ConfigError`]), unknown keys included, so an operator
//! fixes a file in one pass. Nothing here performs I/O beyond reading the file.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use url::Url;

use crate::target::HostPattern;

/// The defaults, embedded so that the binary starts with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "IMGEDGE_";

/// The validated configuration of one imgedge process.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub supabase: SupabaseConfig,
    /// `[[routes]]`, plus the Supabase route when `[supabase] upstream` is set.
    pub routes: Vec<RouteConfig>,
    pub cache: CacheConfig,
    pub admin: AdminConfig,
    pub signing: SigningConfig,
    pub limits: LimitsConfig,
    pub transform: TransformConfig,
    pub memory: MemoryConfig,
    pub log: LogConfig,
}

/// `[signing]`: signed `/image-proxy` URLs.
#[derive(Clone, Default)]
pub struct SigningConfig {
    /// HMAC-SHA256 keys (each at least 16 bytes); with any, `/image-proxy` requires a signature
    /// under one of them; the first signs (`imgedge sign`). Never printed.
    pub keys: Vec<Vec<u8>>,
}

impl fmt::Debug for SigningConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SigningConfig {{ keys: {} (not shown) }}",
            self.keys.len()
        )
    }
}

/// `[memory]`: the memory budget and the pressure levels.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// The RSS budget in bytes; 0 detects it (cgroup limit, else physical memory).
    pub budget_bytes: u64,
    /// How often RSS is sampled.
    pub sample_interval: Duration,
    /// Fractions of the budget at which each level starts.
    pub thresholds: crate::pressure::Thresholds,
    /// Bytes in-flight fills may collect in total; 0 means 25% of the budget.
    pub inflight_fill_bytes: u64,
    /// The fraction of the budget eviction brings RSS down to (from `evicting` up).
    pub evict_to: f64,
}

/// `[admin]`: operator endpoints.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Bearer token for purging; `None` disables it.
    pub token: Option<String>,
}

/// One reverse-proxy route: requests whose path starts with `prefix` go to `upstream` + the same
/// path and query. Every method is forwarded; GET and HEAD are looked up and stored.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix, starting with `/`; the longest matching prefix wins.
    pub prefix: String,
    /// Origin URL (scheme, host, optional port and base path) without a trailing slash.
    pub upstream: Url,
    /// The name in logs and metrics: `supabase` for the Supabase route, else `route`.
    pub name: &'static str,
    /// Freshness of heuristically cacheable responses with neither explicit freshness nor
    /// `Last-Modified`. `None` (the default for `[[routes]]`): not stored, as RFC 9111 has it;
    /// the Supabase route uses `[cache] default_ttl`.
    pub default_ttl: Option<Duration>,
    /// Whether responses carrying `Set-Cookie` are stored (and the cookie replayed to others).
    /// Off by default, and for the Supabase route.
    pub store_set_cookie: bool,
    /// Request headers forwarded besides the standard ones (`proxy/forwarding.rs`): the
    /// route's `forward_request_headers`; for the Supabase route, the headers Storage reads
    /// (`x-upsert`, `x-amz-*`, TUS's `upload-*`, ...).
    pub forward_request_headers: Vec<HeaderPattern>,
    /// Send the client's `Host` to the origin instead of the upstream's own (HAProxy's default,
    /// nginx's `proxy_set_header Host $host`), for origins that route or sign by it.
    pub preserve_host: bool,
    /// What route responses that can run script (HTML, XML, SVG, anything unknown) carry:
    /// imgedge's sandboxing policy, or the origin's own.
    pub content_security_policy: CspMode,
    /// The route's own `cdn_cache_control` and `surrogate_control`; `None` (unset or empty) to
    /// use `[cache]`'s (see [`RouteConfig::targeted_out`]).
    pub cdn_cache_control: Option<Option<http::HeaderValue>>,
    pub surrogate_control: Option<Option<http::HeaderValue>>,
}

impl RouteConfig {
    /// The targeted fields this route's responses carry towards a CDN: its own settings, else
    /// `defaults` (`[cache]`'s).
    pub fn targeted_out(&self, defaults: &TargetedOut) -> TargetedOut {
        TargetedOut {
            cdn_cache_control: self
                .cdn_cache_control
                .clone()
                .unwrap_or_else(|| defaults.cdn_cache_control.clone()),
            surrogate_control: self
                .surrogate_control
                .clone()
                .unwrap_or_else(|| defaults.surrogate_control.clone()),
        }
    }
}

/// A request header name (`x-upsert`) or every name with a prefix (`x-amz-*`), lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(http::HeaderName),
    Prefix(String),
}

impl HeaderPattern {
    /// Parses `name` or `prefix*`: a valid header name, case-insensitive, `*` only at the end.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.strip_suffix('*') {
            Some(prefix) if !prefix.is_empty() && http::HeaderName::try_from(prefix).is_ok() => {
                Ok(HeaderPattern::Prefix(prefix.to_owned()))
            }
            Some(_) => Err(format!("{s:?} is not a header name or prefix*")),
            None => http::HeaderName::try_from(lower.as_str())
                .map(HeaderPattern::Exact)
                .map_err(|_| format!("{s:?} is not a header name")),
        }
    }

    /// Whether `name` (lower case, as `http` keeps names) matches.
    pub fn matches(&self, name: &http::HeaderName) -> bool {
        match self {
            HeaderPattern::Exact(n) => n == name,
            HeaderPattern::Prefix(p) => name.as_str().starts_with(p.as_str()),
        }
    }
}

/// The targeted cache-control fields imgedge writes on responses, for the CDN in front of it
/// (RFC 9213 §3 `CDN-Cache-Control`; `Surrogate-Control` for CDNs that read that instead): on
/// successful responses (2xx, 304) whose origin did not forbid shared caching (`private`,
/// `no-store`, `no-cache`, `Set-Cookie`), replacing the origin's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetedOut {
    pub cdn_cache_control: Option<http::HeaderValue>,
    pub surrogate_control: Option<http::HeaderValue>,
}

/// `[[routes]] content_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CspMode {
    /// `"sandbox"` (the default): responses whose type can run script get
    /// `Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; sandbox`,
    /// replacing any of the origin's.
    #[default]
    Sandbox,
    /// `"origin"`: the origin's own policy is passed (none when it sends none), for routes that
    /// serve pages deliberately.
    Origin,
}

/// The request headers Supabase Storage reads beyond the standard ones: uploads (`x-upsert`,
/// `x-metadata`), the client library's `x-client-info`, resumable uploads (TUS:
/// `tus-resumable`, `upload-*`, and `x-signature`, the token of a signed upload URL), and the S3
/// protocol (`x-amz-*`, and the AWS SDKs' signed `amz-sdk-*`, `content-md5`).
pub const SUPABASE_REQUEST_HEADERS: [&str; 9] = [
    "x-upsert",
    "x-metadata",
    "x-client-info",
    "tus-resumable",
    "upload-*",
    "x-signature",
    "x-amz-*",
    "amz-sdk-*",
    "content-md5",
];

/// The prefix of the Supabase Storage API, proxied when `[supabase] upstream` is set.
pub const SUPABASE_PREFIX: &str = "/storage/v1/";

/// `[server]`: the listening side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket address to accept connections on.
    pub listen: SocketAddr,
    /// Longest accepted `/image-proxy` target URL, in bytes after decoding, and longest path and
    /// query on a route.
    pub max_url_bytes: usize,
    /// After a shutdown signal: how long to keep serving (and accepting) with `/health/ready`
    /// answering 503 `draining`, so load balancers stop sending new requests first.
    pub drain_delay: Duration,
    /// Then, with the listener closed: how long open connections get to finish.
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the client (a CDN's edges, a load
    /// balancer); from any other peer, the peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The hosts clients reach imgedge by (`host`, `host:port`, `*.domain`): a request's `Host`
    /// among them is passed to origins as `X-Forwarded-Host` (see `http::client::forwarded`).
    pub public_hosts: Vec<HostPattern>,
    /// Open connections at most; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams one client connection may have open at once (nginx's and Varnish's
    /// default, 100).
    pub max_concurrent_streams: u32,
    /// How long a new connection has to send its first request head (protocol detection
    /// included), and an HTTP/1.1 request its head.
    pub header_read_timeout: Duration,
    /// How long a connection with nothing in flight stays open (keep-alive).
    pub idle_timeout: Duration,
    /// Longest request body forwarded upstream (413 beyond).
    pub max_request_body_bytes: u64,
    /// Longest pause between two reads of a request body (408 beyond).
    pub request_body_timeout: Duration,
}

/// `[upstream]`: how origins are fetched.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Hosts `/image-proxy` may fetch from; empty means any host.
    pub allowed_hosts: Vec<HostPattern>,
    /// Hosts whose addresses may be private (internal origins): the address check is skipped
    /// for them. A `host:port` entry also allows that port.
    pub trusted_private_hosts: Vec<HostPattern>,
    /// Whether a guarded redirect may go from https to http.
    pub allow_https_downgrade: bool,
    /// Media types `/image-proxy` serves (`image/...`, lower-case, no parameters); a body must
    /// also start with the signature of its type, when imgedge knows one.
    pub allowed_content_types: Vec<String>,
    /// Whether `/image-proxy` serves `image/svg+xml` (then with a stricter
    /// `Content-Security-Policy`).
    pub allow_svg: bool,
    /// Whether `/image-proxy` may connect to non-global (loopback, private, link-local) addresses.
    pub allow_private_networks: bool,
    /// Limit on establishing the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Limit from sending the request to receiving the whole response head.
    pub header_timeout: Duration,
    /// Longest pause between two body reads before the fetch is aborted.
    pub idle_timeout: Duration,
    /// Longest a fetch may take from sending its request to its last body byte.
    pub total_timeout: Duration,
    /// Largest object fetched at all, in bytes.
    pub max_object_bytes: u64,
    /// Redirects `/image-proxy` follows; every hop is checked like the first URL.
    pub max_redirects: usize,
    /// `User-Agent` sent to origins.
    pub user_agent: String,
    /// Upstream requests (fetches and uploads, every route) in flight at most; past it 503
    /// `busy`. 0: derived from the process's descriptor limit (`descriptors.rs`).
    pub max_in_flight: usize,
}

/// `[supabase]`: the Supabase Storage reverse-proxy route.
#[derive(Debug, Clone)]
pub struct SupabaseConfig {
    /// Project URL without a trailing slash; `None` turns the route off.
    pub upstream: Option<Url>,
    /// The route's `preserve_host` (see [`RouteConfig::preserve_host`]).
    pub preserve_host: bool,
    /// The route's `cdn_cache_control` and `surrogate_control`: `None` (empty) to use
    /// `[cache]`'s.
    pub cdn_cache_control: Option<Option<http::HeaderValue>>,
    pub surrogate_control: Option<Option<http::HeaderValue>>,
}

/// `[cache]`: the memory tier.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Largest body teed into the memory tier, in bytes.
    pub max_cacheable_bytes: u64,
    /// Weighted capacity of the memory tier, in bytes of body plus stored headers.
    pub memory_capacity_bytes: u64,
    /// Freshness lifetime of responses that state none.
    pub default_ttl: Duration,
    /// How long a request waits for another request's fill of the same key to produce a response
    /// head (collapsed forwarding) before fetching on its own.
    pub lock_timeout: Duration,
    /// Cap on heuristic freshness (10% of the time since `Last-Modified`).
    pub max_heuristic_ttl: Duration,
    /// Freshness of 404, 405, 410, 414 and 501 responses that state none.
    pub negative_ttl: Duration,
    /// How long a stale response is kept past its freshness, to be served with `max-stale` or
    /// revalidated.
    pub stale_retention: Duration,
    /// How long past its freshness a stored response may stand in when the origin cannot be
    /// reached (no response head: connection refused, reset, timed out), unless it must be
    /// revalidated: RFC 9111 §4.2.4 allows stale responses when "disconnected". Zero: never.
    pub stale_if_unreachable: Duration,
    /// Directory of the disk tier; `None` turns it off.
    pub disk_dir: Option<std::path::PathBuf>,
    /// Capacity of the disk tier, in bytes of its data files.
    pub disk_capacity_bytes: u64,
    /// `[cache.shared]`: the optional shared tier on Redis.
    pub shared: SharedConfig,
    /// imgedge's own targeted cache-control field (RFC 9213), lower case, first on its target
    /// list before `CDN-Cache-Control`: `imgedge-cache-control` by default; `None` when set
    /// empty.
    pub targeted_field: Option<&'static str>,
    /// Whether an origin's `CDN-Cache-Control` is passed on to clients (a CDN in front); off:
    /// it is addressed to imgedge and dropped. imgedge's own field is never passed on.
    pub forward_cdn_cache_control: bool,
    /// What responses carry towards a CDN in front, by default on every route (a route may say
    /// otherwise): `CDN-Cache-Control` (RFC 9213 §3) and `Surrogate-Control`, each `None` when
    /// not emitted (see [`TargetedOut`]).
    pub targeted_out: TargetedOut,
}

/// `[cache.shared]`: the shared tier on Redis (or Valkey), after the disk tier.
#[derive(Clone)]
pub struct SharedConfig {
    /// Where Redis is: empty turns the tier off; one `redis://` or `rediss://` URL is one server;
    /// several, comma-separated, are the seed nodes of a Redis Cluster. Never printed (they may
    /// hold a password).
    pub urls: Vec<String>,
    /// The largest entry written to (and read from) Redis, in bytes of the entry format (body,
    /// stored headers and framing).
    pub max_object_bytes: u64,
    /// How long any one Redis call may take; past it the call is a miss (or a dropped write).
    pub timeout: Duration,
}

impl SharedConfig {
    /// Whether the shared tier is configured.
    pub fn is_on(&self) -> bool {
        !self.urls.is_empty()
    }
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            urls: Vec::new(),
            max_object_bytes: 1 << 20,
            timeout: Duration::from_millis(50),
        }
    }
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("urls", &format_args!("{} (not shown)", self.urls.len()))
            .field("max_object_bytes", &self.max_object_bytes)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CacheConfig {
    /// The fallbacks `freshness::storable` applies, with a route's `default_ttl`.
    pub fn freshness_policy(
        &self,
        default_ttl: Option<Duration>,
    ) -> crate::freshness::FreshnessPolicy {
        crate::freshness::FreshnessPolicy {
            default_ttl,
            max_heuristic_ttl: self.max_heuristic_ttl,
            negative_ttl: self.negative_ttl,
            targeted_field: self.targeted_field,
            valid_until: None,
        }
    }
}

/// `[limits]`: per-client request rates on the proxy routes (`/health` and `/metrics` are
/// exempt).
#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    /// Requests a second each client may make, sustained; 0 turns limits off.
    pub per_ip_per_second: u32,
    /// Requests a client may make at once before the rate applies; 0 means `per_ip_per_second`.
    pub burst: u32,
}

/// `[transform]`: image transforms on Supabase's render route.
#[derive(Debug, Clone)]
pub struct TransformConfig {
    /// The largest `width` or `height` served, in pixels; larger requests are clamped to it.
    pub max_dimension: u32,
    /// Sources whose header announces more pixels are refused (422 `image_too_large`) before
    /// any pixel is decoded.
    pub max_source_pixels: u64,
    /// Sources with more bytes are refused (413 `too_large`) without being held whole.
    pub max_source_bytes: u64,
    /// Transforms running at once, each on a blocking thread; 0 means the number of cores.
    pub max_concurrent: usize,
    /// How long a transform may wait for a turn before 503 `overloaded`.
    pub queue_timeout: Duration,
    /// When not empty, the only `width`s served; others are 400 `bad_parameter` (against
    /// strangers rendering every width of every image).
    pub allowed_widths: Vec<u32>,
    /// The longest a transform may take, from its start (its turn, then its source read) to
    /// its output; past it 503 `transform_timeout`.
    pub timeout: Duration,
    /// Frames an animation may have; more are 422 `image_too_large`.
    pub max_animation_frames: u32,
    /// Pixels decoded over all of an animation's frames; more are 422 `image_too_large`.
    pub max_animation_pixels: u64,
    /// Whether a source fetched for a transform (or `/image-info`) is stored in the memory tier
    /// too. Off (the default): only in the tiers below it, or nowhere when there are none; the
    /// memory tier holds the renditions clients are served, not the sources they were made from
    /// (see [`crate::cache::Placement::BelowMemory`]).
    pub sources_in_memory: bool,
}

/// `[log]`: tracing output.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `"info"`.
    pub level: String,
    /// Whether every completed request is logged at info level.
    pub access: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Every problem found while loading configuration, one per field.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A configuration file must exist and be TOML: one clear problem, naming its full path (and
/// the line and column of a syntax error), rather than the same one for every key.
fn check_file(path: &Path) -> Result<(), ConfigError> {
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let problem = |what: String| ConfigError {
        problems: vec![format!("{}: {what}", shown.display())],
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| problem(format!("cannot read the configuration file: {e}")))?;
    if let Err(e) = text.parse::<toml::Table>() {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        let message = e.message().lines().collect::<Vec<_>>().join("; ");
        return Err(problem(format!("not valid TOML{at}: {message}")));
    }
    Ok(())
}

/// The memory tier leaves the rest of the process too little of the memory budget.
#[derive(Debug, thiserror::Error)]
#[error(
    "cache.memory_capacity_bytes ({memory_capacity_bytes}) exceeds 60% of the memory budget ({budget_bytes})"
)]
pub struct MemoryBudgetError {
    pub memory_capacity_bytes: u64,
    pub budget_bytes: u64,
}

impl Config {
    /// Loads the defaults, merges `file` over them when given, then the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming every missing, malformed, out-of-range or unknown key.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = file {
            check_file(path)?;
        }
        Self::from_figment(Self::figment(file, Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// The configuration [`Config::load`] reads from the same sources, as TOML: every key with
    /// the value that applies (default, file or environment), secrets (`admin.token`,
    /// `signing.keys`, a `cache.shared.url` with a password) masked. What `imgedge --check-config` prints.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn effective_toml(file: Option<&Path>) -> Result<String, ConfigError> {
        if let Some(path) = file {
            check_file(path)?;
        }
        let figment = Self::figment(file, Env::prefixed(ENV_PREFIX).split("__"));
        let mut table: toml::Table = figment.extract().map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        const MASK: &str = "(set, not shown)";
        if let Some(toml::Value::Table(admin)) = table.get_mut("admin")
            && let Some(token) = admin.get_mut("token")
            && token.as_str().is_some_and(|t| !t.trim().is_empty())
        {
            *token = MASK.into();
        }
        // A Redis URL with userinfo carries a password.
        if let Some(toml::Value::Table(cache)) = table.get_mut("cache")
            && let Some(toml::Value::Table(shared)) = cache.get_mut("shared")
            && let Some(url) = shared.get_mut("url")
            && url.as_str().is_some_and(|u| u.contains('@'))
        {
            *url = MASK.into();
        }
        if let Some(toml::Value::Table(signing)) = table.get_mut("signing")
            && let Some(toml::Value::Array(keys)) = signing.get_mut("keys")
        {
            keys.iter_mut().for_each(|k| *k = MASK.into());
        }
        toml::to_string_pretty(&table).map_err(|e| ConfigError {
            problems: vec![format!("cannot print the configuration: {e}")],
        })
    }

    /// Loads the defaults with `toml` merged over them, ignoring the environment (for tests).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(toml)))
    }

    /// The memory tier must leave room in the budget: at most 60% of it. A budget of 0 (not yet
    /// detected) passes.
    ///
    /// # Errors
    /// [`MemoryBudgetError`], naming both values.
    pub fn check_memory_budget(&self, budget_bytes: u64) -> Result<(), MemoryBudgetError> {
        let memory_capacity_bytes = self.cache.memory_capacity_bytes;
        if budget_bytes > 0 && memory_capacity_bytes as f64 > 0.6 * budget_bytes as f64 {
            return Err(MemoryBudgetError {
                memory_capacity_bytes,
                budget_bytes,
            });
        }
        Ok(())
    }
}

mod read;

#[cfg(test)]
// figment::Jail's closure signature is figment's, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.cache.max_cacheable_bytes, 5 * 1024 * 1024);
        assert_eq!(c.upstream.max_object_bytes, 50 * 1024 * 1024);
        assert!(!c.upstream.allow_private_networks);
        assert!(c.upstream.allowed_hosts.is_empty());
        assert!(c.supabase.upstream.is_none());
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let err = Config::from_toml(
            r#"
            [server]
            listen = "nowhere"
            max_url_bytes = 0
            [upstream]
            connect_timeout = "5 parsecs"
            allowed_hosts = ["ok.example", "bad host"]
            [cache]
            default_ttl = 3
            negative_ttl = "100years"
            colour = "blue"
            [log]
            format = "xml"
            [extra]
            x = 1
            "#,
        )
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "server.listen",
            "server.max_url_bytes",
            "upstream.connect_timeout",
            "upstream.allowed_hosts",
            "cache.default_ttl",
            "cache.negative_ttl",
            "cache.colour: unknown key",
            "log.format",
            "extra.x: unknown key",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        assert_eq!(err.problems.len(), 9, "{text}");
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("imgedge.toml", "[server]\nlisten = \"127.0.0.1:1\"\n")?;
            jail.set_env("IMGEDGE_SERVER__LISTEN", "0.0.0.0:9000");
            jail.set_env("IMGEDGE_UPSTREAM__ALLOWED_HOSTS", "a.example, *.b.example");
            jail.set_env("IMGEDGE_CACHE__DEFAULT_TTL", "90s");
            let c = Config::load(Some(Path::new("imgedge.toml"))).unwrap();
            assert_eq!(c.server.listen, "0.0.0.0:9000".parse().unwrap());
            assert_eq!(c.upstream.allowed_hosts.len(), 2);
            assert_eq!(c.cache.default_ttl, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        figment::Jail::expect_with(|_| {
            let err = Config::load(Some(Path::new("absent.toml"))).unwrap_err();
            assert!(err.to_string().contains("absent.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn cross_field_rules_are_checked() {
        let err = Config::from_toml("[cache]\nmemory_capacity_bytes = 1000\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("exceeds cache.memory_capacity_bytes")
        );
    }

    #[test]
    fn routes_are_parsed_validated_and_joined_by_the_supabase_route() {
        let c = Config::from_toml(
            "[supabase]\nupstream = \"https://abc.supabase.co\"\n[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9000/base/\"\n",
        )
        .unwrap();
        let names: Vec<_> = c
            .routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.name))
            .collect();
        assert_eq!(names, [("/", "route"), ("/storage/v1/", "supabase")]);
        assert_eq!(c.routes[0].upstream.as_str(), "http://127.0.0.1:9000/base");
        let err = Config::from_toml(
            "[[routes]]\nprefix = \"x\"\nupstream = \"ftp://h\"\n[[routes]]\nprefix = \"x\"\nupstream = \"http://h\"\n",
        )
        .unwrap_err()
        .to_string();
        for problem in ["must start with /", "scheme", "appears twice"] {
            assert!(err.contains(problem), "{problem}: {err}");
        }
        let err =
            Config::from_toml("[[routes]]\nprefix = \"/\"\nupstream = \"http://h\"\nextra = 1\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("extra"), "{err}");
        assert!(Config::from_toml("").unwrap().routes.is_empty());
    }

    #[test]
    fn supabase_upstream_is_normalized() {
        let c = Config::from_toml("[supabase]\nupstream = \"https://abc.supabase.co/\"\n").unwrap();
        assert_eq!(
            c.supabase.upstream.unwrap().as_str(),
            "https://abc.supabase.co/"
        );
        assert!(Config::from_toml("[supabase]\nupstream = \"ftp://x\"\n").is_err());
    }
}
