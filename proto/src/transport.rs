//! The client side of Steward's TLS transport.
//!
//! Tonic's built-in TLS cannot pin a CA by hash or swap client identities, so clients dial
//! through [`connect`], which runs rustls itself and hands tonic an already-encrypted stream.
//! The server side uses tonic's own `ServerTlsConfig` (client certificates optional at the TLS
//! layer, required per call by the services that need them).

use std::sync::Arc;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid control-plane endpoint `{0}`: expected https://HOST:PORT")]
    BadEndpoint(String),
    #[error("invalid PEM in {what}")]
    BadPem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(&'static str),
    #[error("TLS configuration rejected")]
    Tls(#[from] rustls::Error),
    #[error("cannot reach the control plane at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// How the client decides to trust the control plane's server certificate.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// Trust chains to this CA (PEM).
    CaPem(String),
    /// Trust the server only if it presents, in its chain, a CA certificate whose sha256 is
    /// this hex digest, and its leaf chains to that CA. Used before enrollment.
    PinnedCaSha256(String),
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for talking to the control plane.
pub fn client_config(
    trust: &ServerTrust,
    identity: Option<&ClientIdentity>,
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder =
        match trust {
            ServerTrust::CaPem(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in parse_certs(pem, "the CA certificate")? {
                    roots.add(cert)?;
                }
                builder.with_root_certificates(roots)
            }
            ServerTrust::PinnedCaSha256(hash) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                    pin: hash.to_ascii_lowercase(),
                    provider,
                })),
        };
    let mut config = match identity {
        Some(id) => {
            let chain = parse_certs(&id.certificate_pem, "the client certificate")?;
            let key =
                PrivateKeyDer::from_pem_slice(id.private_key_pem.as_bytes()).map_err(|source| {
                    TransportError::BadPem {
                        what: "the client private key",
                        source,
                    }
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Parses every certificate in a PEM bundle.
pub fn parse_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TransportError::BadPem { what, source })?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate(what));
    }
    Ok(certs)
}

/// Bytes read from the socket at once under TLS. rustls asks for at most one TLS record
/// (about 16 KiB) per read, so without a buffer below it an artifact download made some
/// 17,000 `recvfrom` calls per 253 MB; with it the agent's CPU per pull fell by about a tenth
/// (`docs/BENCHMARKS.md`), more than the extra copy out of this buffer costs.
const TLS_READ_BUFFER: usize = 256 << 10;

/// HTTP/2 receive windows of a client's channel: how much the server may send ahead, per
/// stream and in all, before the client has read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Windows {
    /// The largest stream window `per_stream` accepts: the connection gets twice the stream's,
    /// and HTTP/2 caps a window below 2 GiB.
    pub const MAX_STREAM: u32 = 1023 << 20;

    /// `stream` bytes per stream and twice that for the connection (`stream` is capped at
    /// [`Self::MAX_STREAM`]).
    pub fn per_stream(stream: u32) -> Self {
        let stream = stream.min(Self::MAX_STREAM);
        Self {
            stream,
            connection: stream * 2,
        }
    }
}

/// Large enough that a download (an agent's artifact pull) is not throttled to 64 KiB per
/// round trip: 2 MiB per round trip is 2 GB/s at 1 ms, 200 MB/s at 10 ms, but only 40 MB/s
/// at 50 ms (agents on such links raise it with `--pull-window-mib`). Not larger by default,
/// because whatever the window lets the control plane send ahead waits in the agent's
/// buffers: with 8 and 16 MiB, ten agents pulling at once on one host held that much each in
/// freshly faulted memory, and took about 10% longer and a fifth more agent CPU than with
/// these (`docs/BENCHMARKS.md`).
impl Default for Windows {
    fn default() -> Self {
        Self::per_stream(2 << 20)
    }
}

/// Opens a gRPC channel to `endpoint` (`https://host:port`) over rustls with `config`.
///
/// The channel connects eagerly so that a wrong endpoint or a failed handshake is reported
/// here, with the cause, rather than on the first call.
pub async fn connect(
    endpoint: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, TransportError> {
    connect_with_windows(endpoint, config, Windows::default()).await
}

/// [`connect`] with the given HTTP/2 receive windows.
pub async fn connect_with_windows(
    endpoint: &str,
    config: Arc<rustls::ClientConfig>,
    windows: Windows,
) -> Result<Channel, TransportError> {
    let (plain, host) = plain_uri(endpoint)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| TransportError::BadEndpoint(endpoint.to_owned()))?;
    let connector = tower::service_fn(move |uri: Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        async move {
            let authority = uri
                .authority()
                .ok_or_else(|| std::io::Error::other("endpoint has no host"))?
                .as_str()
                .to_owned();
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let tcp = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(plain)
        .map_err(|_| TransportError::BadEndpoint(endpoint.to_owned()))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .initial_stream_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_frame_size(256 << 10)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|source| TransportError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

/// Tonic refuses `https://` URIs unless its own TLS is configured, so the channel is given an
/// `http://` URI and our connector does the TLS. Returns that URI and the TLS server name.
fn plain_uri(endpoint: &str) -> Result<(String, String), TransportError> {
    let bad = || TransportError::BadEndpoint(endpoint.to_owned());
    let uri: Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((format!("http://{authority}"), host))
}

/// Accepts the server only if its presented chain includes the pinned CA and its leaf
/// verifies against that CA as the sole root.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::certificate_sha256_hex(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the control plane's CA does not match the CA hash in the enrollment token \
                     (expected sha256 {})",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_endpoints_become_plain_uris_with_a_server_name() {
        assert_eq!(
            plain_uri("https://127.0.0.1:7443").unwrap(),
            ("http://127.0.0.1:7443".to_owned(), "127.0.0.1".to_owned())
        );
        assert_eq!(
            plain_uri("https://cp.example:9").unwrap(),
            ("http://cp.example:9".to_owned(), "cp.example".to_owned())
        );
        assert_eq!(
            plain_uri("https://[::1]:7443").unwrap(),
            ("http://[::1]:7443".to_owned(), "::1".to_owned())
        );
    }

    #[test]
    fn plain_http_endpoints_are_refused() {
        assert!(matches!(
            plain_uri("http://127.0.0.1:7443"),
            Err(TransportError::BadEndpoint(_))
        ));
    }
}
