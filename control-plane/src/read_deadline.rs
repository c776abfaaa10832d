//! A deadline on silence from the client, under TLS on every gRPC connection.
//!
//! Once a connection has finished its TLS handshake, hyper waits for the HTTP/2 preface
//! without any deadline, and its keep-alive pings start only after it: a client that
//! completes TLS and then says nothing held its socket and task for as long as it liked.
//! [`ReadDeadline`] fails the connection's reads once nothing has arrived for its `idle`
//! time. A healthy client never gets there: the server pings an idle connection every 30 s
//! (`http2_keepalive_interval`) and the client's acknowledgement is a read, and agents send
//! heartbeats every few seconds.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A reader that fails with `TimedOut` once nothing has been read for `idle`; writes pass
/// through untouched.
#[derive(Debug)]
pub struct ReadDeadline<IO> {
    io: IO,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<IO> ReadDeadline<IO> {
    pub fn new(io: IO, idle: Duration) -> Self {
        Self {
            io,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client sent nothing for {:?}", this.idle),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The services see the peer's address, and through tonic's TLS stream its certificates, as
/// for a bare socket.
impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for ReadDeadline<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_fail_after_the_idle_time_and_each_byte_restarts_it() {
        let idle = Duration::from_secs(1);
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = ReadDeadline::new(server, idle);
        let mut buf = [0u8; 16];
        // A byte every 300 ms keeps it alive well past the idle time in all.
        let started = Instant::now();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(b"ping").await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), 4);
        }
        assert!(started.elapsed() > idle);
        // Then silence: the read fails once the idle time has passed since the last byte.
        let silent = Instant::now();
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let waited = silent.elapsed();
        assert!(
            waited >= idle && waited < 5 * idle,
            "failed after {waited:?}"
        );
        // Writes were never affected.
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf[..4]).await.unwrap();
        assert_eq!(&buf[..4], b"pong");
    }
}
