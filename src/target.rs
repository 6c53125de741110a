//! What `/image-proxy` may fetch: parsing the `url=` parameter into a normalized target, the
//! `[upstream] allowed_hosts` and `trusted_private_hosts` patterns, the ports allowed, and which
//! IP addresses count as non-global (the IANA special-purpose registries).
//!
//! Pure functions and data; the connect-time enforcement lives in `upstream.rs`, which calls
//! [`HostPolicy`] from its resolver and redirect policy.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use url::{Host, Url};

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The `url` parameter is missing or malformed; the text says which rule it broke.
    #[error("{0}")]
    BadUrl(String),
    /// `host[:port]` matches no `[upstream] allowed_hosts` entry.
    #[error("host {0} is not in upstream.allowed_hosts")]
    HostNotAllowed(String),
    /// A port other than 80 and 443 that no `allowed_hosts` or `trusted_private_hosts` entry
    /// names.
    #[error(
        "port {port} of {host} is not allowed: only 80 and 443 are, unless upstream.allowed_hosts names {host}:{port}"
    )]
    PortNotAllowed { host: String, port: u16 },
    /// The host is a non-global address literal or a localhost name.
    #[error(
        "{0} is a loopback, private, link-local or otherwise non-global address (list it in upstream.trusted_private_hosts to allow it)"
    )]
    PrivateAddress(String),
}

/// Extracts and validates the target of `/image-proxy?url=...` from the raw query string.
///
/// The value may be percent-encoded (`url=http%3A%2F%2Fh%2Fa.jpg`, decoded once, up to the next
/// `&`) or raw (`url=http://h/a.jpg?x=1&y=2`, taken verbatim to the end of the query, so a raw
/// URL must be the last parameter). Both yield the same normalized [`Url`], which is also the
/// cache key. The fragment is dropped.
///
/// # Errors
/// [`TargetError::BadUrl`] when the parameter is missing or empty, longer than `max_url_bytes`,
/// undecodable, not an absolute URL, not http/https, without a host, or carrying userinfo.
pub fn parse_image_url(query: Option<&str>, max_url_bytes: usize) -> Result<Url, TargetError> {
    let bad = |why: &str| TargetError::BadUrl(why.to_owned());
    let query = query.unwrap_or("");
    let mut value = None;
    let mut rest = query;
    while !rest.is_empty() {
        let (pair, tail) = rest.split_once('&').unwrap_or((rest, ""));
        if let Some(v) = pair.strip_prefix("url=") {
            value = Some(if looks_raw(v) {
                // A raw URL keeps its own query: everything to the end belongs to it.
                std::borrow::Cow::Borrowed(&rest["url=".len()..])
            } else {
                percent_decode_str(v)
                    .decode_utf8()
                    .map_err(|_| bad("the url parameter is not valid percent-encoded UTF-8"))?
            });
            break;
        }
        rest = tail;
    }
    let value = value.ok_or_else(|| bad("the url parameter is missing"))?;
    if value.is_empty() {
        return Err(bad("the url parameter is empty"));
    }
    if value.len() > max_url_bytes {
        return Err(TargetError::BadUrl(format!(
            "the url is {} bytes, longer than server.max_url_bytes ({max_url_bytes})",
            value.len()
        )));
    }
    let mut url = Url::parse(&value).map_err(|e| match e {
        url::ParseError::RelativeUrlWithoutBase => bad("the url is not absolute"),
        e => TargetError::BadUrl(format!("the url is invalid: {e}")),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the url scheme must be http or https"));
    }
    if url.host().is_none() {
        return Err(bad("the url has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("the url must not contain userinfo"));
    }
    url.set_fragment(None);
    normalize_host(&mut url);
    Ok(url)
}

/// Drops a domain's trailing dot (`localhost.`, `img.example.`): the same host for DNS, so the
/// same host for the allow-lists, the address guard and the cache key.
pub fn normalize_host(url: &mut Url) {
    if let Some(Host::Domain(d)) = url.host()
        && let Some(bare) = d.strip_suffix('.')
        && !bare.is_empty()
    {
        let bare = bare.to_owned();
        // A domain that parsed with its dot parses without it.
        let _ = url.set_host(Some(&bare));
    }
}

/// Whether a `url=` value is a raw URL (taken to the end of the query) rather than an encoded
/// one: a raw value starts with a literal scheme separator; an encoded one has `%3A` there.
pub(crate) fn looks_raw(value: &str) -> bool {
    let lower = |n: usize| value.get(..n).map(str::to_ascii_lowercase);
    lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://")
}

/// One `[upstream] allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `host`: that host on any port.
    Host(String),
    /// `host:port`: that host on that port only.
    HostPort(String, u16),
    /// `*.domain`: any subdomain of `domain` (not `domain` itself), any port. Holds `.domain`.
    Subdomains(String),
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let entry = entry.trim().to_ascii_lowercase();
        if let Some(domain) = entry.strip_prefix("*.") {
            return valid_host(domain)
                .map(|d| HostPattern::Subdomains(format!(".{d}")))
                .ok_or_else(|| "expected *.domain".to_owned());
        }
        // "[v6]:port", "[v6]", "host:port" or "host".
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p)) if !entry.ends_with(']') && (!h.contains(':') || h.ends_with(']')) => {
                let port = p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?;
                (h, Some(port))
            }
            _ => (entry.as_str(), None),
        };
        let host =
            valid_host(host).ok_or_else(|| "expected host, host:port or *.domain".to_owned())?;
        Ok(match port {
            Some(p) => HostPattern::HostPort(host, p),
            None => HostPattern::Host(host),
        })
    }
}

/// Normalizes a host the way [`Url::host_str`] prints it (a trailing dot dropped), or `None`
/// when it is not a host.
fn valid_host(host: &str) -> Option<String> {
    if host.is_empty() {
        return None;
    }
    let mut url = Url::parse(&format!("http://{host}/"))
        .ok()
        .filter(|u| u.port().is_none() && u.path() == "/")?;
    normalize_host(&mut url);
    url.host_str().map(str::to_owned)
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Host(h) => write!(f, "{h}"),
            HostPattern::HostPort(h, p) => write!(f, "{h}:{p}"),
            HostPattern::Subdomains(d) => write!(f, "*{d}"),
        }
    }
}

/// Ports an `/image-proxy` target may use without an allow-list entry naming its port.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

impl HostPattern {
    /// Whether the pattern covers `host`, on any of the ports it allows.
    fn covers(&self, host: &str) -> bool {
        match self {
            HostPattern::Host(h) | HostPattern::HostPort(h, _) => h == host,
            HostPattern::Subdomains(d) => host.ends_with(d.as_str()),
        }
    }

    /// Whether the pattern covers `host` on `port`: a `host:port` entry on its port, any other
    /// entry on the default ports only.
    pub fn covers_port(&self, host: &str, port: u16) -> bool {
        self.covers(host)
            && match self {
                HostPattern::HostPort(_, p) => *p == port,
                _ => DEFAULT_PORTS.contains(&port),
            }
    }
}

/// The rules for where `/image-proxy` may connect: `allowed_hosts`, the ports, and the
/// non-global address check with its exceptions (`trusted_private_hosts`,
/// `allow_private_networks`). Shared by the request path, the DNS resolver and the redirect
/// policy.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    allowed: Vec<HostPattern>,
    trusted_private: Vec<HostPattern>,
    allow_private_networks: bool,
}

impl HostPolicy {
    pub fn new(
        allowed: Vec<HostPattern>,
        trusted_private: Vec<HostPattern>,
        allow_private_networks: bool,
    ) -> Self {
        HostPolicy {
            allowed,
            trusted_private,
            allow_private_networks,
        }
    }

    /// Whether `host` matches `allowed_hosts` (always true when the list is empty), whatever
    /// the port.
    pub fn allows(&self, host: &str) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|p| p.covers(host))
    }

    /// Whether `port` may be used on `host`: 80 and 443, or a port an `allowed_hosts` or
    /// `trusted_private_hosts` entry names for it.
    pub fn allows_port(&self, host: &str, port: u16) -> bool {
        DEFAULT_PORTS.contains(&port)
            || self
                .allowed
                .iter()
                .chain(&self.trusted_private)
                .any(|p| p.covers_port(host, port))
    }

    /// Whether connections to `host` skip the address check: private networks are allowed, or a
    /// `trusted_private_hosts` entry covers it. (`allowed_hosts` says where imgedge may fetch,
    /// not that an address may be private.)
    pub fn trusts(&self, host: &str) -> bool {
        self.allow_private_networks || self.trusted_private.iter().any(|p| p.covers(host))
    }

    /// Checks a URL before it is fetched (and every redirect target): the host must be allowed,
    /// a literal IP address must be global and a name not a localhost name, unless trusted, and
    /// the port must be allowed. Other names are checked once resolved, by the resolver, because
    /// a literal address never reaches it.
    ///
    /// # Errors
    /// [`TargetError::HostNotAllowed`], [`TargetError::PrivateAddress`] or
    /// [`TargetError::PortNotAllowed`], in that order of precedence.
    pub fn check_url(&self, url: &Url) -> Result<(), TargetError> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.allows(host) {
            return Err(TargetError::HostNotAllowed(match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            }));
        }
        // Known without asking DNS: a literal non-global address, or a localhost name (RFC 6761
        // §6.3: always the loopback).
        let local = match url.host() {
            Some(Host::Ipv4(a)) => !is_global(IpAddr::V4(a)),
            Some(Host::Ipv6(a)) => !is_global(IpAddr::V6(a)),
            Some(Host::Domain(d)) => is_localhost(d),
            None => false,
        };
        if local && !self.trusts(host) {
            return Err(TargetError::PrivateAddress(host.to_owned()));
        }
        if !self.allows_port(host, port) {
            return Err(TargetError::PortNotAllowed {
                host: host.to_owned(),
                port,
            });
        }
        Ok(())
    }
}

/// Whether `name` is `localhost` or a name under it (RFC 6761 §6.3), in any case, with or
/// without a trailing dot.
fn is_localhost(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// Whether `ip` is a globally routable unicast address: not unspecified, loopback, private
/// (RFC 1918, RFC 4193), shared (RFC 6598), link-local, multicast, broadcast, documentation,
/// benchmarking or reserved space. IPv4-mapped and NAT64 (64:ff9b::/96) IPv6 addresses are judged
/// by the IPv4 address they carry.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_global_v4(a),
        IpAddr::V6(a) => is_global_v6(a),
    }
}

fn is_global_v4(a: Ipv4Addr) -> bool {
    let [b0, b1, b2, _] = a.octets();
    !(b0 == 0                                   // "this network" 0.0.0.0/8
        || a.is_loopback()                      // 127.0.0.0/8
        || a.is_private()                       // 10/8, 172.16/12, 192.168/16
        || a.is_link_local()                    // 169.254/16
        || (b0 == 100 && (b1 & 0xc0) == 64)     // shared 100.64/10
        || (b0 == 192 && b1 == 0 && b2 == 0)    // IETF protocol assignments 192.0.0/24
        || a.is_documentation()                 // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (b0 == 198 && (b1 & 0xfe) == 18)     // benchmarking 198.18/15
        || a.is_multicast()                     // 224/4
        || b0 >= 240) // reserved 240/4 and broadcast
}

/// IPv6, after the IANA IPv6 Special-Purpose Address Registry: addresses that carry an IPv4
/// address (mapped, NAT64, 6to4, Teredo) are judged by it; the other special-purpose blocks are
/// not global.
fn is_global_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_global_v4(v4);
    }
    let s = a.segments();
    let [.., o12, o13, o14, o15] = a.octets();
    let last_v4 = Ipv4Addr::new(o12, o13, o14, o15);
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052).
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_global_v4(last_v4);
    }
    // 6to4 2002::/16 (RFC 3056): the IPv4 address in bits 16-47.
    if s[0] == 0x2002 {
        let [_, _, a, b, c, d, ..] = a.octets();
        return is_global_v4(Ipv4Addr::new(a, b, c, d));
    }
    // Teredo 2001::/32 (RFC 4380): the client's IPv4 address, inverted, in the last 32 bits.
    if s[0] == 0x2001 && s[1] == 0 {
        return is_global_v4(Ipv4Addr::from(!u32::from(last_v4)));
    }
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unique_local()                  // fc00::/7
        || a.is_unicast_link_local()            // fe80::/10
        || (s[0] & 0xffc0) == 0xfec0            // deprecated site-local fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8)   // documentation 2001:db8::/32
        || (s[0] & 0xfff0) == 0x3ff0            // documentation 3fff::/20 (RFC 9637)
        || (s[0] == 0 && s[1..5] == [0, 0, 0, 0]) // IPv4-compatible and other ::/64 forms
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64 64:ff9b:1::/48
        || (s[0] == 0x100 && s[1..3] == [0, 0] && s[3] <= 1) // discard-only 100::/64, dummy 100:0:0:1::/64
        || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0) // benchmarking 2001:2::/48
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x10) // ORCHID 2001:10::/28
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x20) // ORCHIDv2 2001:20::/28
        || s[0] == 0x5f00) // SRv6 SIDs 5f00::/16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<String, TargetError> {
        parse_image_url(Some(q), 4096).map(|u| u.to_string())
    }

    #[test]
    fn raw_and_encoded_forms_are_the_same_target() {
        let raw = parse("url=http://Host.example/a.jpg").unwrap();
        let enc = parse("url=http%3A%2F%2Fhost.example%2Fa.jpg").unwrap();
        assert_eq!(raw, "http://host.example/a.jpg");
        assert_eq!(raw, enc);
        assert_eq!(
            parse("url=http://h.example/a.jpg?x=1&y=2").unwrap(),
            "http://h.example/a.jpg?x=1&y=2"
        );
        assert_eq!(
            parse("url=https%3A%2F%2Fh.example%2Fa.jpg%3Fx%3D1%26y%3D2&w=3").unwrap(),
            "https://h.example/a.jpg?x=1&y=2"
        );
        assert_eq!(
            parse("v=1&url=http://h.example/a#frag").unwrap(),
            "http://h.example/a"
        );
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for (q, why) in [
            ("", "missing"),
            ("url=", "empty"),
            ("url=%2Fa.jpg", "not absolute"),
            ("url=ftp://h/a", "scheme"),
            ("url=file:///etc/passwd", "scheme"),
            ("url=http://user:pw@h/a", "userinfo"),
            ("url=http%3A%2F%2Fu%40h%2Fa", "userinfo"),
            ("url=%FF%FE", "UTF-8"),
            ("url=http://exa mple.com/", "invalid"),
        ] {
            let err = parse(q).unwrap_err().to_string();
            assert!(err.contains(why), "{q:?}: {err}");
        }
        let long = format!("url=http://h/{}", "a".repeat(100));
        assert!(
            parse_image_url(Some(&long), 64)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
    }

    #[test]
    fn host_patterns_parse_and_match() {
        let p = |s: &str| s.parse::<HostPattern>().unwrap();
        let policy = HostPolicy::new(
            vec![
                p("Img.Example."),
                p("127.0.0.1:8080"),
                p("*.cdn.example"),
                p("[::1]:9"),
            ],
            vec![p("127.0.0.1:8080")],
            false,
        );
        assert!(policy.allows("img.example"));
        assert!(policy.allows_port("img.example", 443));
        assert!(!policy.allows_port("img.example", 8443));
        assert!(policy.allows_port("127.0.0.1", 8080));
        assert!(!policy.allows_port("127.0.0.1", 8081));
        assert!(policy.allows("a.b.cdn.example"));
        assert!(!policy.allows_port("a.b.cdn.example", 8080));
        assert!(!policy.allows("cdn.example"));
        assert!(!policy.allows("evilcdn.example"));
        assert!(policy.allows_port("[::1]", 9));
        // Allowed is not trusted with private addresses: only trusted_private_hosts is.
        assert!(policy.trusts("127.0.0.1"));
        assert!(!policy.trusts("img.example"));
        assert!(!policy.trusts("[::1]"));
        for bad in ["", "a b", "h:99999", "*.", "http://x"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
        }
        let any = HostPolicy::default();
        assert!(any.allows("anything") && any.allows_port("anything", 80));
        assert!(!any.allows_port("anything", 8080));
    }

    #[test]
    fn literal_private_addresses_are_refused_unless_trusted() {
        let policy = HostPolicy::default();
        let url = |s: &str| Url::parse(s).unwrap();
        for s in [
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[::ffff:192.168.0.1]/",
            "http://0.0.0.0/",
            "http://2130706433/",
            "http://localhost/",
            "http://api.localhost/",
        ] {
            assert!(
                matches!(
                    policy.check_url(&url(s)),
                    Err(TargetError::PrivateAddress(_))
                ),
                "{s}"
            );
        }
        assert!(policy.check_url(&url("http://93.184.215.14/")).is_ok());
        assert!(matches!(
            policy.check_url(&url("http://93.184.215.14:8080/")),
            Err(TargetError::PortNotAllowed { port: 8080, .. })
        ));
        let open = HostPolicy::new(vec![], vec![], true);
        assert!(open.check_url(&url("http://127.0.0.1/")).is_ok());
        let trusted = HostPolicy::new(vec![], vec!["127.0.0.1:9000".parse().unwrap()], false);
        assert!(trusted.check_url(&url("http://127.0.0.1:9000/")).is_ok());
        assert!(trusted.check_url(&url("http://[::1]:9000/")).is_err());
    }

    #[test]
    fn every_spelling_of_loopback_is_refused() {
        let policy = HostPolicy::default();
        for q in [
            "url=http://0177.0.0.1/a",
            "url=http://127.1/a",
            "url=http://0x7f.1/a",
            "url=http://[::7f00:1]/a",
            "url=http://[::ffff:7f00:1]/a",
            "url=http://localhost./a",
            "url=http://LOCALHOST./a",
            "url=http://[2002:7f00:1::1]/a",
            "url=http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/a",
            "url=http://[64:ff9b:1::a00:1]/a",
            "url=http://[64:ff9b::7f00:1]/a",
            "url=http://[100::1]/a",
            "url=http://[3fff::1]/a",
        ] {
            let url = parse_image_url(Some(q), 4096).unwrap();
            assert!(
                matches!(policy.check_url(&url), Err(TargetError::PrivateAddress(_))),
                "{q} -> {url}"
            );
        }
        // 6to4 and Teredo carrying a global address are global.
        for a in ["2002:808:808::1", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"] {
            assert!(is_global(a.parse().unwrap()), "{a}");
        }
        // The trailing dot goes from the cache key too.
        assert_eq!(
            parse("url=http://Img.Example./a.jpg").unwrap(),
            "http://img.example/a.jpg"
        );
    }

    #[test]
    fn global_address_classification() {
        for a in ["8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            assert!(is_global(a.parse().unwrap()), "{a}");
        }
        for a in [
            "100.64.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "198.19.0.1",
            "255.255.255.255",
            "fd00::1",
            "fe80::1",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ] {
            assert!(!is_global(a.parse().unwrap()), "{a}");
        }
    }
}
