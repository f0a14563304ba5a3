//! The one way this crate builds an outgoing HTTP(S) client (SNS certificate and subscription
//! fetches, the CLI's calls to a daemon): rustls on the same aws-lc crypto provider as the AWS SDK,
//! trusting the system's CA roots, plus any extra roots the caller names (the CLI's `--cacert`).
//! Must not set timeouts, redirects or anything else a caller decides.

use std::sync::Once;

/// A client builder with the process's crypto provider installed and the system's roots trusted.
pub fn builder() -> reqwest::ClientBuilder {
    static PROVIDER: Once = Once::new();
    PROVIDER.call_once(|| {
        // Fails only when another provider was installed first, which then serves as well.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
    reqwest::Client::builder().tls_built_in_native_certs(true)
}

/// [`builder`] also trusting the PEM certificates in `path` (a private CA's bundle).
pub fn builder_trusting(path: &std::path::Path) -> Result<reqwest::ClientBuilder, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--cacert {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("--cacert {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--cacert {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs
        .into_iter()
        .fold(builder(), |b, c| b.add_root_certificate(c)))
}
