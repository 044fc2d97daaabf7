//! A session's WebSocket once the `101` is out: RFC 6455 frames, server side (masked input,
//! unmasked output, no extensions), read and written by the relay itself.
//!
//! Why not tungstenite's stream: its read buffer is reserved to the largest frame the peer ever
//! sent and kept for the connection's life (one 256 KiB attachment pinned ~330 KB per phone), and
//! it and its write buffer hold room even on an idle connection. Here a connection holds no
//! buffer between frames: reads go through a per-thread scratch buffer and only an incomplete
//! frame is kept; frames to write wait for the next flush (one `send` per batch) and their
//! buffer is freed once written. tungstenite still answers the handshake's key and names
//! [`Utf8Bytes`], the text the rest of the session passes around.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes a control frame may carry (RFC 6455, section 5.5).
const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

thread_local! {
    /// Where reads land before what is not a whole frame yet is copied to its connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// A message the device sent. Pings are answered here; control payloads are not kept.
#[derive(Debug)]
pub enum Incoming {
    /// A whole text message, checked to be UTF-8.
    Text(Utf8Bytes),
    /// A fragment of a message still being put together: a frame read, for the inbound budget
    /// (a message sent a byte per fragment costs a frame's parse per byte).
    Fragment,
    /// The relay speaks text only; its length, for the inbound budget.
    Binary(usize),
    /// A ping (its pong is queued unless one is still unwritten).
    Ping,
    /// A pong.
    Pong,
    /// The device closes; the reply waits for the next flush.
    Close,
}

/// Why reading stopped. After an error the socket reads nothing more.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A message longer than the limit (known from its header, before its payload is read).
    #[error("message over {0} bytes")]
    TooBig(usize),
    /// A text message, or a close reason, that is not UTF-8.
    #[error("text is not utf-8")]
    Utf8,
    /// A frame RFC 6455 does not allow from a client.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The server end of one WebSocket connection.
#[derive(Debug)]
pub struct Socket<S> {
    io: S,
    /// Input not consumed yet (from `at`): an incomplete frame, or frames after the last one
    /// returned. Freed whenever it is all consumed.
    input: Vec<u8>,
    at: usize,
    /// A fragmented data message being put together: whether it is text, and its bytes.
    partial: Option<(bool, Vec<u8>)>,
    /// Frames waiting for the flush (from `written`).
    output: Vec<u8>,
    written: usize,
    max_message: usize,
    /// The peer's close was read (or reading failed): nothing more is read.
    read_closed: bool,
    /// Our close is queued: nothing more is written.
    write_closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// A socket whose handshake is done, reading messages of at most `max_message` bytes.
    pub fn new(io: S, max_message: usize) -> Self {
        Socket {
            io,
            input: Vec::new(),
            at: 0,
            partial: None,
            output: Vec::new(),
            written: 0,
            max_message,
            read_closed: false,
            write_closed: false,
        }
    }

    /// The next message, fragment of one, or control frame; `None` once the peer closed or the
    /// connection ended. Cancel-safe: what was read stays for the next call.
    pub async fn next(&mut self) -> Option<Result<Incoming, ReadError>> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Queues a text frame for the next flush.
    pub fn feed_text(&mut self, text: &str) {
        self.queue(OP_TEXT, text.as_bytes());
    }

    /// Queues a ping for the next flush.
    pub fn feed_ping(&mut self) {
        self.queue(OP_PING, &[]);
    }

    /// Writes what is queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Sends a close frame (once) and flushes; what the peer sends after it can still be read.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if !self.write_closed {
            let mut payload = code.to_be_bytes().to_vec();
            // Within a control frame's limit, cut on a character boundary.
            let mut end = reason.len().min(MAX_CONTROL - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
            self.queue(OP_CLOSE, &payload);
            self.write_closed = true;
        }
        self.flush().await
    }

    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        if self.write_closed {
            return; // nothing follows a close (RFC 6455, section 5.5.1)
        }
        let out = &mut self.output;
        out.reserve(10 + payload.len());
        out.push(0x80 | opcode);
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.output.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.output[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.output = Vec::new();
        self.written = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, ReadError>>> {
        // A pong or close reply queued by an earlier read goes out as soon as the socket takes
        // it; one the peer does not read waits (and replaces no other: see `on_control`).
        if self.written < self.output.len()
            && let Poll::Ready(Err(e)) = self.poll_write_out(cx)
        {
            self.read_closed = true;
            return Poll::Ready(Some(Err(e.into())));
        }
        loop {
            if self.read_closed {
                return Poll::Ready(None);
            }
            match self.next_frame() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => {
                    self.read_closed = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(self.poll_read_more(cx)) {
                Ok(0) => {
                    self.read_closed = true;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => {
                    self.read_closed = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// Reads what the socket has: into the input's own room when a long frame has reserved it,
    /// otherwise through the scratch buffer.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let io = Pin::new(&mut self.io);
        if self.input.capacity() - self.input.len() >= READ_CHUNK {
            return tokio_util::io::poll_read_buf(io, cx, &mut self.input);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            ready!(io.poll_read(cx, &mut buf))?;
            let filled = buf.filled();
            // Exactly: amortized growth would double a long frame's room for its last read.
            self.input.reserve_exact(filled.len());
            self.input.extend_from_slice(filled);
            Poll::Ready(Ok(filled.len()))
        })
    }

    /// Takes the next whole frame from the input: a message, a fragment of one, or a control
    /// frame; `None` when the input ends before the frame does.
    fn next_frame(&mut self) -> Result<Option<Incoming>, ReadError> {
        let buf = &self.input[self.at..];
        let Some(head) = Header::parse(buf)? else {
            self.keep_for(None);
            return Ok(None);
        };
        let limit = match head.opcode {
            OP_CLOSE | OP_PING | OP_PONG => MAX_CONTROL,
            _ => self.max_message - self.partial.as_ref().map_or(0, |(_, b)| b.len()),
        };
        if head.len > limit as u64 {
            return Err(match head.opcode {
                OP_CLOSE | OP_PING | OP_PONG => ReadError::Protocol("control frame too long"),
                _ => ReadError::TooBig(self.max_message),
            });
        }
        let total = head.size + head.len as usize;
        if buf.len() < total {
            self.keep_for(Some(total));
            return Ok(None);
        }
        let mut payload = buf[head.size..total].to_vec();
        unmask(&mut payload, head.mask);
        self.at += total;
        if self.at == self.input.len() {
            self.input = Vec::new();
            self.at = 0;
        }
        self.on_frame(head.fin, head.opcode, payload).map(Some)
    }

    /// The input ends in an incomplete frame (of `total` bytes when its header is read): drop
    /// what was consumed, and make room for more of the frame, doubling with what arrived (a
    /// header alone buys no more than a read's worth) and never past the frame's end.
    fn keep_for(&mut self, total: Option<usize>) {
        if self.at > 0 {
            self.input.drain(..self.at);
            self.at = 0;
        }
        if let Some(total) = total {
            let len = self.input.len();
            self.input
                .reserve_exact(total.min(len + len.max(READ_CHUNK)) - len);
        }
    }

    fn on_frame(&mut self, fin: bool, opcode: u8, payload: Vec<u8>) -> Result<Incoming, ReadError> {
        let (text, bytes) = match (opcode, self.partial.take()) {
            (OP_TEXT | OP_BINARY, None) => (opcode == OP_TEXT, payload),
            (OP_CONTINUATION, Some((text, mut bytes))) => {
                bytes.extend_from_slice(&payload);
                (text, bytes)
            }
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(ReadError::Protocol("new message inside a fragmented one"));
            }
            (OP_CONTINUATION, None) => return Err(ReadError::Protocol("continuation of nothing")),
            (_, partial) => {
                self.partial = partial;
                return self.on_control(opcode, payload);
            }
        };
        if !fin {
            self.partial = Some((text, bytes));
            return Ok(Incoming::Fragment);
        }
        if !text {
            return Ok(Incoming::Binary(bytes.len()));
        }
        let text = String::from_utf8(bytes).map_err(|_| ReadError::Utf8)?;
        Ok(Incoming::Text(text.into()))
    }

    fn on_control(&mut self, opcode: u8, payload: Vec<u8>) -> Result<Incoming, ReadError> {
        match opcode {
            OP_PING => {
                // Answered unless an earlier answer is still unwritten: a peer that pings
                // without reading gets one pong (RFC 6455, section 5.5.3, allows it).
                if self.output.is_empty() {
                    self.queue(OP_PONG, &payload);
                }
                Ok(Incoming::Ping)
            }
            OP_PONG => Ok(Incoming::Pong),
            _ => {
                // OP_CLOSE: an empty body, or a code the peer may send and a UTF-8 reason.
                if let Some(code) = payload.get(..2) {
                    let code = u16::from_be_bytes([code[0], code[1]]);
                    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                        return Err(ReadError::Protocol("bad close code"));
                    }
                    std::str::from_utf8(&payload[2..]).map_err(|_| ReadError::Utf8)?;
                } else if !payload.is_empty() {
                    return Err(ReadError::Protocol("one-byte close body"));
                }
                self.read_closed = true;
                if !self.write_closed {
                    // The reply echoes the code (section 5.5.1); an empty close gets an empty one.
                    self.queue(OP_CLOSE, payload.get(..2).unwrap_or_default());
                    self.write_closed = true;
                }
                Ok(Incoming::Close)
            }
        }
    }
}

/// A frame's header as a client must send it.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Bytes of the header.
    size: usize,
    /// Bytes of the payload.
    len: u64,
}

impl Header {
    /// The header at the start of `buf`, or `None` if `buf` ends inside it.
    fn parse(buf: &[u8]) -> Result<Option<Header>, ReadError> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
            OP_CLOSE | OP_PING | OP_PONG if fin => {}
            OP_CLOSE | OP_PING | OP_PONG => {
                return Err(ReadError::Protocol("fragmented control frame"));
            }
            _ => return Err(ReadError::Protocol("unknown opcode")),
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("unmasked client frame"));
        }
        let (len, at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let len = u64::from_be_bytes(b.try_into().unwrap_or_default());
                    if len >> 63 != 0 {
                        return Err(ReadError::Protocol("length's high bit set"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: [mask[0], mask[1], mask[2], mask[3]],
            size: at + 4,
            len,
        }))
    }
}

/// Removes a client's mask, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default()) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    const MAX: usize = 400_000;

    /// Our end, and tungstenite's client on the other: another implementation checks ours.
    async fn pair() -> (Socket<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1 << 20);
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (Socket::new(server, MAX), client)
    }

    async fn text(socket: &mut Socket<DuplexStream>) -> String {
        match socket.next().await {
            Some(Ok(Incoming::Text(t))) => t.to_string(),
            other => panic!("expected a text, got {other:?}"),
        }
    }

    /// A masked client frame, written by hand.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// What reading `bytes` (sent in one piece) ends with after the messages it yields.
    async fn read_raw(bytes: Vec<u8>) -> (Vec<String>, Option<ReadError>) {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut socket = Socket::new(server, MAX);
        client.write_all(&bytes).await.expect("write");
        drop(client);
        let mut texts = Vec::new();
        while let Some(next) = socket.next().await {
            match next {
                Ok(Incoming::Text(t)) => texts.push(t.to_string()),
                Ok(_) => {}
                Err(e) => return (texts, Some(e)),
            }
        }
        (texts, None)
    }

    #[tokio::test]
    async fn a_large_message_leaves_no_buffer_behind() {
        let (mut socket, mut client) = pair().await;
        let large = "L".repeat(300_000);
        let writer = tokio::spawn(async move {
            client.send(Message::text(large)).await.expect("send");
            client.send(Message::text("small")).await.expect("send");
            client
        });
        assert_eq!(text(&mut socket).await.len(), 300_000);
        assert_eq!(text(&mut socket).await, "small");
        // All consumed: the room the large frame took is gone.
        assert_eq!((socket.input.capacity(), socket.at), (0, 0));
        assert!(socket.partial.is_none());
        drop(writer.await);
    }

    /// A header claiming a long frame is not paid for in advance: room grows with what arrives
    /// (a client that sends only headers must not make the relay hold a frame's worth each).
    #[tokio::test]
    async fn a_long_frame_is_given_room_as_it_arrives_not_as_its_header_claims() {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        let mut socket = Socket::new(server, MAX);
        let whole = frame(0x80 | OP_TEXT, &vec![b'y'; 300_000]);
        client.write_all(&whole[..100]).await.expect("write");
        let reading = tokio::time::timeout(Duration::from_millis(50), socket.next()).await;
        assert!(reading.is_err(), "nothing whole yet");
        assert!(
            socket.input.capacity() <= 2 * READ_CHUNK + 100,
            "{}",
            socket.input.capacity()
        );
        client.write_all(&whole[100..]).await.expect("write");
        assert_eq!(text(&mut socket).await.len(), 300_000);
        assert_eq!(socket.input.capacity(), 0);
    }

    #[tokio::test]
    async fn texts_of_every_length_class_go_both_ways() {
        let (mut socket, mut client) = pair().await;
        let lengths = [0, 1, 125, 126, 65_535, 65_536, 200_000];
        for &n in &lengths {
            let t: String = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            client.send(Message::text(t.clone())).await.expect("send");
            let got = text(&mut socket).await;
            assert_eq!(got, t, "client to relay, {n} bytes");
            socket.feed_text(&got);
            socket.flush().await.expect("flush");
            match client.next().await {
                Some(Ok(Message::Text(back))) => assert_eq!(back.as_str(), t, "relay to client"),
                other => panic!("{other:?}"),
            }
            // Nothing waits in an idle socket.
            assert_eq!((socket.output.capacity(), socket.input.capacity()), (0, 0));
        }
    }

    #[tokio::test]
    async fn fragments_around_a_ping_make_one_text_and_the_ping_is_answered() {
        let (server, mut client) = tokio::io::duplex(1 << 16);
        let mut socket = Socket::new(server, MAX);
        let mut bytes = frame(OP_TEXT, "héllo ".as_bytes());
        bytes.extend(frame(0x80 | OP_PING, b"are you there"));
        bytes.extend(frame(OP_CONTINUATION, "wörld".as_bytes()));
        bytes.extend(frame(0x80 | OP_CONTINUATION, b"!"));
        // One byte per write: every header and payload split across reads.
        for b in bytes {
            client.write_all(&[b]).await.expect("write");
        }
        // Each fragment is reported as it is read (the inbound budget charges it as a frame).
        assert!(matches!(socket.next().await, Some(Ok(Incoming::Fragment))));
        assert!(matches!(socket.next().await, Some(Ok(Incoming::Ping))));
        assert!(matches!(socket.next().await, Some(Ok(Incoming::Fragment))));
        assert_eq!(text(&mut socket).await, "héllo wörld!");
        let mut pong = [0u8; 15];
        client.read_exact(&mut pong).await.expect("pong");
        assert_eq!(&pong[..2], &[0x80 | OP_PONG, 13]);
        assert_eq!(&pong[2..], b"are you there");
    }

    #[tokio::test]
    async fn a_close_is_answered_with_its_code_and_ends_the_input() {
        let (mut socket, mut client) = pair().await;
        client.close(None).await.expect("close");
        assert!(matches!(socket.next().await, Some(Ok(Incoming::Close))));
        socket.flush().await.expect("flush");
        assert!(socket.next().await.is_none());
        drop(socket);
        // The client sees our reply to its close, then the end.
        while let Some(Ok(m)) = client.next().await {
            assert!(m.is_close(), "{m:?}");
        }

        let (mut socket, mut client) = pair().await;
        socket.close(4001, "logged out").await.expect("close");
        match client.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!((u16::from(f.code), f.reason.as_str()), (4001, "logged out"));
            }
            other => panic!("{other:?}"),
        }
        // tungstenite answers our close when it is next polled; nothing is written after ours.
        let reading = tokio::spawn(async move { while client.next().await.is_some() {} });
        assert!(matches!(socket.next().await, Some(Ok(Incoming::Close))));
        socket.feed_text("late");
        assert!(socket.output.is_empty());
        drop(socket);
        reading.await.expect("client");
    }

    #[tokio::test]
    async fn broken_frames_are_refused_with_the_reason() {
        let protocol = |e: Option<ReadError>| matches!(e, Some(ReadError::Protocol(_)));
        let mut unmasked = frame(0x80 | OP_TEXT, b"hi");
        unmasked[1] &= 0x7F;
        assert!(protocol(read_raw(unmasked).await.1), "unmasked");
        assert!(
            protocol(read_raw(frame(0xC0 | OP_TEXT, b"hi")).await.1),
            "reserved bit"
        );
        assert!(
            protocol(read_raw(frame(0x80 | 0x3, b"hi")).await.1),
            "unknown opcode"
        );
        assert!(
            protocol(read_raw(frame(OP_PING, b"")).await.1),
            "fragmented ping"
        );
        assert!(
            protocol(read_raw(frame(0x80 | OP_PING, &[0; 126])).await.1),
            "long ping"
        );
        assert!(
            protocol(read_raw(frame(0x80 | OP_CONTINUATION, b"x")).await.1),
            "orphan"
        );
        let mut twice = frame(OP_TEXT, b"a");
        twice.extend(frame(0x80 | OP_TEXT, b"b"));
        assert!(protocol(read_raw(twice).await.1), "text inside a text");
        assert!(
            protocol(read_raw(frame(0x80 | OP_CLOSE, &[3])).await.1),
            "one-byte close"
        );
        assert!(protocol(
            read_raw(frame(0x80 | OP_CLOSE, &1005u16.to_be_bytes()))
                .await
                .1
        ));
        let bad_utf8 = read_raw(frame(0x80 | OP_TEXT, &[0x68, 0xC3, 0x28])).await;
        assert!(matches!(bad_utf8.1, Some(ReadError::Utf8)));

        // Too big is known from the header: refused before the payload arrives.
        let mut huge = vec![0x80 | OP_TEXT, 0x80 | 127];
        huge.extend_from_slice(&(MAX as u64 + 1).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            read_raw(huge).await.1,
            Some(ReadError::TooBig(MAX))
        ));
        // And a fragmented message over the limit in total.
        let half = vec![b'x'; MAX / 2 + 1];
        let mut split = frame(OP_TEXT, &half);
        split.extend(frame(0x80 | OP_CONTINUATION, &half));
        assert!(matches!(
            read_raw(split).await.1,
            Some(ReadError::TooBig(MAX))
        ));

        // Whatever came whole before the broken frame is read; a clean end is just the end.
        let mut fine_then_bad = frame(0x80 | OP_TEXT, b"fine");
        fine_then_bad.extend(frame(0x80 | 0xB, b""));
        let (texts, error) = read_raw(fine_then_bad).await;
        assert_eq!(texts, ["fine"]);
        assert!(protocol(error));
        let (texts, error) = read_raw(frame(0x80 | OP_TEXT, b"only")).await;
        assert_eq!((texts, error.is_none()), (vec!["only".to_string()], true));
    }

    #[test]
    fn unmasking_matches_the_byte_by_byte_rule() {
        let mask = [1, 2, 3, 250];
        for n in [0, 1, 7, 8, 9, 31, 64, 1001] {
            let original: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let mut fast = original.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "{n} bytes");
        }
    }
}
