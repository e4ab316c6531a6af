//! JWT bearer tokens verified locally against a JSON Web Key Set: Kubernetes service account
//! tokens (the agent's projected token, audience `gpulse`) and OAuth access tokens for `/mcp`.
//!
//! Only asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA), the key is chosen by the
//! token's `kid` (a token without one must match the set's only key), and issuer, audience,
//! expiry and not-before are checked with a minute of leeway for clock skew. Keys come from a
//! file (re-read when it changes), and an unknown `kid` is answered UNAUTHENTICATED until the
//! file holds the new key (key rotation: publish the new key before signing with it).
use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk};
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 60;
/// Largest JWKS document read.
pub const MAX_JWKS_BYTES: u64 = 1 << 20;
/// Longest token looked at (a service account token is ~1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 << 10;

/// The verification keys, by key id.
pub struct KeySet {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// Keys without a `kid` (usable only when the set has exactly one key).
    anonymous: Vec<(DecodingKey, Option<Algorithm>)>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys of a type this verifier cannot use
    /// (symmetric `oct` keys, encryption keys) are skipped; a set with no usable key is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut set = KeySet {
            keys: HashMap::new(),
            anonymous: Vec::new(),
        };
        for v in doc.keys {
            if v.get("kty").and_then(|k| k.as_str()) == Some("oct")
                || v.get("use").and_then(|u| u.as_str()) == Some("enc")
            {
                continue;
            }
            let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match jwk.common.key_id {
                Some(kid) => {
                    set.keys.insert(kid, (key, alg));
                }
                None => set.anonymous.push((key, alg)),
            }
        }
        if set.keys.is_empty() && set.anonymous.is_empty() {
            return Err("the JWKS holds no usable signature key".into());
        }
        Ok(set)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = crate::reload::read_bounded(path, MAX_JWKS_BYTES)?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn key_for(&self, kid: Option<&str>) -> Option<&(DecodingKey, Option<Algorithm>)> {
        match kid {
            Some(k) => self.keys.get(k),
            None if self.keys.len() + self.anonymous.len() == 1 => {
                self.keys.values().next().or(self.anonymous.first())
            }
            None => None,
        }
    }
}

/// Who a token must come from and be meant for.
#[derive(Clone, Debug)]
pub struct Expect {
    pub issuer: String,
    pub audience: String,
}

/// Why a token was refused (the text goes back to the caller; no secrets in it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("not a JWT")]
    Malformed,
    #[error("algorithm {0:?} is not accepted (asymmetric signatures only)")]
    Algorithm(String),
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("bad signature")]
    Signature,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Only signatures that need a private key to make.
fn accepted(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A token's shape: three base64url parts (cheap, before any parsing).
pub fn looks_like_jwt(token: &str) -> bool {
    token.len() <= MAX_TOKEN_BYTES
        && token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Verifies `token` against `keys` and `expect`, returning its claims.
pub fn verify<C: serde::de::DeserializeOwned>(
    token: &str,
    keys: &KeySet,
    expect: &Expect,
) -> Result<C, JwtError> {
    if !looks_like_jwt(token) {
        return Err(JwtError::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    if !accepted(header.alg) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    let (key, key_alg) = keys
        .key_for(header.kid.as_deref())
        .ok_or_else(|| JwtError::UnknownKey(header.kid.clone().unwrap_or_default()))?;
    if key_alg.is_some_and(|a| a != header.alg) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    let mut v = Validation::new(header.alg);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.set_issuer(&[&expect.issuer]);
    v.set_audience(&[&expect.audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    jsonwebtoken::decode::<C>(token, key, &v)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => JwtError::Expired,
                K::ImmatureSignature => JwtError::NotYetValid,
                K::InvalidIssuer => JwtError::Issuer,
                K::InvalidAudience => JwtError::Audience,
                K::InvalidSignature => JwtError::Signature,
                K::InvalidAlgorithm => JwtError::Algorithm(format!("{:?}", header.alg)),
                _ => JwtError::Invalid(e.to_string()),
            }
        })
}

/// The claims of a Kubernetes service account token this collector reads.
#[derive(Debug, Deserialize)]
pub struct ServiceAccountClaims {
    /// `system:serviceaccount:NAMESPACE:NAME`.
    pub sub: String,
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
pub struct KubernetesClaims {
    #[serde(default)]
    pub node: Option<NamedRef>,
    #[serde(default)]
    pub pod: Option<NamedRef>,
}

#[derive(Debug, Deserialize)]
pub struct NamedRef {
    pub name: String,
}

/// The claims of an OAuth access token for `/mcp`.
#[derive(Debug, Deserialize)]
pub struct AccessClaims {
    #[serde(default)]
    pub sub: String,
    /// Space-separated scopes (RFC 8693 `scope`); some issuers send `scp` as a list.
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub scp: Option<Vec<String>>,
}

impl AccessClaims {
    pub fn has_scope(&self, want: &str) -> bool {
        self.scope
            .as_deref()
            .is_some_and(|s| s.split_whitespace().any(|x| x == want))
            || self
                .scp
                .as_ref()
                .is_some_and(|l| l.iter().any(|x| x == want))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c d"));
        assert!(!looks_like_jwt("plain-static-token-0001"));
    }

    /// Every corruption of a valid token is refused and none panics: truncations, each
    /// character changed, parts swapped, `alg: none`, and the algorithm-confusion attack (an
    /// HS256 token keyed with the public key).
    #[test]
    fn junk_and_tampered_tokens_are_refused_without_panicking() {
        #![allow(clippy::unwrap_used)]
        use base64::Engine as _;
        let issuer = gpulse_test_pki::TestIssuer::new("k1").unwrap();
        let keys = KeySet::parse(&gpulse_test_pki::TestIssuer::jwks(&[&issuer])).unwrap();
        let expect = Expect {
            issuer: "https://iss".into(),
            audience: "aud".into(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims =
            serde_json::json!({"iss": "https://iss", "aud": "aud", "exp": now + 60, "sub": "s"});
        let good = issuer.sign(&claims).unwrap();
        let ok = |t: &str| verify::<serde_json::Value>(t, &keys, &expect).is_ok();
        assert!(ok(&good));
        for cut in 0..good.len() {
            assert!(!ok(&good[..cut]), "truncated at {cut}");
        }
        let bytes = good.as_bytes();
        for i in 0..bytes.len() {
            if bytes[i] == b'.' {
                continue;
            }
            let mut t = bytes.to_vec();
            t[i] = if t[i] == b'A' { b'B' } else { b'A' };
            assert!(!ok(std::str::from_utf8(&t).unwrap()), "byte {i} changed");
        }
        let parts: Vec<&str> = good.split('.').collect();
        assert!(!ok(&format!("{}.{}.{}", parts[1], parts[0], parts[2])));
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = b64(&claims.to_string());
        let none = format!("{}.{payload}.", b64(r#"{"alg":"none","kid":"k1"}"#));
        assert!(!ok(&none));
        // HS256 keyed with the published key's bytes: refused before any key is used.
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header {
                kid: Some("k1".into()),
                ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
            },
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(
                gpulse_test_pki::TestIssuer::jwks(&[&issuer]).as_bytes(),
            ),
        )
        .unwrap();
        assert!(matches!(
            verify::<serde_json::Value>(&hs, &keys, &expect),
            Err(JwtError::Algorithm(_))
        ));
        for junk in [
            "",
            ".",
            "..",
            "a.b.c",
            "\u{0}.\u{0}.\u{0}",
            &"x.".repeat(10_000),
        ] {
            assert!(!ok(junk), "{junk:.20}");
        }
    }

    #[test]
    fn a_set_without_usable_keys_is_refused() {
        assert!(KeySet::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::parse(r#"{"keys":[]}"#).is_err());
        assert!(KeySet::parse("not json").is_err());
    }
}
