//! Mosquitto's password file: one `user:hash` per line, `#` comments and blank lines ignored. Hashes:
//! `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>` (Mosquitto 2's `mosquitto_passwd`) and
//! `$6$<base64 salt>$<base64 SHA-512(password ‖ salt)>` (older files).

use std::num::NonZeroU32;

use ahash::AHashMap;
use ring::{digest, pbkdf2};

use super::{base64, LineError};

/// What Mosquitto 2 writes: 101 iterations (its default) and a 12-byte salt.
pub const DEFAULT_ITERATIONS: u32 = 101;
pub const SALT_LEN: usize = 12;
const SHA512_LEN: usize = 64;

#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    Pbkdf2Sha512 { iterations: NonZeroU32, salt: Vec<u8>, hash: Vec<u8> },
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl PasswordHash {
    /// A `$7$` entry for `password` with the given salt.
    pub fn pbkdf2(password: &[u8], salt: [u8; SALT_LEN], iterations: u32) -> PasswordHash {
        let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        let mut hash = vec![0; SHA512_LEN];
        pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, iterations, &salt, password, &mut hash);
        PasswordHash::Pbkdf2Sha512 { iterations, salt: salt.to_vec(), hash }
    }

    /// Parses the part after `user:`.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        let b64 =
            |part: &str, what: &str| base64::decode(part).ok_or_else(|| format!("{what} is not base64"));
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<NonZeroU32>()
                    .map_err(|_| format!("bad iteration count {iterations:?}"))?;
                let (salt, hash) = (b64(salt, "the salt")?, b64(hash, "the hash")?);
                if hash.len() != SHA512_LEN {
                    return Err(format!("the hash has {} bytes, not {SHA512_LEN}", hash.len()));
                }
                Ok(PasswordHash::Pbkdf2Sha512 { iterations, salt, hash })
            }
            ["", "6", salt, hash] => {
                let (salt, hash) = (b64(salt, "the salt")?, b64(hash, "the hash")?);
                if hash.len() != SHA512_LEN {
                    return Err(format!("the hash has {} bytes, not {SHA512_LEN}", hash.len()));
                }
                Ok(PasswordHash::Sha512 { salt, hash })
            }
            _ => Err("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) password hash".into()),
        }
    }

    pub fn encode(&self) -> String {
        match self {
            PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => {
                format!("$7${iterations}${}${}", base64::encode(salt), base64::encode(hash))
            }
            PasswordHash::Sha512 { salt, hash } => {
                format!("$6${}${}", base64::encode(salt), base64::encode(hash))
            }
        }
    }

    /// Constant time in the password's correctness (not in its length).
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => {
                pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, *iterations, salt, password, hash).is_ok()
            }
            PasswordHash::Sha512 { salt, hash } => {
                let mut ctx = digest::Context::new(&digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                let d = ctx.finish();
                d.as_ref().len() == hash.len()
                    && d.as_ref().iter().zip(hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
        }
    }
}

/// The users of a password file.
#[derive(Default)]
pub struct PasswordFile {
    users: AHashMap<Box<str>, PasswordHash>,
}

impl PasswordFile {
    pub fn parse(text: &str) -> Result<PasswordFile, LineError> {
        let mut users = AHashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches(['\r', ' ', '\t']);
            if line.trim_start().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(LineError::new(i + 1, "expected user:hash"));
            };
            if user.is_empty() {
                return Err(LineError::new(i + 1, "empty user name"));
            }
            let hash = PasswordHash::parse(hash).map_err(|e| LineError::new(i + 1, e))?;
            users.insert(user.into(), hash);
        }
        Ok(PasswordFile { users })
    }

    pub fn get(&self, user: &str) -> Option<&PasswordHash> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by Debian's `mosquitto_passwd -c -b pw alice secret` (Mosquitto 2).
    const DEBIAN: &str = "alice:$7$101$GXkJm6KjSBYa7riP$I73+N+pQX5oiMugtl2CP+seGQi7/Yhy1VC99sCLgL2qdgHVpJzQ3\
                          ao86FegyXkQBqbJ2xpAAD56Uuw6cJ8gApg==\n";

    #[test]
    fn verifies_a_mosquitto_passwd_entry() {
        let f = PasswordFile::parse(DEBIAN).unwrap();
        let h = f.get("alice").unwrap();
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"secreT"));
        assert!(!h.verify(b""));
        assert!(f.get("bob").is_none());
        // Encoding gives back the same text.
        assert_eq!(format!("alice:{}\n", h.encode()), DEBIAN);
    }

    #[test]
    fn old_sha512_entries() {
        let salt = b"0123456789ab";
        let mut ctx = digest::Context::new(&digest::SHA512);
        ctx.update(b"pw");
        ctx.update(salt);
        let line = format!("u:$6${}${}", base64::encode(salt), base64::encode(ctx.finish().as_ref()));
        let f = PasswordFile::parse(&line).unwrap();
        assert!(f.get("u").unwrap().verify(b"pw"));
        assert!(!f.get("u").unwrap().verify(b"pX"));
    }

    #[test]
    fn generated_entries_round_trip() {
        let h = PasswordHash::pbkdf2(b"p4ss", [1; SALT_LEN], DEFAULT_ITERATIONS);
        let back = PasswordHash::parse(&h.encode()).unwrap();
        assert!(back == h && back.verify(b"p4ss") && !back.verify(b"p4sS"));
        assert!(h.encode().starts_with("$7$101$AQEBAQEBAQEBAQEB$"));
    }

    #[test]
    fn malformed_lines_are_numbered() {
        for (text, line) in [
            ("a:$7$101$AAAA$AAAA\n", 1),
            ("# c\n\nnocolon\n", 3),
            ("a:$7$0$AAAA$AAAA", 1),
            ("ok:$6$AAAA$!!\n", 1),
            (":$6$AAAA$AAAA\n", 1),
            ("a:plain\n", 1),
        ] {
            let e = PasswordFile::parse(text).err().unwrap_or_else(|| panic!("accepted {text:?}"));
            assert_eq!(e.line, line, "{text:?}: {e:?}");
        }
        assert!(PasswordFile::parse("# only a comment\n\n").unwrap().is_empty());
    }
}
