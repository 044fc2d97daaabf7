//! The admin API, on the admin listener: remote logout, lock, the devices and presence views,
//! and audit queries. Callers authenticate with a bearer token whose SHA-256 is configured in
//! `[[admin.credentials]]`, with a role (see [`AdminRole`]); every call is audited with its
//! actor. Shapes and error codes: README, "Admin API".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::access::{self, Access, LogoutReason, Target};
use crate::audit::{self, Event, EventKind};
use crate::config::{AdminCredential, AdminRole};
use crate::protocol::valid_id;
use crate::store::{DeviceRef, MessageStore, StoreError, now_ms};

type Body = Full<Bytes>;

/// What the admin API works with: the access service (logout, lock, presence, the audit trail),
/// the store it reads views from, and its own settings. Nothing of the listener.
pub struct Admin {
    /// Logout, lock and presence; its auditor records every call.
    pub access: Arc<Access>,
    /// Device lists, org members and audit records.
    pub store: Arc<dyn MessageStore>,
    /// Who may call, with which role.
    pub credentials: Vec<AdminCredential>,
    /// How long a device has to confirm its wipe before the devices view flags it.
    pub confirm_within: Duration,
}

/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024;
/// Largest audit page.
const MAX_PAGE: usize = 1000;

/// A refused call: status, stable code, human-readable detail.
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Refusal(status, code, detail.into())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "admin call: store unavailable");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store is unavailable; retry",
        )
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The caller.
struct Caller<'a> {
    cred: &'a AdminCredential,
}

impl Caller<'_> {
    fn actor(&self) -> String {
        format!("{} ({})", self.cred.name, self.cred.role.name())
    }

    fn require(&self, allowed: &[AdminRole]) -> Result<(), Refusal> {
        if allowed.contains(&self.cred.role) {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("role {} may not do this", self.cred.role.name()),
            ))
        }
    }

    /// An org admin sees only their own organisation's org-wide views.
    fn own_org(&self, org: &str) -> Result<(), Refusal> {
        if self.cred.org.as_deref().is_some_and(|o| o != org) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "outside_your_org",
                "not your organisation",
            ));
        }
        Ok(())
    }

    /// An org admin acts only on users of their organisation.
    async fn may_touch(&self, app: &Admin, user: &str) -> Result<(), Refusal> {
        let Some(org) = &self.cred.org else {
            return Ok(());
        };
        if current_org(app, user).await?.as_ref() == Some(org) {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "outside_your_org",
                "this user is not in your organisation",
            ))
        }
    }
}

fn authenticate<'a>(req: &Request<Incoming>, app: &'a Admin) -> Option<Caller<'a>> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    let digest = hex(&Sha256::digest(token.as_bytes()));
    app.credentials
        .iter()
        .find(|c| {
            constant_time_eq(
                c.token_sha256.to_ascii_lowercase().as_bytes(),
                digest.as_bytes(),
            )
        })
        .map(|cred| Caller { cred })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new admin token and the SHA-256 to configure for it.
pub fn new_credential() -> (String, String) {
    let mut raw = [0u8; 32];
    let _ = aws_lc_rs::rand::fill(&mut raw);
    let token = format!("rla_{}", hex(&raw));
    let digest = hex(&Sha256::digest(token.as_bytes()));
    (token, digest)
}

/// Longest an admin request may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Handles a `/v1/...` request on the admin listener.
pub async fn handle(req: Request<Incoming>, peer: SocketAddr, app: &Admin) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let caller = authenticate(&req, app);
    let routed = match &caller {
        None => Routed::new(
            None,
            Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send an admin credential: Authorization: Bearer <token>",
            )),
        ),
        // Every request ends: a store that hangs gets the caller a 503, not a stuck call.
        Some(caller) => match tokio::time::timeout(REQUEST_DEADLINE, route(req, caller, app)).await
        {
            Ok(done) => done,
            Err(_) => Routed::new(
                None,
                Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    "the request did not finish in time; try again",
                )),
            ),
        },
    };
    let (status, reply) = match routed.result {
        Ok(answer) => answer,
        Err(Refusal(status, code, detail)) => (
            status,
            Reply::Json(json!({ "error": code, "detail": detail })),
        ),
    };
    let audit = &app.access.audit;
    audit.record(Event {
        user: routed.subject,
        actor: caller.as_ref().map(Caller::actor),
        ip: Some(peer.ip().to_string()),
        request: Some(format!("{method} {path}")),
        status: Some(status.as_u16()),
        from: routed.range.map(|r| r.0),
        to: routed.range.map(|r| r.1),
        ..Event::new(EventKind::AdminRequest)
    });
    metrics::counter!("relay_admin_requests_total", "status" => status_class(status)).increment(1);
    match reply {
        Reply::Json(body) => respond(status, &body),
        Reply::Csv {
            text,
            filename,
            next,
        } => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
                h.insert("x-next-cursor", v);
            }
            r
        }
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200..=299 => "2xx",
        401 => "401",
        403 => "403",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// What a call answers.
enum Reply {
    Json(Value),
    /// A CSV attachment; `next` is the cursor of the following part, if any.
    Csv {
        text: String,
        filename: String,
        next: Option<String>,
    },
}

type Answer = Result<(StatusCode, Reply), Refusal>;

/// A routed call: whose partition its audit record goes to, the time range it read (recorded
/// with it), and the answer.
struct Routed {
    subject: Option<String>,
    range: Option<(u64, u64)>,
    result: Answer,
}

impl Routed {
    fn new(subject: Option<String>, result: Result<(StatusCode, Value), Refusal>) -> Self {
        Routed {
            subject,
            range: None,
            result: result.map(|(status, body)| (status, Reply::Json(body))),
        }
    }
}

async fn route(req: Request<Incoming>, caller: &Caller<'_>, app: &Admin) -> Routed {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, segments.as_slice()) {
        (Method::POST, ["v1", "users", user, action @ ("logout" | "lock" | "unlock")]) => {
            user_action(req, caller, app, user, action).await
        }
        (Method::POST, ["v1", "devices", device, "logout"]) => {
            device_logout(req, caller, app, device).await
        }
        (Method::GET, ["v1", "users", user, "devices"]) => devices(caller, app, user).await,
        (Method::GET, ["v1", "orgs", org, "presence"]) => presence(caller, app, org).await,
        (Method::GET, ["v1", "orgs", org, "access-report"]) => {
            access_report(req, caller, app, org).await
        }
        (Method::GET, ["v1", "audit"]) => audit_query(req, caller, app).await,
        _ => Routed::new(
            None,
            Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such admin endpoint",
            )),
        ),
    }
}

/// The user-wide logout, lock and unlock.
async fn user_action(
    req: Request<Incoming>,
    caller: &Caller<'_>,
    app: &Admin,
    user: &str,
    action: &str,
) -> Routed {
    use AdminRole::*;
    let user = user.to_string();
    let action = action.to_string();
    let result = async {
        check_id("user", &user)?;
        let body: ActionBody = read_json(req).await?;
        match action.as_str() {
            "logout" => {
                caller.require(&[Support, OrgAdmin, AccountService])?;
                caller.may_touch(app, &user).await?;
                let reason = check_reason(body.reason.as_deref())?;
                if let Some(d) = &body.except_device {
                    check_id("except_device", d)?;
                }
                let target = Target::User {
                    user: user.clone(),
                    except: body.except_device,
                };
                let outcome = app.access.logout(target, reason, &caller.actor()).await?;
                Ok((StatusCode::OK, json!(outcome)))
            }
            "lock" => {
                caller.require(&[OrgAdmin, AccountService])?;
                caller.may_touch(app, &user).await?;
                let reason = body.reason.unwrap_or_else(|| "admin".into());
                if reason.len() > 200 {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "reason: at most 200 characters",
                    ));
                }
                let outcome = app.access.lock(&user, &reason, &caller.actor()).await?;
                Ok((StatusCode::OK, json!({ "locked": true, "logout": outcome })))
            }
            _ => {
                caller.require(&[OrgAdmin, AccountService])?;
                caller.may_touch(app, &user).await?;
                app.access.unlock(&user, &caller.actor()).await?;
                Ok((StatusCode::OK, json!({ "locked": false })))
            }
        }
    }
    .await;
    Routed::new(Some(user), result)
}

/// The logout of one device.
async fn device_logout(
    req: Request<Incoming>,
    caller: &Caller<'_>,
    app: &Admin,
    device: &str,
) -> Routed {
    use AdminRole::*;
    let device = device.to_string();
    let mut subject = None;
    let result = async {
        check_id("device", &device)?;
        caller.require(&[Support, OrgAdmin, AccountService])?;
        let body: ActionBody = read_json(req).await?;
        let user = body.user.ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "`user` is required: device ids are unique per user",
            )
        })?;
        check_id("user", &user)?;
        subject = Some(user.clone());
        caller.may_touch(app, &user).await?;
        let reason = check_reason(body.reason.as_deref())?;
        let target = Target::Device(DeviceRef::new(&user, &device));
        let outcome = app.access.logout(target, reason, &caller.actor()).await?;
        Ok((StatusCode::OK, json!(outcome)))
    }
    .await;
    Routed::new(subject, result)
}

/// The devices view of a user.
async fn devices(caller: &Caller<'_>, app: &Admin, user: &str) -> Routed {
    use AdminRole::*;
    let user = user.to_string();
    let result = async {
        check_id("user", &user)?;
        caller.require(&[Support, OrgAdmin, AccountService])?;
        caller.may_touch(app, &user).await?;
        devices_view(app, &user).await
    }
    .await;
    Routed::new(Some(user), result)
}

/// The presence view of an organisation.
async fn presence(caller: &Caller<'_>, app: &Admin, org: &str) -> Routed {
    use AdminRole::*;
    let org = org.to_string();
    let result = async {
        check_id("org", &org)?;
        caller.require(&[Support, OrgAdmin])?;
        caller.own_org(&org)?;
        presence_view(app, &org).await
    }
    .await;
    Routed::new(Some(audit::org_subject(&org)), result)
}

/// An organisation's access report.
async fn access_report(
    req: Request<Incoming>,
    caller: &Caller<'_>,
    app: &Admin,
    org: &str,
) -> Routed {
    use AdminRole::*;
    let org = org.to_string();
    let params = parse_query(req.uri().query().unwrap_or_default());
    let mut range = None;
    let result = async {
        check_id("org", &org)?;
        caller.require(&[Support, OrgAdmin])?;
        caller.own_org(&org)?;
        let (from, to) = parse_range(&params, REPORT_MAX_DAYS)?;
        range = Some((from, to));
        org_report(app, &org, from, to, &params).await
    }
    .await;
    Routed {
        subject: Some(audit::org_subject(&org)),
        range,
        result,
    }
}

/// The audit trail of a user or an organisation.
async fn audit_query(req: Request<Incoming>, caller: &Caller<'_>, app: &Admin) -> Routed {
    use AdminRole::*;
    let params = parse_query(req.uri().query().unwrap_or_default());
    let user = param(&params, "user").map(str::to_string);
    let org = param(&params, "org").map(str::to_string);
    let mut range = None;
    let subject = match (&user, &org) {
        (Some(u), _) => Some(u.clone()).filter(|u| valid_id(u)),
        (None, Some(o)) => Some(audit::org_subject(o)).filter(|_| valid_id(o)),
        (None, None) => None,
    };
    let result = async {
        caller.require(&[Support, OrgAdmin])?;
        let subject = match (user, org) {
            (Some(user), None) if user == audit::ANONYMOUS => {
                if caller.cred.role != Support {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "only support reads failed logins of unknown users",
                    ));
                }
                user
            }
            (Some(user), None) => {
                check_id("user", &user)?;
                caller.may_touch(app, &user).await?;
                user
            }
            // The org's own partition: who called org-wide views and reports.
            (None, Some(org)) => {
                check_id("org", &org)?;
                caller.own_org(&org)?;
                audit::org_subject(&org)
            }
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "give `user` (device ids are unique per user) or `org`",
                ));
            }
        };
        let (from, to) = parse_range(&params, 366)?;
        range = Some((from, to));
        audit_view(app, &subject, from, to, &params).await
    }
    .await;
    Routed {
        subject,
        range,
        result: result.map(|(status, body)| (status, Reply::Json(body))),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
    except_device: Option<String>,
    user: Option<String>,
}

async fn read_json<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("at most {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    parse_json(&body)
}

/// A JSON request body (empty: the defaults).
fn parse_json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or("invalid JSON");
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            msg.chars().take(200).collect::<String>(),
        )
    })
}

fn check_id(name: &str, id: &str) -> Result<(), Refusal> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{name}: 1-128 characters of A-Z a-z 0-9 . _ : @ + -"),
        ))
    }
}

fn check_reason(reason: Option<&str>) -> Result<LogoutReason, Refusal> {
    LogoutReason::requested(reason.unwrap_or("admin")).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_reason",
            "reason: password_changed, lost_device, admin or security",
        )
    })
}

async fn devices_view(app: &Admin, user: &str) -> Result<(StatusCode, Value), Refusal> {
    let store = &app.store;
    let (user_row, rows) = access::split(store.access(user.into(), None).await?);
    let mut ids = store.devices(user.into()).await?;
    ids.extend(rows.iter().map(|(d, _)| d.clone()));
    ids.sort();
    ids.dedup();
    let overdue_before = now_ms().saturating_sub(app.confirm_within.as_millis() as u64);
    let mut devices = Vec::new();
    for id in ids {
        let dref = DeviceRef::new(user, &id);
        let row = rows
            .iter()
            .find(|(d, _)| *d == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        // The revocation that applies to the device's tokens issued up to now.
        let revoked = access::revocation(&user_row, &row, &id, 0);
        let logout = revoked.map(|r| {
            let confirmed = row
                .confirmed
                .as_ref()
                .filter(|c| c.signal == r.signal)
                .map(|c| c.at);
            json!({
                "reason": r.reason,
                "requested_at": r.at,
                "signal": r.signal,
                "confirmed_at": confirmed,
                "pending": confirmed.is_none(),
                "overdue": confirmed.is_none() && r.at < overdue_before,
            })
        });
        let platform = store
            .push_token(dref.clone())
            .await
            .ok()
            .flatten()
            .map(|t| t.platform.name());
        devices.push(json!({
            "device": id,
            "platform": platform,
            "last_seen": row.last_seen,
            "online": app.access.presence.is_online(&dref),
            "logout": logout,
        }));
    }
    Ok((
        StatusCode::OK,
        json!({ "user": user, "org": user_row.org, "locked": user_row.locked, "devices": devices }),
    ))
}

/// The organisation `user` belongs to now: the `org` of their newest token. The org index
/// remembers every org a user was ever seen in, so membership is always read from here.
async fn current_org(app: &Admin, user: &str) -> Result<Option<String>, StoreError> {
    let rows = app.store.access(user.into(), Some(String::new())).await?;
    Ok(access::split(rows).0.org)
}

async fn presence_view(app: &Admin, org: &str) -> Result<(StatusCode, Value), Refusal> {
    let store = &app.store;
    let mut online = Vec::new();
    for user in store.org_users(org.into()).await? {
        if current_org(app, &user).await?.as_deref() != Some(org) {
            continue; // moved to another organisation since
        }
        let devices: Vec<String> = store
            .devices(user.clone())
            .await?
            .into_iter()
            .filter(|d| app.access.presence.is_online(&DeviceRef::new(&user, d)))
            .collect();
        if !devices.is_empty() {
            online.push(json!({ "user": user, "devices": devices }));
        }
    }
    Ok((StatusCode::OK, json!({ "org": org, "online": online })))
}

/// Largest org report range, days: a quarter.
const REPORT_MAX_DAYS: u64 = 92;
/// Largest CSV part of an org report (and its default), rows.
const MAX_CSV_ROWS: usize = 10_000;

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn bad(detail: &str) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, "bad_request", detail)
}

/// `from` and `to` (default: the 30 days up to now), at most `max_days` apart.
fn parse_range(params: &[(String, String)], max_days: u64) -> Result<(u64, u64), Refusal> {
    let time = |key: &str| {
        param(params, key)
            .map(|t| {
                parse_time(t).ok_or_else(|| {
                    bad(&format!(
                        "{key}: Unix ms or RFC 3339 UTC (2026-11-28T10:00:00Z), at most year 9999"
                    ))
                })
            })
            .transpose()
    };
    let to = time("to")?.unwrap_or_else(|| now_ms() + 1);
    let from = time("from")?.unwrap_or_else(|| to.saturating_sub(30 * 86_400_000));
    if from >= to {
        return Err(bad("from must be before to"));
    }
    if to - from > max_days * 86_400_000 {
        return Err(bad(&format!("at most {max_days} days per query")));
    }
    Ok((from, to))
}

/// `limit` (1 to `max`, default `default`) and `cursor`.
fn parse_page(
    params: &[(String, String)],
    default: usize,
    max: usize,
) -> Result<(usize, Option<audit::Cursor>), Refusal> {
    let limit = match param(params, "limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| bad(&format!("limit: 1-{max}")))?,
        None => default,
    };
    let cursor = param(params, "cursor")
        .map(|c| {
            audit::parse_cursor(c).ok_or_else(|| bad("cursor: pass `next` from the previous page"))
        })
        .transpose()?;
    Ok((limit, cursor))
}

async fn audit_view(
    app: &Admin,
    subject: &str,
    from: u64,
    to: u64,
    params: &[(String, String)],
) -> Result<(StatusCode, Value), Refusal> {
    let device = param(params, "device");
    if let Some(d) = device {
        check_id("device", d)?;
    }
    let (limit, cursor) = parse_page(params, 100, MAX_PAGE)?;
    // This node's own recent events first, so a query right after an action sees it.
    app.access.audit.flush(Duration::from_secs(2)).await;
    let store = &*app.store;
    let page = audit::query(store, subject, device, from, to, limit, cursor).await?;
    Ok((StatusCode::OK, json!(page)))
}

async fn org_report(
    app: &Admin,
    org: &str,
    from: u64,
    to: u64,
    params: &[(String, String)],
) -> Answer {
    let csv = match param(params, "format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(bad("format: json or csv")),
    };
    let (limit, cursor) = if csv {
        parse_page(params, MAX_CSV_ROWS, MAX_CSV_ROWS)?
    } else {
        parse_page(params, 100, MAX_PAGE)?
    };
    app.access.audit.flush(Duration::from_secs(2)).await;
    let page = audit::org_report(&*app.store, org, from, to, limit, cursor).await?;
    if !csv {
        return Ok((StatusCode::OK, Reply::Json(json!(page))));
    }
    Ok((
        StatusCode::OK,
        Reply::Csv {
            text: report_csv(&page.events),
            filename: format!("access-report-{org}-{}-{}.csv", rfc3339(from), rfc3339(to)),
            next: page.next,
        },
    ))
}

/// Columns of the CSV export, in order.
const CSV_COLUMNS: &str = "time,ts,event,user,device,org,reason,via,actor,ip,signal,node";

/// The events as CSV (RFC 4180, CRLF line ends).
fn report_csv(events: &[Event]) -> String {
    let mut out = String::with_capacity(64 + events.len() * 128);
    out.push_str(CSV_COLUMNS);
    out.push_str("\r\n");
    for e in events {
        let fields = [
            rfc3339(e.ts),
            e.ts.to_string(),
            e.event.name().to_string(),
            e.user.clone().unwrap_or_default(),
            e.device.clone().unwrap_or_default(),
            e.org.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.via.clone().unwrap_or_default(),
            e.actor.clone().unwrap_or_default(),
            e.ip.clone().unwrap_or_default(),
            e.signal.map(|s| s.to_string()).unwrap_or_default(),
            e.node.to_string(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// One CSV field: quoted when it must be, and never read as a formula by a spreadsheet (a lock
/// reason is free text): a leading `= + - @` gets a `'` in front, as OWASP advises.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// `2026-11-28T10:00:00.123Z` for a time in ms.
pub fn rfc3339(ms: u64) -> String {
    let (year, month, day) = audit::civil_date(ms);
    let rem = ms % 86_400_000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// Everything the API makes of a query string and an action body before it acts on them, for
/// the fuzz target `admin_inputs` (no store, no network): the refusal's code and detail, if any.
#[doc(hidden)]
pub fn check_inputs(query: &str, body: &[u8]) -> Result<(), (&'static str, String)> {
    let refused = |r: Refusal| (r.1, r.2);
    let params = parse_query(query);
    parse_range(&params, REPORT_MAX_DAYS).map_err(refused)?;
    parse_page(&params, 100, MAX_PAGE).map_err(refused)?;
    if let Some(d) = param(&params, "device") {
        check_id("device", d).map_err(refused)?;
    }
    let body: ActionBody = parse_json(body).map_err(refused)?;
    for id in [&body.except_device, &body.user].into_iter().flatten() {
        check_id("id", id).map_err(refused)?;
    }
    Ok(())
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unix milliseconds, or RFC 3339 in UTC (`2026-11-28T10:00:00Z`, optional fraction).
pub fn parse_time(s: &str) -> Option<u64> {
    parse_time_any(s).filter(|ms| *ms <= MAX_TIME_MS)
}

/// 9999-12-31T23:59:59.999Z: no audit record is dated later, and no range reaches past it.
const MAX_TIME_MS: u64 = 253_402_300_799_999;

fn parse_time_any(s: &str) -> Option<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Some(ms);
    }
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    // Unsigned fields of at most `max` digits: no sign, and nothing below can overflow.
    let num = |p: &str, max: usize| {
        ((1..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<i64>().ok())
            .flatten()
    };
    let three = |s: &str, sep: char, max: [usize; 3]| {
        let mut it = s.split(sep);
        let parts = [it.next()?, it.next()?, it.next()?];
        if it.next().is_some() {
            return None;
        }
        Some([
            num(parts[0], max[0])?,
            num(parts[1], max[1])?,
            num(parts[2], max[2])?,
        ])
    };
    let [y, m, day] = three(date, '-', [4, 2, 2])?;
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, num(frac, 9).map(|_| frac)?),
        None => (time, ""),
    };
    let [h, min, sec] = three(hms, ':', [2, 2, 2])?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms_frac = format!("{frac:0<3}").get(..3)?.parse::<i64>().ok()?;
    let ms = ((days * 86_400 + h * 3600 + min * 60 + sec) * 1000) + ms_frac;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_ms_or_rfc3339() {
        assert_eq!(parse_time("1767225600123"), Some(1_767_225_600_123));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Some(1_767_225_600_000));
        assert_eq!(
            parse_time("2026-01-01T00:00:00.5Z"),
            Some(1_767_225_600_500)
        );
        assert_eq!(
            parse_time("2024-02-29T12:30:00+00:00"),
            Some(1_709_209_800_000)
        );
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn times_out_of_range_are_refused_not_overflowed() {
        // Found by the fuzz target `admin_inputs`: a year this large overflowed the arithmetic
        // (a panic in debug builds, a wrong time in release ones).
        assert_eq!(parse_time("211111111111-1-3T3:03:03:1010Z"), None);
        assert_eq!(parse_time("9223372036854775807-01-01T00:00:00Z"), None);
        // Negative fields and fractions are not times either.
        assert_eq!(parse_time("2026-11-28T-1:00:00Z"), None);
        assert_eq!(parse_time("2026-11-28T10:-5:00Z"), None);
        assert_eq!(parse_time("2026-11-28T10:00:00.-5Z"), None);
        assert_eq!(parse_time("2026-11-28T10:00:00.+5Z"), None);
        assert_eq!(parse_time("-2026-11-28T10:00:00Z"), None);
        assert_eq!(
            parse_time("2026-11-28T10:00:00.5Z"),
            Some(1_795_860_000_500)
        );
    }

    #[test]
    fn times_format_as_rfc3339_and_parse_back() {
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(1_709_209_800_000), "2024-02-29T12:30:00.000Z");
        for ms in [0, 951_782_400_000, 1_767_225_600_123, MAX_TIME_MS] {
            assert_eq!(parse_time(&rfc3339(ms)), Some(ms));
        }
    }

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("dra"), "dra");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("+1,2"), "\"'+1,2\"");
        let csv = report_csv(&[Event {
            user: Some("dra".into()),
            reason: Some("line\nbreak".into()),
            ..Event::new(EventKind::Lock)
        }]);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], CSV_COLUMNS);
        assert!(lines[1].contains(",lock,dra,,,\"line\nbreak\","), "{csv}");
    }

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            parse_query("user=dr.bob%40clinic&device=a+b&x"),
            vec![
                ("user".into(), "dr.bob@clinic".into()),
                ("device".into(), "a b".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn credentials_hash_and_compare() {
        let (token, digest) = new_credential();
        assert_eq!(hex(&Sha256::digest(token.as_bytes())), digest);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
