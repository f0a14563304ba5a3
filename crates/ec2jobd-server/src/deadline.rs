//! The request deadline (`http.request_timeout`): one middleware gives every request a
//! [`Deadline`] and answers `503 timeout` when it passes.
//!
//! Only a handler can move its deadline: submissions held with `?wait=` extend it by the wait they
//! parsed themselves (one parser, in the handler; nothing here reads the query), so no other route can
//! ask for more time. A handler about to commit something marks the deadline [`Deadline::committing`];
//! from then on the middleware never answers 503 for it, because a 503 says "nothing stored, retry"
//! and a retry would store it twice. The handler then bounds its own remaining time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::error::ApiError;

/// A request's deadline, in its extensions.
#[derive(Clone, Debug)]
pub struct Deadline(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    start: Instant,
    limit: Duration,
    extra_ms: AtomicU64,
    committing: AtomicBool,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn new(limit: Duration) -> Self {
        Self(Arc::new(Inner {
            start: Instant::now(),
            limit,
            extra_ms: AtomicU64::new(0),
            committing: AtomicBool::new(false),
        }))
    }

    /// When the middleware gives up on the request (unless it is committing).
    pub fn at(&self) -> Instant {
        let extra = Duration::from_millis(self.0.extra_ms.load(Ordering::Acquire));
        self.0.start + self.0.limit + extra
    }

    /// Gives the request `d` more (a submission held with `?wait=`).
    pub fn extend(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.extra_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// From now on the request is answered by its handler, however long it takes.
    pub fn committing(&self) {
        self.0.committing.store(true, Ordering::Release);
    }

    fn is_committing(&self) -> bool {
        self.0.committing.load(Ordering::Acquire)
    }
}

/// The middleware: runs the request against its [`Deadline`].
pub async fn enforce(State(limit): State<Duration>, mut req: Request, next: Next) -> Response {
    let deadline = Deadline::new(limit);
    req.extensions_mut().insert(deadline.clone());
    let fut = next.run(req);
    tokio::pin!(fut);
    loop {
        let at = deadline.at();
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep_until(at) => {
                if deadline.at() > at {
                    continue; // extended meanwhile
                }
                if deadline.is_committing() {
                    return fut.await;
                }
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    "the request took longer than http.request_timeout",
                )
                .into_response();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn extending_moves_the_deadline_and_never_shortens_it() {
        let d = Deadline::new(Duration::from_secs(30));
        let first = d.at();
        d.extend(Duration::from_secs(10));
        assert_eq!(d.at(), first + Duration::from_secs(10));
        d.extend(Duration::from_secs(5));
        assert_eq!(d.at(), first + Duration::from_secs(10));
    }
}
