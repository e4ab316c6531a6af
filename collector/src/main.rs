//! `gpulse-collector`: receives agent streams, stores events durably within a byte budget, and
//! serves live subscribers, health and metrics.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;
use gpulse_collector::{
    auth::{AuthConfig, ServiceAccounts, keys::KeySource, oauth::OAuthConfig},
    server::{self, ServerConfig},
    size::parse_bytes,
    state::StoreConfig,
    tls::TlsFiles,
};
use tracing::{info, warn};

/// Ingest decodes every event into short-lived heap objects (its strings, the copy fanned out to
/// subscribers, a node's latest GPU sample) freed out of order across tasks, while the store keeps
/// events as bytes in 8 KiB blocks. mimalloc's per-thread, per-size-class pages suit that churn
/// (glibc's malloc spent a third of ingest consolidating free lists when the store still held
/// decoded events); it has not been measured against glibc since the store changed layout.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "gpulse-collector",
    version,
    about = "gpulse collector: gRPC ingest from agents, bounded durable event store, live gRPC subscribers, /healthz /readyz /metrics"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// gRPC listen address (Ingest, Telemetry, reflection, health).
    #[arg(long, env = "GPULSE_GRPC_LISTEN", default_value = "127.0.0.1:7700")]
    grpc_listen: SocketAddr,
    /// HTTP listen address (/healthz, /readyz, /metrics, /mcp).
    #[arg(long, env = "GPULSE_HTTP_LISTEN", default_value = "127.0.0.1:7701")]
    http_listen: SocketAddr,
    /// Directory for the write-ahead log (created 0700; files 0600).
    #[arg(long, env = "GPULSE_DATA_DIR", default_value = "/var/lib/gpulse")]
    data_dir: PathBuf,
    /// Memory budget of the event store (every kind together, each with a guaranteed share),
    /// e.g. 256MiB. `--ring-bytes` is its former name, accepted for one release.
    #[arg(long, alias = "ring-bytes", default_value = "256MiB", value_parser = parse_bytes)]
    events_bytes: u64,
    /// Raw GPU sample history budget (recent rows plain, older rows in compressed chunks).
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    samples_raw_bytes: u64,
    /// 1-minute rollup budget (min/max/sum/count/last per metric per GPU).
    #[arg(long, default_value = "32MiB", value_parser = parse_bytes)]
    samples_1m_bytes: u64,
    /// 1-hour rollup budget.
    #[arg(long, default_value = "8MiB", value_parser = parse_bytes)]
    samples_1h_bytes: u64,
    /// Most GPUs with sample history.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_gpus: u64,
    /// How often the sample history is snapshotted to --data-dir (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = parse_interval)]
    snapshot_interval: std::time::Duration,
    /// Log size that triggers an event-store snapshot so old segments can be deleted
    /// (default: twice --events-bytes).
    #[arg(long, value_parser = parse_bytes)]
    wal_max_bytes: Option<u64>,
    /// WAL segment size before rotation.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    wal_segment_bytes: u64,
    /// `always`: acknowledge only after fdatasync. `never`: after write() (survives a process
    /// crash, not a power loss).
    #[arg(long, default_value = "always", value_parser = ["always", "never"])]
    fsync: String,
    /// Most open Subscribe streams (gpulse tail, dashboards); more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_subscribers: u64,
    /// On SIGTERM/SIGINT: end every stream, finish pending acks, sync the log and write the
    /// sample snapshot within this long, then exit regardless.
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    shutdown_timeout: std::time::Duration,
    /// HTTP/2 PING (and TCP keepalive) interval on gRPC connections; a peer that does not answer
    /// within --keepalive-timeout after it is disconnected (a node that lost power).
    #[arg(long, default_value = "20s", value_parser = parse_interval)]
    keepalive_interval: std::time::Duration,
    #[arg(long, default_value = "20s", value_parser = parse_interval)]
    keepalive_timeout: std::time::Duration,
    /// Event times more than this ahead of when the event arrived are replaced by the arrival
    /// time (the agent's time kept as reported_time): a node clock ahead cannot freeze a GPU's
    /// history. Old times are kept (spooled events, the kernel log's backlog).
    #[arg(long, default_value = "10m", value_parser = parse_interval)]
    max_clock_skew: std::time::Duration,
    /// Agent ids without a connection for this long leave the de-duplication table and the
    /// log's checkpoints (every agent start has a new id; ids are never reused).
    #[arg(long, default_value = "24h", value_parser = parse_retention)]
    agent_retention: std::time::Duration,
    /// Nodes not heard from for this long leave the node and GPU gauges and `gpulse nodes`
    /// (so GpulseAgentDown fires for a scaled-down node until then, and resolves after).
    #[arg(long, default_value = "24h", value_parser = parse_retention)]
    node_retention: std::time::Duration,
    /// Per-subscriber queue length before it is marked lagged.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    subscriber_queue: u64,
    /// Largest accepted gRPC message.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    max_message_bytes: u64,
    #[command(flatten)]
    trust: TrustArgs,
    /// Largest forward jump of a known agent's seqs in one batch; a larger one is refused as a
    /// takeover attempt.
    #[arg(long, default_value_t = gpulse_collector::state::DEFAULT_MAX_SEQ_JUMP, value_parser = clap::value_parser!(u64).range(1000..))]
    max_seq_jump: u64,
    /// GPU health: the same XID again after this many reboots of its node since the first one
    /// turns NVIDIA's action into hardware inspection (CONTACT_SUPPORT).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    escalate_after_reboots: u32,
    /// GPU health: clean samples after a reset or reboot (or once a condition is gone) before a
    /// reason clears.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    health_clean_samples: u32,
    /// GPU health: a healthy GPU without a sample for this long is unknown.
    #[arg(long, default_value = "2m", value_parser = parse_interval)]
    health_stale_after: std::time::Duration,
    /// GPU health: a GPU without a sample this long while its node's other GPUs sample has
    /// vanished (unhealthy).
    #[arg(long, default_value = "60s", value_parser = parse_interval)]
    health_vanish_after: std::time::Duration,
    /// GPU health: NVLink errors (CRC, replay, recovery, all links) per minute that make a GPU
    /// degraded.
    #[arg(long, default_value_t = 60.0)]
    health_nvlink_errors_per_min: f64,
    /// GPU health: nonfatal NVLink5 XIDs (144-150 printed `Nonfatal`) on one GPU within 10
    /// minutes that make it degraded (fewer change nothing; a `Fatal` one makes it unhealthy).
    #[arg(
        long,
        default_value_t = 3,
        value_parser = clap::value_parser!(u32)
            .range(1..=i64::from(gpulse_collector::verdict::rules::MAX_NVLINK_NONFATAL_COUNT))
    )]
    health_nvlink_nonfatal: u32,
    /// GPU health: rules on trial, comma-separated (e.g. `nvlink_nonfatal,fabric`): their
    /// findings are recorded as reasons marked `shadow` and in
    /// `gpulse_gpu_health_shadow_findings`, and change no state, alert or action.
    #[arg(long, default_value = "", value_parser = gpulse_collector::verdict::rules::Shadow::parse)]
    rules_shadow: gpulse_collector::verdict::rules::Shadow,
    /// GPU health: how long a GPU must be busy (>= 95 % SM) at low power with an idle memory
    /// controller to be a hang suspect (degraded).
    #[arg(long, default_value = "60s", value_parser = parse_interval)]
    health_hang_after: std::time::Duration,
    /// GPU health: the power share of the limit at or under which a busy GPU may be hung.
    #[arg(long, default_value_t = 0.30)]
    health_hang_power_share: f64,
    /// GPU health: how long a busy GPU's SM clock must stay under half of the highest it ran
    /// at, with no power or thermal clock event, to be stuck low (degraded).
    #[arg(long, default_value = "15m", value_parser = parse_interval)]
    health_clock_low_after: std::time::Duration,
    /// Push 1-minute rollups of every GPU metric and the XID/SXid counters to this Prometheus
    /// remote-write endpoint (VictoriaMetrics /api/v1/write, Mimir, Thanos Receive, Prometheus
    /// with --web.enable-remote-write-receiver), labelled with --cluster and --shard. Requests
    /// wait in a queue in --data-dir while the endpoint is unreachable.
    #[arg(long, env = "GPULSE_REMOTE_WRITE_URL")]
    remote_write_url: Option<String>,
    /// CA bundle (PEM) for an https --remote-write-url (the system roots otherwise).
    #[arg(long, requires = "remote_write_url")]
    remote_write_ca: Option<PathBuf>,
    /// Bearer token file for --remote-write-url (re-read for every request).
    #[arg(long, requires = "remote_write_url")]
    remote_write_token_file: Option<PathBuf>,
    /// How often completed minutes and the counters are queued.
    #[arg(long, default_value = "15s", value_parser = parse_interval)]
    remote_write_interval: std::time::Duration,
    /// A minute is pushed once it ended this long ago (samples arriving later stay local).
    #[arg(long, default_value = "30s", value_parser = parse_interval)]
    remote_write_delay: std::time::Duration,
    /// Most bytes of requests waiting on disk; past it the oldest are dropped (counted).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    remote_write_queue_bytes: u64,
    /// On the first start, how far back the 1-minute tier is pushed.
    #[arg(long, default_value = "6h", value_parser = parse_retention)]
    remote_write_backfill: std::time::Duration,
    /// The PromQL API of the TSDB the rollups are pushed to (e.g. http://victoria-metrics:8428,
    /// http://prometheus:9090): trend windows reaching back past local retention are completed
    /// from it (this collector's cluster and shard only), and answers say which store answered
    /// which span.
    #[arg(long, env = "GPULSE_HISTORY_URL")]
    history_url: Option<String>,
    /// CA bundle (PEM) for an https --history-url.
    #[arg(long, requires = "history_url")]
    history_ca: Option<PathBuf>,
    /// Bearer token file for --history-url.
    #[arg(long, requires = "history_url")]
    history_token_file: Option<PathBuf>,
    /// This collector's cluster, named on its nodes and in Status (and a gateway's answers).
    #[arg(long, env = "GPULSE_CLUSTER", default_value = "", value_parser = parse_name)]
    cluster: String,
    /// This collector's shard name (in a StatefulSet: the pod name), in Status.
    #[arg(long, env = "GPULSE_SHARD", default_value = "", value_parser = parse_name)]
    shard: String,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// An upstream as NAME=URL (NAME: letters, digits, . _ -; URL: its gRPC address, http:// or
    /// https://). Repeat for each.
    #[arg(long = "upstream", required = true, value_parser = parse_upstream)]
    upstreams: Vec<(String, String)>,
    #[arg(long, env = "GPULSE_GRPC_LISTEN", default_value = "127.0.0.1:7710")]
    grpc_listen: SocketAddr,
    #[arg(long, env = "GPULSE_HTTP_LISTEN", default_value = "127.0.0.1:7711")]
    http_listen: SocketAddr,
    /// Named on nodes whose collector names no cluster (a gateway over one cluster's shards).
    #[arg(long, env = "GPULSE_CLUSTER", default_value = "", value_parser = parse_name)]
    cluster: String,
    /// Per upstream and call: an upstream slower than this is left out of the answer (timeout).
    #[arg(long, default_value = "3s", value_parser = parse_deadline)]
    upstream_timeout: std::time::Duration,
    /// Calls in flight to one upstream; more wait (within the timeout).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    upstream_concurrency: u64,
    /// Failures in a row that open an upstream's circuit breaker.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    breaker_failures: u32,
    /// How long an open circuit waits before a probe (doubling on each failed probe, up to 30s).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    breaker_cooldown: std::time::Duration,
    /// Most merged Subscribe streams open at once (each holds one on every upstream it
    /// follows); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_subscribers: u64,
    /// Largest gRPC message, in either direction.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    max_message_bytes: u64,
    #[arg(long, default_value = "20s", value_parser = parse_interval)]
    keepalive_interval: std::time::Duration,
    #[arg(long, default_value = "20s", value_parser = parse_interval)]
    keepalive_timeout: std::time::Duration,
    /// On SIGTERM/SIGINT: end every stream and exit within this long.
    #[arg(long, default_value = "5s", value_parser = parse_interval)]
    shutdown_timeout: std::time::Duration,
    /// How the gateway reaches its upstreams (CA, client certificate, token file).
    #[command(flatten)]
    client: gpulse_proto::client::ClientOptions,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Listener security and authentication, the same for a collector and a gateway.
#[derive(clap::Args, Debug)]
struct TrustArgs {
    /// Serve MCP (Streamable HTTP) at /mcp on the HTTP address.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    mcp: String,
    /// Bearer token /mcp requires (`Authorization: Bearer <token>`). Required to bind HTTP off
    /// loopback unless --mcp-allow-unauthenticated.
    #[arg(long, env = "GPULSE_MCP_TOKEN", hide_env_values = true)]
    mcp_token: Option<String>,
    /// Serve /mcp without a token on a non-loopback address (trusted networks only).
    #[arg(long)]
    mcp_allow_unauthenticated: bool,
    /// Extra Host header values /mcp accepts (e.g. the Service's DNS name); loopback always.
    #[arg(long = "mcp-allowed-host")]
    mcp_allowed_hosts: Vec<String>,
    /// Browser origins /mcp accepts; by default a request carrying any Origin is refused.
    #[arg(long = "mcp-allowed-origin")]
    mcp_allowed_origins: Vec<String>,
    /// MCP sessions (clients older than protocol 2026-07-28) open at once; past it the least
    /// recently used is closed. Idle sessions close after 5 minutes.
    #[arg(long, default_value_t = gpulse_mcp::sessions::DEFAULT_MAX_SESSIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    mcp_max_sessions: usize,
    /// Connections each listener (gRPC, HTTP) holds; past it new ones are closed at once.
    #[arg(long, default_value_t = gpulse_collector::conn::DEFAULT_MAX, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_connections: usize,
    /// Connections one IP address holds on each listener (agents open one each).
    #[arg(long, default_value_t = gpulse_collector::conn::DEFAULT_PER_ADDRESS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_connections_per_address: usize,
    /// A connection that sends and receives nothing for this long is closed (gRPC connections
    /// carry keep-alive pings every --keepalive-interval, so keep this above it).
    #[arg(long, default_value = "2m", value_parser = parse_interval)]
    idle_timeout: std::time::Duration,
    /// Server certificate chain (PEM) for TLS on the gRPC and HTTP listeners; re-read when it
    /// changes (cert-manager rotation). Clients then use https:// URLs.
    #[arg(long, env = "GPULSE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "GPULSE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates (mutual TLS): a verified client certificate
    /// authenticates an agent for the node named in its DNS subject alternative name.
    #[arg(long, env = "GPULSE_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Static token file: one `ROLE TOKEN [node=NAME]` per line (ROLE agent or reader; TOKEN
    /// the token or sha256:<hex> of it; # comments); re-read when it changes.
    #[arg(long, env = "GPULSE_AUTH_TOKENS")]
    auth_tokens: Option<PathBuf>,
    /// Kubernetes service account tokens: the cluster's JSON Web Key Set, either a file (e.g.
    /// from a ConfigMap; re-read when it changes) or the API server's URL
    /// (https://kubernetes.default.svc/openid/v1/jwks; fetched every 5 min and when a token
    /// names an unknown key). Needs --auth-issuer.
    #[arg(long, env = "GPULSE_AUTH_JWKS", requires = "auth_issuer")]
    auth_jwks: Option<String>,
    /// CA bundle (PEM) for an https --auth-jwks (in a pod:
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt); the system roots otherwise.
    #[arg(long)]
    auth_jwks_ca: Option<PathBuf>,
    /// Bearer token file for fetching an https --auth-jwks (the API server asks for one: the
    /// collector's own service account token).
    #[arg(long)]
    auth_jwks_token_file: Option<PathBuf>,
    /// The issuer service account tokens must carry (the API server's --service-account-issuer).
    #[arg(long, env = "GPULSE_AUTH_ISSUER", requires = "auth_jwks")]
    auth_issuer: Option<String>,
    /// The audience service account tokens must carry (the agent's projected token's).
    #[arg(long, default_value = "gpulse")]
    auth_audience: String,
    /// Service accounts (NAMESPACE:NAME) whose pod-bound tokens authenticate agents, each for
    /// the node its pod runs on.
    #[arg(
        long = "auth-agent-service-account",
        default_value = "gpulse:gpulse-agent"
    )]
    auth_agent_accounts: Vec<String>,
    /// Service accounts (NAMESPACE:NAME) whose tokens authenticate readers.
    #[arg(long = "auth-reader-service-account")]
    auth_reader_accounts: Vec<String>,
    /// /mcp as an OAuth 2.1 resource server: the authorization server (issuer) whose JWT access
    /// tokens are accepted. Needs --mcp-oauth-jwks and --mcp-resource-url.
    #[arg(long, requires_all = ["mcp_oauth_jwks", "mcp_resource_url"])]
    mcp_oauth_issuer: Option<String>,
    /// The issuer's JSON Web Key Set: its jwks_uri (https://..., fetched every 5 min and when a
    /// token names an unknown key) or a file (re-read when it changes).
    #[arg(long, requires = "mcp_oauth_issuer")]
    mcp_oauth_jwks: Option<String>,
    /// The canonical URL clients reach /mcp at (e.g. https://gpulse.example.com/mcp): the
    /// audience access tokens must carry, and the resource the metadata names.
    #[arg(long, requires = "mcp_oauth_issuer")]
    mcp_resource_url: Option<String>,
    /// The scope access tokens need for /mcp.
    #[arg(long, default_value = "gpulse:read")]
    mcp_oauth_scope: String,
    /// Serve gRPC on a non-loopback address without any authentication (trusted networks only):
    /// anyone who reaches the port can then push events for any node and read everything.
    #[arg(long)]
    grpc_allow_unauthenticated: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Serve the Telemetry API, /mcp and its own /metrics over several upstreams (the shards of
    /// a cluster, or other clusters' collectors and gateways), with partial answers.
    Gateway(Box<GatewayArgs>),
    /// Serve MCP on stdio from a running collector's data (over gRPC). stdout carries only MCP.
    Mcp {
        /// Required: stdio is the only transport of this subcommand (HTTP is served at /mcp).
        #[arg(long, required = true)]
        stdio: bool,
        /// The running collector's gRPC URL.
        #[arg(
            long,
            env = "GPULSE_COLLECTOR",
            default_value = "http://127.0.0.1:7700"
        )]
        collector: String,
        #[command(flatten)]
        client: gpulse_proto::client::ClientOptions,
    },
}

fn main() -> anyhow::Result<()> {
    disable_transparent_huge_pages();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(run());
    // A snapshot still being written (or a stuck disk) must not hold the exit past the deadline.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match res {
        Ok(Exit::Clean) => Ok(()),
        Ok(Exit::StoreFailed) => std::process::exit(EXIT_STORE_FAILED),
        Err(e) => Err(e),
    }
}

/// Exit status after a failed fsync: the orchestrator restarts the collector, which replays the
/// log from disk (what is there is the truth; the page cache no longer is).
const EXIT_STORE_FAILED: i32 = 3;

enum Exit {
    Clean,
    StoreFailed,
}

/// With THP set to `always`, the kernel backs mimalloc's 2 MiB-aligned regions with huge pages,
/// so a page touched for a few small objects costs 2 MiB of RSS: the idle collector grew from
/// 21 to 35 MiB and the flood test's peak past its bound (26 MiB and 111 MiB without). The store's objects are small and its
/// budget is what operators size memory by, so huge pages buy nothing here. Done before the
/// runtime's threads start touching memory.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only sets a process flag.
    // If it fails (an old kernel), the cost is memory use only, so the result is not checked.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

async fn run() -> anyhow::Result<Exit> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (a full disk, a closed pipe) must not take the process
        // down: tracing-subscriber reports such errors with eprintln!, which panics then.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    if let Some(Cmd::Mcp {
        collector, client, ..
    }) = &args.cmd
    {
        // Connect lazily: the client may list tools before the collector is up.
        let channel = client
            .connect_lazy(collector)
            .with_context(|| format!("--collector {collector:?}"))?;
        let client = gpulse_proto::v1::telemetry_client::TelemetryClient::new(channel)
            .max_decoding_message_size(64 << 20);
        info!(collector = %collector, "serving MCP on stdio");
        gpulse_mcp::serve_stdio(gpulse_proto::api::RemoteTelemetry::shared(client)).await?;
        return Ok(Exit::Clean);
    }
    if let Some(Cmd::Gateway(g)) = args.cmd {
        return run_gateway(*g).await;
    }
    let trust = args.trust.config(args.grpc_listen, args.http_listen)?;
    anyhow::ensure!(
        args.events_bytes >= 64 << 10,
        "--events-bytes must be at least 64KiB"
    );
    anyhow::ensure!(
        args.wal_segment_bytes >= 64 << 10,
        "--wal-segment-bytes must be at least 64KiB"
    );
    anyhow::ensure!(
        args.max_message_bytes >= 64 << 10 && args.max_message_bytes <= 256 << 20,
        "--max-message-bytes must be between 64KiB and 256MiB"
    );
    let mut store = StoreConfig::new(args.data_dir);
    store.events_bytes = args.events_bytes as usize;
    store.wal_segment_bytes = args.wal_segment_bytes;
    store.fsync = args.fsync == "always";
    store.subscriber_queue = args.subscriber_queue as usize;
    store.series = gpulse_collector::store::series::SeriesBudgets {
        raw: args.samples_raw_bytes as usize,
        minute: args.samples_1m_bytes as usize,
        hour: args.samples_1h_bytes as usize,
        max_gpus: args.max_gpus as usize,
    };
    store.snapshot_interval = args.snapshot_interval;
    store.wal_max_bytes = args.wal_max_bytes.unwrap_or(0);
    store.max_subscribers = args.max_subscribers as usize;
    store.max_clock_skew = args.max_clock_skew;
    store.agent_retention = args.agent_retention;
    store.node_retention = args.node_retention;
    store.max_seq_jump = args.max_seq_jump;
    store.verdict.escalate_after_reboots = args.escalate_after_reboots;
    store.verdict.clean_samples = args.health_clean_samples;
    store.verdict.stale_after = args.health_stale_after;
    store.verdict.vanish_after = args.health_vanish_after;
    if !(args.health_nvlink_errors_per_min.is_finite() && args.health_nvlink_errors_per_min > 0.0) {
        anyhow::bail!("--health-nvlink-errors-per-min must be a positive number");
    }
    store.verdict.thresholds.nvlink_errors_per_min = args.health_nvlink_errors_per_min;
    store.verdict.thresholds.nvlink_nonfatal_count = args.health_nvlink_nonfatal;
    store.verdict.shadow = args.rules_shadow;
    if !(args.health_hang_power_share.is_finite()
        && (0.0..=1.0).contains(&args.health_hang_power_share))
    {
        anyhow::bail!("--health-hang-power-share must be a share between 0 and 1");
    }
    let th = &mut store.verdict.thresholds;
    th.hang_power_share = args.health_hang_power_share;
    th.hang_after_ns = args.health_hang_after.as_nanos() as i128;
    th.clock_low_after_ns = args.health_clock_low_after.as_nanos() as i128;
    store.cluster = args.cluster;
    store.shard = args.shard;
    let mut cfg = ServerConfig::new(args.grpc_listen, args.http_listen, store);
    cfg.max_message_bytes = args.max_message_bytes as usize;
    cfg.keepalive_interval = args.keepalive_interval;
    cfg.keepalive_timeout = args.keepalive_timeout;
    anyhow::ensure!(
        trust.connections.idle > cfg.keepalive_interval,
        "--idle-timeout must be longer than --keepalive-interval (pings keep quiet streams open)"
    );
    cfg.connections = trust.connections;
    cfg.auth = trust.auth;
    cfg.mcp_oauth = trust.mcp_oauth;
    cfg.tls = trust.tls;
    cfg.mcp = trust.mcp;
    if let Some(url) = args.remote_write_url {
        anyhow::ensure!(
            args.remote_write_queue_bytes >= 1 << 20,
            "--remote-write-queue-bytes must be at least 1MiB"
        );
        let mut rw = gpulse_collector::remote_write::RemoteWriteConfig::new(url);
        rw.ca = args.remote_write_ca;
        rw.token_file = args.remote_write_token_file;
        rw.interval = args.remote_write_interval;
        rw.delay = args.remote_write_delay;
        rw.queue_bytes = args.remote_write_queue_bytes;
        rw.backfill = args.remote_write_backfill;
        cfg.remote_write = Some(rw);
    }
    cfg.history = args
        .history_url
        .map(|url| gpulse_collector::history::HistoryConfig {
            url,
            ca: args.history_ca,
            token_file: args.history_token_file,
            timeout: std::time::Duration::from_secs(10),
        });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await?;
    let health = running.store.health().clone();
    let store_failed = async move {
        while !health.is_sync_failed() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let (mut grpc, mut http) = (running.grpc, running.http);
    let mut exit = Exit::Clean;
    tokio::select! {
        () = shutdown_signal() => info!(timeout_s = args.shutdown_timeout.as_secs_f64(), "signal received: stopping"),
        () = store_failed => {
            tracing::error!("the store failed (fsync); stopping so a restart replays the log from disk");
            exit = Exit::StoreFailed;
        }
        r = &mut grpc => anyhow::bail!("gRPC server ended: {:?}", r),
        r = &mut http => anyhow::bail!("HTTP server ended: {:?}", r),
    }
    let _ = stop_tx.send(());
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    // Streams end at once; the listeners finish their in-flight calls within the deadline.
    match tokio::time::timeout_at(deadline, async { tokio::join!(&mut grpc, &mut http) }).await {
        Ok((g, h)) => {
            g??;
            h??;
        }
        Err(_) => warn!("connections still open at the shutdown deadline; closing them"),
    }
    match tokio::time::timeout_at(deadline, running.store.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "store did not stop cleanly; the log replays at the next start")
        }
        Err(_) => warn!(
            "store did not finish its final sync within --shutdown-timeout; the log replays at the next start"
        ),
    }
    grpc.abort();
    http.abort();
    info!("gpulse-collector stopped");
    Ok(exit)
}

/// What the trust flags configure.
struct Trust {
    auth: AuthConfig,
    mcp_oauth: Option<OAuthConfig>,
    tls: Option<TlsFiles>,
    mcp: Option<gpulse_mcp::http::HttpOptions>,
    connections: gpulse_collector::conn::Limits,
}

impl TrustArgs {
    /// Checks the flags against the listen addresses (nothing unauthenticated off loopback
    /// unless asked for) and turns them into configuration.
    fn config(&self, grpc_listen: SocketAddr, http_listen: SocketAddr) -> anyhow::Result<Trust> {
        for a in self
            .auth_agent_accounts
            .iter()
            .chain(&self.auth_reader_accounts)
        {
            anyhow::ensure!(
                a.split_once(':')
                    .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains(':')),
                "service account {a:?} must be NAMESPACE:NAME"
            );
        }
        let auth = AuthConfig {
            tokens: self.auth_tokens.clone(),
            service_accounts: match (&self.auth_jwks, &self.auth_issuer) {
                (Some(jwks), Some(issuer)) => Some(ServiceAccounts {
                    jwks: KeySource {
                        location: jwks.clone(),
                        ca: self.auth_jwks_ca.clone(),
                        token_file: self.auth_jwks_token_file.clone(),
                    },
                    issuer: issuer.clone(),
                    audience: self.auth_audience.clone(),
                    agents: self.auth_agent_accounts.clone(),
                    readers: self.auth_reader_accounts.clone(),
                }),
                _ => None,
            },
            client_certs: self.client_ca.is_some(),
        };
        let mcp_oauth = match (
            &self.mcp_oauth_issuer,
            &self.mcp_oauth_jwks,
            &self.mcp_resource_url,
        ) {
            (Some(issuer), Some(jwks), Some(resource)) => {
                anyhow::ensure!(
                    resource.starts_with("https://")
                        || resource.starts_with("http://localhost")
                        || resource.starts_with("http://127.0.0.1"),
                    "--mcp-resource-url must be https:// (or loopback http://)"
                );
                Some(OAuthConfig {
                    issuer: issuer.clone(),
                    jwks: KeySource {
                        location: jwks.clone(),
                        ca: None,
                        token_file: None,
                    },
                    resource: resource.clone(),
                    scope: self.mcp_oauth_scope.clone(),
                })
            }
            _ => None,
        };
        anyhow::ensure!(
            grpc_listen.ip().is_loopback() || auth.enabled() || self.grpc_allow_unauthenticated,
            "--grpc-listen {} is not loopback and no authentication is configured: set --auth-tokens \
         and/or --client-ca (with --tls-cert), or --grpc-allow-unauthenticated for a trusted network",
            grpc_listen
        );
        if auth.enabled() && self.tls_cert.is_none() && !grpc_listen.ip().is_loopback() {
            warn!(
                "authentication without TLS off loopback: tokens travel in clear; set --tls-cert and --tls-key"
            );
        }
        let loopback = http_listen.ip().is_loopback();
        anyhow::ensure!(
            self.mcp == "off"
                || loopback
                || self.mcp_token.is_some()
                || auth.tokens.is_some()
                || auth.service_accounts.is_some()
                || mcp_oauth.is_some()
                || self.mcp_allow_unauthenticated,
            "--http-listen {} is not loopback: set --mcp-token (or GPULSE_MCP_TOKEN) or --auth-tokens, --mcp off, or \
         --mcp-allow-unauthenticated for a trusted network",
            http_listen
        );
        if let Some(t) = &self.mcp_token {
            anyhow::ensure!(t.len() >= 16, "--mcp-token must be at least 16 characters");
        }
        Ok(Trust {
            auth,
            mcp_oauth,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.client_ca.clone(),
                }),
                _ => None,
            },
            mcp: (self.mcp == "on").then(|| gpulse_mcp::http::HttpOptions {
                token: self.mcp_token.clone(),
                bearer: None,
                oauth: None,
                allowed_hosts: self.mcp_allowed_hosts.clone(),
                allowed_origins: self.mcp_allowed_origins.clone(),
                loopback,
                max_sessions: self.mcp_max_sessions,
            }),
            connections: gpulse_collector::conn::Limits {
                max: self.max_connections,
                per_address: self.max_connections_per_address,
                idle: self.idle_timeout,
            },
        })
    }
}

async fn run_gateway(a: GatewayArgs) -> anyhow::Result<Exit> {
    use gpulse_collector::gateway::{CallLimits, breaker::BreakerConfig, serve};
    let mut names = std::collections::HashSet::new();
    for (n, _) in &a.upstreams {
        anyhow::ensure!(
            names.insert(n.clone()),
            "--upstream name {n:?} is given twice"
        );
    }
    anyhow::ensure!(
        a.max_message_bytes >= 64 << 10 && a.max_message_bytes <= 256 << 20,
        "--max-message-bytes must be between 64KiB and 256MiB"
    );
    let trust = a.trust.config(a.grpc_listen, a.http_listen)?;
    let mut cfg = serve::GatewayConfig::new(a.grpc_listen, a.http_listen, a.upstreams);
    cfg.client = a.client;
    cfg.cluster = a.cluster;
    cfg.limits = CallLimits {
        deadline: a.upstream_timeout,
        concurrency: a.upstream_concurrency as usize,
        breaker: BreakerConfig {
            threshold: a.breaker_failures,
            cooldown: a.breaker_cooldown,
            max_cooldown: std::time::Duration::from_secs(30).max(a.breaker_cooldown),
        },
        max_subscribers: a.max_subscribers as usize,
    };
    cfg.max_message_bytes = a.max_message_bytes as usize;
    cfg.keepalive_interval = a.keepalive_interval;
    cfg.keepalive_timeout = a.keepalive_timeout;
    anyhow::ensure!(
        trust.connections.idle > cfg.keepalive_interval,
        "--idle-timeout must be longer than --keepalive-interval (pings keep quiet streams open)"
    );
    cfg.connections = trust.connections;
    cfg.auth = trust.auth;
    cfg.mcp_oauth = trust.mcp_oauth;
    cfg.tls = trust.tls;
    cfg.mcp = trust.mcp;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = serve::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await?;
    let (mut grpc, mut http) = (running.grpc, running.http);
    tokio::select! {
        () = shutdown_signal() => info!("signal received: stopping"),
        r = &mut grpc => anyhow::bail!("gRPC server ended: {:?}", r),
        r = &mut http => anyhow::bail!("HTTP server ended: {:?}", r),
    }
    let _ = stop_tx.send(());
    let deadline = tokio::time::Instant::now() + a.shutdown_timeout;
    if tokio::time::timeout_at(deadline, async { tokio::join!(&mut grpc, &mut http) })
        .await
        .is_err()
    {
        warn!("connections still open at the shutdown deadline; closing them");
    }
    grpc.abort();
    http.abort();
    info!("gpulse gateway stopped");
    Ok(Exit::Clean)
}

/// A cluster, shard or upstream name: it becomes a label and part of upstream paths.
fn parse_name(s: &str) -> Result<String, String> {
    if s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: at most 63 letters, digits, '.', '_' or '-'"
        ))
    }
}

fn parse_upstream(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=URL"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the name is empty"));
    }
    let name = parse_name(name)?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{s:?}: the URL must start with http:// or https://"
        ));
    }
    Ok((name, url.to_string()))
}

/// A duration flag between `min` and `max` (`range` says them; `e.g.` gives examples).
fn duration_in(
    s: &str,
    min: std::time::Duration,
    max: std::time::Duration,
    range: &str,
    eg: &str,
) -> Result<std::time::Duration, String> {
    let ns = gpulse_proto::window::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. {eg})"))?;
    let d = std::time::Duration::from_nanos(ns as u64);
    if d < min || d > max {
        return Err(format!("must be between {range}"));
    }
    Ok(d)
}

/// A per-call deadline: 100ms to 60s.
fn parse_deadline(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    duration_in(
        s,
        Duration::from_millis(100),
        Duration::from_secs(60),
        "100ms and 60s",
        "500ms, 3s",
    )
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    duration_in(
        s,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        "1s and 24h",
        "30s, 5m",
    )
}

fn parse_retention(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    duration_in(
        s,
        Duration::from_secs(1),
        Duration::from_secs(30 * 86_400),
        "1s and 30d",
        "90m, 24h, 7d",
    )
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
