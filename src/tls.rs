//! The TLS client settings for HTTPS and for MQTT over TLS: rustls with the
//! ring provider and Mozilla's root certificates built in (independent of an
//! old Windows root store and of Windows 7's SChannel), plus a private CA and
//! a client certificate from PEM files named in the config.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;

/// A config key that names a PEM file, with the file it names.
type PemFile<'a> = (&'static str, &'a Path);

/// What is wrong with a TLS file: the config key and the reason.
pub type FileError = (&'static str, String);

/// The CA file for HTTPS (`download.ca_file`), set once at start-up by
/// [`init_https`].
static HTTPS_CA: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The HTTPS client config, built at the first HTTPS request (an agent that
/// fetches over plain HTTP never pages in the TLS code and roots).
static HTTPS: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// The client config every HTTPS request shares: the bundled roots plus
/// `download.ca_file`. A file that cannot be read now (it was checked at
/// start-up) is an error of this request; the next one tries again.
pub fn client_config() -> Result<Arc<ClientConfig>, String> {
    if let Some(config) = HTTPS.get() {
        return Ok(config.clone());
    }
    let ca = HTTPS_CA.get().and_then(Option::as_deref);
    let config = https_with(ca).map_err(|(key, message)| format!("`{key}`: {message}"))?;
    Ok(HTTPS.get_or_init(|| config).clone())
}

/// Sets `download.ca_file` for HTTPS. Called once, before the first
/// download; a later call keeps the first setting.
pub fn init_https(ca: Option<PathBuf>) {
    let _ = HTTPS_CA.set(ca);
}

/// The HTTPS settings with `ca` as `download.ca_file` (the config checks
/// its file with this at start-up).
pub fn https_with(ca: Option<&Path>) -> Result<Arc<ClientConfig>, FileError> {
    build(ca.map(|p| ("download.ca_file", p)), None)
}

/// The MQTT-over-TLS settings from `mqtt.ca_file` and the client
/// certificate and key (`mqtt.client_cert`, `mqtt.client_key`).
pub fn mqtt_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, FileError> {
    let client = client.map(|(cert, key)| (("mqtt.client_cert", cert), ("mqtt.client_key", key)));
    build(ca.map(|p| ("mqtt.ca_file", p)), client)
}

/// A client config: the bundled roots plus the certificates in `ca`, and the
/// client certificate and key of `client` if given.
fn build(
    ca: Option<PemFile>,
    client: Option<(PemFile, PemFile)>,
) -> Result<Arc<ClientConfig>, FileError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some((key, path)) = ca {
        for cert in certificates(key, path)? {
            roots.add(cert).map_err(|e| {
                (
                    key,
                    format!(
                        "{} holds a CA certificate that cannot be used: {e}",
                        path.display()
                    ),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(((cert_key, cert_path), (key_key, key_path))) => {
            let chain = certificates(cert_key, cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                (
                    key_key,
                    format!("no private key read from {}: {e}", key_path.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                (
                    key_key,
                    format!(
                        "{} does not fit the certificate in {}: {e}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file; none at all is an error.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                key,
                format!("cannot read certificates from {}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing or empty file names its key and its path.
    #[test]
    fn missing_or_empty_ca_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("holosync-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let (key, msg) = build(Some(("mqtt.ca_file", &missing)), None).unwrap_err();
        assert_eq!(key, "mqtt.ca_file");
        assert!(msg.contains("missing.pem"), "{msg}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let (key, msg) = build(Some(("download.ca_file", &empty)), None).unwrap_err();
        assert_eq!(key, "download.ca_file");
        assert!(msg.contains("no PEM certificate"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Without files the bundled roots are there.
    #[test]
    fn bundled_roots_load() {
        build(None, None).unwrap();
    }
}
