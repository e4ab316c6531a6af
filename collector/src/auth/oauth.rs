//! `/mcp` as an OAuth 2.1 resource server, as the MCP authorization specification defines it:
//! access tokens are JWTs from a configured issuer, verified against its JWKS, with the audience
//! bound to this MCP server's resource URL (RFC 8707) and the read scope required. What to
//! advertise (Protected Resource Metadata, RFC 9728) is served by `gpulse_mcp::http`.
use std::sync::Arc;

use gpulse_mcp::http::{BearerCheck, Check, OAuthResource};
use prometheus::IntCounterVec;

use super::{
    jwt::{self, AccessClaims},
    keys::{self, KeySource, Keys},
};

/// `--mcp-oauth-issuer`, `--mcp-oauth-jwks`, `--mcp-resource-url`, `--mcp-oauth-scope`.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    pub issuer: String,
    /// The authorization server's keys: its `jwks_uri`, or a file.
    pub jwks: KeySource,
    /// The canonical URL of `/mcp` (e.g. `https://gpulse.example.com/mcp`): the audience tokens
    /// must carry.
    pub resource: String,
    pub scope: String,
}

pub struct OAuthVerifier {
    keys: Keys,
    expect: jwt::Expect,
    scope: String,
}

impl OAuthVerifier {
    pub async fn new(cfg: &OAuthConfig, reloads: IntCounterVec) -> Result<Self, String> {
        Ok(Self {
            keys: keys::open("mcp_oauth_jwks", &cfg.jwks, reloads).await?,
            expect: jwt::Expect {
                issuer: cfg.issuer.clone(),
                audience: cfg.resource.clone(),
            },
            scope: cfg.scope.clone(),
        })
    }

    pub fn check(&self, token: &str) -> Check {
        if !jwt::looks_like_jwt(token) {
            return Check::Invalid;
        }
        match jwt::verify::<AccessClaims>(token, &self.keys.set.current(), &self.expect) {
            Ok(c) if c.has_scope(&self.scope) => Check::Allowed,
            Ok(c) => {
                tracing::debug!(sub = %c.sub, scope = %self.scope, "MCP access token lacks the scope");
                Check::InsufficientScope
            }
            Err(e) => {
                if matches!(e, jwt::JwtError::UnknownKey(_)) {
                    self.keys.unknown_key();
                }
                tracing::debug!(error = %e, "MCP access token refused");
                Check::Invalid
            }
        }
    }
}

impl OAuthConfig {
    /// What `/.well-known/oauth-protected-resource` advertises.
    pub fn resource(&self) -> OAuthResource {
        OAuthResource {
            resource: self.resource.clone(),
            authorization_servers: vec![self.issuer.clone()],
            scopes: vec![self.scope.clone()],
        }
    }
}

/// The `/mcp` bearer check: reader tokens of `auth` (when on) and OAuth access tokens (when
/// configured); the static `--mcp-token` is checked by the MCP crate itself.
pub fn mcp_check(auth: Option<Arc<super::Auth>>, oauth: Option<Arc<OAuthVerifier>>) -> BearerCheck {
    BearerCheck::new(move |token| {
        if let Some(a) = &auth
            && a.is_reader_token(token)
        {
            return Check::Allowed;
        }
        match &oauth {
            Some(o) => o.check(token),
            None => Check::Invalid,
        }
    })
}
