//! TLS and QUIC endpoint configuration shared by clients and nodes.
//!
//! Every billcl link is QUIC over TLS 1.3 (rustls with the ring provider), ALPN `billcl/1`,
//! trusting only the cluster CA. Servers present a chain issued by that CA for the name
//! `billcl`; with mTLS they also require a client certificate issued by it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use billcl_proto::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::Error;

/// Requests in flight on one connection: the client's semaphore and the server's limit of
/// concurrent bidirectional streams.
pub const IN_FLIGHT_MAX: usize = 1024;
/// How often an idle connection is pinged so that NATs and the idle timeout keep it open.
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 5_000;
/// A connection with no traffic (keep-alives included) for this long is closed.
pub const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Kernel buffer asked for each direction of an endpoint's UDP socket (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). A connection carrying batches sends bursts of
/// datagrams; the default buffer (about 200 KiB) overflowed under load, and every datagram
/// dropped there costs QUIC a loss-detection delay (the 0.5-1 s maxima of early benches).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A client certificate chain and key (PEM) for mutual TLS.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    /// The certificate, then any intermediate certificates, as PEM.
    pub cert_chain_pem: String,
    /// The certificate's private key, as PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

/// Whether a server asks connecting clients for a certificate.
#[derive(Clone, Copy, Debug)]
pub enum ClientAuth<'a> {
    /// No client certificate is asked for.
    None,
    /// A client certificate issued by this CA (PEM) is required.
    Required {
        /// The CA that must have issued the client's certificate (PEM).
        ca_pem: &'a str,
    },
    /// A client certificate is verified against this CA if presented, but not required.
    Optional {
        /// The CA a presented client certificate must be issued by (PEM).
        ca_pem: &'a str,
    },
}

fn tls_error(what: &str) -> impl FnOnce(rustls::Error) -> Error + '_ {
    move |error| Error::Tls(format!("{what}: {error}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::Tls(format!("{what} is not valid PEM: {error}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{what} holds no CERTIFICATE block")));
    }
    Ok(certs)
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| Error::Tls(format!("the private key is not valid PEM: {error}")))
}

fn roots(ca_pem: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, "the cluster CA")? {
        roots
            .add(cert)
            .map_err(tls_error("the cluster CA certificate"))?;
    }
    Ok(roots)
}

/// Ack-eliciting packets a peer may receive before it must acknowledge (QUIC ACK frequency
/// extension; the default, 1, acknowledges every other packet): request-response traffic then
/// sends far fewer ACK-only packets, each a system call and a wake-up on both ends.
const ACK_ELICITING_THRESHOLD: u32 = 8;
/// How long a peer may hold back an acknowledgement below the threshold.
const ACK_DELAY_MS: u64 = 5;

/// Transport limits of every billcl connection: the SDK's keep-alive and idle timeout.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    transport_config_with(
        Duration::from_millis(KEEP_ALIVE_INTERVAL_MS),
        Duration::from_millis(u64::from(IDLE_TIMEOUT_MS)),
    )
}

/// The transport limits of [`transport_config`] (streams in flight, acknowledgement frequency)
/// with another keep-alive interval and idle timeout: nodes' links to each other notice a
/// dead peer sooner than the SDK does.
pub fn transport_config_with(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(IN_FLIGHT_MAX as u32));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.keep_alive_interval(Some(keep_alive));
    // Past QUIC's largest (2^62 ms), as good as none.
    let idle_timeout = quinn::IdleTimeout::try_from(idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::MAX));
    transport.max_idle_timeout(Some(idle_timeout));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(Duration::from_millis(ACK_DELAY_MS)));
    transport.ack_frequency_config(Some(acks));
    Arc::new(transport)
}

/// Client-side QUIC configuration: TLS 1.3, ALPN `billcl/1`, trusting only the cluster CA,
/// presenting `identity` if given. Nodes set it on their server endpoint to dial peers.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&TlsIdentity>,
) -> Result<quinn::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("TLS 1.3 setup"))?
        .with_root_certificates(roots(ca_pem)?);
    let mut crypto = match identity {
        Some(identity) => builder
            .with_client_auth_cert(
                parse_certs(&identity.cert_chain_pem, "the client certificate chain")?,
                parse_key(&identity.key_pem)?,
            )
            .map_err(tls_error("the client certificate"))?,
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(crypto)
        .map_err(|error| Error::Tls(format!("QUIC needs TLS 1.3: {error}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// Server-side QUIC configuration: TLS 1.3, ALPN `billcl/1`, the certificate chain and key
/// (PEM), and the client-certificate policy.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth<'_>,
) -> Result<quinn::ServerConfig, Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error("TLS 1.3 setup"))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required { ca_pem } | ClientAuth::Optional { ca_pem } => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider());
            let verifier = match client_auth {
                ClientAuth::Optional { .. } => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|error| Error::Tls(format!("client certificate verifier: {error}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut crypto = builder
        .with_single_cert(
            parse_certs(cert_chain_pem, "the server certificate chain")?,
            parse_key(key_pem)?,
        )
        .map_err(tls_error("the server certificate"))?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(crypto)
        .map_err(|error| Error::Tls(format!("QUIC needs TLS 1.3: {error}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// A client-side endpoint bound to `bind` (e.g. `0.0.0.0:0`) that dials with
/// [`client_config`]. Must be called inside a tokio runtime.
pub fn client_endpoint(
    ca_pem: &str,
    identity: Option<&TlsIdentity>,
    bind: SocketAddr,
) -> Result<quinn::Endpoint, Error> {
    let config = client_config(ca_pem, identity)?;
    let mut endpoint = endpoint(bind, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// An endpoint on a UDP socket bound to `bind` with [`UDP_BUFFER_BYTES`] buffers.
fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, Error> {
    let cannot_bind =
        |error: std::io::Error| Error::Transport(format!("cannot bind UDP {bind}: {error}"));
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(cannot_bind)?;
    // Best effort: a kernel that grants less is no reason not to serve.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&bind.into()).map_err(cannot_bind)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(cannot_bind)
}

/// A server endpoint on `bind` presenting the certificate chain and key (PEM); with
/// `client_ca_pem`, clients must present a certificate issued by that CA (mTLS). Must be
/// called inside a tokio runtime. To dial peers from the same endpoint, set
/// [`client_config`] on it.
pub fn server_endpoint(
    bind: SocketAddr,
    cert_chain_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Result<quinn::Endpoint, Error> {
    let client_auth = match client_ca_pem {
        Some(ca_pem) => ClientAuth::Required { ca_pem },
        None => ClientAuth::None,
    };
    server_endpoint_with(bind, cert_chain_pem, key_pem, client_auth)
}

/// [`server_endpoint`] with an explicit client-certificate policy.
pub fn server_endpoint_with(
    bind: SocketAddr,
    cert_chain_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth<'_>,
) -> Result<quinn::Endpoint, Error> {
    let config = server_config(cert_chain_pem, key_pem, client_auth)?;
    endpoint(bind, Some(config))
}
