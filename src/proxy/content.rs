//! What `/image-proxy` serves: images, and nothing else. An origin's response must name one
//! allowed `image/` type, must not be content-coded, and its first bytes must be that format's
//! signature (the `image` crate's); otherwise it is 502 `not_an_image`, decided before any body
//! byte is sent and with nothing stored. This is what keeps an image proxy from serving HTML or
//! script from its own origin (go-camo's, imgproxy's and Next.js's CVEs).

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use image::ImageFormat;

use crate::config::UpstreamConfig;
use crate::error::ProxyError;

/// `Content-Security-Policy` of every `/image-proxy` response: nothing may load or run.
pub(crate) static IMAGE_CSP: HeaderValue = HeaderValue::from_static("default-src 'none'; sandbox");

/// `Content-Security-Policy` of an SVG served with `allow_svg`: its inline styles only.
pub(crate) static SVG_CSP: HeaderValue =
    HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; sandbox");

/// `Content-Security-Policy` of route responses whose type can run script (see
/// [`may_run_script`]): nothing loads or runs, inline styles aside, and the document is
/// sandboxed into an opaque origin, so a bucket's HTML or SVG cannot act as imgedge's origin.
pub(crate) static SCRIPT_CSP: HeaderValue =
    HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; sandbox");

/// Whether a response of this `Content-Type` could run script when a browser opens it: true for
/// HTML, XHTML, XML, SVG and anything not known to be passive (no type at all included); false
/// for images other than SVG, audio, video, fonts, plain text, CSV, CSS, JavaScript (which runs
/// only in the page that includes it), JSON, PDF, and archives and octet streams (downloaded).
pub(crate) fn may_run_script(content_type: Option<&HeaderValue>) -> bool {
    let Some(media_type) = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
    else {
        return true;
    };
    let (kind, sub) = media_type.split_once('/').unwrap_or((&media_type, ""));
    let passive = match kind {
        "image" => sub != "svg+xml" && !sub.is_empty(),
        "audio" | "video" | "font" => !sub.is_empty(),
        "text" => matches!(sub, "plain" | "csv" | "css" | "javascript"),
        "application" => {
            matches!(
                sub,
                "json"
                    | "pdf"
                    | "octet-stream"
                    | "zip"
                    | "gzip"
                    | "x-gzip"
                    | "x-tar"
                    | "wasm"
                    | "javascript"
            ) || sub.ends_with("+json")
        }
        _ => false,
    };
    !passive
}

/// The SVG media type, served only with `[upstream] allow_svg`.
pub(crate) const SVG: &str = "image/svg+xml";

/// Bytes read ahead of a body to check its signature: more than any signature `image` knows
/// (AVIF's is 12, WebP's 12) and than an SVG's opening tag after a byte-order mark.
pub(crate) const SIGNATURE_BYTES: usize = 64;

/// What the first bytes of a body must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signature {
    /// The signature of this format.
    Format(ImageFormat),
    /// An XML or SVG opening.
    Svg,
    /// An allowed type imgedge knows no signature for: passed as the origin labels it.
    Unknown,
}

/// `[upstream] allowed_content_types` and `allow_svg`.
#[derive(Debug, Clone)]
pub(crate) struct ContentPolicy {
    allowed: Vec<String>,
    allow_svg: bool,
}

impl ContentPolicy {
    pub(crate) fn new(config: &UpstreamConfig) -> Self {
        ContentPolicy {
            allowed: config.allowed_content_types.clone(),
            allow_svg: config.allow_svg,
        }
    }

    /// Checks an origin response's head: exactly one `Content-Type`, allowed, and no content
    /// coding (imgedge asks for `identity`). Returns the signature its body must start with.
    ///
    /// # Errors
    /// [`ProxyError::NotAnImage`], saying why.
    pub(crate) fn check_head(&self, headers: &HeaderMap) -> Result<Signature, ProxyError> {
        let refuse = |why: String| Err(ProxyError::NotAnImage(why));
        let coded = headers
            .get_all(CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .any(|c| !c.is_empty() && c != "identity");
        if coded {
            return refuse("the origin sent a compressed body (Content-Encoding)".to_owned());
        }
        let mut types = headers.get_all(CONTENT_TYPE).iter();
        let (Some(value), None) = (types.next(), types.next()) else {
            return refuse("the origin sent no Content-Type, or more than one".to_owned());
        };
        let media_type = value
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if media_type == SVG && self.allow_svg {
            return Ok(Signature::Svg);
        }
        if !self.allowed.contains(&media_type) {
            return refuse(format!(
                "the origin sent {media_type:?}, which is not in upstream.allowed_content_types"
            ));
        }
        Ok(ImageFormat::from_mime_type(&media_type).map_or(Signature::Unknown, Signature::Format))
    }

    /// Checks a body's first bytes (at least [`SIGNATURE_BYTES`], or the whole of a shorter one)
    /// against the signature its head announced.
    ///
    /// # Errors
    /// [`ProxyError::NotAnImage`] when they are something else.
    pub(crate) fn check_signature(signature: Signature, first: &[u8]) -> Result<(), ProxyError> {
        let matches = match signature {
            Signature::Format(format) => image::guess_format(first).ok() == Some(format),
            Signature::Svg => looks_like_svg(first),
            Signature::Unknown => true,
        };
        if matches {
            Ok(())
        } else {
            Err(ProxyError::NotAnImage(
                "the body does not start with the signature of its Content-Type".to_owned(),
            ))
        }
    }
}

/// An SVG document opens, after an optional byte-order mark and white space, with an XML
/// declaration, a comment, a doctype or the `<svg` element.
fn looks_like_svg(first: &[u8]) -> bool {
    let text = first.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(first);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let head = text[start..].to_ascii_lowercase();
    [&b"<?xml"[..], b"<svg", b"<!--", b"<!doctype svg"]
        .iter()
        .any(|opening| head.starts_with(opening))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_svg: bool) -> ContentPolicy {
        ContentPolicy {
            allowed: [
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "image/avif",
            ]
            .map(str::to_owned)
            .to_vec(),
            allow_svg,
        }
    }

    fn head(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_allowed_image_types_uncompressed_and_with_their_signature_pass() {
        let p = policy(false);
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let jpeg = b"\xff\xd8\xff\xe0\0\x10JFIF";
        let webp = b"RIFF\x10\0\0\0WEBPVP8 ";
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0";
        for (ct, body) in [
            ("image/png", &png[..]),
            ("IMAGE/JPEG; charset=binary", &jpeg[..]),
            ("image/webp", &webp[..]),
            ("image/avif", &avif[..]),
            ("image/gif", &b"GIF89a\x01\0"[..]),
        ] {
            let s = p.check_head(&head(&[("content-type", ct)])).unwrap();
            ContentPolicy::check_signature(s, body).unwrap_or_else(|e| panic!("{ct}: {e}"));
        }
        for pairs in [
            &[("content-type", "text/html")][..],
            &[("content-type", "image/svg+xml")],
            &[("content-type", "application/javascript")],
            &[],
            &[("content-type", "image/png"), ("content-type", "text/html")],
            &[("content-type", "image/png"), ("content-encoding", "gzip")],
            &[
                ("content-type", "image/png"),
                ("content-encoding", "identity, br"),
            ],
        ] {
            assert!(
                matches!(p.check_head(&head(pairs)), Err(ProxyError::NotAnImage(_))),
                "{pairs:?}"
            );
        }
        // Labelled PNG, but HTML (or a JPEG) inside.
        let s = p
            .check_head(&head(&[("content-type", "image/png")]))
            .unwrap();
        for body in [&b"<html><script>alert(1)</script>"[..], &jpeg[..], b""] {
            assert!(ContentPolicy::check_signature(s, body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn svg_needs_allow_svg_and_an_svg_opening() {
        let p = policy(true);
        let s = p
            .check_head(&head(&[("content-type", "image/svg+xml")]))
            .unwrap();
        assert_eq!(s, Signature::Svg);
        for body in [
            &b"<svg xmlns='http://www.w3.org/2000/svg'/>"[..],
            b"\xEF\xBB\xBF  <?xml version='1.0'?><svg/>",
            b"\n<!-- drawn --><svg/>",
            b"<!DOCTYPE svg PUBLIC '-//W3C//DTD SVG 1.1//EN' ''><svg/>",
        ] {
            assert!(ContentPolicy::check_signature(s, body).is_ok(), "{body:?}");
        }
        assert!(ContentPolicy::check_signature(s, b"<html><svg/></html>").is_err());
    }
}
