//! Verifying SNS HTTP messages before anything else looks at them.
//!
//! The checks, in an order that makes no outbound request for a message that can be refused
//! without one: the body parses and has a known signed `Type`; its `TopicArn` is one the hook accepts;
//! `SigningCertURL` is exactly `https://sns.<region>.amazonaws.com[.cn]/SimpleNotificationService-<hex>.pem`
//! (no port, query, fragment or user info; checked on the raw string, so no URL normalisation can
//! smuggle one in); the `Timestamp` is inside the replay window. Only then is the certificate looked up
//! (bounded cache, then a directory of pre-seeded certificates named as in the URL, then an HTTPS fetch
//! with a timeout, a size cap and no redirects) and the signature checked: SignatureVersion 1 is
//! SHA1withRSA, 2 is SHA256withRSA, over AWS's documented string to sign for each message type.
//!
//! The certificate is trusted because of where it comes from (AWS's SNS host over HTTPS, or an
//! operator's pre-seeded directory); its chain is not checked, which is how AWS's own SDKs verify SNS
//! messages. There is no switch that turns verification off.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use chrono::{DateTime, Utc};
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use rsa::RsaPublicKey;
use serde::Deserialize;

/// An SNS message as delivered over HTTP(S), signed fields included.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct SnsMessage {
    /// `Notification`, `SubscriptionConfirmation` or `UnsubscribeConfirmation`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// Unique per message; SNS may deliver one more than once.
    pub message_id: String,
    /// Topic it was published to.
    pub topic_arn: String,
    /// Notification subject, when the publisher gave one.
    #[serde(default)]
    pub subject: Option<String>,
    /// The payload (a CloudWatch alarm or EventBridge event as JSON text, or anything).
    pub message: String,
    /// When SNS sent it (RFC 3339).
    pub timestamp: String,
    /// `1` (SHA1withRSA) or `2` (SHA256withRSA).
    pub signature_version: String,
    /// Base64 signature.
    pub signature: String,
    /// Where the signing certificate lives.
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: String,
    /// Confirmation token (subscription messages).
    #[serde(default)]
    pub token: Option<String>,
    /// Where to confirm (subscription messages; never fetched: confirmation goes through the API).
    #[serde(rename = "SubscribeURL", default)]
    pub subscribe_url: Option<String>,
}

/// Why a message was refused; all answer 403 and made no request unless said otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not SNS's JSON shape.
    #[error("not an SNS message: {0}")]
    Malformed(String),
    /// A `Type` ec2jobd does not handle.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// The topic is not in the hook's list.
    #[error("topic `{0}` is not accepted by this hook")]
    Topic(String),
    /// The certificate URL is not an SNS certificate URL.
    #[error("SigningCertURL `{0}` is not https://sns.<region>.amazonaws.com[.cn]/SimpleNotificationService-<hex>.pem")]
    CertUrl(String),
    /// Outside the replay window.
    #[error("message timestamp `{0}` is outside the accepted window")]
    Stale(String),
    /// The certificate could not be had (after the URL checks passed).
    #[error("signing certificate unavailable: {0}")]
    Cert(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Signature,
}

impl Rejection {
    /// The kind of refusal, for metrics and for folding repeated refusals in the delivery log.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownType(_) => "unknown_type",
            Rejection::Topic(_) => "topic",
            Rejection::CertUrl(_) => "cert_url",
            Rejection::Stale(_) => "stale",
            Rejection::Cert(_) => "cert",
            Rejection::Signature => "signature",
        }
    }
}

/// The exact certificate URL shape SNS uses; returns the file name.
pub fn check_cert_url(url: &str) -> Result<&str, Rejection> {
    let bad = || Rejection::CertUrl(url.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    if rest.contains(['?', '#', '@', '\\', '%']) {
        return Err(bad());
    }
    let (host, path) = rest.split_once('/').ok_or_else(bad)?;
    let h = host.strip_prefix("sns.").ok_or_else(bad)?;
    let (region, china) = match h.strip_suffix(".amazonaws.com.cn") {
        Some(r) => (r, true),
        None => (h.strip_suffix(".amazonaws.com").ok_or_else(bad)?, false),
    };
    // Any other label under amazonaws.com may be another service's host (`sns.s3.amazonaws.com` is
    // an S3 bucket named `sns` behind AWS's wildcard certificate): only a region's shape passes.
    if !ec2jobd_spec::is_aws_region(region) || region.starts_with("cn-") != china {
        return Err(bad());
    }
    let hex = path
        .strip_prefix("SimpleNotificationService-")
        .and_then(|p| p.strip_suffix(".pem"))
        .ok_or_else(bad)?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(path)
}

/// AWS's string to sign: `Name\nValue\n` for each signed field present, in this order.
pub fn string_to_sign(m: &SnsMessage) -> String {
    let mut fields: Vec<(&str, Option<&str>)> = vec![
        ("Message", Some(&m.message)),
        ("MessageId", Some(&m.message_id)),
    ];
    if m.kind == "Notification" {
        fields.push(("Subject", m.subject.as_deref()));
        fields.push(("Timestamp", Some(&m.timestamp)));
        fields.push(("TopicArn", Some(&m.topic_arn)));
    } else {
        fields.push(("SubscribeURL", m.subscribe_url.as_deref()));
        fields.push(("Timestamp", Some(&m.timestamp)));
        fields.push(("Token", m.token.as_deref()));
        fields.push(("TopicArn", Some(&m.topic_arn)));
    }
    fields.push(("Type", Some(&m.kind)));
    let mut s = String::new();
    for (k, v) in fields {
        if let Some(v) = v {
            s.push_str(k);
            s.push('\n');
            s.push_str(v);
            s.push('\n');
        }
    }
    s
}

/// Fetches a certificate by URL (already checked). Tests count calls through their own fetcher.
#[async_trait]
pub trait CertFetcher: Send + Sync {
    /// The PEM text at `url`.
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// HTTPS fetch with a timeout, a size cap and no redirects. If that client cannot be built, every
/// fetch fails: there is no fallback to a default (redirect-following, no timeout) client.
pub struct HttpFetcher {
    client: Result<reqwest::Client, String>,
    max_bytes: usize,
}

impl HttpFetcher {
    /// A fetcher giving up after `timeout` or `max_bytes`.
    pub fn new(timeout: Duration, max_bytes: usize) -> Self {
        let client = crate::https::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .https_only(true)
            .build()
            .map_err(|e| format!("no HTTPS client for certificate fetches: {e}"));
        if let Err(e) = &client {
            tracing::error!(error = %e, "SNS certificates can only come from sns.cert_dir");
        }
        Self { client, max_bytes }
    }
}

#[async_trait]
impl CertFetcher for HttpFetcher {
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut r = self
            .client
            .as_ref()
            .map_err(Clone::clone)?
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk);
            if body.len() > self.max_bytes {
                return Err(format!("larger than {} bytes", self.max_bytes));
            }
        }
        Ok(body)
    }
}

/// Public keys of SNS signing certificates: a bounded cache, a pre-seeded directory, then a fetch.
/// Fetches run at most [`FETCHES_AT_ONCE`] at a time, and a URL whose fetch failed is refused
/// without a new request for [`FAILED_FETCH_TTL`] (a bounded negative cache), so a stream of
/// messages naming missing certificates cannot turn the daemon into a request amplifier.
pub struct CertStore {
    dir: Option<PathBuf>,
    fetcher: Arc<dyn CertFetcher>,
    max_entries: usize,
    cache: Mutex<(HashMap<String, RsaPublicKey>, VecDeque<String>)>,
    failed: Mutex<HashMap<String, (std::time::Instant, String)>>,
    fetches: tokio::sync::Semaphore,
}

/// Certificate fetches in flight at once.
pub const FETCHES_AT_ONCE: usize = 4;

/// How long a failed certificate fetch is remembered.
pub const FAILED_FETCH_TTL: Duration = Duration::from_secs(60);

fn public_key(pem: &[u8]) -> Result<RsaPublicKey, String> {
    use x509_cert::der::{DecodePem, Encode};
    let cert =
        x509_cert::Certificate::from_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| e.to_string())?;
    use rsa::pkcs8::DecodePublicKey;
    RsaPublicKey::from_public_key_der(&spki).map_err(|e| format!("not an RSA key: {e}"))
}

impl CertStore {
    /// A store that looks in `dir` (if any) before fetching, keeping up to `max_entries` keys.
    pub fn new(dir: Option<PathBuf>, fetcher: Arc<dyn CertFetcher>, max_entries: usize) -> Self {
        Self {
            dir,
            fetcher,
            max_entries: max_entries.max(1),
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
            failed: Mutex::new(HashMap::new()),
            fetches: tokio::sync::Semaphore::new(FETCHES_AT_ONCE),
        }
    }

    async fn key(&self, url: &str, file: &str) -> Result<RsaPublicKey, Rejection> {
        if let Some(k) = self.lock().0.get(url) {
            return Ok(k.clone());
        }
        let seeded = self
            .dir
            .as_ref()
            .map(|d| d.join(file))
            .filter(|p| p.is_file());
        let pem = match seeded {
            Some(p) => {
                std::fs::read(&p).map_err(|e| Rejection::Cert(format!("{}: {e}", p.display())))?
            }
            None => self.fetch(url).await?,
        };
        let key = public_key(&pem).map_err(Rejection::Cert)?;
        let mut c = self.lock();
        if c.0.len() >= self.max_entries {
            if let Some(old) = c.1.pop_front() {
                c.0.remove(&old);
            }
        }
        c.0.insert(url.to_string(), key.clone());
        c.1.push_back(url.to_string());
        Ok(key)
    }

    /// A fetch through the concurrency limit and the negative cache.
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, Rejection> {
        let recent = |failed: &HashMap<String, (std::time::Instant, String)>| {
            failed
                .get(url)
                .filter(|(at, _)| at.elapsed() < FAILED_FETCH_TTL)
                .map(|(_, e)| {
                    Rejection::Cert(format!("{e} (failed recently; not fetched again yet)"))
                })
        };
        if let Some(r) = recent(&self.failed_lock()) {
            return Err(r);
        }
        let _slot = self
            .fetches
            .acquire()
            .await
            .map_err(|_| Rejection::Cert("certificate fetches are closed".into()))?;
        // Another message may have failed on it while this one waited.
        if let Some(r) = recent(&self.failed_lock()) {
            return Err(r);
        }
        match self.fetcher.fetch(url).await {
            Ok(pem) => Ok(pem),
            Err(e) => {
                let mut failed = self.failed_lock();
                if failed.len() >= self.max_entries {
                    failed.retain(|_, (at, _)| at.elapsed() < FAILED_FETCH_TTL);
                    if failed.len() >= self.max_entries {
                        failed.clear();
                    }
                }
                failed.insert(url.to_string(), (std::time::Instant::now(), e.clone()));
                Err(Rejection::Cert(e))
            }
        }
    }

    fn failed_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, String)>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, RsaPublicKey>, VecDeque<String>)> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs every check of the module docs; on success returns the message.
    pub async fn verify(
        &self,
        body: &[u8],
        topics: &[String],
        max_age: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Result<SnsMessage, Rejection> {
        let m: SnsMessage =
            serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if !matches!(
            m.kind.as_str(),
            "Notification" | "SubscriptionConfirmation" | "UnsubscribeConfirmation"
        ) {
            return Err(Rejection::UnknownType(m.kind));
        }
        if !topics.iter().any(|t| t == &m.topic_arn) {
            return Err(Rejection::Topic(m.topic_arn));
        }
        let file = check_cert_url(&m.signing_cert_url)?;
        let sent = DateTime::parse_from_rfc3339(&m.timestamp)
            .map_err(|_| Rejection::Stale(m.timestamp.clone()))?
            .with_timezone(&Utc);
        if let Some(max) = max_age {
            let age = now.signed_duration_since(sent);
            let max = chrono::Duration::from_std(max).unwrap_or(chrono::Duration::MAX);
            if age > max || age < -chrono::Duration::minutes(5) {
                return Err(Rejection::Stale(m.timestamp));
            }
        }
        let sig = base64::engine::general_purpose::STANDARD
            .decode(m.signature.trim())
            .map_err(|_| Rejection::Signature)?;
        let sig = Signature::try_from(sig.as_slice()).map_err(|_| Rejection::Signature)?;
        if !matches!(m.signature_version.as_str(), "1" | "2") {
            return Err(Rejection::Signature);
        }
        let key = self.key(&m.signing_cert_url, file).await?;
        let text = string_to_sign(&m);
        let ok = if m.signature_version == "1" {
            VerifyingKey::<sha1::Sha1>::new(key)
                .verify(text.as_bytes(), &sig)
                .is_ok()
        } else {
            VerifyingKey::<sha2::Sha256>::new(key)
                .verify(text.as_bytes(), &sig)
                .is_ok()
        };
        if ok {
            Ok(m)
        } else {
            Err(Rejection::Signature)
        }
    }
}

#[cfg(test)]
mod tests;
