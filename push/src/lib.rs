//! Push notifications for the relay: APNs and FCM wake-ups that carry **no patient
//! information**.
//!
//! Layout:
//! - [`payload`]: what a push may say, built only from types that cannot hold free text.
//!
//! The APNs and FCM HTTP/2 clients, the bounded queue and the relay's use of them are the rest
//! of issue 5. `a2` and `fcm` were the first candidates and do not fit (`fcm` targets Google's
//! retired legacy API; `a2` cannot be pointed at a test server, pulls a second TLS stack and
//! lacks `interruption-level`): see ARCHITECTURE.md before adding either.

#![warn(missing_docs)]

pub mod payload;
