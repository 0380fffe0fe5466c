//! A development PKI: a CA, a certificate per role, and a bearer token per role. For trying
//! spotlight securely on a laptop or a test cluster; production sites bring their own CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::auth::{Role, TokenEntry, generate_token, token_digest, tokens_toml};
use crate::{Secret, Security, SecurityError};

/// Certificates issued: the servers (coordinator, worker) and the clients that may present a
/// certificate under mutual TLS (edge, operator). Every certificate may serve and connect.
pub const LEAVES: [&str; 4] = ["coordinator", "worker", "edge", "operator"];

/// A certificate and its key, PEM.
pub struct Leaf {
    pub name: &'static str,
    pub cert_pem: String,
    pub key_pem: Secret,
}

/// A development CA with one certificate per [`LEAVES`] entry and one token per role.
pub struct DevPki {
    pub ca_pem: String,
    ca_key_pem: Secret,
    pub leaves: Vec<Leaf>,
    pub tokens: Vec<(Role, Secret)>,
}

impl std::fmt::Debug for DevPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevPki")
            .field(
                "leaves",
                &self.leaves.iter().map(|l| l.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    format!("generating certificates: {e}")
}

impl DevPki {
    /// A new CA and leaves. Server certificates name `localhost`, `127.0.0.1`, `::1`,
    /// `spotlight-<role>` and every entry of `hosts` (DNS names or IP addresses).
    pub fn generate(hosts: &[String]) -> Result<Self, String> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca.distinguished_name
            .push(DnType::CommonName, "spotlight development CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time_now();
        ca.not_before = now - rcgen_days(1);
        ca.not_after = now + rcgen_days(825);
        let ca_key = KeyPair::generate().map_err(err)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let ca_pem = ca_cert.pem();
        let ca_key_pem = Secret::new(ca_key.serialize_pem());
        let issuer = Issuer::new(ca, ca_key);

        let mut leaves = Vec::new();
        for name in LEAVES {
            let mut sans = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
                format!("spotlight-{name}"),
            ];
            sans.extend(hosts.iter().cloned());
            let mut p = CertificateParams::new(sans).map_err(err)?;
            p.distinguished_name
                .push(DnType::CommonName, format!("spotlight {name}"));
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.not_before = now - rcgen_days(1);
            p.not_after = now + rcgen_days(397);
            let key = KeyPair::generate().map_err(err)?;
            let cert = p.signed_by(&key, &issuer).map_err(err)?;
            leaves.push(Leaf {
                name,
                cert_pem: cert.pem(),
                key_pem: Secret::new(key.serialize_pem()),
            });
        }
        let tokens = Role::ALL
            .iter()
            .map(|&r| generate_token(r).map(|t| (r, t)).map_err(err))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ca_pem,
            ca_key_pem,
            leaves,
            tokens,
        })
    }

    pub fn leaf(&self, name: &str) -> &Leaf {
        self.leaves
            .iter()
            .find(|l| l.name == name)
            .unwrap_or(&self.leaves[0])
    }

    pub fn token(&self, role: Role) -> &Secret {
        &self
            .tokens
            .iter()
            .find(|(r, _)| *r == role)
            .unwrap_or(&self.tokens[0])
            .1
    }

    /// The tokens file entries (digests only).
    pub fn token_entries(&self) -> Vec<TokenEntry> {
        self.tokens
            .iter()
            .map(|(role, t)| TokenEntry {
                name: format!("{role}-dev"),
                role: *role,
                sha256: token_digest(t.expose()),
            })
            .collect()
    }

    /// In-memory security for one process of `role` (`spotlight up`, tests): a server
    /// (coordinator, worker) gets its certificate and the tokens; every role gets the CA and
    /// its own token; with `mtls`, servers require and clients present certificates.
    pub fn security(&self, role: Role, mtls: bool) -> Result<Security, SecurityError> {
        let leaf_name = match role {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Edge => "edge",
            Role::Operator | Role::Reader => "operator",
        };
        let leaf = self.leaf(leaf_name);
        let server = matches!(role, Role::Coordinator | Role::Worker);
        Security::from_pem(crate::PemSecurity {
            server: server.then(|| {
                (
                    leaf.cert_pem.as_bytes().to_vec(),
                    leaf.key_pem.expose().as_bytes().to_vec(),
                )
            }),
            ca: self.ca_pem.as_bytes().to_vec(),
            mtls,
            client_identity: mtls.then(|| {
                (
                    leaf.cert_pem.as_bytes().to_vec(),
                    leaf.key_pem.expose().as_bytes().to_vec(),
                )
            }),
            tokens: server.then(|| self.token_entries()),
            token: Some(self.token(role).clone()),
        })
    }

    /// Writes every file into `dir` (keys and tokens readable by the owner only); refuses to
    /// overwrite unless `force`. Returns the paths written.
    pub fn write(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files: Vec<(String, String, bool)> = vec![
            ("ca.pem".into(), self.ca_pem.clone(), false),
            ("ca.key".into(), self.ca_key_pem.expose().to_string(), true),
        ];
        for l in &self.leaves {
            files.push((format!("{}.pem", l.name), l.cert_pem.clone(), false));
            files.push((
                format!("{}.key", l.name),
                l.key_pem.expose().to_string(),
                true,
            ));
        }
        for (role, token) in &self.tokens {
            files.push((
                format!("{role}.token"),
                format!("{}\n", token.expose()),
                true,
            ));
        }
        files.push((
            "tokens.toml".into(),
            tokens_toml(&self.token_entries()),
            false,
        ));
        if !force {
            let existing: Vec<_> = files
                .iter()
                .map(|(n, _, _)| dir.join(n))
                .filter(|p| p.exists())
                .collect();
            if !existing.is_empty() {
                return Err(format!(
                    "{} already exists; pass --force to replace the credentials in {}",
                    existing[0].display(),
                    dir.display()
                ));
            }
        }
        let mut written = Vec::new();
        for (name, body, private) in files {
            let path = dir.join(&name);
            write_file(&path, body.as_bytes(), private)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

fn write_file(path: &Path, body: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = options.open(path)?;
    f.write_all(body)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_once_and_keys_privately() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::generate(&["edge-box.local".into(), "10.1.2.3".into()]).unwrap();
        let files = pki.write(dir.path(), false).unwrap();
        assert_eq!(files.len(), 2 + 2 * LEAVES.len() + Role::ALL.len() + 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "ca.key must not be group/world readable");
        }
        let err = pki.write(dir.path(), false).unwrap_err();
        assert!(err.contains("--force"), "{err}");
        pki.write(dir.path(), true).unwrap();
        // The tokens file grants each role its token and holds no token itself.
        let tokens = std::fs::read_to_string(dir.path().join("tokens.toml")).unwrap();
        for (_, t) in &pki.tokens {
            assert!(!tokens.contains(t.expose()));
        }
        let store = crate::auth::TokenStore::load(&dir.path().join("tokens.toml")).unwrap();
        let edge = std::fs::read_to_string(dir.path().join("edge.token")).unwrap();
        let p = store
            .authorize(
                Some(&format!("Bearer {}", edge.trim())),
                crate::Access::Infer,
            )
            .unwrap();
        assert_eq!(p.role, Role::Edge);
        assert!(!format!("{pki:?}").contains("PRIVATE"));
    }
}
