//! The HTTP listener: accepts connections up to `http.max_connections`, at most
//! `http.max_connections_per_client` of them from one address (one more from it is closed at
//! once, so no single client can hold every place), closes those that take longer
//! than `http.header_read_timeout` to send a request's head (slowloris) or sit idle, with no request
//! in flight and nothing read or written, for `http.idle_timeout`, and drains on shutdown.
//!
//! An error answered to a request with a body carries `Connection: close` (the body may be unread,
//! so the connection cannot be reused). At the cap it stops accepting (the kernel's backlog holds newcomers) rather than accept and drop,
//! so file descriptors stay below the process limit, which [`raise_fd_limit`] lifts at start. It
//! knows nothing of routes: it serves whatever [`Router`] it is given.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The listener's limits (`[http]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections from one client address.
    pub per_client: usize,
    /// Longest a request's head may take to arrive.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub drain: Duration,
}

/// Open connections per client address; a slot is given back when its [`ClientSlot`] drops.
#[derive(Debug, Default)]
struct Clients(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct ClientSlot(Arc<Clients>, std::net::IpAddr);

impl Clients {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot(self.clone(), ip))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What a connection's watchdog sees: when bytes last moved, and requests in flight.
#[derive(Debug)]
struct Activity {
    born: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_since(&self) -> Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream that records when bytes move.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts a request in flight for as long as its response future lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// Resolves when the connection has been idle for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let at = activity.idle_since() + limit;
        tokio::time::sleep_until(at).await;
        let busy = activity.in_flight.load(Ordering::Acquire) > 0;
        if !busy && activity.idle_since() + limit <= Instant::now() {
            return;
        }
        if busy {
            // A long request (a held submission) is bounded by its own deadline.
            tokio::time::sleep(limit).await;
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish for `drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let clients = Arc::new(Clients::default());
    let graceful = GracefulShutdown::new();
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, peer)) => match clients.take(peer.ip(), limits.per_client.max(1)) {
                    Some(slot) => (s, slot),
                    None => {
                        // Its share is taken: closed at once, its place given back.
                        tracing::debug!(client = %peer.ip(), "connection refused: the client holds its share");
                        continue;
                    }
                },
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait a moment
                    // instead of spinning, then go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (stream, client) = stream;
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity {
            born: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let svc = {
            let activity = activity.clone();
            let app = app.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let guard = InFlight::new(&activity);
                let has_body = req.headers().contains_key(hyper::header::TRANSFER_ENCODING)
                    || req
                        .headers()
                        .get(hyper::header::CONTENT_LENGTH)
                        .is_some_and(|v| v.as_bytes() != b"0");
                let fut = tower::ServiceExt::oneshot(app.clone(), req);
                async move {
                    let mut r = fut.await;
                    drop(guard);
                    // An error may be answered before the body was read (413, 401), and then the
                    // connection cannot be reused: say so, or a client's next request on it races
                    // the close and fails.
                    if let Ok(res) = &mut r {
                        if has_body
                            && (res.status().is_client_error() || res.status().is_server_error())
                        {
                            res.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                    }
                    r
                }
            })
        };
        let conn = graceful.watch(h1.serve_connection(io, svc));
        let idle_limit = limits.idle_timeout;
        tokio::spawn(async move {
            let conn: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(conn);
            tokio::select! {
                _ = conn => {}
                _ = idle(&activity, idle_limit) => {}
            }
            drop(permit);
            drop(client);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain) => {
            tracing::info!("connections still open after the drain time; closing them");
        }
    }
    Ok(())
}

/// Lifts the soft limit on open files to the hard limit, so the connection cap, SQLite and AWS
/// calls share a large pool. Returns the soft limit in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return None;
            }
            if l.rlim_cur < l.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: l.rlim_max,
                    rlim_max: l.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    l = want;
                }
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
        Some(l.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}
