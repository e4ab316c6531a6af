//! Connection bounds on both listeners, plain or TLS (issue 27 #4, #10): how many connections a
//! listener holds, how many of them one address holds, and how long one may stay silent.
//!
//! Before, a listener took every connection and kept it as long as the peer liked: 8,000
//! half-sent HTTP requests held 8,012 descriptors and 147 MB for over a minute, and 4,000 TLS
//! connections sat idle after their handshake. Now:
//! * past `max` open connections a new one is closed at once;
//! * past `per_address` from one IP address, that address's new ones are (so one host cannot
//!   take the listener from the others; agents open one connection each);
//! * a connection that neither reads nor writes a byte for `idle` is closed. gRPC connections
//!   carry HTTP/2 keep-alive pings (`--keepalive-interval`), so a quiet Subscribe stays open;
//!   an HTTP request sent half-way, or a TLS connection that never sends a request, does not.
//!
//! Each refusal and idle close is counted (`gpulse_connections_refused_total{listener,reason}`,
//! `gpulse_connections_idle_closed_total{listener}`), open connections are a gauge.
use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Connections one listener holds unless configured otherwise.
pub const DEFAULT_MAX: usize = 8192;
/// Connections one address holds on one listener unless configured otherwise.
pub const DEFAULT_PER_ADDRESS: usize = 256;
/// Silence after which a connection is closed unless configured otherwise.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(120);

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max: usize,
    pub per_address: usize,
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max: DEFAULT_MAX,
            per_address: DEFAULT_PER_ADDRESS,
            idle: DEFAULT_IDLE,
        }
    }
}

/// The counters every gate of a process shares (one registry per process).
#[derive(Clone)]
pub struct ConnMetrics {
    pub refused: IntCounterVec,
    pub idle_closed: IntCounterVec,
    pub open: IntGaugeVec,
}

impl ConnMetrics {
    pub fn new(reg: &prometheus::Registry) -> prometheus::Result<Self> {
        use prometheus::Opts;
        let refused = IntCounterVec::new(
            Opts::new(
                "gpulse_connections_refused_total",
                "Connections closed on arrival: the listener's limit (limit) or the address's (address_limit)",
            ),
            &["listener", "reason"],
        )?;
        let idle_closed = IntCounterVec::new(
            Opts::new(
                "gpulse_connections_idle_closed_total",
                "Connections closed after sending and receiving nothing for the idle timeout",
            ),
            &["listener"],
        )?;
        let open = IntGaugeVec::new(
            Opts::new("gpulse_connections_open", "Connections open, by listener"),
            &["listener"],
        )?;
        reg.register(Box::new(refused.clone()))?;
        reg.register(Box::new(idle_closed.clone()))?;
        reg.register(Box::new(open.clone()))?;
        for l in ["grpc", "http"] {
            for r in ["limit", "address_limit"] {
                refused.with_label_values(&[l, r]);
            }
            idle_closed.with_label_values(&[l]);
            open.with_label_values(&[l]);
        }
        Ok(Self {
            refused,
            idle_closed,
            open,
        })
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One listener's gate: admits connections within its limits.
#[derive(Clone)]
pub struct Gate {
    limits: Limits,
    listener: &'static str,
    counts: Arc<Mutex<Counts>>,
    metrics: ConnMetrics,
}

/// An admitted connection's place; given back when dropped.
pub struct Permit {
    gate: Gate,
    addr: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.gate.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.addr);
            }
        }
        self.gate
            .metrics
            .open
            .with_label_values(&[self.gate.listener])
            .dec();
    }
}

impl Gate {
    pub fn new(listener: &'static str, limits: Limits, metrics: ConnMetrics) -> Self {
        Self {
            limits,
            listener,
            counts: Arc::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn idle(&self) -> Duration {
        self.limits.idle
    }

    /// A place for a connection from `addr`, or None (counted) when a limit is reached. The
    /// table holds only addresses with open connections, so it is bounded by `max`.
    pub fn admit(&self, addr: IpAddr) -> Option<Permit> {
        let mut c = self.lock();
        let reason = if c.total >= self.limits.max {
            Some("limit")
        } else if c.by_address.get(&addr).copied().unwrap_or(0) >= self.limits.per_address {
            Some("address_limit")
        } else {
            None
        };
        if let Some(r) = reason {
            self.metrics
                .refused
                .with_label_values(&[self.listener, r])
                .inc();
            return None;
        }
        c.total += 1;
        *c.by_address.entry(addr).or_insert(0) += 1;
        self.metrics.open.with_label_values(&[self.listener]).inc();
        Some(Permit {
            gate: self.clone(),
            addr,
        })
    }

    /// Open connections (tests).
    pub fn open(&self) -> usize {
        self.lock().total
    }
}

/// Accepts plain connections on `listener` within `gate`'s limits (nodelay and keep-alive set
/// on each); ends when `stop` fires.
pub fn accept_plain(
    listener: tokio::net::TcpListener,
    gate: Gate,
    keepalive: Duration,
    mut stop: crate::shutdown::Shutdown,
) -> tokio::sync::mpsc::Receiver<(Guarded<tokio::net::TcpStream>, std::net::SocketAddr)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((tcp, peer)) = next_connection(&listener, &mut stop).await {
            let Some(permit) = gate.admit(peer.ip()) else {
                tracing::debug!(%peer, "connection refused: listener or address at its limit");
                continue;
            };
            configure(&tcp, keepalive);
            if tx.send((Guarded::new(tcp, permit), peer)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The next accepted connection, or None once `stop` fires. A failed accept (out of file
/// descriptors and the like) waits a little instead of spinning.
pub async fn next_connection(
    listener: &tokio::net::TcpListener,
    stop: &mut crate::shutdown::Shutdown,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.wait() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Nodelay (acks must not wait on Nagle) and TCP keep-alive on an accepted socket.
pub fn configure(tcp: &tokio::net::TcpStream, keepalive: Duration) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive));
}

/// The listener axum serves: connections from an accept loop (plain or TLS).
pub struct ChannelListener<S> {
    pub rx: tokio::sync::mpsc::Receiver<(S, std::net::SocketAddr)>,
    pub local: std::net::SocketAddr,
}

impl<S> axum::serve::Listener for ChannelListener<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = S;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A connection holding its place, closed once silent for the idle timeout.
pub struct Guarded<S> {
    inner: S,
    _permit: Permit,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// The timer's deadline is moved forward lazily: only when it fires is it checked against
    /// the last activity (a reset per read would cost a timer-wheel update per read).
    last: Instant,
    closed_idle: prometheus::IntCounter,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, permit: Permit) -> Self {
        let idle = permit.gate.limits.idle;
        let closed_idle = permit
            .gate
            .metrics
            .idle_closed
            .with_label_values(&[permit.gate.listener]);
        Self {
            inner,
            _permit: permit,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last: Instant::now(),
            closed_idle,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Ok while the connection has not been silent for the idle timeout; registers the waker.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let quiet = self.last.elapsed();
            if quiet >= self.idle {
                self.closed_idle.inc();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection silent for {quiet:?}"),
                ));
            }
            let deadline = self.last + self.idle;
            self.timer.as_mut().reset(deadline);
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn gate(max: usize, per_address: usize, idle: Duration) -> Gate {
        let reg = prometheus::Registry::new();
        Gate::new(
            "http",
            Limits {
                max,
                per_address,
                idle,
            },
            ConnMetrics::new(&reg).unwrap(),
        )
    }

    #[test]
    fn limits_per_listener_and_per_address() {
        let g = gate(4, 2, DEFAULT_IDLE);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = g.admit(a).unwrap();
        let _a2 = g.admit(a).unwrap();
        assert!(g.admit(a).is_none(), "a third from one address");
        let _b1 = g.admit(b).unwrap();
        let _b2 = g.admit(b).unwrap();
        assert!(g.admit(c).is_none(), "the listener is full");
        drop(a1);
        let _c1 = g.admit(c).expect("a place given back is taken again");
        let m = &g.metrics.refused;
        assert_eq!(m.with_label_values(&["http", "address_limit"]).get(), 1);
        assert_eq!(m.with_label_values(&["http", "limit"]).get(), 1);
        assert_eq!(g.metrics.open.with_label_values(&["http"]).get(), 4);
        assert_eq!(
            g.lock().by_address.len(),
            3,
            "a's entry stays while one is open"
        );
    }

    #[tokio::test]
    async fn silence_closes_and_traffic_keeps_open() {
        let idle = Duration::from_secs(2);
        let g = gate(8, 8, idle);
        let (client, server) = tokio::io::duplex(1024);
        let mut s = Guarded::new(server, g.admit("10.0.0.1".parse().unwrap()).unwrap());
        let mut client = client;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut got = 0;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return (got, None),
                    Ok(n) => got += n,
                    Err(e) => return (got, Some(e.kind())),
                }
            }
        });
        // A byte every 100 ms for 3 s (longer than the idle timeout) keeps it open.
        let start = std::time::Instant::now();
        for _ in 0..30 {
            client.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!reader.is_finished(), "closed while busy");
        // Then silence: closed after the idle timeout.
        let (got, err) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(start.elapsed() >= idle);
        assert_eq!(got, 30);
        assert_eq!(err, Some(io::ErrorKind::TimedOut));
        assert_eq!(g.metrics.idle_closed.with_label_values(&["http"]).get(), 1);
        assert_eq!(g.open(), 0, "the place was given back");
    }
}
