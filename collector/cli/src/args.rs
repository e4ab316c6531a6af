//! Arguments shared by several commands: where the collector is, and event filters.
use anyhow::Context as _;
use clap::Args;
use gpulse_proto::{
    client::{AuthChannel, ClientError, ClientOptions},
    names::ShortName,
    v1::{EventFilter, EventKind, Severity, telemetry_client::TelemetryClient},
    window,
};

/// `--collector`: where the collector's (or a gateway's) gRPC port is, and how to reach it
/// (TLS, client certificate, token).
#[derive(Args, Debug, Clone)]
pub struct CollectorArg {
    /// Collector gRPC URL (https:// for TLS).
    #[arg(
        long = "collector",
        env = "GPULSE_COLLECTOR",
        default_value = "http://127.0.0.1:7700"
    )]
    pub url: String,
    #[command(flatten)]
    pub client: ClientOptions,
}

impl CollectorArg {
    /// The URL, the TLS files and the token file, checked without connecting: each problem
    /// names its flag.
    pub fn check(&self) -> Result<(), BadArg> {
        let o = &self.client;
        let flag_of = |e: &ClientError| -> &'static str {
            match e {
                ClientError::BadUrl(..) => "--collector",
                ClientError::TokenInClear(_) => "--token-file",
                ClientError::HalfIdentity => "--tls-client-key",
                ClientError::Read(p, _) | ClientError::Invalid(p, _) => {
                    let is = |f: &Option<std::path::PathBuf>| f.as_deref() == Some(p.as_path());
                    if is(&o.ca_file) {
                        "--ca-file"
                    } else if is(&o.cert_file) {
                        "--tls-client-cert"
                    } else if is(&o.key_file) {
                        "--tls-client-key"
                    } else {
                        "--token-file"
                    }
                }
                ClientError::Tls(_) => "--ca-file or --tls-client-cert",
            }
        };
        o.endpoint(&self.url)
            .map(|_| ())
            .and_then(|()| o.credentials().map(|_| ()))
            .map_err(|e| BadArg::new(flag_of(&e), e))
    }

    pub async fn connect(&self) -> anyhow::Result<TelemetryClient<AuthChannel>> {
        let creds = self.client.credentials()?;
        let channel = self
            .client
            .endpoint(&self.url)?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        Ok(TelemetryClient::new(creds.wrap(channel)))
    }

    /// A channel that connects on first use (MCP clients may list tools before the collector
    /// is up).
    pub fn connect_lazy(&self) -> anyhow::Result<TelemetryClient<AuthChannel>> {
        Ok(TelemetryClient::new(self.client.connect_lazy(&self.url)?))
    }
}

/// A clap value parser for a wire enum by its short name (`fatal`, `gpu_sample`, `p95`).
pub fn short<T: ShortName>(s: &str) -> Result<T, String> {
    T::from_short_name(s).ok_or_else(|| format!("expected one of: {}", T::names().join(", ")))
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// Only these nodes (repeatable).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Only these kinds: xid, sxid, driver_log, agent_status, gap, gpu_process, gpu_sample,
    /// unknown (repeatable).
    #[arg(long = "kind", value_parser = short::<EventKind>)]
    pub kinds: Vec<EventKind>,
    /// Only events at least this severe: info, warning, error, fatal.
    #[arg(long, value_parser = short::<Severity>)]
    pub min_severity: Option<Severity>,
    /// Only these XID codes (repeatable).
    #[arg(long = "xid")]
    pub xids: Vec<u32>,
    /// Only these GPUs, by UUID or PCI address (repeatable).
    #[arg(long = "gpu")]
    pub gpus: Vec<String>,
    /// Include GPU samples (many: one per GPU per second); `--kind gpu_sample` alone shows only them.
    #[arg(long)]
    pub samples: bool,
}

impl FilterArgs {
    pub fn to_wire(&self) -> EventFilter {
        let mut kinds: Vec<i32> = self.kinds.iter().map(|k| *k as i32).collect();
        if kinds.is_empty() && !self.samples {
            // Samples are opt-in: everything else by default.
            kinds = EventKind::EVENTS.iter().map(|k| *k as i32).collect();
        }
        EventFilter {
            nodes: self.nodes.clone(),
            kinds,
            min_severity: self.min_severity.unwrap_or_default() as i32,
            xid_codes: self.xids.clone(),
            gpus: self.gpus.clone(),
        }
    }
}

/// A flag whose value is wrong in itself, found before anything is called: which flag, and why.
/// `gpulse` reports it the way clap reports a malformed value (exit status 2).
#[derive(Debug, PartialEq, Eq)]
pub struct BadArg {
    pub flag: &'static str,
    pub why: String,
}

impl BadArg {
    pub fn new(flag: &'static str, why: impl std::fmt::Display) -> Self {
        Self {
            flag,
            why: why.to_string(),
        }
    }
}

/// A clap value parser for `--since`: a duration back from now, now-<duration> or RFC 3339.
pub fn since(s: &str) -> Result<String, String> {
    window::check_bound("since", s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// A clap value parser for `--until`.
pub fn until(s: &str) -> Result<String, String> {
    window::check_bound("until", s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--since` and `--until` together: the window must not be empty or inverted.
pub fn check_window(since: &str, until: &str) -> Result<(), BadArg> {
    let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
    window::resolve(since, until, now, 0)
        .map(|_| ())
        .map_err(|e| BadArg::new("--since", e))
}
