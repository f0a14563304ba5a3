//! Signature verification against a pinned test certificate (`tests/fixtures/sns-test-*.pem`, made
//! with openssl for these tests and trusted by nothing else), v1 and v2, every signed field
//! tampered, and certificate URLs that must be refused without any request.

use std::sync::atomic::{AtomicUsize, Ordering};

use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::RsaPrivateKey;
use serde_json::{json, Value};

use super::*;

const KEY: &str = include_str!("../../../../../tests/fixtures/sns-test-key.pem");
const CERT: &str = include_str!("../../../../../tests/fixtures/sns-test-cert.pem");
const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:alarms";
const OTHER: &str = "arn:aws:sns:us-east-1:123456789012:other";
const URL: &str =
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem";

#[derive(Default)]
struct Counting(AtomicUsize);

#[async_trait]
impl CertFetcher for Counting {
    async fn fetch(&self, _url: &str) -> Result<Vec<u8>, String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(CERT.as_bytes().to_vec())
    }
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-22T05:00:30Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn sign(v: &mut Value) {
    let m: SnsMessage = serde_json::from_value(v.clone()).unwrap();
    let key = RsaPrivateKey::from_pkcs8_pem(KEY).unwrap();
    let text = string_to_sign(&m);
    let sig = if m.signature_version == "1" {
        SigningKey::<sha1::Sha1>::new(key)
            .sign(text.as_bytes())
            .to_vec()
    } else {
        SigningKey::<sha2::Sha256>::new(key)
            .sign(text.as_bytes())
            .to_vec()
    };
    v["Signature"] = json!(base64::engine::general_purpose::STANDARD.encode(sig));
}

fn notification(version: &str, subject: Option<&str>) -> Value {
    let mut v = json!({
        "Type": "Notification",
        "MessageId": "5b1b7c4e-0000-4000-8000-000000000001",
        "TopicArn": TOPIC,
        "Message": "{\"AlarmName\":\"cpu\"}",
        "Timestamp": "2026-11-22T05:00:00.000Z",
        "SignatureVersion": version,
        "Signature": "",
        "SigningCertURL": URL,
    });
    if let Some(s) = subject {
        v["Subject"] = json!(s);
    }
    sign(&mut v);
    v
}

fn store() -> (CertStore, Arc<Counting>) {
    let c = Arc::new(Counting::default());
    (CertStore::new(None, c.clone(), 4), c)
}

async fn check(s: &CertStore, v: &Value) -> Result<SnsMessage, Rejection> {
    s.verify(
        v.to_string().as_bytes(),
        &[TOPIC.to_string(), OTHER.to_string()],
        Some(Duration::from_secs(3600)),
        now(),
    )
    .await
}

#[tokio::test]
async fn v1_and_v2_with_and_without_subject_verify() {
    let (s, fetched) = store();
    for version in ["1", "2"] {
        for subject in [None, Some("ALARM: \"cpu\" in US East")] {
            let m = check(&s, &notification(version, subject)).await.unwrap();
            assert_eq!(m.subject.as_deref(), subject);
        }
    }
    assert_eq!(
        fetched.0.load(Ordering::SeqCst),
        1,
        "the certificate is cached"
    );
}

#[tokio::test]
async fn subscription_confirmation_verifies_over_its_own_fields() {
    let (s, _) = store();
    let mut v = json!({
        "Type": "SubscriptionConfirmation",
        "MessageId": "m-1", "Token": "tok-123", "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe", "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=tok-123",
        "Timestamp": "2026-11-22T05:00:00.000Z", "SignatureVersion": "2", "Signature": "",
        "SigningCertURL": URL,
    });
    sign(&mut v);
    assert_eq!(
        check(&s, &v).await.unwrap().token.as_deref(),
        Some("tok-123")
    );
    let mut t = v.clone();
    t["Token"] = json!("tok-999");
    assert_eq!(check(&s, &t).await, Err(Rejection::Signature));
}

#[tokio::test]
async fn every_signed_field_tampered_fails() {
    let (s, _) = store();
    let good = notification("2", Some("subject"));
    for (field, value) in [
        ("Message", json!("{\"AlarmName\":\"other\"}")),
        ("MessageId", json!("5b1b7c4e-0000-4000-8000-000000000002")),
        ("Subject", json!("another subject")),
        ("Timestamp", json!("2026-11-22T05:00:01.000Z")),
        ("TopicArn", json!(OTHER)),
        ("Type", json!("UnsubscribeConfirmation")),
        ("SignatureVersion", json!("1")),
    ] {
        let mut v = good.clone();
        v[field] = value;
        assert_eq!(check(&s, &v).await, Err(Rejection::Signature), "{field}");
    }
    let mut v = good.clone();
    v.as_object_mut().unwrap().remove("Subject");
    assert_eq!(
        check(&s, &v).await,
        Err(Rejection::Signature),
        "Subject removed"
    );
    let mut v = good.clone();
    v["Signature"] = json!("bm90IGEgc2lnbmF0dXJl");
    assert_eq!(check(&s, &v).await, Err(Rejection::Signature));
}

#[tokio::test]
async fn refusals_before_the_certificate_make_no_request() {
    let (s, fetched) = store();
    let mut v = notification("2", None);
    v["TopicArn"] = json!("arn:aws:sns:us-east-1:123456789012:unknown");
    assert!(matches!(check(&s, &v).await, Err(Rejection::Topic(_))));
    for url in [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.evil.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-0123abcd.pem",
        "https://s3.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns-certs.s3.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://evil.com/?u=https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem?x=.pem",
        "https://sns.us-east-1.amazonaws.com/x?SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-0123abcd.pem",
        "https://user:pw@sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com@evil.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem#x",
        "https://sns.us-east-1.amazonaws.com/sub/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-xyz.pem",
        "https://sns..amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://SNS.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        // Other services' hosts under amazonaws.com (an S3 bucket named `sns`) are no region.
        "https://sns.s3.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.s3-external-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.s3.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.execute-api.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1.amazonaws.com.cn/SimpleNotificationService-0123abcd.pem",
        "https://sns.cn-north-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-east-1-.amazonaws.com/SimpleNotificationService-0123abcd.pem",
    ] {
        let mut v = notification("2", None);
        v["SigningCertURL"] = json!(url);
        sign(&mut v);
        assert!(
            matches!(check(&s, &v).await, Err(Rejection::CertUrl(_))),
            "{url} must be refused"
        );
    }
    for ok in [
        "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-0123abcd.pem",
        "https://sns.cn-northwest-1.amazonaws.com.cn/SimpleNotificationService-0123abcd.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.ap-southeast-3.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        "https://sns.il-central-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
    ] {
        assert!(check_cert_url(ok).is_ok(), "{ok}");
    }
    let mut v = notification("2", None);
    v["Timestamp"] = json!("2026-11-22T03:00:00.000Z");
    sign(&mut v);
    assert!(matches!(check(&s, &v).await, Err(Rejection::Stale(_))));
    assert_eq!(
        fetched.0.load(Ordering::SeqCst),
        0,
        "no refusal above fetched a certificate"
    );
    // The replay window can be turned off.
    assert!(s
        .verify(v.to_string().as_bytes(), &[TOPIC.to_string()], None, now())
        .await
        .is_ok());
}

#[tokio::test]
async fn pre_seeded_certificates_are_used_before_any_fetch() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path()
            .join("SimpleNotificationService-0123456789abcdef.pem"),
        CERT,
    )
    .unwrap();
    let c = Arc::new(Counting::default());
    let s = CertStore::new(Some(dir.path().to_path_buf()), c.clone(), 4);
    check(&s, &notification("2", None)).await.unwrap();
    assert_eq!(c.0.load(Ordering::SeqCst), 0);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Arbitrary bodies never panic the verifier, and a body that fails before the certificate
        /// check never causes a fetch.
        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (s, fetched) = store();
            let r = rt.block_on(s.verify(&body, &[TOPIC.to_string()], Some(Duration::from_secs(3600)), now()));
            prop_assert!(r.is_err());
            prop_assert_eq!(fetched.0.load(Ordering::SeqCst), 0);
        }

        /// Messages with every field mutated at random: refused or verified, never a panic; a
        /// refused certificate URL or topic makes no request.
        #[test]
        fn mutated_messages_never_panic(
            field in prop::sample::select(vec!["Type", "MessageId", "TopicArn", "Subject", "Message",
                "Timestamp", "SignatureVersion", "Signature", "SigningCertURL", "Token"]),
            value in "[ -~]{0,80}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (s, fetched) = store();
            let mut v = notification("2", Some("s"));
            v[field] = json!(value);
            let r = rt.block_on(check(&s, &v));
            if matches!(r, Err(Rejection::CertUrl(_)) | Err(Rejection::Topic(_)) | Err(Rejection::Malformed(_)) | Err(Rejection::UnknownType(_))) {
                prop_assert_eq!(fetched.0.load(Ordering::SeqCst), 0);
            }
        }
    }
}

struct Failing(AtomicUsize);

#[async_trait]
impl CertFetcher for Failing {
    async fn fetch(&self, _url: &str) -> Result<Vec<u8>, String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err("HTTP 404 Not Found".into())
    }
}

/// A certificate whose fetch failed is not fetched again for a while: a stream of messages naming
/// a missing certificate makes one request, not one each.
#[tokio::test]
async fn failed_fetches_are_remembered() {
    let c = Arc::new(Failing(AtomicUsize::new(0)));
    let s = CertStore::new(None, c.clone(), 4);
    for _ in 0..20 {
        let r = check(&s, &notification("2", None)).await;
        assert!(matches!(r, Err(Rejection::Cert(_))), "{r:?}");
    }
    assert_eq!(c.0.load(Ordering::SeqCst), 1);
}
