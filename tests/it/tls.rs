//! TLS to Postgres (`database.sslmode`, `database.ssl_root_cert`) against private clusters: one
//! serving a certificate for `localhost` issued by a test CA, one without TLS. Each test has
//! its own cluster, so nothing here touches the shared dev cluster's settings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use membersync::config::{DatabaseConfig, PgSslMode};
use membersync::db::{self, Login};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::support::{self, cluster::TempCluster, daemon::Daemon, repo_root, wait_for};

/// A private cluster with `ssl = on` and a server certificate for `localhost` only.
struct TlsServer {
    cluster: TempCluster,
    /// The CA that issued the server certificate.
    ca: PathBuf,
    /// A CA that issued nothing the server has.
    other_ca: PathBuf,
    _files: tempfile::TempDir,
}

fn test_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl TlsServer {
    fn start(settings: &[&str]) -> TlsServer {
        let files = tempfile::Builder::new()
            .prefix("membersync-tls-")
            .tempdir()
            .unwrap();
        // The server runs as another user (support::cluster): it must reach the directory.
        let _ = Command::new("chmod").arg("755").arg(files.path()).status();
        let ca = test_ca("membersync test CA");
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let path = |name: &str| files.path().join(name);
        std::fs::write(path("ca.pem"), ca.pem()).unwrap();
        std::fs::write(path("other-ca.pem"), test_ca("someone else").pem()).unwrap();
        std::fs::write(path("server.crt"), server_cert.pem()).unwrap();
        std::fs::write(path("server.key"), server_key.serialize_pem()).unwrap();
        // Postgres refuses a key file others can read, or one it does not own.
        let _ = Command::new("chmod")
            .arg("600")
            .arg(path("server.key"))
            .status();
        if running_as_root() {
            let status = Command::new("chown")
                .arg("membersync-dev")
                .arg(path("server.key"))
                .status()
                .unwrap();
            assert!(status.success(), "chown of the server key");
        }
        let mut conf = vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", path("server.crt").display()),
            format!("ssl_key_file = '{}'", path("server.key").display()),
        ];
        conf.extend(settings.iter().map(|s| (*s).to_owned()));
        let conf: Vec<&str> = conf.iter().map(String::as_str).collect();
        TlsServer {
            cluster: TempCluster::start(&conf),
            ca: path("ca.pem"),
            other_ca: path("other-ca.pem"),
            _files: files,
        }
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The superuser of a private cluster (trust auth on loopback), reached as `host`.
fn settings(port: u16, host: &str, sslmode: PgSslMode, root: Option<&Path>) -> DatabaseConfig {
    DatabaseConfig {
        host: host.to_owned(),
        port,
        dbname: "postgres".into(),
        user: "postgres".into(),
        admin_user: "postgres".into(),
        connect_timeout_secs: 5,
        sslmode,
        ssl_root_cert: root.map(Path::to_owned),
        ..DatabaseConfig::default()
    }
}

/// Whether the connection `cfg` opens is encrypted, as the server sees it.
async fn encrypted(cfg: &DatabaseConfig) -> Result<bool, String> {
    let client = db::connect(cfg, Login::Admin)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_sslmode_connects_as_libpq_would_to_a_tls_server() {
    let server = TlsServer::start(&[]);
    let port = server.cluster.port;
    let ca = Some(server.ca.as_path());
    for (mode, host, root) in [
        (PgSslMode::VerifyFull, "localhost", ca),
        // verify-ca checks the chain only: the certificate names `localhost`, not the address.
        (PgSslMode::VerifyCa, "127.0.0.1", ca),
        (PgSslMode::Require, "127.0.0.1", None),
        (PgSslMode::Prefer, "127.0.0.1", None),
    ] {
        let got = encrypted(&settings(port, host, mode, root)).await;
        assert_eq!(got, Ok(true), "{mode:?} to {host}");
    }
    let plain = encrypted(&settings(port, "127.0.0.1", PgSslMode::Disable, None)).await;
    assert_eq!(plain, Ok(false), "disable");
}

#[tokio::test(flavor = "multi_thread")]
async fn verifying_modes_refuse_an_untrusted_or_misnamed_certificate() {
    let server = TlsServer::start(&[]);
    let port = server.cluster.port;
    let cases = [
        // Issued by a CA we were not told to trust.
        (
            PgSslMode::VerifyFull,
            "localhost",
            Some(server.other_ca.as_path()),
            "UnknownIssuer",
        ),
        (
            PgSslMode::VerifyCa,
            "localhost",
            Some(server.other_ca.as_path()),
            "UnknownIssuer",
        ),
        // The Mozilla roots do not include the test CA either.
        (PgSslMode::VerifyFull, "localhost", None, "UnknownIssuer"),
        // Trusted, but issued for another name.
        (
            PgSslMode::VerifyFull,
            "127.0.0.1",
            Some(server.ca.as_path()),
            "not valid for name",
        ),
    ];
    for (mode, host, root, why) in cases {
        let err = encrypted(&settings(port, host, mode, root))
            .await
            .expect_err(&format!("{mode:?} to {host} with {root:?} must fail"));
        assert!(
            err.contains("cannot connect to Postgres") && err.contains(why),
            "{mode:?} to {host}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn require_refuses_a_server_without_tls_and_prefer_falls_back_to_plaintext() {
    let plain = TempCluster::start(&[]);
    let err = encrypted(&settings(plain.port, "127.0.0.1", PgSslMode::Require, None))
        .await
        .expect_err("require against a server without TLS");
    assert!(err.contains("cannot connect to Postgres"), "{err}");
    let prefer = encrypted(&settings(plain.port, "127.0.0.1", PgSslMode::Prefer, None)).await;
    assert_eq!(prefer, Ok(false));
}

/// The whole daemon over TLS: `migrate` and `cdc` with verify-full, the replication connection
/// encrypted as the server sees it, and a row change arriving in Kafka.
#[tokio::test(flavor = "multi_thread")]
async fn cdc_streams_over_a_verified_tls_connection() {
    let server = TlsServer::start(&["wal_level = logical", "max_wal_senders = 4"]);
    let port = server.cluster.port;
    let admin = server.cluster.connect().await;
    let bootstrap =
        std::fs::read_to_string(repo_root().join("scripts/supabase-bootstrap.sql")).unwrap();
    admin.batch_execute(&bootstrap).await.expect("bootstrap");

    let kafka = support::kafka::config();
    let slot = support::unique_name("tls");
    let env: Vec<(String, String)> = [
        ("MEMBERSYNC__DATABASE__HOST", "localhost".to_owned()),
        ("MEMBERSYNC__DATABASE__PORT", port.to_string()),
        ("MEMBERSYNC__DATABASE__DBNAME", "postgres".to_owned()),
        ("MEMBERSYNC__DATABASE__SSLMODE", "verify-full".to_owned()),
        (
            "MEMBERSYNC__DATABASE__SSL_ROOT_CERT",
            server.ca.display().to_string(),
        ),
        ("MEMBERSYNC__KAFKA__BROKERS", kafka.brokers.clone()),
        (
            "MEMBERSYNC__KAFKA__TOPIC_PREFIX",
            kafka.topic_prefix.clone(),
        ),
        ("MEMBERSYNC__KAFKA__TOPIC_PARTITIONS", "1".to_owned()),
        ("MEMBERSYNC__CDC__SLOT", slot.clone()),
        (
            "MEMBERSYNC__CDC__TABLES",
            r#"["public.members","public.tls_t"]"#.to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let migrated = support::membersync()
        .arg("migrate")
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "migrate over TLS: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    admin
        .batch_execute(
            "create table public.tls_t (id int primary key, memberstack_id text not null);
             grant select on public.tls_t to membersync;
             alter publication membersync add table public.tls_t;",
        )
        .await
        .unwrap();

    let _daemon = Daemon::start("cdc", env).await;
    let replication_ssl = wait_for(
        "the CDC replication connection",
        Duration::from_secs(30),
        || {
            let admin = &admin;
            async move {
                admin
                    .query_opt(
                        "select s.ssl from pg_stat_replication r join pg_stat_ssl s using (pid)",
                        &[],
                    )
                    .await
                    .unwrap()
                    .map(|row| row.get::<_, bool>(0))
            }
        },
    )
    .await;
    assert!(
        replication_ssl,
        "the replication connection is not encrypted"
    );

    admin
        .batch_execute("insert into public.tls_t values (1, 'mem_tls')")
        .await
        .unwrap();
    let topic = format!("{}.cdc.public.tls_t", kafka.topic_prefix);
    let records = support::kafka::consume(&kafka, &topic, 1, Duration::from_secs(60)).await;
    let event: serde_json::Value =
        serde_json::from_slice(rdkafka::Message::payload(&records[0]).unwrap()).unwrap();
    assert_eq!(event["after"]["memberstack_id"], "mem_tls", "{event}");
}

/// Without `database.sslmode`, the loader chooses: a CA given (or a host off loopback) means
/// verify-full, so an untrusted certificate is refused — and `check` says which CA to give.
#[tokio::test(flavor = "multi_thread")]
async fn unset_sslmode_with_a_ca_verifies_and_check_explains_a_refusal() {
    let server = TlsServer::start(&[]);
    let port = server.cluster.port;
    let load = |ca: &Path| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            format!(
                "[database]\nhost = \"localhost\"\nport = {port}\nuser = \"postgres\"\n\
                 admin_user = \"postgres\"\nconnect_timeout_secs = 5\nssl_root_cert = {:?}\n",
                ca.display().to_string()
            ),
        )
        .unwrap();
        membersync::config::load_from(Some(file.path()), "MEMBERSYNC_TLS_TEST_UNSET__")
            .unwrap()
            .database
    };
    let trusted = load(&server.ca);
    assert_eq!(trusted.sslmode, PgSslMode::VerifyFull);
    assert_eq!(encrypted(&trusted).await, Ok(true));
    let untrusted = load(&server.other_ca);
    let err = encrypted(&untrusted).await.expect_err("an untrusted CA");
    assert!(err.contains("UnknownIssuer"), "{err}");

    let out = support::membersync()
        .arg("check")
        .env("MEMBERSYNC__DATABASE__HOST", "localhost")
        .env("MEMBERSYNC__DATABASE__PORT", port.to_string())
        .env("MEMBERSYNC__DATABASE__USER", "postgres")
        .env("MEMBERSYNC__DATABASE__SSL_ROOT_CERT", &server.other_ca)
        .env("MEMBERSYNC__KAFKA__BROKERS", "127.0.0.1:1")
        .env("MEMBERSYNC__KAFKA__REQUEST_TIMEOUT_MS", "500")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("✗ postgres connection"), "{stdout}");
    assert!(
        stdout.contains("not trusted under sslmode verify-full")
            && stdout.contains("database.ssl_root_cert"),
        "{stdout}"
    );
}
