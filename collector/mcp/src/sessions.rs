//! MCP sessions, bounded. rmcp's `LocalSessionManager` keeps every session it created in its
//! map until the client deletes it (an idle session's worker ends, its entry stays), with no
//! cap: 20,000 `initialize` calls took the collector from 24 to 1,540 MB (issue 27 #11).
//!
//! This manager wraps it: a session unused for [`IDLE`] is closed and forgotten, and when
//! `max` are open the least recently used makes room. A client's session id is only ever looked
//! up, never inserted, so ids a client makes up cost nothing.
use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::Stream;
use rmcp::{
    model::{ClientJsonRpcMessage, ServerJsonRpcMessage},
    transport::streamable_http_server::{
        SessionId, SessionManager,
        session::{
            ServerSseMessage,
            local::{LocalSessionManager, LocalSessionManagerError},
        },
    },
};

/// Sessions open at once unless configured otherwise (a session costs ~75 KB: 19 MB at most).
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// A session unused this long is closed (rmcp's own keep-alive, which ends the worker only).
pub const IDLE: Duration = Duration::from_secs(300);

pub struct BoundedSessions {
    inner: LocalSessionManager,
    max: usize,
    idle: Duration,
    used: Mutex<HashMap<SessionId, Instant>>,
    /// Sessions closed to make room or for idling (tests and logs read it).
    pub closed: AtomicU64,
}

impl BoundedSessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(idle);
        Self {
            inner,
            max: max.max(1),
            idle,
            used: Mutex::new(HashMap::new()),
            closed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Instant>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sessions (bounded by `max`).
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// Marks a known session used; an unknown id is not remembered.
    fn touch(&self, id: &SessionId) {
        if let Some(t) = self.lock().get_mut(id) {
            *t = Instant::now();
        }
    }

    /// Closes idle sessions, then the least recently used until one more fits.
    async fn make_room(&self) {
        let victims: Vec<SessionId> = {
            let mut used = self.lock();
            let now = Instant::now();
            let mut victims: Vec<SessionId> = used
                .iter()
                .filter(|(_, t)| now.duration_since(**t) >= self.idle)
                .map(|(id, _)| id.clone())
                .collect();
            for v in &victims {
                used.remove(v);
            }
            if used.len() >= self.max {
                let mut by_age: Vec<(Instant, SessionId)> =
                    used.iter().map(|(id, t)| (*t, id.clone())).collect();
                by_age.sort_unstable_by_key(|(t, _)| *t);
                let excess = used.len() + 1 - self.max;
                for (_, id) in by_age.into_iter().take(excess) {
                    used.remove(&id);
                    victims.push(id);
                }
            }
            victims
        };
        if !victims.is_empty() {
            tracing::debug!(
                closed = victims.len(),
                max = self.max,
                "MCP sessions closed (idle, or least recently used to make room)"
            );
        }
        for id in victims {
            self.closed.fetch_add(1, Ordering::Relaxed);
            let _ = self.inner.close_session(&id).await;
        }
    }
}

impl SessionManager for BoundedSessions {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.make_room().await;
        let (id, t) = self.inner.create_session().await?;
        self.lock().insert(id.clone(), Instant::now());
        Ok((id, t))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.touch(id);
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.lock().contains_key(id) && self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.lock().remove(id);
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id);
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.touch(id);
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id);
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id);
        self.inner.resume(id, last_event_id).await
    }
}
