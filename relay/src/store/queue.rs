//! The queue in front of a backend's single writer: requests in call order, drained in batches.
//! Both backends use it, so "appends from one caller are applied in call order" and "fan-out
//! after durability" are decided by the same code path.

use tokio::sync::{mpsc, oneshot};

use super::{Accepted, AppendTicket, DeviceRef, NewMessage, StoreError};

/// A request to a writer.
pub(crate) enum Op {
    /// Store a message; answer when durable.
    Append(NewMessage, oneshot::Sender<Result<Accepted, StoreError>>),
    /// Record a device; answer when durable.
    Register(DeviceRef, oneshot::Sender<Result<(), StoreError>>),
    /// Remove acknowledged inbox entries (need not be durable before the answer).
    Ack(DeviceRef, Vec<u64>),
    /// Another node saw this device: refresh a cached device list that lacks it.
    Seen(DeviceRef),
    /// Finish everything queued, make it durable, stop.
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// The sending side, held by the store.
pub(crate) struct WriterQueue(mpsc::Sender<Op>);

/// The receiving side, owned by the writer.
pub(crate) struct Batches {
    rx: mpsc::Receiver<Op>,
    max: usize,
}

/// A queue of `depth` requests, drained `max` at a time.
pub(crate) fn channel(depth: usize, max: usize) -> (WriterQueue, Batches) {
    let (tx, rx) = mpsc::channel(depth);
    (WriterQueue(tx), Batches { rx, max })
}

impl WriterQueue {
    /// Queues an append without waiting; a full queue answers `unavailable` at once.
    pub(crate) fn append(&self, msg: NewMessage) -> AppendTicket {
        let (tx, rx) = oneshot::channel();
        match self.0.try_send(Op::Append(msg, tx)) {
            Ok(()) => rx,
            Err(e) => {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Err(match e {
                    mpsc::error::TrySendError::Full(_) => {
                        StoreError::Unavailable("write queue full".into())
                    }
                    mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
                }));
                rx
            }
        }
    }

    /// Queues a device sighting; dropped if the queue is full (the cache expires anyway).
    pub(crate) fn seen(&self, device: DeviceRef) {
        let _ = self.0.try_send(Op::Seen(device));
    }

    pub(crate) async fn register(&self, device: DeviceRef) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(Op::Register(device, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> Result<(), StoreError> {
        self.0
            .send(Op::Ack(device, seqs))
            .await
            .map_err(|_| StoreError::Closed)
    }

    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Op::Close(tx)).await.is_err() {
            return Ok(()); // already closed
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl Batches {
    fn fill(&mut self, first: Op) -> Vec<Op> {
        let mut ops = Vec::with_capacity(self.max.min(64));
        ops.push(first);
        while ops.len() < self.max {
            match self.rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        ops
    }

    /// Waits for a request, then takes whatever else queued meanwhile (group commit).
    pub(crate) async fn next(&mut self) -> Option<Vec<Op>> {
        let first = self.rx.recv().await?;
        Some(self.fill(first))
    }

    /// The same, for a writer on its own thread.
    pub(crate) fn next_blocking(&mut self) -> Option<Vec<Op>> {
        let first = self.rx.blocking_recv()?;
        Some(self.fill(first))
    }
}
