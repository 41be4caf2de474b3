//! TLS for tests: certificates made with `openssl`, and a TLS-only Redis of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{OwnRedis, free_port, temp_dir};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made with
/// the `openssl` command in `dir`.
///
/// # Panics
/// As [`try_certificates`] fails.
pub fn certificates(dir: &Path) {
    try_certificates(dir).unwrap_or_else(|e| panic!("{e}"));
}

/// As [`certificates`], saying what failed (no `openssl`, a refused argument).
///
/// # Errors
/// The sentence to show.
pub fn try_certificates(dir: &Path) -> Result<(), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| {
                format!("TLS needs the openssl command (Debian: apt install openssl): {e}")
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("server.ext", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
    write("client.ext", "extendedKeyUsage=clientAuth\n")?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=eventsource-test-ca",
    ])?;
    for who in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{who}.key"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ])?;
    }
    // A second CA that vouches for nothing here.
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=someone-else",
    ])?;
    Ok(())
}

/// A TLS-only redis-server of the test's own (no plain port) with [`certificates`] in its
/// directory (returned with its port); `auth_clients`: whether it demands a client
/// certificate.
pub fn tls_redis(auth_clients: bool) -> (OwnRedis, PathBuf, u16) {
    let dir = temp_dir("tls");
    certificates(&dir);
    let port = free_port();
    let file = |name: &str| dir.join(name).display().to_string();
    let server = OwnRedis::start(
        port,
        &dir,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.crt"),
            "--tls-auth-clients",
            if auth_clients { "yes" } else { "no" },
        ],
    );
    (server, dir, port)
}
