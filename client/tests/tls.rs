//! TLS (feature `tls`, on for the tests): redis-server with a `tls-port` and a certificate of a
//! throwaway CA made here with rcgen; the cache connects with `rediss://` and `Builder::tls_root_cert`,
//! and its invalidation feed works over TLS. A cache that does not trust the CA cannot reach Redis.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::Server;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tiercache_client::{Opts, TierCache};

/// (CA PEM, server certificate PEM, server key PEM) for 127.0.0.1.
fn certs() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "tiercache test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let (ca, cert, key) = certs();
    let dir = std::env::temp_dir().join(format!("tiercache-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = |n: &str| dir.join(n).display().to_string();
    std::fs::write(path("ca.pem"), &ca).expect("write");
    std::fs::write(path("cert.pem"), &cert).expect("write");
    std::fs::write(path("key.pem"), &key).expect("write");
    let tls_port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port().to_string();
    let server = Server::builder()
        .args(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &path("cert.pem"),
            "--tls-key-file",
            &path("key.pem"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .start();
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let build = || TierCache::builder(url.clone()).namespace("tls").tls_root_cert(ca.as_bytes().to_vec()).build();
    let (a, b) = (build().await.expect("a"), build().await.expect("b"));
    let opts = Opts::default().ttl(Duration::from_secs(60)).tag("t");
    let v: String = a.get_or_load("k", &opts, || async { Ok::<_, String>("one".into()) }).await.expect("load");
    assert_eq!(v, "one");
    assert_eq!(a.metrics().degraded_loads, 0, "a went through Redis: {:?}", a.metrics());
    // b finds it in Redis (over TLS), then in its L1.
    let v: String = b.get_or_load("k", &opts, || async { Ok::<_, String>("not loaded".into()) }).await.expect("b");
    assert_eq!(v, "one");
    let v: String = b.get_or_load("k", &opts, || async { Ok::<_, String>("not loaded".into()) }).await.expect("b");
    assert_eq!(v, "one");
    assert!(b.metrics().l1_hits >= 1);
    // A tag invalidation through a reaches b's L1 through its TLS feed.
    a.invalidate_tags(&["t"]).await.expect("invalidate");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: String = b.get_or_load("k", &opts, || async { Ok::<_, String>("two".into()) }).await.expect("b");
        if v == "two" {
            break;
        }
        assert!(Instant::now() < deadline, "b never heard of the invalidation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Without the CA the server's certificate is not trusted: Redis is unreachable, loads are degraded.
    let untrusting = TierCache::builder(url.clone()).namespace("tls").build().await.expect("lazy build");
    let v: String = untrusting.get_or_load("k", &opts, || async { Ok::<_, String>("direct".into()) }).await.expect("degraded");
    assert_eq!(v, "direct");
    assert_eq!(untrusting.metrics().degraded_loads, 1, "{:?}", untrusting.metrics());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
