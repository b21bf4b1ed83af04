//! TLS 1.3 for data connections, authenticated both ways by the nodes' own ed25519 keys as
//! raw public keys (RFC 7250): no certificate, no CA, nothing for an operator to manage.
//!
//! - Cipher suites: TLS 1.3 only, AES-256-GCM first (then AES-128-GCM, ChaCha20-Poly1305 for
//!   hosts without AES instructions), from the aws-lc-rs provider.
//! - The source (client) pins the one key it expects: the offer's target. A proxy with any
//!   other key fails the handshake.
//! - The target (server) takes a client key only if it is a roster member now; which accepted
//!   offer the connection serves is proven next, by the binding (see [`super`]).
//!
//! A node key becomes TLS material by two fixed DER prefixes: the SubjectPublicKeyInfo of an
//! Ed25519 key (RFC 8410) for the raw public key, and a PKCS#8 v1 wrapper for the seed.

use std::sync::Arc;

use drift_protocol::{NodeId, SecretKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use zeroize::Zeroizing;

/// DER of an Ed25519 SubjectPublicKeyInfo up to the key's 32 bytes (RFC 8410 §4).
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER of a PKCS#8 v1 Ed25519 private key up to the seed's 32 bytes (RFC 8410 §7).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The raw public key (SubjectPublicKeyInfo DER) of a node id.
pub fn spki(id: &NodeId) -> Vec<u8> {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(id.as_bytes());
    der
}

/// The node id in a raw public key, if it is an Ed25519 key in exactly that form.
pub fn node_of(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(&SPKI_PREFIX[..])?;
    NodeId::from_bytes(key.try_into().ok()?).ok()
}

/// The TLS provider: aws-lc-rs, TLS 1.3 suites with AES-256-GCM first.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

/// Why TLS material could not be made.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(#[from] Error);

fn certified(key: &SecretKey, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, Error> {
    let mut der = Zeroizing::new(PKCS8_PREFIX.to_vec());
    der.extend_from_slice(&*key.to_bytes());
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()));
    let signing = provider.key_provider.load_private_key(private)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki(&key.public()))],
        signing,
    )))
}

/// Decides which client keys may connect (a roster lookup).
pub type MemberCheck = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// The target's side: takes TLS 1.3 from any client whose raw key `is_member` accepts.
pub fn server_config(
    key: &SecretKey,
    is_member: MemberCheck,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let certified = certified(key, &provider)?;
    let verifier = Arc::new(PeerKeys {
        provider: provider.clone(),
        accept: Accept::Members(is_member),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified),
        ));
    // No resumption: every connection is a full handshake, its client key checked anew
    // (a resumed session would skip the roster check).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// The source's side: TLS 1.3 to a server that must hold exactly `target`'s key.
pub fn client_config(key: &SecretKey, target: NodeId) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let certified = certified(key, &provider)?;
    let verifier = Arc::new(PeerKeys {
        provider: provider.clone(),
        accept: Accept::Exactly(target),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified),
        ));
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The name a client passes to rustls (never sent: raw keys are pinned, no name is checked).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("drift.invalid").expect("a valid DNS name")
}

/// Which peer keys a verifier takes.
enum Accept {
    /// The client side: only the offer's target.
    Exactly(NodeId),
    /// The server side: any roster member.
    Members(MemberCheck),
}

/// Verifies the peer's raw public key (and, in the handshake, its signature with that key).
struct PeerKeys {
    provider: Arc<CryptoProvider>,
    accept: Accept,
}

impl std::fmt::Debug for PeerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.accept {
            Accept::Exactly(id) => write!(f, "PeerKeys(exactly {})", id.short()),
            Accept::Members(_) => f.write_str("PeerKeys(roster members)"),
        }
    }
}

/// An error that names the refused key.
fn refused(why: String) -> Error {
    Error::General(why)
}

impl PeerKeys {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let Some(id) = node_of(cert.as_ref()) else {
            return Err(refused("the peer's key is not an Ed25519 node key".into()));
        };
        match &self.accept {
            Accept::Exactly(expected) if *expected == id => Ok(()),
            Accept::Exactly(expected) => Err(refused(format!(
                "the peer's key {} is not {}, the node this migration goes to",
                id.short(),
                expected.short()
            ))),
            Accept::Members(is_member) if is_member(&id) => Ok(()),
            Accept::Members(_) => Err(refused(format!(
                "key {} is not a roster member",
                id.short()
            ))),
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(refused(format!(
                "handshake signed with {:?}, not Ed25519",
                dss.scheme
            )));
        }
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerKeys {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if !intermediates.is_empty() {
            return Err(refused("a raw key comes alone".into()));
        }
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for PeerKeys {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if !intermediates.is_empty() {
            return Err(refused("a raw key comes alone".into()));
        }
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_keys_round_trip_through_their_raw_public_key() {
        let key = SecretKey::from_bytes(&[3; 32]);
        let der = spki(&key.public());
        assert_eq!(der.len(), 44);
        assert_eq!(node_of(&der), Some(key.public()));
        // Anything else is not a node key.
        assert_eq!(node_of(&der[..43]), None);
        let mut other_alg = der.clone();
        other_alg[8] = 0x71; // Ed448
        assert_eq!(node_of(&other_alg), None);
        let mut longer = der;
        longer.push(0);
        assert_eq!(node_of(&longer), None);
    }

    #[test]
    fn a_node_key_loads_as_a_tls_signing_key() {
        let key = SecretKey::from_bytes(&[4; 32]);
        let provider = provider();
        let certified = certified(&key, &provider).expect("the seed loads");
        assert_eq!(
            certified.key.algorithm(),
            rustls::SignatureAlgorithm::ED25519
        );
        assert!(server_config(&key, Arc::new(|_: &NodeId| true)).is_ok());
        assert!(client_config(&key, key.public()).is_ok());
    }
}
