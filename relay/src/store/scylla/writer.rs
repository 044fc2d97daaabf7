//! The one writer task per node: batches of registrations, acks and appends, the appends
//! written in phases (see the module docs of `scylla`) and fanned out in sequence order.
//!
//! Each phase is a round trip to the cluster, so one batch at a time would cap a node at one
//! batch per four round trips however fast the cluster is. Up to [`PIPELINE`] batches are
//! written at once, each in a task of its own; the writer loop alone issues sequence numbers
//! (in batch order, under the durable reservation) and fans out and answers batch by batch, in
//! that order. An id already in flight holds its batch back until the earlier batches are
//! done, so that its second attempt finds the first one's row. What the serial writer got from
//! running one batch at a time is kept explicitly: a batch applies its acks, then registers its
//! devices, and starts its appends once every earlier batch has registered its own; a device
//! list read across a registration of its user's device is not cached (`DeviceCache`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;

use super::*;

/// Batches written at once.
const PIPELINE: usize = 4;

/// What the writer loop keeps: sequence numbers and what is in flight.
pub(super) struct Writer {
    cx: Arc<Context>,
    clock: SeqClock,
    node_id: u8,
    /// Above every sequence number this node id has issued, and durable (`node_seq`).
    reserved: u64,
    /// Numbers the batches, in the order they are started (and fanned out).
    batches: u64,
    /// Each message id in flight, with its batch's number.
    in_flight: HashMap<MessageKey, u64>,
    /// Sent once the last batch started has registered its devices, and every batch before it.
    registered: Option<oneshot::Receiver<()>>,
}

/// What the batches in flight share.
struct Context {
    s: Arc<Shared>,
    sink: Arc<dyn DeliverySink>,
    devices: Mutex<DeviceCache>,
    /// The oldest sequence number each batch in flight may write, by batch number.
    storing: Mutex<BTreeMap<u64, u64>>,
}

/// A message id, as its sender names it.
type MessageKey = (Arc<str>, Uuid);

/// A batch in flight.
type Flight = BoxFuture<'static, Written>;

/// A batch's number, when it started, its message ids, and its appends once written (`None`
/// if its task panicked: its callers are answered by their dropped replies).
type Written = (u64, Instant, Vec<MessageKey>, Option<Vec<Pending>>);

/// Each user's device list, and when it was read. A batch reads lists while other batches
/// register devices (and `Seen` reports registrations on other nodes): a list read before a
/// registration must not be cached after it, or the new device would miss every message
/// until the entry went stale.
#[derive(Default)]
struct DeviceCache {
    lists: HashMap<Arc<str>, (Vec<DeviceRef>, Instant)>,
    /// Registrations and invalidations so far: a list read across one of its user's is used,
    /// not cached.
    changes: u64,
    /// The users of the last [`RECENT_CHANGES`] changes, oldest first: a reconnect storm on
    /// other nodes keeps only its own users' lists out of the cache, not everyone's.
    recent: VecDeque<Arc<str>>,
}

/// Changes remembered by user: far more than arrive during one read of device lists (a few
/// milliseconds); past them, a read caches nothing.
const RECENT_CHANGES: usize = 4_096;

impl DeviceCache {
    /// The fresh lists of `users`, into `lists`; the others, to be read, and the count to give
    /// `fill` with them.
    fn lookup<'a>(&self, users: &'a [String], lists: &mut DeviceLists) -> (Vec<&'a str>, u64) {
        let mut stale = Vec::new();
        for user in users {
            match self.lists.get(user.as_str()) {
                Some((list, at)) if at.elapsed() <= DEVICE_CACHE_TTL => {
                    lists.insert(user.clone(), list.clone());
                }
                _ => stale.push(user.as_str()),
            }
        }
        (stale, self.changes)
    }

    /// Caches lists read since `lookup` answered `changes`, but not those of users whose
    /// devices changed meanwhile.
    fn fill<'a>(
        &mut self,
        changes: u64,
        read: impl ExactSizeIterator<Item = (&'a str, &'a Vec<DeviceRef>)>,
    ) {
        let since = (self.changes - changes) as usize;
        if since > self.recent.len() {
            return;
        }
        let changed: HashSet<&str> = self
            .recent
            .range(self.recent.len() - since..)
            .map(|u| &**u)
            .collect();
        let read: Vec<_> = read.filter(|(user, _)| !changed.contains(user)).collect();
        let max = crate::store::DEVICE_CACHE_USERS;
        if self.lists.len() + read.len() > max {
            self.lists
                .retain(|_, (_, at)| at.elapsed() <= DEVICE_CACHE_TTL);
            if self.lists.len() + read.len() > max {
                self.lists.clear();
            }
        }
        for (user, list) in read {
            self.lists
                .insert(user.into(), (list.clone(), Instant::now()));
        }
    }

    /// A device of `user` changed: counted, and remembered by user.
    fn changed(&mut self, user: &Arc<str>) {
        self.changes += 1;
        if self.recent.len() == RECENT_CHANGES {
            self.recent.pop_front();
        }
        self.recent.push_back(user.clone());
    }

    /// `device` is registered (here).
    fn registered(&mut self, device: &DeviceRef) {
        self.changed(&device.user);
        if let Some((list, _)) = self.lists.get_mut(&device.user)
            && !list.contains(device)
        {
            list.push(device.clone());
        }
    }

    /// `device` registered on another node: its user's list is read again if it lacks it.
    fn seen(&mut self, device: &DeviceRef) {
        self.changed(&device.user);
        if self
            .lists
            .get(&device.user)
            .is_some_and(|(list, _)| !list.contains(device))
        {
            self.lists.remove(&device.user);
        }
    }
}

/// The device lists a batch resolved its recipients from.
type DeviceLists = HashMap<String, Vec<DeviceRef>>;

/// One append in flight through the phases.
pub(super) struct Pending {
    pub(super) msg: NewMessage,
    pub(super) reply: oneshot::Sender<Result<Accepted, StoreError>>,
    /// Index of an earlier append in this batch with the same id.
    pub(super) same_as: Option<usize>,
    pub(super) seq: u64,
    pub(super) ts: u64,
    /// Already complete in the database: answer `duplicate`.
    pub(super) duplicate: bool,
    /// Needs its `message_ids` row written (a new id).
    pub(super) reserve: bool,
    pub(super) targets: Vec<DeviceRef>,
    /// A duplicate's entry as stored, read back to be delivered again.
    pub(super) stored: Option<InboxEntry>,
    pub(super) failed: Option<StoreError>,
}

impl Writer {
    pub(super) fn new(
        s: Arc<Shared>,
        sink: Arc<dyn DeliverySink>,
        node_id: u8,
        reserved: u64,
    ) -> Self {
        Writer {
            cx: Arc::new(Context {
                s,
                sink,
                devices: Mutex::default(),
                storing: Mutex::default(),
            }),
            clock: SeqClock::new(node_id, reserved.max(seq_floor(now_ms()))),
            node_id,
            reserved,
            batches: 0,
            in_flight: HashMap::new(),
            registered: None,
        }
    }

    pub(super) async fn run(mut self, mut batches: Batches) {
        let mut flight: FuturesOrdered<Flight> = FuturesOrdered::new();
        loop {
            tokio::select! {
                biased;
                Some(done) = flight.next(), if !flight.is_empty() => self.finish(done),
                batch = batches.next(), if flight.len() < PIPELINE => {
                    let Some(batch) = batch else { break };
                    if let Some(close) = self.start(batch, &mut flight).await {
                        self.drain(&mut flight).await;
                        let _ = close.send(Ok(()));
                        return;
                    }
                }
            }
        }
        self.drain(&mut flight).await;
    }

    async fn drain(&mut self, flight: &mut FuturesOrdered<Flight>) {
        while let Some(done) = flight.next().await {
            self.finish(done);
        }
    }

    /// Takes a batch: what needs the loop (cache invalidations, the lease, sequence numbers)
    /// here, the writing in a task of its own. Returns a `Close` request's reply.
    async fn start(
        &mut self,
        Batch { ops, acks }: Batch,
        flight: &mut FuturesOrdered<Flight>,
    ) -> Option<oneshot::Sender<Result<(), StoreError>>> {
        let started = Instant::now();
        let mut appends = Vec::new();
        let mut registers = Vec::new();
        let mut close = None;
        for op in ops {
            match op {
                Op::Append(m, r) => appends.push((m, r)),
                Op::Register(d, r) => registers.push((d, r)),
                Op::Seen(d) => self.cx.devices().seen(&d),
                Op::Close(r) => close = Some(r),
            }
        }
        let (p, keys) = self.number(appends, flight).await;
        let no = self.batches;
        self.batches += 1;
        for key in &keys {
            self.in_flight.insert(key.clone(), no);
        }
        let cx = self.cx.clone();
        let (registered, next) = oneshot::channel();
        let before = self.registered.replace(next);
        let task = tokio::spawn(async move {
            cx.acks(acks).await;
            cx.register(registers).await;
            // Appends queued after a registration reach the device, whichever batch has them.
            if let Some(before) = before {
                let _ = before.await;
            }
            let _ = registered.send(());
            cx.commit(no, p).await
        });
        flight.push_back(Box::pin(
            async move { (no, started, keys, task.await.ok()) },
        ));
        close
    }

    /// The appends of a batch, each id's first numbered: a tentative sequence number, kept
    /// unless phase 1 finds the id stored with one already. With them, their ids.
    async fn number(
        &mut self,
        batch: Vec<(NewMessage, oneshot::Sender<Result<Accepted, StoreError>>)>,
        flight: &mut FuturesOrdered<Flight>,
    ) -> (Vec<Pending>, Vec<MessageKey>) {
        if batch.is_empty() {
            return Default::default();
        }
        if now_ms() >= self.cx.s.lease_until.load(Ordering::Relaxed) {
            // The node id may be another node's by now: issue no sequence numbers.
            for (_, reply) in batch {
                let _ = reply.send(Err(StoreError::Unavailable("node id lease lapsed".into())));
            }
            return Default::default();
        }
        let mut first: HashMap<MessageKey, usize> = HashMap::new();
        let mut p: Vec<Pending> = Vec::with_capacity(batch.len());
        for (msg, reply) in batch {
            let key = (msg.from.user.clone(), msg.id);
            let same_as = first.get(&key).copied();
            if same_as.is_none() {
                first.insert(key, p.len());
            }
            p.push(Pending {
                msg,
                reply,
                same_as,
                seq: 0,
                ts: 0,
                duplicate: false,
                reserve: false,
                targets: Vec::new(),
                stored: None,
                failed: None,
            });
        }
        if first.keys().any(|k| self.in_flight.contains_key(k)) {
            // A second attempt while the first is written: it must find the first's row.
            self.drain(flight).await;
        }
        let now = now_ms();
        let reserved = self.reserve_for(now, first.len()).await;
        for x in p.iter_mut().filter(|x| x.same_as.is_none()) {
            match &reserved {
                Ok(()) => (x.seq, x.ts) = (self.clock.next(now), now),
                Err(e) => x.failed = Some(StoreError::Unavailable(e.to_string())),
            }
        }
        (p, first.into_keys().collect())
    }

    /// Fans out a written batch and answers its callers; batches come here in start order.
    fn finish(
        &mut self,
        (no, started, keys, p): (u64, Instant, Vec<MessageKey>, Option<Vec<Pending>>),
    ) {
        for key in keys {
            if self.in_flight.get(&key) == Some(&no) {
                self.in_flight.remove(&key);
            }
        }
        match p {
            Some(p) if !p.is_empty() => self.cx.fan_out_and_answer(p),
            Some(_) => {}
            None => {
                self.cx.mark(false);
                tracing::error!("a writer batch panicked; its callers are told to retry");
            }
        }
        self.cx.stored(no);
        metrics::histogram!("relay_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
    }

    /// Makes sure `n` new sequence numbers at `now` stay below a durable reservation.
    async fn reserve_for(&mut self, now: u64, n: usize) -> Result<(), StoreError> {
        let bound = self.clock.bound_after(now, n);
        if bound.saturating_add(seq_span(RESERVE_HEADROOM_MS)) <= self.reserved {
            return Ok(());
        }
        let reserved = bound + seq_span(RESERVE_AHEAD_MS);
        let s = &self.cx.s;
        s.session
            .execute_unpaged(
                &s.st.reserve,
                (reserved as i64, reserved as i64, i32::from(self.node_id)),
            )
            .await
            .map_err(unavailable)?;
        self.reserved = reserved;
        Ok(())
    }
}

impl Context {
    fn devices(&self) -> std::sync::MutexGuard<'_, DeviceCache> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark(&self, ok: bool) {
        self.s.healthy.store(ok, Ordering::Relaxed);
        if !ok {
            metrics::counter!("relay_store_errors_total", "op" => "write").increment(1);
        }
    }

    /// Batch `no` may write rows from `oldest` on, which only this node's fan-out announces.
    fn storing(&self, no: u64, oldest: u64) {
        let mut storing = self.storing.lock().unwrap_or_else(|e| e.into_inner());
        storing.insert(no, oldest);
        self.sink.storing(storing.values().min().copied());
    }

    /// Batch `no` is fanned out (or gone).
    fn stored(&self, no: u64) {
        let mut storing = self.storing.lock().unwrap_or_else(|e| e.into_inner());
        if storing.remove(&no).is_some() {
            self.sink.storing(storing.values().min().copied());
        }
    }

    /// Registers a batch's devices (before its appends, so that appends in the same batch, and
    /// in every later one, reach them).
    async fn register(&self, registers: Vec<(DeviceRef, oneshot::Sender<Result<(), StoreError>>)>) {
        let s = &self.s;
        let now = now_ms() as i64;
        let results = join_all(registers.iter().map(|(d, _)| {
            s.session
                .execute_unpaged(&s.st.insert_device, device_row(&s.ids, d, now))
        }))
        .await;
        for ((device, reply), result) in registers.into_iter().zip(results) {
            self.mark(result.is_ok());
            if result.is_ok() {
                self.devices().registered(&device);
            }
            let _ = reply.send(result.map(|_| ()).map_err(unavailable));
        }
    }

    /// Applies a batch's acks, first: a later answer in this batch then implies they are
    /// applied. The ack lane bounds them per batch (`queue::MAX_BATCH_ACKS`), so appends never
    /// wait behind a flood. One delete per device and week: an inbox partition.
    async fn acks(&self, acks: Vec<queue::Ack>) {
        let mut partitions: HashMap<(&DeviceRef, i32), Vec<i64>> = HashMap::new();
        for a in &acks {
            for &seq in &a.seqs {
                partitions
                    .entry((&a.device, week_of(seq)))
                    .or_default()
                    .push(seq as i64);
            }
        }
        let s = &self.s;
        let deletes: Vec<_> = partitions
            .iter()
            .flat_map(|(&(d, week), seqs)| {
                let (u, dp) = dev_p(&s.ids, d);
                seqs.chunks(MAX_IN_VALUES).map(move |seqs| {
                    s.session
                        .execute_unpaged(&s.st.delete_inbox, (u.clone(), dp.clone(), week, seqs))
                })
            })
            .collect();
        for r in join_all(deletes).await {
            if let Err(e) = r {
                // A lost ack only means a redelivery.
                metrics::counter!("relay_store_errors_total", "op" => "ack").increment(1);
                tracing::warn!(error = %e, "ack delete failed");
            }
        }
        for ack in acks {
            let _ = ack.done.send(Ok(()));
        }
    }

    /// Writes one batch's appends in phases. Returns them, to be fanned out in batch order.
    async fn commit(&self, no: u64, mut p: Vec<Pending>) -> Vec<Pending> {
        if p.is_empty() {
            return p;
        }
        metrics::histogram!("relay_store_commit_batch_size").record(p.len() as f64);
        let firsts: Vec<usize> = (0..p.len()).filter(|&i| p[i].same_as.is_none()).collect();
        self.read_ids(&mut p, &firsts).await;
        // From here rows may land that only this node's fan-out announces (retries keep
        // their first, older, numbers).
        if let Some(oldest) = p
            .iter()
            .filter(|x| x.seq > 0 && x.failed.is_none())
            .map(|x| x.seq)
            .min()
        {
            self.storing(no, oldest);
        }
        self.reserve_ids(&mut p, &firsts).await;
        let writing = self.write_rows(&mut p, &firsts).await;
        self.mark_complete(&mut p, &writing).await;
        self.read_duplicates(&mut p, &firsts).await;
        p
    }

    /// The device lists of `users`: from the cache while fresh, else read (and cached).
    async fn device_lists(&self, users: &[String]) -> Result<DeviceLists, StoreError> {
        let mut lists = DeviceLists::new();
        let (stale, changes) = self.devices().lookup(users, &mut lists);
        let reads = join_all(stale.iter().map(|u| load_devices(&self.s, u))).await;
        let mut read = Vec::with_capacity(stale.len());
        for (user, result) in stale.into_iter().zip(reads) {
            read.push((user, result?));
        }
        let mut cache = self.devices();
        cache.fill(changes, read.iter().map(|(u, l)| (*u, l)));
        metrics::gauge!("relay_device_cache_users").set(cache.lists.len() as f64);
        drop(cache);
        lists.extend(read.into_iter().map(|(u, l)| (u.to_string(), l)));
        Ok(lists)
    }

    /// Phase 1: what the database knows of these ids (`firsts`: each id's first append in the
    /// batch). A known id takes its stored sequence number; a new one keeps its tentative one.
    async fn read_ids(&self, p: &mut [Pending], firsts: &[usize]) {
        let s = &self.s;
        let firsts: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| p[i].failed.is_none())
            .collect();
        let reads = join_all(firsts.iter().map(|&i| {
            s.session
                .execute_unpaged(&s.st.select_msg_id, msg_p(&s.ids, &p[i].msg))
        }))
        .await;
        for (&i, read) in firsts.iter().zip(reads) {
            let known = read
                .map_err(unavailable)
                .and_then(|r| r.into_rows_result().map_err(unavailable))
                .and_then(|rows| {
                    rows.maybe_first_row::<(i64, i64, Option<bool>)>()
                        .map_err(unavailable)
                });
            match known {
                Err(e) => p[i].failed = Some(e),
                Ok(Some((seq, ts, complete))) => {
                    (p[i].seq, p[i].ts) = (seq as u64, ts as u64);
                    p[i].duplicate = complete.unwrap_or(false);
                }
                Ok(None) => p[i].reserve = true,
            }
        }
    }

    /// Phase 2: reserve new ids (`complete = false`).
    async fn reserve_ids(&self, p: &mut [Pending], firsts: &[usize]) {
        let s = self.s.clone();
        let idem_ttl = ttl_secs(s.retention.idempotency_ms);
        let reserving: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| p[i].reserve && p[i].failed.is_none())
            .collect();
        let writes = join_all(reserving.iter().map(|&i| {
            let (sender_p, msg_p) = msg_p(&s.ids, &p[i].msg);
            s.session.execute_unpaged(
                &s.st.insert_msg_id,
                (sender_p, msg_p, p[i].seq as i64, p[i].ts as i64, idem_ttl),
            )
        }))
        .await;
        for (&i, w) in reserving.iter().zip(writes) {
            if let Err(e) = w {
                p[i].failed = Some(unavailable(e));
            }
        }
    }

    /// Phase 3: inbox and archive rows, for every device of the recipients; the appends that
    /// write rows.
    async fn write_rows(&self, p: &mut [Pending], firsts: &[usize]) -> Vec<usize> {
        let s = self.s.clone();
        let writing: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| !p[i].duplicate && p[i].failed.is_none())
            .collect();
        let lists = match self.device_lists(&users_of(p, &writing)).await {
            Ok(lists) => lists,
            Err(e) => {
                for &i in &writing {
                    p[i].failed = Some(unavailable(&e));
                }
                DeviceLists::new()
            }
        };
        let inbox_ttl = ttl_secs(s.retention.inbox_ms);
        let archive_ttl = ttl_secs(s.retention.archive_ms);
        let mut statements = Vec::new();
        let ready: Vec<usize> = writing
            .iter()
            .copied()
            .filter(|&i| p[i].failed.is_none())
            .collect();
        for i in ready {
            let m = &p[i].msg;
            let targets = targets(m, &lists);
            let (seq, ts) = (p[i].seq, p[i].ts);
            let rec = Record {
                ts,
                urgent: m.urgent,
                from: &m.from,
                to: &[],
                body: &m.body,
            };
            for d in &targets {
                let key = record::inbox_key(d, seq);
                let value = record::seal_inbox(&s.keyring, &key, &m.id, &rec);
                statements.push((
                    i,
                    s.session
                        .execute_unpaged(&s.st.insert_inbox, {
                            let (u, dp) = dev_p(&s.ids, d);
                            (u, dp, week_of(seq), seq as i64, value, inbox_ttl)
                        })
                        .boxed(),
                ));
            }
            let akey = record::archive_key(seq, &m.id);
            let avalue = record::seal_archive(&s.keyring, &akey, &Record { to: &m.to, ..rec });
            let shard = (m.id.as_u128() % u128::from(s.archive_shards)) as i16;
            let hour = (seq_time_ms(seq) / HOUR_MS) as i32;
            statements.push((
                i,
                s.session
                    .execute_unpaged(
                        &s.st.insert_archive,
                        (hour, shard, seq as i64, m.id, avalue, archive_ttl),
                    )
                    .boxed(),
            ));
            p[i].targets = targets;
        }
        let (owners, futures): (Vec<usize>, Vec<_>) = statements.into_iter().unzip();
        for (i, r) in owners.into_iter().zip(join_all(futures).await) {
            if let Err(e) = r {
                p[i].failed.get_or_insert(unavailable(e));
            }
        }
        writing
    }

    /// Phase 4: mark complete, so a retry of the same id answers `duplicate`.
    async fn mark_complete(&self, p: &mut [Pending], writing: &[usize]) {
        let s = self.s.clone();
        let idem_ttl = ttl_secs(s.retention.idempotency_ms);
        let completing: Vec<usize> = writing
            .iter()
            .copied()
            .filter(|&i| p[i].failed.is_none())
            .collect();
        let marks = join_all(completing.iter().map(|&i| {
            let (sender_p, msg_p) = msg_p(&s.ids, &p[i].msg);
            s.session
                .execute_unpaged(&s.st.complete_msg_id, (idem_ttl, sender_p, msg_p))
        }))
        .await;
        for (&i, r) in completing.iter().zip(marks) {
            if let Err(e) = r {
                p[i].failed = Some(unavailable(e));
            }
        }
    }

    /// Phase 5, for ids phase 1 found complete: the node that stored one may have died
    /// before its fan-out reached the bus, so the rows still in the recipients' inboxes are
    /// read back to be delivered again, as stored (devices skip a sequence number they have).
    /// Best effort: a row not read waits in its inbox for the device's next replay.
    async fn read_duplicates(&self, p: &mut [Pending], firsts: &[usize]) {
        let dups: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| p[i].duplicate && p[i].failed.is_none())
            .collect();
        if dups.is_empty() {
            return;
        }
        let lists = match self.device_lists(&users_of(p, &dups)).await {
            Ok(lists) => lists,
            Err(e) => {
                tracing::warn!(error = %e, "resent messages not delivered again: device lists unread");
                return;
            }
        };
        let mut reads: Vec<(usize, DeviceRef)> = Vec::new();
        for &i in &dups {
            reads.extend(targets(&p[i].msg, &lists).into_iter().map(|d| (i, d)));
        }
        let s = self.s.clone();
        let rows = join_all(reads.iter().map(|(i, d)| {
            // The row itself, if still there: the first entry after the one before it.
            ScyllaStore::read_page(&s, d, p[*i].seq - 1, 1, usize::MAX)
        }))
        .await;
        for ((i, d), row) in reads.into_iter().zip(rows) {
            match row.map(|r| r.into_iter().next().filter(|e| e.seq == p[i].seq)) {
                Ok(Some(entry)) => {
                    p[i].targets.push(d);
                    p[i].stored.get_or_insert(entry);
                }
                Ok(None) => {} // acknowledged (or expired): that device has it
                Err(e) => tracing::warn!(error = %e, "a resent message's row unread"),
            }
        }
    }

    /// Fans the stored appends out in sequence order, then answers every sender.
    fn fan_out_and_answer(&self, p: Vec<Pending>) {
        let any_failed = p.iter().any(|x| x.failed.is_some());
        self.mark(!any_failed);
        if any_failed {
            tracing::warn!(
                failed = p.iter().filter(|x| x.failed.is_some()).count(),
                "appends failed; senders told to retry"
            );
        }

        // Fan out in sequence order, then answer.
        let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i].same_as.is_none()).collect();
        order.sort_by_key(|&i| p[i].seq);
        for &i in &order {
            let x = &p[i];
            if x.failed.is_some() || x.targets.is_empty() {
                continue;
            }
            if let Some(stored) = &x.stored {
                metrics::counter!("relay_store_redelivered_total").increment(1);
                self.sink.deliver(&x.targets, stored);
            } else if !x.duplicate {
                let entry = InboxEntry {
                    seq: x.seq,
                    ts: x.ts,
                    id: x.msg.id,
                    from: x.msg.from.clone(),
                    urgent: x.msg.urgent,
                    body: x.msg.body.clone(),
                };
                self.sink.deliver(&x.targets, &entry);
            }
        }
        let outcomes: Vec<Result<Accepted, String>> = p
            .iter()
            .map(|x| match &x.failed {
                Some(e) => Err(e.to_string()),
                None => Ok(Accepted {
                    seq: x.seq,
                    ts: x.ts,
                    duplicate: x.duplicate,
                }),
            })
            .collect();
        for (i, x) in p.into_iter().enumerate() {
            let outcome = match x.same_as {
                None => outcomes[i].clone(),
                Some(j) => outcomes[j].clone().map(|a| Accepted {
                    duplicate: true,
                    ..a
                }),
            };
            let _ = x.reply.send(outcome.map_err(StoreError::Unavailable));
        }
    }
}

/// The users whose device lists the appends `which` of `p` need, each once.
fn users_of(p: &[Pending], which: &[usize]) -> Vec<String> {
    let mut users: Vec<String> = which
        .iter()
        .flat_map(|&i| recipient_users(&p[i].msg).map(str::to_string))
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// Every device whose inbox gets `m`, from the batch's device lists.
fn targets(m: &NewMessage, lists: &DeviceLists) -> Vec<DeviceRef> {
    let mut targets = Vec::new();
    for user in recipient_users(m) {
        let devices = lists.get(user).map_or(&[][..], Vec::as_slice);
        add_recipients(&mut targets, m, devices);
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(cache: &DeviceCache, user: &str) -> (Option<Vec<DeviceRef>>, u64) {
        let users = [user.to_string()];
        let mut lists = DeviceLists::new();
        let (_, changes) = cache.lookup(&users, &mut lists);
        (lists.remove(user), changes)
    }

    #[test]
    fn a_device_list_read_across_a_registration_is_used_but_not_cached() {
        let (phone, tablet) = (DeviceRef::new("v", "phone"), DeviceRef::new("v", "tablet"));
        let read = vec![phone.clone()];
        for change in ["registered here", "seen on another node"] {
            let mut cache = DeviceCache::default();
            let (cached, changes) = lookup(&cache, "v");
            assert_eq!(cached, None);
            // The tablet registers while the list (without it) is being read.
            match change {
                "registered here" => cache.registered(&tablet),
                _ => cache.seen(&tablet),
            }
            cache.fill(changes, [("v", &read)].into_iter());
            assert_eq!(
                lookup(&cache, "v").0,
                None,
                "{change}: a list without the tablet was cached"
            );
        }
        // Read with no registration meanwhile: cached, and a later registration joins it.
        let mut cache = DeviceCache::default();
        let (_, changes) = lookup(&cache, "v");
        cache.fill(changes, [("v", &read)].into_iter());
        assert_eq!(lookup(&cache, "v").0, Some(vec![phone.clone()]));
        cache.registered(&tablet);
        assert_eq!(lookup(&cache, "v").0, Some(vec![phone, tablet]));
    }

    /// Devices connecting elsewhere in the cluster (each a `seen`) keep only their own users'
    /// lists out of the cache: under a reconnect storm on other nodes, every other list read
    /// meanwhile is still cached, rather than read again for every batch.
    #[test]
    fn a_change_keeps_only_its_own_users_list_read_across_it_out_of_the_cache() {
        let users = ["v".to_string(), "w".to_string()];
        let (v, w) = (
            vec![DeviceRef::new("v", "phone")],
            vec![DeviceRef::new("w", "phone")],
        );
        let mut cache = DeviceCache::default();
        let (_, changes) = cache.lookup(&users, &mut DeviceLists::new());
        cache.seen(&DeviceRef::new("w", "tablet"));
        cache.fill(changes, [("v", &v), ("w", &w)].into_iter());
        assert_eq!(lookup(&cache, "v").0, Some(v.clone()));
        assert_eq!(lookup(&cache, "w").0, None);

        // More changes during one read than are remembered: nothing read is cached.
        let mut cache = DeviceCache::default();
        let (_, changes) = cache.lookup(&users, &mut DeviceLists::new());
        for i in 0..=RECENT_CHANGES {
            cache.seen(&DeviceRef::new(&format!("x{i}"), "phone"));
        }
        cache.fill(changes, [("v", &v)].into_iter());
        assert_eq!(lookup(&cache, "v").0, None);
    }
}
