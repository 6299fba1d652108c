//! MQTT over WebSocket (MQTT 5 §6, 3.1.1 §6): the HTTP upgrade and the framing, on tungstenite, without
//! touching a socket: bytes go in and out through an in-memory pipe that reports `WouldBlock` when it
//! has nothing more, which is how tungstenite runs over non-blocking sockets.
//!
//! The rules MQTT adds to RFC 6455: the subprotocol must be `mqtt` (`mqttv3.1` for old 3.1 clients),
//! MQTT travels in binary frames only (a text frame closes the connection), and packets may span frames
//! or share one (the MQTT decoder above sees one byte stream).

use std::io::{self, Read, Write};

use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error, Message, WebSocket};

/// What the operator chose for WebSocket listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// Only upgrades of this path are accepted (`--ws-path`); any path when `None`.
    pub path: Option<Box<str>>,
    /// The largest frame (and message) a client may send: larger ones close the connection (1009).
    pub max_frame_bytes: usize,
}

/// Subprotocols we speak, in our order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// tungstenite's read buffer for an open connection. Its default (128 KiB, allocated up front) would
/// cost more than everything else a connection holds; MQTT packets are small and the buffer grows for a
/// large one.
const READ_BUFFER_BYTES: usize = 4096;

/// In-memory stream between the runtime's bytes and tungstenite.
#[derive(Debug, Default)]
struct Pipe {
    input: Vec<u8>,
    /// Invariant: `pos <= input.len()`.
    pos: usize,
    output: Vec<u8>,
}

impl Pipe {
    fn feed(&mut self, data: &[u8]) {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Everything was consumed: drop the bytes (and, past a small size, the allocation).
    fn settle(&mut self) {
        debug_assert!(self.pos <= self.input.len());
        if self.pos == self.input.len() {
            self.pos = 0;
            if self.input.capacity() > READ_BUFFER_BYTES {
                self.input = Vec::new();
            } else {
                self.input.clear();
            }
        }
    }

    fn take_output(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.output);
        } else {
            out.append(&mut self.output);
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.input[self.pos..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks the upgrade request: the path, and a subprotocol we speak.
#[derive(Debug)]
struct Upgrade {
    path: Option<Box<str>>,
}

fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{why}\n")));
    *r.status_mut() = status;
    r
}

impl Callback for Upgrade {
    fn on_request(self, request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
        if let Some(path) = &self.path {
            if request.uri().path() != &**path {
                return Err(refusal(StatusCode::NOT_FOUND, "no MQTT WebSocket endpoint at this path"));
            }
        }
        let offered: Vec<&str> = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let Some(chosen) = SUBPROTOCOLS.iter().find(|p| offered.contains(p)) else {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "MQTT over WebSocket needs the subprotocol \"mqtt\" (Sec-WebSocket-Protocol)",
            ));
        };
        response.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        Ok(response)
    }
}

type Handshake = MidHandshake<ServerHandshake<Pipe, Upgrade>>;

#[derive(Debug)]
enum State {
    Upgrading(Box<Handshake>),
    Open(Box<WebSocket<Pipe>>),
    /// Failed or closed: nothing more is read or written.
    Done,
}

/// Why a WebSocket connection ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsEnd {
    #[error("WebSocket upgrade refused: {0}")]
    Refused(String),
    #[error("WebSocket: a text frame (MQTT travels in binary frames only)")]
    TextFrame,
    #[error("WebSocket: the client closed")]
    Closed,
    #[error("WebSocket: {0}")]
    Protocol(String),
}

/// The WebSocket state of one connection.
#[derive(Debug)]
pub(crate) struct WsLayer {
    state: State,
}

impl WsLayer {
    pub(crate) fn new(settings: &WsSettings) -> WsLayer {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_frame_size(Some(settings.max_frame_bytes))
            .max_message_size(Some(settings.max_frame_bytes));
        let upgrade = Upgrade { path: settings.path.clone() };
        let mid = ServerHandshake::start(Pipe::default(), upgrade, Some(config));
        WsLayer { state: State::Upgrading(Box::new(mid)) }
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Feeds bytes from the client: appends the MQTT bytes of binary messages to `mqtt` and what must go
    /// back (the upgrade's answer, pongs, a close) to `out`. After an error the connection is to be
    /// closed once `out` is sent.
    pub(crate) fn read(&mut self, data: &[u8], mqtt: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), WsEnd> {
        if let State::Upgrading(mid) = &mut self.state {
            mid.get_mut().get_mut().feed(data);
            let State::Upgrading(mid) = std::mem::replace(&mut self.state, State::Done) else {
                unreachable!()
            };
            match mid.handshake() {
                Ok(mut ws) => {
                    ws.get_mut().take_output(out);
                    self.state = State::Open(Box::new(ws));
                    // Bytes after the request would be a protocol error (tungstenite refuses a request
                    // followed by anything), so the pipe is empty here.
                    return Ok(());
                }
                Err(HandshakeError::Interrupted(mut mid)) => {
                    mid.get_mut().get_mut().take_output(out);
                    mid.get_mut().get_mut().settle();
                    self.state = State::Upgrading(Box::new(mid));
                    return Ok(());
                }
                Err(HandshakeError::Failure(e)) => {
                    let why = handshake_refusal(e, out);
                    return Err(WsEnd::Refused(why));
                }
            }
        }
        let State::Open(ws) = &mut self.state else { return Err(WsEnd::Closed) };
        ws.get_mut().feed(data);
        let end = loop {
            match ws.read() {
                Ok(Message::Binary(b)) => mqtt.extend_from_slice(&b),
                Ok(Message::Text(_)) => {
                    let _ = ws.close(Some(close_frame(1003, "binary frames only")));
                    break Some(WsEnd::TextFrame);
                }
                // Answered by tungstenite (pong, close reply); written below.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(_)) => break Some(WsEnd::Closed),
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(Error::ConnectionClosed | Error::AlreadyClosed) => break Some(WsEnd::Closed),
                Err(Error::Capacity(e)) => {
                    let _ = ws.close(Some(close_frame(1009, "frame too large")));
                    break Some(WsEnd::Protocol(e.to_string()));
                }
                Err(e) => {
                    let _ = ws.close(Some(close_frame(1002, "protocol error")));
                    break Some(WsEnd::Protocol(e.to_string()));
                }
            }
        };
        // Pongs and close replies are queued by `read`; `flush` writes them to the pipe.
        let _ = ws.flush();
        ws.get_mut().take_output(out);
        ws.get_mut().settle();
        match end {
            None => Ok(()),
            Some(e) => {
                self.state = State::Done;
                Err(e)
            }
        }
    }

    /// Frames MQTT bytes for the client as one binary message, appended to `out`.
    pub(crate) fn write(&mut self, mqtt: Vec<u8>, out: &mut Vec<u8>) {
        let State::Open(ws) = &mut self.state else { return };
        if !mqtt.is_empty() {
            // Writes to the pipe cannot block; an error means the socket is closing anyway.
            let _ = ws.send(Message::Binary(mqtt.into()));
        }
        ws.get_mut().take_output(out);
    }

    /// A close frame (normal closure) appended to `out`; nothing is written after it.
    pub(crate) fn close(&mut self, out: &mut Vec<u8>) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(None);
            let _ = ws.flush();
            ws.get_mut().take_output(out);
        }
        self.state = State::Done;
    }
}

fn close_frame(code: u16, reason: &'static str) -> tungstenite::protocol::CloseFrame {
    tungstenite::protocol::CloseFrame { code: code.into(), reason: reason.into() }
}

/// Writes the HTTP answer to a refused upgrade to `out` and says why it was refused.
fn handshake_refusal(e: Error, out: &mut Vec<u8>) -> String {
    match e {
        // Our check refused it: tungstenite wrote the answer into the pipe it then dropped, so it is
        // written again here from the response it hands back.
        Error::Http(resp) => {
            let status = resp.status();
            let body = resp.body().as_deref().unwrap_or(&[]);
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or(""),
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body);
            String::from_utf8_lossy(body).trim().to_string()
        }
        // Not a WebSocket upgrade we can take (wrong method or version, a missing header...). RFC 6455
        // §4.4: name the version we speak.
        other => {
            out.extend_from_slice(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n",
            );
            other.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WsSettings {
        WsSettings { path: None, max_frame_bytes: 1024 }
    }

    fn request(path: &str, protocol: Option<&str>, version: &str) -> Vec<u8> {
        let mut r = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        if let Some(p) = protocol {
            r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    /// A masked client frame.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask = [1u8, 2, 3, 4];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn open(layer: &mut WsLayer) -> String {
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        layer.read(&request("/mqtt", Some("mqtt"), "13"), &mut mqtt, &mut out).unwrap();
        assert!(layer.is_open());
        String::from_utf8(out).unwrap().to_ascii_lowercase()
    }

    #[test]
    fn upgrade_picks_mqtt_and_binary_frames_carry_the_bytes() {
        let mut l = WsLayer::new(&settings());
        let answer = open(&mut l);
        assert!(answer.starts_with("http/1.1 101"), "{answer}");
        assert!(answer.contains("sec-websocket-protocol: mqtt\r\n"), "{answer}");
        assert!(answer.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"), "{answer}");

        // A packet split over a frame and its continuation, then another in a frame of its own, fed
        // one byte at a time.
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        let mut first = frame(2, b"\x10\x05ab");
        first[0] &= 0x7f;
        let mut stream = first;
        stream.extend(frame(0, b"cde"));
        stream.extend(frame(2, b"\xc0\x00"));
        for b in &stream {
            l.read(std::slice::from_ref(b), &mut mqtt, &mut out).unwrap();
        }
        assert_eq!(mqtt, b"\x10\x05abcde\xc0\x00");
        assert!(out.is_empty());

        let mut out = Vec::new();
        l.write(b"\xd0\x00".to_vec(), &mut out);
        assert_eq!(out, b"\x82\x02\xd0\x00", "an unmasked binary frame");
    }

    #[test]
    fn pings_are_answered() {
        let mut l = WsLayer::new(&settings());
        open(&mut l);
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        l.read(&frame(9, b"hi"), &mut mqtt, &mut out).unwrap();
        assert_eq!(out, b"\x8a\x02hi");
    }

    #[test]
    fn a_wrong_or_missing_subprotocol_is_refused() {
        for p in [Some("soap"), None] {
            let mut l = WsLayer::new(&settings());
            let (mut mqtt, mut out) = (Vec::new(), Vec::new());
            let e = l.read(&request("/", p, "13"), &mut mqtt, &mut out).unwrap_err();
            assert!(matches!(e, WsEnd::Refused(ref why) if why.contains("mqtt")), "{e:?}");
            let answer = String::from_utf8(out).unwrap();
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        }
        let mut l = WsLayer::new(&settings());
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        l.read(&request("/", Some("mqttv3.1, other"), "13"), &mut mqtt, &mut out).unwrap();
        let answer = String::from_utf8(out).unwrap().to_ascii_lowercase();
        assert!(answer.contains("sec-websocket-protocol: mqttv3.1\r\n"), "{answer}");
    }

    #[test]
    fn a_wrong_version_or_path_is_refused() {
        let mut l = WsLayer::new(&settings());
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        assert!(matches!(
            l.read(&request("/", Some("mqtt"), "8"), &mut mqtt, &mut out),
            Err(WsEnd::Refused(_))
        ));
        let answer = String::from_utf8(out).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("Sec-WebSocket-Version: 13"),
            "{answer}"
        );

        let s = WsSettings { path: Some("/mqtt".into()), ..settings() };
        let mut l = WsLayer::new(&s);
        let mut out = Vec::new();
        assert!(l.read(&request("/other", Some("mqtt"), "13"), &mut mqtt, &mut out).is_err());
        assert!(String::from_utf8(out).unwrap().starts_with("HTTP/1.1 404"));
        let mut l = WsLayer::new(&s);
        let mut out = Vec::new();
        l.read(&request("/mqtt", Some("mqtt"), "13"), &mut mqtt, &mut out).unwrap();
        assert!(l.is_open());
    }

    #[test]
    fn text_and_oversized_frames_end_the_connection() {
        let mut l = WsLayer::new(&settings());
        open(&mut l);
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        assert_eq!(l.read(&frame(1, b"hello"), &mut mqtt, &mut out), Err(WsEnd::TextFrame));
        assert_eq!(out[0], 0x88, "a close frame");
        assert_eq!(&out[2..4], &1003u16.to_be_bytes());

        let mut l = WsLayer::new(&settings());
        open(&mut l);
        let mut out = Vec::new();
        let e = l.read(&frame(2, &[0u8; 2000]), &mut mqtt, &mut out).unwrap_err();
        assert!(matches!(e, WsEnd::Protocol(_)), "{e:?}");
        assert_eq!(&out[2..4], &1009u16.to_be_bytes());
        assert!(mqtt.is_empty());
    }

    #[test]
    fn garbage_instead_of_an_upgrade_is_refused() {
        let mut l = WsLayer::new(&settings());
        let (mut mqtt, mut out) = (Vec::new(), Vec::new());
        // An MQTT CONNECT sent to a WebSocket port.
        let r = l.read(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n", &mut mqtt, &mut out);
        assert!(matches!(r, Err(WsEnd::Refused(_))), "{r:?}");
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    }
}
