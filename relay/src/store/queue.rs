//! The queue in front of a backend's single writer: requests in call order, drained in batches.
//! Both backends use it, so "appends from one caller are applied in call order" and "fan-out
//! after durability" are decided by the same code path.
//!
//! Acknowledgements have a lane of their own: every batch takes at most [`MAX_BATCH_ACKS`] of
//! them beside whatever requests wait, so acks never hold appends back and appends never hold
//! acks back. A session keeps one ack request in flight and gathers the rest meanwhile.

use tokio::sync::{mpsc, oneshot};

use super::{Accepted, AppendTicket, DeviceRef, NewMessage, StoreError};

/// A request to a writer.
pub(crate) enum Op {
    /// Store a message; answer when durable.
    Append(NewMessage, oneshot::Sender<Result<Accepted, StoreError>>),
    /// Record a device; answer when durable.
    Register(DeviceRef, oneshot::Sender<Result<(), StoreError>>),
    /// Another node saw this device: refresh a cached device list that lacks it.
    Seen(DeviceRef),
    /// Finish everything queued, make it durable, stop.
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// Acknowledged inbox entries of one device to remove; answered once applied (not necessarily
/// durable: losing an ack to a crash only causes a redelivery).
pub(crate) struct Ack {
    pub(crate) device: DeviceRef,
    pub(crate) seqs: Vec<u64>,
    pub(crate) done: oneshot::Sender<Result<(), StoreError>>,
}

/// Acknowledged sequences one batch removes at most (at least one request's worth).
pub(crate) const MAX_BATCH_ACKS: usize = 4096;
/// Ack requests waiting at most; one per session at a time, so this is sessions acking at once.
const ACK_QUEUE_DEPTH: usize = 16_384;

/// What the writer applies at once.
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    pub(crate) acks: Vec<Ack>,
}

/// The sending side, held by the store.
pub(crate) struct WriterQueue {
    ops: mpsc::Sender<Op>,
    acks: mpsc::Sender<Ack>,
}

/// The receiving side, owned by the writer.
pub(crate) struct Batches {
    rx: mpsc::Receiver<Op>,
    acks: mpsc::Receiver<Ack>,
    max: usize,
}

/// A queue of `depth` requests, drained `max` at a time, beside the ack lane.
pub(crate) fn channel(depth: usize, max: usize) -> (WriterQueue, Batches) {
    let (tx, rx) = mpsc::channel(depth);
    let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE_DEPTH);
    (
        WriterQueue {
            ops: tx,
            acks: ack_tx,
        },
        Batches {
            rx,
            acks: ack_rx,
            max,
        },
    )
}

impl WriterQueue {
    /// Queues an append without waiting; a full queue answers `unavailable` at once.
    pub(crate) fn append(&self, msg: NewMessage) -> AppendTicket {
        let (tx, rx) = oneshot::channel();
        match self.ops.try_send(Op::Append(msg, tx)) {
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
        let _ = self.ops.try_send(Op::Seen(device));
    }

    pub(crate) async fn register(&self, device: DeviceRef) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Register(device, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues an ack on its lane; resolves once the writer applied it.
    pub(crate) async fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.acks
            .send(Ack { device, seqs, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Close(tx)).await.is_err() {
            return Ok(()); // already closed
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.ops.is_closed()
    }
}

impl Batches {
    fn fill(&mut self, first: Option<Op>, first_ack: Option<Ack>) -> Batch {
        let mut ops = Vec::with_capacity(self.max.min(64));
        ops.extend(first);
        while ops.len() < self.max {
            match self.rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut seqs = first_ack.as_ref().map_or(0, |a| a.seqs.len());
        let mut acks = Vec::from_iter(first_ack);
        while seqs < MAX_BATCH_ACKS {
            match self.acks.try_recv() {
                Ok(ack) => {
                    seqs += ack.seqs.len();
                    acks.push(ack);
                }
                Err(_) => break,
            }
        }
        Batch { ops, acks }
    }

    /// Waits for a request or an ack, then takes whatever else queued meanwhile (group commit).
    /// `None` once the request queue is closed.
    pub(crate) async fn next(&mut self) -> Option<Batch> {
        tokio::select! {
            biased;
            op = self.rx.recv() => Some(self.fill(Some(op?), None)),
            Some(ack) = self.acks.recv() => Some(self.fill(None, Some(ack))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use uuid::Uuid;

    fn message() -> NewMessage {
        NewMessage {
            id: Uuid::new_v4(),
            from: DeviceRef::new("a", "p"),
            to: vec!["b".into()],
            body: Bytes::from_static(b"x"),
            urgent: false,
        }
    }

    #[tokio::test]
    async fn acks_wait_in_their_own_lane_and_never_crowd_appends_out_of_a_batch() {
        let (queue, mut batches) = channel(1024, 512);
        let queue = Arc::new(queue);
        let device = DeviceRef::new("b", "p");
        // Ten sessions' worth of maximal acks, queued before three appends.
        let mut acked = Vec::new();
        for i in 0..10u64 {
            let (q, d) = (queue.clone(), device.clone());
            acked.push(tokio::spawn(async move {
                q.ack(d, (i * 1024..(i + 1) * 1024).collect()).await
            }));
        }
        tokio::task::yield_now().await;
        while queue.acks.capacity() > ACK_QUEUE_DEPTH - 10 {
            tokio::task::yield_now().await;
        }
        let appends: Vec<_> = (0..3).map(|_| queue.append(message())).collect();

        let first = batches.next().await.expect("batch");
        assert_eq!(
            first.ops.len(),
            3,
            "every waiting append is in the first batch"
        );
        let seqs: usize = first.acks.iter().map(|a| a.seqs.len()).sum();
        assert_eq!(seqs, MAX_BATCH_ACKS, "acks beside them are bounded");
        // An ack is answered when the writer applies it, not when it is queued.
        for ack in first.acks {
            let _ = ack.done.send(Ok(()));
        }
        let mut rest = 0;
        while rest < 6 {
            let b = batches.next().await.expect("batch");
            assert!(b.ops.is_empty());
            rest += b.acks.len();
            for ack in b.acks {
                let _ = ack.done.send(Ok(()));
            }
        }
        for a in acked {
            a.await.expect("task").expect("applied");
        }
        drop(appends);
    }
}
