//! The redis-rs client a configuration describes (URL, TLS files, insecure mode), and the
//! redaction of passwords in URLs for logs and errors.

use super::*;

/// `redis://user:secret@host` → `redis://user:***@host`; URLs without a password unchanged.
/// The workspace's one redactor (`eventsource_core::support::redact_url`): a password holding
/// `/`, `?`, `#` or `@`, percent-encoded or not, never leaks; `redis://secret@host` (a password
/// where the user would be) becomes `redis://***@host`; `pass` / `password` query parameters
/// (Unix socket URLs) are replaced too.
pub fn redact_url(url: &str) -> String {
    eventsource_core::support::redact_url(url)
}

impl RedisEventBusConfig {
    /// The redis-rs client for this configuration: the URL, and for `rediss://` the TLS
    /// options (CA file, client certificate and key, insecure mode).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: an unparsable URL, TLS options without a
    /// `rediss://` URL, a certificate file that cannot be read, a certificate without its key,
    /// or `rediss://` without the `tls` feature.
    pub fn client(&self) -> Result<redis::Client, ConfigError> {
        let tls = self.redis_url.starts_with("rediss://");
        for (field, set) in [
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("tls_cert_file", self.tls_cert_file.is_some()),
            ("tls_key_file", self.tls_key_file.is_some()),
            ("tls_insecure", self.tls_insecure),
        ] {
            if set && !tls {
                return Err(ConfigError::new(
                    field,
                    "applies to TLS only: use a rediss:// URL",
                ));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::new(
                if self.tls_cert_file.is_some() {
                    "tls_key_file"
                } else {
                    "tls_cert_file"
                },
                "a client certificate needs both tls_cert_file and tls_key_file",
            ));
        }
        let unparsable = |e: redis::RedisError| {
            ConfigError::new(
                "redis_url",
                format!("{:?} does not parse: {e}", redact_url(&self.redis_url)),
            )
        };
        if !tls {
            return redis::Client::open(self.redis_url.as_str()).map_err(unparsable);
        }
        #[cfg(not(feature = "tls"))]
        {
            Err(ConfigError::new(
                "redis_url",
                "rediss:// (TLS) needs the `tls` feature of eventsource-redis: \
                 `cargo add eventsource-redis --features tls`",
            ))
        }
        #[cfg(feature = "tls")]
        {
            let mut url = self.redis_url.clone();
            if self.tls_insecure && !url.contains("#insecure") {
                url.push_str("#insecure");
            }
            let read = |field: &'static str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    ConfigError::new(field, format!("cannot read {}: {e}", path.display()))
                })
            };
            if self.tls_ca_file.is_none() && self.tls_cert_file.is_none() {
                return redis::Client::open(url.as_str()).map_err(unparsable);
            }
            let root_cert = match &self.tls_ca_file {
                Some(path) => Some(read("tls_ca_file", path)?),
                None => None,
            };
            let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read("tls_cert_file", cert)?,
                    client_key: read("tls_key_file", key)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(|e| {
                ConfigError::new(
                    if self.tls_cert_file.is_some() {
                        "tls_cert_file"
                    } else {
                        "tls_ca_file"
                    },
                    format!("the TLS files do not load: {e}"),
                )
            })
        }
    }
}
