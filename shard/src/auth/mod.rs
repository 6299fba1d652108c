//! Authentication and authorization, in Mosquitto's file formats so that existing files work unchanged:
//! the password file (`passwd`: `user:$7$…` PBKDF2-SHA512 and old `$6$` SHA-512 entries) and the ACL file
//! (`acl`). Parsed once at start-up into an [`Auth`] shared read-only by every shard (no locks on the data
//! path); each connection gets its own [`ClientAcl`] at CONNECT, with `%c`/`%u` already substituted, so the
//! checks on PUBLISH, SUBSCRIBE and delivery only compare topic levels and allocate nothing.

pub mod acl;
pub mod base64;
pub mod guard;
pub mod passwd;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use acl::{Acl, ClientAcl};
pub use passwd::{PasswordFile, PasswordHash};

/// A password or ACL file that cannot be used: the start is refused with the file and line named.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}:{line}: {what}")]
    Parse { file: PathBuf, line: usize, what: String },
}

/// A line of a file that could not be parsed: its 1-based number and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub what: String,
}

impl LineError {
    pub(crate) fn new(line: usize, what: impl Into<String>) -> LineError {
        LineError { line, what: what.into() }
    }

    pub fn in_file(self, file: &Path) -> AuthError {
        AuthError::Parse { file: file.to_path_buf(), line: self.line, what: self.what }
    }
}

/// The node's authentication and authorization settings.
#[derive(Default)]
pub struct Auth {
    /// `None`: any user name is accepted as given (there is nothing to check it against).
    pub passwords: Option<PasswordFile>,
    /// `None`: every client may publish and subscribe to everything.
    pub acl: Option<Acl>,
    /// Clients without a user name are accepted.
    pub allow_anonymous: bool,
}

/// The node's current [`Auth`], replaced when the operator asks for its files to be read again
/// (SIGHUP). Shards compare the generation (one atomic load per event) and take the new settings under
/// the lock only when it changed: the lock is never on the data path.
#[derive(Debug, Default)]
pub struct AuthSlot {
    generation: AtomicU64,
    current: Mutex<Option<Arc<Auth>>>,
}

impl AuthSlot {
    pub fn new(auth: Option<Arc<Auth>>) -> AuthSlot {
        AuthSlot { generation: AtomicU64::new(0), current: Mutex::new(auth) }
    }

    /// Installs new settings; every shard takes them before its next event.
    pub fn replace(&self, auth: Option<Arc<Auth>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = auth;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Option<Arc<Auth>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No user name, and anonymous clients are not allowed (Mosquitto: Not authorized).
    Anonymous,
    /// Unknown user, missing or wrong password (Bad user name or password).
    BadCredentials,
}

impl Auth {
    /// Reads and parses the files named; any error names the file (and line).
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
        allow_anonymous: bool,
    ) -> Result<Auth, AuthError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| AuthError::Read { file: p.to_path_buf(), source })
        };
        let passwords = match password_file {
            Some(p) => Some(PasswordFile::parse(&read(p)?).map_err(|e| e.in_file(p))?),
            None => None,
        };
        let acl = match acl_file {
            Some(p) => Some(Acl::parse(&read(p)?).map_err(|e| e.in_file(p))?),
            None => None,
        };
        Ok(Auth { passwords, acl, allow_anonymous })
    }

    /// Checks a CONNECT's credentials.
    pub fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<(), Refusal> {
        let Some(user) = username else {
            return if self.allow_anonymous { Ok(()) } else { Err(Refusal::Anonymous) };
        };
        let Some(file) = &self.passwords else { return Ok(()) };
        match (file.get(user), password) {
            (Some(hash), Some(pw)) if hash.verify(pw) => Ok(()),
            _ => Err(Refusal::BadCredentials),
        }
    }

    /// The rules that apply to this client, `None` when there is no ACL file (everything allowed).
    pub fn client_acl(&self, client_id: &str, username: Option<&str>) -> Option<Box<ClientAcl>> {
        self.acl.as_ref().map(|a| Box::new(a.for_client(client_id, username)))
    }
}

impl std::fmt::Debug for Auth {
    // Not the password hashes, which would end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.passwords.as_ref().map(PasswordFile::len))
            .field("acl", &self.acl.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(allow_anonymous: bool) -> Auth {
        let pw = PasswordHash::pbkdf2(b"secret", [7; 12], 101).encode();
        Auth {
            passwords: Some(PasswordFile::parse(&format!("alice:{pw}\n")).unwrap()),
            acl: None,
            allow_anonymous,
        }
    }

    #[test]
    fn credentials_are_checked() {
        let a = auth(false);
        assert_eq!(a.authenticate(Some("alice"), Some(b"secret")), Ok(()));
        assert_eq!(a.authenticate(Some("alice"), Some(b"Secret")), Err(Refusal::BadCredentials));
        assert_eq!(a.authenticate(Some("alice"), None), Err(Refusal::BadCredentials));
        assert_eq!(a.authenticate(Some("bob"), Some(b"secret")), Err(Refusal::BadCredentials));
        assert_eq!(a.authenticate(None, None), Err(Refusal::Anonymous));
        // Anonymous allowed does not let a wrong password through.
        let a = auth(true);
        assert_eq!(a.authenticate(None, None), Ok(()));
        assert_eq!(a.authenticate(Some("alice"), Some(b"x")), Err(Refusal::BadCredentials));
    }

    #[test]
    fn load_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "# comment\n\nalice:$7$nonsense\n").unwrap();
        let e = Auth::load(Some(&p), None, false).unwrap_err().to_string();
        assert!(e.contains("pw:3:"), "{e}");
        let a = dir.path().join("acl");
        std::fs::write(&a, "topic read a/#\nfrobnicate x\n").unwrap();
        let e = Auth::load(None, Some(&a), false).unwrap_err().to_string();
        assert!(e.contains("acl:2:"), "{e}");
        let e = Auth::load(Some(&dir.path().join("missing")), None, false).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
