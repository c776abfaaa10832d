//! Serving Steward's plain HTTP endpoints: the control plane's console, API and metrics, and
//! the agent's OpenAI-compatible API.
//!
//! `axum::serve` sets no timer on its connections, so hyper never enforces a deadline for a
//! request head: a client that connects and sends nothing, or half a request line, holds its
//! socket and task until it leaves (the classic slow-loris). [`serve`] is the same HTTP/1.1
//! server with [`HEAD_TIMEOUT`] on every request head, TCP_NODELAY, and a graceful shutdown
//! that lets requests in flight finish.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a client may take to send a request head, from the connection or the previous
/// response (so also how long an idle keep-alive connection is kept): hyper's own default,
/// which it enforces only when given a timer.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the connections
/// still serving a request to finish. A request head not complete within `head_timeout` of
/// the connection (or of the previous response) closes the connection.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_telling_closed(listener, router, head_timeout, shutdown, ()).await
}

/// [`serve`], dropping `closed` as soon as the listener is closed, before the requests in
/// flight finish: a drop guard there tells the owner that the port can be bound again.
pub async fn serve_telling_closed(
    listener: TcpListener,
    router: axum::Router,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    closed: impl Send + 'static,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // wait a moment instead of spinning, and keep listening.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Streamed tokens are small writes: without TCP_NODELAY, Nagle holds each one back
        // until the client acknowledges the previous one, and delayed ACKs make that 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
        let connection =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(closed);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        head_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, head_timeout, async move {
            let _ = stopped.await;
        }));
        (addr, stop, server)
    }

    /// Reads until the server closes the connection; `None` if it is still open after 10 s.
    async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        read.ok().map(|()| got)
    }

    #[tokio::test]
    async fn silent_and_half_sent_requests_are_closed_after_the_head_timeout() {
        let (addr, stop, server) = start(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        for (what, stream) in [("silent", &mut silent), ("half-sent", &mut half)] {
            let answer = read_to_close(stream)
                .await
                .unwrap_or_else(|| panic!("the {what} connection is still open after 10 s"));
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                !answer.contains("hi"),
                "the {what} request is not served: {answer}"
            );
        }
        assert!(started.elapsed() >= Duration::from_millis(250));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn complete_requests_are_served_and_shutdown_lets_them_finish() {
        let (addr, stop, server) = start(Duration::from_secs(5)).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut client)
            .await
            .expect("the server answers");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hi"), "{answer}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "nothing listens after shutdown"
        );
    }
}
