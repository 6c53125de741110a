//! How the configuration is read: field by field from the merged sources, each problem
//! collected (never the first only), then the rules that relate fields.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;
use url::Url;

use super::*;
use crate::target::HostPattern;

/// `[[routes]]` entries as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    upstream: String,
    default_ttl: Option<String>,
    store_set_cookie: Option<bool>,
    forward_request_headers: Option<Vec<String>>,
    preserve_host: Option<bool>,
    content_security_policy: Option<String>,
    cdn_cache_control: Option<String>,
    surrogate_control: Option<String>,
}

impl Config {
    pub(super) fn figment(file: Option<&Path>, env: Env) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(env)
    }

    pub(super) fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let mut f = Fields::new(&figment);
        let mut config = Config {
            server: ServerConfig {
                listen: f
                    .parse("server.listen", |s: String| {
                        s.parse::<SocketAddr>()
                            .map(Some)
                            .map_err(|e| format!("{e} (expected IP:PORT)"))
                    })
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
                max_url_bytes: f.range("server.max_url_bytes", 16, 1 << 20),
                drain_delay: f.duration_or_zero("server.drain_delay"),
                shutdown_grace: f.duration("server.shutdown_grace"),
                trusted_proxies: f.parse("server.trusted_proxies", parse_networks),
                public_hosts: f.parse("server.public_hosts", parse_host_patterns),
                max_connections: f.range("server.max_connections", 1, 1_000_000),
                max_concurrent_streams: f.range("server.max_concurrent_streams", 1, 10_000),
                header_read_timeout: f.duration("server.header_read_timeout"),
                idle_timeout: f.duration("server.idle_timeout"),
                max_request_body_bytes: f.range("server.max_request_body_bytes", 0, u64::MAX),
                request_body_timeout: f.duration("server.request_body_timeout"),
            },
            upstream: UpstreamConfig {
                allowed_hosts: f.parse("upstream.allowed_hosts", parse_host_patterns),
                trusted_private_hosts: f
                    .parse("upstream.trusted_private_hosts", parse_host_patterns),
                allow_https_downgrade: f.get("upstream.allow_https_downgrade"),
                allowed_content_types: f
                    .parse("upstream.allowed_content_types", parse_content_types),
                allow_svg: f.get("upstream.allow_svg"),
                allow_private_networks: f.get("upstream.allow_private_networks"),
                connect_timeout: f.duration("upstream.connect_timeout"),
                header_timeout: f.duration("upstream.header_timeout"),
                idle_timeout: f.duration("upstream.idle_timeout"),
                total_timeout: f.duration("upstream.total_timeout"),
                max_object_bytes: f.range("upstream.max_object_bytes", 1, u64::MAX),
                max_redirects: f.range("upstream.max_redirects", 0, 20),
                user_agent: f.parse("upstream.user_agent", |s: String| {
                    http::HeaderValue::from_str(&s)
                        .map(|_| s)
                        .map_err(|_| "not a valid header value".to_owned())
                }),
                max_in_flight: f.range("upstream.max_in_flight", 0, 1_000_000),
            },
            supabase: SupabaseConfig {
                upstream: f.parse("supabase.upstream", parse_route_upstream),
                preserve_host: f.get("supabase.preserve_host"),
                cdn_cache_control: f.parse("supabase.cdn_cache_control", |s: String| {
                    parse_targeted_value("cdn_cache_control", &s, true).map(|v| v.map(Some))
                }),
                surrogate_control: f.parse("supabase.surrogate_control", |s: String| {
                    parse_targeted_value("surrogate_control", &s, false).map(|v| v.map(Some))
                }),
            },
            routes: f.parse_optional("routes", parse_routes),
            cache: CacheConfig {
                max_cacheable_bytes: f.range("cache.max_cacheable_bytes", 0, u64::from(u32::MAX)),
                memory_capacity_bytes: f.get("cache.memory_capacity_bytes"),
                default_ttl: f.duration("cache.default_ttl"),
                lock_timeout: f.duration("cache.lock_timeout"),
                max_heuristic_ttl: f.duration("cache.max_heuristic_ttl"),
                negative_ttl: f.duration("cache.negative_ttl"),
                stale_retention: f.duration("cache.stale_retention"),
                stale_if_unreachable: f.duration_or_zero("cache.stale_if_unreachable"),
                disk_dir: f.parse("cache.disk_dir", |s: String| {
                    Ok(Some(s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .map(std::path::PathBuf::from))
                }),
                disk_capacity_bytes: f.range("cache.disk_capacity_bytes", 64 << 20, u64::MAX),
                targeted_field: f.parse("cache.targeted_field", |s: String| {
                    let name = s.trim().to_ascii_lowercase();
                    if name.is_empty() {
                        return Ok(None);
                    }
                    if http::HeaderName::try_from(name.as_str()).is_err()
                        || ["cache-control", "cdn-cache-control", "surrogate-control"]
                            .contains(&name.as_str())
                    {
                        return Err(format!(
                            "{s:?} is not a field name of imgedge's own (not Cache-Control, CDN-Cache-Control or Surrogate-Control)"
                        ));
                    }
                    // one name per process, read once: kept for the process's life
                    Ok(Some(&*Box::leak(name.into_boxed_str())))
                }),
                forward_cdn_cache_control: f.get("cache.forward_cdn_cache_control"),
                targeted_out: TargetedOut {
                    cdn_cache_control: f.parse("cache.cdn_cache_control", |s: String| {
                        parse_targeted_value("cdn_cache_control", &s, true)
                    }),
                    surrogate_control: f.parse("cache.surrogate_control", |s: String| {
                        parse_targeted_value("surrogate_control", &s, false)
                    }),
                },
                shared: SharedConfig {
                    urls: f.parse("cache.shared.url", parse_redis_urls),
                    // Redis strings hold at most 512 MiB.
                    max_object_bytes: f.range("cache.shared.max_object_bytes", 1, 512 << 20),
                    timeout: f.duration("cache.shared.timeout"),
                },
            },
            admin: AdminConfig {
                token: f.parse("admin.token", |s: String| match s.trim() {
                    "" => Ok(None),
                    t if t.len() < 16 => {
                        Err("must be at least 16 characters (or empty)".to_owned())
                    }
                    t => Ok(Some(t.to_owned())),
                }),
            },
            signing: SigningConfig {
                keys: f.parse("signing.keys", parse_keys),
            },
            limits: LimitsConfig {
                per_ip_per_second: f.range("limits.per_ip_per_second", 0, 1_000_000),
                burst: f.range("limits.burst", 0, 1_000_000),
            },
            transform: TransformConfig {
                max_dimension: f.range("transform.max_dimension", 1, 16384),
                max_source_pixels: f.range("transform.max_source_pixels", 1, 1 << 32),
                max_source_bytes: f.range("transform.max_source_bytes", 1, 1 << 32),
                max_concurrent: f.range("transform.max_concurrent", 0, 1024),
                queue_timeout: f.duration("transform.queue_timeout"),
                allowed_widths: f.parse("transform.allowed_widths", parse_widths),
                timeout: f.duration("transform.timeout"),
                max_animation_frames: f.range("transform.max_animation_frames", 1, 100_000),
                max_animation_pixels: f.range("transform.max_animation_pixels", 1, u64::MAX),
                sources_in_memory: f.get("transform.sources_in_memory"),
            },
            memory: MemoryConfig {
                budget_bytes: f.get("memory.budget_bytes"),
                sample_interval: f.duration("memory.sample_interval"),
                thresholds: crate::pressure::Thresholds {
                    evicting: f.range("memory.evicting", 0.05, 1.0),
                    warning: f.range("memory.warning", 0.05, 1.0),
                    bypass: f.range("memory.bypass", 0.05, 1.0),
                    critical: f.range("memory.critical", 0.05, 1.0),
                    emergency: f.range("memory.emergency", 0.05, 1.0),
                    hysteresis: f.range("memory.hysteresis", 0.0, 0.5),
                },
                inflight_fill_bytes: f.get("memory.inflight_fill_bytes"),
                evict_to: f.range("memory.evict_to", 0.05, 1.0),
            },
            log: LogConfig {
                format: f.parse("log.format", |s: String| match s.as_str() {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err("expected \"text\" or \"json\"".to_owned()),
                }),
                level: f.parse("log.level", |s: String| {
                    tracing_subscriber::EnvFilter::try_new(&s)
                        .map(|_| s)
                        .map_err(|e| e.to_string())
                }),
                access: f.get("log.access"),
            },
        };
        f.check_unknown_keys();
        let mut problems = f.into_problems();
        if problems.is_empty() {
            problems = config.cross_checks();
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Rules that relate two fields; run only once every field parsed.
    fn cross_checks(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let t = &self.memory.thresholds;
        if self.memory.evict_to >= t.evicting {
            problems.push(format!(
                "memory.evict_to ({}) must be below memory.evicting ({})",
                self.memory.evict_to, t.evicting
            ));
        }
        if !(t.evicting <= t.warning
            && t.warning <= t.bypass
            && t.bypass <= t.critical
            && t.critical <= t.emergency)
        {
            problems.push(
                "memory: thresholds must not decrease: evicting <= warning <= bypass <= critical <= emergency"
                    .to_owned(),
            );
        }
        if let Err(e) = self.check_memory_budget(self.memory.budget_bytes) {
            problems.push(e.to_string());
        }
        if let Some(upstream) = &self.supabase.upstream {
            if self.routes.iter().any(|r| r.prefix == SUPABASE_PREFIX) {
                problems.push(format!(
                    "routes: prefix {SUPABASE_PREFIX:?} is taken by [supabase] upstream"
                ));
            }
            self.routes.push(RouteConfig {
                prefix: SUPABASE_PREFIX.to_owned(),
                upstream: upstream.clone(),
                name: "supabase",
                default_ttl: Some(self.cache.default_ttl),
                store_set_cookie: false,
                forward_request_headers: SUPABASE_REQUEST_HEADERS
                    .iter()
                    .map(|h| HeaderPattern::parse(h).expect("a valid pattern"))
                    .collect(),
                preserve_host: self.supabase.preserve_host,
                content_security_policy: CspMode::Sandbox,
                cdn_cache_control: self.supabase.cdn_cache_control.clone(),
                surrogate_control: self.supabase.surrogate_control.clone(),
            });
        }
        let cache = &self.cache;
        if cache.max_cacheable_bytes > cache.memory_capacity_bytes {
            problems.push(format!(
                "cache.max_cacheable_bytes ({}) exceeds cache.memory_capacity_bytes ({})",
                cache.max_cacheable_bytes, cache.memory_capacity_bytes
            ));
        }
        if cache.max_cacheable_bytes > self.upstream.max_object_bytes {
            problems.push(format!(
                "cache.max_cacheable_bytes ({}) exceeds upstream.max_object_bytes ({})",
                cache.max_cacheable_bytes, self.upstream.max_object_bytes
            ));
        }
        problems
    }
}

/// Reads keys one at a time from a figment, recording every failure instead of stopping at the
/// first, and remembering which keys were read so that the rest can be reported as unknown.
struct Fields<'a> {
    figment: &'a Figment,
    read: BTreeSet<String>,
    problems: Vec<String>,
}

impl<'a> Fields<'a> {
    fn new(figment: &'a Figment) -> Self {
        Fields {
            figment,
            read: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    /// Describes where the value of `key` came from, e.g. "in /etc/imgedge.toml".
    fn source(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(meta) => match &meta.source {
                Some(source) => format!(" (from {source})"),
                None => format!(" (from {})", meta.name),
            },
            None => String::new(),
        }
    }

    fn get<T: DeserializeOwned + Default>(&mut self, key: &str) -> T {
        self.read.insert(key.to_owned());
        match self.figment.extract_inner::<T>(key) {
            Ok(value) => value,
            Err(e) => {
                let detail = e.to_string();
                let detail = detail
                    .split(" for key")
                    .next()
                    .unwrap_or(&detail)
                    .to_owned();
                self.problems
                    .push(format!("{key}: {detail}{}", self.source(key)));
                T::default()
            }
        }
    }

    /// Like [`Fields::parse`], for a key that may be absent (then `T::default()`).
    fn parse_optional<R: DeserializeOwned + Default, T: Default>(
        &mut self,
        key: &str,
        parse: impl FnOnce(R) -> Result<T, String>,
    ) -> T {
        if self.figment.find_value(key).is_err() {
            self.read.insert(key.to_owned());
            return T::default();
        }
        self.parse(key, parse)
    }

    fn parse<R: DeserializeOwned + Default, T: Default>(
        &mut self,
        key: &str,
        parse: impl FnOnce(R) -> Result<T, String>,
    ) -> T {
        let before = self.problems.len();
        let raw: R = self.get(key);
        if self.problems.len() > before {
            return T::default();
        }
        parse(raw).unwrap_or_else(|e| {
            self.problems
                .push(format!("{key}: {e}{}", self.source(key)));
            T::default()
        })
    }

    fn duration(&mut self, key: &str) -> Duration {
        self.parse(key, |s: String| match parse_duration(&s) {
            Ok(d) if d.is_zero() => Err("must be greater than zero".to_owned()),
            other => other,
        })
    }

    /// A duration that may be zero ("0s" turns the thing it times off).
    fn duration_or_zero(&mut self, key: &str) -> Duration {
        self.parse(key, |s: String| parse_duration(&s))
    }

    fn range<T>(&mut self, key: &str, min: T, max: T) -> T
    where
        T: DeserializeOwned + Default + PartialOrd + fmt::Display + Copy,
    {
        self.parse(key, |v: T| {
            if v < min || v > max {
                Err(format!("{v} is out of range {min}..={max}"))
            } else {
                Ok(v)
            }
        })
    }

    /// Records every `section.key` present in the merged sources that no field read.
    fn check_unknown_keys(&mut self) {
        let Ok(root) = self.figment.extract::<Dict>() else {
            return;
        };
        for (section, value) in &root {
            if self.read.contains(section.as_str()) {
                continue;
            }
            match value {
                Value::Dict(_, keys) => self.check_unknown_in(section, keys),
                _ => {
                    let source = self.source(section);
                    self.problems
                        .push(format!("{section}: unknown section{source}"));
                }
            }
        }
    }

    /// Records every key of the table at `path` (and of the tables in it, such as
    /// `[cache.shared]`) that no field read.
    fn check_unknown_in(&mut self, path: &str, keys: &Dict) {
        for (key, value) in keys {
            let path = format!("{path}.{key}");
            if self.read.contains(&path) {
                continue;
            }
            let inner_prefix = format!("{path}.");
            let nested = self.read.iter().any(|r| r.starts_with(&inner_prefix));
            match value {
                Value::Dict(_, inner) if nested => self.check_unknown_in(&path, inner),
                _ => {
                    let source = self.source(&path);
                    self.problems.push(format!("{path}: unknown key{source}"));
                }
            }
        }
    }

    fn into_problems(self) -> Vec<String> {
        self.problems
    }
}

/// Accepts a list of patterns, or one comma-separated string (handy in environment variables).
#[derive(serde::Deserialize, Default)]
#[serde(untagged)]
enum StringList {
    List(Vec<String>),
    Csv(String),
    #[default]
    Empty,
}

/// Accepts a list of integers, or one comma-separated string of them (an environment variable).
#[derive(serde::Deserialize, Default)]
#[serde(untagged)]
enum IntegerList {
    List(Vec<u32>),
    Csv(String),
    #[default]
    Empty,
}

/// `[transform] allowed_widths`: pixel widths, each 1-16384.
fn parse_widths(list: IntegerList) -> Result<Vec<u32>, String> {
    let widths: Vec<u32> = match list {
        IntegerList::List(v) => v,
        IntegerList::Csv(s) => StringList::Csv(s)
            .entries()
            .iter()
            .map(|e| {
                e.parse::<u32>()
                    .map_err(|_| format!("{e:?}: expected a width in pixels"))
            })
            .collect::<Result<_, _>>()?,
        IntegerList::Empty => Vec::new(),
    };
    match widths.iter().find(|w| !(1..=16384).contains(*w)) {
        Some(w) => Err(format!("{w}: expected a width of 1-16384 pixels")),
        None => Ok(widths),
    }
}

impl StringList {
    fn entries(self) -> Vec<String> {
        match self {
            StringList::List(v) => v,
            StringList::Csv(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            StringList::Empty => Vec::new(),
        }
    }
}

/// `[signing] keys`: hex strings of at least [`crate::signing::MIN_KEY_BYTES`] bytes (errors
/// name the entry's position, never its value).
fn parse_keys(list: StringList) -> Result<Vec<Vec<u8>>, String> {
    let mut bad = Vec::new();
    let mut keys = Vec::new();
    for (i, entry) in list.entries().iter().enumerate() {
        let hex = entry.trim();
        let bytes: Option<Vec<u8>> = (hex.len() % 2 == 0)
            .then(|| {
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect()
            })
            .flatten();
        match bytes {
            Some(b) if b.len() >= crate::signing::MIN_KEY_BYTES => keys.push(b),
            Some(_) => bad.push(format!(
                "key {i}: at least {} bytes ({} hex digits) are needed",
                crate::signing::MIN_KEY_BYTES,
                2 * crate::signing::MIN_KEY_BYTES
            )),
            None => bad.push(format!("key {i}: not a hex string")),
        }
    }
    if bad.is_empty() {
        Ok(keys)
    } else {
        Err(bad.join("; "))
    }
}

/// `[server] trusted_proxies`: networks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
fn parse_networks(list: StringList) -> Result<Vec<ipnet::IpNet>, String> {
    let mut bad = Vec::new();
    let mut nets = Vec::new();
    for entry in list.entries() {
        let entry = entry.trim();
        match entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => nets.push(net.trunc()),
            Err(_) => bad.push(format!(
                "{entry:?}: expected a CIDR such as \"10.0.0.0/8\" or an address"
            )),
        }
    }
    if bad.is_empty() {
        Ok(nets)
    } else {
        Err(bad.join("; "))
    }
}

/// `[upstream] allowed_content_types`: media types of the `image/` family, lower-cased, without
/// parameters; SVG is not among them (it has its own switch, `allow_svg`).
fn parse_content_types(list: StringList) -> Result<Vec<String>, String> {
    let mut bad = Vec::new();
    let mut types = Vec::new();
    for entry in list.entries() {
        let t = entry.trim().to_ascii_lowercase();
        let subtype = t.strip_prefix("image/").unwrap_or_default();
        if t == "image/svg+xml" {
            bad.push(format!(
                "{entry:?}: SVG is allowed with upstream.allow_svg, not here"
            ));
        } else if subtype.is_empty()
            || !subtype
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            bad.push(format!(
                "{entry:?}: expected an image/ media type such as \"image/png\""
            ));
        } else {
            types.push(t);
        }
    }
    if bad.is_empty() {
        Ok(types)
    } else {
        Err(bad.join("; "))
    }
}

fn parse_host_patterns(list: StringList) -> Result<Vec<HostPattern>, String> {
    let entries = list.entries();
    let mut bad = Vec::new();
    let mut patterns = Vec::new();
    for entry in entries {
        match entry.parse::<HostPattern>() {
            Ok(p) => patterns.push(p),
            Err(e) => bad.push(format!("{entry:?}: {e}")),
        }
    }
    if bad.is_empty() {
        Ok(patterns)
    } else {
        Err(bad.join("; "))
    }
}

/// Validates `[[routes]]`: each prefix starts with `/` and appears once; each upstream is an
/// http(s) URL.
fn parse_routes(raw: Vec<RawRoute>) -> Result<Vec<RouteConfig>, String> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut bad = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        if !r.prefix.starts_with('/') {
            bad.push(format!("[{i}] prefix {:?} must start with /", r.prefix));
        }
        if !seen.insert(r.prefix.clone()) {
            bad.push(format!("[{i}] prefix {:?} appears twice", r.prefix));
        }
        let default_ttl = match r.default_ttl.as_deref().map(humantime::parse_duration) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                bad.push(format!("[{i}] default_ttl: {e}"));
                None
            }
        };
        let mut forward_request_headers = Vec::new();
        for name in r.forward_request_headers.iter().flatten() {
            match HeaderPattern::parse(name) {
                Ok(p) => forward_request_headers.push(p),
                Err(e) => bad.push(format!("[{i}] forward_request_headers: {e}")),
            }
        }
        // empty or absent: the route uses [cache]'s
        let mut targeted = |name: &str, value: &Option<String>, cdn: bool| {
            value
                .as_ref()
                .and_then(|v| match parse_targeted_value(name, v, cdn) {
                    Ok(v) => v.map(Some),
                    Err(e) => {
                        bad.push(format!("[{i}] {e}"));
                        None
                    }
                })
        };
        let cdn_cache_control = targeted("cdn_cache_control", &r.cdn_cache_control, true);
        let surrogate_control = targeted("surrogate_control", &r.surrogate_control, false);
        let content_security_policy = match r.content_security_policy.as_deref() {
            None | Some("sandbox") => CspMode::Sandbox,
            Some("origin") => CspMode::Origin,
            Some(other) => {
                bad.push(format!(
                    "[{i}] content_security_policy {other:?}: want \"sandbox\" or \"origin\""
                ));
                CspMode::Sandbox
            }
        };
        match parse_route_upstream(r.upstream.clone()) {
            Ok(Some(upstream)) => routes.push(RouteConfig {
                prefix: r.prefix,
                upstream,
                name: "route",
                default_ttl,
                store_set_cookie: r.store_set_cookie.unwrap_or(false),
                forward_request_headers,
                preserve_host: r.preserve_host.unwrap_or(false),
                content_security_policy,
                cdn_cache_control,
                surrogate_control,
            }),
            Ok(None) => bad.push(format!("[{i}] upstream is empty")),
            Err(e) => bad.push(format!("[{i}] upstream {e}")),
        }
    }
    if bad.is_empty() {
        Ok(routes)
    } else {
        Err(bad.join("; "))
    }
}

/// A `cdn_cache_control` or `surrogate_control` value to emit: empty for none; otherwise a
/// valid field value and, for `CDN-Cache-Control`, a valid Structured Field Dictionary (RFC 9213
/// §2.1: a CDN ignores one that is not).
fn parse_targeted_value(
    name: &str,
    value: &str,
    cdn: bool,
) -> Result<Option<http::HeaderValue>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let header = http::HeaderValue::from_str(value)
        .map_err(|_| format!("{name} {value:?} is not a valid field value"))?;
    if cdn && !crate::freshness::is_dictionary(value) {
        return Err(format!(
            "{name} {value:?} is not a Structured Field Dictionary (RFC 9213 §2.1), e.g. \"max-age=31536000\""
        ));
    }
    Ok(Some(header))
}

/// `[cache.shared] url`: empty (off), one `redis://` or `rediss://` URL, or several
/// comma-separated (the seed nodes of a Redis Cluster). Errors never repeat a URL, which may
/// hold a password.
fn parse_redis_urls(s: String) -> Result<Vec<String>, String> {
    let urls: Vec<String> = StringList::Csv(s).entries();
    for (i, url) in urls.iter().enumerate() {
        let which = if urls.len() > 1 {
            format!("URL {i}: ")
        } else {
            String::new()
        };
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(format!(
                "{which}expected redis://HOST:PORT or rediss://HOST:PORT (several, comma-separated, for a Redis Cluster)"
            ));
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            return Err(format!(
                "{which}not a Redis URL: {}",
                e.detail().unwrap_or("it cannot be parsed")
            ));
        }
    }
    Ok(urls)
}

/// Parses an operator-set route upstream: empty means off; otherwise an http(s) URL with no
/// query, fragment or userinfo, stored without a trailing slash.
fn parse_route_upstream(s: String) -> Result<Option<Url>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let url = Url::parse(s.trim_end_matches('/')).map_err(|e| format!("{s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{s:?}: scheme must be http or https"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?}: must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?}: must not contain credentials"));
    }
    Ok(Some(url))
}

/// A duration such as `"5s"`; at most 2^31 seconds (about 68 years), so that no sum of
/// configured and stated durations overflows.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as \"5s\" or \"250ms\")"))?;
    if d > crate::freshness::MAX_DELTA {
        return Err(format!("{s} is longer than the most allowed, 68 years"));
    }
    Ok(d)
}
