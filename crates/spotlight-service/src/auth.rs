//! Bearer tokens with roles: who may stream frames, register as a worker, change the task,
//! read it, or call a worker.
//!
//! Servers keep only the SHA-256 of each token they accept (a `tokens.toml` file, written by
//! `spotlight certs`), so the file that grants access does not itself leak a usable token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Secret;

/// Who a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Streams frames to the coordinator.
    Edge,
    /// Registers, renews and drops its own lease.
    Worker,
    /// Changes the task (and may read everything a reader may).
    Operator,
    /// Reads the task, watches it, lists workers and stats.
    Reader,
    /// The coordinator calling a worker's Branches service.
    Coordinator,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Edge,
        Role::Worker,
        Role::Operator,
        Role::Reader,
        Role::Coordinator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does; the one table that says which roles may do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `Inference.Stream`.
    Infer,
    /// `Registry.*`.
    Register,
    /// Changing the task (`Control.SetTask`, `PUT /v1/task`).
    Operate,
    /// Reading: task, watch, workers, model, stats.
    Read,
    /// A worker's `Branches.*`.
    Branches,
}

impl Access {
    /// The roles allowed.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Access::Infer => &[Role::Edge],
            Access::Register => &[Role::Worker],
            Access::Operate => &[Role::Operator],
            Access::Read => &[Role::Reader, Role::Operator],
            Access::Branches => &[Role::Coordinator],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Access::Infer => "stream frames",
            Access::Register => "register workers",
            Access::Operate => "change the task",
            Access::Read => "read the task and the workers",
            Access::Branches => "call a worker",
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, a malformed header, or a token nobody issued (gRPC UNAUTHENTICATED, HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose role may not do this (gRPC PERMISSION_DENIED, HTTP 403).
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            AuthError::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name in the tokens file (never the token).
    pub name: String,
    pub role: Role,
}

/// One line of `tokens.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// A label for logs (e.g. "edge-dev").
    pub name: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// SHA-256 of `token`, lower-case hex.
pub fn token_digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random token for `role` (256 bits from the OS).
pub fn generate_token(role: Role) -> Result<Secret, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(Secret::new(format!("spotlight_{}_{}", role, hex(&bytes))))
}

/// Writes `entries` as a tokens file.
pub fn tokens_toml(entries: &[TokenEntry]) -> String {
    let file = TokensFile {
        token: entries.to_vec(),
    };
    let body = toml::to_string(&file).unwrap_or_default();
    format!(
        "# Bearer tokens this server accepts: SHA-256 of each token and its role.\n\
         # Roles: edge, worker, operator, reader, coordinator. Reloaded when the file changes.\n\n{body}"
    )
}

/// Tokens a server accepts, reloadable from their file.
#[derive(Debug)]
pub struct TokenStore {
    path: Option<PathBuf>,
    state: RwLock<(Vec<TokenEntry>, Option<SystemTime>)>,
}

impl TokenStore {
    /// Reads a tokens file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let (entries, mtime) = read_tokens(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            state: RwLock::new((entries, mtime)),
        })
    }

    /// From entries in memory (tests, `spotlight up`).
    pub fn from_entries(entries: Vec<TokenEntry>) -> Result<Self, String> {
        validate(&entries)?;
        Ok(Self {
            path: None,
            state: RwLock::new((entries, None)),
        })
    }

    /// Re-reads the file if it changed; a bad file keeps the tokens in force.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime == self.read().1 {
            return Ok(false);
        }
        let (entries, mtime) = read_tokens(path)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = (entries, mtime);
        Ok(true)
    }

    /// Checks an `authorization` header value against `access`.
    pub fn authorize(&self, header: Option<&str>, access: Access) -> Result<Principal, AuthError> {
        let needed = access
            .roles()
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(" or ");
        let header = header.ok_or_else(|| {
            AuthError::Unauthenticated(format!(
                "missing credentials: send `authorization: Bearer <token>` with a {needed} token to {}",
                access.describe()
            ))
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "malformed authorization header: expected `Bearer <token>`".into(),
                )
            })?;
        let digest = token_digest(token);
        let state = self.read();
        let entry = state.0.iter().find(|e| e.sha256 == digest).ok_or_else(|| {
            AuthError::Unauthenticated("invalid token: not issued or revoked".into())
        })?;
        if access.roles().contains(&entry.role) {
            Ok(Principal {
                name: entry.name.clone(),
                role: entry.role,
            })
        } else {
            Err(AuthError::PermissionDenied(format!(
                "role {} (token \"{}\") may not {}: needs {needed}",
                entry.role,
                entry.name,
                access.describe()
            )))
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Vec<TokenEntry>, Option<SystemTime>)> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn read_tokens(path: &Path) -> Result<(Vec<TokenEntry>, Option<SystemTime>), String> {
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("tokens file {}: {e}", path.display()))?;
    let file: TokensFile =
        toml::from_str(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
    validate(&file.token).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
    Ok((file.token, mtime))
}

fn validate(entries: &[TokenEntry]) -> Result<(), String> {
    if entries.is_empty() {
        return Err("no [[token]] entries: nobody could call this server".into());
    }
    for e in entries {
        if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "token \"{}\": sha256 must be 64 hex digits (see `spotlight certs`)",
                e.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (TokenStore, Vec<(Role, Secret)>) {
        let tokens: Vec<_> = Role::ALL
            .iter()
            .map(|&r| (r, generate_token(r).unwrap()))
            .collect();
        let entries = tokens
            .iter()
            .map(|(r, t)| TokenEntry {
                name: format!("{r}-test"),
                role: *r,
                sha256: token_digest(t.expose()),
            })
            .collect();
        (TokenStore::from_entries(entries).unwrap(), tokens)
    }

    fn bearer(t: &Secret) -> String {
        format!("Bearer {}", t.expose())
    }

    #[test]
    fn each_access_admits_exactly_its_roles() {
        let (store, tokens) = store();
        for access in [
            Access::Infer,
            Access::Register,
            Access::Operate,
            Access::Read,
            Access::Branches,
        ] {
            for (role, token) in &tokens {
                let result = store.authorize(Some(&bearer(token)), access);
                if access.roles().contains(role) {
                    assert_eq!(result.unwrap().role, *role);
                } else {
                    assert!(
                        matches!(result, Err(AuthError::PermissionDenied(_))),
                        "{role} on {access:?}: {result:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let (store, _) = store();
        for header in [
            None,
            Some("Basic abc"),
            Some("Bearer "),
            Some("Bearer spotlight_edge_0000"),
        ] {
            let e = store.authorize(header, Access::Infer).unwrap_err();
            assert!(
                matches!(e, AuthError::Unauthenticated(_)),
                "{header:?}: {e}"
            );
        }
    }

    #[test]
    fn tokens_file_round_trips_and_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let edge = generate_token(Role::Edge).unwrap();
        let entry = |name: &str, role, t: &Secret| TokenEntry {
            name: name.into(),
            role,
            sha256: token_digest(t.expose()),
        };
        std::fs::write(&path, tokens_toml(&[entry("e", Role::Edge, &edge)])).unwrap();
        let store = TokenStore::load(&path).unwrap();
        assert!(store.authorize(Some(&bearer(&edge)), Access::Infer).is_ok());
        // Revoke the edge token, add an operator: takes effect on reload, no restart.
        let op = generate_token(Role::Operator).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, tokens_toml(&[entry("o", Role::Operator, &op)])).unwrap();
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(t).unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert!(
            store
                .authorize(Some(&bearer(&edge)), Access::Infer)
                .is_err()
        );
        assert!(store.authorize(Some(&bearer(&op)), Access::Operate).is_ok());
        // A broken file is refused and the tokens in force stay.
        std::fs::write(&path, "[[token]]\nname = 1\n").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(t + std::time::Duration::from_secs(1))
            .unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(store.authorize(Some(&bearer(&op)), Access::Operate).is_ok());
    }

    #[test]
    fn empty_or_bad_digests_are_refused() {
        assert!(TokenStore::from_entries(vec![]).is_err());
        let bad = TokenEntry {
            name: "x".into(),
            role: Role::Edge,
            sha256: "abc".into(),
        };
        assert!(TokenStore::from_entries(vec![bad]).is_err());
    }
}
