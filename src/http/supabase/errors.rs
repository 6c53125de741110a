//! How Storage writes an error ([`ErrorBody`]): imgedge's own errors on the Supabase routes in
//! Storage's JSON, or S3's XML on its S3 protocol.

use http::{HeaderValue, StatusCode};

use crate::config::SUPABASE_PREFIX;

/// How imgedge's own errors are written on a Supabase path: as Storage's error handler writes
/// them, so that supabase-js and the AWS SDKs read them as Storage's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ErrorBody {
    /// The REST API (objects, buckets, render, uploads): JSON, `{"statusCode": "413", "code":
    /// "EntityTooLarge", "error": "EntityTooLarge", "message": "...", "imgedgeCode":
    /// "payload_too_large"}`, as Storage's `StorageBackendError.render()` writes it:
    /// `statusCode` is the status as a string, `code` and `error` Storage's error code, which
    /// supabase-js and Storage's acceptance suite read; imgedge's own stable code is added as
    /// `imgedgeCode`.
    Json,
    /// The S3 protocol (`/storage/v1/s3/...`): XML, `<Error><Code>`, `<Message>`, `<Resource>`
    /// (the bucket and key), as Storage's S3 error handler writes it and AWS SDKs parse it, and
    /// imgedge's code in `<ImgedgeCode>`.
    S3 {
        /// The path after `/storage/v1/s3/`, without its trailing slash.
        resource: String,
    },
}

impl ErrorBody {
    /// How errors are written on `path`, a path of the Supabase route.
    pub(crate) fn for_path(path: &str) -> ErrorBody {
        match path
            .strip_prefix(SUPABASE_PREFIX)
            .and_then(|p| p.strip_prefix("s3"))
        {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => ErrorBody::S3 {
                resource: rest.trim_matches('/').to_owned(),
            },
            _ => ErrorBody::Json,
        }
    }

    /// The body and its `Content-Type` of an error with `status`, imgedge's `code` and
    /// `message`.
    pub(crate) fn render(
        &self,
        status: StatusCode,
        code: &str,
        message: &str,
    ) -> (HeaderValue, String) {
        let storage = storage_code(code, status);
        match self {
            ErrorBody::Json => {
                let body = serde_json::json!({
                    "statusCode": status.as_u16().to_string(),
                    "code": storage,
                    "error": storage,
                    "message": message,
                    "imgedgeCode": code,
                });
                (
                    HeaderValue::from_static("application/json"),
                    format!("{body}\n"),
                )
            }
            ErrorBody::S3 { resource } => (
                HeaderValue::from_static("application/xml"),
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{storage}</Code>\
                     <Message>{}</Message><Resource>{}</Resource><ImgedgeCode>{code}</ImgedgeCode>\
                     </Error>\n",
                    xml_escape(message),
                    xml_escape(resource),
                ),
            ),
        }
    }
}

/// Storage's error code (its `ErrorCode`, also S3's) for imgedge's `code` with `status`: the
/// one Storage uses for the same condition, else `InvalidRequest` for a 4xx and
/// `InternalError` for the rest, as its error handler falls back.
fn storage_code(code: &str, status: StatusCode) -> &'static str {
    match code {
        "payload_too_large" | "too_large" => "EntityTooLarge",
        "bad_path" => "InvalidKey",
        "rate_limited" | "overloaded" | "busy" => "SlowDown",
        "unauthorized" => "AccessDenied",
        _ if status.is_client_error() => "InvalidRequest",
        _ => "InternalError",
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_written_as_storage_writes_them() {
        let json = ErrorBody::for_path("/storage/v1/object/public/b/k.png");
        assert_eq!(json, ErrorBody::Json);
        assert_eq!(ErrorBody::for_path("/storage/v1/s3x/a"), ErrorBody::Json);
        let (kind, body) = json.render(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "big");
        assert_eq!(kind, "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "statusCode": "413",
                "code": "EntityTooLarge",
                "error": "EntityTooLarge",
                "message": "big",
                "imgedgeCode": "payload_too_large",
            })
        );
        for (status, code, storage) in [
            (400, "bad_path", "InvalidKey"),
            (429, "rate_limited", "SlowDown"),
            (503, "busy", "SlowDown"),
            (408, "request_timeout", "InvalidRequest"),
            (400, "bad_parameter", "InvalidRequest"),
            (502, "upstream_error", "InternalError"),
            (504, "upstream_timeout", "InternalError"),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            let (_, body) = json.render(status, code, "m");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["code"], storage, "{code}");
        }

        let s3 = ErrorBody::for_path("/storage/v1/s3/bucket/dir/k.bin/");
        assert_eq!(
            s3,
            ErrorBody::S3 {
                resource: "bucket/dir/k.bin".into()
            }
        );
        let (kind, body) = s3.render(StatusCode::REQUEST_TIMEOUT, "request_timeout", "a <b> & c");
        assert_eq!(kind, "application/xml");
        assert_eq!(
            body,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidRequest</Code>\
             <Message>a &lt;b&gt; &amp; c</Message><Resource>bucket/dir/k.bin</Resource>\
             <ImgedgeCode>request_timeout</ImgedgeCode></Error>\n"
        );
        assert_eq!(
            ErrorBody::for_path("/storage/v1/s3"),
            ErrorBody::S3 {
                resource: String::new()
            }
        );
    }
}
