//! Signed `/image-proxy` URLs. With `[signing] keys` set, a request target must end in
//! `&s=<signature>`: the unpadded base64url HMAC-SHA256, under one of the keys, of the target up
//! to (not including) `&s=`, as the client sent it, e.g. `/image-proxy?url=...&w=300`. Several
//! keys let a new one be introduced before an old one goes. Only whoever holds a key can make
//! imgedge fetch anything.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The fewest key bytes accepted: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

/// What separates the signature from what it signs.
const SIGNATURE_PARAM: &str = "&s=";

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request is not signed: it must end in &s=<signature>")]
    Missing,
    #[error("the signature does not match the request")]
    Mismatch,
}

/// The signing keys. No keys: signatures are neither required nor checked.
#[derive(Clone, Default)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    /// `keys`, each at least [`MIN_KEY_BYTES`] (the configuration checks it).
    pub fn new(keys: Vec<Vec<u8>>) -> Self {
        Signer { keys }
    }

    /// Whether requests must be signed.
    pub fn is_on(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The signature of `target` under the first key (the one new URLs are signed with).
    ///
    /// # Panics
    /// Without keys.
    pub fn sign(&self, target: &str) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.keys[0], target).finalize().into_bytes())
    }

    /// Checks that `target` (a path and query as received) ends in a signature, under any key,
    /// of what precedes it; returns that unsigned target. Compared in constant time.
    ///
    /// # Errors
    /// [`SignatureError::Missing`] without a final `&s=`, [`SignatureError::Mismatch`] when it
    /// is not a signature of the rest under any key.
    pub fn verify<'a>(&self, target: &'a str) -> Result<&'a str, SignatureError> {
        let (unsigned, signature) = target
            .rsplit_once(SIGNATURE_PARAM)
            .filter(|(_, s)| !s.contains('&'))
            .ok_or(SignatureError::Missing)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SignatureError::Mismatch)?;
        let valid = self
            .keys
            .iter()
            .any(|key| mac(key, unsigned).verify_slice(&signature).is_ok());
        if valid {
            Ok(unsigned)
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

fn mac(key: &[u8], target: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(target.as_bytes());
    mac
}

/// Characters percent-encoded in a `url=` value: everything but the unreserved ones
/// (RFC 3986 §2.3), so that the value is one query parameter whatever the URL holds.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `/image-proxy` target for `url` with `params` (`(name, value)`, in order, values
/// percent-encoded), signed with `signer`'s first key when it has keys: what `imgedge sign`
/// prints.
pub fn image_proxy_target(url: &str, params: &[(String, String)], signer: &Signer) -> String {
    let mut target = format!("/image-proxy?url={}", utf8_percent_encode(url, URL_VALUE));
    for (name, value) in params {
        target.push('&');
        target.extend(utf8_percent_encode(name, URL_VALUE).map(str::to_owned));
        target.push('=');
        target.extend(utf8_percent_encode(value, URL_VALUE).map(str::to_owned));
    }
    if signer.is_on() {
        let signature = signer.sign(&target);
        target.push_str(SIGNATURE_PARAM);
        target.push_str(&signature);
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(keys: &[&[u8]]) -> Signer {
        Signer::new(keys.iter().map(|k| k.to_vec()).collect())
    }

    #[test]
    fn signatures_verify_under_any_key_and_nothing_else_does() {
        let old = signer(&[b"0123456789abcdef-old"]);
        let both = signer(&[b"0123456789abcdef-new", b"0123456789abcdef-old"]);
        let target = image_proxy_target(
            "https://img.example/a b.jpg?x=1&y=2",
            &[("w".into(), "300".into())],
            &old,
        );
        assert!(
            target.starts_with(
                "/image-proxy?url=https%3A%2F%2Fimg.example%2Fa%20b.jpg%3Fx%3D1%26y%3D2&w=300&s="
            ),
            "{target}"
        );
        let unsigned = target.rsplit_once("&s=").unwrap().0;
        // Rotation: signed with the old key, accepted while it is still listed.
        assert_eq!(both.verify(&target), Ok(unsigned));
        assert_eq!(
            signer(&[b"0123456789abcdef-new"]).verify(&target),
            Err(SignatureError::Mismatch)
        );
        // Any change to what was signed, or to the signature, is refused.
        for tampered in [
            target.replace("w=300", "w=301"),
            target.replace("img.example", "img.exampla"),
            format!("{target}x"),
            format!("{unsigned}&s="),
            format!("{target}&w=1"),
        ] {
            assert!(old.verify(&tampered).is_err(), "{tampered}");
        }
        assert_eq!(old.verify(unsigned), Err(SignatureError::Missing));
        assert_eq!(
            old.verify("/image-proxy?url=x&s=abc&w=1"),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_target_in_unpadded_base64url() {
        // RFC 4231 test case 2 (key "Jefe"), as base64url without padding.
        let jefe = Signer::new(vec![b"Jefe".to_vec()]);
        assert_eq!(
            jefe.sign("what do ya want for nothing?"),
            "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM"
        );
    }
}
