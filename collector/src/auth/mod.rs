//! Who is calling, and what they may do.
//!
//! Authentication: a bearer token from the static token file (`tokens`), a Kubernetes service
//! account token verified against the cluster's keys (`jwt`; the node from its pod-bound
//! claims), or a client certificate verified against `--client-ca` (mutual TLS; the node is the
//! certificate's DNS subject alternative name). Authorization: role `agent` may only `Ingest.Push`, and only for
//! its own node (checked per batch in `grpc`); role `reader` gets `Telemetry` and reflection.
//! Missing or bad credentials are UNAUTHENTICATED, a wrong role or node PERMISSION_DENIED; each
//! refusal is counted by reason and logged within a per-reason budget (`refusal_log`).
//!
//! With no method configured every call is allowed (loopback demos; `main` refuses that off
//! loopback unless told the network is trusted). gRPC health stays open: kubelet probes send no
//! credentials.
pub mod jwt;
pub mod keys;
pub mod oauth;
pub mod refusal_log;
pub mod tokens;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus::IntCounterVec;
use tonic::{Request, Status, service::Interceptor};
use tracing::warn;

use crate::reload::{self, Reloading};
use tokens::TokenTable;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Pushes its own node's events.
    Agent,
    /// Reads: Telemetry, reflection, /metrics, /mcp.
    Reader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Reader => "reader",
        }
    }
}

/// An authenticated caller (in the request's extensions once the interceptor let it through).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// The node an agent speaks for.
    pub node: Option<String>,
    /// For logs: which credential (never the secret).
    pub name: String,
}

/// How callers authenticate (`--auth-tokens`, `--auth-jwks`..., `--client-ca`).
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    pub tokens: Option<PathBuf>,
    pub service_accounts: Option<ServiceAccounts>,
    /// Client certificates are verified by the TLS layer (`--client-ca`); this says to accept
    /// them as agent identities.
    pub client_certs: bool,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.service_accounts.is_some() || self.client_certs
    }
}

/// Kubernetes service account tokens: where the cluster's keys are, what the tokens must say,
/// and which service accounts get which role (`NAMESPACE:NAME`).
#[derive(Clone, Debug)]
pub struct ServiceAccounts {
    /// The cluster's keys (the API server's `/openid/v1/jwks`): a file re-read when it changes,
    /// or that URL fetched.
    pub jwks: keys::KeySource,
    pub issuer: String,
    pub audience: String,
    pub agents: Vec<String>,
    pub readers: Vec<String>,
}

/// A service account token, checked and mapped to an identity.
struct ServiceAccountAuth {
    keys: keys::Keys,
    expect: jwt::Expect,
    agents: Vec<String>,
    readers: Vec<String>,
}

impl ServiceAccountAuth {
    fn identify(&self, token: &str) -> Result<Identity, String> {
        let c: jwt::ServiceAccountClaims =
            jwt::verify(token, &self.keys.set.current(), &self.expect).map_err(|e| {
                if matches!(e, jwt::JwtError::UnknownKey(_)) {
                    // A rotated signing key: fetch the set again (the agent retries).
                    self.keys.unknown_key();
                }
                format!("service account token: {e}")
            })?;
        let account = c
            .sub
            .strip_prefix("system:serviceaccount:")
            .ok_or("service account token: its subject is not a service account")?;
        let name = format!("service account {account}");
        if self.readers.iter().any(|r| r == account) {
            return Ok(Identity {
                role: Role::Reader,
                node: None,
                name,
            });
        }
        if !self.agents.iter().any(|a| a == account) {
            return Err(format!("{name} is neither an agent nor a reader account"));
        }
        // The kubelet binds projected tokens to their pod, and (Kubernetes 1.30+) names the
        // pod's node: the one node this agent may speak for.
        let node = c
            .kubernetes
            .and_then(|k| k.node)
            .map(|n| n.name)
            .ok_or("service account token: not bound to a node (a projected token from Kubernetes 1.30+ is needed)")?;
        crate::labels::node(&node)?;
        Ok(Identity {
            role: Role::Agent,
            name: format!("{name} on {node}"),
            node: Some(node),
        })
    }
}

/// Refusal reasons, the `reason` label of `gpulse_auth_refused_total`.
pub mod reason {
    pub const MISSING: &str = "missing_credentials";
    pub const BAD_TOKEN: &str = "bad_token";
    pub const BAD_CERT: &str = "bad_certificate";
    pub const WRONG_ROLE: &str = "wrong_role";
    pub const OTHER_NODE: &str = "other_node";
    pub const ALL: [&str; 5] = [MISSING, BAD_TOKEN, BAD_CERT, WRONG_ROLE, OTHER_NODE];
}

pub struct Auth {
    tokens: Option<Arc<Reloading<TokenTable>>>,
    service_accounts: Option<ServiceAccountAuth>,
    client_certs: bool,
    refused: IntCounterVec,
    logged: Mutex<refusal_log::RefusalLog>,
}

impl Auth {
    /// Loads the token file (a bad one is a start-up error) and watches it for changes.
    pub async fn new(
        cfg: &AuthConfig,
        refused: IntCounterVec,
        reloads: IntCounterVec,
    ) -> Result<Arc<Self>, String> {
        let tokens = match &cfg.tokens {
            Some(path) => {
                let p = path.clone();
                Some(reload::watch(
                    "auth_tokens",
                    vec![path.clone()],
                    reload::DEFAULT_INTERVAL,
                    reloads.clone(),
                    move || TokenTable::load(&p),
                )?)
            }
            None => None,
        };
        let service_accounts = match &cfg.service_accounts {
            Some(sa) => Some(ServiceAccountAuth {
                keys: keys::open("auth_jwks", &sa.jwks, reloads).await?,
                expect: jwt::Expect {
                    issuer: sa.issuer.clone(),
                    audience: sa.audience.clone(),
                },
                agents: sa.agents.clone(),
                readers: sa.readers.clone(),
            }),
            None => None,
        };
        for r in reason::ALL {
            refused.with_label_values(&[r]);
        }
        Ok(Arc::new(Self {
            tokens,
            service_accounts,
            client_certs: cfg.client_certs,
            refused,
            logged: Mutex::default(),
        }))
    }

    /// Authentication off: every call allowed (in-process harnesses, benchmarks).
    pub fn off(refused: IntCounterVec) -> Arc<Self> {
        Arc::new(Self {
            tokens: None,
            service_accounts: None,
            client_certs: false,
            refused,
            logged: Mutex::default(),
        })
    }

    /// Authentication is on: calls without credentials are refused.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.service_accounts.is_some() || self.client_certs
    }

    /// Who presents `bearer` (the token after `Bearer `) or the verified client certificate
    /// chain `certs`. A token, when sent, decides: a bad token is not rescued by a certificate.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    ) -> Result<Identity, Status> {
        if let Some(token) = bearer {
            return self.identify_token(token).map_err(|why| {
                self.refuse(reason::BAD_TOKEN, &why);
                Status::unauthenticated(why)
            });
        }
        if self.client_certs
            && let Some(leaf) = certs.and_then(|c| c.first())
        {
            return cert_identity(leaf).map_err(|e| {
                self.refuse(reason::BAD_CERT, &e);
                Status::unauthenticated(format!("client certificate: {e}"))
            });
        }
        self.refused.with_label_values(&[reason::MISSING]).inc();
        Err(Status::unauthenticated(
            "credentials required: a bearer token (authorization: Bearer ...) or a client certificate",
        ))
    }

    /// Who holds bearer `token`: the static token file first, then service account tokens.
    /// Nothing is counted here.
    fn identify_token(&self, token: &str) -> Result<Identity, String> {
        if let Some(id) = self
            .tokens
            .as_ref()
            .and_then(|t| t.current().lookup(token).cloned())
        {
            return Ok(id);
        }
        match &self.service_accounts {
            Some(sa) if jwt::looks_like_jwt(token) => sa.identify(token),
            _ => Err("unknown or revoked bearer token".to_string()),
        }
    }

    /// `token` belongs to a reader (nothing counted: the caller tries other schemes next).
    pub fn is_reader_token(&self, token: &str) -> bool {
        self.identify_token(token)
            .is_ok_and(|i| i.role == Role::Reader)
    }

    /// The caller with `role`, or the refusal.
    pub fn authorize(
        &self,
        bearer: Option<&str>,
        certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        role: Role,
    ) -> Result<Identity, Status> {
        let id = self.authenticate(bearer, certs)?;
        if id.role != role {
            self.refuse(reason::WRONG_ROLE, &id.name);
            return Err(Status::permission_denied(format!(
                "role {} may not call this ({} role required)",
                id.role.name(),
                role.name()
            )));
        }
        Ok(id)
    }

    /// Counts a refusal and logs it within its reason's budget (see `refusal_log`: an agent
    /// retrying with a revoked token, or a flood of junk, would otherwise fill or silence the
    /// log). Returns whether it was logged.
    pub fn refuse(&self, reason: &'static str, who: &str) -> bool {
        self.refused.with_label_values(&[reason]).inc();
        let line = self.logged.lock().unwrap_or_else(|p| p.into_inner()).admit(
            reason,
            who,
            std::time::Instant::now(),
        );
        match line {
            Some(l) => {
                warn!(
                    reason,
                    who,
                    unlogged_before = l.unlogged_before,
                    "call refused (each caller once per 10 min, at most 20 lines a minute per reason)"
                );
                true
            }
            None => false,
        }
    }

    /// A gRPC interceptor admitting `role` only (everyone while auth is off); puts the
    /// caller's `Identity` into the request's extensions.
    pub fn interceptor(self: &Arc<Self>, role: Role) -> RoleInterceptor {
        RoleInterceptor {
            auth: self.clone(),
            role,
        }
    }
}

/// The agent identity a verified client certificate carries: its first DNS name that is a
/// valid node name.
fn cert_identity(leaf: &rustls::pki_types::CertificateDer<'_>) -> Result<Identity, String> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unreadable: {e}"))?;
    let node = cert
        .valid_dns_names()
        .find(|n| crate::labels::node(n).is_ok())
        .ok_or("no DNS subject alternative name that is a node name")?;
    Ok(Identity {
        role: Role::Agent,
        node: Some(node.to_string()),
        name: format!("certificate for {node}"),
    })
}

/// The token of an `authorization: Bearer <token>` value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[derive(Clone)]
pub struct RoleInterceptor {
    auth: Arc<Auth>,
    role: Role,
}

impl Interceptor for RoleInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if !self.auth.enabled() {
            return Ok(req);
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let certs = req.peer_certs();
        let id = self.auth.authorize(
            bearer(header),
            certs.as_deref().map(Vec::as_slice),
            self.role,
        )?;
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
