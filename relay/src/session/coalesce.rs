//! The socket under a session's WebSocket: what tungstenite writes waits here until the next
//! flush, so a batch of frames (a page of the replay, the live deliveries taken at once, the
//! answers one commit settled) leaves in one `send` instead of one per frame.
//!
//! tungstenite's own write buffer would do the same, but it keeps its largest size for the life
//! of the connection; this one is freed after every flush, so an idle session holds nothing.
//! tungstenite flushes whatever it writes by itself (pongs, close replies), and the driver
//! flushes after every batch, so nothing waits here unflushed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held before they are written out without waiting for the flush.
pub const MAX_HELD: usize = 64 * 1024;

/// A stream whose writes wait for the next flush (or [`MAX_HELD`] bytes).
#[derive(Debug)]
pub struct Coalesce<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` the socket has taken already.
    written: usize,
}

impl<S> Coalesce<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Coalesce {
            inner,
            held: Vec::new(),
            written: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes out what is held; frees the buffer once it is all written.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.held = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() + buf.len() > MAX_HELD {
            ready!(this.poll_write_held(cx))?;
            if buf.len() > MAX_HELD {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// Records each write it is given; takes at most `max` bytes per write.
    #[derive(Default)]
    struct Writes {
        writes: Vec<Vec<u8>>,
        max: Option<usize>,
        flushed: usize,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max.unwrap_or(usize::MAX));
            self.get_mut().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushed += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_written_before_a_flush_leave_in_one_write() {
        let mut s = Coalesce::new(Writes::default());
        for frame in [&b"one"[..], b"two", b"three"] {
            s.write_all(frame).await.expect("write");
        }
        assert!(s.inner.writes.is_empty(), "nothing leaves before the flush");
        s.flush().await.expect("flush");
        assert_eq!(s.inner.writes, vec![b"onetwothree".to_vec()]);
        assert_eq!(s.inner.flushed, 1);
        assert_eq!(s.held.capacity(), 0, "the buffer is freed after the flush");
    }

    #[tokio::test]
    async fn no_more_than_max_held_waits_for_the_flush() {
        let mut s = Coalesce::new(Writes::default());
        let frame = vec![7u8; MAX_HELD / 2 + 1];
        s.write_all(&frame).await.expect("write");
        s.write_all(&frame).await.expect("write"); // over the cap: the first goes out now
        assert_eq!(s.inner.writes, vec![frame.clone()]);
        let big = vec![9u8; MAX_HELD + 1];
        s.write_all(&big).await.expect("write"); // bigger than the cap: straight through
        assert_eq!(s.inner.writes.len(), 3);
        assert_eq!(s.inner.writes[2], big);
        assert!(s.held.len() <= MAX_HELD);
    }

    #[tokio::test]
    async fn a_socket_taking_part_of_a_write_gets_the_rest_in_order() {
        let mut s = Coalesce::new(Writes {
            max: Some(4),
            ..Default::default()
        });
        s.write_all(b"abcdefghij").await.expect("write");
        s.shutdown().await.expect("shutdown");
        assert_eq!(s.inner.writes.concat(), b"abcdefghij".to_vec());
        assert_eq!(s.inner.writes.len(), 3);
    }
}
