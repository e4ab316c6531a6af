//! `--health-listen`: a minimal HTTP endpoint for Kubernetes probes. `/healthz` answers from the
//! agent's runtime (a wedged runtime fails the probe) with its counters; `/readyz` is 200 once
//! capture runs. Read-only; no request body is read.
use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{info, warn};

use crate::stats::AgentStats;

/// Binds `addr` and serves probes until the process exits.
pub async fn serve(
    addr: SocketAddr,
    source: &'static str,
    stats: Arc<AgentStats>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "health endpoint listening");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/healthz" | "/readyz" => (
                        "200 OK",
                        format!(
                            "ok source={source} captured={} xids={} sent={} acked={} kernel_ring_dropped={} spool_dropped={}\n",
                            AgentStats::get(&stats.records_captured),
                            AgentStats::get(&stats.xids),
                            AgentStats::get(&stats.events_sent),
                            AgentStats::get(&stats.events_acked),
                            AgentStats::get(&stats.kernel_ring_dropped),
                            AgentStats::get(&stats.spool_dropped),
                        ),
                    ),
                    _ => ("404 Not Found", "try /healthz or /readyz\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = sock.write_all(resp.as_bytes()).await {
                    warn!(error = %e, "health response not sent");
                }
            });
        }
    });
    Ok(())
}
