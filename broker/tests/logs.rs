//! Black-box: the broker's log output, as a supervisor or a log file sees it (stderr not a terminal).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// Starts the broker with stderr on `stderr` (piped when `None`), stops it with SIGTERM and returns what
/// it logged when piped.
fn run_broker(envs: &[(&str, &str)], stderr: Option<OwnedFd>) -> String {
    let piped = stderr.is_none();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1", "--no-pin", "--in-memory", "--log-level", "info"])
        .env_remove("NO_COLOR")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(stderr.map_or_else(Stdio::piped, Stdio::from))
        .spawn()
        .expect("start shardmq");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "startup line {line:?}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    if piped {
        child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    }
    assert!(child.wait().unwrap().success());
    log
}

/// Runs the broker with stderr on a pseudo-terminal and returns what it logged there.
fn run_broker_on_terminal(envs: &[(&str, &str)]) -> String {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors we then own; no name, termios or window size asked for.
    let rc = unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null())
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // Read while the broker runs: a full terminal buffer would block its logging. Our copy of the slave
    // end goes to the child, so reading ends (EIO) once the child exits.
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = (&master).read_to_end(&mut bytes);
        bytes
    });
    run_broker(envs, Some(slave));
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let log = run_broker(&[], None);
    // The startup and shutdown lines at least: an empty log would pass the check below for nothing.
    assert!(log.contains("shutting down"), "log: {log:?}");
    assert!(!log.contains("\x1b["), "ANSI escape codes in a piped log: {log:?}");
}

#[test]
fn colour_on_a_terminal_unless_no_color() {
    let log = run_broker_on_terminal(&[]);
    assert!(log.contains("shutting down"), "log: {log:?}");
    assert!(log.contains("\x1b["), "no colour on a terminal: {log:?}");
    let log = run_broker_on_terminal(&[("NO_COLOR", "1")]);
    assert!(log.contains("shutting down"), "log: {log:?}");
    assert!(!log.contains("\x1b["), "colour despite NO_COLOR: {log:?}");
}
