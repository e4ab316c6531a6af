//! Which collector this node's events go to, when collectors are shards.
//!
//! `--collector` is one URL or a comma-separated list. With `--shard-discovery dns` one URL's
//! host name is resolved to every shard (a headless Service), again every 30 s. The node's shard
//! is chosen by rendezvous (highest random weight) hashing of the node name against each shard's
//! key: every agent ranks the shards the same way without talking to the others, and adding or
//! removing a shard moves only the nodes that ranked it first. While its first-ranked shard is
//! unreachable the agent uses the next one, and it returns when the first is back (`client`).
use std::{net::IpAddr, time::Duration};

use gpulse_proto::client::ClientOptions;
use tonic::transport::Endpoint;

/// How often a DNS name is resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// One collector the agent may send to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// What rendezvous hashing ranks (the URL as given, or a resolved address).
    pub key: String,
    /// Where to connect.
    pub url: String,
    /// The name the server certificate must carry when `url` names an address (DNS discovery).
    pub tls_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("--collector is empty")]
    Empty,
    #[error("--collector {0:?}: {1}")]
    BadUrl(String, String),
    #[error("--shard-discovery dns takes one URL, got {0}")]
    DnsNeedsOneUrl(usize),
    #[error("resolving {0}: {1}")]
    Resolve(String, String),
}

/// How the shard list is found.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// The URLs as given.
    List(Vec<Shard>),
    /// Every address of the URL's host.
    Dns { url: String },
}

impl Discovery {
    /// Parses `--collector` under `--shard-discovery` (`list` or `dns`).
    pub fn parse(collector: &str, mode: &str) -> Result<Self, ShardError> {
        let urls: Vec<&str> = collector
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(ShardError::Empty);
        }
        for u in &urls {
            let uri: tonic::codegen::http::Uri = u
                .parse()
                .map_err(|e| ShardError::BadUrl(u.to_string(), format!("{e}")))?;
            if uri.host().is_none() || uri.scheme().is_none() {
                return Err(ShardError::BadUrl(
                    u.to_string(),
                    "needs scheme://host:port".into(),
                ));
            }
        }
        if mode == "dns" {
            if urls.len() != 1 {
                return Err(ShardError::DnsNeedsOneUrl(urls.len()));
            }
            return Ok(Discovery::Dns {
                url: urls[0].to_string(),
            });
        }
        Ok(Discovery::List(
            urls.iter()
                .map(|u| Shard {
                    key: u.to_string(),
                    url: u.to_string(),
                    tls_name: None,
                })
                .collect(),
        ))
    }

    /// The shards now (DNS: resolved now, sorted, deduplicated).
    pub async fn shards(&self) -> Result<Vec<Shard>, ShardError> {
        match self {
            Discovery::List(s) => Ok(s.clone()),
            Discovery::Dns { url } => resolve(url).await,
        }
    }

    pub fn is_dns(&self) -> bool {
        matches!(self, Discovery::Dns { .. })
    }
}

async fn resolve(url: &str) -> Result<Vec<Shard>, ShardError> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| ShardError::BadUrl(url.into(), format!("{e}")))?;
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let mut addrs: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| ShardError::Resolve(host.clone(), e.to_string()))?
        .map(|a| a.ip())
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ShardError::Resolve(host, "no addresses".into()));
    }
    Ok(addrs
        .into_iter()
        .map(|ip| {
            let at = match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            };
            Shard {
                key: at.clone(),
                url: format!("{scheme}://{at}"),
                tls_name: Some(host.clone()),
            }
        })
        .collect())
}

/// FNV-1a, 64-bit: stable across builds and platforms (every agent must rank alike).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer: spreads FNV's weak low bits before comparing weights.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shards in the order `node` should try them: highest rendezvous weight first.
pub fn rank(node: &str, shards: &[Shard]) -> Vec<Shard> {
    let mut v: Vec<(u64, &Shard)> = shards
        .iter()
        .map(|s| (mix(fnv1a(&[node.as_bytes(), s.key.as_bytes()])), s))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key.cmp(&b.1.key)));
    v.into_iter().map(|(_, s)| s.clone()).collect()
}

/// The endpoint for `shard` with the client's TLS settings (the certificate checked against
/// the DNS name when the shard was found by resolving it).
pub fn endpoint(
    shard: &Shard,
    opts: &ClientOptions,
) -> Result<Endpoint, gpulse_proto::client::ClientError> {
    match &shard.tls_name {
        Some(name) => opts.endpoint_for(&shard.url, name),
        None => opts.endpoint(&shard.url),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn list(n: usize) -> Vec<Shard> {
        (0..n)
            .map(|i| Shard {
                key: format!("https://c-{i}:7700"),
                url: format!("https://c-{i}:7700"),
                tls_name: None,
            })
            .collect()
    }

    #[test]
    fn ranking_is_stable_balanced_and_moves_little() {
        let four = list(4);
        let nodes: Vec<String> = (0..4000).map(|i| format!("gpu-node-{i}")).collect();
        let owner = |shards: &[Shard], n: &str| rank(n, shards)[0].key.clone();
        // Balanced: each of 4 shards owns 25 % +- 3 %.
        let mut per = std::collections::HashMap::new();
        for n in &nodes {
            *per.entry(owner(&four, n)).or_insert(0) += 1;
        }
        for (k, c) in &per {
            assert!((880..=1120).contains(c), "{k}: {c}");
        }
        // The same answer whatever the order of the list.
        let mut rev = four.clone();
        rev.reverse();
        assert!(nodes.iter().all(|n| owner(&four, n) == owner(&rev, n)));
        // Adding a fifth shard moves only nodes to it (about a fifth of them).
        let five = list(5);
        let moved: Vec<&String> = nodes
            .iter()
            .filter(|n| owner(&four, n) != owner(&five, n))
            .collect();
        assert!(moved.iter().all(|n| owner(&five, n) == "https://c-4:7700"));
        assert!((600..=1000).contains(&moved.len()), "{}", moved.len());
        // A stable, known answer (agents of different builds must agree).
        assert_eq!(fnv1a(&[b"a"]), fnv1a(&[b"a"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn parsing() {
        let d = Discovery::parse("https://a:7700, https://b:7700", "list").unwrap();
        let Discovery::List(s) = d else { panic!() };
        assert_eq!(s.len(), 2);
        assert!(Discovery::parse("", "list").is_err());
        assert!(Discovery::parse("not a url", "list").is_err());
        assert!(Discovery::parse("https://a:1,https://b:2", "dns").is_err());
        assert!(Discovery::parse("https://a:1", "dns").unwrap().is_dns());
    }

    #[tokio::test]
    async fn dns_discovery_resolves_every_address() {
        let s = Discovery::parse("https://localhost:7700", "dns")
            .unwrap()
            .shards()
            .await
            .unwrap();
        assert!(!s.is_empty());
        assert!(s.iter().all(|s| s.tls_name.as_deref() == Some("localhost")));
        assert!(
            s.iter()
                .all(|s| s.url.starts_with("https://") && s.url.ends_with(":7700"))
        );
    }
}
