//! Storage's render routes' contract: which route ([`RenderKind`]), their parameters
//! ([`render_params`]: the query's, or a signed URL token's [`TokenClaims`]) and the
//! `X-Transformations` header Storage answers with ([`x_transformations`]).

use base64::Engine;
use http::HeaderValue;
use percent_encoding::percent_decode_str;

use super::{SUPABASE_PUBLIC_PREFIX, SUPABASE_RENDER_PREFIX};
use crate::error::ProxyError;
use crate::transform::{Fit, Params};

/// What imgedge reads of a Storage signed-URL token (a JWT): when it expires and, for a signed
/// render URL, the transformations it was signed with. Read, never verified: Storage verifies
/// the token itself when imgedge fetches the original with it, so a token it refuses renders
/// nothing, and one it accepts carries transformations it signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenClaims {
    /// `exp`: seconds since the epoch.
    pub exp: Option<u64>,
    /// `transformations`, as `getSignedURL` writes them (`height:1,width:1,resize:cover,...`).
    pub transformations: Option<String>,
}

impl TokenClaims {
    /// The claims of the `token=` query parameter of `query`; `None` when there is none or it is
    /// not a JWT whose payload is a JSON object.
    pub(crate) fn of_query(query: Option<&str>) -> Option<TokenClaims> {
        let token = query?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))?;
        let token = percent_decode_str(token).decode_utf8().ok()?;
        let payload = token.split('.').nth(1)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
        let claims = claims.as_object()?;
        Some(TokenClaims {
            exp: claims.get("exp").and_then(serde_json::Value::as_u64),
            transformations: claims
                .get("transformations")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        })
    }

    /// When the token stops being valid.
    pub(crate) fn expires_at(&self) -> Option<std::time::SystemTime> {
        self.exp
            .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
    }
}

/// Which of Supabase's render routes: each renders the object its object route of the same
/// kind serves (`/render/image/public/b/p` → `/object/public/b/p`, `authenticated` with the
/// client's credentials, `sign` with the URL's token, which Storage verifies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderKind {
    Public,
    Authenticated,
    Signed,
}

impl RenderKind {
    /// The path prefix of this render route.
    pub fn render_prefix(self) -> &'static str {
        match self {
            RenderKind::Public => SUPABASE_RENDER_PREFIX,
            RenderKind::Authenticated => "/storage/v1/render/image/authenticated/",
            RenderKind::Signed => "/storage/v1/render/image/sign/",
        }
    }

    /// The path prefix of the object route it renders from.
    pub fn object_prefix(self) -> &'static str {
        match self {
            RenderKind::Public => SUPABASE_PUBLIC_PREFIX,
            RenderKind::Authenticated => "/storage/v1/object/authenticated/",
            RenderKind::Signed => "/storage/v1/object/sign/",
        }
    }

    /// The render route `path` is on, if any.
    pub fn of(path: &str) -> Option<RenderKind> {
        [
            RenderKind::Public,
            RenderKind::Authenticated,
            RenderKind::Signed,
        ]
        .into_iter()
        .find(|k| path.starts_with(k.render_prefix()))
    }
}

/// Storage's header listing the transformations a render applied.
pub(crate) const X_TRANSFORMATIONS: http::HeaderName =
    http::HeaderName::from_static("x-transformations");

/// The parameters of a request on Storage's render route of `kind`: its query's, or for a
/// signed URL the transformations its token carries (with `download` from the query; the
/// query's other parameters are ignored, as Storage ignores them).
///
/// # Errors
/// [`ProxyError::BadParameter`] for a bad parameter, or a signed URL without a JWT as its
/// `token`.
pub(crate) fn render_params(
    kind: RenderKind,
    query: Option<&str>,
    max_dimension: u32,
) -> Result<Params, ProxyError> {
    Ok(match kind {
        RenderKind::Signed => {
            let claims = TokenClaims::of_query(query).ok_or_else(|| {
                ProxyError::BadParameter("token: want a signed URL's token".into())
            })?;
            Params::from_transformations(
                claims.transformations.as_deref().unwrap_or_default(),
                query,
                max_dimension,
            )?
        }
        RenderKind::Public | RenderKind::Authenticated => Params::from_query(query, max_dimension)?,
    })
}

/// Storage's `X-Transformations` response header: what was applied, as its renderer lists
/// it for imgproxy (`height:1,width:1,resizing_type:fill,quality:80,format:webp,gravity:fp:0:1`;
/// `ImageRenderer.applyTransformation`): sizes and quality as asked for, `resizing_type` when a
/// size was, `format` only when one was asked for (a negotiated one is not listed); `None` when
/// none applies.
pub(crate) fn x_transformations(params: &Params) -> Option<HeaderValue> {
    let mut segments = Vec::new();
    if let Some(h) = params.height {
        segments.push(format!("height:{h}"));
    }
    if let Some(w) = params.width {
        segments.push(format!("width:{w}"));
    }
    if params.width.is_some() || params.height.is_some() {
        segments.push(
            match params.fit {
                Fit::Cover => "resizing_type:fill",
                Fit::Inside => "resizing_type:fit",
                Fit::Fill | Fit::Pad => "resizing_type:force",
            }
            .to_owned(),
        );
    }
    if let Some(q) = params.quality {
        segments.push(format!("quality:{q}"));
    }
    if let Some(format) = params.format.filter(|_| !params.negotiate) {
        segments.push(format!("format:{}", format.as_str()));
    }
    if let Some(gravity) = params.gravity.storage_name() {
        segments.push(format!("gravity:{gravity}"));
    }
    if segments.is_empty() {
        return None;
    }
    HeaderValue::from_str(&segments.join(",")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b("{\"alg\":\"HS256\"}"), b(payload))
    }

    #[test]
    fn a_token_s_expiry_and_transformations_are_read() {
        let token = jwt(
            r#"{"url":"b/a.png","exp":2000000000,"transformations":"height:1,width:1,resize:cover,gravity:fp:0:1"}"#,
        );
        let claims = TokenClaims::of_query(Some(&format!("download&token={token}"))).unwrap();
        assert_eq!(claims.exp, Some(2_000_000_000));
        assert_eq!(
            claims.transformations.as_deref(),
            Some("height:1,width:1,resize:cover,gravity:fp:0:1")
        );
        assert!(TokenClaims::of_query(Some("token=garbage")).is_none());
        assert!(TokenClaims::of_query(Some("width=1")).is_none());
        assert!(TokenClaims::of_query(None).is_none());
        assert_eq!(
            TokenClaims::of_query(Some(&format!("token={}", jwt("{}")))),
            Some(TokenClaims::default())
        );
    }

    #[test]
    fn x_transformations_spell_what_was_asked_as_storage_does() {
        let spelt = |kind: RenderKind, query: &str| {
            let params = render_params(kind, Some(query), 2500).unwrap();
            x_transformations(&params).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            spelt(
                RenderKind::Public,
                "width=40&height=20&resize=contain&quality=70&format=webp"
            )
            .as_deref(),
            Some("height:20,width:40,resizing_type:fit,quality:70,format:webp")
        );
        assert_eq!(
            spelt(RenderKind::Public, "width=40&resize=fill&gravity=noea").as_deref(),
            Some("width:40,resizing_type:force,gravity:noea")
        );
        // a negotiated format is not listed; nothing asked, no header
        assert_eq!(
            spelt(RenderKind::Authenticated, "height=9").as_deref(),
            Some("height:9,resizing_type:fill")
        );
        assert_eq!(spelt(RenderKind::Public, "download=a.png"), None);
        // a signed URL: the token's, not the query's
        let token = jwt(r#"{"transformations":"width:8,resize:undefined,gravity:fp:0.25:1"}"#);
        assert_eq!(
            spelt(RenderKind::Signed, &format!("width=99&token={token}")).as_deref(),
            Some("width:8,resizing_type:fill,gravity:fp:0.25:1")
        );
        assert!(render_params(RenderKind::Signed, Some("width=9"), 2500).is_err());
        assert!(render_params(RenderKind::Public, Some("width=-1"), 2500).is_err());
    }
}
