//! `shardmq passwd FILE USER`: adds or changes a user in a Mosquitto-format password file, writing the
//! `$7$` (PBKDF2-SHA512, 101 iterations, 12-byte salt) entries Mosquitto 2's `mosquitto_passwd` writes,
//! so either tool can manage a file the other reads.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shardmq_shard::auth::passwd::{PasswordHash, DEFAULT_ITERATIONS, SALT_LEN};
use shardmq_shard::auth::PasswordFile;

/// add or change a user in a password file (Mosquitto's format, created if missing); the password is
/// asked twice on a terminal, read from the first line of standard input otherwise, or given with -b
#[derive(argh::FromArgs, Debug)]
#[argh(subcommand, name = "passwd")]
pub struct Passwd {
    /// the password file
    #[argh(positional)]
    file: PathBuf,
    /// the user name
    #[argh(positional)]
    user: String,
    /// the password, on the command line (visible to other local users in the process list)
    #[argh(option, short = 'b')]
    batch: Option<String>,
}

pub fn run(args: &Passwd) -> Result<()> {
    if args.user.is_empty() || args.user.contains(':') {
        bail!("the user name must be non-empty and without ':'");
    }
    let password = match &args.batch {
        Some(p) => p.clone(),
        None => read_password()?,
    };
    let existing = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.file.display())),
    };
    // Refuse to rewrite a file this broker would not start with.
    PasswordFile::parse(&existing).map_err(|e| anyhow::anyhow!("{}", e.in_file(&args.file)))?;
    let hash = PasswordHash::pbkdf2(password.as_bytes(), salt()?, DEFAULT_ITERATIONS);
    let text = with_user(&existing, &args.user, &hash.encode());
    write_private(&args.file, &text)
}

/// `existing` with `user`'s line replaced (or appended); other lines, comments included, kept as they are.
fn with_user(existing: &str, user: &str, hash: &str) -> String {
    let entry = format!("{user}:{hash}");
    let mut out = String::with_capacity(existing.len() + entry.len() + 1);
    let mut found = false;
    for line in existing.lines() {
        if line.split_once(':').is_some_and(|(u, _)| u == user) && !line.starts_with('#') {
            if !found {
                out.push_str(&entry);
                out.push('\n');
            }
            found = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&entry);
        out.push('\n');
    }
    out
}

fn salt() -> Result<[u8; SALT_LEN]> {
    let mut salt = [0; SALT_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .context("reading /dev/urandom")?;
    Ok(salt)
}

/// Written next to the file and renamed over it, readable by its owner only: a crash leaves the old file.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-shardmq");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn read_password() -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).context("reading the password from standard input")?;
        let p = line.trim_end_matches(['\n', '\r']).to_string();
        if p.is_empty() {
            bail!("no password on standard input");
        }
        return Ok(p);
    }
    let first = prompt("Password: ")?;
    let second = prompt("Reenter password: ")?;
    if first != second {
        bail!("the passwords do not match");
    }
    if first.is_empty() {
        bail!("empty password");
    }
    Ok(first)
}

/// Reads a line from the terminal on standard input with echo off.
fn prompt(what: &str) -> Result<String> {
    eprint!("{what}");
    // SAFETY: termios calls on fd 0 with a struct we own; the saved settings are restored below.
    let saved = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            bail!("tcgetattr: {}", std::io::Error::last_os_error());
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        libc::tcsetattr(0, libc::TCSANOW, &t);
        saved
    };
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
    eprintln!();
    r.context("reading the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_or_appends_the_user() {
        let f = "# users\nalice:old\nbob:x\n";
        assert_eq!(with_user(f, "alice", "new"), "# users\nalice:new\nbob:x\n");
        assert_eq!(with_user(f, "carol", "h"), "# users\nalice:old\nbob:x\ncarol:h\n");
        assert_eq!(with_user("", "a", "h"), "a:h\n");
        // A prefix of another name is another user.
        assert_eq!(with_user("alice2:x\n", "alice", "h"), "alice2:x\nalice:h\n");
    }
}
