//! Test credentials: a CA (rcgen) that issues server and client certificates, and a JWT issuer
//! (an ES256 key, as a cluster or an OAuth server may use) that publishes its JWKS and mints
//! Kubernetes service account tokens and OAuth access tokens.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate authority for tests.
pub struct TestCa {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A subject of its own: a leaf whose issuer equals its subject looks self-signed to
        // BoringSSL (grpcio).
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate()?)?,
        })
    }

    /// (certificate PEM, key PEM) for these subject alternative names (DNS names or IPs).
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, self.pem())?;
        Ok(p)
    }

    /// Issues a certificate for `names` and writes it and its key as `dir/name.crt|.key`.
    pub fn write_pair(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = self.issue(names)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert)?;
        std::fs::write(&k, key)?;
        Ok((c, k))
    }
}

/// A test CA and a collector certificate for `localhost` and `127.0.0.1` signed by it, written
/// to `dir` as `ca.crt`, `tls.crt`, `tls.key`.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca = TestCa::new("gpulse test CA")?;
    let (cert, key) = ca.write_pair(dir, "tls", &["localhost", "127.0.0.1"])?;
    Ok(Pki {
        ca: ca.write(dir, "ca.crt")?,
        cert,
        key,
    })
}

/// The issuer Kubernetes test tokens carry.
pub const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A signing key that mints JWTs and publishes its JWKS.
pub struct TestIssuer {
    pub kid: String,
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TestIssuer {
    pub fn new(kid: &str) -> anyhow::Result<Self> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?
            .as_ref()
            .to_vec();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| anyhow::anyhow!("reading the P-256 key"))?;
        Ok(Self {
            kid: kid.into(),
            public: pair.public_key().as_ref().to_vec(),
            pkcs8,
        })
    }

    /// A JWKS document publishing these keys.
    pub fn jwks(keys: &[&TestIssuer]) -> String {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": k.kid,
                    "x": b64(&k.public[1..33]), "y": b64(&k.public[33..65]),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    pub fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(
            &h,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )?)
    }

    /// A projected service account token as the kubelet makes it for a pod of `account`
    /// (`NAMESPACE:NAME`) on `node`; `edit` changes its claims first.
    pub fn service_account(
        &self,
        account: &str,
        node: Option<&str>,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> anyhow::Result<String> {
        let now = unix_now();
        let (ns, name) = account
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("{account}: NAMESPACE:NAME"))?;
        let mut c = serde_json::json!({
            "aud": ["gpulse"], "iss": CLUSTER_ISSUER, "iat": now, "nbf": now, "exp": now + 3600,
            "sub": format!("system:serviceaccount:{ns}:{name}"),
            "kubernetes.io": {
                "namespace": ns,
                "pod": {"name": format!("{name}-x7k2p"), "uid": "b1f0"},
                "serviceaccount": {"name": name, "uid": "9c1e"},
            },
        });
        if let Some(n) = node {
            c["kubernetes.io"]["node"] = serde_json::json!({"name": n, "uid": "77aa"});
        }
        edit(&mut c);
        self.sign(&c)
    }

    /// An OAuth access token from `issuer` for `audience` with `scope`.
    pub fn access_token(
        &self,
        issuer: &str,
        audience: &str,
        scope: &str,
    ) -> anyhow::Result<String> {
        let now = unix_now();
        self.sign(&serde_json::json!({
            "iss": issuer, "aud": audience, "sub": "user-1", "scope": scope,
            "iat": now, "exp": now + 600,
        }))
    }
}
