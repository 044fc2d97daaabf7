//! The domain traits on CQL: inbox pages, acks, the archive and expiry (`Messages`), devices and
//! push registrations (`Devices`), access rows (`AccessRows`) and audit records (`AuditLog`).

use super::*;

/// The key an access row's sealed columns are bound to: `P(user, device)`.
pub(super) fn access_key(user_p: &[u8], device_p: &[u8]) -> Vec<u8> {
    [user_p, device_p].concat()
}

/// An access row, its sealed ids opened, and whether it says the device is registered. A row
/// whose ids do not open fails the read: a revocation is never mistaken for its absence.
pub(super) fn access_row(
    ids: &Pseudonyms,
    user: &str,
    c: AccessColumns,
) -> Result<(String, AccessRow, bool), StoreError> {
    let (
        device_p,
        device,
        org,
        org_written,
        locked_at,
        lock_reason,
        revoked_at,
        reason,
        signal,
        except,
        csig,
        cat,
        seen,
        fresh_from,
        registered,
    ) = c;
    let key = access_key(&ids.user(user), &device_p);
    let open_one = |table: &[u8], sealed: Option<Vec<u8>>| -> Result<Option<String>, StoreError> {
        match sealed {
            None => Ok(None),
            Some(v) => rows::open_ids(ids, table, &key, &v)
                .and_then(|mut list| list.pop())
                .map(Some)
                .ok_or_else(|| {
                    metrics::counter!("relay_store_corrupt_rows_total").increment(1);
                    StoreError::Corrupt("access row does not open".into())
                }),
        }
    };
    let device = open_one(b"access", device)?.unwrap_or_default();
    let org = open_one(b"access.org", org)?;
    let except = open_one(b"access.except", except)?;
    let ms = |v: Option<i64>| v.map(|v| v.max(0) as u64);
    let row = AccessRow {
        org,
        // `org` is written with the token's `iat` (seconds) as its write time (microseconds).
        org_since: ms(org_written).map(|us| us / 1_000_000),
        fresh_from: ms(fresh_from),
        locked: ms(locked_at).map(|at| Lock {
            at,
            reason: lock_reason.unwrap_or_default(),
        }),
        revoked: ms(revoked_at).zip(signal).map(|(at, signal)| Revocation {
            at,
            reason: reason.unwrap_or_default(),
            signal,
            except,
        }),
        confirmed: csig
            .zip(ms(cat))
            .map(|(signal, at)| Confirmation { signal, at }),
        last_seen: ms(seen),
    };
    Ok((device, row, registered == Some(true)))
}

/// Devices an access read found registered, at most: the entries of connects refused after
/// their read are dropped together past it.
const MAX_FOUND_REGISTERED: usize = 10_000;

impl Messages for ScyllaStore {
    fn append(&self, msg: NewMessage) -> AppendTicket {
        self.ops.append(msg)
    }

    fn inbox_page(
        &self,
        device: DeviceRef,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<InboxEntry>, StoreError>> {
        async move { Self::read_page(&self.shared, &device, after, limit, max_bytes).await }.boxed()
    }

    fn ack(&self, device: DeviceRef, seqs: Vec<u64>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ops.ack(device, seqs).boxed()
    }

    fn archived(
        &self,
        seq: u64,
        id: Uuid,
    ) -> BoxFuture<'_, Result<Option<record::ArchivedMessage>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(
                    &s.st.select_archive,
                    (
                        archive_hour(seq),
                        archive_shard(&id, s.archive_shards),
                        seq as i64,
                        id,
                    ),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            match rows.maybe_first_row::<(Vec<u8>,)>().map_err(unavailable)? {
                Some((sealed,)) => {
                    record::open_archive(&s.keyring, &record::archive_key(seq, &id), &sealed)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                }
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn expire(
        &self,
        _now_ms: u64,
        _retention: Retention,
    ) -> BoxFuture<'_, Result<Expired, StoreError>> {
        // Every row is written with a TTL: the database expires them itself.
        async { Ok(Expired::default()) }.boxed()
    }
}

impl Devices for ScyllaStore {
    /// A device whose access row says it is registered (the connect's access read, made just
    /// before, found it) is not written again: devices are never unregistered, and the row says
    /// so only once a session ran after a registration that succeeded.
    fn register_device(&self, device: DeviceRef) -> BoxFuture<'_, Result<(), StoreError>> {
        let found = self
            .shared
            .found_registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&device);
        if found {
            return std::future::ready(Ok(())).boxed();
        }
        self.ops.register(device).boxed()
    }

    fn device_seen(&self, device: DeviceRef) {
        self.ops.seen(device);
    }

    fn push_token(
        &self,
        device: DeviceRef,
    ) -> BoxFuture<'_, Result<Option<push::DeviceToken>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(&s.st.select_push, dev_p(&s.ids, &device))
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            match rows.maybe_first_row::<(Vec<u8>,)>().map_err(unavailable)? {
                Some((sealed,)) => {
                    record::open_push_token(&s.keyring, &record::device_key(&device), &sealed)
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                }
                None => Ok(None),
            }
        }
        .boxed()
    }

    fn set_push_token(
        &self,
        device: DeviceRef,
        token: Option<push::DeviceToken>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &device);
            match token {
                Some(token) => {
                    let sealed =
                        record::seal_push_token(&s.keyring, &record::device_key(&device), &token);
                    s.session
                        .execute_unpaged(&s.st.insert_push, (u, d, sealed))
                        .await
                }
                None => s.session.execute_unpaged(&s.st.delete_push, (u, d)).await,
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }

    fn devices(&self, user: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        async move {
            let s = &self.shared;
            Ok(load_devices(s, &user)
                .await?
                .into_iter()
                .map(|d| d.device.to_string())
                .collect())
        }
        .boxed()
    }
}

impl AccessRows for ScyllaStore {
    fn access(
        &self,
        user: String,
        device: Option<String>,
    ) -> BoxFuture<'_, Result<Vec<(String, AccessRow)>, StoreError>> {
        async move {
            let s = &self.shared;
            let user_p = s.ids.user(&user).to_vec();
            let result = match &device {
                Some(d) => {
                    let (_, user_row) = dev_p(&s.ids, &DeviceRef::new(&user, ""));
                    let (_, device_row) = dev_p(&s.ids, &DeviceRef::new(&user, d));
                    s.session
                        .execute_unpaged(
                            &s.st.select_access_device,
                            (&user_p, user_row, device_row),
                        )
                        .await
                }
                None => {
                    s.session
                        .execute_unpaged(&s.st.select_access_user, (&user_p,))
                        .await
                }
            }
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
            let rows = result
                .rows::<AccessColumns>()
                .map_err(unavailable)?
                .map(|r| {
                    r.map_err(unavailable)
                        .and_then(|c| access_row(&s.ids, &user, c))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(d) = &device
                && rows
                    .iter()
                    .any(|(id, _, registered)| id == d && *registered)
            {
                let mut found = s.found_registered.lock().unwrap_or_else(|e| e.into_inner());
                if found.len() >= MAX_FOUND_REGISTERED {
                    found.clear();
                }
                found.insert(DeviceRef::new(&user, d));
            }
            Ok(rows.into_iter().map(|(id, row, _)| (id, row)).collect())
        }
        .boxed()
    }

    fn update_access(
        &self,
        user: String,
        device: String,
        change: Change,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &DeviceRef::new(&user, &device));
            let key = access_key(&u, &d);
            let sealed_device = rows::seal_ids(&s.ids, b"access", &key, &[&device]);
            let ms = |v: u64| v as i64;
            match change {
                Change::Revoke(r) => {
                    let except = r
                        .except
                        .as_deref()
                        .map(|e| rows::seal_ids(&s.ids, b"access.except", &key, &[e]));
                    s.session
                        .execute_unpaged(
                            &s.st.revoke,
                            (ms(r.at), &r.reason, r.signal, except, sealed_device, &u, &d),
                        )
                        .await
                }
                Change::Lock(l) => {
                    let (at, reason) = l.map(|l| (ms(l.at), l.reason)).unzip();
                    s.session
                        .execute_unpaged(&s.st.lock, (at, reason, sealed_device, &u, &d))
                        .await
                }
                Change::Confirm(c) => {
                    s.session
                        .execute_unpaged(&s.st.confirm, (c.signal, ms(c.at), sealed_device, &u, &d))
                        .await
                }
                Change::Fresh(at) => {
                    s.session
                        .execute_unpaged(&s.st.fresh, (ms(at), sealed_device, &u, &d))
                        .await
                }
                Change::Seen { at, org: None } => {
                    s.session
                        .execute_unpaged(&s.st.seen, (ms(at), sealed_device, &u, &d))
                        .await
                }
                Change::Seen {
                    at,
                    org: Some((org, since)),
                } => {
                    // Last write wins by write time: the newest token's organisation.
                    let written_us = since.saturating_mul(1_000_000).min(i64::MAX as u64) as i64;
                    let (_, user_row) = dev_p(&s.ids, &DeviceRef::new(&user, ""));
                    let user_key = access_key(&u, &user_row);
                    let sealed_org = rows::seal_ids(&s.ids, b"access.org", &user_key, &[&org]);
                    let sealed_none = rows::seal_ids(&s.ids, b"access", &user_key, &[""]);
                    let org_p = s.ids.org(&org).to_vec();
                    let org_key = [org_p.as_slice(), u.as_slice()].concat();
                    let sealed_user = rows::seal_ids(&s.ids, b"org_users", &org_key, &[&user]);
                    // One request per recorded connect: the statements are idempotent, and
                    // one lost to a partial failure is written again at the next recorded
                    // connect (the device away for 10 minutes, or a newer token: see
                    // `access::seen_lately`), not at a quick reconnect.
                    s.session
                        .batch(
                            &s.st.seen_with_org,
                            (
                                (written_us, sealed_org, sealed_none, &u, user_row),
                                (org_p, &u, sealed_user),
                                (ms(at), sealed_device, &u, &d),
                            ),
                        )
                        .await
                }
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }

    fn update_access_many(
        &self,
        changes: Vec<(DeviceRef, Change)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        use futures_util::{StreamExt as _, TryStreamExt as _};
        // Each change is one request to its own partitions (an unlogged batch across
        // partitions would only move the fan-out to a coordinator): sent concurrently, a few
        // at a time, so a large batch does not crowd the connection pool.
        futures_util::stream::iter(changes)
            .map(|(device, change)| {
                self.update_access(device.user.to_string(), device.device.to_string(), change)
            })
            .buffer_unordered(16)
            .try_collect()
            .boxed()
    }

    fn org_users(&self, org: String) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        async move {
            let s = &self.shared;
            let org_p = s.ids.org(&org).to_vec();
            let rows = s
                .session
                .execute_unpaged(&s.st.select_org_users, (&org_p,))
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows.rows::<(Vec<u8>, Vec<u8>)>().map_err(unavailable)? {
                let (user_p, sealed) = row.map_err(unavailable)?;
                let key = [org_p.as_slice(), user_p.as_slice()].concat();
                match rows::open_ids(&s.ids, b"org_users", &key, &sealed).and_then(|mut l| l.pop())
                {
                    Some(user) => out.push(user),
                    None => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn pending_logouts(&self) -> BoxFuture<'_, Result<Vec<(DeviceRef, u64)>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(s.st.select_pending.clone(), ())
                .await
                .map_err(unavailable)?
                .rows_stream::<(Vec<u8>, Vec<u8>, i64, Option<Vec<u8>>)>()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some((u, d, at, sealed)) = rows.try_next().await.map_err(unavailable)? {
                let key = [u.as_slice(), d.as_slice()].concat();
                match sealed
                    .and_then(|v| rows::open_ids(&s.ids, b"pending_logouts", &key, &v))
                    .as_deref()
                {
                    Some([user, device]) => {
                        out.push((DeviceRef::new(user, device), at.max(0) as u64))
                    }
                    _ => metrics::counter!("relay_store_corrupt_rows_total").increment(1),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn set_pending_logout(
        &self,
        device: DeviceRef,
        requested_at: Option<u64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let (u, d) = dev_p(&s.ids, &device);
            match requested_at {
                Some(at) => {
                    let key = [u.as_slice(), d.as_slice()].concat();
                    let sealed = rows::seal_ids(
                        &s.ids,
                        b"pending_logouts",
                        &key,
                        &[&device.user, &device.device],
                    );
                    s.session
                        .execute_unpaged(&s.st.insert_pending, (&u, &d, at as i64, sealed))
                        .await
                }
                None => {
                    s.session
                        .execute_unpaged(&s.st.delete_pending, (u, d))
                        .await
                }
            }
            .map(|_| ())
            .map_err(unavailable)
        }
        .boxed()
    }
}

impl AuditLog for ScyllaStore {
    fn audit_append(&self, records: Vec<audit::Record>) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let s = &self.shared;
            let ttl = ttl_secs(s.retention.audit_ms);
            // One batch per partition, of bounded size: an organisation's report partition
            // takes a record of every connect of its users, and a batch within one partition
            // is a single write to its replicas. Partitions are written concurrently.
            let mut partitions: HashMap<(&str, u32), Vec<_>> = HashMap::new();
            for r in &records {
                let key = rows::audit_key(&s.ids, &r.chain, r.n);
                let sealed = rows::seal_audit(&s.ids, &key, &r.chain.subject, &r.entry);
                let row = (
                    s.ids.subject(&r.chain.subject).to_vec(),
                    r.chain.month as i32,
                    i32::from(r.chain.node),
                    r.n as i64,
                    r.ts as i64,
                    r.prev.to_vec(),
                    r.hash.to_vec(),
                    r.key_id.clone(),
                    sealed,
                    ttl,
                );
                partitions
                    .entry((&r.chain.subject, r.chain.month))
                    .or_default()
                    .push(row);
            }
            let mut batches = Vec::new();
            for rows in partitions.into_values() {
                let mut batch = Vec::new();
                let mut bytes = 0;
                for row in rows {
                    bytes += row.8.len() + 128;
                    batch.push(row);
                    if bytes >= MAX_BATCH_BYTES {
                        batches.push(std::mem::take(&mut batch));
                        bytes = 0;
                    }
                }
                if !batch.is_empty() {
                    batches.push(batch);
                }
            }
            let writes = batches.iter().map(|rows| {
                let mut batch = CqlBatch::new(BatchType::Unlogged);
                for _ in rows {
                    batch.append_statement(s.st.insert_audit.clone());
                }
                async move { s.session.batch(&batch, rows).await }
            });
            for result in join_all(writes).await {
                result.map_err(unavailable)?;
            }
            Ok(())
        }
        .boxed()
    }

    fn audit_tail(
        &self,
        chain: audit::Chain,
    ) -> BoxFuture<'_, Result<Option<audit::Head>, StoreError>> {
        async move {
            let s = &self.shared;
            let rows = s
                .session
                .execute_unpaged(
                    &s.st.select_audit_tail,
                    (
                        s.ids.subject(&chain.subject).to_vec(),
                        chain.month as i32,
                        i32::from(chain.node),
                    ),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            Ok(rows
                .maybe_first_row::<(i64, Vec<u8>)>()
                .map_err(unavailable)?
                .and_then(|(n, hash)| Some((n as u64, hash.try_into().ok()?))))
        }
        .boxed()
    }

    fn audit_read(
        &self,
        subject: String,
        month: u32,
    ) -> BoxFuture<'_, Result<Vec<audit::Record>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(
                    s.st.select_audit.clone(),
                    (s.ids.subject(&subject).to_vec(), month as i32),
                )
                .await
                .map_err(unavailable)?
                .rows_stream::<(
                    i32,
                    i64,
                    i64,
                    Vec<u8>,
                    Vec<u8>,
                    Option<String>,
                    Option<Vec<u8>>,
                )>()
                .map_err(unavailable)?;
            let mut out = Vec::new();
            while let Some((node, n, ts, prev, hash, key_id, sealed)) =
                rows.try_next().await.map_err(unavailable)?
            {
                let chain = audit::Chain {
                    subject: subject.clone(),
                    month,
                    node: node as u8,
                };
                // A record that does not open reads as an empty entry: verification reports it.
                let key = rows::audit_key(&s.ids, &chain, n as u64);
                let entry = sealed
                    .and_then(|v| rows::open_audit(&s.ids, &key, &v))
                    .filter(|(sub, _)| *sub == subject)
                    .map(|(_, entry)| entry)
                    .unwrap_or_default();
                // A mangled hash column is itself tampering: verification reports it.
                let digest = |v: Vec<u8>| v.try_into().unwrap_or([0xff; 32]);
                out.push(audit::Record {
                    chain,
                    n: n as u64,
                    ts: ts as u64,
                    entry,
                    prev: digest(prev),
                    hash: digest(hash),
                    key_id: key_id.unwrap_or_default(),
                });
            }
            Ok(out)
        }
        .boxed()
    }

    fn audit_partitions(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, StoreError>> {
        async move {
            let s = &self.shared;
            let mut rows = s
                .session
                .execute_iter(s.st.select_audit_partitions.clone(), ())
                .await
                .map_err(unavailable)?
                .rows_stream::<(Vec<u8>, i32)>()
                .map_err(unavailable)?;
            let mut partitions = Vec::new();
            while let Some(p) = rows.try_next().await.map_err(unavailable)? {
                partitions.push(p);
            }
            // Keys hold the subject's pseudonym: one record of each partition names it.
            let mut out = Vec::new();
            for (subject_p, month) in partitions {
                let first = s
                    .session
                    .execute_unpaged(&s.st.select_audit_first, (&subject_p, month))
                    .await
                    .map_err(unavailable)?
                    .into_rows_result()
                    .map_err(unavailable)?;
                let Some((node, n, sealed)) = first
                    .maybe_first_row::<(i32, i64, Option<Vec<u8>>)>()
                    .map_err(unavailable)?
                else {
                    continue;
                };
                let mut key = subject_p.clone();
                key.extend_from_slice(&(month as u32).to_be_bytes());
                key.push(node as u8);
                key.extend_from_slice(&(n as u64).to_be_bytes());
                let subject = sealed
                    .and_then(|v| rows::open_audit(&s.ids, &key, &v))
                    .map(|(subject, _)| subject)
                    .unwrap_or_else(|| {
                        let hex: String = subject_p.iter().map(|b| format!("{b:02x}")).collect();
                        format!("#unreadable/{hex}")
                    });
                out.push((subject, month.max(0) as u32));
            }
            out.sort();
            Ok(out)
        }
        .boxed()
    }
}
