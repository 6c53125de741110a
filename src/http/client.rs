//! Who a request comes from and what it asked for: the client ([`Client`]: the peer, or
//! behind `[server] trusted_proxies` the address they name), the scheme, host and port it was
//! sent to ([`Asked`]), and what an origin is told of both ([`forwarded`]: `X-Forwarded-*`,
//! `Forwarded`, RFC 7239).

use std::net::{IpAddr, SocketAddr};

use http::header::HOST;
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Uri};
use ipnet::IpNet;

use crate::proxy::ForwardedFor;
use crate::target::HostPattern;

/// Who a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    /// The peer of the connection the request came on.
    pub peer: SocketAddr,
    /// The client it is for: the peer, unless the peer is a trusted proxy that named another.
    pub ip: IpAddr,
    /// Whether the peer is in `[server] trusted_proxies`: what it says of the request
    /// (`X-Forwarded-*`, `Forwarded`) is believed.
    pub behind_proxy: bool,
}

impl Client {
    /// The client of a request with `headers` from `peer`: the peer itself, unless the peer is
    /// in `trusted_proxies` (`[server] trusted_proxies`); then the rightmost address of `X-Forwarded-For` (else of
    /// `Forwarded`'s `for=`) that is not a trusted proxy, or the leftmost when all are. What an
    /// untrusted peer says about clients is ignored.
    pub(crate) fn identify(
        headers: &HeaderMap,
        peer: SocketAddr,
        trusted_proxies: &[IpNet],
    ) -> Client {
        let ip = peer.ip().to_canonical();
        let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&ip) {
            return Client {
                peer,
                ip,
                behind_proxy: false,
            };
        }
        let client = |ip| Client {
            peer,
            ip,
            behind_proxy: true,
        };
        let mut chain = forwarded_for(headers);
        if chain.is_empty() {
            return client(ip);
        }
        let first = chain[0];
        while let Some(hop) = chain.pop() {
            if !trusted(&hop) {
                return client(hop);
            }
        }
        client(first)
    }
}

/// Where a request says it was sent: the scheme, host and port the client asked for, from the
/// request's own `Host` (or HTTP/2 `:authority`) over `http`, or from a trusted proxy
/// (`client.behind_proxy`) its `X-Forwarded-Proto`, `-Host`, `-Port` (else `Forwarded`'s
/// `proto=`, `host=`). Holds the header values (cheap handles) and reads them only when asked,
/// so a request that never needs them (most hits) costs no parsing.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    behind_proxy: bool,
    /// The URI's authority (HTTP/2), else `Host`.
    host: Option<HeaderValue>,
    forwarded_proto: Option<HeaderValue>,
    forwarded_host: Option<HeaderValue>,
    forwarded_port: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

impl Asked {
    /// What a request with `headers` and `uri` from `client` says.
    pub(crate) fn of(headers: &HeaderMap, uri: &Uri, client: &Client) -> Self {
        let host = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| headers.get(HOST).cloned());
        let from_proxy = |name: &str| {
            client
                .behind_proxy
                .then(|| headers.get(name).cloned())
                .flatten()
        };
        Asked {
            behind_proxy: client.behind_proxy,
            host,
            forwarded_proto: from_proxy("x-forwarded-proto"),
            forwarded_host: from_proxy("x-forwarded-host"),
            forwarded_port: from_proxy("x-forwarded-port"),
            forwarded: from_proxy("forwarded"),
        }
    }

    /// `http` or `https`, and the host; no host when none was given or it is not a valid
    /// authority. With `own_host`, the request's own `Host` stands in when a trusted proxy
    /// names none (as Kong's `X-Forwarded-Host` falls back to `$host`).
    fn target(&self, own_host: bool) -> (&'static str, Option<TargetHost>) {
        let first = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let from_forwarded = |param: &str| {
            self.forwarded
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|element| {
                    element.split(';').find_map(|pair| {
                        let (name, value) = pair.split_once('=')?;
                        name.trim()
                            .eq_ignore_ascii_case(param)
                            .then(|| value.trim().trim_matches('"').to_owned())
                    })
                })
        };
        let own = || {
            self.host
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (proto, host, port) = if self.behind_proxy {
            let proto = first(&self.forwarded_proto).or_else(|| from_forwarded("proto"));
            let named = first(&self.forwarded_host).or_else(|| from_forwarded("host"));
            let port = first(&self.forwarded_port).and_then(|p| p.parse::<u16>().ok());
            match named {
                Some(host) => (proto, Some(host), port),
                None if own_host => (proto, own(), None),
                None => (proto, None, port),
            }
        } else {
            (None, own(), None)
        };
        let proto = match proto.map(|p| p.to_ascii_lowercase()).as_deref() {
            Some("https") => "https",
            _ => "http",
        };
        let default_port = if proto == "https" { 443 } else { 80 };
        let host = host
            .and_then(|h| h.parse::<Authority>().ok())
            .filter(|a| !a.as_str().contains('@'))
            .map(|a| {
                let name = a.host().trim_end_matches('.').to_ascii_lowercase();
                let shown = match a.port_u16() {
                    Some(p) => format!("{name}:{p}"),
                    None => name.clone(),
                };
                TargetHost {
                    name,
                    port: port.or(a.port_u16()).unwrap_or(default_port),
                    port_shown: a.port_u16().is_some(),
                    shown,
                }
            });
        (proto, host)
    }

    /// The origin the client used, as URLs on it start: `http://img.example:8080`,
    /// `https://img.example` (the port written only when it is not the scheme's default);
    /// `None` without a valid host. For answers to this one request only (see
    /// [`forwarded`] for what may be told an origin).
    pub(crate) fn origin(&self) -> Option<String> {
        let (proto, host) = self.target(true);
        let host = host?;
        let default_port = if proto == "https" { 443 } else { 80 };
        Some(if host.port_shown || host.port == default_port {
            format!("{proto}://{}", host.shown)
        } else {
            format!("{proto}://{}:{}", host.shown, host.port)
        })
    }
}

/// The host a request was made to (see [`Asked`]).
struct TargetHost {
    /// The name or address literal, lower case, without a trailing dot (`[...]` kept for IPv6).
    name: String,
    /// As `Host` writes it: `name` and, when the client gave one, `:port`.
    shown: String,
    /// The port it connected to: given, or the scheme's default.
    port: u16,
    /// Whether `shown` carries the port.
    port_shown: bool,
}

/// What an origin is told about a request ([`ForwardedFor`]): the client, and the scheme, host
/// and port it asked for ([`Asked`]).
///
/// The host is passed on only when it can be trusted not to poison what others are served: it
/// matches `public_hosts` (the names imgedge is reached by), or, with `public_hosts` empty, it
/// came from a trusted proxy or the answer will not be stored for others (`shareable` false:
/// an upload, a request with credentials). Otherwise the origin is told no host and no port, and
/// builds what it builds from its own (`Location` is rewritten on the way back).
pub(crate) fn forwarded(
    parts: &Parts,
    client: &Client,
    public_hosts: &[HostPattern],
    shareable: bool,
) -> ForwardedFor {
    let (proto, host) = Asked::of(&parts.headers, &parts.uri, client).target(false);
    let host = host
        .filter(|h| {
            if public_hosts.is_empty() {
                client.behind_proxy || !shareable
            } else {
                let bare = h.name.trim_start_matches('[').trim_end_matches(']');
                public_hosts.iter().any(|p| p.covers_port(bare, h.port))
            }
        })
        .map(|h| (h.shown, h.port));
    ForwardedFor {
        client: client.ip,
        proto,
        host,
    }
}

/// The addresses `X-Forwarded-For` lists (all lines, in order), or when it is absent those of
/// `Forwarded`'s `for=` parameters (RFC 7239); entries that are not addresses (`unknown`,
/// obfuscated names) are skipped.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let xff = values("x-forwarded-for");
    if !xff.is_empty() {
        return xff.iter().filter_map(|s| address(s)).collect();
    }
    values("forwarded")
        .iter()
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| address(value.trim().trim_matches('"')))
                    .flatten()
            })
        })
        .collect()
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:80`.
fn address(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            s.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(trusted: &[&str]) -> Vec<IpNet> {
        trusted.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn client(trusted: &[IpNet], peer: &str, headers: &[(&'static str, &str)]) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, v.parse().unwrap());
        }
        Client::identify(&h, peer.parse().unwrap(), trusted)
            .ip
            .to_string()
    }

    #[test]
    fn only_trusted_proxies_name_the_client() {
        let direct = admission(&[]);
        // An untrusted peer cannot say who the client is.
        assert_eq!(
            client(
                &direct,
                "203.0.113.7:5000",
                &[("x-forwarded-for", "1.2.3.4")]
            ),
            "203.0.113.7"
        );
        let cdn = admission(&["10.0.0.0/8", "2001:db8::/32"]);
        // The rightmost address that is not a trusted proxy: what the CDN's edge saw.
        assert_eq!(
            client(
                &cdn,
                "10.1.1.1:443",
                &[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.2.2.2")]
            ),
            "198.51.100.9"
        );
        assert_eq!(
            client(
                &cdn,
                "10.1.1.1:443",
                &[
                    ("x-forwarded-for", "10.3.3.3"),
                    ("x-forwarded-for", "10.2.2.2")
                ]
            ),
            "10.3.3.3",
            "all trusted: the leftmost"
        );
        assert_eq!(
            client(
                &cdn,
                "[::ffff:10.1.1.1]:443",
                &[(
                    "forwarded",
                    "for=\"[2001:db8::1]:80\", for=192.0.2.60;proto=https"
                )]
            ),
            "192.0.2.60"
        );
        assert_eq!(
            client(
                &cdn,
                "10.1.1.1:443",
                &[("x-forwarded-for", "unknown, garbage")]
            ),
            "10.1.1.1",
            "nothing usable: the peer"
        );
        assert_eq!(client(&cdn, "10.1.1.1:443", &[]), "10.1.1.1");
    }

    #[test]
    fn the_origin_asked_for_is_the_host_or_what_a_trusted_proxy_says() {
        let asked = |behind_proxy: bool, headers: &[(&'static str, &str)], uri: &str| {
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                h.append(*k, v.parse().unwrap());
            }
            let client = Client {
                peer: "10.0.0.1:1".parse().unwrap(),
                ip: "10.0.0.1".parse().unwrap(),
                behind_proxy,
            };
            Asked::of(&h, &uri.parse().unwrap(), &client).origin()
        };
        let direct = |host: &str| asked(false, &[("host", host)], "/");
        assert_eq!(
            direct("Img.Example.:8080").as_deref(),
            Some("http://img.example:8080")
        );
        assert_eq!(
            direct("[2001:db8::1]:81").as_deref(),
            Some("http://[2001:db8::1]:81")
        );
        assert_eq!(direct("img.example").as_deref(), Some("http://img.example"));
        assert_eq!(direct("user@img.example"), None);
        assert_eq!(direct("a b"), None);
        assert_eq!(asked(false, &[], "/"), None);
        // HTTP/2: the authority
        assert_eq!(
            asked(false, &[], "http://h2.example:8443/x").as_deref(),
            Some("http://h2.example:8443")
        );
        // What an untrusted client says of proxies is ignored; a trusted proxy is believed.
        let spoof = [
            ("host", "img.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ];
        assert_eq!(
            asked(false, &spoof, "/").as_deref(),
            Some("http://img.example")
        );
        assert_eq!(
            asked(true, &spoof, "/").as_deref(),
            Some("https://evil.example")
        );
        assert_eq!(
            asked(
                true,
                &[
                    ("x-forwarded-host", "cdn.example"),
                    ("x-forwarded-port", "8443")
                ],
                "/"
            )
            .as_deref(),
            Some("http://cdn.example:8443")
        );
        assert_eq!(
            asked(
                true,
                &[("forwarded", "for=1.2.3.4;host=\"cdn.example\";proto=https")],
                "/"
            )
            .as_deref(),
            Some("https://cdn.example")
        );
        // A trusted proxy that names no host: the request's own.
        assert_eq!(
            asked(
                true,
                &[("host", "img.example"), ("x-forwarded-proto", "https")],
                "/"
            )
            .as_deref(),
            Some("https://img.example")
        );
    }
}
