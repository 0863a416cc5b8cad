//! The admin token (docs/API.md, Conventions): when one is configured, admin endpoints take an
//! [`Admin`] extractor, which answers 401 unless the request carries
//! `Authorization: Bearer <token>` (the scheme is case-insensitive, as HTTP says).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// Proof that the request may use an admin endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &app.admin_token else {
            return Ok(Self);
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// The token of a `Bearer` credential, whatever the case of the scheme.
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
