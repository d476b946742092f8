//! TLS to etcd: CA verification and client certificates.

use std::path::Path;

use coord::etcd::local::{LocalEtcd, LocalTls};
use coord::etcd::{Client, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::support::{CoordProcess, eventually};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// written as PEM files under `dir`.
fn certificates(dir: &Path) -> LocalTls {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &issuer)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let client = CertificateParams::new(vec!["coord-client".to_owned()])
        .expect("params")
        .signed_by(&client_key, &issuer)
        .expect("client cert");
    LocalTls {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server.pem()),
        server_key: write("server-key.pem", server_key.serialize_pem()),
        client_cert: write("client.pem", client.pem()),
        client_key: write("client-key.pem", client_key.serialize_pem()),
    }
}

#[tokio::test]
async fn the_agent_reaches_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let tls = certificates(dir.path());
    let etcd = match LocalEtcd::start_tls(tls.clone()).await {
        Ok(e) => e,
        Err(e) => panic!("cannot start etcd with TLS: {e}"),
    };
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let text = format!(
        "[agent]\nname = \"web-01\"\n[etcd]\nendpoints = [\"{endpoint}\"]\n[etcd.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let _agent = CoordProcess::run(&text);
    let client = etcd.client().await;
    eventually("presence over TLS", || async {
        client.get("/coord/agents/web-01").await.ok().flatten()
    })
    .await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let tls = certificates(dir.path());
    let etcd = match LocalEtcd::start_tls(tls.clone()).await {
        Ok(e) => e,
        Err(e) => panic!("cannot start etcd with TLS: {e}"),
    };
    let mut opts = etcd.connect_options();
    opts.tls = Some(TlsFiles {
        ca: Some(tls.ca.clone()),
        cert: None,
        key: None,
    });
    let client = Client::connect(&opts).await.expect("lazy connect");
    let err = client.get("/x").await.expect_err("no client certificate");
    eprintln!("refused as expected: {err}");
}
