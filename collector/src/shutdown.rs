//! The collector's stop signal, shared by every long-lived stream.
//!
//! tonic's graceful shutdown waits for every open stream to end on its own, and a Subscribe or
//! an agent's Push never ends on its own: a collector with one `gpulse tail` attached used to
//! outlive SIGTERM until Kubernetes killed it. Every stream therefore watches this signal and
//! ends with `UNAVAILABLE` (which agents and `gpulse tail` answer by reconnecting and resuming).
use tokio::sync::watch;

/// The message streams end with when the collector stops.
pub const STOPPING: &str = "collector shutting down; reconnect to another or retry";

/// Sending side: resolves every [`Shutdown`] once triggered.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A cheap, cloneable view of the stop signal (`None`: one that never fires).
#[derive(Clone, Debug)]
pub struct Shutdown(Option<watch::Receiver<bool>>);

/// A new, untriggered signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(Some(rx)))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(Some(self.0.subscribe()))
    }
}

impl Shutdown {
    /// A signal that never fires (tests and tools that stop by dropping the runtime).
    pub fn never() -> Self {
        Self(None)
    }

    pub fn is_triggered(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves once the stop was triggered (at once if it already was). A dropped trigger
    /// counts as a stop: nothing can keep the streams alive any more.
    pub async fn wait(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                let _ = rx.wait_for(|v| *v).await;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_resolve_once_triggered_and_late_waiters_at_once() {
        let (t, s) = channel();
        let mut a = s.clone();
        assert!(!s.is_triggered());
        let waiting = tokio::spawn(async move { a.wait().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        t.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("a waiter resolves on trigger")
            .unwrap();
        let mut late = t.subscribe();
        tokio::time::timeout(std::time::Duration::from_millis(100), late.wait())
            .await
            .expect("a late waiter resolves at once");
        assert!(late.is_triggered());
    }

    #[tokio::test]
    async fn never_does_not_resolve() {
        let mut n = Shutdown::never();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), n.wait())
                .await
                .is_err()
        );
    }
}
