//! The cluster's TLS material: a cluster CA generated on first start (like `tt`'s
//! instance init), one certificate per instance and one for clients (the CLI), all
//! signed by that CA. Every QUIC link verifies its peer against the CA in both
//! directions (mTLS), so only holders of a cluster certificate can talk to a node.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use billcl_client::TlsIdentity;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::config::ClusterConfig;

/// The DNS name in every node certificate; clients connect with this server name.
pub const SERVER_NAME: &str = "billcl";
/// The identity the CLI and local SDK programs present.
pub const CLIENT_IDENTITY: &str = "client";

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

fn ca_params(cluster_name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{cluster_name} cluster CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, cluster_name.to_string());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn cert_path(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Create the CA (once) and a certificate for every instance and for clients, for
/// those that do not have one yet. Idempotent.
pub fn ensure(config: &ClusterConfig) -> Result<()> {
    let dir = config.tls_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let params = ca_params(&config.cluster.name)?;
    let ca_key = if ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_key_path)?;
        KeyPair::from_pem(&pem).context("the cluster CA key is unreadable")?
    } else {
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        std::fs::write(&ca_cert_path, cert.pem())?;
        key
    };
    let issuer = Issuer::new(params, ca_key);
    let mut names: Vec<String> = config.instances().into_iter().map(|i| i.name).collect();
    names.push(CLIENT_IDENTITY.to_string());
    for name in names {
        let (cert_file, key_file) = cert_path(&dir, &name);
        if cert_file.exists() && key_file.exists() {
            continue;
        }
        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.clone());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&key_file, &key.serialize_pem())?;
        std::fs::write(&cert_file, cert.pem())?;
    }
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// The cluster CA certificate (PEM).
pub fn ca_pem(config: &ClusterConfig) -> Result<String> {
    let path = config.tls_dir().join(CA_CERT_FILE);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no cluster CA at {}: run `billcl start` once to create the cluster's TLS material",
            path.display()
        )
    })
}

/// The certificate and key of an instance, or of `client`.
pub fn identity(config: &ClusterConfig, name: &str) -> Result<TlsIdentity> {
    let (cert_file, key_file) = cert_path(&config.tls_dir(), name);
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| {
            format!(
                "no TLS certificate for {name} at {}: run `billcl start` to create it",
                path.display()
            )
        })
    };
    Ok(TlsIdentity {
        cert_chain_pem: read(&cert_file)?,
        key_pem: read(&key_file)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_a_ca_and_certificates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(
            &path,
            r#"
            [cluster]
            [routers.r1]
            address = "127.0.0.1:1"
            [replicasets.s.instances.s1]
            address = "127.0.0.1:2"
            "#,
        )
        .unwrap();
        let config = ClusterConfig::load(&path).unwrap();
        ensure(&config).unwrap();
        let ca = ca_pem(&config).unwrap();
        let first = identity(&config, "s1").unwrap();
        ensure(&config).unwrap();
        assert_eq!(ca, ca_pem(&config).unwrap());
        assert_eq!(
            first.cert_chain_pem,
            identity(&config, "s1").unwrap().cert_chain_pem
        );
        assert!(identity(&config, CLIENT_IDENTITY).is_ok());
        assert!(identity(&config, "nobody").is_err());
    }
}
