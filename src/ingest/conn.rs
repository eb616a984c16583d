//! Accepting and serving the ingest server's connections (HTTP/1.1).
//!
//! - At most `ingest.max_connections` are open at once, lingering ones included; at the cap
//!   the accept loop waits for one to close and the kernel's backlog holds newcomers.
//! - A connection must send a request's complete headers within
//!   `ingest.header_read_timeout_ms` of opening or of its previous answer (hyper's header
//!   read timeout), so connections that never send anything do not stay open.
//! - Closing is *lingering*: after the last answer the server shuts its side down (FIN, so
//!   the client sees the end of the answer) and reads and discards what the client still
//!   sends, for at most [`LINGER_TIME`] and [`LINGER_BYTES`], before it closes the socket.
//!   Without that, closing a socket with unread request bytes in it makes the kernel send a
//!   reset, which can destroy an early answer (413, 401, 503 before the body was read) in
//!   the client's receive buffer, or break the client's write with `EPIPE`, before it reads
//!   the answer.

use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Longest a closing connection is drained.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes a closing connection is drained of (a client whose body is larger than this
/// after an early answer is cut off; bodies above `ingest.body_limit_bytes` are refused
/// anyway).
pub const LINGER_BYTES: usize = 1024 * 1024;
/// Largest read buffer of a connection (hyper's default is about 400 KiB). A request's
/// headers must fit in it; webhook and API headers are a few KiB. Body bytes pass through it
/// on their way to the handler's own buffer, so this is memory per reading connection on top
/// of `ingest.body_limit_bytes`.
const READ_BUFFER_MAX: usize = 64 * 1024;
/// Pending connections the kernel holds for the accept loop (capped by `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;
/// Pause after a failed `accept` (out of file descriptors, usually), so the loop does not
/// spin while nothing can be accepted.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, lets every open
/// connection finish its request in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    open: IntGauge,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a sender; when all are gone, `recv` returns `None`.
    let (running, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "ingest server cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        open.inc();
        let io = TokioIo::new(Lingering {
            stream: Some(stream),
            slot: Some(ConnSlot {
                _permit: slot,
                open: open.clone(),
            }),
        });
        let service = TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        let running = running.clone();
        tokio::spawn(async move {
            let _running = running;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(READ_BUFFER_MAX);
            let mut conn = pin!(builder.serve_connection(io, service));
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "ingest connection ended with an error");
            }
        });
    }
    drop(running);
    let _ = all_done.recv().await;
}

/// One of `max_connections`, held until the connection is closed (after lingering).
struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A TCP stream that is drained before it is closed (see the module docs).
struct Lingering {
    stream: Option<TcpStream>,
    slot: Option<ConnSlot>,
}

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until drop"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(stream), Some(slot)) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        // Outside a runtime (only while the process exits) the socket simply closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(linger(stream, slot));
        }
    }
}

async fn linger(mut stream: TcpStream, _slot: ConnSlot) {
    // Usually done already by hyper; errors (the peer is gone) end the drain below too.
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        if !matches!(
            tokio::time::timeout_at(deadline, stream.readable()).await,
            Ok(Ok(()))
        ) {
            return;
        }
        match discard_ready(&stream) {
            Drained::Done => return,
            Drained::Some(n) => drained += n,
        }
    }
}

thread_local! {
    /// Where draining connections read to: the bytes are thrown away, so one buffer per
    /// runtime thread serves them all (a buffer per connection would cost memory per
    /// connection, which is what an attacker controls).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
}

enum Drained {
    /// This many bytes; the stream may have more later.
    Some(usize),
    /// End of stream or an error: stop.
    Done,
}

/// Reads and discards what is ready, without waiting.
fn discard_ready(stream: &TcpStream) -> Drained {
    SCRATCH.with_borrow_mut(|buf| {
        let mut total = 0;
        loop {
            match stream.try_read(buf) {
                Ok(0) => return Drained::Done,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Some(total),
                Err(_) => return Drained::Done,
            }
            if total >= LINGER_BYTES {
                return Drained::Some(total);
            }
        }
    })
}
