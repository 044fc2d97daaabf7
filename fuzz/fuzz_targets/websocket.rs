//! A client's raw bytes into the relay's WebSocket reader (`session::socket`), delivered in
//! reads of a chosen size: no input panics it or makes it hold more than a message's worth, and
//! every text it returns is within the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::session::socket::{Incoming, Socket};
use tokio::io::AsyncWriteExt as _;

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte: how many bytes each read may return (the duplex's capacity).
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let (server, mut client) = tokio::io::duplex(step);
        let mut socket = Socket::new(server, MAX_MESSAGE);
        let writer = async move {
            for chunk in input.chunks(step) {
                if client.write_all(chunk).await.is_err() {
                    break;
                }
            }
            // The end of input; kept open (unread: replies wait in it) until the reader is done.
            let _ = client.shutdown().await;
            client
        };
        // Owns the socket: once it stops reading, the writer's writes fail instead of waiting.
        let reader = async move {
            while let Some(next) = socket.next().await {
                match next {
                    Ok(Incoming::Text(text)) => assert!(text.len() <= MAX_MESSAGE),
                    Ok(Incoming::Binary(len)) => assert!(len <= MAX_MESSAGE),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        };
        let (client, ()) = tokio::join!(writer, reader);
        drop(client);
    });
});
