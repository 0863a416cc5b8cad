//! The HTTP listener: the API router served by hyper with the limits `axum::serve` lacks.
//!
//! Every accepted connection takes a permit of a semaphore of `server.max_connections`;
//! beyond it a new connection is closed at once (and counted in
//! `ti_scheduler_connections_refused_total`), so idle or half-sent requests cannot take
//! every file descriptor. A request's head must arrive within
//! `server.header_read_timeout_ms` (hyper also counts the wait for the next request of a
//! keep-alive connection); a connection that moves no byte for `server.idle_timeout_ms`
//! is asked to close once its request is answered, and is dropped if it moves none for
//! another such period (a slow body). At shutdown the listener stops accepting, idle
//! connections close and requests under way are finished.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry;

/// The listener's limits, from `server.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a request's head.
    pub header_read_timeout: Duration,
    /// Time a connection may move no byte.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and
/// waits for the connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!(telemetry::CONNECTIONS_REFUSED).increment(1);
            tracing::debug!(
                max_connections = limits.max_connections,
                "connection refused: too many open"
            );
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            stream,
            activity: activity.clone(),
        });
        let conn = http.serve_connection(io, TowerToHyperService::new(router.clone()));
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            drive(conn, &activity, limits.idle_timeout, &stop).await;
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// Runs one connection to its end, closing it when it idles or the server stops.
async fn drive(
    conn: http1::Connection<TokioIo<Tracked>, TowerToHyperService<axum::Router>>,
    activity: &Activity,
    idle: Duration,
    stop: &CancellationToken,
) {
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(tick) => {
                if activity.idle_for() < idle {
                    continue;
                }
                if closing {
                    tracing::debug!("connection dropped: idle after it was asked to close");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
                activity.touch();
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// ms after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// A TCP stream that notes when it last moved a byte.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Pause after a failed accept (out of file descriptors, most likely).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Raises the soft limit of open files to the hard limit (logging both), and returns the
/// connection cap that leaves a quarter of the soft limit for the database, the TI
/// client and the rest.
pub fn raise_fd_limit(max_connections: usize) -> usize {
    let before = rlimit::Resource::NOFILE.get().ok();
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            before.map(|(soft, _)| soft).unwrap_or(1024)
        }
    };
    let hard = before.map(|(_, hard)| hard).unwrap_or(soft);
    let before_soft = before.map(|(soft, _)| soft).unwrap_or(soft);
    let usable = usize::try_from(soft - soft / 4)
        .unwrap_or(usize::MAX)
        .max(16);
    let cap = max_connections.min(usable);
    tracing::info!(
        soft_before = before_soft,
        soft,
        hard,
        max_connections = cap,
        "open-file limit (RLIMIT_NOFILE)"
    );
    if cap < max_connections {
        tracing::warn!(
            configured = max_connections,
            cap,
            "server.max_connections lowered to fit the open-file limit"
        );
    }
    cap
}
