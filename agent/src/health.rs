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
                let read = read_request_line(&mut sock, &mut buf);
                let n = match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
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

/// Reads until the request line is complete (a client may send it in pieces: answering the
/// first piece alone would misread the path and close a socket the client is still writing
/// to), the buffer is full, or the peer stops sending. Returns the bytes read.
async fn read_request_line(
    sock: &mut tokio::net::TcpStream,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
        match sock.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A request line sent in pieces is answered for the whole path.
    #[tokio::test]
    async fn a_request_in_pieces_is_read_whole() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        serve(addr, "test", Arc::new(AgentStats::default()))
            .await
            .unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        for piece in ["GET ", "/heal", "thz HTTP/1.0\r\n", "Host: x\r\n\r\n"] {
            c.write_all(piece.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut resp = String::new();
        c.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.contains("ok source=test"), "{resp}");
    }
}
