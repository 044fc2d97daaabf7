//! Connecting to the cluster: contact points, consistency, routing, credentials and TLS.

use super::*;

/// Opens a driver session (without selecting a keyspace).
pub async fn connect(cfg: &ScyllaConfig) -> Result<Session, StoreError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cfg.local_dc {
        policy = policy.prefer_datacenter(dc.clone());
    }
    let profile = ExecutionProfile::builder()
        .consistency(parse_consistency(&cfg.consistency).unwrap_or(Consistency::LocalQuorum))
        .request_timeout(Some(cfg.request_timeout.0))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .connection_timeout(cfg.request_timeout.0)
        .default_execution_profile_handle(profile.into_handle());
    if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
        builder = builder.user(user, pass);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        builder = builder.tls_context(Some(tls_config(ca)?));
    }
    builder.build().await.map_err(unavailable)
}

pub(super) fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| unavailable(format!("{}: {e}", ca.display())))?
    {
        roots
            .add(cert.map_err(|e| unavailable(format!("{}: {e}", ca.display())))?)
            .map_err(unavailable)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(unavailable)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
